"""Every script in examples/ runs and exits 0 (examples that no one runs drift).

Each runs in its own process with a scratch working folder. ``demo.py`` writes its output
folder under tmp_path; ``train_digits.py`` trains a couple of epochs into tmp_path, so the
shipped checkpoints are never overwritten (checked by hash).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
SHIPPED = ("digits.pt2", "digits.safetensors", "digits_arch.json")
NEEDS_NIM = {"demo.py"}  # converts with verification and runs the generated Nim code


def args_for(script: str, tmp: Path) -> list[str]:
    """Extra command-line arguments: output under tmp, and a short training run."""
    if script == "demo.py":
        return [str(tmp / "demo_out")]
    if script == "train_digits.py":
        return [str(tmp / "trained"), "--epochs", "2"]
    return []


def run(script: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    work = tmp / "cwd"
    work.mkdir()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args_for(script, tmp)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_example_is_covered():
    assert {"demo.py", "train_digits.py", "01_basic_mlp.py", "08_code_generation.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    if script in NEEDS_NIM and shutil.which("nim") is None:
        pytest.skip("nim is not installed (make test installs it)")
    before = {name: hashlib.sha256((EXAMPLES / name).read_bytes()).hexdigest() for name in SHIPPED}
    listing = sorted(p.name for p in EXAMPLES.iterdir() if p.name != "__pycache__")
    r = run(script, tmp_path)
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    after = {name: hashlib.sha256((EXAMPLES / name).read_bytes()).hexdigest() for name in SHIPPED}
    assert after == before, f"{script} changed a shipped file"
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.name != "__pycache__") == listing, \
        f"{script} wrote into examples/"
    if script == "demo.py":
        assert "predictions identical: True" in r.stdout
        assert (tmp_path / "demo_out" / "report.json").is_file()
    if script == "train_digits.py":
        import nnbridge as nb

        trained = tmp_path / "trained"
        assert {p.name for p in trained.iterdir()} == {"digits.pt2", "digits.safetensors"}
        net = nb.load_source(trained / "digits.pt2")
        assert net.spec.in_size == 64 and net.spec.output_size == 10
        assert nb.load_source(trained / "digits.safetensors", arch=EXAMPLES / "digits_arch.json").spec.in_size == 64
