"""KasminaLayer: the nn.Module a host network puts between two of its layers.

Who owns what:
- The C++ ``kasmina::Layer`` (``self._core``, on the host) is the source of
  truth of the lifecycle: stages, kinds, blueprint rows, strategies, step
  counters, drift window, checksums.
- ``weights [B, C]``, ``scales [B]`` and ``alpha [S]`` are Parameters (always
  float32): the optimiser trains them between lifecycle calls.
- ``seed_stage``, ``seed_kind``, ``seed_blueprint`` (int32 buffers on the
  layer's device) mirror the core, so the kernels read the seed table
  straight from device memory (no host sync on the hot path; CUDA graph safe).

Every lifecycle call pushes the Parameters into the core first (the core's
step and transitions read and write alpha, and its state file carries W and
scale), runs the call, then pulls the core's arrays back into the Parameters
and buffers. A failed call changes nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import _C, _ops
from .enums import (
    GRAD_STATS_COLUMNS,
    TELEMETRY_COLUMNS,
    Kind,
    Stage,
    Strategy,
    as_kind,
    as_stage,
    as_strategy,
)

_STRATEGY_FIELDS = ("ramp_steps", "drift_threshold", "grad_norm_lower", "grad_norm_upper")

# Bound once: each saves a module attribute lookup (or a Python frame) per call.
_eager_ok = _ops.eager_ok
# Dynamo folds this to True while it traces (so a compiled graph never sees
# the binding); in eager mode it is one frame that returns False, a third of
# torch.compiler.is_compiling(), which also asks torch.jit. Non-strict export
# and other tracing without Dynamo reach _C.layer_call, whose eager_ok tests
# (dispatch modes, functorch, jit tracing) send them on to nn.Module.__call__.
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_layer_call = _C.layer_call
_grad_enabled = torch.is_grad_enabled
_empty_like = torch.empty_like
_CONTIGUOUS = torch.contiguous_format
# torch.cuda.is_current_stream_capturing without its Python frame (absent
# from torch builds without CUDA, where no tensor is on CUDA anyway).
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing",
                     torch.cuda.is_current_stream_capturing)


class KasminaLayer(nn.Module):
    """A layer of ``num_seeds`` seeds over ``hidden`` features (SPEC.md).

    ``forward(x)`` takes ``[..., hidden]`` float32 / bfloat16 / float16 (float64
    runs the C++ float64 reference) and returns the same shape and dtype. It
    records ``telemetry`` [S, 8] and ``nonfinite_counts`` [S]; the matching
    backward records ``grad_stats`` [S, 3].
    """

    def __init__(
        self,
        hidden: int,
        num_seeds: int,
        max_blueprints: int = 64,
        *,
        dead_threshold: float = 1e-6,
        clamp: Optional[Sequence[float]] = None,
        grad_clip: Optional[float] = None,
        stabilization_steps: int = 5,
        embargo_steps: int = 5,
        backend: str = "auto",
    ):
        super().__init__()
        if clamp is not None and len(clamp) != 2:
            raise ValueError(f"kasmina: clamp must be None or (lo, hi), got {clamp!r}")
        if backend != "auto" and backend not in _ops.BACKENDS:
            raise ValueError(
                f"kasmina: backend must be one of 'auto', 'reference', 'cpu', 'cuda', got {backend!r}")
        self._config = dict(
            hidden=int(hidden),
            num_seeds=int(num_seeds),
            max_blueprints=int(max_blueprints),
            dead_threshold=float(dead_threshold),
            clamp_lo=None if clamp is None else float(clamp[0]),
            clamp_hi=None if clamp is None else float(clamp[1]),
            grad_clip=None if grad_clip is None else float(grad_clip),
            stabilization_steps=int(stabilization_steps),
            embargo_steps=int(embargo_steps),
        )
        # The core validates the configuration (ValueError naming the field).
        self._core = _C.Layer(**self._config)
        self.backend = backend

        core = self._core
        self.weights = nn.Parameter(torch.from_numpy(core.registry_weights))
        self.scales = nn.Parameter(torch.from_numpy(core.registry_scales))
        self.alpha = nn.Parameter(torch.from_numpy(core.alpha))
        # Seed table mirrored from the core; not persistent: the state
        # dictionary carries the core's checksummed bytes instead.
        self.register_buffer("seed_stage", torch.from_numpy(core.stage), persistent=False)
        self.register_buffer("seed_kind", torch.from_numpy(core.kind), persistent=False)
        self.register_buffer("seed_blueprint", torch.from_numpy(core.blueprint), persistent=False)
        # Latest forward / backward. NaN until measured: step() then holds
        # the alpha of strategies that read them (SPEC: NaN holds alpha).
        s = self.num_seeds
        self.register_buffer("telemetry", torch.full((s, len(TELEMETRY_COLUMNS)), math.nan),
                             persistent=False)
        self.register_buffer("nonfinite_counts", torch.zeros(s, dtype=torch.int64),
                             persistent=False)
        # Rows N of the latest forward (-1: none yet). Telemetry of row shards
        # can only be merged across ranks knowing each shard's N
        # (kasmina.distributed.merged_telemetry).
        self.register_buffer("telemetry_rows", torch.tensor(-1, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("grad_stats", torch.full((s, len(GRAD_STATS_COLUMNS)), math.nan),
                             persistent=False)
        # CUDA scratch, zero-filled once and kept zero by the kernels; sized
        # when the layer lands on a CUDA device (see _apply).
        self.register_buffer("workspace", torch.zeros(0, dtype=torch.uint8), persistent=False)
        # (rows, buffer, its version) of the latest eager telemetry_rows fill;
        # False once a CUDA graph captured the fill (then always filled).
        self._rows_written = None

    # --- configuration -----------------------------------------------------
    @property
    def hidden(self) -> int:
        return self._config["hidden"]

    @property
    def num_seeds(self) -> int:
        return self._config["num_seeds"]

    @property
    def chunk(self) -> int:
        return self._config["hidden"] // self._config["num_seeds"]

    @property
    def max_blueprints(self) -> int:
        return self._config["max_blueprints"]

    @property
    def clamp(self) -> Optional[tuple[float, float]]:
        lo, hi = self._config["clamp_lo"], self._config["clamp_hi"]
        return None if lo is None else (lo, hi)

    @property
    def grad_clip(self) -> Optional[float]:
        return self._config["grad_clip"]

    @property
    def dead_threshold(self) -> float:
        return self._config["dead_threshold"]

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, num_seeds={self.num_seeds}, "
                f"max_blueprints={self.max_blueprints}, backend={self.backend!r}")

    # --- the op --------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        # The common eager call (one tensor, no hooks, no gradient, nothing
        # tracing) is one binding call: _C.layer_call runs what
        # nn.Module.__call__ and forward() would on that path, reading the
        # module's dicts and torch's state at call time, and returns None for
        # everything else, which nn.Module.__call__ then takes as usual
        # (torch.compile never reaches the binding: is_compiling() is
        # constant True while it traces). Per-call cost: docs/PYTHON.md.
        if len(args) == 1 and not kwargs and args[0] is not None and not _is_compiling():
            y = _layer_call(self, args[0])
            if y is not None:
                return y
        return nn.Module.__call__(self, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters
        alpha, weights, scales = p["alpha"], p["weights"], p["scales"]
        if _eager_ok(x, alpha, weights, scales):
            if not isinstance(x, torch.Tensor):  # (an FX Proxy is not eager_ok)
                raise TypeError(f"kasmina: x must be a tensor, got {type(x).__name__}")
            # The common eager call without a gradient is one binding call
            # (no torch.library, no further Python frames): _C.layer_forward
            # reads the buffers and settings from the module's dicts at call
            # time, so there is no cache to invalidate. It returns None, having
            # done nothing, for what only _forward_eager handles (another CUDA
            # device, no exchange API, ...). Per-call cost: docs/PYTHON.md.
            if not (_grad_enabled() and (x.requires_grad or alpha.requires_grad
                                         or weights.requires_grad or scales.requires_grad)):
                if x.is_neg():  # a lazy negation view: DLPack cannot say so
                    raise ValueError("kasmina: x has its negative bit set (a lazy negation "
                                     "view); call .resolve_neg() first")
                backend = self.backend
                bufs = self._buffers
                y = _empty_like(x, memory_format=_CONTIGUOUS)
                rows = _C.layer_forward(x, y, alpha, weights, scales, bufs, self._config,
                                        backend if backend == "auto" else _ops.BACKENDS[backend])
                if rows is not None:
                    self._note_rows(x, rows, bufs["telemetry_rows"])
                    return y
                return self._forward_eager(x, alpha, weights, scales, self._buffers, False)
            return self._forward_eager(x, alpha, weights, scales, self._buffers, True)
        # Traced (torch.compile, export, make_fx, ...): the registered op.
        c = self._config
        ws = self.workspace if self.workspace.device.type == "cuda" else None
        y, telemetry, nonfinite = torch.ops.kasmina.forward(
            x, self.seed_stage, self.seed_kind, self.seed_blueprint, alpha, weights,
            scales, ws, self.grad_stats, c["dead_threshold"], c["clamp_lo"], c["clamp_hi"],
            c["grad_clip"], self.backend)
        # Buffer copies (not attribute rebinding) so torch.compile keeps them
        # in the graph as ordinary buffer mutations.
        self.telemetry.copy_(telemetry)
        self.nonfinite_counts.copy_(nonfinite)
        self.telemetry_rows.fill_(x.numel() // self.hidden)
        return y

    def _forward_eager(self, x, alpha, weights, scales, bufs, needs_grad: bool) -> torch.Tensor:
        """Eager call: no torch.library dispatch, telemetry and counts written
        straight into the buffers (the binding checks every tensor before
        anything is written), the rows buffer filled only when it changes.
        With a gradient through EagerForward; without one this is the path
        for what _C.layer_forward leaves to Python."""
        c = self._config
        ws = bufs["workspace"]
        is_cuda = x.is_cuda
        if self.backend == "auto":
            b = _ops._CUDA if is_cuda else (
                _ops._REFERENCE if x.dtype == torch.float64 else _ops._CPU)
        else:
            b = _ops.BACKENDS[self.backend]
        y = _ops.forward_into(
            x, bufs["seed_stage"], bufs["seed_kind"], bufs["seed_blueprint"], alpha, weights,
            scales, ws if ws.is_cuda else None, bufs["grad_stats"], bufs["telemetry"],
            bufs["nonfinite_counts"], c["dead_threshold"], c["clamp_lo"], c["clamp_hi"],
            c["grad_clip"], b, needs_grad)
        self._note_rows(x, x.numel() // c["hidden"], bufs["telemetry_rows"])
        return y

    def _note_rows(self, x, rows: int, rows_buf) -> None:
        # Skip the fill (a kernel launch on CUDA) when this very buffer already
        # holds rows and nobody wrote it since (its version counter). A CUDA
        # graph capture records the fill, and from then on always fills: a
        # replay writes the buffer without bumping its version.
        last = self._rows_written
        if last is False or (x.is_cuda and _capturing()):
            rows_buf.fill_(rows)
            self._rows_written = False
        elif (last is None or last[0] != rows or last[1] is not rows_buf
              or last[2] != _version(rows_buf) or last[2] is None):
            rows_buf.fill_(rows)
            self._rows_written = (rows, rows_buf, _version(rows_buf))

    # --- lifecycle -----------------------------------------------------------
    def germinate(
        self,
        seed: int,
        kind: Union[Kind, int, str],
        blueprint: int = 0,
        *,
        strategy: Union[Strategy, int, str] = Strategy.FIXED_RAMP,
        ramp_steps: int = 30,
        drift_threshold: float = 0.12,
        grad_norm_lower: float = 0.1,
        grad_norm_upper: float = 1.0,
    ) -> int:
        """DORMANT -> GERMINATED; returns the seed's registry row (a fresh one,
        initialised near identity, when blueprint = 0)."""
        kind = as_kind(kind)
        strategy = as_strategy(strategy)
        return self._lifecycle(self._core.germinate, int(seed), int(kind), int(blueprint),
                               int(strategy), int(ramp_steps), float(drift_threshold),
                               float(grad_norm_lower), float(grad_norm_upper))

    def transition(self, seed: int, stage: Union[Stage, int, str]) -> None:
        """Requested transition; refused (ValueError naming both stages and the
        allowed targets) when SPEC section 7 does not allow it."""
        self._lifecycle(self._core.transition, int(seed), int(as_stage(stage)))

    def set_strategy(self, seed: int, strategy: Union[Strategy, int, str], **params) -> None:
        """Strategy and its parameters (ramp_steps, drift_threshold,
        grad_norm_lower, grad_norm_upper); parameters not given keep their
        current values."""
        unknown = set(params) - set(_STRATEGY_FIELDS)
        if unknown:
            raise TypeError(f"kasmina: unknown strategy parameter(s) {sorted(unknown)}; "
                            f"expected {list(_STRATEGY_FIELDS)}")
        seed = int(seed)
        self._check_seed(seed)
        current = {f: getattr(self._core, f)[seed].item() for f in _STRATEGY_FIELDS}
        current.update(params)
        self._lifecycle(self._core.set_strategy, seed, int(as_strategy(strategy)),
                        int(current["ramp_steps"]), float(current["drift_threshold"]),
                        float(current["grad_norm_lower"]), float(current["grad_norm_upper"]))

    def step(self, loss, grad_norm=None, drift=None) -> None:
        """Controller step (SPEC section 7). loss: a float for every seed, or S
        floats (NaN = not measured). grad_norm defaults to grad_stats[:, 0] of
        the latest backward; drift defaults to the latest forward's telemetry
        column 7 (kasmina.distributed passes the drift merged over all ranks)."""
        loss = self._per_seed(loss, "loss")
        if grad_norm is None:
            grad_norm = self.grad_stats[:, 0]
        grad_norm = self._per_seed(grad_norm, "grad_norm")
        if drift is None:
            drift = self.telemetry[:, 7]
        drift = self._per_seed(drift, "drift")
        self._lifecycle(self._core.step, loss, grad_norm, drift)

    def _per_seed(self, value, name: str) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float32).numpy()
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim == 0:
            return np.full(self.num_seeds, arr.item(), dtype=np.float32)
        arr = np.ascontiguousarray(arr.reshape(-1))
        if arr.shape[0] != self.num_seeds:
            raise ValueError(f"kasmina: {name} must be a float or {self.num_seeds} floats "
                             f"(one per seed), got {arr.shape[0]}")
        return arr

    def _check_seed(self, seed: int) -> None:
        if not 0 <= seed < self.num_seeds:
            raise ValueError(f"kasmina: seed must be in [0, {self.num_seeds}), got {seed}")

    def _push(self) -> None:
        """Parameters -> core (what the optimiser did to alpha, W and scale)."""
        with torch.no_grad():
            self._core.set_alpha(self.alpha.detach().to("cpu", torch.float32).numpy())
            self._core.set_registry_values(
                self.weights.detach().to("cpu", torch.float32).reshape(-1).numpy(),
                self.scales.detach().to("cpu", torch.float32).numpy())

    def _pull(self) -> None:
        """Core -> Parameters and seed-table buffers, in place (optimisers and
        compiled graphs keep referring to the same tensors)."""
        core = self._core
        with torch.no_grad():
            self.alpha.copy_(torch.from_numpy(core.alpha))
            self.weights.copy_(torch.from_numpy(core.registry_weights))
            self.scales.copy_(torch.from_numpy(core.registry_scales))
            self.seed_stage.copy_(torch.from_numpy(core.stage))
            self.seed_kind.copy_(torch.from_numpy(core.kind))
            self.seed_blueprint.copy_(torch.from_numpy(core.blueprint))

    def _lifecycle(self, fn, *args):
        self._push()
        result = fn(*args)  # throws with the core unchanged
        self._pull()
        return result

    # --- reading the state ---------------------------------------------------
    def stage(self, seed: int) -> Stage:
        self._check_seed(int(seed))
        return Stage(int(self._core.stage[int(seed)]))

    def stages(self) -> list[Stage]:
        return [Stage(int(s)) for s in self._core.stage]

    def seed_info(self, seed: int) -> dict:
        seed = int(seed)
        self._check_seed(seed)
        core = self._core
        return dict(
            stage=Stage(int(core.stage[seed])),
            kind=Kind(int(core.kind[seed])),
            blueprint=int(core.blueprint[seed]),
            alpha=float(self.alpha[seed].detach().cpu()),
            steps_in_stage=int(core.steps_in_stage[seed]),
            strategy=Strategy(int(core.strategy[seed])),
        )

    def report(self) -> str:
        """Readable per-seed table: lifecycle, telemetry of the latest forward,
        gradient statistics of the latest backward."""
        core = self._core
        tel = self.telemetry.detach().cpu()
        gs = self.grad_stats.detach().cpu()
        alpha = self.alpha.detach().cpu()
        head = (f"{'seed':>4} {'stage':<13} {'kind':<9} {'bp':>3} {'alpha':>6} {'steps':>5} "
                f"{'mean':>10} {'var':>10} {'min':>10} {'max':>10} {'dead':>6} {'snr':>8} "
                f"{'nonfin':>6} {'drift':>8} {'g_l2':>10} {'g_var':>10} {'g_max':>10}")
        lines = [f"KasminaLayer(hidden={self.hidden}, num_seeds={self.num_seeds}, "
                 f"chunk={self.chunk}, max_blueprints={self.max_blueprints})", head]
        for s in range(self.num_seeds):
            st = Stage(int(core.stage[s]))
            bp = int(core.blueprint[s])
            kind = Kind(int(core.kind[s])).name if st != Stage.DORMANT else "-"
            t = tel[s].tolist()
            g = gs[s].tolist()
            lines.append(
                f"{s:>4} {st.name:<13} {kind:<9} {bp:>3} {float(alpha[s]):>6.3f} "
                f"{int(core.steps_in_stage[s]):>5} {t[1]:>10.4g} {t[0]:>10.4g} {t[2]:>10.4g} "
                f"{t[3]:>10.4g} {t[4]:>6.3f} {t[5]:>8.3g} {int(self.nonfinite_counts[s]):>6} "
                f"{t[7]:>8.4f} {g[0]:>10.4g} {g[1]:>10.4g} {g[2]:>10.4g}")
        return "\n".join(lines)

    # --- state I/O -----------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The core's versioned, checksummed state file (uint8)."""
        self._push()
        blob = self._core.save()
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self._core.load(_as_bytes(state))
        # A state file carries its configuration (clamp, clip, thresholds).
        self._config = dict(self._core.config)
        self._pull()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # All or nothing: validate the core bytes (checksums, version, shapes)
        # and the Parameter entries against them before anything is copied.
        key = prefix + "_extra_state"
        if key not in state_dict:
            error_msgs.append(f"kasmina: {key!r} (the layer's checksummed core state) is missing; "
                              "the layer was left unchanged")
            return
        probe = _C.Layer(**self._config)
        try:
            probe.load(_as_bytes(state_dict[key]))
        except (ValueError, TypeError, RuntimeError) as e:
            error_msgs.append(f"{e} (the layer was left unchanged)")
            return
        expected = {"weights": probe.registry_weights, "scales": probe.registry_scales,
                    "alpha": probe.alpha}
        for name, want in expected.items():
            k = prefix + name
            got = state_dict.get(k)
            if got is None:
                error_msgs.append(f"kasmina: {k!r} is missing; the layer was left unchanged")
                return
            if tuple(got.shape) != want.shape or got.dtype != torch.float32:
                error_msgs.append(
                    f"kasmina: {k!r} must be float32 of shape {list(want.shape)}, got "
                    f"{str(got.dtype).replace('torch.', '')} of shape {list(got.shape)}; "
                    "the layer was left unchanged")
                return
            if got.detach().cpu().contiguous().numpy().tobytes() != want.tobytes():
                error_msgs.append(f"kasmina: {k!r} disagrees with the checksummed core state; "
                                  "the layer was left unchanged")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # --- device and dtype moves ----------------------------------------------
    def _apply(self, fn, recurse=True):
        # .half(), .to(dtype) and friends must not cast the seed table, the
        # float32 registry/alpha or the telemetry (SPEC section 2): keep every
        # tensor's dtype and take only the device from fn.
        def keep_dtype(t):
            moved = fn(t)
            if moved.dtype != t.dtype:
                moved = t.to(device=moved.device)
            return moved

        super()._apply(keep_dtype, recurse)
        self._size_workspace()
        return self

    def _size_workspace(self) -> None:
        dev = self.weights.device
        if dev.type != "cuda":
            return
        with torch.cuda.device(dev):
            nbytes = _C.workspace_bytes(self.hidden, self.num_seeds, self.max_blueprints,
                                        _ops.BACKENDS["cuda"])
        if self.workspace.device != dev or self.workspace.numel() != nbytes:
            self.workspace = torch.zeros(nbytes, dtype=torch.uint8, device=dev)

    # --- pickling (copy.deepcopy, torch.save of the whole module) -------------
    def __getstate__(self):
        self._push()
        state = self.__dict__.copy()
        state["_core"] = self._core.save()
        state["_rows_written"] = None
        return state

    def __setstate__(self, state):
        blob = state["_core"]
        core = _C.Layer(**state["_config"])
        core.load(_as_bytes(blob))
        state["_core"] = core
        state["_rows_written"] = None
        super().__setstate__(state)


# layer_call stands for this forward (and falls back where a subclass or an
# instance replaces it).
_C._set_layer_forward(KasminaLayer.forward, nn.Module)


def _version(t: torch.Tensor):
    # An inference tensor has no version counter: never "unchanged".
    try:
        return t._version
    except RuntimeError:
        return None


def _as_bytes(state) -> np.ndarray:
    if isinstance(state, torch.Tensor):
        if state.dtype != torch.uint8 or state.dim() != 1:
            raise TypeError(f"kasmina: core state must be a 1-D uint8 tensor, got "
                            f"{state.dtype} of shape {list(state.shape)}")
        return state.detach().cpu().contiguous().numpy()
    if isinstance(state, (bytes, bytearray, memoryview)):
        return np.frombuffer(state, dtype=np.uint8)
    raise TypeError(f"kasmina: core state must be bytes or a uint8 tensor, got {type(state).__name__}")
