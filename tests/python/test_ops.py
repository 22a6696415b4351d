"""The custom ops as PyTorch sees them: gradcheck through the C++ float64
reference, opcheck, torch.compile, checkpointing, empty inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import kasmina
from kasmina import Kind, Stage
from conftest import STAGE_MIX, cycle, make_layer, rel_err, seed_tensors

KINDS = list(Kind)


def op_args(layer, x, grad_stats_out=None):
    stage, kind, bp, alpha, w, sc = seed_tensors(layer)
    c = layer._config
    return (x, stage, kind, bp, alpha, w, sc, None, grad_stats_out, c["dead_threshold"],
            c["clamp_lo"], c["clamp_hi"], c["grad_clip"], layer.backend)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", [dict(), dict(clamp=(-0.9, 1.1)),
                                     dict(clamp=(-0.9, 1.1), grad_clip=0.7)],
                         ids=["plain", "clamp", "clamp_clip"])
def test_gradcheck_float64_through_cpp_reference(kind, options):
    layer = make_layer(15, [kind] * 5, [Stage.GRAFTING, Stage.TRAINING, Stage.FINE_TUNING,
                                       Stage.FOSSILIZED, Stage.DORMANT], **options)
    stage, k, bp, alpha, w, sc = seed_tensors(layer)
    x = torch.randn(4, 15, dtype=torch.float64, requires_grad=True)
    a = alpha.clone().requires_grad_(True)
    wt = w.clone().requires_grad_(True)
    s = sc.clone().requires_grad_(True)
    lo, hi = (options["clamp"] if "clamp" in options else (None, None))

    def fn(x_, a_, w_, s_):
        # W, scale, alpha are float32 by contract; only x can be float64, so
        # gradcheck varies x (float64) and checks the float32 grads loosely below.
        return torch.ops.kasmina.forward(x_, stage, k, bp, a_, w_, s_, None, None, 1e-6, lo, hi,
                                         options.get("grad_clip"), "auto")[0]

    if "grad_clip" not in options:
        # The clip is deliberately not a derivative; everything else is.
        assert torch.autograd.gradcheck(lambda x_: fn(x_, a, wt, s), (x,), eps=1e-6, atol=1e-7)
    # W, scale, alpha gradients are not the true derivatives for every stage
    # (shadow training, frozen FOSSILIZED seeds), so they are checked against
    # the plain-PyTorch statement of SPEC section 5 instead.
    y = fn(x, a, wt, s)
    g = torch.randn_like(y)
    dx, da, dw, ds = torch.autograd.grad(y, (x, a, wt, s), g)
    rx, rw, rs, ra, _ = kasmina.reference.backward(
        x.detach(), g, stage, k, bp, alpha.double(), w.double(), sc.double(),
        clamp=options.get("clamp"), grad_clip=options.get("grad_clip"))
    assert rel_err(dx, rx) <= 1e-6  # the clip bound is stored as float32
    for ours, ref in ((da, ra), (dw, rw), (ds, rs)):
        assert rel_err(ours, ref) <= 1e-6
    assert da.abs().sum() > 0 and dw.abs().sum() > 0


def test_opcheck_forward_and_backward():
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING, Stage.TRAINING, Stage.FOSSILIZED,
                                            Stage.EVALUATING], clamp=(-1.0, 1.0), grad_clip=2.0)
    x = torch.randn(5, 24, requires_grad=True)
    args = list(op_args(layer, x))
    args[4] = args[4].clone().requires_grad_(True)
    args[5] = args[5].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.kasmina.forward.default, tuple(args))
    stage, kind, bp, alpha, w, sc = seed_tensors(layer)
    bargs = (x.detach(), torch.randn(5, 24), stage, kind, bp, alpha, w, sc, None, -1.0, 1.0, 2.0,
             "auto")
    torch.library.opcheck(torch.ops.kasmina.backward.default, bargs)


def _run(module, x, dy):
    x = x.clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return [y.detach(), x.grad, *[p.grad.clone() for p in module.parameters()]]


def test_compile_fullgraph_matches_eager_and_records_stats():
    torch._dynamo.reset()
    layer = make_layer(20, cycle(KINDS, 4), [Stage.GRAFTING, Stage.TRAINING, Stage.FINE_TUNING,
                                            Stage.DORMANT])
    x = torch.randn(6, 20)
    dy = torch.randn(6, 20)
    eager = _run(layer, x, dy)
    tel_eager, gs_eager = layer.telemetry.clone(), layer.grad_stats.clone()
    layer.telemetry.fill_(float("nan"))
    layer.grad_stats.fill_(float("nan"))
    compiled = torch.compile(layer, fullgraph=True)
    got = _run(compiled, x, dy)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    assert torch.equal(layer.telemetry, tel_eager)
    assert torch.equal(layer.grad_stats, gs_eager)


def test_checkpoint_gives_bitwise_equal_grads():
    layer = make_layer(32, cycle(KINDS, 8), STAGE_MIX)
    x = torch.randn(9, 32)
    dy = torch.randn(9, 32)
    plain = _run(layer, x, dy)

    class Ckpt(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return checkpoint(self.inner, t, use_reentrant=False)

    got = _run(Ckpt(layer), x, dy)
    for a, b in zip(plain, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_input(dtype):
    layer = make_layer(12, [Kind.RESIDUAL, Kind.MLP, Kind.CONV], [Stage.GRAFTING] * 3)
    x = torch.randn(0, 12, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 12) and y.dtype == dtype
    tel = layer.telemetry
    assert tel[:, [0, 1, 4, 5, 6, 7]].eq(0).all()
    assert (tel[:, 2] == float("inf")).all() and (tel[:, 3] == float("-inf")).all()
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert layer.weights.grad.eq(0).all() and layer.alpha.grad.eq(0).all()
    assert layer.grad_stats.eq(0).all()


def test_strided_rows_and_leading_dims():
    layer = make_layer(12, [Kind.MLP, Kind.ATTENTION, Kind.CONV], [Stage.GRAFTING] * 3)
    base = torch.randn(4, 5, 20)
    x = base[..., 3:15]  # last dim contiguous, rows 20 apart
    y = layer(x)
    ref = layer(x.contiguous())
    assert torch.equal(y, ref) and y.shape == (4, 5, 12)


# --- the eager path (no torch.library) against the registered ops ------------------

def _eager_vs_op(layer, x, dy):
    """(y, telemetry, nonfinite, dx, dW, dscale, dalpha, grad_stats) through the
    layer's eager path and through torch.ops.kasmina.forward + autograd."""
    def grads(y, xg):
        y.backward(dy)
        out = [y.detach(), layer.telemetry.clone(), layer.nonfinite_counts.clone(), xg.grad]
        out += [p.grad.clone() for p in (layer.weights, layer.scales, layer.alpha)]
        return out + [layer.grad_stats.clone()]

    for p in layer.parameters():
        p.grad = None
    xg = x.clone().requires_grad_(True)
    eager = grads(layer(xg), xg)

    for p in layer.parameters():
        p.grad = None
    layer.telemetry.fill_(float("nan"))
    layer.grad_stats.fill_(float("nan"))
    xg = x.clone().requires_grad_(True)
    c = layer._config
    y, tel, nf = torch.ops.kasmina.forward(
        xg, layer.seed_stage, layer.seed_kind, layer.seed_blueprint, layer.alpha, layer.weights,
        layer.scales, None, layer.grad_stats, c["dead_threshold"], c["clamp_lo"], c["clamp_hi"],
        c["grad_clip"], layer.backend)
    layer.telemetry.copy_(tel)
    layer.nonfinite_counts.copy_(nf)
    return eager, grads(y, xg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_eager_path_matches_op_path_bitwise(dtype):
    layer = make_layer(32, cycle(KINDS, 8), STAGE_MIX, clamp=(-1.5, 1.5), grad_clip=2.0)
    x = torch.randn(7, 3, 32).to(dtype)
    x[0, 0, 5] = float("nan")
    dy = torch.randn(7, 3, 32).to(dtype)
    eager, op = _eager_vs_op(layer, x, dy)
    for a, b in zip(eager, op):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    # forward_auto (the op's signature, eager) gives the op's results too.
    args = op_args(layer, x)
    with torch.no_grad():
        for a, b in zip(kasmina._ops.forward_auto(*args), torch.ops.kasmina.forward(*args)):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def test_dlpack_fallback_matches_exchange_api():
    """Tensors cross through the DLPack C exchange API where PyTorch has it,
    else through __dlpack__: same views, same checks, same bits."""
    from kasmina import _C
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING, Stage.TRAINING, Stage.FINE_TUNING,
                                            Stage.FOSSILIZED])
    x = torch.randn(5, 24)
    dy = torch.randn(5, 24)
    fast = _run(layer, x, dy) + [layer.telemetry.clone(), layer.grad_stats.clone()]
    _C._set_exchange_api_enabled(False)
    try:
        assert not _C.has_exchange_api(x)
        slow = _run(layer, x, dy) + [layer.telemetry.clone(), layer.grad_stats.clone()]
        with pytest.raises(ValueError, match="hidden"):
            layer(torch.randn(5, 20))
        with pytest.raises(TypeError, match="must be a tensor"):
            _C.forward([1.0], *([x] * 9), None, 1e-6, None, None, 1, None)
    finally:
        _C._set_exchange_api_enabled(True)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_eager_path_is_not_taken_while_tracing():
    """A dispatch mode (FakeTensor, make_fx, ...) must see the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = make_layer(12, [Kind.MLP] * 3, [Stage.GRAFTING] * 3)
    x = torch.randn(2, 12)
    with Record():
        y = layer(x)
    assert any("kasmina.forward" in f for f in seen), seen
    assert torch.equal(y, layer(x))
    assert not kasmina._ops.eager_ok(torch.nn.Parameter(x).as_subclass(_Sub))


class _Sub(torch.Tensor):
    pass


def test_layer_used_twice_before_backward():
    layer = make_layer(16, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    x = torch.randn(3, 16)
    a, b = _run(layer, x, torch.ones(3, 16)), _run(layer, 2 * x, torch.ones(3, 16))
    xg = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    (layer(xg) + layer(2 * xg)).sum().backward()
    for p, ga, gb in zip(layer.parameters(), a[2:], b[2:]):
        assert torch.equal(p.grad, ga + gb)


def test_negative_bit_views_are_refused_or_resolved():
    layer = make_layer(12, [Kind.MLP] * 3, [Stage.GRAFTING] * 3)
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="negative bit"):
        layer(x._neg_view())
    xg = x.clone().requires_grad_(True)
    layer(xg).backward(torch.ones(2, 12)._neg_view())
    ref = xg.grad.clone()
    xg.grad = None
    layer(xg).backward(-torch.ones(2, 12))
    assert torch.equal(xg.grad, ref)


def test_op_path_layer_used_twice_before_backward_compiled():
    torch._dynamo.reset()
    layer = make_layer(16, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    x = torch.randn(3, 16)

    class Twice(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t) + self.inner(2 * t)

    eager = _run(Twice(layer), x, torch.ones(3, 16)) + [layer.grad_stats.clone()]
    layer.grad_stats.fill_(float("nan"))
    got = _run(torch.compile(Twice(layer), fullgraph=True), x, torch.ones(3, 16))
    got.append(layer.grad_stats.clone())
    for a, b in zip(eager, got):
        assert torch.equal(a, b)


def test_exchange_api_as_int_attribute():
    """The exchange table's earlier spelling (`__c_dlpack_exchange_api__`, its
    address as an int, PyTorch 2.10-era) is found as well."""
    import ctypes
    from kasmina import _C
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get(torch.Tensor.__dlpack_c_exchange_api__, b"dlpack_exchange_api")

    class Older(torch.Tensor):
        __dlpack_c_exchange_api__ = None
        __c_dlpack_exchange_api__ = address

    layer = make_layer(12, [Kind.MLP, Kind.CONV, Kind.RESIDUAL], [Stage.GRAFTING] * 3)
    x = torch.randn(4, 12)
    assert _C.has_exchange_api(x.as_subclass(Older))
    outs = []
    for cast in (lambda t: t, lambda t: t.as_subclass(Older)):
        y, tel, nf = torch.empty(4, 12), torch.empty(3, 8), torch.empty(3, dtype=torch.int64)
        st, kd, bp, al, w, sc = seed_tensors(layer)
        _C.forward(*[cast(t) for t in (x, y, tel, nf, st, kd, bp, al, w, sc)], None, 1e-6, None,
                   None, 1, None)
        outs.append((y, tel, nf))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_binding_refuses_outputs_unlike_x():
    """y, dy and dx must match x in dtype and shape; nothing is written."""
    from kasmina import _C
    S, C, B, N = 2, 4, 3, 5
    x = torch.randn(N, S * C)
    stage = torch.full((S,), 3, dtype=torch.int32)
    kind = torch.zeros(S, dtype=torch.int32)
    bp = torch.tensor([1, 2], dtype=torch.int32)
    alpha = torch.full((S,), 0.5)
    w, sc = torch.randn(B, C), torch.ones(B)
    tel = torch.full((S, 8), float("nan"))
    nf = torch.full((S,), -7, dtype=torch.int64)
    y = torch.full((N, S * C), float("nan"), dtype=torch.float16)
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        _C.forward(x, y, tel, nf, stage, kind, bp, alpha, w, sc, None, 1e-6, None, None, 1, None)
    assert tel.isnan().all() and (nf == -7).all() and y.isnan().all()

    dy = torch.randn(N + 1, S * C)
    dx = torch.full((N, S * C), float("nan"))
    dw, ds, da, gs = (torch.full(s, float("nan")) for s in [(B, C), (B,), (S,), (S, 3)])
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        _C.backward(x, dy, dx, dw, ds, da, gs, stage, kind, bp, alpha, w, sc, None,
                    None, None, None, 1, None)
    assert dx.isnan().all() and dw.isnan().all() and gs.isnan().all()
