"""The fast CPU backend (through the custom ops) against kasmina.reference in
float64 on the same rounded inputs, under SPEC section 9: every kind, a mix
of stages in one layer, every storage dtype, clamp and clip."""

from __future__ import annotations

import pytest
import torch

import kasmina
from kasmina import Kind, Stage, reference
from conftest import STAGE_MIX, assert_close, cycle, make_layer, seed_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = list(Kind)


def run_both(layer, x, dy, clamp=None, grad_clip=None):
    """(ours, reference) for y, telemetry, nonfinite, dx, dW, dscale, dalpha, grad_stats."""
    stage, kind, bp, alpha, w, sc = seed_tensors(layer)
    xg = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(xg)
    y.backward(dy)
    ours = dict(y=y.detach(), telemetry=layer.telemetry.clone(),
                nonfinite=layer.nonfinite_counts.clone(), dx=xg.grad, dweights=layer.weights.grad,
                dscales=layer.scales.grad, dalpha=layer.alpha.grad,
                grad_stats=layer.grad_stats.clone())
    x64 = x.double()
    ry, rtel = reference.forward(x64, stage, kind, bp, alpha.double(), w.double(), sc.double(),
                                 dead_threshold=layer.dead_threshold, clamp=clamp,
                                 grad_clip=grad_clip)
    dx, dw, ds, da, gs = reference.backward(x64, dy.double(), stage, kind, bp, alpha.double(),
                                            w.double(), sc.double(), clamp=clamp,
                                            grad_clip=grad_clip)
    ref = dict(y=ry, telemetry=rtel, nonfinite=rtel[:, 6], dx=dx, dweights=dw, dscales=ds,
               dalpha=da, grad_stats=gs)
    return ours, ref


def check(ours, ref, dtype):
    for name in ("y", "dx"):
        assert_close(ours[name], ref[name], dtype, name)
    # Stored as float32 whatever the activations' dtype: float64 runs are
    # held to the float32 bound for these.
    f32_bound = torch.float32 if dtype == torch.float64 else dtype
    for name in ("telemetry", "dweights", "dscales", "dalpha", "grad_stats"):
        assert_close(ours[name], ref[name], f32_bound, name)
    # min, max and the non-finite counts are exact (SPEC section 9).
    # (float32 telemetry of float64 inputs: exact up to that one rounding.)
    assert torch.equal(ours["telemetry"][:, 2:4], ref["telemetry"][:, 2:4].float())
    assert torch.equal(ours["nonfinite"].double(), ref["nonfinite"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_and_dtype_with_stage_mix(kind, dtype):
    # H = 8 seeds x C = 7 (odd chunk, not a multiple of any vector width).
    layer = make_layer(56, [kind] * 8, STAGE_MIX, seed=int(kind))
    x = torch.randn(13, 56).to(dtype)
    dy = torch.randn(13, 56).to(dtype)
    ours, ref = run_both(layer, x, dy)
    check(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_kinds_shared_blueprints_clamp_and_clip(dtype):
    kinds = cycle(KINDS, 8)
    layer = make_layer(8 * 5, kinds, STAGE_MIX, seed=7, share=True, clamp=(-1.5, 1.25),
                       grad_clip=0.8)
    x = (1.5 * torch.randn(3, 9, 40)).to(dtype)
    dy = torch.randn(3, 9, 40).to(dtype)
    ours, ref = run_both(layer, x, dy, clamp=(-1.5, 1.25), grad_clip=0.8)
    check(ours, ref, dtype)
    # The clamp acted somewhere and the clip scaled some rows: the test means something.
    assert (ours["y"].float() == 1.25).any() and (ours["y"].float() == -1.5).any()


def test_alpha_outside_unit_interval_gets_no_dalpha():
    layer = make_layer(12, [Kind.RESIDUAL, Kind.MLP, Kind.CONV], [Stage.GRAFTING] * 3,
                       alpha=[-0.25, 1.5, 0.5])
    x = torch.randn(6, 12)
    ours, ref = run_both(layer, x, torch.randn(6, 12))
    check(ours, ref, torch.float32)
    assert ours["dalpha"][0] == 0 and ours["dalpha"][1] == 0 and ours["dalpha"][2] != 0


def test_nonfinite_inputs_are_counted_not_used():
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING, Stage.DORMANT, Stage.TRAINING,
                                            Stage.EVALUATING])
    x = torch.randn(10, 24)
    x[2, 1] = float("nan")
    x[5, 7] = float("inf")
    x[5, 8] = -float("inf")
    y = layer(x)
    tel = layer.telemetry
    assert layer.nonfinite_counts.tolist() == [1, 2, 0, 0]
    assert tel[:, 6].tolist() == [1.0, 2.0, 0.0, 0.0]
    _, rtel = reference.forward(x.double(), *[t.double() if t.is_floating_point() else t
                                              for t in seed_tensors(layer)])
    assert torch.isfinite(tel[:, :6]).all()
    assert_close(tel[:, :6], rtel[:, :6], torch.float32, "telemetry")
    # A DORMANT seed's output is a bit-identical copy, NaN and Inf included.
    assert torch.equal(y[:, 6:12].view(torch.int32), x[:, 6:12].view(torch.int32))


def test_copy_seeds_are_bit_identical_and_drift_zero():
    layer = make_layer(30, cycle(KINDS, 5), [Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING,
                                            Stage.CULLED, Stage.GRAFTING])
    x = torch.randn(9, 30).to(torch.bfloat16)
    y = layer(x)
    assert torch.equal(y[:, :24].view(torch.int16), x[:, :24].view(torch.int16))
    assert layer.telemetry[:4, 7].tolist() == [0.0] * 4
    assert layer.telemetry[4, 7] > 0


def test_deterministic_bits():
    layer = make_layer(64, cycle(KINDS, 8), STAGE_MIX, seed=3)
    x = torch.randn(257, 64)
    dy = torch.randn(257, 64)
    a, _ = run_both(layer, x, dy)
    b, _ = run_both(layer, x, dy)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_float64_runs_the_cpp_reference():
    layer = make_layer(20, cycle(KINDS, 4), [Stage.GRAFTING, Stage.TRAINING, Stage.FINE_TUNING,
                                            Stage.FOSSILIZED])
    x = torch.randn(5, 20, dtype=torch.float64)
    ours, ref = run_both(layer, x, torch.randn(5, 20, dtype=torch.float64))
    check(ours, ref, torch.float64)
    assert ours["y"].dtype == torch.float64
