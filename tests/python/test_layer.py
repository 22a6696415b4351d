"""KasminaLayer as a module: lifecycle through Python, state dictionaries,
every error path (nothing written on failure), dtype/device moves, training."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import kasmina
from kasmina import Kind, Stage, Strategy
from conftest import STAGE_MIX, cycle, make_layer, seed_tensors

KINDS = list(Kind)


def core_bytes(layer):
    # get_extra_state first syncs the Parameters into the core (what every
    # lifecycle call does too), so only real state changes show.
    return layer.get_extra_state().numpy().tobytes()


def snapshot(layer):
    """Everything a failed call must leave untouched."""
    return ([t.detach().clone() for t in (*layer.parameters(), *layer.buffers())],
            core_bytes(layer))


def assert_unchanged(layer, snap):
    tensors, blob = snap
    for a, b in zip(tensors, [t.detach() for t in (*layer.parameters(), *layer.buffers())]):
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b)
    assert core_bytes(layer) == blob


# --- API surface --------------------------------------------------------------

def test_enums_and_columns_match_the_contract():
    assert [int(k) for k in Kind] == [0, 1, 2, 3]
    assert Stage.ROLLED_BACK == 10 and Stage.FOSSILIZED == 7
    assert [s.name for s in Strategy] == ["FIXED_RAMP", "PERFORMANCE_LINKED", "DRIFT_CONTROLLED",
                                         "GRAD_NORM_GATED"]
    assert kasmina.TELEMETRY_COLUMNS[7] == "drift" and len(kasmina.TELEMETRY_COLUMNS) == 8
    assert kasmina.GRAD_STATS_COLUMNS == ("l2_norm", "variance", "max_abs")


def test_attributes_parameters_and_info():
    layer = kasmina.KasminaLayer(48, 6, 16)
    assert (layer.hidden, layer.num_seeds, layer.chunk, layer.max_blueprints) == (48, 6, 8, 16)
    assert layer.weights.shape == (16, 8) and layer.scales.shape == (16,)
    assert layer.alpha.shape == (6,)
    assert {p.dtype for p in layer.parameters()} == {torch.float32}
    assert layer.seed_stage.dtype == torch.int32
    info = kasmina.info()
    assert info["version"] == "0.1.0" and info["backends"]["cpu"]["available"]
    assert "cpu" in info["dispatch"]


def test_lifecycle_through_python_and_step_ramps_alpha():
    layer = kasmina.KasminaLayer(16, 4, stabilization_steps=2)
    row = layer.germinate(1, "MLP", ramp_steps=4)
    assert row >= 1 and layer.stage(1) == Stage.GERMINATED
    assert torch.equal(layer.weights[row], torch.ones(4))  # SPEC 6: MLP starts at w = 1
    assert layer.seed_blueprint[1] == row and layer.seed_kind[1] == Kind.MLP
    layer.transition(1, Stage.TRAINING)
    layer.transition(1, "grafting")
    assert layer.alpha[1] == 0
    x = torch.randn(8, 16)
    for expected in (0.25, 0.5, 0.75):
        layer(x).sum().backward()
        layer.step(1.0)
        assert layer.alpha[1].item() == pytest.approx(expected)
        assert layer.stage(1) == Stage.GRAFTING
    layer.step(1.0)
    assert layer.stage(1) == Stage.STABILIZATION and layer.alpha[1] == 1
    assert layer.seed_stage[1] == Stage.STABILIZATION
    info = layer.seed_info(1)
    assert info["kind"] == Kind.MLP and info["blueprint"] == row and info["alpha"] == 1.0
    assert layer.stages()[0] == Stage.DORMANT
    text = layer.report()
    assert "STABILIZATION" in text and "MLP" in text


def test_optimizer_alpha_survives_lifecycle_calls():
    layer = make_layer(12, [Kind.RESIDUAL] * 3, [Stage.GRAFTING, Stage.TRAINING, Stage.DORMANT])
    with torch.no_grad():
        layer.alpha[0] = 0.375
        layer.weights[1, 2] = 4.5
    layer.transition(1, Stage.CULLED)  # pushes then pulls: the optimiser's values stay
    assert layer.alpha[0].item() == 0.375 and layer.weights[1, 2].item() == 4.5


def test_set_strategy_keeps_unspecified_parameters():
    layer = kasmina.KasminaLayer(12, 3)
    layer.germinate(0, Kind.RESIDUAL, ramp_steps=7)
    layer.set_strategy(0, "DRIFT_CONTROLLED", drift_threshold=0.3)
    assert layer.seed_info(0)["strategy"] == Strategy.DRIFT_CONTROLLED
    assert layer._core.ramp_steps[0] == 7 and layer._core.drift_threshold[0] == pytest.approx(0.3)
    with pytest.raises(TypeError, match="unknown strategy parameter"):
        layer.set_strategy(0, Strategy.FIXED_RAMP, ramp=3)


# --- state I/O ----------------------------------------------------------------

def trained_layer():
    layer = make_layer(20, cycle(KINDS, 5), [Stage.GRAFTING, Stage.TRAINING, Stage.FOSSILIZED,
                                            Stage.CULLED, Stage.EVALUATING],
                       clamp=(-2.0, 2.0), grad_clip=3.0)
    layer(torch.randn(4, 20)).sum().backward()
    layer.step([0.5, 0.4, math.nan, 0.3, 0.2])
    return layer


def test_state_dict_round_trip_bit_exact():
    layer = trained_layer()
    sd = layer.state_dict()
    assert set(sd) == {"weights", "scales", "alpha", "_extra_state"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    other = kasmina.KasminaLayer(20, 5, clamp=(-2.0, 2.0), grad_clip=3.0)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert bytes(other._core.save()) == bytes(layer._core.save())
    for a, b in zip(seed_tensors(layer), seed_tensors(other)):
        assert torch.equal(a, b)
    x = torch.randn(3, 20)
    assert torch.equal(layer(x), other(x))
    assert other.clamp == (-2.0, 2.0)


def test_corrupted_state_is_refused_and_layer_unchanged():
    sd = trained_layer().state_dict()
    target = make_layer(20, cycle(KINDS, 5), [Stage.TRAINING] * 5, seed=9)
    snap = snapshot(target)
    blob = sd["_extra_state"].clone()
    for pos in (blob.numel() // 2, blob.numel() - 1, 40):
        bad = dict(sd)
        corrupt = blob.clone()
        corrupt[pos] ^= 0x10
        bad["_extra_state"] = corrupt
        with pytest.raises(RuntimeError, match="kasmina"):
            target.load_state_dict(bad)
        assert_unchanged(target, snap)


def test_mismatched_states_are_refused_and_layer_unchanged():
    sd = trained_layer().state_dict()
    for target in (kasmina.KasminaLayer(24, 6), kasmina.KasminaLayer(20, 5, 32)):
        snap = snapshot(target)
        with pytest.raises(RuntimeError, match="kasmina"):
            target.load_state_dict(sd)
        assert_unchanged(target, snap)
    target = kasmina.KasminaLayer(20, 5, clamp=(-2.0, 2.0), grad_clip=3.0)
    snap = snapshot(target)
    edited = dict(sd)
    edited["alpha"] = sd["alpha"] + 0.125  # disagrees with the checksummed bytes
    with pytest.raises(RuntimeError, match="disagrees"):
        target.load_state_dict(edited)
    assert_unchanged(target, snap)
    missing = {k: v for k, v in sd.items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="core state"):
        target.load_state_dict(missing)
    assert_unchanged(target, snap)


def test_deepcopy_and_pickle_whole_module():
    layer = trained_layer()
    clone = copy.deepcopy(layer)
    assert bytes(clone._core.save()) == bytes(layer._core.save())
    clone.transition(0, Stage.STABILIZATION)
    assert layer.stage(0) == Stage.GRAFTING  # independent cores


# --- errors -------------------------------------------------------------------

def test_config_errors():
    with pytest.raises(ValueError, match="divisible|num_seeds"):
        kasmina.KasminaLayer(10, 3)
    with pytest.raises(ValueError):
        kasmina.KasminaLayer(0, 1)
    with pytest.raises(ValueError):
        kasmina.KasminaLayer(8, 0)
    with pytest.raises(ValueError, match="backend"):
        kasmina.KasminaLayer(8, 2, backend="tpu")


@pytest.mark.parametrize("bad, exc, match", [
    (lambda: torch.tensor(1.0), ValueError, "rank"),
    (lambda: torch.randn(4, 20), ValueError, "hidden"),
    (lambda: torch.randn(4, 24).to(torch.int32), TypeError, "float32"),
    (lambda: torch.randn(4, 24, dtype=torch.complex64), TypeError, "float32"),
    (lambda: torch.randn(24, 4).t(), ValueError, "contiguous"),
    (lambda: torch.randn(4, 3, 24).transpose(0, 1), ValueError, "rows"),
])
def test_forward_input_errors_write_nothing(bad, exc, match):
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    snap = snapshot(layer)
    with pytest.raises(exc, match=match):
        layer(bad())
    assert_unchanged(layer, snap)


def test_float64_on_fast_backend_is_refused():
    layer = make_layer(12, [Kind.MLP] * 3, [Stage.GRAFTING] * 3, backend="cpu")
    with pytest.raises(TypeError, match="float64|f64|reference"):
        layer(torch.randn(2, 12, dtype=torch.float64))


def test_op_level_errors_write_nothing():
    layer = make_layer(12, [Kind.MLP] * 3, [Stage.GRAFTING] * 3)
    stage, kind, bp, alpha, w, sc = seed_tensors(layer)
    x = torch.randn(2, 12)
    fwd = torch.ops.kasmina.forward
    tail = (None, None, 1e-6, None, None, None, "auto")
    with pytest.raises(TypeError, match="stage must be int32"):
        fwd(x, stage.long(), kind, bp, alpha, w, sc, *tail)
    with pytest.raises(TypeError, match="weights must be float32"):
        fwd(x, stage, kind, bp, alpha, w.double(), sc, *tail)
    with pytest.raises(ValueError, match="clamp"):
        fwd(x, stage, kind, bp, alpha, w, sc, None, None, 1e-6, 1.0, None, None, "auto")
    with pytest.raises(ValueError, match="backend"):
        fwd(x, stage, kind, bp, alpha, w, sc, None, None, 1e-6, None, None, None, "gpu")
    bad_kind = kind.clone()
    bad_kind[0] = 7
    with pytest.raises(ValueError, match="kind"):
        fwd(x, stage, bad_kind, bp, alpha, w, sc, *tail)
    bad_bp = bp.clone()
    bad_bp[1] = 99
    with pytest.raises(ValueError, match="blueprint"):
        fwd(x, stage, kind, bad_bp, alpha, w, sc, *tail)
    dy = torch.randn(2, 12, dtype=torch.float16)
    with pytest.raises(TypeError, match="dy"):
        torch.ops.kasmina.backward(x, dy, stage, kind, bp, alpha, w, sc, None, None, None, None,
                                   "auto")


def test_lifecycle_errors_name_stages_and_write_nothing():
    layer = make_layer(12, [Kind.CONV, Kind.RESIDUAL, Kind.MLP],
                       [Stage.GRAFTING, Stage.FOSSILIZED, Stage.DORMANT])
    snap = snapshot(layer)
    with pytest.raises(ValueError, match=r"GRAFTING.*DORMANT.*STABILIZATION"):
        layer.transition(0, Stage.DORMANT)
    with pytest.raises(ValueError, match="FOSSILIZED"):
        layer.transition(1, Stage.CULLED)
    with pytest.raises(ValueError, match="seed"):
        layer.transition(3, Stage.TRAINING)
    with pytest.raises(ValueError, match="seed"):
        layer.germinate(-1, Kind.MLP)
    with pytest.raises(ValueError, match="kind"):
        layer.germinate(2, 9)
    with pytest.raises(ValueError, match="stage"):
        layer.transition(2, "SPROUTING")
    with pytest.raises(ValueError):
        layer.germinate(2, Kind.MLP, blueprint=63)  # a row nobody allocated
    with pytest.raises(ValueError):
        layer.germinate(0, Kind.MLP)  # not DORMANT
    with pytest.raises(ValueError, match="loss"):
        layer.step([1.0, 2.0])
    assert_unchanged(layer, snap)


def test_conv_needs_chunk_of_three():
    layer = kasmina.KasminaLayer(4, 2)
    with pytest.raises(ValueError, match="C|chunk|CONV"):
        layer.germinate(0, Kind.CONV)


# --- dtype / device moves -------------------------------------------------------

def test_half_keeps_float32_parameters_and_int_buffers():
    layer = make_layer(16, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    before = [p.clone() for p in layer.parameters()]
    layer.half()
    layer.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert layer.seed_stage.dtype == torch.int32 and layer.telemetry.dtype == torch.float32
    x = torch.randn(3, 16).half()
    assert layer(x).dtype == torch.float16


def test_cpu_autocast_runs_in_the_input_dtype():
    layer = make_layer(16, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x))


# --- training -------------------------------------------------------------------

def test_training_loop_loss_goes_down():
    torch.manual_seed(0)
    hidden = 32
    seeds = make_layer(hidden, cycle(KINDS, 4), [Stage.GRAFTING, Stage.GRAFTING, Stage.TRAINING,
                                                 Stage.GRAFTING], alpha=[0.5] * 4)
    net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), seeds,
                              torch.nn.Linear(hidden, 1))
    x = torch.randn(256, 8)
    target = x @ torch.randn(8, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seeds.step(losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert seeds.weights.grad.abs().sum() > 0 and seeds.alpha.grad.abs().sum() > 0
    assert torch.isfinite(seeds.grad_stats).all()


def test_telemetry_rows_follow_every_eager_call():
    layer = make_layer(16, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    for n in (3, 3, 5, 5, 3):
        layer(torch.randn(n, 16))
        assert int(layer.telemetry_rows) == n
    layer.telemetry_rows.fill_(-1)  # an outside write is noticed
    layer(torch.randn(3, 16))
    assert int(layer.telemetry_rows) == 3
    with torch.no_grad():
        layer(torch.randn(2, 4, 16))
    assert int(layer.telemetry_rows) == 8
    clone = copy.deepcopy(layer)
    clone(torch.randn(8, 16))
    assert int(clone.telemetry_rows) == 8 and clone.telemetry_rows is not layer.telemetry_rows
    with torch.inference_mode():
        fresh = make_layer(16, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
        for n in (4, 4, 6):
            fresh(torch.randn(n, 16))
            assert int(fresh.telemetry_rows) == n


_needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not kasmina.info()["backends"]["cuda"]["available"],
    reason="needs a CUDA device and the CUDA backend")


@_needs_cuda
def test_cuda_eager_path_rows_streams_and_graph_replay():
    layer = make_layer(64, cycle(KINDS, 8), STAGE_MIX).cuda()
    static_x = torch.randn(32, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            layer(static_x)  # runs on `side`: the binding asks for the current stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    with torch.no_grad():
        y5 = layer(torch.randn(5, 64, device="cuda"))
    assert int(layer.telemetry_rows) == 5 and y5.shape == (5, 64)
    graph.replay()  # writes rows = 32 behind the version counter's back
    torch.cuda.synchronize()
    assert int(layer.telemetry_rows) == 32
    with torch.no_grad():
        layer(torch.randn(5, 64, device="cuda"))
    assert int(layer.telemetry_rows) == 5
    with torch.no_grad():
        assert torch.equal(static_y, layer(static_x))
    # Eager path and op path agree bitwise on CUDA too.
    x = torch.randn(9, 64, device="cuda")
    c = layer._config
    with torch.no_grad():
        y_eager = layer(x)
        tel_eager = layer.telemetry.clone()
        y_op, tel_op, _ = torch.ops.kasmina.forward(
            x, layer.seed_stage, layer.seed_kind, layer.seed_blueprint, layer.alpha,
            layer.weights, layer.scales, layer.workspace, None, c["dead_threshold"],
            c["clamp_lo"], c["clamp_hi"], c["grad_clip"], layer.backend)
    assert torch.equal(y_eager, y_op) and torch.equal(tel_eager, tel_op)


# --- the eager call without a gradient: one binding call (_C.layer_forward) -------
# It reads the layer's buffers and settings from the module at call time
# (nothing cached), so rebinding any of them must show on the next call.
def op_forward(layer, x, **override):
    """torch.ops.kasmina.forward on the layer's current tensors and settings."""
    c = dict(layer._config, **override)
    return torch.ops.kasmina.forward(
        x, layer.seed_stage, layer.seed_kind, layer.seed_blueprint, layer.alpha.detach(),
        layer.weights.detach(), layer.scales.detach(), None, None, c["dead_threshold"],
        c["clamp_lo"], c["clamp_hi"], c["grad_clip"], override.get("backend", layer.backend))


