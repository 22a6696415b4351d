"""Autotuning of the CUDA launch configuration (``kasmina tune``).

The CUDA kernels take run-time knobs that change speed only: how many rows
each thread loads before it computes (``rows in flight``, docs/DESIGN.md 37),
how many lanes share a row in the forward (``lanes per row``, DESIGN 46),
the forward's threads per CTA (block size, DESIGN 48) and, on sm_90, the
forward's variant (generic, or TMA copies into a shared-memory pipeline of
2 to 8 stages, docs/DESIGN.md 44).
``kasmina tune`` measures the candidates on this machine's GPU for each
element size (float32; bfloat16 for the 2-byte types) and shape class (small,
medium, large: ``kasmina._C.shape_class``) with the same timer as
``kasmina bench`` (CUDA events, L2 flushed, median), and writes the winners
to a versioned cache file. ``import kasmina`` loads the file and hands the
entries for the devices it names to the dispatcher, whose one selection
point takes: a launch config set explicitly, else the tuned entry, else the
architecture's default (``kasmina info`` and the profiler say which).

The cache: ``$KASMINA_TUNE_CACHE``, else ``$XDG_CACHE_HOME/kasmina/tune-v1.json``
(``~/.cache/...``). A file of another format or version, or a damaged one,
is ignored with a warning: tuning changes speed, never results.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from . import _C

FORMAT = "kasmina-tune"
VERSION = 1
SHAPE_CLASSES = ("small", "medium", "large")
# One representative shape per class (the benchmark shapes).
CLASS_SHAPES = {"small": (16, 4096, 64), "medium": (8192, 768, 16), "large": (16384, 4096, 64)}
DTYPES = {"float32": (torch.float32, 4), "bfloat16": (torch.bfloat16, 2)}
FORWARD_CANDIDATES = {4: (1, 2, 4), 2: (1, 2)}
BACKWARD_CANDIDATES = (1, 2)
# CudaForwardVariant's values; entries name them.
VARIANTS = ("automatic", "generic", "tma")
TMA_STAGES = (2, 4, 8)
# Lanes per row of the forward (1 lost everywhere it was measured).
GROUPS = (2, 4, 8)
# Threads per forward CTA, measured at the best of the candidates above
# (which run at the architecture's default): a second round, not a product.
BLOCK_THREADS = (256, 128, 64)


def cache_path() -> Path:
    env = os.environ.get("KASMINA_TUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kasmina" / f"tune-v{VERSION}.json"


Entry = tuple[str, int, int, int, int, int, int, int, int]


def _check_entry(e: Any) -> Entry:
    if not isinstance(e, dict):
        raise ValueError(f"entry is not an object: {e!r}")
    device = e.get("device")
    elem = e.get("elem_bytes")
    shape = e.get("shape_class")
    fwd, bwd = e.get("forward_rows_in_flight"), e.get("backward_rows_in_flight")
    if not isinstance(device, str) or not device:
        raise ValueError(f"entry without a device name: {e!r}")
    if shape not in SHAPE_CLASSES:
        raise ValueError(f"entry with shape_class {shape!r}, want one of {SHAPE_CLASSES}")
    for name, v in (("elem_bytes", elem), ("forward_rows_in_flight", fwd),
                    ("backward_rows_in_flight", bwd)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"entry with a non-integer {name}: {e!r}")
        if not 0 <= v <= 8:  # the dispatcher checks the exact lists
            raise ValueError(f"entry with {name} = {v} out of range: {e!r}")
    # Optional (entries written before the TMA variant have neither).
    variant = e.get("forward_variant", "automatic")
    if variant not in VARIANTS:
        raise ValueError(f"entry with forward_variant {variant!r}, want one of {VARIANTS}")
    stages = e.get("forward_stages", 0)
    if (not isinstance(stages, int) or isinstance(stages, bool)
            or not (stages == 0 or 2 <= stages <= 8)):
        raise ValueError(f"entry with forward_stages {stages!r}, want 0 or 2 to 8: {e!r}")
    # Optional too (entries written before the lanes-per-row knob have none).
    group = e.get("forward_group", 0)
    if (not isinstance(group, int) or isinstance(group, bool)
            or group not in (0, 1, 2, 4, 8)):
        raise ValueError(f"entry with forward_group {group!r}, want 0, 1, 2, 4 or 8: {e!r}")
    # Optional (entries written before the block-size candidates have none).
    threads = e.get("forward_block_threads", 0)
    if (not isinstance(threads, int) or isinstance(threads, bool)
            or threads not in (0, 64, 128, 256)):
        raise ValueError(f"entry with forward_block_threads {threads!r}, "
                         f"want 0, 64, 128 or 256: {e!r}")
    return (device, elem, SHAPE_CLASSES.index(shape), fwd, bwd, VARIANTS.index(variant), stages,
            group, threads)


def read_cache(path: Path) -> list[Entry]:
    """The entries of a cache file; ValueError for a file that is not a
    kasmina tune cache of this version (or has a bad entry)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path} has version {doc.get('version')!r}, this kasmina reads {VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{path} has no entries list")
    return [_check_entry(e) for e in entries]


def apply(entries: list[Entry]) -> None:
    """Hand the entries to the dispatcher (validated there: a bad value
    raises ValueError and changes nothing)."""
    _C.set_cuda_tuned_table(entries)


def load(path: Path | None = None, *, quiet_missing: bool = True) -> int:
    """Load the cache file into the dispatcher; returns the number of entries.
    A missing file loads nothing; an unreadable or invalid one warns and loads
    nothing (the defaults stay)."""
    path = cache_path() if path is None else Path(path)
    try:
        exists = path.exists()
    except OSError as exc:
        warnings.warn(f"kasmina: ignoring the tune cache {path}: {exc}", stacklevel=2)
        return 0
    if not exists:
        if not quiet_missing:
            warnings.warn(f"kasmina: no tune cache at {path}", stacklevel=2)
        return 0
    try:
        entries = read_cache(path)
        apply(entries)
    except Exception as exc:  # noqa: BLE001 - a cache must never break import kasmina
        warnings.warn(f"kasmina: ignoring the tune cache {path}: {exc}", stacklevel=2)
        return 0
    return len(entries)


def write_cache(path: Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    doc = {"format": FORMAT, "version": VERSION, **meta, "entries": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # never a half-written cache


def _measure_class(shape, dtype, elem, timer, progress) -> dict[str, Any]:
    from .bench import Shape, make_layer

    rows, hidden, seeds = shape
    device = torch.device("cuda")
    layer = make_layer(Shape(rows, hidden, seeds), device).to(dtype)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, hidden, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            layer(x)

    def both():
        y = layer(x)
        y.backward(dy)

    # Forward candidates as (rows in flight, variant, stages, lanes per row):
    # the generic kernel per rows in flight, and on sm_90 the TMA kernel per
    # depth (the class shapes all take its vector path with C <= 256), each
    # at every lanes-per-row value. A TMA candidate whose stages do not fit
    # runs (and is timed as) the generic kernel, which the entry then selects
    # too.
    generic, tma = VARIANTS.index("generic"), VARIANTS.index("tma")
    candidates = [(u, generic, 0, g) for g in GROUPS for u in FORWARD_CANDIDATES[elem]]
    if torch.cuda.get_device_capability()[0] == 9:
        candidates += [(1, tma, st, g) for g in GROUPS for st in TMA_STAGES]

    def name_of(c):
        u, variant, stages, g = c
        return (f"rows {u}" if variant == generic else f"tma {stages}") + f", {g} lanes"

    out: dict[str, Any] = {"forward_us": {}, "forward_block_threads_us": {},
                           "forward_backward_us": {}}
    before = _C.cuda_launch_config()
    try:
        for cand in candidates:
            u, variant, stages, g = cand
            _C.set_cuda_launch_config(u, 0, variant, stages, g, 0)  # the default block size
            name = name_of(cand)
            out["forward_us"][name] = 1e3 * timer(fwd)
            progress(f"  forward {name}: {out['forward_us'][name]:.1f} us")
        best_name = min(out["forward_us"], key=out["forward_us"].get)
        best_f = next(c for c in candidates if name_of(c) == best_name)
        # The block size at the winner (the first candidate is the winner's
        # own run, timed again so that all sizes come from one round).
        for threads in BLOCK_THREADS:
            _C.set_cuda_launch_config(best_f[0], 0, best_f[1], best_f[2], best_f[3], threads)
            out["forward_block_threads_us"][threads] = 1e3 * timer(fwd)
            progress(f"  forward {best_name}, {threads} threads per CTA: "
                     f"{out['forward_block_threads_us'][threads]:.1f} us")
        best_threads = min(out["forward_block_threads_us"],
                           key=out["forward_block_threads_us"].get)
        for u in BACKWARD_CANDIDATES:
            _C.set_cuda_launch_config(best_f[0], u, best_f[1], best_f[2], best_f[3], best_threads)
            out["forward_backward_us"][u] = 1e3 * timer(both)
            progress(f"  forward+backward, backward rows in flight {u}: "
                     f"{out['forward_backward_us'][u]:.1f} us")
    finally:  # the caller's own setting, if any, comes back
        _C.set_cuda_launch_config(before["forward_rows_in_flight"],
                                  before["backward_rows_in_flight"],
                                  before["forward_variant"], before["forward_stages"],
                                  before.get("forward_group", 0),
                                  before.get("forward_block_threads", 0))
    out["forward_rows_in_flight"] = best_f[0]
    out["forward_variant"] = VARIANTS[best_f[1]]
    out["forward_stages"] = best_f[2]
    out["forward_group"] = best_f[3]
    out["forward_block_threads"] = best_threads
    out["backward_rows_in_flight"] = min(out["forward_backward_us"],
                                         key=out["forward_backward_us"].get)
    return out


def run_tune(*, out: Path | None = None, quick: bool = False,
             progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every candidate for each dtype and shape class on the current
    CUDA device (``quick``: fewer repetitions) and write the winners to ``out`` (default: cache_path()),
    merged with the entries of other devices already there. Returns the
    cache document. ValueError where there is no CUDA device."""
    if not torch.cuda.is_available() or not _C.backend_available(2):
        raise ValueError("kasmina tune measures the CUDA kernels: no CUDA device is available "
                         "here (the CPU backend has no launch knobs)")
    from .bench import Timer

    path = cache_path() if out is None else Path(out)
    device_name = torch.cuda.get_device_name()
    timer = Timer(torch.device("cuda"), quick)
    entries = []
    for dname, (dtype, elem) in DTYPES.items():
        for cls in SHAPE_CLASSES:
            shape = CLASS_SHAPES[cls]
            # The small class mostly runs 1 row in flight whatever the
            # setting (the plan caps it for small batches); its entry then
            # only records that no candidate won.
            progress(f"{dname} {cls} ({shape[0]}x{shape[1]}:{shape[2]})")
            m = _measure_class(shape, dtype, elem, timer, progress)
            entries.append(dict(device=device_name, elem_bytes=elem, shape_class=cls,
                                forward_rows_in_flight=m["forward_rows_in_flight"],
                                backward_rows_in_flight=m["backward_rows_in_flight"],
                                forward_variant=m["forward_variant"],
                                forward_stages=m["forward_stages"],
                                forward_group=m["forward_group"],
                                forward_block_threads=m["forward_block_threads"],
                                shape=list(shape), dtype=dname,
                                forward_us={str(k): v for k, v in m["forward_us"].items()},
                                forward_block_threads_us={
                                    str(k): v for k, v in m["forward_block_threads_us"].items()},
                                forward_backward_us={str(k): v for k, v in
                                                     m["forward_backward_us"].items()}))
    # Other devices' entries stay, those that still validate.
    kept = []
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
        if isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") == VERSION:
            for e in doc.get("entries", []) if isinstance(doc.get("entries"), list) else []:
                try:
                    _check_entry(e)
                except ValueError:
                    continue
                if e.get("device") != device_name:
                    kept.append(e)
    except (OSError, ValueError):
        kept = []
    # Checked by the dispatcher before anything is written.
    apply([_check_entry(e) for e in kept + entries])
    from . import __version__
    meta = dict(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                kasmina=__version__, torch=torch.__version__)
    write_cache(path, kept + entries, meta)
    return {"path": str(path), "format": FORMAT, "version": VERSION, **meta,
            "entries": kept + entries}
