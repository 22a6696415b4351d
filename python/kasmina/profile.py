"""Per-kernel profiling of kasmina's forward and backward (docs/PERFORMANCE.md,
"Profiling").

Every call runs inside an NVTX range (``kasmina.forward`` /
``kasmina.backward``) that Nsight Systems and ``torch.profiler`` show. With
profiling on, each call is also timed (CUDA events on the current stream, a
wall clock on the CPU backends) and charged to the kernel variant that ran,
with the bytes it must move::

    import kasmina.profile as kp
    kp.enable()
    ... train ...
    print(kp.table())          # kernel, calls, time, MB, GB/s
    rows = kp.report()         # the same as dicts

``KASMINA_PROFILE=1`` in the environment switches it on from the start and
prints the table to stderr at exit. Timing adds two event records per call
and no synchronisation; calls inside a CUDA graph capture are not timed.
"""

from __future__ import annotations

from . import _C

__all__ = ["disable", "enable", "enabled", "report", "reset", "table"]


def enable() -> None:
    """Start timing every kasmina forward/backward."""
    _C.set_profiling(True)


def disable() -> None:
    _C.set_profiling(False)


def enabled() -> bool:
    return bool(_C.profiling())


def report() -> list[dict]:
    """Per kernel variant: kernel, calls, total_us, mean_us, bytes, gbps,
    sorted by total time (waits for timings still running on the GPU)."""
    return list(_C.profile_report())


def reset() -> None:
    _C.profile_reset()


def table() -> str:
    """The report as a text table."""
    return _C.format_profile()
