"""Faults the CLI meets on real machines (issue 7): disk full, read-only output, no `nim`, compiler failure.

Each must end the command with exit code 2 and ONE line on stderr that names what failed
and what to do — never a traceback, never "verification failed" (exit 1, which means
the generated code ran and computed something wrong), and never a partial output folder.
Faults are simulated: OS functions patched to raise ``OSError(errno)``; ``$NIM``/``PATH``
pointing at no compiler or at a fake one that fails; build caches in tmp_path.
``tests/test_faults.py`` covers killed writers and the library-level write errors.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from nnbridge.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PT2 = str(ROOT / "examples" / "digits.pt2")
OUTPUT = {"digits.json", "digits.nmw", "digits.safetensors", "digits_cpu.nim", "digits.metal", "digits.manifest.json",
          "digits_mlx.py"}


def fail_with(code: int):
    def fail(*_a, **_k):
        raise OSError(code, os.strerror(code))
    return fail


def error_line(capsys) -> str:
    """The one error line a failed command printed last on stderr (before it only progress; no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and all(ln.startswith("… ") for ln in lines[:-1]), err
    return lines[-1]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """A converted folder (no verification: building is what these tests break)."""
    out = tmp_path_factory.mktemp("faults") / "digits_out"
    assert main(["convert", DIGITS_PT2, "-o", str(out), "--no-verify", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, np.random.default_rng(0).random((5, 64), dtype=np.float32))
    return path


@pytest.fixture()
def isolated_caches(tmp_path, monkeypatch) -> Path:
    """Nim and Metal-emulator caches under tmp_path, so no fault test reuses (or leaves) a real build."""
    monkeypatch.setenv("NNBRIDGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NNBRIDGE_METAL_EMU_CACHE", str(tmp_path / "emu-cache"))
    return tmp_path


def fake_tool(folder: Path, name: str, body: str) -> Path:
    """An executable shell script ``folder/name``; ``--version`` answers like a compiler."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{name} 9.9.9 (fake)"; exit 0; fi\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ------------------------------------------------------------------ writes
WRITE_FAULTS = {  # name: (function that fails, errno, what the message says to do)
    "disk_full_writing_a_file": ("os.fsync", errno.ENOSPC, "the disk is full; free some space"),
    "quota_exceeded": ("os.fsync", errno.EDQUOT, "quota is exceeded; free some space"),
    "read_only_output_folder": ("tempfile.mkdtemp", errno.EROFS, "read-only; choose another output folder"),
    "read_only_file": ("tempfile.mkstemp", errno.EROFS, "read-only; choose another output folder"),
    "permission_denied": ("tempfile.mkdtemp", errno.EACCES, "permission denied; choose a folder you can write to"),
    "disk_full_renaming": ("os.replace", errno.ENOSPC, "the disk is full; free some space"),
}


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
@pytest.mark.parametrize("command", ["convert", "generate"])
def test_write_fault_is_one_line_and_leaves_nothing(fault, command, tmp_path, monkeypatch, capsys, out_dir):
    target, code, advice = WRITE_FAULTS[fault]
    module, func = target.split(".")
    out = tmp_path / "out"
    argv = (["convert", DIGITS_PT2, "-o", str(out), "--no-verify"] if command == "convert" else
            ["generate", str(out_dir / "digits.json"), "--weights", str(out_dir / "digits.nmw"), "-o", str(out)])
    monkeypatch.setattr({"os": os, "tempfile": tempfile}[module], func, fail_with(code))
    assert main(argv) == 2
    monkeypatch.undo()
    line = error_line(capsys)
    assert advice in line and str(out) in line
    assert ".partial" not in line  # names where the user asked to write, not our temporary folder
    assert list(tmp_path.iterdir()) == []  # no output folder, no partial or temporary folder left


def test_existing_output_survives_a_failed_forced_conversion(tmp_path, monkeypatch, capsys, out_dir):
    out = tmp_path / "out"
    shutil.copytree(out_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(os, "fsync", fail_with(errno.ENOSPC))
    assert main(["convert", DIGITS_PT2, "-o", str(out), "--no-verify", "--force"]) == 2
    monkeypatch.undo()
    assert "the disk is full" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_predict_output_write_fault(code, advice, tmp_path, monkeypatch, capsys, out_dir, inputs):
    y = tmp_path / "y.npy"
    monkeypatch.setattr(tempfile, "mkstemp", fail_with(code))
    assert main(["predict", str(out_dir), "--inputs", str(inputs), "-o", str(y), "--backend", "torch"]) == 2
    monkeypatch.undo()
    line = error_line(capsys)
    assert str(y) in line and advice in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user that file modes restrict (not root)")
def test_really_read_only_folder(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(["convert", DIGITS_PT2, "-o", str(parent / "out"), "--no-verify"]) == 2
        assert "permission denied" in error_line(capsys)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# --------------------------------------------------------------- compilers
NIM_HINT = "install it with `apt-get install nim`"


def test_convert_without_nim_is_a_failed_step(tmp_path, monkeypatch, capsys, isolated_caches):
    monkeypatch.setenv("NIM", str(tmp_path / "no" / "nim"))
    out = tmp_path / "out"
    assert main(["convert", DIGITS_PT2, "-o", str(out), "-q"]) == 2  # not 1: nothing was verified
    line = error_line(capsys)
    assert "nim not found" in line and NIM_HINT in line and "--no-verify" in line
    assert not out.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    # what the message offers works: without verification, or verifying only the Metal code
    assert main(["convert", DIGITS_PT2, "-o", str(out), "--no-verify", "-q"]) == 0
    assert {p.name for p in out.iterdir()} == OUTPUT
    metal_only = tmp_path / "metal_only"
    assert main(["convert", DIGITS_PT2, "-o", str(metal_only), "--targets", "nmw,metal", "-n", "32", "-q"]) == 0
    assert (metal_only / "report.json").is_file()


@pytest.mark.parametrize("how", ["NIM_points_nowhere", "PATH_without_nim"])
def test_verify_and_predict_without_nim(how, tmp_path, monkeypatch, capsys, out_dir, inputs, isolated_caches):
    if how == "NIM_points_nowhere":
        monkeypatch.setenv("NIM", "/nonexistent/bin/nim")
    else:
        monkeypatch.delenv("NIM", raising=False)
        (tmp_path / "empty_bin").mkdir()
        monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    assert main(["verify", str(out_dir), "--backends", "nim", "-q"]) == 2
    line = error_line(capsys)
    assert "nim not found" in line and NIM_HINT in line
    y = tmp_path / "y.npy"
    assert main(["predict", str(out_dir), "--inputs", str(inputs), "-o", str(y), "--backend", "nim"]) == 2
    assert "nim not found" in error_line(capsys) and not y.exists()
    assert main(["predict", str(out_dir), "--inputs", str(inputs), "-o", str(y), "--backend", "torch", "-q"]) == 0


def test_nim_compiler_failure(tmp_path, monkeypatch, capsys, out_dir, isolated_caches):
    nim = fake_tool(tmp_path / "bin", "nim", 'echo "digits_cpu.nim(7, 3) Error: internal error: fake failure" >&2; '
                                             "exit 1")
    monkeypatch.setenv("NIM", str(nim))
    out = tmp_path / "out"
    assert main(["convert", DIGITS_PT2, "-o", str(out), "-q"]) == 2
    line = error_line(capsys)
    assert "compiling digits_cpu.nim failed" in line and "Error: internal error: fake failure" in line
    assert "full log: " in line and "--no-verify" in line
    log = Path(line.split("full log: ")[1].split(")")[0])
    assert log.is_file() and "fake failure" in log.read_text() and tmp_path in log.parents
    assert not out.exists()
    assert main(["verify", str(out_dir), "--backends", "nim"]) == 2
    assert "compiling digits_cpu.nim failed" in error_line(capsys)


def test_nim_that_cannot_start(tmp_path, monkeypatch, capsys, out_dir, isolated_caches):
    nim = tmp_path / "bin" / "nim"
    nim.parent.mkdir()
    nim.write_text("#!/nonexistent/interpreter\n")
    nim.chmod(0o755)
    monkeypatch.setenv("NIM", str(nim))
    assert main(["verify", str(out_dir), "--backends", "nim"]) == 2
    line = error_line(capsys)
    assert f"cannot run {nim}" in line


def test_build_cache_not_writable(tmp_path, monkeypatch, capsys, out_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NNBRIDGE_CACHE_DIR", str(blocker))
    assert main(["verify", str(out_dir), "--backends", "nim"]) == 2
    line = error_line(capsys)
    assert str(blocker) in line and "cannot create the build cache" in line


@pytest.mark.parametrize("how", ["missing", "failing"])
def test_metal_emulator_compiler_fault(how, tmp_path, monkeypatch, capsys, out_dir, isolated_caches):
    from nnbridge.verify.mlx_metal import metal_available

    if metal_available():
        pytest.skip("a real Metal device runs the kernels; the emulator's compiler is not used")
    cxx = (tmp_path / "no" / "g++" if how == "missing" else
           fake_tool(tmp_path / "bin", "g++", 'echo "harness.cpp:1:1: error: fake failure" >&2; exit 1'))
    monkeypatch.setenv("CXX", str(cxx))
    assert main(["verify", str(out_dir), "--backends", "metal"]) == 2
    line = error_line(capsys)
    assert str(cxx) in line
    assert ("not an executable" in line and "g++ or clang++" in line) if how == "missing" else "fake failure" in line


def test_building_happens_before_verification_so_build_errors_propagate(tmp_path, monkeypatch, out_dir,
                                                                         isolated_caches):
    """The library decision behind exit code 2: a backend that cannot be built raises BuildError from
    ``verify_folder`` (a failed step); only code that was built and ran lands in the report."""
    from nnbridge.errors import BuildError
    from nnbridge.pipeline import open_output, verify_folder
    from nnbridge.verify.nim import NimBuild

    monkeypatch.setenv("NIM", str(tmp_path / "no" / "nim"))
    with pytest.raises(BuildError, match="nim not found"):
        verify_folder(open_output(out_dir), ["nim"], n=8)
    with pytest.raises(BuildError, match="nim not found"):
        NimBuild(out_dir / "digits_cpu.nim", nim="/nonexistent/nim").build()
