"""Shared helpers of the Python tests: the one tolerance policy of SPEC
section 9 and a factory of layers with seeds in chosen kinds and stages,
random (never zero) parameters."""

from __future__ import annotations

import os

# The tests must not depend on a `kasmina tune` cache of the machine they run
# on (import kasmina loads it): point it at a path that does not exist, and
# clear any entries already loaded.
os.environ["KASMINA_TUNE_CACHE"] = os.path.join(os.path.dirname(__file__), "no-such-tune-cache.json")

import pytest
import torch

import kasmina

kasmina._C.set_cuda_tuned_table([])
from kasmina import Kind, Stage

# SPEC section 9: rel = ||out - ref|| / ||ref|| per output tensor.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}

# Requested transitions that lead from GERMINATED to each stage.
_PATH = {
    Stage.DORMANT: None,
    Stage.GERMINATED: [],
    Stage.TRAINING: [Stage.TRAINING],
    Stage.GRAFTING: [Stage.TRAINING, Stage.GRAFTING],
    Stage.STABILIZATION: [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION],
    Stage.EVALUATING: [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING],
    Stage.FINE_TUNING: [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
                        Stage.FINE_TUNING],
    Stage.FOSSILIZED: [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
                       Stage.FOSSILIZED],
    Stage.CULLED: [Stage.TRAINING, Stage.CULLED],
    Stage.CANCELLED: [Stage.CANCELLED],
    Stage.ROLLED_BACK: [Stage.TRAINING, Stage.ROLLED_BACK],
}

# A mix that holds every behaviour of SPEC section 7 in one layer: copy,
# shadow, blending with gradients, frozen blending, freed slots.
STAGE_MIX = [Stage.GRAFTING, Stage.TRAINING, Stage.FINE_TUNING, Stage.FOSSILIZED,
             Stage.DORMANT, Stage.STABILIZATION, Stage.EVALUATING, Stage.CULLED]


def make_layer(hidden, kinds, stages, *, seed=0, alpha=None, share=False, **kwargs):
    """KasminaLayer with seed s of kinds[s] in stages[s], random W / scale /
    alpha (alpha in (0.05, 0.95) unless given). share=True makes seeds of one
    kind share the first row of that kind."""
    layer = kasmina.KasminaLayer(hidden, len(stages), **kwargs)
    rows = {}
    for s, (kind, stage) in enumerate(zip(kinds, stages)):
        if _PATH[Stage(stage)] is None:
            continue
        bp = rows.get(kind, 0) if share else 0
        rows[kind] = layer.germinate(s, kind, bp)
        for st in _PATH[Stage(stage)]:
            layer.transition(s, st)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weights.copy_(torch.randn(layer.weights.shape, generator=g))
        layer.scales.copy_(0.5 + torch.rand(layer.scales.shape, generator=g))
        if alpha is None:
            layer.alpha.copy_(0.05 + 0.9 * torch.rand(layer.alpha.shape, generator=g))
        else:
            layer.alpha.copy_(torch.as_tensor(alpha, dtype=torch.float32))
    return layer


def seed_tensors(layer):
    return (layer.seed_stage, layer.seed_kind, layer.seed_blueprint, layer.alpha.detach(),
            layer.weights.detach(), layer.scales.detach())


def rel_err(out, ref):
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN never passes"
    diff = torch.linalg.vector_norm(out - ref).item()
    norm = torch.linalg.vector_norm(ref).item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: rel = {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})"


def cycle(values, n):
    return [values[i % len(values)] for i in range(n)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
