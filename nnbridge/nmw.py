"""NMW v1: read and write the Nim library's binary weights format (``docs/NMW.md``).

The writer produces, before our optional integrity trailer, the same bytes as the Nim
library for the same spec and weights. The reader checks every length against the bytes
left before allocating, every tensor against the spec, and the trailer's CRC-32 and
length; any failure is an :class:`NMWError` naming the file, the byte offset, the
expected and the found value.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge._version import __version__
from nnbridge.errors import NMWError, SpecError, WeightsError
from nnbridge.spec import NetworkSpec, spec_from_dict
from nnbridge.weights import Weights

MAGIC = 0x4E4D5701
VERSION = 1
TRAILER_MAGIC = b"NMWX"
MAX_NDIM = 8
_I32_MAX = 2**31 - 1


class NMWPortabilityWarning(UserWarning):
    """The file is valid NMW, but the Nim library will not read its spec as meant."""


@dataclass
class TensorRecord:
    """Where one tensor sits in an NMW file."""

    name: str
    shape: tuple[int, ...]
    offset: int  # byte offset of the record (its name_len field)
    data_offset: int  # byte offset of the first float


@dataclass
class NMWFile:
    """Everything read from an NMW file: spec, weights, records and the trailer if any."""

    source: str
    version: int
    spec: NetworkSpec
    spec_json: str
    weights: Weights
    records: list[TensorRecord]
    size: int
    trailer: dict[str, Any] | None = None
    trailer_offset: int | None = None
    warnings: list[str] = field(default_factory=list)


# -------------------------------------------------------------------- writing
def encode_nmw(weights: Weights, *, trailer: bool = True, metadata: dict[str, Any] | None = None) -> bytes:
    """The NMW v1 bytes of ``weights`` (with our trailer unless ``trailer=False``)."""
    spec = weights.spec
    spec_json = spec.to_json(marker=False).encode("utf-8")
    parts = [struct.pack("<IHi", MAGIC, VERSION, len(spec_json)), spec_json, struct.pack("<i", len(weights))]
    for name, arr in weights.items():
        nb = name.encode("utf-8")
        parts.append(struct.pack("<i", len(nb)) + nb + struct.pack("<i", arr.ndim))
        parts.append(struct.pack(f"<{arr.ndim}i", *arr.shape) + struct.pack("<i", arr.size))
        parts.append(arr.astype("<f4", copy=False).tobytes(order="C"))
    body = b"".join(parts)
    if not trailer:
        return body
    meta: dict[str, Any] = {
        "tool": "nnbridge",
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nim_portable": spec.is_nim_portable(),
    }
    meta.update(weights.metadata)
    meta.update(metadata or {})
    try:
        meta_json = json.dumps(meta, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise NMWError(f"trailer metadata cannot be written as JSON: {e}") from None
    head = body + TRAILER_MAGIC + struct.pack("<i", len(meta_json)) + meta_json
    total = len(head) + 4 + 8
    return head + struct.pack("<IQ", zlib.crc32(body), total)


def save_nmw(weights: Weights, path: str | PathLike[str], *, trailer: bool = True,
             metadata: dict[str, Any] | None = None) -> Path:
    """Write ``weights`` as NMW v1 to ``path`` atomically.

    Warns (:class:`NMWPortabilityWarning`) when the spec uses something the Nim library
    cannot read as meant (gelu/silu, a non-default leaky slope, batch-norm eps, …).
    """
    from nnbridge.fsutil import atomic_write_bytes

    data = encode_nmw(weights, trailer=trailer, metadata=metadata)
    if not weights.spec.is_nim_portable():
        warnings.warn(
            f"{path}: network {weights.spec.name!r} uses settings the Nim library does not know "
            "(it reads unknown activations as 'none'); the file is valid NMW but not portable to it",
            NMWPortabilityWarning, stacklevel=2)
    return atomic_write_bytes(path, data)


# -------------------------------------------------------------------- reading
class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.pos = data, source, 0

    def fail(self, what: str, expected: str, found: object, at: int | None = None) -> NMWError:
        off = self.pos if at is None else at
        return NMWError(f"{self.source}: offset {off}: {what}: expected {expected}, found {found}")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(what, f"{n} more bytes", f"{self.left()} (file truncated)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))[0]

    def length(self, what: str, unit: int = 1) -> int:
        at = self.pos
        n = self.unpack("<i", what)
        if n < 0:
            raise self.fail(what, "a non-negative length", n, at)
        if n * unit > self.left():
            raise self.fail(what, f"at most {self.left() // unit} (bytes left in the file)", n, at)
        return n


def decode_nmw(data: bytes, source: str = "<bytes>") -> NMWFile:
    """Parse NMW bytes; ``source`` names the file in error messages."""
    r = _Reader(bytes(data), source)
    magic = r.unpack("<I", "magic")
    if magic != MAGIC:
        raise r.fail("magic", f"0x{MAGIC:08X} (bytes 01 57 4D 4E)", f"0x{magic:08X}", 0)
    version = r.unpack("<H", "version")
    if version != VERSION:
        raise r.fail("version", str(VERSION), version, 4)
    spec_len = r.length("spec_len")
    spec_at = r.pos
    raw = r.take(spec_len, "spec_json")
    try:
        spec_json = raw.decode("utf-8")
        parsed = json.loads(spec_json, parse_constant=_no_constant)
        spec = spec_from_dict(parsed)
        spec.check()
    except UnicodeDecodeError as e:
        raise r.fail("spec_json", "UTF-8 text", f"invalid byte at {spec_at + e.start}", spec_at) from None
    except json.JSONDecodeError as e:
        raise r.fail("spec_json", "valid JSON", f"{e.msg} at character {e.pos}", spec_at) from None
    except RecursionError:
        raise r.fail("spec_json", "JSON of sane depth", "nesting too deep", spec_at) from None
    except SpecError as e:
        raise r.fail("spec_json", "a valid network spec", str(e).replace("\n", " "), spec_at) from None

    expected = dict(spec.tensor_shapes())
    count_at = r.pos
    count = r.length("tensor_count", unit=12)
    if count != len(expected):
        raise r.fail("tensor_count", f"{len(expected)} (tensors of network {spec.name!r})", count, count_at)
    tensors: dict[str, np.ndarray] = {}
    records: list[TensorRecord] = []
    for i in range(count):
        rec_at = r.pos
        name_len = r.length(f"tensor {i} name_len")
        name_raw = r.take(name_len, f"tensor {i} name")
        try:
            name = name_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise r.fail(f"tensor {i} name", "UTF-8 text", repr(name_raw[:40]), rec_at + 4) from None
        if name not in expected:
            raise r.fail(f"tensor {i} name", "one of " + ", ".join(expected), repr(name[:80]), rec_at + 4)
        if name in tensors:
            raise r.fail(f"tensor {i} name", "each tensor once", f"duplicate {name!r}", rec_at + 4)
        ndim_at = r.pos
        ndim = r.length(f"tensor {name!r} ndim", unit=4)
        if ndim > MAX_NDIM:
            raise r.fail(f"tensor {name!r} ndim", f"at most {MAX_NDIM}", ndim, ndim_at)
        dims_at = r.pos
        dims = tuple(struct.unpack(f"<{ndim}i", r.take(4 * ndim, f"tensor {name!r} dims")))
        if any(d < 0 for d in dims):
            raise r.fail(f"tensor {name!r} dims", "non-negative sizes", list(dims), dims_at)
        if dims != expected[name]:
            raise r.fail(f"tensor {name!r} shape", str(list(expected[name])), list(dims), dims_at)
        n_at = r.pos
        n = r.length(f"tensor {name!r} count", unit=4)
        if n != math.prod(dims):
            raise r.fail(f"tensor {name!r} count", f"{math.prod(dims)} (product of dims {list(dims)})", n, n_at)
        data_at = r.pos
        tensors[name] = np.frombuffer(r.take(4 * n, f"tensor {name!r} data"), dtype="<f4").reshape(dims).copy()
        records.append(TensorRecord(name, dims, rec_at, data_at))

    trailer, trailer_at = None, None
    if r.left():
        trailer_at = r.pos
        trailer = _read_trailer(r)
    try:
        weights = Weights(spec, tensors, metadata=trailer or {}, source=source)
    except WeightsError as e:  # unreachable after the checks above; kept as a typed guard
        raise NMWError(str(e)) from None
    notes = []
    if weights.nonfinite():
        notes.append(f"tensors with NaN or infinity: {', '.join(weights.nonfinite())}")
    return NMWFile(source, version, spec, spec_json, weights, records, len(r.data), trailer, trailer_at, notes)


def _no_constant(name: str) -> None:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _read_trailer(r: _Reader) -> dict[str, Any]:
    start = r.pos
    magic = r.take(min(4, r.left()), "trailer magic")
    if magic != TRAILER_MAGIC:
        raise r.fail("bytes after the last tensor", f"nothing or an {TRAILER_MAGIC.decode()} trailer",
                     f"{r.left() + len(magic)} bytes starting {magic!r}", start)
    meta_len = r.length("trailer meta_len")
    meta_at = r.pos
    meta_raw = r.take(meta_len, "trailer meta_json")
    crc_at = r.pos
    crc = r.unpack("<I", "trailer crc32")
    total = r.unpack("<Q", "trailer total_len")
    if r.left():
        raise r.fail("end of file", "end of file after the trailer", f"{r.left()} extra bytes")
    if total != len(r.data):
        raise r.fail("trailer total_len", f"{len(r.data)} (the file's length)", f"{total} (file truncated or "
                     "extended)", crc_at + 4)
    actual = zlib.crc32(r.data[:start])
    if crc != actual:
        raise r.fail("trailer crc32", f"0x{actual:08X} (CRC-32 of the bytes before the trailer)",
                     f"0x{crc:08X}: the file is corrupt", crc_at)
    try:
        meta = json.loads(meta_raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise r.fail("trailer meta_json", "a UTF-8 JSON object", repr(meta_raw[:40]), meta_at) from None
    if not isinstance(meta, dict):
        raise r.fail("trailer meta_json", "a JSON object", type(meta).__name__, meta_at)
    return meta


def read_nmw(path: str | PathLike[str]) -> NMWFile:
    """Read and fully check an NMW file; the result also lists its records and trailer."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise NMWError(f"{p}: cannot read: {e.strerror or e}") from None
    return decode_nmw(data, str(p))


def load_nmw(path: str | PathLike[str]) -> Weights:
    """Load NMW weights (``.spec`` on the result is the spec stored in the file)."""
    return read_nmw(path).weights
