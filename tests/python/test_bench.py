"""`kasmina bench --quick --json` on a tiny shape: fields and sanity."""

import json
import math

import pytest

from kasmina import bench, cli

FIELDS = ("shape", "rows", "hidden", "seeds", "dtype", "pass", "kasmina_ms", "kasmina_host_ms",
          "graphs_ms", "pct_of_floor_graphs", "eager_ms",
          "compile_ms", "floor_ms", "floor_bytes", "pct_of_floor", "speedup_vs_eager",
          "speedup_vs_compile")


def test_bench_quick_json(capsys):
    # torch.compile is left out here: compiling takes tens of seconds on a CPU.
    assert cli.main(["bench", "--quick", "--json", "--device", "cpu", "--no-compile",
                     "--shapes", "64x96:8", "--dtypes", "float32"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "64x96:8" in captured.err  # progress goes to stderr, JSON alone to stdout
    meta, rows = doc["meta"], doc["rows"]
    assert meta["device"] == "cpu" and meta["quick"] is True and meta["compile"] is False
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        for f in FIELDS:
            assert f in r, f
        assert (r["rows"], r["hidden"], r["seeds"], r["dtype"]) == (64, 96, 8, "float32")
        for key in ("kasmina_ms", "kasmina_host_ms", "eager_ms", "floor_ms"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["rel_err_vs_reference"] <= 1e-5  # SPEC section 9, float32
        assert r["compile_ms"] is None and r["speedup_vs_compile"] is None
        assert r["kasmina_host_ms"] == r["kasmina_ms"]  # on the CPU the host's time is the op's
        assert r["graphs_ms"] is None and r["pct_of_floor_graphs"] is None  # CUDA graphs: CUDA only
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["kasmina_ms"])
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_ms"] / r["kasmina_ms"])
    assert rows[0]["floor_bytes"] == 2 * 64 * 96 * 4
    assert rows[1]["floor_bytes"] == 5 * 64 * 96 * 4


def test_bench_markdown(capsys):
    assert cli.main(["bench", "--quick", "--markdown", "--device", "cpu", "--no-compile",
                     "--shapes", "8x48:4"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if line.startswith("|")]
    assert len(table) == 4  # header, separator, fwd, fwd+bwd
    assert "kasmina ms" in table[0] and "host ms" in table[0] and "% floor" in table[0]
    assert "graphs ms" in table[0]


def test_bench_layer_blends_every_seed():
    layer = bench.make_layer(bench.parse_shape("4x96:8"), bench.resolve_device("cpu"))
    import kasmina
    assert set(layer.stages()) == {kasmina.Stage.GRAFTING}
    kinds = {layer.seed_info(s)["kind"] for s in range(8)}
    assert len(kinds) == 4
    assert all(layer.seed_info(s)["alpha"] == pytest.approx(0.5) for s in range(8))


@pytest.mark.parametrize("text", ["8192x768", "8x7:2", "axb:c", "8x768:0"])
def test_bad_shapes(text):
    with pytest.raises(ValueError):
        bench.parse_shape(text)
