"""Atomic file and folder output: a destination holds the old complete content or the new one.

Every file nnbridge produces goes through here: written to a temporary name in the same
folder, flushed to disk, then renamed over the destination. A failure (disk full,
read-only folder, a killed process) never leaves a partial file at the destination.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

from nnbridge.errors import OutputError


def _file_mode() -> int:
    """Mode for new files: 0o666 less the process umask (``mkstemp`` alone would give 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def _explain(e: OSError, target: Path) -> OutputError:
    reason = {
        errno.ENOSPC: "the disk is full; free some space",
        errno.EDQUOT: "the disk quota is exceeded; free some space",
        errno.EROFS: "the file system is read-only; choose another output folder",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "permission denied; choose a folder you can write to",
        errno.ENOENT: "the folder does not exist; create it first",
    }.get(e.errno or 0, e.strerror or str(e))
    return OutputError(f"{target}: cannot write: {reason}")


def atomic_write_bytes(path: str | PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    target = Path(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name[:80]}.", suffix=".tmp", dir=target.parent or ".")
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as e:
        raise _explain(e, target) from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return target


def atomic_write_text(path: str | PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``path`` only when the block succeeds.

    An existing non-empty ``path`` is refused unless ``force``; with ``force`` it is replaced
    only after the new folder is complete. On any exception the temporary folder is removed
    and ``path`` is untouched.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; choose another output path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputError(f"{target}: folder exists and is not empty; use --force to replace it or choose another")
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:80]}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise _explain(e, target) from None
    try:
        yield tmp
        old = None
        if target.exists():
            old = parent / f".{target.name[:80]}.{os.getpid()}.old"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OutputError as e:  # a file inside failed: name its destination, not the temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(str(e).replace(str(tmp), str(target))) from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(e, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
