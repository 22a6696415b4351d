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
