"""CUDA cases (skipped without a GPU; scripts/gpu-check runs them): the CUDA backend
against kasmina.reference under SPEC section 9, determinism, torch.compile,
CUDA graphs, autocast, device moves and the per-device workspace."""

from __future__ import annotations

import copy

import pytest
import torch

import kasmina
from kasmina import Kind, Stage, bench, reference
from conftest import STAGE_MIX, assert_close, cycle, make_layer, seed_tensors

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not kasmina.info()["backends"]["cuda"]["available"],
    reason="needs a CUDA device and the CUDA backend")

KINDS = list(Kind)


def run(layer, x, dy):
    xg = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(xg)
    y.backward(dy)
    return results(layer, y, xg)


def results(layer, y, xg):
    """y, telemetry, nonfinite, dx, dW, dscale, dalpha, grad_stats (copies)."""
    return [y.detach().clone(), layer.telemetry.clone(), layer.nonfinite_counts.clone(),
            xg.grad.clone(), layer.weights.grad.clone(), layer.scales.grad.clone(),
            layer.alpha.grad.clone(), layer.grad_stats.clone()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8, 3), (7, 8, 48), (1000, 4, 65), (33, 2, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_vs_reference(dtype, shape):
    rows, seeds, chunk = shape
    layer = make_layer(seeds * chunk, cycle(KINDS, seeds), cycle(STAGE_MIX, seeds),
                       clamp=(-2.5, 2.5), grad_clip=4.0).cuda()
    x = torch.randn(rows, seeds * chunk, device="cuda").to(dtype)
    dy = torch.randn(rows, seeds * chunk, device="cuda").to(dtype)
    ours = run(layer, x, dy)
    st, kd, bp, al, w, sc = [t.cpu() for t in seed_tensors(layer)]
    ry, rtel = reference.forward(x.cpu().double(), st, kd, bp, al.double(), w.double(),
                                 sc.double(), clamp=(-2.5, 2.5), grad_clip=4.0)
    rdx, rdw, rds, rda, rgs = reference.backward(x.cpu().double(), dy.cpu().double(), st, kd, bp,
                                                 al.double(), w.double(), sc.double(),
                                                 clamp=(-2.5, 2.5), grad_clip=4.0)
    for name, o, r in zip(["y", "telemetry", "dx", "dW", "dscale", "dalpha", "grad_stats"],
                          [ours[0], ours[1], ours[3], ours[4], ours[5], ours[6], ours[7]],
                          [ry, rtel, rdx, rdw, rds, rda, rgs]):
        assert_close(o, r, dtype, name)
    assert torch.equal(ours[1][:, 2:4].cpu().double(), rtel[:, 2:4])
    assert torch.equal(ours[2].cpu().double(), rtel[:, 6])
    again = run(layer, x, dy)
    for a, b in zip(ours, again):
        assert torch.equal(a, b)  # deterministic bits


def test_cuda_matches_cpu_backend_closely():
    layer = make_layer(64, cycle(KINDS, 8), STAGE_MIX)
    x = torch.randn(300, 64)
    dy = torch.randn(300, 64)
    cpu = run(layer, x, dy)
    layer.cuda()
    gpu = run(layer, x.cuda(), dy.cuda())
    for a, b in zip(cpu, gpu):
        assert_close(b.cpu(), a, torch.float32)


def test_compile_on_cuda_matches_eager():
    torch._dynamo.reset()
    layer = make_layer(48, cycle(KINDS, 4), [Stage.GRAFTING, Stage.TRAINING, Stage.FOSSILIZED,
                                            Stage.FINE_TUNING]).cuda()
    x = torch.randn(17, 48, device="cuda")
    dy = torch.randn(17, 48, device="cuda")
    eager = run(layer, x, dy)
    got = run(torch.compile(layer, fullgraph=True), x, dy)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)


