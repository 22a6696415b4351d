"""The vocabulary of SPEC.md as Python IntEnums. The numeric values are the C++
ones (include/kasmina/types.hpp): they are stored in state files and read by
the kernels, so they never change."""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    """What a seed's blueprint computes (SPEC section 3)."""

    RESIDUAL = 0
    ATTENTION = 1
    MLP = 2
    CONV = 3


class Stage(enum.IntEnum):
    """Lifecycle stage of a seed (SPEC section 7)."""

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    GRAFTING = 3
    STABILIZATION = 4
    EVALUATING = 5
    FINE_TUNING = 6
    FOSSILIZED = 7
    CULLED = 8
    CANCELLED = 9
    ROLLED_BACK = 10

    @property
    def blends(self) -> bool:
        """The seed's output mixes in its blueprint (GRAFTING .. FOSSILIZED)."""
        return Stage.GRAFTING <= self <= Stage.FOSSILIZED


class Strategy(enum.IntEnum):
    """How alpha moves while a seed is GRAFTING (SPEC section 7)."""

    FIXED_RAMP = 0
    PERFORMANCE_LINKED = 1
    DRIFT_CONTROLLED = 2
    GRAD_NORM_GATED = 3


TELEMETRY_COLUMNS = (
    "variance",
    "mean",
    "min",
    "max",
    "dead_ratio",
    "signal_to_noise",
    "nonfinite",
    "drift",
)
GRAD_STATS_COLUMNS = ("l2_norm", "variance", "max_abs")


def _coerce(enum_type, value, what: str):
    """Accept the enum, its int value or its name (any case)."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        try:
            return enum_type[value.upper()]
        except KeyError:
            names = ", ".join(m.name for m in enum_type)
            raise ValueError(f"kasmina: unknown {what} {value!r} (expected one of {names})") from None
    try:
        return enum_type(int(value))
    except (ValueError, TypeError):
        raise ValueError(
            f"kasmina: {what} must be in [0, {len(enum_type)}) or a name, got {value!r}"
        ) from None


def as_kind(value) -> Kind:
    return _coerce(Kind, value, "kind")


def as_stage(value) -> Stage:
    return _coerce(Stage, value, "stage")


def as_strategy(value) -> Strategy:
    return _coerce(Strategy, value, "strategy")
