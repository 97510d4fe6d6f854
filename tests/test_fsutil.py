"""Atomic files and folders: a destination is never left half-written."""

from __future__ import annotations

import pytest

from nnbridge.errors import OutputError
from nnbridge.fsutil import atomic_directory, atomic_write_bytes


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write_bytes(tmp_path / "no" / "f.bin", b"x")


def test_atomic_directory_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("step failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"


def test_atomic_directory_refuses_non_empty_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="--force"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_new_files_follow_the_umask(tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    p = atomic_write_bytes(tmp_path / "f.txt", b"x")
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)
