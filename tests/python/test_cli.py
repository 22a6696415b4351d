"""`kasmina --help`, each subcommand's --help, and `kasmina info`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from kasmina import cli


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["bench", "--help"],
                                  ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kasmina" in out
    if argv[0] == "demo":
        for opt in ("--epochs", "--strategy", "--seeds", "--device", "--out", "--seed", "--hidden"):
            assert opt in out
    if argv[0] == "bench":
        for opt in ("--json", "--markdown", "--device", "--shapes", "--dtypes", "--quick"):
            assert opt in out
    if argv[0] == "info":
        for opt in ("--shape", "--dtype"):
            assert opt in out


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_bad_shape_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", "--shape", "8192x768"])
    assert exc.value.code == 2
    assert "NxH:S" in capsys.readouterr().err


def test_info_text(capsys):
    assert cli.main(["info", "--shape", "64x96:8", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kasmina ")
    assert "torch" in out


def test_info_json(capsys):
    assert cli.main(["info", "--json", "--shape", "16x4096:64", "--dtype", "bfloat16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc["kasmina"], dict) and doc["kasmina"]
    assert doc["query"] == {"shape": "16x4096:64", "dtype": "bfloat16"}


def test_console_script():
    """The installed entry point (or `python -m kasmina.cli` in a source tree)."""
    exe = shutil.which("kasmina")
    cmd = [exe] if exe else [sys.executable, "-m", "kasmina.cli"]
    res = subprocess.run(cmd + ["info"], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    assert "kasmina" in res.stdout
