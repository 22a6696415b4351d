"""The two kasmina ops as PyTorch custom ops (``torch.ops.kasmina.forward`` and
``torch.ops.kasmina.backward``), and the eager fast path beside them.

Each op is a thin call into the C++ library through ``kasmina._C``: tensors
cross as DLPack views (the DLPack C exchange API where PyTorch has it), the
C++ side checks them and runs the kernel on PyTorch's current stream. What
this file adds is what PyTorch needs around an opaque kernel: fake (meta)
implementations so ``torch.compile`` can trace through without running it, an
autograd formula that calls the backward op, the backend choice, and on CUDA
the device guard.

Eager calls (nothing tracing, see ``eager_ok``) skip ``torch.library``'s
Python dispatch: ``EagerForward`` (a ``torch.autograd.Function``) calls the
binding directly in forward and backward, or the binding is called bare when
no gradient is needed. Both paths run the same binding on the same arguments,
so they give the same bits (tests/python/test_ops.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import _C

Tensor = torch.Tensor

BACKENDS = {"reference": 0, "cpu": 1, "cuda": 2}
TELEMETRY_WIDTH = _C.TELEMETRY_WIDTH
GRAD_STATS_WIDTH = _C.GRAD_STATS_WIDTH
_CUDA = BACKENDS["cuda"]
_REFERENCE = BACKENDS["reference"]
_CPU = BACKENDS["cpu"]
_CONTIGUOUS = torch.contiguous_format


def resolve_backend(backend: str, x: Tensor) -> int:
    """Backend id for a call. "auto": CUDA for CUDA tensors; on the CPU the
    fast backend, except float64, which only the float64 reference takes (so
    that gradcheck runs through C++)."""
    if backend == "auto":
        if x.is_cuda:
            return _CUDA
        return _REFERENCE if x.dtype == torch.float64 else _CPU
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"kasmina: backend must be one of 'auto', 'reference', 'cpu', 'cuda', got {backend!r}"
        ) from None


# --- what may skip torch.library ------------------------------------------------
_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_jit_tracing = torch._C._get_tracing_state


def eager_ok(*tensors: Tensor) -> bool:
    """True when a call may go straight to the binding: not under
    torch.compile / export (Dynamo), no torch.jit trace, no functorch
    transform, no TorchDispatchMode (FakeTensor, make_fx, ...), and plain
    tensors (no subclass or TorchFunctionMode with __torch_function__; an
    nn.Parameter counts as plain). Anything else takes the registered op,
    which every one of those understands. ~0.4 us."""
    return not (_is_compiling() or _has_torch_function(tensors) or _dispatch_modes()
                or _functorch_level() is not None or _jit_tracing() is not None)


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _NullContext()
# torch.cuda.current_device without its Python frame and lazy-init check: it
# is asked only about an x already on CUDA, so CUDA is initialised (absent
# from torch builds without CUDA, where no tensor is on CUDA anyway).
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


def _cuda_guard(x: Tensor):
    # The CUDA backend launches on the current device: make it x's. (The
    # stream is the binding's business: it asks PyTorch for the current stream
    # of x's device at call time.)
    if x.is_cuda and x.get_device() != _current_device():
        return torch.cuda.device(x.device)
    return _NULL


def _default_workspace(backend: int, x: Tensor, stage: Tensor, weights: Tensor) -> Optional[Tensor]:
    # Direct op calls (opcheck, users) may pass no workspace; the layer passes
    # its cached one, so this path allocates only outside the layer.
    if backend != _CUDA:
        return None
    hidden = stage.numel() * weights.shape[-1]
    nbytes = _C.workspace_bytes(hidden, stage.numel(), weights.shape[0], backend)
    return torch.zeros(nbytes, dtype=torch.uint8, device=x.device)


# --- the binding calls, shared by the ops and the eager path ---------------------
def run_forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales,
                workspace, dead_threshold, clamp_lo, clamp_hi, b: int) -> None:
    """kasmina::forward into the given outputs (the binding checks every
    tensor before anything is written)."""
    if x.is_neg():  # a lazy negation view: DLPack cannot say so
        raise ValueError("kasmina: x has its negative bit set (a lazy negation view); "
                         "call .resolve_neg() first")
    if workspace is None and b == _CUDA:
        workspace = _default_workspace(b, x, stage, weights)
    if x.is_cuda and x.get_device() != _current_device():
        with torch.cuda.device(x.device):
            _C.forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights,
                       scales, workspace, dead_threshold, clamp_lo, clamp_hi, b, None)
    else:
        _C.forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales,
                   workspace, dead_threshold, clamp_lo, clamp_hi, b, None)


def run_backward(x, dy, grad_stats, stage, kind, blueprint, alpha, weights, scales, workspace,
                 clamp_lo, clamp_hi, grad_clip, b: int):
    """kasmina::backward: (dx, dweights, dscales, dalpha, grad_stats), all
    fully overwritten; grad_stats is written into the given tensor if any."""
    if dy.is_neg():  # a lazy negation view (DLPack cannot say so): resolve it
        dy = dy.resolve_neg()
    # empty_like is ~1 us cheaper than torch.empty(shape, dtype=, device=).
    # W, scale and alpha are float32 of [B, C], [B], [S] when the call is
    # valid, and the binding checks them before these outputs.
    dx = torch.empty_like(x, memory_format=_CONTIGUOUS)
    dweights = torch.empty_like(weights, dtype=torch.float32, memory_format=_CONTIGUOUS)
    dscales = torch.empty_like(scales, dtype=torch.float32, memory_format=_CONTIGUOUS)
    dalpha = torch.empty_like(alpha, dtype=torch.float32, memory_format=_CONTIGUOUS)
    if grad_stats is None:
        grad_stats = torch.empty((stage.shape[0], GRAD_STATS_WIDTH), dtype=torch.float32,
                                 device=x.device)
    if workspace is None and b == _CUDA:
        workspace = _default_workspace(b, x, stage, weights)
    with _cuda_guard(x):
        _C.backward(x, dy, dx, dweights, dscales, dalpha, grad_stats, stage, kind, blueprint,
                    alpha, weights, scales, workspace, clamp_lo, clamp_hi, grad_clip, b, None)
    return dx, dweights, dscales, dalpha, grad_stats


# The workspace is declared as not mutated: every launch leaves it as it found
# it (zero-filled, docs/DESIGN.md), so no caller can observe a write, and
# declaring it mutated would make functionalization clone it on every call
# under torch.compile.
@torch.library.custom_op("kasmina::forward", mutates_args=())
def forward(
    x: Tensor,
    stage: Tensor,
    kind: Tensor,
    blueprint: Tensor,
    alpha: Tensor,
    weights: Tensor,
    scales: Tensor,
    workspace: Optional[Tensor],
    grad_stats_out: Optional[Tensor],
    dead_threshold: float,
    clamp_lo: Optional[float],
    clamp_hi: Optional[float],
    grad_clip: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """y, telemetry [S, 8] float32, nonfinite counts [S] int64 (SPEC 3, 4).

    grad_clip is unused here; it rides along so the autograd formula sees it.
    grad_stats_out (optional [S, 3] float32) is where the autograd formula
    copies the grad_stats of the matching backward: that is how a layer's
    buffer learns them, in eager mode and under torch.compile alike (a copy_
    into a forward input inside the backward graph is supported by
    AOTAutograd). The forward itself never touches it."""
    b = resolve_backend(backend, x)
    num_seeds = stage.shape[0]
    dev = x.device
    y = torch.empty_like(x, memory_format=_CONTIGUOUS)
    telemetry = torch.empty((num_seeds, TELEMETRY_WIDTH), dtype=torch.float32, device=dev)
    nonfinite = torch.empty((num_seeds,), dtype=torch.int64, device=dev)
    run_forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales,
                workspace, dead_threshold, clamp_lo, clamp_hi, b)
    return y, telemetry, nonfinite


@forward.register_fake
def _forward_fake(x, stage, kind, blueprint, alpha, weights, scales, workspace, grad_stats_out,
                  dead_threshold,
                  clamp_lo, clamp_hi, grad_clip, backend):
    num_seeds = stage.numel()
    return (
        x.new_empty(x.shape),
        x.new_empty((num_seeds, TELEMETRY_WIDTH), dtype=torch.float32),
        x.new_empty((num_seeds,), dtype=torch.int64),
    )


@torch.library.custom_op("kasmina::backward", mutates_args=())
def backward(
    x: Tensor,
    dy: Tensor,
    stage: Tensor,
    kind: Tensor,
    blueprint: Tensor,
    alpha: Tensor,
    weights: Tensor,
    scales: Tensor,
    workspace: Optional[Tensor],
    clamp_lo: Optional[float],
    clamp_hi: Optional[float],
    grad_clip: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dweights [B, C], dscales [B], dalpha [S], grad_stats [S, 3] (SPEC 5).
    All outputs are fully overwritten (DESIGN decision 3)."""
    return run_backward(x, dy, None, stage, kind, blueprint, alpha, weights, scales, workspace,
                        clamp_lo, clamp_hi, grad_clip, resolve_backend(backend, x))