def assert_call_matches_op(layer, x, **override):
    with torch.no_grad():
        y = layer(x)
        want_y, want_tel, want_nf = op_forward(layer, x, **override)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y.view(torch.uint8), want_y.view(torch.uint8))
    assert torch.equal(layer.telemetry.view(torch.uint8), want_tel.view(torch.uint8))
    assert torch.equal(layer.nonfinite_counts, want_nf)
    assert int(layer.telemetry_rows) == x.numel() // layer.hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_no_grad_call_is_one_binding_call_with_the_op_bits(dtype):
    layer = make_layer(24, cycle(KINDS, 4), STAGE_MIX[:4])
    x = torch.randn(2, 5, 24).to(dtype)
    x[0, 1, 3] = math.inf
    assert_call_matches_op(layer, x)
    assert_call_matches_op(layer, torch.randn(7, 48).to(dtype)[:, 24:])  # strided rows
    # The call the layer makes returns x's rows (None would mean "Python path").
    y = torch.empty_like(x)
    p = layer._parameters
    with torch.no_grad():
        rows = kasmina._C.layer_forward(x, y, p["alpha"], p["weights"], p["scales"],
                                        layer._buffers, layer._config, "auto")
    assert rows == 10


def test_no_grad_call_reads_rebound_tensors_and_settings():
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    x = torch.randn(6, 24)
    assert_call_matches_op(layer, x)
    # A rebound Parameter (not an in-place change).
    layer.alpha = torch.nn.Parameter(torch.tensor([0.1, 0.9, 0.3, 0.7]))
    assert_call_matches_op(layer, x)
    # Rebound output buffers are the ones written.
    old_tel, old_nf = layer.telemetry, layer.nonfinite_counts
    layer.telemetry = torch.zeros_like(old_tel)
    layer.nonfinite_counts = torch.full_like(old_nf, -5)
    snap = old_tel.clone()
    assert_call_matches_op(layer, x)
    assert torch.equal(old_tel, snap) and layer.telemetry is not old_tel
    # A rebound seed table.
    layer.seed_kind = torch.full_like(layer.seed_kind, int(Kind.RESIDUAL))
    assert_call_matches_op(layer, x)
    # _apply (what .to(), .cuda(), .half() go through) may rebind every tensor.
    before = [t for t in layer.buffers()]
    layer._apply(lambda t: t.clone())
    assert all(a is not b for a, b in zip(before, layer.buffers()))
    assert_call_matches_op(layer, x)
    # A loaded state brings its configuration (set_extra_state rebinds _config).
    clamped = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4, clamp=(-0.0625, 0.0625))
    layer.load_state_dict(clamped.state_dict())
    assert layer.clamp == (-0.0625, 0.0625)
    assert_call_matches_op(layer, x)
    with torch.no_grad():
        assert float(layer(x).abs().max()) <= 0.0625
    # The backend attribute is read per call; an unknown name fails as before.
    layer.backend = "reference"
    assert_call_matches_op(layer, x)
    layer.backend = "tpu"
    with pytest.raises(KeyError), torch.no_grad():
        layer(x)


