"""The benchmarks run (smoke runs: one network, one batch size, few repeats)."""

from __future__ import annotations

import json
from pathlib import Path

from nnbridge.cli import main
from tests.conftest import needs_nim

ROOT = Path(__file__).resolve().parents[1]


@needs_nim
def test_bench_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "--quick", "--networks", "KoanClassifier", "--batches", "64", "--out", str(tmp_path)]) == 0
    assert "KoanClassifier | 64 |" in capsys.readouterr().out
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert data and (tmp_path / "bench_cpu.md").is_file()


def test_bench_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


@needs_nim
def test_engine_benchmark_smoke(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--quick", "--batches", "4096",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| 4096 |" in r.stdout
    assert json.loads((tmp_path / "bench_engine.json").read_text())
