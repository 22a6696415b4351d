"""Data-parallel training with KasminaLayers (torch.distributed / DDP).

What this module adds to ``DistributedDataParallel`` (docs/DISTRIBUTED.md):

- :func:`merged_telemetry`: every rank's telemetry of its own rows, gathered
  and merged **in rank order** by the C++ core (``kasmina::merge_telemetry``,
  Chan's formula over the sufficient statistics). Every rank gets the same
  bits; the result equals the telemetry of the concatenated batch within SPEC
  section 9 (counts, min and max exactly).
- :func:`step`: the controller step with identical inputs on every rank (loss
  and grad_norm averaged over the ranks in rank order, drift from the merged
  telemetry), so the lifecycle never diverges; then :func:`check_consistent`.
- :func:`check_consistent`: gathers a digest of every rank's core state (seeds,
  registry, alpha, configuration) and raises ``RuntimeError`` naming the ranks
  that differ.
- Small helpers for a training script run by ``torchrun``:
  :func:`init_from_env`, :func:`wrap`, :func:`shard`, :func:`all_sum`,
  :func:`broadcast_object`, :func:`is_main_process`.

Without an initialised process group (or with one rank) every function falls
back to the single-process behaviour, so the same script runs either way.

No numerics live here: the merge is C++; this file only moves bytes between
ranks. Gathers carry float64 (exact for float32 telemetry and for int64 counts
below 2^53) and every reduction is done locally over the gathered list in rank
order, never by a collective's own (unspecified) summation order.
"""

from __future__ import annotations

import math
import os
import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import _C

__all__ = [
    "all_sum",
    "broadcast_object",
    "check_consistent",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "merged_telemetry",
    "rank",
    "shard",
    "step",
    "world_size",
    "wrap",
]


# --- process group -----------------------------------------------------------

def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process(group=None) -> bool:
    return rank(group) == 0


def init_from_env(device: "torch.device | str") -> bool:
    """Initialise the default process group from torchrun's environment
    (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``):
    NCCL for CUDA, gloo for the CPU. On CUDA the current device becomes
    ``cuda:LOCAL_RANK`` (so ``torch.device("cuda")`` means this rank's GPU).
    Returns True when it initialised a group of more than one rank; False
    (and does nothing) without torchrun's variables, with WORLD_SIZE = 1, or
    when a group already exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"kasmina: LOCAL_RANK {local} but torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def wrap(model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else the model.
    On CUDA the module's device is passed as ``device_ids``. KasminaLayer
    needs nothing special: its Parameters (registry, scales, alpha) all get
    gradients every step, so ``find_unused_parameters`` is not needed."""
    if not is_distributed(ddp_kwargs.get("process_group")):
        return model
    from torch.nn.parallel import DistributedDataParallel
    dev = next(model.parameters()).device
    if dev.type == "cuda" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [dev.index if dev.index is not None
                                    else torch.cuda.current_device()]
    return DistributedDataParallel(model, **ddp_kwargs)


def shard(t: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's part of a global batch along dim 0: contiguous, in rank
    order, sizes differing by at most one (so the concatenation over ranks
    is the batch)."""
    if not is_distributed(group):
        return t
    return torch.tensor_split(t, world_size(group))[rank(group)]


# --- moving values between ranks -------------------------------------------

def _comm_device(group) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (and others) take CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(values: np.ndarray, group) -> np.ndarray:
    """[ranks, n] float64: every rank's values, in rank order."""
    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64).reshape(-1))
    dev = _comm_device(group)
    flat = flat.to(dev)
    out = [torch.empty_like(flat) for _ in range(world_size(group))]
    dist.all_gather(out, flat, group=group)
    return torch.stack(out).cpu().numpy()


def _rank_mean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 summed in rank order (float64), as float32. A NaN on
    any rank gives NaN (not measured)."""
    acc = np.zeros(values.shape[1:], dtype=np.float64)
    for r in range(values.shape[0]):
        acc = acc + values[r]
    return (acc / values.shape[0]).astype(np.float32)


def all_sum(values: Sequence[float], group=None) -> list[float]:
    """Sum of each value over the ranks, in rank order (float64); identical
    on every rank. The values themselves without a process group."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not is_distributed(group):
        return arr.tolist()
    g = _gather(arr, group)
    acc = np.zeros_like(arr)
    for r in range(g.shape[0]):
        acc = acc + g[r]
    return acc.tolist()


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects, e.g. a
    controller's actions, so that every rank applies the same decisions)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dev = _comm_device(group) if dist.get_backend(group) == "nccl" else None
    dist.broadcast_object_list(box, src=src, group=group, device=dev)
    return box[0]


def _global_ranks(group) -> list[int]:
    if group is None:
        return list(range(world_size()))
    return list(dist.get_process_group_ranks(group))


# --- telemetry, step, consistency --------------------------------------------