def test_cuda_graph_capture_and_replay():
    layer = make_layer(64, cycle(KINDS, 8), STAGE_MIX).cuda()
    static_x = torch.randn(32, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    new_x = torch.randn(32, 64, device="cuda")
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expect = layer(new_x)
    assert torch.equal(static_y, expect)
    tel = layer.telemetry.clone()
    graph.replay()
    assert torch.equal(layer.telemetry, tel)


RESULTS = ["y", "telemetry", "nonfinite", "dx", "dW", "dscale", "dalpha", "grad_stats"]


def assert_same_bits(want, got, where=""):
    torch.cuda.synchronize()
    for name, a, b in zip(RESULTS, want, got):
        assert torch.equal(a, b), where + name


def test_training_step_in_cuda_graphs_matches_eager():
    # torch.cuda.make_graphed_callables: the forward and the backward of the
    # layer each replayed from a CUDA graph give eager's bits.
    layer = make_layer(64, cycle(KINDS, 8), STAGE_MIX, grad_clip=4.0).cuda()
    eager_layer = copy.deepcopy(layer)
    sample = torch.randn(32, 64, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (sample,))
    for _ in range(2):  # the second replay sees new inputs in the same static buffers
        x = torch.randn(32, 64, device="cuda")
        dy = torch.randn(32, 64, device="cuda")
        want = run(eager_layer, x, dy)
        assert_same_bits(want, run(graphed, x, dy))


def capture_whole_step(layer, xs, dys):
    """The step docs/PYTHON.md recommends for small batches, as kasmina
    bench's graphs column captures it (bench.capture): forward and backward
    in one torch.cuda.graph on static inputs. Returns a replay on new inputs
    that returns the step's results."""
    out = {}

    def step():
        out["y"] = layer(xs)
        out["y"].backward(dys)

    graph_replay = bench.capture(step, [xs, *layer.parameters()], torch.device("cuda"))

    def replay(x, dy):
        with torch.no_grad():
            xs.copy_(x)
            dys.copy_(dy)
        graph_replay()
        return results(layer, out["y"], xs)
    return replay


def test_whole_training_step_in_one_cuda_graph_matches_eager():
    # Replays on new inputs give eager's bits; between replays the
    # controller's lifecycle calls and an optimiser's in-place update rewrite
    # the seed table and the Parameters in place, where the replay reads them
    # (the kernels' plans depend on shapes only), and the bits stay eager's.
    layer = make_layer(64, cycle(KINDS, 8), STAGE_MIX, grad_clip=4.0).cuda()
    eager_layer = copy.deepcopy(layer)
    replay = capture_whole_step(layer, torch.randn(32, 64, device="cuda", requires_grad=True),
                                torch.randn(32, 64, device="cuda"))
    for i in range(5):
        if i == 2:  # seed 1 TRAINING -> GRAFTING, dormant seed 4 germinated
            for lay in (layer, eager_layer):
                lay.transition(1, "GRAFTING")
                lay.germinate(4, Kind.MLP)
        if i >= 3:  # the controller's step and an SGD update, both in place
            for lay in (layer, eager_layer):
                lay.step(loss=0.5)
                with torch.no_grad():
                    for p in lay.parameters():
                        p.sub_(0.05 * p.grad)
        x = torch.randn(32, 64, device="cuda")
        dy = torch.randn(32, 64, device="cuda")
        got = replay(x, dy)
        assert_same_bits(run(eager_layer, x, dy), got, f"step {i}: ")
        assert torch.equal(layer.seed_stage, eager_layer.seed_stage)
        assert torch.equal(layer.alpha, eager_layer.alpha)


def test_compile_reduce_overhead_training_step_matches_eager():
    # torch.compile's CUDA graphs (mode="reduce-overhead"): forward and
    # backward replayed from graphs, eager's bits, three steps of new inputs.
    torch._dynamo.reset()
    layer = make_layer(48, cycle(KINDS, 4), [Stage.GRAFTING, Stage.TRAINING, Stage.FOSSILIZED,
                                            Stage.FINE_TUNING]).cuda()
    eager_layer = copy.deepcopy(layer)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(17, 48, device="cuda")
        dy = torch.randn(17, 48, device="cuda")
        want = run(eager_layer, x, dy)
        assert_same_bits(want, run(compiled, x, dy))


def test_autocast_on_cuda_runs_in_input_dtype():
    layer = make_layer(32, cycle(KINDS, 4), [Stage.GRAFTING] * 4).cuda()
    lin = torch.nn.Linear(32, 32).cuda()
    x = torch.randn(8, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = lin(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weights.grad.dtype == torch.float32


def test_workspace_sized_per_device_and_state_moves():
    layer = make_layer(24, cycle(KINDS, 4), [Stage.GRAFTING] * 4)
    sd = layer.state_dict()
    layer.cuda()
    assert layer.workspace.is_cuda and layer.workspace.dtype == torch.uint8
    assert int(layer.workspace.count_nonzero()) == 0
    layer(torch.randn(5, 24, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    assert int(layer.workspace.count_nonzero()) == 0  # the kernels leave it zeroed
    other = kasmina.KasminaLayer(24, 4).cuda()
    other.load_state_dict(sd)
    x = torch.randn(5, 24, device="cuda")
    assert torch.equal(other(x), layer(x))
    layer.cpu()
    with pytest.raises(ValueError, match="device"):
        layer(torch.randn(5, 24, device="cuda"))
