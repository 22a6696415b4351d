"""`kasmina demo`: grow a network on real data and compare it with the host alone.

The data set is scikit-learn's 8x8 digits (it ships inside the package, so no
network is needed). The host is linear, with two KasminaLayers:

    64 -> Linear(64, H) -> KasminaLayer(H, S)
       -> Linear(H, H/2) -> KasminaLayer(H/2, S) -> Linear(H/2, 10)

so until seeds graft in it is a linear classifier; MLP seeds
(sigma * relu(X * w)) add the nonlinearity it lacks (``host="mlp"`` puts a
ReLU before each KasminaLayer instead).

The same host, with the same initial weights, data order and epochs, is
trained twice: once driven by a controller (default
:class:`kasmina.controller.PlateauController`) and once with no seeds ever
germinated (the baseline). See docs/DEMO.md for how to read the output.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import kasmina
from kasmina.controller import (BLENDING, Controller, NullController, PlateauController,
                                apply_actions)

Stage = kasmina.Stage
Strategy = kasmina.Strategy

STAGE_CHAR = {
    Stage.DORMANT: ".", Stage.GERMINATED: "g", Stage.TRAINING: "t", Stage.GRAFTING: "G",
    Stage.STABILIZATION: "S", Stage.EVALUATING: "E", Stage.FINE_TUNING: "F",
    Stage.FOSSILIZED: "#", Stage.CULLED: "x", Stage.CANCELLED: "c", Stage.ROLLED_BACK: "r",
}


@dataclass
class DemoConfig:
    epochs: int = 40
    strategy: str = "FIXED_RAMP"
    seeds: int = 8
    hidden: int = 128
    device: str = "auto"
    out: str = "./kasmina-out"
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    alpha_lr: float = 1e-3
    lr_schedule: str = "cosine"  # or "constant"
    ramp_steps: int = 5
    stabilization_steps: int = 2
    embargo_steps: int = 3
    patience: int = 2
    shadow_epochs: int = 2
    # Fractions of the data: train / validation (controller) / test (report).
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    progress: bool = True
    baseline: bool = True
    # Extra runs with seeds seed+1 .. seed+repeats-1 (grown and host only) for
    # a mean and spread of the comparison; the figure shows the first run.
    repeats: int = 1
    figure: bool = True
    # "linear": no activation in the host (growth can add what it lacks);
    # "mlp": ReLU before each KasminaLayer (the host is already nonlinear).
    host: str = "linear"
    # PlateauController settings the demo passes (see docs/CONTROLLER.md).
    # Grow wide: on a plateau germinate up to 8 seeds, and let every seed of
    # a layer be active at once (None = --seeds).
    seeds_per_plateau: int = 8
    max_active: int | None = None
    harm_patience: int = 3


# --------------------------------------------------------------------------
# data and model

def load_data(seed: int, split=(0.6, 0.2, 0.2)):
    """Digits, scaled to [0, 1], split deterministically by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    perm = np.random.RandomState(seed).permutation(len(x))
    n_train = int(round(split[0] * len(x)))
    n_val = int(round(split[1] * len(x)))
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
             "test": perm[n_train + n_val:]}
    return {k: (torch.from_numpy(x[idx]), torch.from_numpy(y[idx])) for k, idx in parts.items()}


