"""kasmina.profile: per-kernel timing through the front end (CPU here; the
CUDA case runs in tests/cuda, SmallCuda.ProfilerTimesKernelsAndSkipsCaptures)."""

import pytest
import torch

import kasmina
import kasmina.profile as kp


@pytest.fixture
def profiling():
    was = kp.enabled()
    kp.reset()
    kp.enable()
    yield
    kp.reset()
    if not was:
        kp.disable()


def _grafting_layer(hidden=32, seeds=4):
    layer = kasmina.KasminaLayer(hidden, seeds)
    for s in range(seeds):
        layer.germinate(s, s % 4)
        layer.transition(s, "TRAINING")
        layer.transition(s, "GRAFTING")
    return layer


def test_forward_and_backward_are_charged_with_their_bytes(profiling):
    layer = _grafting_layer()
    x = torch.randn(10, 32, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()
    rows = {r["kernel"]: r for r in kp.report()}
    assert set(rows) == {"cpu.forward float32", "cpu.backward float32"}, kp.table()
    fwd, bwd = rows["cpu.forward float32"], rows["cpu.backward float32"]
    assert fwd["calls"] == 2 and bwd["calls"] == 2
    assert fwd["bytes"] == 2 * 10 * 32 * 4 * 2
    assert bwd["bytes"] == 2 * 10 * 32 * 4 * 3
    assert fwd["total_us"] > 0 and fwd["gbps"] > 0
    assert "cpu.forward float32" in kp.table()
    kp.reset()
    assert kp.report() == []


def test_off_records_nothing_and_info_says_so():
    was = kp.enabled()
    kp.disable()
    kp.reset()
    try:
        _grafting_layer()(torch.randn(3, 32))
        assert kp.report() == []
        info = kasmina.info(hidden=32, num_seeds=4, rows=8)
        assert info["profiling"] is False
        assert set(info["cuda_launch_config"]) == {"forward_rows_in_flight",
                                                    "backward_rows_in_flight",
                                                    "forward_variant", "forward_stages",
                                                    "forward_group",
                                                    "forward_block_threads"}
    finally:
        if was:
            kp.enable()


def test_launch_config_refuses_unknown_values():
    before = kasmina._C.cuda_launch_config()
    with pytest.raises(ValueError, match="forward_rows_in_flight"):
        kasmina._C.set_cuda_launch_config(3, 0)
    with pytest.raises(ValueError, match="forward_variant"):
        kasmina._C.set_cuda_launch_config(1, 1, 3, 0)
    with pytest.raises(ValueError, match="forward_stages"):
        kasmina._C.set_cuda_launch_config(1, 1, 2, 1)
    with pytest.raises(ValueError, match="forward_group"):
        kasmina._C.set_cuda_launch_config(1, 1, 2, 2, 3)
    with pytest.raises(ValueError, match="forward_block_threads"):
        kasmina._C.set_cuda_launch_config(1, 1, 2, 2, 2, 96)
    assert kasmina._C.cuda_launch_config() == before
