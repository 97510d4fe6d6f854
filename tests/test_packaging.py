"""The built wheel carries converters and templates inside the nnbridge package, and works."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("nnbridge-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnbridge/converters/torch.py" in names
    assert "nnbridge/converters/mlx.py" in names
    assert "nnbridge/templates/common/header.j2" in names
    assert "nnbridge/py.typed" in names
    assert not any(n.startswith(("converters/", "templates/", "tests/")) for n in names)
    for sub in ("nim", "metal"):
        if (ROOT / "templates" / sub).is_dir() and any((ROOT / "templates" / sub).iterdir()):
            assert any(n.startswith(f"nnbridge/templates/{sub}/") for n in names), sub


def test_wheel_installs_imports_and_renders(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    # dependencies come from the project's venv on PYTHONPATH; nnbridge itself only from the wheel
    deps = sysconfig.get_paths()["purelib"]
    code = (
        "import nnbridge, nnbridge.converters.torch, nnbridge.converters.mlx\n"
        "from nnbridge.codegen.common import render, header_lines\n"
        "assert 'site-packages' in nnbridge.__file__ and 'venv' in nnbridge.__file__, nnbridge.__file__\n"
        "print(render('common/header.j2', lines=header_lines('W', 'test'), prefix='#'))\n"
        "import importlib.util as u; assert u.find_spec('converters') is None and u.find_spec('templates') is None\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "do not edit" in r.stdout
