"""`nnbridge --version` and `nnbridge inspect` for specs and NMW files."""

from __future__ import annotations

import json
import subprocess
import sys

import nnbridge as nb
from nnbridge.cli import main
from tests.conftest import KOAN_NMW


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert nb.__version__ in capsys.readouterr().out


def test_inspect_koan(capsys):
    assert main(["inspect", str(KOAN_NMW)]) == 0
    out = capsys.readouterr().out
    assert "KoanClassifier" in out and "hidden.weight" in out and "64x23" in out and "5,655" in out
    assert "no trailer" in out


def test_inspect_json_output_with_trailer(tmp_path, capsys, koan_weights):
    p = koan_weights.save_nmw(tmp_path / "k.nmw", metadata={"source_framework": "test"})
    assert main(["inspect", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["integrity"].startswith("verified")
    assert info["trailer"]["source_framework"] == "test"
    assert [t["name"] for t in info["tensors"]] == list(koan_weights)


def test_inspect_spec(tmp_path, capsys):
    p = nb.save_spec(nb.deep_mlp(), tmp_path / "deep.json")
    assert main(["inspect", str(p)]) == 0
    assert "DeepMLP" in capsys.readouterr().out


def test_bad_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.nmw"
    bad.write_bytes(KOAN_NMW.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "nnbridge", "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.nmw" in lines[0] and "offset" in lines[0]
    assert "Traceback" not in r.stderr


def test_unknown_suffix_and_missing_file(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hi")
    assert main(["inspect", str(tmp_path / "x.txt")]) == 2
    assert "unknown file type" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "none.nmw")]) == 2
    assert "no such file" in capsys.readouterr().err
