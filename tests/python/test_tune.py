"""kasmina.tune: the cache file (format, version, validation, atomic write),
loading it into the dispatcher, and `kasmina tune` without a GPU. The
measurement itself needs CUDA (scripts/gpu-check runs `kasmina tune`)."""

import json

import pytest
import torch

import kasmina
from kasmina import _C, cli, tune


@pytest.fixture
def clean_table():
    saved = _C.cuda_tuned_table()
    _C.set_cuda_tuned_table([])
    yield
    _C.set_cuda_tuned_table(saved)


def _entry(**kw):
    e = dict(device="GPU A", elem_bytes=4, shape_class="large", forward_rows_in_flight=4,
             backward_rows_in_flight=2)
    e.update(kw)
    return e


def test_round_trip_and_load(tmp_path, clean_table):
    path = tmp_path / "sub" / "tune.json"
    tune.write_cache(path, [_entry(), _entry(elem_bytes=2, shape_class="small",
                                             forward_rows_in_flight=1),
                            _entry(shape_class="medium", forward_rows_in_flight=1,
                                   forward_variant="tma", forward_stages=4, forward_group=2,
                                   forward_block_threads=128)],
                     {"created": "now"})
    assert not (tmp_path / "sub" / "tune.json.tmp").exists()
    doc = json.loads(path.read_text())
    assert doc["format"] == "kasmina-tune" and doc["version"] == tune.VERSION
    assert tune.load(path) == 3
    # Entries without a variant, lanes per row or block size (written before
    # they existed) keep the defaults.
    assert sorted(_C.cuda_tuned_table()) == sorted([("GPU A", 4, 2, 4, 2, 0, 0, 0, 0),
                                                    ("GPU A", 2, 0, 1, 2, 0, 0, 0, 0),
                                                    ("GPU A", 4, 1, 1, 2, 2, 4, 2, 128)])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(format="other"), "not a kasmina-tune"),
    (lambda d: d["entries"][0].update(shape_class="huge"), "shape_class"),
    (lambda d: d["entries"][0].update(forward_rows_in_flight="4"), "non-integer"),
    (lambda d: d["entries"][0].update(forward_rows_in_flight=3), "forward_rows_in_flight"),
    (lambda d: d["entries"][0].update(elem_bytes=2), "at most 2"),
    (lambda d: d["entries"][0].update(forward_variant="fast"), "forward_variant"),
    (lambda d: d["entries"][0].update(forward_stages=1), "forward_stages"),
    (lambda d: d["entries"][0].update(forward_stages=9), "forward_stages"),
    (lambda d: d["entries"][0].update(forward_group=3), "forward_group"),
    (lambda d: d["entries"][0].update(forward_group=True), "forward_group"),
    (lambda d: d["entries"][0].update(forward_block_threads=96), "forward_block_threads"),
    (lambda d: d["entries"][0].update(forward_block_threads=512), "forward_block_threads"),
])
def test_bad_cache_is_ignored_with_a_warning(tmp_path, clean_table, mutate, message):
    path = tmp_path / "tune.json"
    doc = {"format": "kasmina-tune", "version": tune.VERSION, "entries": [_entry()]}
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=message):
        assert tune.load(path) == 0
    assert _C.cuda_tuned_table() == []  # nothing applied


def test_damaged_file_and_missing_file(tmp_path, clean_table):
    path = tmp_path / "tune.json"
    path.write_text('{"format": "kasmina-tune", "vers')
    with pytest.warns(UserWarning, match="cannot read"):
        assert tune.load(path) == 0
    assert tune.load(tmp_path / "absent.json") == 0


def test_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KASMINA_TUNE_CACHE", str(tmp_path / "x.json"))
    assert tune.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv("KASMINA_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tune.cache_path() == tmp_path / "kasmina" / f"tune-v{tune.VERSION}.json"


def test_shape_classes():
    assert _C.shape_class(16, 4096, 4) == 0
    assert _C.shape_class(8192, 768, 4) == 1
    assert _C.shape_class(16384, 4096, 2) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case runs in gpu-check")
def test_tune_without_a_gpu_says_why(capsys, tmp_path):
    assert cli.main(["tune", "--out", str(tmp_path / "t.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_info_counts_tuned_entries(clean_table):
    _C.set_cuda_tuned_table([("GPU A", 4, 2, 1, 2, 0, 0, 0, 0)])
    assert kasmina.info(hidden=32, num_seeds=4, rows=8)["cuda_tuned_entries"] == 1


def test_out_of_range_integer_does_not_break_loading(tmp_path, clean_table):
    path = tmp_path / "tune.json"
    doc = {"format": "kasmina-tune", "version": tune.VERSION,
           "entries": [_entry(forward_rows_in_flight=4294967297)]}
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="out of range"):
        assert tune.load(path) == 0
    path.write_text(json.dumps({"format": "kasmina-tune", "version": tune.VERSION,
                                "entries": ["not an object"]}))
    with pytest.warns(UserWarning, match="not an object"):
        assert tune.load(path) == 0
    assert _C.cuda_tuned_table() == []