def merged_telemetry(layer, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Telemetry of the latest forward merged over all ranks of ``group``:
    ``(telemetry [S, 8] float32, nonfinite [S] int64)`` on the layer's device,
    bit-identical on every rank. Each rank contributes its telemetry, its
    exact non-finite counts and its row count N (``layer.telemetry_rows``);
    the core merges them in rank order (SPEC section 4 statistics of the
    concatenated rows; see docs/DISTRIBUTED.md for what is exact).

    Before any forward on every rank the result is NaN ("not measured"), as
    the layer's own telemetry. A group where some ranks ran a forward and
    others did not is out of step: RuntimeError naming them."""
    dev = layer.telemetry.device
    if not is_distributed(group):
        return layer.telemetry.detach().clone(), layer.nonfinite_counts.detach().clone()
    s = layer.num_seeds
    tel = layer.telemetry.detach().to("cpu", torch.float32).numpy().astype(np.float64)
    nf = layer.nonfinite_counts.detach().cpu().numpy().astype(np.float64)
    rows = float(layer.telemetry_rows.item())
    g = _gather(np.concatenate([tel.reshape(-1), nf, [rows]]), group)
    g_tel = np.ascontiguousarray(g[:, :s * 8].reshape(-1, s, 8).astype(np.float32))
    g_nf = np.ascontiguousarray(g[:, s * 8:s * 9].astype(np.int64))
    g_rows = np.ascontiguousarray(g[:, s * 9].astype(np.int64))
    measured = g_rows >= 0
    if not measured.any():
        return (torch.full((s, 8), math.nan, dtype=torch.float32, device=dev),
                torch.zeros(s, dtype=torch.int64, device=dev))
    if not measured.all():
        ranks = _global_ranks(group)
        missing = [ranks[i] for i in np.flatnonzero(~measured)]
        raise RuntimeError(f"kasmina: cannot merge telemetry: rank(s) {missing} ran no forward "
                           f"of this layer yet while the others did (ranks out of step)")
    merged, merged_nf = _C.merge_telemetry(g_tel, g_nf, g_rows, layer.chunk)
    return (torch.from_numpy(merged).to(dev), torch.from_numpy(merged_nf).to(dev))


def step(layer, loss, grad_norm=None, group=None) -> None:
    """Controller step (SPEC section 7) with the same inputs on every rank:
    ``loss`` and ``grad_norm`` (default: this rank's ``grad_stats[:, 0]``)
    averaged over the ranks in rank order, drift from :func:`merged_telemetry`;
    then :func:`check_consistent`. Without a process group: ``layer.step``."""
    if not is_distributed(group):
        layer.step(loss, grad_norm)
        return
    loss = layer._per_seed(loss, "loss")
    if grad_norm is None:
        grad_norm = layer.grad_stats[:, 0]
    grad_norm = layer._per_seed(grad_norm, "grad_norm")
    g = _gather(np.concatenate([loss, grad_norm]), group)
    s = layer.num_seeds
    loss_avg = _rank_mean(g[:, :s])
    grad_norm_avg = _rank_mean(g[:, s:])
    drift = merged_telemetry(layer, group)[0][:, 7]
    layer.step(loss_avg, grad_norm_avg, drift=drift)
    check_consistent(layer, group)


def state_checksum(layer) -> tuple[int, list[int]]:
    """(48-bit digest of the layer's core state file, per-seed CRC-32s). The
    state file holds the seed arrays, the registry W and scale, alpha and the
    configuration, so this also catches Parameters that drifted apart.

    Not a CRC-32 of the file: the file ends with its own CRC-32, and the CRC
    of a message followed by its CRC is a constant. BLAKE2b cut to 48 bits
    travels exactly in the float64 gather."""
    layer._push()  # the optimiser's latest alpha / W / scale
    blob = layer._core.save()  # verifies the seed checksums first
    seeds = [int(layer._core.checksum(i)) for i in range(layer.num_seeds)]
    digest = int.from_bytes(hashlib.blake2b(blob, digest_size=6).digest(), "little")
    return digest, seeds


def check_consistent(layer, group=None) -> int:
    """Raise RuntimeError on every rank when the ranks' core states differ,
    naming the ranks (grouped by state) and the seeds whose entries differ.
    Returns the state digest (the same on every rank) when they agree."""
    crc, seeds = state_checksum(layer)
    if not is_distributed(group):
        return crc
    g = _gather(np.array([crc] + seeds, dtype=np.float64), group).astype(np.int64)
    if (g == g[0]).all():
        return crc
    ranks = _global_ranks(group)
    by_state: dict[int, list[int]] = {}
    for i, c in enumerate(g[:, 0]):
        by_state.setdefault(int(c), []).append(ranks[i])
    seeds_differ = [s for s in range(layer.num_seeds) if not (g[:, 1 + s] == g[0, 1 + s]).all()]
    groups = "; ".join(f"rank(s) {r} have state digest {c:012x}" for c, r in by_state.items())
    what = (f"seed entries differ for seed(s) {seeds_differ}" if seeds_differ else
            "seed entries agree, so the registry weights/scales, alpha or configuration differ")
    raise RuntimeError(f"kasmina: layer state diverged across ranks: {groups} ({what}). "
                       "Lifecycle calls must be made with the same arguments on every rank "
                       "(use kasmina.distributed.step and broadcast the controller's decisions)")
