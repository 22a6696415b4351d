"""SPEC.md restated in plain PyTorch ops.

An independent check of the C++ library (tests compare the two) and the
eager / torch.compile baseline of the benchmark. It is written for clarity and
vectorised over seeds (no Python loop over seeds), so that torch.compile can
fuse it. Gradients come from autograd of the forward, with SPEC's two special
cases written explicitly: shadow training (TRAINING seeds: output is a copy,
the blueprint learns from the surrogate sum(stopgrad(G) * T)) and the
per-row gradient clip (an identity whose backward scales G).

Arithmetic runs in float32 for float32/bfloat16/float16 inputs and in float64
for float64 inputs; telemetry is always accumulated in float64 and returned
in that working dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .enums import Kind, Stage

Tensor = torch.Tensor

# Plain-int copies of the enum values the math compares against. Under
# torch.compile (dynamo, torch 2.15) ``tensor == Kind.RESIDUAL`` with an IntEnum
# member folds to a Python bool and torch.where rejects it; plain ints trace
# as ordinary tensor-scalar comparisons.
_RESIDUAL = int(Kind.RESIDUAL)
_ATTENTION = int(Kind.ATTENTION)
_MLP = int(Kind.MLP)
_GRAFTING = int(Stage.GRAFTING)
_TRAINING = int(Stage.TRAINING)
_FINE_TUNING = int(Stage.FINE_TUNING)
_FOSSILIZED = int(Stage.FOSSILIZED)


class _ClipRowGrad(torch.autograd.Function):
    """Identity on [N, S, C]; backward scales each row's chunk of G by
    min(1, clip / (||G[n, s, :]||_2 + 1e-6)) (SPEC section 5, DESIGN 5)."""

    @staticmethod
    def forward(ctx, y, clip):
        ctx.clip = clip
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
        return g * torch.clamp(ctx.clip / (norm + 1e-6), max=1.0), None


def _seed_transform(x: Tensor, kind: Tensor, w: Tensor, sigma: Tensor) -> Tensor:
    """T of SPEC section 3 for every seed at once. x [N, S, C]; kind [S];
    w [S, C]; sigma [S]."""
    chunk = x.shape[-1]
    s = sigma[:, None]
    residual = x + s * w
    attention = x * torch.softmax(w, dim=-1)
    mlp = s * torch.relu(x * w)
    # CONV: taps w0..w2 over X[j], X[j-1], X[j-2], zero-padded at the chunk
    # start; padding w to 3 taps keeps C < 3 layers (which hold no CONV seed)
    # computable.
    taps = F.pad(w, (0, max(0, 3 - chunk)))[:, :3]
    shift1 = F.pad(x, (1, 0))[..., :chunk]
    shift2 = F.pad(x, (2, 0))[..., :chunk]
    conv = s * (taps[:, 0, None] * x + taps[:, 1, None] * shift1 + taps[:, 2, None] * shift2)
    k = kind[:, None]
    return torch.where(k == _RESIDUAL, residual,
                       torch.where(k == _ATTENTION, attention,
                                   torch.where(k == _MLP, mlp, conv)))


def _telemetry(x: Tensor, y: Tensor, blends: Tensor, dead_threshold: float) -> Tensor:
    """SPEC section 4 in float64. x, y: [N, S, C] (y before the clamp)."""
    x = x.double()
    y = y.double()
    n, num_seeds, chunk = x.shape
    finite = torch.isfinite(x)
    count = finite.sum(dim=(0, 2)).double()
    f = torch.where(finite, x, 0.0)
    safe = count.clamp(min=1)
    mean = f.sum(dim=(0, 2)) / safe
    # Two-pass variance: as stable as Welford, simpler to read.
    centered = torch.where(finite, x - mean[None, :, None], 0.0)
    var = (centered * centered).sum(dim=(0, 2)) / safe
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    vmin = torch.where(finite, x, inf).amin(dim=(0, 2)) if n else inf.expand(num_seeds)
    vmax = torch.where(finite, x, -inf).amax(dim=(0, 2)) if n else (-inf).expand(num_seeds)
    dead = ((f.abs() <= dead_threshold) & finite).sum(dim=(0, 2)).double() / safe
    has = count > 0
    mean = torch.where(has, mean, 0.0)
    var = torch.where(has, var, 0.0)
    dead = torch.where(has, dead, 0.0)
    snr = mean.abs() / torch.sqrt(var + 1e-8)
    nonfinite = (~finite).sum(dim=(0, 2)).double()
    # drift: 1 - mean over rows of cos(X[n], Y[n]); cos = 1 where either row
    # is zero or holds a non-finite value; 0 for copies and for N = 0.
    dot = (x * y).sum(dim=-1)
    nx = torch.linalg.vector_norm(x, dim=-1)
    ny = torch.linalg.vector_norm(y, dim=-1)
    row_ok = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1) & (nx > 0) & (ny > 0)
    cos = torch.where(row_ok, dot / torch.where(row_ok, nx * ny, 1.0), 1.0)
    drift = (1.0 - cos).sum(dim=0) / max(n, 1)
    drift = torch.where(blends, drift, 0.0)
    return torch.stack([var, mean, vmin, vmax, dead, snr, nonfinite, drift], dim=1)


def forward(
    x: Tensor,
    stage: Tensor,
    kind: Tensor,
    blueprint: Tensor,
    alpha: Tensor,
    weights: Tensor,
    scales: Tensor,
    *,
    dead_threshold: float = 1e-6,
    clamp: Optional[Sequence[float]] = None,
    grad_clip: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """(y, telemetry [S, 8]) for x [..., H]; differentiable in x, alpha,
    weights and scales with the gradients of SPEC section 5."""
    hidden = x.shape[-1]
    num_seeds = stage.numel()
    chunk = hidden // num_seeds
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.reshape(-1, num_seeds, chunk).to(work)
    stage = stage.to(device=x.device, dtype=torch.long)
    kind = kind.to(device=x.device, dtype=torch.long)
    blueprint = blueprint.to(device=x.device, dtype=torch.long)

    blends = (stage >= _GRAFTING) & (stage <= _FOSSILIZED) & (blueprint != 0)
    trains = (stage >= _GRAFTING) & (stage <= _FINE_TUNING) & (blueprint != 0)
    shadow = (stage == _TRAINING) & (blueprint != 0)

    w = weights.to(work)[blueprint]
    sigma = scales.to(work)[blueprint]
    a = torch.clamp(alpha.to(work), 0.0, 1.0)
    # FOSSILIZED seeds blend but are frozen: no blueprint gradient, no dalpha.
    frozen = ~trains
    w_live = torch.where(frozen[:, None], w.detach(), w)
    sigma_live = torch.where(frozen, sigma.detach(), sigma)
    a_live = torch.where(frozen, a.detach(), a)[None, :, None]

    t = _seed_transform(xs, kind, w_live, sigma_live)
    y = torch.where(blends[None, :, None], a_live * t + (1.0 - a_live) * xs, xs)
    telemetry = _telemetry(xs.detach(), y.detach(), blends, dead_threshold).to(work)

    # Shadow training: zero in value, and its gradient reaches only the
    # blueprint (x is detached), with a = 1.
    t_shadow = _seed_transform(xs.detach(), kind, w, sigma)
    y = y + torch.where(shadow[None, :, None], t_shadow - t_shadow.detach(), 0.0)

    if grad_clip is not None:
        y = _ClipRowGrad.apply(y, float(grad_clip))
    y = y.reshape(x.shape)
    if clamp is not None:
        # DESIGN decision 4: G passes where lo <= Y <= hi, boundaries
        # included (some torch versions' clamp backward excludes them, so the
        # mask is written out); NaN passes nothing.
        lo, hi = float(clamp[0]), float(clamp[1])
        inside = (y >= lo) & (y <= hi)
        y = torch.where(inside, y, torch.clamp(y, lo, hi).detach())
    return y.to(x.dtype), telemetry


def backward(
    x: Tensor,
    dy: Tensor,
    stage: Tensor,
    kind: Tensor,
    blueprint: Tensor,
    alpha: Tensor,
    weights: Tensor,
    scales: Tensor,
    *,
    clamp: Optional[Sequence[float]] = None,
    grad_clip: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweights, dscales, dalpha, grad_stats) by autograd of forward, in
    the working dtype; grad_stats [S, 3] = (l2_norm, variance, max_abs) of dx
    per seed (population variance)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        xg = x.detach().to(work).requires_grad_(True)
        ag = alpha.detach().to(work).requires_grad_(True)
        wg = weights.detach().to(work).requires_grad_(True)
        sg = scales.detach().to(work).requires_grad_(True)
        y, _ = forward(xg, stage, kind, blueprint, ag, wg, sg, clamp=clamp, grad_clip=grad_clip)
        dx, dalpha, dweights, dscales = torch.autograd.grad(
            y, (xg, ag, wg, sg), dy.to(work), allow_unused=True, materialize_grads=True)
    num_seeds = stage.numel()
    per_seed = dx.detach().reshape(-1, num_seeds, x.shape[-1] // num_seeds).transpose(0, 1)
    per_seed = per_seed.reshape(num_seeds, -1).double()
    if per_seed.shape[1]:
        stats = torch.stack([
            torch.linalg.vector_norm(per_seed, dim=1),
            per_seed.var(dim=1, unbiased=False),
            per_seed.abs().amax(dim=1),
        ], dim=1)
    else:
        stats = per_seed.new_zeros((num_seeds, 3))
    return dx, dweights, dscales, dalpha, stats.to(work)