def test_no_grad_call_without_exchange_api_gives_the_same_bits():
    layer = make_layer(24, cycle(KINDS, 4), STAGE_MIX[:4])
    x = torch.randn(5, 24)
    with torch.no_grad():
        y = layer(x)
        tel = layer.telemetry.clone()
        kasmina._C._set_exchange_api_enabled(False)
        try:
            p = layer._parameters
            assert kasmina._C.layer_forward(x, torch.empty_like(x), p["alpha"], p["weights"],
                                            p["scales"], layer._buffers, layer._config,
                                            "auto") is None  # left to the Python path
            y2 = layer(x)
        finally:
            kasmina._C._set_exchange_api_enabled(True)
    assert torch.equal(y, y2) and torch.equal(tel, layer.telemetry)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda: torch.tensor(1.0), ValueError, "rank"),
    (lambda: torch.randn(4, 20), ValueError, "hidden"),
    (lambda: torch.randn(4, 24).to(torch.int32), TypeError, "float32"),
    (lambda: torch.randn(24, 4).t(), ValueError, "contiguous"),
    (lambda: torch.randn(4, 3, 24).transpose(0, 1), ValueError, "rows"),
    (lambda: torch.randn(4, 24).neg().conj_physical()._neg_view(), ValueError, "negative bit"),
])
def test_no_grad_call_errors_write_nothing(bad, exc, match):
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    snap = snapshot(layer)
    rows = layer.telemetry_rows.clone()
    with pytest.raises(exc, match=match), torch.no_grad():
        layer(bad())
    assert_unchanged(layer, snap)
    assert torch.equal(layer.telemetry_rows, rows)
    bad_bp = layer.seed_blueprint.clone()
    bad_bp[1] = 99
    layer.seed_blueprint = bad_bp  # a rebound, invalid seed table is checked too
    snap = snapshot(layer)
    with pytest.raises(ValueError, match="blueprint"), torch.no_grad():
        layer(torch.randn(3, 24))
    assert_unchanged(layer, snap)


