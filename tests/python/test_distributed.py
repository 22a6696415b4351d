"""kasmina.distributed: telemetry merged across ranks, lock-step lifecycle
under DDP, divergence detection (docs/DISTRIBUTED.md).

The multi-process tests start two real ranks as subprocesses of this file
(``python test_distributed.py worker ...``) on 127.0.0.1 with a free port:
gloo on the CPU always; NCCL on two GPUs when torch sees at least two
(skipped otherwise). Each rank writes what it saw to a file the test compares.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import kasmina
from kasmina import Stage
from kasmina import distributed as kd

HIDDEN, SEEDS = 24, 4
TOL = 1e-5  # SPEC section 9, float32
EXACT = (2, 3, 6)  # min, max, nonfinite
CLOSE = (0, 1, 4, 5, 7)


def _grown_layer(**kw) -> kasmina.KasminaLayer:
    """Seeds through the lifecycle: 0 FIXED_RAMP, 1 DRIFT_CONTROLLED,
    2 GRAD_NORM_GATED (all GRAFTING), 3 left DORMANT."""
    layer = kasmina.KasminaLayer(HIDDEN, SEEDS, stabilization_steps=1, embargo_steps=1, **kw)
    layer.germinate(0, "RESIDUAL", strategy="FIXED_RAMP", ramp_steps=3)
    layer.germinate(1, "MLP", strategy="DRIFT_CONTROLLED", ramp_steps=4, drift_threshold=0.5)
    layer.germinate(2, "CONV", strategy="GRAD_NORM_GATED", ramp_steps=4, grad_norm_lower=0.0,
                    grad_norm_upper=1e9)
    for s in range(3):
        layer.transition(s, Stage.TRAINING)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    nb = float(torch.linalg.vector_norm(b))
    d = float(torch.linalg.vector_norm(a - b))
    return d if nb == 0 else d / nb


def _expect_telemetry_close(merged: torch.Tensor, whole: torch.Tensor) -> None:
    merged, whole = merged.cpu(), whole.cpu()
    for c in EXACT:
        assert torch.equal(merged[:, c], whole[:, c]), (c, merged[:, c], whole[:, c])
    for c in CLOSE:
        assert _rel(merged[:, c], whole[:, c]) <= TOL, (c, merged[:, c], whole[:, c])


def _global_input(n: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, HIDDEN, generator=g) * 2 + 0.5
    z[1, 0] = math.nan
    z[n - 2, 7] = math.inf
    z[n // 2, 13] = -math.inf
    z[3, 5] = 0.0  # dead
    z[n - 1, 20] = 1e-9  # dead
    return z


# --- in one process ------------------------------------------------------------

def test_merge_of_row_shards_matches_whole_batch():
    layer = _grown_layer()
    for s in range(3):
        layer.transition(s, Stage.GRAFTING)
    with torch.no_grad():
        layer.alpha.fill_(0.6)
    z = _global_input(37)
    layer(z)
    whole, whole_nf = layer.telemetry.clone(), layer.nonfinite_counts.clone()
    parts = [z[:5], z[5:5], z[5:30], z[30:]]  # uneven, one empty shard
    tel, nf, rows = [], [], []
    for p in parts:
        layer(p)
        tel.append(layer.telemetry.numpy().copy())
        nf.append(layer.nonfinite_counts.numpy().copy())
        rows.append(int(layer.telemetry_rows))
    assert rows == [5, 0, 25, 7]
    merged, merged_nf = kasmina._C.merge_telemetry(np.stack(tel), np.stack(nf), np.array(rows),
                                                   layer.chunk)
    _expect_telemetry_close(torch.from_numpy(merged), whole)
    assert torch.equal(torch.from_numpy(merged_nf), whole_nf)
    again, _ = kasmina._C.merge_telemetry(np.stack(tel), np.stack(nf), np.array(rows), layer.chunk)
    assert again.tobytes() == merged.tobytes()


def test_merge_refuses_inconsistent_input():
    tel = np.zeros((1, 2, 8), np.float32)
    with pytest.raises(ValueError, match="nonfinite must be in"):
        kasmina._C.merge_telemetry(tel, np.array([[0, 99]]), np.array([1]), 3)
    with pytest.raises(ValueError, match="nonfinite must have shape"):
        kasmina._C.merge_telemetry(tel, np.array([[0]]), np.array([1]), 3)
    with pytest.raises(ValueError, match="rows must have 1 values"):
        kasmina._C.merge_telemetry(tel, np.zeros((1, 2), np.int64), np.array([1, 1]), 3)


def test_without_process_group_falls_back_to_the_layer():
    a, b = _grown_layer(), _grown_layer()
    for layer in (a, b):
        for s in range(3):
            layer.transition(s, Stage.GRAFTING)
        layer(_global_input(9))
    kd.step(a, 0.5)
    b.step(0.5)
    assert kd.check_consistent(a) == kd.check_consistent(b)
    tel, nf = kd.merged_telemetry(a)
    assert torch.equal(tel, a.telemetry) and torch.equal(nf, a.nonfinite_counts)
    assert kd.shard(torch.arange(5)).tolist() == list(range(5))
    assert kd.all_sum([1.5, 2]) == [1.5, 2.0]
    assert kd.broadcast_object({"x": 1}) == {"x": 1}


def test_layer_step_takes_a_drift_override():
    a, b = _grown_layer(), _grown_layer()
    for layer in (a, b):
        layer.transition(1, Stage.GRAFTING)
        layer(_global_input(9))
    a.step(math.nan, 1.0, drift=0.0)  # DRIFT_CONTROLLED: low drift, alpha += 2 delta
    b.step(math.nan, 1.0, drift=1.0)  # high drift: held
    assert float(a.alpha[1].detach()) == pytest.approx(0.5)
    assert float(b.alpha[1].detach()) == 0.0
    with pytest.raises(ValueError, match="drift must be a float or 4 floats"):
        a.step(0.0, drift=[0.0, 1.0])


# --- two ranks ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path, backend: str, world: int = 2):
    port = _free_port()
    env = dict(os.environ, KASMINA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", backend,
                               str(r), str(world), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{backend} ranks did not finish in 240 s")
        outs.append(out)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _check_ranks(results):
    r0, r1 = results
    # Registry, alpha and the host's Parameters bitwise equal after training.
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert r0["params"][k].numpy().tobytes() == r1["params"][k].numpy().tobytes(), k
    assert r0["core_state"] == r1["core_state"]
    assert r0["crc"] == r1["crc"]
    # The seeds went through the lifecycle, in lock step.
    assert r0["history"] == r1["history"]
    final = r0["history"][-1]
    assert final[0] in ("STABILIZATION", "EVALUATING", "FINE_TUNING"), r0["history"]
    assert any(h[1] == "GRAFTING" for h in r0["history"]), r0["history"]
    assert final[3] == "DORMANT"
    assert r0["alpha_moved"], "the DRIFT_CONTROLLED seed never moved (merged drift unused?)"
    # Each rank saw different rows: its own telemetry differs ...
    assert not torch.equal(r0["local_telemetry"], r1["local_telemetry"])
    # ... but the merged telemetry is the same bits everywhere and equals the
    # single-process telemetry of the concatenated batch (SPEC section 9).
    assert r0["merged"].numpy().tobytes() == r1["merged"].numpy().tobytes()
    assert torch.equal(r0["merged_nf"], r1["merged_nf"])
    _expect_telemetry_close(r0["merged"], r0["whole"])
    assert torch.equal(r0["merged_nf"], r0["whole_nf"])
    # A lifecycle call made on one rank only is caught on both.
    for r in results:
        msg = r["divergence_error"]
        assert msg and "diverged across ranks" in msg and "[0]" in msg and "[1]" in msg, msg
        assert "seed(s) [3]" in msg, msg


def test_two_ranks_gloo(tmp_path):
    _check_ranks(_run_ranks(tmp_path, "gloo"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices (run by scripts/gpu-check on a 2-GPU machine)")
def test_two_ranks_nccl(tmp_path):
    _check_ranks(_run_ranks(tmp_path, "nccl"))


def _worker(backend: str, rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        layer = _grown_layer()
        model = nn.Sequential(nn.Linear(16, HIDDEN), layer, nn.Tanh(), nn.Linear(HIDDEN, 3))
        model.to(device)
        net = kd.wrap(model)
        assert isinstance(net, nn.parallel.DistributedDataParallel)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        history, alpha_moved = [], False
        for it in range(8):
            xb = torch.randn(20, 16, generator=g).to(device)  # the same global batch everywhere
            yb = torch.randint(0, 3, (20,), generator=g).to(device)
            x, y = kd.shard(xb), kd.shard(yb)
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it == 1:
                for s in range(3):
                    layer.transition(s, Stage.GRAFTING)
            a1 = float(layer.alpha[1])
            # Each rank's own loss and grad norms: step() averages them.
            kd.step(layer, float(loss.detach()))
            alpha_moved |= float(layer.alpha[1]) > a1 and layer.stage(1) == Stage.GRAFTING
            history.append([layer.stage(s).name for s in range(SEEDS)])

        # Telemetry of a batch split over the ranks vs the whole batch.
        z = _global_input(21).to(device)
        with torch.no_grad():
            layer(kd.shard(z))
            local = layer.telemetry.cpu().clone()
            merged, merged_nf = kd.merged_telemetry(layer)
            layer(z)
            whole, whole_nf = layer.telemetry.cpu().clone(), layer.nonfinite_counts.cpu().clone()
        crc = kd.check_consistent(layer)
        result = dict(
            params={k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    if v.dtype.is_floating_point},
            core_state=bytes(layer._core.save()), crc=crc, history=history,
            alpha_moved=alpha_moved, local_telemetry=local, merged=merged.cpu(),
            merged_nf=merged_nf.cpu(), whole=whole, whole_nf=whole_nf)

        # One rank makes a lifecycle call the other does not.
        if rank == 1:
            layer.germinate(3, "ATTENTION")
        try:
            kd.check_consistent(layer)
            result["divergence_error"] = None
        except RuntimeError as e:
            result["divergence_error"] = str(e)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears its group down: a gloo rank whose
        # peer has gone can abort in gloo's threads ("terminate called without
        # an active exception"; rank 1, about 1 run in 15 on a loaded 2-core
        # machine before this).
        dist.barrier()
    finally:
        dist.destroy_process_group()
        # Rank 0 hosts the TCP store: it leaves last.
        open(os.path.join(out_dir, f"down{rank}"), "w").close()
        if rank == 0:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                    os.path.exists(os.path.join(out_dir, f"down{r}")) for r in range(world)):
                time.sleep(0.01)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "worker":
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
