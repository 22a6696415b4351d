"""kasmina: the execution layer of morphogenetic neural networks.

The kernels are C++/CUDA (kasmina._C); this package is the PyTorch front end:
custom ops (torch.ops.kasmina.forward / backward), the KasminaLayer module, and
a plain-PyTorch restatement of the same math (kasmina.reference).
"""

from . import _C
from . import _ops  # registers torch.ops.kasmina.*
from . import reference
from . import distributed  # DDP helpers, cross-rank telemetry (docs/DISTRIBUTED.md)
from . import profile  # per-kernel timing and NVTX ranges
from . import tune  # `kasmina tune`: the CUDA launch config measured per device
from .enums import GRAD_STATS_COLUMNS, TELEMETRY_COLUMNS, Kind, Stage, Strategy
from .layer import KasminaLayer
from ._ops import info

__version__ = _C.build_info()["version"]

# The winners of `kasmina tune` on this machine, if it was run (speed only).
tune.load()

__all__ = [
    "GRAD_STATS_COLUMNS",
    "TELEMETRY_COLUMNS",
    "Kind",
    "KasminaLayer",
    "Stage",
    "Strategy",
    "distributed",
    "info",
    "profile",
    "reference",
    "tune",
]