# --- KasminaLayer.__call__: the eager call in one binding call (_C.layer_call) ---
# It stands for nn.Module.__call__ + forward only where those would do nothing
# else; every other case must reach nn.Module.__call__ (None from layer_call).
def test_layer_call_runs_the_plain_eager_call():
    layer = make_layer(24, cycle(KINDS, 4), STAGE_MIX[:4])
    x = torch.randn(3, 2, 24)
    with torch.no_grad():
        y = kasmina._C.layer_call(layer, x)
        assert y is not None
        tel = layer.telemetry.clone()
        y_module = torch.nn.Module.__call__(layer, x)  # the Python path
    assert torch.equal(y.view(torch.uint8), y_module.view(torch.uint8))
    assert torch.equal(tel.view(torch.uint8), layer.telemetry.view(torch.uint8))
    assert y.is_contiguous() and int(layer.telemetry_rows) == 6
    # Strided rows (not row-major): y is allocated contiguous all the same.
    xs = torch.randn(5, 48)[:, :24]
    with torch.no_grad():
        assert kasmina._C.layer_call(layer, xs).is_contiguous()
    assert_call_matches_op(layer, xs)


@pytest.mark.parametrize("register, runs_now", [
    (lambda m, calls: m.register_forward_hook(lambda mod, args, out: calls.append(1)), True),
    (lambda m, calls: m.register_forward_pre_hook(lambda mod, args: calls.append(1)), True),
    (lambda m, calls: m.register_full_backward_pre_hook(lambda mod, g: calls.append(1)), False),
    (lambda m, calls: torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append(1)), True),
    (lambda m, calls: torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: calls.append(1)), True),
], ids=["forward hook", "forward pre-hook", "backward pre-hook", "global hook",
        "global pre-hook"])
