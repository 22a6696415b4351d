"""Controllers that drive morphogenesis from the host's training loop.

A controller is any object with

    on_epoch(epoch: int, layers: Sequence[KasminaLayer], metrics: dict) -> list[Action]

The host (``kasmina.demo`` or your own loop) calls it once per epoch, *after*
each layer's ``step()`` (so the automatic transitions of SPEC section 7 have
already happened), and applies the returned actions in order with
:func:`apply_actions`. The controller only decides; the layer enforces the
lifecycle, so an action the layer refuses is reported, never half-applied.

The rules of :class:`PlateauController` are written down in docs/CONTROLLER.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import kasmina

Stage = kasmina.Stage
Kind = kasmina.Kind
Strategy = kasmina.Strategy

# Stages in which a seed's output is blended into the host (SPEC section 3).
BLENDING = frozenset({Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
                      Stage.FINE_TUNING, Stage.FOSSILIZED})
# Stages that still need decisions from the controller.
ACTIVE = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.GRAFTING,
                    Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING})

TEL = {name: i for i, name in enumerate(kasmina.TELEMETRY_COLUMNS)}
GRAD = {name: i for i, name in enumerate(kasmina.GRAD_STATS_COLUMNS)}


@dataclass
class Action:
    """One request to a layer.

    ``op`` is ``"germinate"`` (uses ``kind``, ``strategy``, ``params``) or
    ``"transition"`` (uses ``stage``). ``reason`` is shown to the user and
    logged, so say why.
    """

    op: str
    layer: int
    seed: int
    kind: Kind | None = None
    stage: Stage | None = None
    strategy: Strategy | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def describe(self) -> str:
        where = f"L{self.layer}s{self.seed}"
        if self.op == "germinate":
            what = f"germinate {where} {Kind(self.kind).name} ({Strategy(self.strategy).name})"
        else:
            what = f"{where} -> {Stage(self.stage).name}"
        return f"{what}: {self.reason}" if self.reason else what

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op, "layer": self.layer, "seed": self.seed,
            "kind": None if self.kind is None else Kind(self.kind).name,
            "stage": None if self.stage is None else Stage(self.stage).name,
            "strategy": None if self.strategy is None else Strategy(self.strategy).name,
            "params": dict(self.params), "reason": self.reason,
        }


@runtime_checkable
class Controller(Protocol):
    """What the demo needs from a controller.

    ``metrics`` holds at least ``train_loss``, ``val_loss``, ``val_acc`` (the
    held-out split the controller may look at; the test split is never
    shown to it) and ``contribution``: per layer, per seed, the held-out loss
    *without* the seed minus the loss *with* it (positive = the seed helps;
    NaN for seeds that do not blend).
    """

    def on_epoch(self, epoch: int, layers: Sequence[Any], metrics: dict[str, Any]) -> list[Action]:
        ...


class NullController:
    """Never grows anything: the host alone (the demo's baseline)."""

    def on_epoch(self, epoch, layers, metrics):  # noqa: D401 - protocol method
        return []


def apply_actions(layers: Sequence[Any], actions: Sequence[Action]) -> list[tuple[Action, str | None]]:
    """Apply actions in order. Returns (action, error message or None) pairs;
    an action the layer refuses leaves that layer unchanged (SPEC section 8)."""
    done = []
    for act in actions:
        layer = layers[act.layer]
        try:
            if act.op == "germinate":
                layer.germinate(act.seed, Kind(act.kind), strategy=Strategy(act.strategy), **act.params)
            elif act.op == "transition":
                layer.transition(act.seed, Stage(act.stage))
            else:
                raise ValueError(f"unknown action op {act.op!r}")
            done.append((act, None))
        except (ValueError, RuntimeError, TypeError) as exc:
            done.append((act, str(exc)))
    return done


class PlateauController:
    """Grow where the host is stuck; keep what helps on held-out data.

    See docs/CONTROLLER.md for the rules in prose. All thresholds are
    constructor arguments so they are easy to tune or replace.
    """

    KIND_CYCLE = (Kind.MLP, Kind.CONV, Kind.ATTENTION, Kind.RESIDUAL)
    KIND_RULES = ("record", "rotate")

    def __init__(self, *, strategy: Strategy = Strategy.FIXED_RAMP, patience: int = 2,
                 min_delta: float = 1e-3, seeds_per_plateau: int = 2, max_active: int | None = None,
                 shadow_epochs: int = 2, ramp_steps: int = 5, fine_tune_epochs: int = 2,
                 keep_margin: float = 5e-4, cull_margin: float = 5e-4, harm_patience: int = 2,
                 graft_timeout: int = 15, dead_for_residual: float = 0.5,
                 kinds: Sequence[Kind] = KIND_CYCLE, kind_rule: str = "record"):
        if kind_rule not in self.KIND_RULES:
            raise ValueError(f"kind_rule must be one of {self.KIND_RULES}, got {kind_rule!r}")
        if not kinds:
            raise ValueError("kinds must name at least one Kind")
        self.kinds = tuple(Kind(k) for k in kinds)
        self.kind_rule = kind_rule
        # Per kind: [seeds kept (FOSSILIZED), seeds culled] so far, counted
        # when the controller issues the verdict.
        self.record: dict[Kind, list[int]] = {k: [0, 0] for k in Kind}
        self.strategy = Strategy(strategy)
        self.patience = patience
        self.min_delta = min_delta
        self.seeds_per_plateau = seeds_per_plateau
        self.max_active = max_active
        self.shadow_epochs = shadow_epochs
        self.ramp_steps = ramp_steps
        self.fine_tune_epochs = fine_tune_epochs
        self.keep_margin = keep_margin
        self.cull_margin = cull_margin
        self.harm_patience = harm_patience
        self.graft_timeout = graft_timeout
        self.dead_for_residual = dead_for_residual
        self.best_val = math.inf
        self.since_best = 0
        self.germinations = 0
        self._harm: dict[tuple[int, int], int] = {}

    # -- helpers ------------------------------------------------------------
    def _plateaued(self, val_loss: float) -> bool:
        if val_loss < self.best_val - self.min_delta:
            self.best_val = val_loss
            self.since_best = 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def _strategy_params(self, layer, seed: int) -> dict[str, Any]:
        params: dict[str, Any] = {"ramp_steps": self.ramp_steps}
        if self.strategy == Strategy.GRAD_NORM_GATED:
            # The default gate [0.1, 1] assumes gradients of order one; scale
            # it around what this seed sees now so the gate means "the
            # gradient is neither vanishing nor exploding compared to today".
            g = float(layer.grad_stats[seed, GRAD["l2_norm"]])
            if math.isfinite(g) and g > 0:
                params.update(grad_norm_lower=0.1 * g, grad_norm_upper=10.0 * g)
        return params

    def _pick_kind(self, layer, seed: int) -> tuple[Kind, str]:
        tel = layer.telemetry[seed].detach().cpu()
        dead = float(tel[TEL["dead_ratio"]])
        if dead > self.dead_for_residual:
            return Kind.RESIDUAL, f"dead_ratio {dead:.2f} > {self.dead_for_residual}: a bias can revive it"
        usable = [k for k in self.kinds if not (k == Kind.CONV and layer.chunk < 3)]
        if not usable:
            return Kind.RESIDUAL, "fallback"
        if self.kind_rule == "rotate":
            return usable[self.germinations % len(usable)], "next kind in the rotation"
        # "record": the kind with the best smoothed keep rate so far,
        # (kept + 1) / (kept + culled + 2), so an untried kind scores 1/2;
        # ties go to the earlier kind of self.kinds.
        kind = max(usable, key=lambda k: (self.keep_rate(k), -usable.index(k)))
        kept, culled = self.record[kind]
        return kind, f"{kind.name} kept {kept}, culled {culled}: best keep rate {self.keep_rate(kind):.2f}"

    def keep_rate(self, kind: Kind) -> float:
        kept, culled = self.record[Kind(kind)]
        return (kept + 1) / (kept + culled + 2)

    def _verdict(self, layer, seed: int, stage: Stage) -> None:
        kind = Kind(layer.seed_info(seed)["kind"])
        if stage == Stage.FOSSILIZED:
            self.record[kind][0] += 1
        elif stage in (Stage.CULLED, Stage.ROLLED_BACK):
            self.record[kind][1] += 1

    @staticmethod
    def _contribution(metrics, li: int, s: int) -> float:
        try:
            return float(metrics["contribution"][li][s])
        except (KeyError, IndexError, TypeError):
            return math.nan

    # -- the protocol -------------------------------------------------------
    def on_epoch(self, epoch: int, layers: Sequence[Any], metrics: dict[str, Any]) -> list[Action]:
        actions: list[Action] = []
        plateau = self._plateaued(float(metrics["val_loss"]))

        # 1. Walk every active seed forward; judge blending seeds by held-out loss.
        for li, layer in enumerate(layers):
            nonfinite = layer.nonfinite_counts.detach().cpu()  # one sync per layer
            for s in range(layer.num_seeds):
                info = layer.seed_info(s)
                stage, steps = Stage(info["stage"]), int(info["steps_in_stage"])
                contrib = self._contribution(metrics, li, s)
                if stage in ACTIVE and int(nonfinite[s]) > 0:
                    target = Stage.CULLED if stage in (Stage.TRAINING, Stage.GRAFTING,
                                                       Stage.EVALUATING, Stage.FINE_TUNING) \
                        else Stage.ROLLED_BACK if stage == Stage.STABILIZATION else Stage.CANCELLED
                    actions.append(Action("transition", li, s, stage=target,
                                          reason=f"{int(nonfinite[s])} non-finite inputs"))
                    continue
                if stage == Stage.GERMINATED:
                    actions.append(Action("transition", li, s, stage=Stage.TRAINING,
                                          reason="start shadow training"))
                elif stage == Stage.TRAINING and steps >= self.shadow_epochs:
                    actions.append(Action("transition", li, s, stage=Stage.GRAFTING,
                                          reason=f"{steps} epochs of shadow training done"))
                elif stage == Stage.GRAFTING:
                    harm = self._harm.get((li, s), 0)
                    harm = harm + 1 if contrib < -self.cull_margin else 0
                    self._harm[(li, s)] = harm
                    if harm >= self.harm_patience:
                        actions.append(Action("transition", li, s, stage=Stage.CULLED,
                                              reason=f"hurts held-out loss by {-contrib:.4f} "
                                                     f"for {harm} epochs while grafting"))
                    elif steps >= self.graft_timeout:
                        actions.append(Action("transition", li, s, stage=Stage.CULLED,
                                              reason=f"alpha {info['alpha']:.2f} still short of 1 "
                                                     f"after {steps} epochs"))
                elif stage == Stage.EVALUATING:
                    if contrib > self.keep_margin:
                        actions.append(Action("transition", li, s, stage=Stage.FOSSILIZED,
                                              reason=f"lowers held-out loss by {contrib:.4f}"))
                    elif contrib < -self.cull_margin:
                        actions.append(Action("transition", li, s, stage=Stage.CULLED,
                                              reason=f"raises held-out loss by {-contrib:.4f}"))
                    else:
                        actions.append(Action("transition", li, s, stage=Stage.FINE_TUNING,
                                              reason=f"effect {contrib:+.4f} too small to call"))
                elif stage == Stage.FINE_TUNING and steps >= self.fine_tune_epochs:
                    keep = contrib > 0
                    actions.append(Action("transition", li, s,
                                          stage=Stage.FOSSILIZED if keep else Stage.CULLED,
                                          reason=f"after fine-tuning the effect is {contrib:+.4f}"))

        for act in actions:
            if act.op == "transition":
                self._verdict(layers[act.layer], act.seed, Stage(act.stage))

        # 2. Grow on a plateau: the dormant seeds where the loss is most
        #    sensitive (largest gradient norm through their chunk).
        # A seed needs about 1 + shadow + ramp + stabilisation + 1 epochs to be
        # judged; do not start one that cannot finish before training ends.
        left = int(metrics.get("epochs_total", 1 << 30)) - epoch
        if plateau and left < self.shadow_epochs + self.ramp_steps + 4:
            plateau = False
        if plateau:
            candidates = []
            for li, layer in enumerate(layers):
                stages = [Stage(st) for st in layer.stages()]
                active = sum(st in ACTIVE for st in stages)
                cap = self.max_active if self.max_active is not None else max(1, layer.num_seeds // 2)
                if active >= cap:
                    continue
                norms = layer.grad_stats.detach().cpu()[:, GRAD["l2_norm"]]
                # Normalise by the layer's mean so layers of different widths
                # and depths compete fairly.
                mean_g = float(norms.mean())
                for s, st in enumerate(stages):
                    if st != Stage.DORMANT:
                        continue
                    score = float(norms[s]) / mean_g if mean_g > 0 else 0.0
                    if math.isfinite(score):
                        candidates.append((score, li, s))
            candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
            for score, li, s in candidates[: self.seeds_per_plateau]:
                layer = layers[li]
                kind, why = self._pick_kind(layer, s)
                self.germinations += 1
                actions.append(Action("germinate", li, s, kind=kind, strategy=self.strategy,
                                      params=self._strategy_params(layer, s),
                                      reason=f"held-out loss flat for {self.since_best} epochs; "
                                             f"grad norm {score:.2f}x layer mean; {why}"))
            if candidates:
                # Give the host and the new seeds time before growing again.
                self.since_best = 0
        return actions
