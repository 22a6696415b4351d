"""The two kasmina ops as PyTorch custom ops (``torch.ops.kasmina.forward`` and
``torch.ops.kasmina.backward``).

Each op is a thin call into the C++ library through ``kasmina._C``: tensors
cross as DLPack views, the C++ side checks them and runs the kernel. What this
file adds is what PyTorch needs around an opaque kernel: fake (meta)
implementations so ``torch.compile`` can trace through without running it, an
autograd formula that calls the backward op, the backend choice, and on CUDA
the device guard and the current stream.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C

Tensor = torch.Tensor

BACKENDS = {"reference": 0, "cpu": 1, "cuda": 2}
TELEMETRY_WIDTH = _C.TELEMETRY_WIDTH
GRAD_STATS_WIDTH = _C.GRAD_STATS_WIDTH


def resolve_backend(backend: str, x: Tensor) -> int:
    """Backend id for a call. "auto": CUDA for CUDA tensors; on the CPU the
    fast backend, except float64, which only the float64 reference takes (so
    that gradcheck runs through C++)."""
    if backend == "auto":
        if x.device.type == "cuda":
            return BACKENDS["cuda"]
        return BACKENDS["reference"] if x.dtype == torch.float64 else BACKENDS["cpu"]
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"kasmina: backend must be one of 'auto', 'reference', 'cpu', 'cuda', got {backend!r}"
        ) from None


def _stream(x: Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.device.type == "cuda" else 0


def _detached(*tensors: Optional[Tensor]):
    # DLPack refuses tensors that require grad; the kernels never record
    # autograd history anyway (the autograd formula below does).
    return [t.detach() if t is not None and t.requires_grad else t for t in tensors]


def _cuda_guard(x: Tensor):
    # The CUDA backend launches on the current device: make it x's.
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _default_workspace(backend: int, x: Tensor, stage: Tensor, weights: Tensor) -> Optional[Tensor]:
    # Direct op calls (opcheck, users) may pass no workspace; the layer passes
    # its cached one, so this path allocates only outside the layer.
    if backend != BACKENDS["cuda"]:
        return None
    hidden = stage.numel() * weights.shape[-1]
    nbytes = _C.workspace_bytes(hidden, stage.numel(), weights.shape[0], backend)
    return torch.zeros(nbytes, dtype=torch.uint8, device=x.device)


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
    num_seeds = stage.numel()
    y = x.new_empty(x.shape)
    telemetry = torch.empty((num_seeds, TELEMETRY_WIDTH), dtype=torch.float32, device=x.device)
    nonfinite = torch.empty((num_seeds,), dtype=torch.int64, device=x.device)
    if workspace is None:
        workspace = _default_workspace(b, x, stage, weights)
    alpha, weights, scales, x = _detached(alpha, weights, scales, x)
    with _cuda_guard(x):
        _C.forward(x, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales,
                   workspace, dead_threshold, clamp_lo, clamp_hi, b, _stream(x))
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
    b = resolve_backend(backend, x)
    num_seeds = stage.numel()
    dx = x.new_empty(x.shape)
    dweights = torch.empty(weights.shape, dtype=torch.float32, device=x.device)
    dscales = torch.empty(scales.shape, dtype=torch.float32, device=x.device)
    dalpha = torch.empty((num_seeds,), dtype=torch.float32, device=x.device)
    grad_stats = torch.empty((num_seeds, GRAD_STATS_WIDTH), dtype=torch.float32, device=x.device)
    if workspace is None:
        workspace = _default_workspace(b, x, stage, weights)
    x, dy, alpha, weights, scales = _detached(x, dy, alpha, weights, scales)
    with _cuda_guard(x):
        _C.backward(x, dy, dx, dweights, dscales, dalpha, grad_stats, stage, kind, blueprint,
                    alpha, weights, scales, workspace, clamp_lo, clamp_hi, grad_clip, b,
                    _stream(x))
    return dx, dweights, dscales, dalpha, grad_stats


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
    ctx.save_for_backward(x, stage, kind, blueprint, alpha, weights, scales, workspace,
                          grad_stats_out)
    ctx.config = (clamp_lo, clamp_hi, grad_clip, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_formula(ctx, dy, _dtelemetry, _dnonfinite):
    x, stage, kind, blueprint, alpha, weights, scales, workspace, grad_stats_out = ctx.saved_tensors
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
                    weights, scales, ws, 1e-6, None, None, b, _stream(x))
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
    )