def test_layer_call_leaves_hooks_to_module_call(register, runs_now):
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    calls = []
    handle = register(layer, calls)
    x = torch.randn(4, 24)
    try:
        with torch.no_grad():
            assert kasmina._C.layer_call(layer, x) is None
            y = layer(x)
        assert bool(calls) == runs_now
        assert_call_matches_op(layer, x)
    finally:
        handle.remove()
    with torch.no_grad():
        assert kasmina._C.layer_call(layer, x) is not None
    assert torch.equal(y, layer(x))


def test_layer_call_leaves_other_forwards_to_module_call():
    class Shifted(kasmina.KasminaLayer):
        def forward(self, x):
            return super().forward(x) + 1

    x = torch.randn(4, 24)
    base = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    sub = Shifted(24, 4)
    sub.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert kasmina._C.layer_call(sub, x) is None
        assert torch.equal(sub(x), base(x) + 1)
        # An instance's own forward, and Module.compile()'s compiled call.
        base.forward = lambda t: t * 0
        assert kasmina._C.layer_call(base, x) is None
        assert torch.equal(base(x), x * 0)
        del base.forward
        assert kasmina._C.layer_call(base, x) is not None
        base._compiled_call_impl = lambda t: t * 2  # what Module.compile() sets
        assert kasmina._C.layer_call(base, x) is None
        assert torch.equal(base(x), x * 2)
        base._compiled_call_impl = None
        assert kasmina._C.layer_call(base, x) is not None
        # Keywords and extra arguments go to nn.Module.__call__ (and forward).
        assert torch.equal(base(x=x), base(x))
        with pytest.raises(TypeError):
            base(x, x)