class HostMLP(nn.Module):
    """Two Linear stages, each followed by a KasminaLayer, and a Linear head.

    ``host="linear"`` (the demo's default) has no activation between the
    stages, so with every seed DORMANT the network is a linear classifier;
    ``host="mlp"`` puts a ReLU before each KasminaLayer.
    """

    HOSTS = ("linear", "mlp")

    def __init__(self, hidden: int, seeds: int, *, stabilization_steps: int, embargo_steps: int,
                 host: str = "linear"):
        super().__init__()
        if host not in self.HOSTS:
            raise ValueError(f"host must be one of {self.HOSTS}, got {host!r}")
        self.host = host
        if hidden % 2 or (hidden // 2) % seeds or hidden % seeds:
            raise ValueError(f"--hidden {hidden} must be even and hidden and hidden/2 divisible "
                             f"by --seeds {seeds}")
        h2 = hidden // 2
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, h2)
        self.head = nn.Linear(h2, 10)
        kw = dict(stabilization_steps=stabilization_steps, embargo_steps=embargo_steps)
        self.k1 = kasmina.KasminaLayer(hidden, seeds, **kw)
        self.k2 = kasmina.KasminaLayer(h2, seeds, **kw)

    @property
    def kasmina_layers(self):
        return [self.k1, self.k2]

    def forward(self, x):
        act = torch.relu if self.host == "mlp" else (lambda t: t)
        h = self.k1(act(self.fc1(x)))
        h = self.k2(act(self.fc2(h)))
        return self.head(h)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kasmina demo: --device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------
# training

@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    model.train()
    return loss, acc


@torch.no_grad()
def contributions(model, x, y, base_loss: float) -> list[list[float]]:
    """Per layer, per seed: held-out loss with the seed's alpha set to 0 (its
    output becomes a copy of its input) minus the loss with it. NaN for seeds
    that do not blend."""
    out = []
    for layer in model.kasmina_layers:
        row = []
        for s, st in enumerate(layer.stages()):
            if Stage(st) not in BLENDING:
                row.append(math.nan)
                continue
            saved = layer.alpha[s].clone()
            layer.alpha[s] = 0.0
            loss, _ = evaluate(model, x, y)
            layer.alpha[s] = saved
            row.append(loss - base_loss)
        out.append(row)
    return out


def make_optimizer(model: HostMLP, cfg: DemoConfig) -> torch.optim.Optimizer:
    host, seeds, alphas = [], [], []
    for name, p in model.named_parameters():
        if name.endswith("alpha"):
            alphas.append(p)
        elif name.startswith("k"):
            seeds.append(p)
        else:
            host.append(p)
    return torch.optim.Adam([
        {"params": host, "lr": cfg.lr},
        {"params": seeds, "lr": cfg.lr},
        {"params": alphas, "lr": cfg.alpha_lr},
    ])