@backward.register_fake
def _backward_fake(x, dy, stage, kind, blueprint, alpha, weights, scales, workspace, clamp_lo,
                   clamp_hi, grad_clip, backend):
    num_seeds = stage.numel()
    f32 = torch.float32
    return (
        x.new_empty(x.shape),
        x.new_empty(weights.shape, dtype=f32),
        x.new_empty(scales.shape, dtype=f32),
        x.new_empty((num_seeds,), dtype=f32),
        x.new_empty((num_seeds, GRAD_STATS_WIDTH), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    (x, stage, kind, blueprint, alpha, weights, scales, workspace, grad_stats_out, _dead,
     clamp_lo, clamp_hi, grad_clip, backend) = inputs
    ctx.save_for_backward(x, stage, kind, blueprint, alpha, weights, scales, workspace)
    # Written, never read, by the backward: an attribute, not a saved tensor
    # (a saved one would fail autograd's version check once another backward
    # of the same layer has written it, e.g. a layer used twice in a graph).
    ctx.grad_stats_out = grad_stats_out
    ctx.config = (clamp_lo, clamp_hi, grad_clip, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_formula(ctx, dy, _dtelemetry, _dnonfinite):
    x, stage, kind, blueprint, alpha, weights, scales, workspace = ctx.saved_tensors
    grad_stats_out = ctx.grad_stats_out
    clamp_lo, clamp_hi, grad_clip, backend = ctx.config
    if dy is None:  # y unused: its gradient is zero
        dy = torch.zeros_like(x)
    # Autograd may hand over expanded (stride 0) or otherwise strided grads;
    # the kernels want a contiguous last dimension.
    dy = dy.contiguous()
    dx, dweights, dscales, dalpha, grad_stats = torch.ops.kasmina.backward(
        x, dy, stage, kind, blueprint, alpha, weights, scales, workspace, clamp_lo, clamp_hi,
        grad_clip, backend)
    if grad_stats_out is not None:
        with torch.no_grad():
            grad_stats_out.copy_(grad_stats)
    return (dx, None, None, None, dalpha, dweights, dscales, None, None, None, None, None, None,
            None)


torch.library.register_autograd("kasmina::forward", _backward_formula, setup_context=_setup_context)


# --- the eager path ---------------------------------------------------------------
class EagerForward(torch.autograd.Function):
    """The forward op's autograd formula without torch.library: forward writes
    y (returned) and telemetry / nonfinite (given, written in place, never
    differentiable); backward runs kasmina::backward and writes grad_stats
    into grad_stats_out when given. Same binding calls as the ops.

    Only the differentiable tensors are arguments of ``apply`` (each argument
    costs autograd time); the rest rides in one tuple. The seed table and the
    workspace are still saved with save_for_backward, so a lifecycle call
    between forward and backward (which rewrites the seed table in place) is
    refused by autograd's version check, as on the op path."""

    @staticmethod
    def forward(ctx, x, alpha, weights, scales, rest):
        (stage, kind, blueprint, workspace, grad_stats_out, telemetry, nonfinite, dead_threshold,
         clamp_lo, clamp_hi, grad_clip, b) = rest
        y = torch.empty_like(x, memory_format=_CONTIGUOUS)
        run_forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales,
                    workspace, dead_threshold, clamp_lo, clamp_hi, b)
        ctx.save_for_backward(x, alpha, weights, scales, stage, kind, blueprint, workspace)
        # grad_stats_out is written, never read, by the backward: held as an
        # attribute, not a saved tensor (no version check against the writes
        # of other backwards of the same layer).
        ctx.grad_stats_out = grad_stats_out
        ctx.config = (clamp_lo, clamp_hi, grad_clip, b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, alpha, weights, scales, stage, kind, blueprint, workspace = ctx.saved_tensors
        clamp_lo, clamp_hi, grad_clip, b = ctx.config
        # Autograd may hand over expanded (stride 0) or otherwise strided
        # grads; the kernels want a contiguous last dimension.
        dy = dy.contiguous()
        dx, dweights, dscales, dalpha, _ = run_backward(
            x, dy, ctx.grad_stats_out, stage, kind, blueprint, alpha, weights, scales, workspace,
            clamp_lo, clamp_hi, grad_clip, b)
        return dx, dalpha, dweights, dscales, None


def forward_into(x, stage, kind, blueprint, alpha, weights, scales, workspace, grad_stats_out,
                 telemetry, nonfinite, dead_threshold, clamp_lo, clamp_hi, grad_clip,
                 b: int, needs_grad: Optional[bool] = None) -> Tensor:
    """Eager forward (the caller checked ``eager_ok``): y; telemetry and
    nonfinite are written in place. Through EagerForward when a gradient is
    needed, else the binding alone. needs_grad: None to find out here, or the
    caller's answer (KasminaLayer.forward has asked already)."""
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad
                                                  or weights.requires_grad
                                                  or scales.requires_grad)
    if needs_grad:
        return EagerForward.apply(x, alpha, weights, scales, (
            stage, kind, blueprint, workspace, grad_stats_out, telemetry, nonfinite,
            dead_threshold, clamp_lo, clamp_hi, grad_clip, b))
    y = torch.empty_like(x, memory_format=_CONTIGUOUS)
    run_forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales,
                workspace, dead_threshold, clamp_lo, clamp_hi, b)
    return y


def forward_auto(x, stage, kind, blueprint, alpha, weights, scales, workspace, grad_stats_out,
                 dead_threshold, clamp_lo, clamp_hi, grad_clip, backend):
    """torch.ops.kasmina.forward's signature and results; eager calls skip
    torch.library (same bits), traced ones take the op."""
    if not eager_ok(x, alpha, weights, scales, stage, kind, blueprint):
        return torch.ops.kasmina.forward(x, stage, kind, blueprint, alpha, weights, scales,
                                         workspace, grad_stats_out, dead_threshold, clamp_lo,
                                         clamp_hi, grad_clip, backend)
    b = resolve_backend(backend, x)
    num_seeds = stage.shape[0]
    telemetry = torch.empty((num_seeds, TELEMETRY_WIDTH), dtype=torch.float32, device=x.device)
    nonfinite = torch.empty((num_seeds,), dtype=torch.int64, device=x.device)
    y = forward_into(x, stage, kind, blueprint, alpha, weights, scales, workspace, grad_stats_out,
                     telemetry, nonfinite, dead_threshold, clamp_lo, clamp_hi, grad_clip, b)
    return y, telemetry, nonfinite


def info(hidden: int = 1024, num_seeds: int = 8, rows: int = 4096,
         dtype: "torch.dtype | str" = torch.float32) -> dict:
    """Version, backends (compiled / available / why not), devices, and which
    kernel the dispatcher picks on each available backend for a
    [rows, hidden] input of ``dtype`` with ``num_seeds`` seeds of mixed kinds,
    all GRAFTING."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
        if dtype not in names:
            raise ValueError(f"kasmina: dtype must be one of {sorted(names)}, got {dtype!r}")
        dtype = names[dtype]
    build = _C.build_info()
    backends = {}
    for name, b in BACKENDS.items():
        available = _C.backend_available(b)
        backends[name] = dict(
            compiled=name != "cuda" or build["cuda_compiled"],
            available=available,
            reason="" if available else _C.backend_unavailable_reason(b),
        )
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())]
    dispatch = {}
    chunk = hidden // num_seeds
    for name, b in BACKENDS.items():
        if not backends[name]["available"] or (name == "cuda" and not torch.cuda.is_available()):
            continue
        dev = torch.device("cuda" if name == "cuda" else "cpu")
        dt = torch.float64 if name == "reference" else dtype
        x = torch.randn(rows, hidden, dtype=dt, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        stage = torch.full((num_seeds,), 3, **i32)
        kind = torch.arange(num_seeds, **i32) % 4
        blueprint = torch.arange(1, num_seeds + 1, **i32)
        alpha = torch.full((num_seeds,), 0.5, device=dev)
        weights = torch.randn(num_seeds + 1, chunk, device=dev)
        scales = torch.ones(num_seeds + 1, device=dev)
        telemetry = torch.empty(num_seeds, TELEMETRY_WIDTH, device=dev)
        nonfinite = torch.empty(num_seeds, dtype=torch.int64, device=dev)
        ws = _default_workspace(b, x, stage, weights)
        try:
            with _cuda_guard(x):
                dispatch[name] = _C.describe_forward(
                    x, torch.empty_like(x), telemetry, nonfinite, stage, kind, blueprint, alpha,
                    weights, scales, ws, 1e-6, None, None, b, None)
        except (ValueError, TypeError, RuntimeError) as e:
            dispatch[name] = f"unsupported: {e}"
    return dict(
        version=build["version"],
        compiler=build["compiler"],
        torch=torch.__version__,
        backends=backends,
        cuda_architectures=build["cuda_architectures"],
        cuda_devices=build["cuda_devices"],
        devices=devices,
        cpu_threads=build["cpu_threads"],
        dispatch_shape=dict(rows=rows, hidden=hidden, num_seeds=num_seeds,
                            dtype=str(dtype).replace("torch.", "")),
        dispatch=dispatch,
        # Launch knobs in force (0 = the architecture's default; docs/PERFORMANCE.md).
        cuda_launch_config=dict(_C.cuda_launch_config()),
        cuda_tuned_entries=len(_C.cuda_tuned_table()),  # from `kasmina tune`
        profiling=bool(_C.profiling()),  # kasmina.profile / KASMINA_PROFILE=1
    )