def test_layer_call_takes_gradients_and_leaves_modes_and_transforms_to_module_call():
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    x = torch.randn(4, 24)
    # A gradient to record: layer_call goes on to EagerForward (_forward_eager)
    # as forward would; the same y and the same gradients as nn.Module.__call__.
    y = kasmina._C.layer_call(layer, x)
    assert y.requires_grad and y.grad_fn is not None
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [layer.alpha, layer.weights, layer.scales], g)
    y_module = torch.nn.Module.__call__(layer, x)
    grads_module = torch.autograd.grad(y_module, [layer.alpha, layer.weights, layer.scales], g)
    assert torch.equal(y, y_module)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_module))
    xg = x.clone().requires_grad_()
    layer.requires_grad_(False)
    yx = layer(xg)  # only x needs a gradient
    (dx,) = torch.autograd.grad(yx, xg, g)
    assert dx.shape == x.shape and yx.grad_fn is not None
    layer.requires_grad_(True)
    with torch.no_grad():
        assert kasmina._C.layer_call(layer, x) is not None
        assert kasmina._C.layer_call(layer, x.neg()._neg_view()) is None  # Python raises

    class Fn(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Disp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        for mode in (Fn(), Disp()):
            with mode:
                assert kasmina._C.layer_call(layer, x) is None
                assert torch.equal(layer(x), torch.nn.Module.__call__(layer, x))
    kasmina._C._set_layer_forward(None, torch.nn.Module)  # off: nn.Module.__call__ always
    try:
        with torch.no_grad():
            assert kasmina._C.layer_call(layer, x) is None
            assert_call_matches_op(layer, x)
    finally:
        kasmina._C._set_layer_forward(kasmina.KasminaLayer.forward, torch.nn.Module)


@pytest.mark.parametrize("strict", [False, True])
def test_export_records_the_op(strict):
    """torch.export, with Dynamo (strict) or without (non-strict: the module
    runs eagerly on fake tensors, so KasminaLayer.__call__ reaches
    _C.layer_call, which must leave the call to nn.Module.__call__)."""

    class Host(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 12)
            self.k = make_layer(12, cycle(KINDS, 3), [Stage.GRAFTING] * 3)

        def forward(self, x):
            return self.k(self.lin(x))

    host = Host()
    x = torch.randn(4, 12)
    ep = torch.export.export(host, (x,), strict=strict)
    assert "kasmina.forward" in str(ep.graph)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), host(x))