class Progress:
    """A plain-text progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.drawn = 0.0

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.drawn < 0.1 and done < self.total:
            return  # redraw at most ten times a second
        self.drawn = now
        width = 30
        fill = int(width * done / max(1, self.total))
        el = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] "
                         f"{done}/{self.total} {el:5.1f}s {note}\x1b[K")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def train(cfg: DemoConfig, controller: Controller, data, device: torch.device, *, label: str,
          log: Callable[[str], None]) -> dict[str, Any]:
    """Train the host with ``controller``; return the per-epoch history."""
    seed_everything(cfg.seed)
    model = HostMLP(cfg.hidden, cfg.seeds, stabilization_steps=cfg.stabilization_steps,
                    embargo_steps=cfg.embargo_steps, host=cfg.host).to(device)
    opt = make_optimizer(model, cfg)
    net = kasmina.distributed.wrap(model)  # DDP under torchrun (docs/DISTRIBUTED.md)
    # Cosine decay of every group's learning rate over the run (both runs
    # alike), so the last epoch, which the comparison reports, is a settled one.
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
             if cfg.lr_schedule == "cosine" else None)
    xtr, ytr = (t.to(device) for t in data["train"])
    xva, yva = (t.to(device) for t in data["val"])
    xte, yte = (t.to(device) for t in data["test"])
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = model.kasmina_layers
    n = len(xtr)
    batches = math.ceil(n / cfg.batch_size)

    epochs, seed_hist, events = [], [[{"stage": [], "alpha": [], "kind": []}
                                       for _ in range(l.num_seeds)] for l in layers], []
    bar = Progress(cfg.epochs * batches, label, cfg.progress)
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        tot_loss, tot_correct = 0.0, 0
        for b in range(batches):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            idx = kasmina.distributed.shard(idx)  # this rank's rows of the batch
            xb, yb = xtr[idx], ytr[idx]
            logits = net(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * len(idx)
            tot_correct += int((logits.argmax(1) == yb).sum())
            bar.update((epoch - 1) * batches + b + 1, f"epoch {epoch}")
        tot_loss, tot_correct = kasmina.distributed.all_sum([tot_loss, tot_correct])
        train_loss, train_acc = tot_loss / n, tot_correct / n
        if sched is not None:
            sched.step()
        val_loss, val_acc = evaluate(model, xva, yva)
        test_loss, test_acc = evaluate(model, xte, yte)
        contrib = contributions(model, xva, yva, val_loss)

        for layer in layers:
            kasmina.distributed.step(layer, val_loss)  # = layer.step(val_loss) on one rank
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "contribution": contrib,
                   "epochs_total": cfg.epochs}
        # Under torchrun every rank applies rank 0's decisions (lock step).
        actions = kasmina.distributed.broadcast_object(controller.on_epoch(epoch, layers, metrics))
        before = [Stage(layers[a.layer].stage(a.seed)).name
                  if 0 <= a.layer < len(layers) and 0 <= a.seed < layers[a.layer].num_seeds
                  else None for a in actions]
        applied = apply_actions(layers, actions)
        _reset_optimizer_state(opt, layers, applied)
        ev = []
        for (act, err), frm in zip(applied, before):
            rec = act.to_json() | {"epoch": epoch, "from": frm, "error": err}
            events.append(rec)
            ev.append(act.describe() + (f" [refused: {err}]" if err else ""))

        stage_str = []
        for li, layer in enumerate(layers):
            chars = ""
            for s in range(layer.num_seeds):
                info = layer.seed_info(s)
                st = Stage(info["stage"])
                h = seed_hist[li][s]
                h["stage"].append(st.name)
                # The effective blend factor a = clamp(alpha, 0, 1) (SPEC section 1);
                # the optimiser may push the raw parameter a little past 1.
                h["alpha"].append(min(max(float(info["alpha"]), 0.0), 1.0))
                h["kind"].append(kasmina.Kind(info["kind"]).name)
                chars += STAGE_CHAR[st]
            stage_str.append(f"L{li}[{chars}]")
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
               "test_acc": test_acc, "time_s": time.perf_counter() - te,
               "contribution": [[None if math.isnan(c) else c for c in r] for r in contrib],
               "actions": ev}
        epochs.append(row)
        bar.clear()
        log(f"{label} {epoch:3d}/{cfg.epochs}  train {train_loss:.4f}  val {val_loss:.4f} "
            f"({100 * val_acc:5.1f}%)  test {100 * test_acc:5.1f}%  {' '.join(stage_str)}")
        for e in ev:
            log(f"        {e}")
    bar.clear()
    n_params = sum(p.numel() for p in model.parameters())
    return {"epochs": epochs, "seeds": seed_hist, "events": events,
            "report": [layer.report() for layer in layers],
            "wall_s": time.perf_counter() - t0, "parameters": n_params,
            "seed_parameters": _seed_parameters(layers)}


def _reset_optimizer_state(opt, layers, applied) -> None:
    """Zero Adam's moments for the registry rows and alphas an action touched.

    Adam keeps moving a parameter on its momentum even when its gradient is
    zero; without this a fossilised seed would keep drifting for a while and a
    freed row would carry a dead seed's momentum into the next germination.
    """
    for act, err in applied:
        if err is not None:
            continue
        layer = layers[act.layer]
        row = int(layer.seed_info(act.seed)["blueprint"])
        for p, index in ((layer.weights, row), (layer.scales, row), (layer.alpha, act.seed)):
            state = opt.state.get(p)
            if not state:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0


def _seed_parameters(layers) -> int:
    """Trainable values the grown seeds use (blueprint rows + scales + alpha)."""
    total = 0
    for layer in layers:
        rows = set()
        for s in range(layer.num_seeds):
            info = layer.seed_info(s)
            if Stage(info["stage"]) in BLENDING and info["blueprint"]:
                rows.add(int(info["blueprint"]))
                total += 1  # alpha
        total += len(rows) * (layer.chunk + 1)
    return total


# --------------------------------------------------------------------------
# outputs

def _final(hist: dict[str, Any]) -> dict[str, float]:
    last = hist["epochs"][-1]
    return {k: last[k] for k in ("test_acc", "test_loss", "val_acc", "val_loss",
                                 "train_acc", "train_loss")}


def comparison(grown: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    out = {"grown": _final(grown) | {"parameters": grown["parameters"],
                                     "seed_parameters": grown["seed_parameters"]}}
    if base is not None:
        out["baseline"] = _final(base) | {"parameters": base["parameters"]}
        out["delta"] = {k: out["grown"][k] - out["baseline"][k]
                        for k in ("test_acc", "test_loss", "val_acc", "val_loss")}
    return out


def comparison_table(cmp: dict[str, Any]) -> str:
    g, b = cmp["grown"], cmp.get("baseline")
    lines = [f"{'':22s}{'grown':>10s}" + (f"{'host only':>12s}{'delta':>10s}" if b else "")]
    for key, name, pct in (("test_acc", "test accuracy", True), ("test_loss", "test loss", False),
                           ("val_acc", "held-out accuracy", True), ("val_loss", "held-out loss", False)):
        fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")
        line = f"{name:22s}{fmt(g[key]):>10s}"
        if b:
            d = cmp["delta"][key]
            line += f"{fmt(b[key]):>12s}" + (f"{100 * d:+9.2f}pp" if pct else f"{d:+10.4f}")
        lines.append(line)
    lines.append(f"{'parameters':22s}{g['parameters']:>10d}" + (f"{b['parameters']:>12d}" if b else ""))
    return "\n".join(lines)


def summarize_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over runs with different seeds; how often growing won."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "runs": runs}
    for key, lower_better in (("test_acc", False), ("test_loss", True)):
        g = np.array([r["grown"][key] for r in runs])
        b = np.array([r["baseline"][key] for r in runs])
        d = g - b
        out[key] = {"grown_mean": float(g.mean()), "grown_std": float(g.std(ddof=1)),
                    "baseline_mean": float(b.mean()), "baseline_std": float(b.std(ddof=1)),
                    "delta_mean": float(d.mean()), "delta_std": float(d.std(ddof=1)),
                    "grown_better": int(((d < 0) if lower_better else (d > 0)).sum()),
                    "baseline_better": int(((d > 0) if lower_better else (d < 0)).sum())}
    return out


def repeats_table(rep: dict[str, Any]) -> str:
    n = len(rep["seeds"])
    lines = [f"over {n} seeds ({', '.join(map(str, rep['seeds']))}): mean +- std",
             f"{'':16s}{'grown':>18s}{'host only':>18s}{'delta':>18s}{'wins grown/host':>17s}"]
    for key, name, scale, unit in (("test_acc", "test accuracy", 100, "%"),
                                   ("test_loss", "test loss", 1, "")):
        r = rep[key]
        fmt = (lambda m, s: f"{scale * m:.2f}{unit} +- {scale * s:.2f}") if unit else \
            (lambda m, s: f"{m:.4f} +- {s:.4f}")
        delta = fmt(r["delta_mean"], r["delta_std"]).replace("%", "pp")
        lines.append(f"{name:16s}{fmt(r['grown_mean'], r['grown_std']):>18s}"
                     f"{fmt(r['baseline_mean'], r['baseline_std']):>18s}"
                     f"{delta:>18s}"
                     f"{str(r['grown_better']) + '/' + str(r['baseline_better']):>17s}")
    return "\n".join(lines)


def write_figure(path: str, grown: dict[str, Any], base: dict[str, Any] | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ep = [r["epoch"] for r in grown["epochs"]]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    for key, style in (("train_loss", ":"), ("val_loss", "-"), ("test_loss", "--")):
        ax.plot(ep, [r[key] for r in grown["epochs"]], style, color="C0", label=f"grown {key}")
        if base:
            ax.plot(ep, [r[key] for r in base["epochs"]], style, color="C1", label=f"host only {key}")
    grow = sorted({e["epoch"] for e in grown["events"] if e["op"] == "germinate" and not e["error"]})
    for e in grow:
        ax.axvline(e, color="0.6", lw=0.8, ls=":")
    ax.set_yscale("log"); ax.set_xlabel("epoch"); ax.legend(fontsize=7)
    ax.set_title("loss (dotted verticals: germinations)")
    ax = axes[0][1]
    for key, style in (("val_acc", "-"), ("test_acc", "--")):
        ax.plot(ep, [100 * r[key] for r in grown["epochs"]], style, color="C0", label=f"grown {key}")
        if base:
            ax.plot(ep, [100 * r[key] for r in base["epochs"]], style, color="C1",
                    label=f"host only {key}")
    ax.set_title("accuracy (%)"); ax.set_xlabel("epoch"); ax.legend(fontsize=7)

    ax = axes[1][0]
    rows = []  # (label, history) of seeds that ever left DORMANT
    for li, layer_hist in enumerate(grown["seeds"]):
        for s, h in enumerate(layer_hist):
            if any(st != "DORMANT" for st in h["stage"]):
                rows.append((f"L{li}s{s}", h))
    for i, (name, h) in enumerate(rows):
        ax.plot(ep, h["alpha"], color=f"C{i % 10}", label=name)
    ax.set_ylim(-0.05, 1.05); ax.set_title("alpha per seed"); ax.set_xlabel("epoch")
    if rows:
        ax.legend(fontsize=7, ncol=2)

    ax = axes[1][1]
    colours = dict(zip([st.name for st in Stage], [
        "#e0e0e0", "#c6dbef", "#6baed6", "#fd8d3c", "#fdd0a2", "#9e9ac8", "#bcbd22",
        "#31a354", "#de2d26", "#969696", "#8c564b"]))
    for i, (name, h) in enumerate(rows):
        for e, st in zip(ep, h["stage"]):
            ax.barh(i, 1, left=e - 0.5, color=colours[st], edgecolor="none")
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.set_xlabel("epoch"); ax.set_title("stage timeline")
    seen = sorted({st for _, h in rows for st in h["stage"]}, key=lambda n: Stage[n])
    ax.legend(handles=[Patch(color=colours[n], label=n) for n in seen], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("kasmina demo: digits, grown vs host only")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(cfg: DemoConfig, controller: Controller | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; write ``demo.json`` and ``demo.png`` into ``cfg.out``.
    Returns the JSON log as a dict (with the paths under ``files``)."""
    if not kasmina.distributed.is_main_process():
        log = lambda _m: None  # noqa: E731  (torchrun: rank 0 speaks)
    device = resolve_device(cfg.device)
    strategy = Strategy[cfg.strategy.upper()] if isinstance(cfg.strategy, str) else Strategy(cfg.strategy)
    if controller is None:
        controller = PlateauController(strategy=strategy, ramp_steps=cfg.ramp_steps,
                                       patience=cfg.patience, shadow_epochs=cfg.shadow_epochs,
                                       seeds_per_plateau=cfg.seeds_per_plateau,
                                       max_active=cfg.max_active if cfg.max_active is not None
                                       else cfg.seeds, harm_patience=cfg.harm_patience)
    if not callable(getattr(controller, "on_epoch", None)):
        raise TypeError("the controller needs an on_epoch(epoch, layers, metrics) method")
    pristine = copy.deepcopy(controller)  # for the repeats: controllers keep state
    data = load_data(cfg.seed, cfg.split)
    log(f"kasmina demo: digits 8x8, {len(data['train'][0])} train / {len(data['val'][0])} held-out "
        f"(controller) / {len(data['test'][0])} test, {cfg.host} host, hidden {cfg.hidden}, {cfg.seeds} seeds per "
        f"layer, strategy {strategy.name}, device {device}, seed {cfg.seed}")
    log(f"stages: {' '.join(f'{c}={s.name}' for s, c in STAGE_CHAR.items())}")
    t0 = time.perf_counter()
    # Batches of 32 x 128 are far too small to gain from threads; on a busy
    # machine the threads' spin-waits make every op many times slower.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    repeats = []
    try:
        grown = train(cfg, controller, data, device, label="grown", log=log)
        base = None
        if cfg.baseline:
            log("training the same host without seeds for the comparison ...")
            base = train(cfg, NullController(), data, device, label="host ", log=lambda _m: None)
        if cfg.baseline and cfg.repeats > 1:
            quiet = lambda _m: None  # noqa: E731
            for k in range(1, cfg.repeats):
                rcfg = replace(cfg, seed=cfg.seed + k)
                log(f"repeat {k + 1}/{cfg.repeats}: seed {rcfg.seed}, grown and host only ...")
                rdata = load_data(rcfg.seed, rcfg.split)
                g = train(rcfg, copy.deepcopy(pristine), rdata, device, label="grown", log=quiet)
                b = train(rcfg, NullController(), rdata, device, label="host ", log=quiet)
                repeats.append(comparison(g, b) | {"seed": rcfg.seed})
    finally:
        torch.set_num_threads(threads)
    cmp = comparison(grown, base)
    if repeats:
        cmp["repeats"] = summarize_repeats([cmp | {"seed": cfg.seed}] + repeats)

    log("")
    for li, rep in enumerate(grown["report"]):
        log(f"layer {li} ({grown_layer_desc(cfg, li)}):")
        log(rep)
    log("")
    log(comparison_table(cmp))
    if "delta" in cmp:
        d = cmp["delta"]
        better = lambda v, lower_better: "same" if v == 0 else (  # noqa: E731
            "grown better" if (v < 0) == lower_better else "host only better")
        log(f"on test data: accuracy {100 * d['test_acc']:+.2f}pp ({better(d['test_acc'], False)}), "
            f"loss {d['test_loss']:+.4f} ({better(d['test_loss'], True)}); one run - compare "
            "several --seed values (--repeats) before drawing conclusions")
    if "repeats" in cmp:
        log("")
        log(repeats_table(cmp["repeats"]))

    os.makedirs(cfg.out, exist_ok=True)
    json_path = os.path.join(cfg.out, "demo.json")
    png_path = os.path.join(cfg.out, "demo.png")
    result = {
        "kasmina_version": getattr(kasmina, "__version__", "unknown"),
        "config": asdict(cfg) | {"strategy": strategy.name, "device_resolved": str(device)},
        "seed": cfg.seed,
        "world_size": kasmina.distributed.world_size(),
        "controller": type(controller).__name__,
        "data": {k: len(v[0]) for k, v in data.items()},
        "epochs": grown["epochs"],
        "seeds": grown["seeds"],
        "events": grown["events"],
        "report": grown["report"],
        "baseline_epochs": base["epochs"] if base else None,
        "comparison": cmp,
        "wall_s": {"grown": grown["wall_s"], "baseline": base["wall_s"] if base else None,
                   "total": time.perf_counter() - t0},
        "files": {"json": json_path, "png": png_path if cfg.figure else None},
    }
    main = kasmina.distributed.is_main_process()  # one writer under torchrun
    if cfg.figure and main:
        write_figure(png_path, grown, base)
    if main:
        with open(json_path, "w") as f:
            json.dump(_clean(result), f, indent=1, allow_nan=False, default=_json_default)
    log("")
    log(f"wrote {json_path}" + (f" and {png_path}" if cfg.figure else "") +
        f" ({result['wall_s']['total']:.1f}s)")
    return result


def grown_layer_desc(cfg: DemoConfig, li: int) -> str:
    h = cfg.hidden if li == 0 else cfg.hidden // 2
    return f"hidden {h}, {cfg.seeds} seeds of {h // cfg.seeds}"


def _clean(o):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
