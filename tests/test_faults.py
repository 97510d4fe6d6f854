"""Faults: a writer killed mid-write never leaves a partial file; failures are one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nnbridge as nb

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys, numpy as np, nnbridge as nb
spec = nb.new_network("Big", 1024).add_dense("a", 1024, 1024).add_dense("b", 1024, 512)
ws = [nb.Weights(spec, {n: np.full(s, float(k), np.float32) for n, s in spec.tensor_shapes()}) for k in (1, 2)]
target = sys.argv[1]
print("ready", flush=True)
i = 0
while True:
    ws[i % 2].save_nmw(target)
    i += 1
"""


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.31, 0.57])
def test_killed_nmw_writer_leaves_old_or_new_never_partial(tmp_path, delay):
    target = tmp_path / "w.nmw"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if target.exists():
        w = nb.load_nmw(target)  # complete and CRC-valid, or this raises
        assert float(w["a.weight"][0, 0]) in (1.0, 2.0)
        assert float(w["b.bias"][-1]) == float(w["a.weight"][0, 0])


@pytest.mark.parametrize("errno_,text", [(28, "disk is full"), (30, "read-only"), (13, "permission denied")])
def test_write_failures_are_explained(tmp_path, koan_weights, monkeypatch, errno_, text):
    import tempfile

    def fail(*a, **k):
        raise OSError(errno_, os.strerror(errno_))
    monkeypatch.setattr(tempfile, "mkstemp", fail)
    with pytest.raises(nb.OutputError, match=text):
        koan_weights.save_nmw(tmp_path / "w.nmw")
    assert not (tmp_path / "w.nmw").exists()


CONVERTER = r"""
import sys
from nnbridge.pipeline import convert
src, out = sys.argv[1], sys.argv[2]
convert(src, out, verify=False, force=True)  # warm: imports done, a complete folder exists
print("ready", flush=True)
while True:
    convert(src, out, verify=False, force=True)
"""


@pytest.mark.parametrize("delay", [0.03, 0.07, 0.11, 0.19])  # one conversion takes ~0.2 s once warm
def test_killed_convert_leaves_complete_folder_or_none(tmp_path, delay):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CONVERTER, str(ROOT / "examples" / "digits.pt2"), str(out)],
                            stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if out.exists():  # absent only between the two renames of a --force replacement
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(["digits.json", "digits.nmw", "digits.safetensors", "digits.metal",
                                "digits.manifest.json", "digits_mlx.py", "digits_cpu.nim"]), names
        nb.load_nmw(out / "digits.nmw")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert all(p.endswith((".partial", ".old")) for p in leftovers), leftovers