def test_layer_call_leaves_non_tensors_to_module_call():
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    with torch.no_grad():
        assert kasmina._C.layer_call(layer, [1.0] * 24) is None
        with pytest.raises(TypeError, match="x must be a tensor, got list"):
            layer([1.0] * 24)


def test_layer_call_keeps_module_call_semantics_at_the_edges():
    layer = make_layer(12, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    # y has the strides the Python path gives it, size-1 dimensions included.
    x = torch.randn(48).as_strided((4, 1, 12), (12, 7, 1))
    with torch.no_grad():
        y = layer(x)
        y_module = torch.nn.Module.__call__(layer, x)
    assert y.stride() == y_module.stride() and torch.equal(y, y_module)
    # None reaches the pre-hooks, which may replace it.
    handle = layer.register_forward_pre_hook(lambda mod, args: (torch.ones(2, 12),))
    try:
        with torch.no_grad():
            assert layer(None).shape == (2, 12)
    finally:
        handle.remove()
    # A missing buffer is the Python path's KeyError, not a crash.
    rows = layer._buffers.pop("telemetry_rows")
    try:
        with torch.no_grad():
            assert kasmina._C.layer_call(layer, torch.randn(3, 12)) is None
            with pytest.raises(KeyError):
                layer(torch.randn(3, 12))
    finally:
        layer._buffers["telemetry_rows"] = rows
    # A patched nn.Module.__call__ (a profiler's) and a subclass's own call
    # machinery are honoured.
    calls = []
    original = torch.nn.Module.__call__

    def patched(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    torch.nn.Module.__call__ = patched
    try:
        with torch.no_grad():
            assert kasmina._C.layer_call(layer, torch.randn(3, 12)) is None
    finally:
        torch.nn.Module.__call__ = original

    class OwnCall(kasmina.KasminaLayer):
        def _call_impl(self, *args, **kwargs):
            calls.append("own")
            return super()._call_impl(*args, **kwargs)

    own = OwnCall(12, 4)
    with torch.no_grad():
        assert kasmina._C.layer_call(own, torch.randn(3, 12)) is None
        own(torch.randn(3, 12))
    assert "own" in calls
    with torch.no_grad():
        assert kasmina._C.layer_call(layer, torch.randn(3, 12)) is not None

    # A class changed after a call that passed (layer_call remembers the
    # class's lookups per version of the class) is looked at again.
    class Late(kasmina.KasminaLayer):
        pass

    late = Late(12, 4)
    x3 = torch.randn(3, 12)
    with torch.no_grad():
        assert kasmina._C.layer_call(late, x3) is not None
        Late.forward = lambda self, t: t * 3
        try:
            assert kasmina._C.layer_call(late, x3) is None
            assert torch.equal(late(x3), x3 * 3)
        finally:
            del Late.forward
        assert kasmina._C.layer_call(late, x3) is not None
        kasmina.KasminaLayer._call_impl = torch.nn.Module._call_impl  # a base changed, same value
        try:
            assert kasmina._C.layer_call(late, x3) is not None
        finally:
            del kasmina.KasminaLayer._call_impl


def test_fx_symbolic_trace_records_the_op():
    layer = make_layer(12, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    gm = torch.fx.symbolic_trace(layer)
    assert any("kasmina" in str(n.target) for n in gm.graph.nodes)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(gm(x), layer(x))
