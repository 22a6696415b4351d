"""`kasmina demo`: outputs exist, numbers are consistent, runs are deterministic."""

import json
import math
import os

import pytest

import kasmina
from kasmina import cli
from kasmina.controller import Action, PlateauController
from kasmina.demo import DemoConfig, run_demo

STAGES = {s.name for s in kasmina.Stage}


def _check_log(doc, epochs, seeds, hidden):
    assert len(doc["epochs"]) == epochs
    assert [r["epoch"] for r in doc["epochs"]] == list(range(1, epochs + 1))
    last = doc["epochs"][-1]
    cmp = doc["comparison"]
    for key in ("test_acc", "test_loss", "val_acc", "val_loss"):
        assert cmp["grown"][key] == last[key]
        assert math.isfinite(last[key])
    for r in doc["epochs"]:
        for key in ("train_acc", "val_acc", "test_acc"):
            assert 0.0 <= r[key] <= 1.0
    assert len(doc["seeds"]) == 2  # two KasminaLayers
    for layer in doc["seeds"]:
        assert len(layer) == seeds
        for h in layer:
            assert len(h["stage"]) == len(h["alpha"]) == epochs
            assert set(h["stage"]) <= STAGES
            assert all(0.0 <= a <= 1.0 for a in h["alpha"])
    assert doc["config"]["seed"] == doc["seed"]
    assert doc["config"]["hidden"] == hidden and doc["config"]["seeds"] == seeds
    assert len(doc["report"]) == 2


def test_demo_cli_short(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["demo", "--epochs", "3", "--out", str(out), "--seed", "1",
                     "--no-progress", "--hidden", "64", "--seeds", "4"]) == 0
    stdout = capsys.readouterr().out
    png, js = out / "demo.png", out / "demo.json"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(js) in stdout and "host only" in stdout
    doc = json.loads(js.read_text())
    _check_log(doc, 3, 4, 64)
    base = doc["comparison"]["baseline"]
    assert base["test_acc"] == doc["baseline_epochs"][-1]["test_acc"]
    assert doc["comparison"]["delta"]["test_acc"] == pytest.approx(
        doc["comparison"]["grown"]["test_acc"] - base["test_acc"])


def test_demo_deterministic(tmp_path):
    def run(d):
        cfg = DemoConfig(epochs=2, hidden=64, seeds=4, out=str(tmp_path / d), seed=3,
                         progress=False, figure=False, baseline=False)
        doc = run_demo(cfg, log=lambda _m: None)
        return [{k: v for k, v in r.items() if k != "time_s"} for r in doc["epochs"]]
    assert run("a") == run("b")


def test_demo_lifecycle(tmp_path):
    """An impatient controller grows at once; within 12 epochs the seeds are
    shadow-trained, grafted, stabilised and judged on held-out loss."""
    ctl = PlateauController(patience=0, seeds_per_plateau=2, ramp_steps=3, shadow_epochs=1)
    cfg = DemoConfig(epochs=12, hidden=64, seeds=4, out=str(tmp_path), seed=0,
                     progress=False, baseline=False, ramp_steps=3)
    doc = run_demo(cfg, controller=ctl, log=lambda _m: None)
    _check_log(doc, 12, 4, 64)
    assert "baseline" not in doc["comparison"]
    seen = {st for layer in doc["seeds"] for h in layer for st in h["stage"]}
    assert {"GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION"} <= seen
    # The controller judges a seed the epoch it reaches EVALUATING, so the
    # per-epoch history (taken after the actions) shows the verdict.
    judged = [e for e in doc["events"] if e["from"] == "EVALUATING"]
    assert judged and {e["stage"] for e in judged} <= {"FOSSILIZED", "CULLED", "FINE_TUNING"}
    assert seen & {"FOSSILIZED", "CULLED", "FINE_TUNING"}
    ops = [e for e in doc["events"] if e["op"] == "germinate"]
    assert ops and all(e["error"] is None for e in doc["events"])
    grafted = [h for layer in doc["seeds"] for h in layer if "GRAFTING" in h["stage"]]
    assert any(max(h["alpha"]) > 0.5 for h in grafted)


def test_demo_takes_any_controller(tmp_path):
    class Germinate:
        def on_epoch(self, epoch, layers, metrics):
            assert {"val_loss", "val_acc", "train_loss", "contribution"} <= set(metrics)
            assert "test_acc" not in metrics  # the test split stays unseen
            if epoch == 1:
                return [Action("germinate", 1, 0, kind=kasmina.Kind.MLP,
                               strategy=kasmina.Strategy.FIXED_RAMP, params={"ramp_steps": 2},
                               reason="test")]
            if epoch == 2:
                return [Action("transition", 1, 0, stage=kasmina.Stage.FOSSILIZED)]  # refused
            return []
    cfg = DemoConfig(epochs=2, hidden=64, seeds=4, out=str(tmp_path), progress=False,
                     baseline=False, figure=False)
    doc = run_demo(cfg, controller=Germinate(), log=lambda _m: None)
    assert doc["seeds"][1][0]["stage"] == ["GERMINATED", "GERMINATED"]
    ev = doc["events"]
    assert ev[0]["error"] is None and ev[0]["kind"] == "MLP"
    assert ev[1]["error"]  # GERMINATED -> FOSSILIZED is not allowed: reported, not applied
    assert os.path.exists(doc["files"]["json"])


def test_demo_repeats(tmp_path, capsys):
    assert cli.main(["demo", "--epochs", "2", "--out", str(tmp_path), "--no-progress",
                     "--hidden", "32", "--seeds", "4", "--repeats", "2", "--seed", "5"]) == 0
    assert "over 2 seeds (5, 6)" in capsys.readouterr().out
    rep = json.loads((tmp_path / "demo.json").read_text())["comparison"]["repeats"]
    assert rep["seeds"] == [5, 6] and len(rep["runs"]) == 2
    accs = [r["grown"]["test_acc"] for r in rep["runs"]]
    assert rep["test_acc"]["grown_mean"] == pytest.approx(sum(accs) / 2)
    t = rep["test_acc"]
    assert t["grown_better"] + t["baseline_better"] <= 2


def test_controller_kind_record_rule():
    """"record": MLP first; a kind culled more often than kept loses to an untried one."""
    class L:
        chunk = 8
        telemetry = __import__("torch").zeros(1, 8)

        def seed_info(self, s):
            return {"kind": int(kasmina.Kind.MLP)}
    ctl = PlateauController()
    assert ctl._pick_kind(L(), 0)[0] == kasmina.Kind.MLP
    ctl._verdict(L(), 0, kasmina.Stage.CULLED)
    assert ctl.record[kasmina.Kind.MLP] == [0, 1]
    assert ctl._pick_kind(L(), 0)[0] == kasmina.Kind.CONV
    ctl._verdict(L(), 0, kasmina.Stage.FOSSILIZED)
    ctl._verdict(L(), 0, kasmina.Stage.FOSSILIZED)
    assert ctl._pick_kind(L(), 0)[0] == kasmina.Kind.MLP
    rot = PlateauController(kind_rule="rotate")
    assert rot._pick_kind(L(), 0)[0] == kasmina.Kind.MLP
    with pytest.raises(ValueError):
        PlateauController(kind_rule="nope")
