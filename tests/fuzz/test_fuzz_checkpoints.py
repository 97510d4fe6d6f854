"""Fuzzing the checkpoint readers: mutated safetensors, .pt, .npz and .pt2 files end in a typed error, bounded.

Mutations of small valid files — bit flips, splices, truncation at every offset (sampled for
the larger files), length fields (the safetensors u64 header length; zip sizes, offsets and
counts) set to extremes, edited safetensors headers (duplicate keys, huge shapes, other
dtypes, deep JSON) — go through every entry point (``load_source``, ``from_torch``,
``from_mlx``, ``read_safetensors``, ``describe_source``). Each must raise an
:class:`nnbridge.NNBridgeError` or succeed; NaN/inf weights load and are reported in
``describe_source``'s warnings. Every call is bounded: in time (a call over ``CALL_S`` fails;
a hang is killed by faulthandler after ``HANG_S``) and in memory (tracemalloc peak, and the
RSS high-water mark where Linux lets us reset it, against the file size).

CI runs ``FUZZ_EXAMPLES`` examples per test (default 400; the slow ``.pt2`` tests an
eighth); the long run is ``python benchmarks/fuzz_atheris.py``.
"""

from __future__ import annotations

import atexit
import faulthandler
import functools
import io
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import nnbridge as nb
import nnbridge.cli
from nnbridge.converters.safetensors import SPEC_KEY, encode_safetensors, read_safetensors
from nnbridge.converters.sources import describe_source
from tests.conftest import random_weights

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_PT2 = settings(FUZZ, max_examples=max(EXAMPLES // 8, 10))
CALL_S = 15.0  # one reader call slower than this fails the test
HANG_S = 120  # one reader call still running after this is a hang: stacks dumped, process ended
# Memory bounds, after a warm-up call of every entry (lazy imports). Seen on valid and mutated
# files: tracemalloc peaks under 50 KB (.pt2: 350 KB), RSS growth under 2 MB.
PEAK_FACTOR = 16  # tracemalloc peak <= PEAK_FACTOR * file size + PEAK_SLACK[kind]
PEAK_SLACK = {"safetensors": 256 << 10, "pt": 256 << 10, "npz": 256 << 10, "pt2": 4 << 20}
RSS_FACTOR, RSS_SLACK = 64, 32 << 20  # resident high-water mark growth, torch's own allocations included

SPEC = nb.new_network("Ckpt", 3).add_dense("a", 3, 4, "relu").add_batch_norm("bn", 4).add_dense("b", 4, 2, "softmax")
NET = nb.NeuralNet(SPEC, random_weights(SPEC))
WORK = Path(tempfile.mkdtemp(prefix="nnbridge-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


# ------------------------------------------------------------ valid files
def _state_dict(net: nb.NeuralNet = NET) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.to_torch().state_dict().items()}


def _to_bytes(save: Callable[[Path], Any], suffix: str) -> bytes:
    path = WORK / f"valid{suffix}"
    save(path)
    return path.read_bytes()


@functools.cache
def valid(name: str) -> bytes:
    """The bytes of a small valid file of each kind (built once, in-process)."""
    if name == "ours.safetensors":  # spec in the metadata: converts without arch
        return encode_safetensors(NET)
    if name == "plain.safetensors":  # safetensors.torch.save of a state dict: needs arch
        return st_save(_state_dict())
    if name == "mlx.safetensors":
        return _to_bytes(lambda p: NET.to_mlx().save_weights(str(p)), ".safetensors")
    if name == "state.pt":
        buf = io.BytesIO()
        torch.save(_state_dict(), buf)
        return buf.getvalue()
    if name == "legacy.pt":  # torch's pre-1.6 format: a bare pickle stream, no zip
        buf = io.BytesIO()
        torch.save(_state_dict(), buf, _use_new_zipfile_serialization=False)
        return buf.getvalue()
    if name == "ckpt.pth":  # a training checkpoint holding the state dict
        buf = io.BytesIO()
        torch.save({"model_state_dict": _state_dict(), "epoch": 3, "loss": 0.25}, buf)
        return buf.getvalue()
    if name == "mlx.npz":
        return _to_bytes(lambda p: NET.to_mlx().save_weights(str(p)), ".npz")
    if name == "model.pt2":
        program = torch.export.export(NET.to_torch(), (torch.zeros(2, 3),))
        return _to_bytes(lambda p: torch.export.save(program, p), ".pt2")
    raise KeyError(name)


FILES = ["ours.safetensors", "plain.safetensors", "mlx.safetensors", "state.pt", "legacy.pt", "ckpt.pth", "mlx.npz",
         "model.pt2"]
CHEAP = [f for f in FILES if not f.endswith(".pt2")]


def kind_of(name: str) -> str:
    suffix = name.rpartition(".")[2]
    return {"pth": "pt"}.get(suffix, suffix)


ENTRIES: dict[str, dict[str, Callable[[Path], Any]]] = {
    "safetensors": {"load_source": nb.load_source, "load_source(arch)": lambda p: nb.load_source(p, arch=SPEC),
                    "from_torch": nb.from_torch, "from_mlx(arch)": lambda p: nb.from_mlx(p, arch=SPEC),
                    "read_safetensors": read_safetensors, "describe_source": describe_source},
    "pt": {"load_source(arch)": lambda p: nb.load_source(p, arch=SPEC),
           "from_torch(arch)": lambda p: nb.from_torch(p, arch=SPEC), "describe_source": describe_source},
    "npz": {"load_source(arch)": lambda p: nb.load_source(p, arch=SPEC),
            "from_mlx(arch)": lambda p: nb.from_mlx(p, arch=SPEC), "describe_source": describe_source},
    "pt2": {"load_source": nb.load_source, "from_torch(arch)": lambda p: nb.from_torch(p, arch=SPEC),
            "describe_source": describe_source},
}
NEEDS_ARCH = {"load_source", "from_torch"}  # entries without arch: only files that carry their spec convert


@pytest.fixture(scope="module", autouse=True)
def _warm_every_entry() -> None:
    """One call of every entry on every valid file first: lazy imports are not the reader's memory."""
    for name in FILES:
        path = WORK / name
        path.write_bytes(valid(name))
        for entry in ENTRIES[kind_of(name)].values():
            try:
                entry(path)
            except nb.NNBridgeError:
                pass


def test_valid_files_convert_through_every_entry() -> None:
    for name in FILES:
        path = WORK / name
        path.write_bytes(valid(name))
        for label, entry in ENTRIES[kind_of(name)].items():
            if label in NEEDS_ARCH and name not in ("ours.safetensors", "model.pt2"):
                continue
            out = entry(path)
            if isinstance(out, nb.NeuralNet):
                assert out.spec.layers == SPEC.layers, (name, label)
                np.testing.assert_allclose(out.weights.to_flat(), NET.weights.to_flat(), err_msg=f"{name} {label}")
            elif label == "describe_source":
                assert out["warnings"] == [] and out["tensors"], name


# ------------------------------------------------------------ the bounded call
def _rss_reset() -> int | None:
    """Reset the RSS high-water mark (Linux) and return the current RSS; None where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]


def call_bounded(entry: Callable[[Path], Any], path: Path, kind: str) -> Any:
    """``entry(path)``; returns its result or the NNBridgeError it raised; any other exception propagates.

    Fails when the call took longer than ``CALL_S`` or more memory than the bounds allow.
    """
    size = path.stat().st_size
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.__stderr__)
    rss0 = _rss_reset()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            result = entry(path)
        except nb.NNBridgeError as e:
            result = e
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
    assert elapsed < CALL_S, f"{entry} took {elapsed:.1f} s on a {size}-byte {kind} file"
    assert peak <= PEAK_FACTOR * size + PEAK_SLACK[kind], f"tracemalloc peak {peak} for a {size}-byte {kind} file"
    if rss0 is not None:
        grew = _status("VmHWM") - rss0
        assert grew <= RSS_FACTOR * size + RSS_SLACK, f"RSS grew {grew} bytes for a {size}-byte {kind} file"
    if isinstance(result, nb.NNBridgeError):
        assert path.name in str(result), f"the error does not name the file: {result}"
    elif isinstance(result, dict):
        json.dumps(result)  # what `nnbridge inspect --json` prints
    return result


def check(name: str, data: bytes, entry: int | str) -> Any:
    """Write ``data`` as a file of ``name``'s kind and read it through one entry point (label, or index modulo)."""
    kind = kind_of(name)
    path = WORK / f"fuzz.{name.rpartition('.')[2]}"
    path.write_bytes(data)
    entries = ENTRIES[kind]
    label = entry if isinstance(entry, str) else list(entries)[entry % len(entries)]
    return call_bounded(entries[label], path, kind)


def check_all(name: str, data: bytes) -> dict[str, Any]:
    """``check`` through every entry point of ``name``'s kind: label -> result or NNBridgeError."""
    return {label: check(name, data, label) for label in ENTRIES[kind_of(name)]}


def reason(out: Any) -> str:
    """The error text, or describe_source's reason, of a result."""
    return str(out["reason"]) if isinstance(out, dict) else str(out)


# ------------------------------------------------------------ byte-level mutations
@FUZZ
@given(st.sampled_from(CHEAP), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=8),
       st.integers(0, 11))
def test_bit_flips(name, flips, entry):
    data = bytearray(valid(name))
    for off, bit in flips:
        data[off % len(data)] ^= 1 << bit
    check(name, bytes(data), entry)


@FUZZ_PT2
@given(st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=8), st.integers(0, 11))
def test_bit_flips_pt2(flips, entry):
    data = bytearray(valid("model.pt2"))
    for off, bit in flips:
        data[off % len(data)] ^= 1 << bit
    check("model.pt2", bytes(data), entry)


@FUZZ
@given(st.sampled_from(CHEAP), st.binary(min_size=1, max_size=64), st.integers(0, 2**31), st.booleans(),
       st.integers(0, 11))
def test_splices(name, chunk, at, insert, entry):
    data = valid(name)
    at %= len(data)
    data = data[:at] + chunk + data[at + (0 if insert else len(chunk)):]
    check(name, data, entry)


def _offsets(size: int, limit: int = 400) -> list[int]:
    """Every offset of a small file; for a larger one its first and last 128 bytes and an even sample between."""
    if size <= limit:
        return list(range(size))
    middle = range(128, size - 128, max(1, (size - 256) // (limit - 256)))
    return sorted({*range(128), *middle, *range(size - 128, size)})


@pytest.mark.parametrize("name", FILES)
def test_truncation_at_every_offset(name):
    data = valid(name)
    offsets = _offsets(len(data), limit=len(data) if name.endswith(".safetensors") else 400)
    if name.endswith(".pt2"):
        offsets = offsets[:: max(1, len(offsets) // max(EXAMPLES // 8, 10))]
    for i, cut in enumerate(offsets):
        check(name, data[:cut], i)


# ------------------------------------------------------------ length fields
SAFETENSORS_LENGTHS = [0, 1, 7, 2**31 - 1, 2**32, 2**63, 2**64 - 1]  # 2**64 - 1 is -1 as an i64


@pytest.mark.parametrize("name", ["ours.safetensors", "plain.safetensors", "mlx.safetensors"])
@pytest.mark.parametrize("value", SAFETENSORS_LENGTHS + ["len-1", "len+1", "file"])
def test_safetensors_header_length(name, value):
    data = valid(name)
    n = struct.unpack_from("<Q", data)[0]
    value = {"len-1": n - 1, "len+1": n + 1, "file": len(data) - 8}.get(value, value)  # type: ignore[arg-type]
    for out in check_all(name, struct.pack("<Q", value) + data[8:]).values():
        assert isinstance(out, nb.ConversionError), out


def zip_fields(data: bytes) -> list[tuple[int, int]]:
    """``(offset, width)`` of every numeric field of a zip's end records, central directory and local headers."""
    out: list[tuple[int, int]] = []
    eocd = data.rfind(b"PK\x05\x06")
    if eocd < 0:
        return out
    out += [(eocd + 4, 2), (eocd + 6, 2), (eocd + 8, 2), (eocd + 10, 2), (eocd + 12, 4), (eocd + 16, 4),
            (eocd + 20, 2)]
    cd_off = struct.unpack_from("<I", data, eocd + 16)[0]
    z64 = data.rfind(b"PK\x06\x06", 0, eocd)
    if z64 >= 0:  # zip64 end record: entry counts, directory size and offset
        out += [(z64 + 24, 8), (z64 + 32, 8), (z64 + 40, 8), (z64 + 48, 8)]
        cd_off = struct.unpack_from("<Q", data, z64 + 48)[0]
    pos = cd_off
    while data[pos:pos + 4] == b"PK\x01\x02":
        # flags, method, crc, compressed and plain sizes, name/extra/comment lengths, local header offset
        out += [(pos + 8, 2), (pos + 10, 2), (pos + 16, 4), (pos + 20, 4), (pos + 24, 4), (pos + 28, 2),
                (pos + 30, 2), (pos + 32, 2), (pos + 42, 4)]
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        local = struct.unpack_from("<I", data, pos + 42)[0]
        if data[local:local + 4] == b"PK\x03\x04":
            out += [(local + 6, 2), (local + 8, 2), (local + 14, 4), (local + 18, 4), (local + 22, 4),
                    (local + 26, 2), (local + 28, 2)]
        pos += 46 + name_len + extra_len + comment_len
    return sorted(set(out))


ZIP_FILES = ["state.pt", "ckpt.pth", "mlx.npz", "model.pt2"]  # legacy.pt is no zip
ZIP_VALUES = ["0", "-1", "i32max", "i64min", "+1"]


def _set_field(data: bytes, off: int, width: int, value: str) -> bytes:
    old = int.from_bytes(data[off:off + width], "little")
    top = 2 ** (8 * width)
    v = {"0": 0, "-1": top - 1, "i32max": min(2**31 - 1, top // 2 - 1), "i64min": top // 2, "+1": old + 1}[value]
    return data[:off] + (v % top).to_bytes(width, "little") + data[off + width:]


def test_zip_fields_are_found():
    for name in ZIP_FILES:
        assert len(zip_fields(valid(name))) > 20, name


@pytest.mark.parametrize("name", ZIP_FILES)
def test_zip_entry_sizes_at_extremes(name):
    """Every entry's compressed and plain size (central directory) set to -1 and 2**31 - 1, one at a time.

    Read from a real file, such a size would size the read itself: 4 GiB asked of a 4 KiB file.
    """
    data = valid(name)
    sizes = [(off, 4) for off, width in zip_fields(data) if width == 4 and data[off - 20:off - 16] == b"PK\x01\x02"
             or width == 4 and data[off - 24:off - 20] == b"PK\x01\x02"]
    assert len(sizes) >= 2 * len(zipfile.ZipFile(io.BytesIO(data)).infolist())
    for i, (off, width) in enumerate(sizes):
        for value in ("-1", "i32max"):
            check(name, _set_field(data, off, width, value), i)


@FUZZ
@given(st.sampled_from(ZIP_FILES[:3]), st.integers(0, 2**31), st.sampled_from(ZIP_VALUES), st.integers(0, 11))
def test_zip_length_fields(name, pick, value, entry):
    data = valid(name)
    fields = zip_fields(data)
    off, width = fields[pick % len(fields)]
    check(name, _set_field(data, off, width, value), entry)


@FUZZ_PT2
@given(st.integers(0, 2**31), st.sampled_from(ZIP_VALUES), st.integers(0, 11))
def test_zip_length_fields_pt2(pick, value, entry):
    data = valid("model.pt2")
    fields = zip_fields(data)
    off, width = fields[pick % len(fields)]
    check("model.pt2", _set_field(data, off, width, value), entry)


def _rezip(data: bytes, pick: int, change: Callable[[bytes], bytes]) -> bytes:
    """``data`` (a zip) with member number ``pick`` replaced by ``change(content)``, the zip rebuilt valid."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(info.filename, z.read(info)) for info in z.infolist()]
    name, content = members[pick % len(members)]
    members[pick % len(members)] = (name, change(content))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, content in members:
            z.writestr(name, content)
    return out.getvalue()


def _flip(flips: list[tuple[int, int]], chunk: bytes, at: int) -> Callable[[bytes], bytes]:
    """Bit flips, then ``chunk`` written at ``at``: for a member's content inside a valid zip."""
    def change(content: bytes) -> bytes:
        b = bytearray(content or b"\0")
        for off, bit in flips:
            b[off % len(b)] ^= 1 << bit
        pos = at % len(b)
        b[pos:pos + len(chunk)] = chunk
        return bytes(b)
    return change


member_flips = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), max_size=6)


@FUZZ
@given(st.sampled_from(ZIP_FILES[:3]), st.integers(0, 2**31), member_flips, st.binary(max_size=8),
       st.integers(0, 2**31), st.integers(0, 11))
def test_zip_member_contents(name, pick, flips, chunk, at, entry):
    """Mutations inside a valid zip reach the parsers behind it: torch's weights-only unpickler, .npy headers."""
    check(name, _rezip(valid(name), pick, _flip(flips, chunk, at)), entry)


@FUZZ_PT2
@given(st.integers(0, 2**31), member_flips, st.binary(max_size=8), st.integers(0, 2**31), st.integers(0, 11))
def test_zip_member_contents_pt2(pick, flips, chunk, at, entry):
    """... and torch.export's JSON graph, weights configs and raw weight records."""
    check("model.pt2", _rezip(valid("model.pt2"), pick, _flip(flips, chunk, at)), entry)


# ------------------------------------------------------------ safetensors headers
def st_split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header: str | bytes, body: bytes) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
INTERESTING = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "C64", "F8_E4M3", "f32", ""]),
    "shape": st.sampled_from([[], [0], [1], [2**31], [2**40], [2**63], [2**64], [-1], [4, -3], [1] * 64, [2**32, 2**32],
                              [3, 4], [4, 3], [12]]),
    "data_offsets": st.tuples(st.sampled_from([0, 4, 8, 2**31 - 1, 2**63, 2**64 - 1, -1]),
                              st.sampled_from([0, 8, 12, 48, 2**31 - 1, 2**64 - 1, -1])).map(list),
}


@FUZZ
@given(st.sampled_from(["ours.safetensors", "plain.safetensors", "mlx.safetensors"]), st.integers(0, 100),
       st.sampled_from(["dtype", "shape", "data_offsets"]), st.data(), st.integers(0, 11))
def test_safetensors_header_fields(name, which, field, data, entry):
    header, body = st_split(valid(name))
    keys = [k for k in header if k != "__metadata__"]
    key = keys[which % len(keys)]
    header[key][field] = data.draw(st.one_of(INTERESTING[field], json_values))
    check(name, st_join(json.dumps(header), body), entry)


@FUZZ
@given(st.sampled_from(["ours.safetensors", "mlx.safetensors"]), st.one_of(json_values, st.text(max_size=40)),
       st.booleans(), st.integers(0, 11))
def test_safetensors_metadata_values(name, value, as_text, entry):
    header, body = st_split(valid(name))
    meta = header["__metadata__"] = header.get("__metadata__") or {}
    meta[SPEC_KEY if as_text else "format"] = json.dumps(value) if as_text else value
    check(name, st_join(json.dumps(header), body), entry)


@pytest.mark.parametrize("depth", [10, 200, 100_000])
@pytest.mark.parametrize("where", ["header", "metadata", "spec"])
def test_safetensors_deeply_nested_json(depth, where):
    header, body = st_split(valid("ours.safetensors"))
    deep = "[" * depth + "]" * depth
    if where == "header":
        text = json.dumps(header)[:-1] + f', "deep": {deep}}}'
    elif where == "metadata":
        text = json.dumps(header).replace('"__metadata__": {', f'"__metadata__": {{"deep": {deep}, ', 1)
    else:  # a valid file whose spec string nests: only the readers of the spec see it
        header["__metadata__"][SPEC_KEY] = deep
        text = json.dumps(header)
    results = check_all("ours.safetensors", st_join(text, body))
    if where == "spec":
        assert "spec in its metadata" in str(results["load_source"])
        assert "spec in its metadata" in reason(results["describe_source"])
        assert isinstance(results["load_source(arch)"], nb.NeuralNet)  # the given arch wins
    else:
        assert all(isinstance(out, nb.NNBridgeError) for out in results.values()), results


def test_safetensors_duplicate_keys_are_refused():
    header, body = st_split(valid("ours.safetensors"))
    first = next(k for k in header if k != "__metadata__")
    entry = json.dumps(header[first])
    twice = json.dumps(header)[:-1] + f', "{first}": {entry}}}'  # the same tensor named twice
    meta = json.dumps(header).replace('"__metadata__": {', f'"__metadata__": {{"{SPEC_KEY}": "{{}}", ', 1)
    for text, key in ((twice, first), (meta, SPEC_KEY)):
        for out in check_all("ours.safetensors", st_join(text, body)).values():
            assert isinstance(out, nb.ConversionError) and f"names {key!r} twice" in str(out), out


def test_safetensors_huge_shapes_allocate_nothing():
    header, body = st_split(valid("plain.safetensors"))
    for shape in ([2**40], [2**31, 2**31], [2**62, 4], [2**64 - 1]):
        h = json.loads(json.dumps(header))
        h["a.weight"]["shape"] = shape
        for out in check_all("plain.safetensors", st_join(json.dumps(h), body)).values():
            assert isinstance(out, nb.ConversionError), out


# ------------------------------------------------------------ torch and npz payloads
def _pt(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_pt_tensors_that_show_more_than_they_hold():
    """A stride-0 view of 2**31 elements over a 4-byte storage: refused before numpy copies it."""
    for shape in ((2**31, 3), (4, 2**40)):
        sd = _state_dict()
        sd["a.weight"] = torch.zeros(1).expand(*shape)
        for out in check_all("state.pt", _pt(sd)).values():
            assert "'a.weight'" in reason(out) and "storage holds 4;" in reason(out), out


@pytest.mark.parametrize("claim", [
    b"X\xff\xff\xff\x7f",  # BINUNICODE of 2**31 - 1 bytes
    b"\x80\x04\x8d" + (2**40).to_bytes(8, "little"),  # BINUNICODE8 of 2**40 bytes
    b"\x80\x04\x8e" + (2**33).to_bytes(8, "little"),  # BINBYTES8 of 8 GiB
    b"\x80\x04\x96" + (2**32).to_bytes(8, "little"),  # BYTEARRAY8
])
def test_legacy_pickle_lengths_do_not_allocate(claim):
    """A non-zip .pt is a pickle stream: its length fields must not size the file reads."""
    for out in check_all("legacy.pt", claim + valid("legacy.pt")[:64]).values():
        assert isinstance(out, nb.ConversionError), out


@pytest.mark.filterwarnings("ignore:.*(deprecated|experimental)")
def test_pt_sparse_quantized_and_complex_half_tensors():
    for bad, needle in ((torch.zeros(4, 3).to_sparse(), "sparse_coo tensor"),
                        (torch.quantize_per_tensor(torch.zeros(4, 3), 0.1, 0, torch.qint8), "quantized tensor"),
                        (torch.zeros(4, 3, dtype=torch.complex32), "dtype torch.complex32")):
        sd = _state_dict()
        sd["a.weight"] = bad
        for out in check_all("state.pt", _pt(sd)).values():
            assert needle in reason(out) and "'a.weight'" in reason(out), out


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _mlx_arrays() -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(valid("mlx.npz"))) as z:
        return {k: z[k] for k in z.files}


def _npy(descr: str, shape: Any, payload: bytes) -> bytes:
    """A ``.npy`` member with any header (format 1.0), as an attacker would write it."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1") + payload


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def _npz_members() -> dict[str, bytes]:
    z = zipfile.ZipFile(io.BytesIO(valid("mlx.npz")))
    return {name: z.read(name) for name in z.namelist()}


@pytest.mark.parametrize("shape", [(2**40,), (2**31, 2**31), (2**62, 4), (2**64,), (-1, 3), (4, 3, 0)])
@pytest.mark.parametrize("descr", ["<f4", "<f8", "|b1", "<c16", "|V4096"])
def test_npz_header_shapes_allocate_nothing(shape, descr):
    members = _npz_members()
    members["layers.0.weight.npy"] = _npy(descr, shape, b"\x00" * 48)
    for out in check_all("mlx.npz", _zip(members)).values():
        assert "'layers.0.weight.npy'" in reason(out) and "header" in reason(out), out


def test_npz_object_arrays_are_never_unpickled():
    members = _npz_members()
    members["layers.0.weight.npy"] = _npy("|O", (1,), b"\x80\x04K\x01.")
    for out in check_all("mlx.npz", _zip(members)).values():
        assert "holds Python objects" in reason(out), out


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_npz_duplicate_member_is_refused():
    members = list(_npz_members().items())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in [*members, members[0]]:
            z.writestr(name, data)
    for result in check_all("mlx.npz", out.getvalue()).values():
        assert f"{members[0][0]!r} appears twice" in reason(result), result


# ------------------------------------------------------------ dtypes and non-finite values
FLOAT_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, None),
                "float64": (torch.float64, np.float64)}
OTHER_DTYPES = {"int32": (torch.int32, np.int32), "int64": (torch.int64, np.int64), "bool": (torch.bool, np.bool_),
                "complex64": (torch.complex64, np.complex64), "uint8": (torch.uint8, np.uint8)}


def _with(name: str, key_torch: str, key_mlx: str, change: Callable[[Any], Any]) -> bytes:
    """``name``'s valid file with one tensor replaced by ``change(tensor)`` (torch tensor or numpy array)."""
    if name in ("state.pt", "plain.safetensors"):
        sd = _state_dict()
        sd[key_torch] = change(sd[key_torch])
        return _pt(sd) if name == "state.pt" else st_save(sd)
    if name == "mlx.npz":
        arrays = _mlx_arrays()
        arrays[key_mlx] = change(arrays[key_mlx])
        return _npz(arrays)
    raise KeyError(name)


KEYS = {"state.pt": "a.weight", "plain.safetensors": "a.weight", "mlx.npz": "layers.0.weight"}


@pytest.mark.parametrize("name", list(KEYS))
@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES) + list(OTHER_DTYPES))
def test_other_dtypes(name, dtype):
    t_dtype, n_dtype = {**FLOAT_DTYPES, **OTHER_DTYPES}[dtype]
    if name == "mlx.npz" and n_dtype is None:
        pytest.skip("numpy has no bfloat16")
    is_npz = name == "mlx.npz"
    data = _with(name, "a.weight", "layers.0.weight",
                 (lambda a: a.astype(n_dtype)) if is_npz else (lambda t: t.to(t_dtype)))
    for label, out in check_all(name, data).items():
        if label in NEEDS_ARCH or label == "read_safetensors":
            continue
        if dtype in FLOAT_DTYPES:  # converted to float32
            if isinstance(out, nb.NeuralNet):
                tol = 1e-2 if dtype in ("float16", "bfloat16") else 1e-6
                np.testing.assert_allclose(out.weights["a.weight"], NET.weights["a.weight"], rtol=tol, atol=tol)
            else:
                assert isinstance(out, dict) and out["tensors"] and not out["warnings"], out
        elif isinstance(out, dict):
            assert out["convertible"] is False
        else:
            assert isinstance(out, nb.ConversionError) and f"{KEYS[name]!r} has dtype" in str(out), out


@pytest.mark.parametrize("name", ["state.pt", "plain.safetensors", "mlx.npz", "ours.safetensors", "model.pt2"])
def test_nan_and_inf_weights_load_with_a_warning(name, capsys):
    tensors = {k: v.copy() for k, v in NET.weights.items()}
    tensors["a.weight"][0, 0] = np.nan
    tensors["b.bias"][1] = np.inf
    bad = nb.NeuralNet(SPEC, nb.Weights(SPEC, tensors))
    state = {k: v.clone() for k, v in bad.to_torch().state_dict().items()}
    writers: dict[str, Callable[[], bytes]] = {
        "ours.safetensors": lambda: encode_safetensors(bad),
        "plain.safetensors": lambda: st_save(state),
        "state.pt": lambda: _pt(state),
        "mlx.npz": lambda: _to_bytes(lambda p: bad.to_mlx().save_weights(str(p)), ".npz"),
        "model.pt2": lambda: _to_bytes(
            lambda p: torch.export.save(torch.export.export(bad.to_torch(), (torch.zeros(2, 3),)), p), ".pt2"),
    }
    data = writers[name]()
    for label, out in check_all(name, data).items():
        if label == "read_safetensors" or label in NEEDS_ARCH and name not in ("ours.safetensors", "model.pt2"):
            continue
        if label == "describe_source":
            assert len(out["warnings"]) == 1 and "NaN or infinity" in out["warnings"][0], out["warnings"]
            assert "(1 of " in out["warnings"][0]
        else:
            assert isinstance(out, nb.NeuralNet), out
            assert sorted(out.weights.nonfinite()) == ["a.weight", "b.bias"]
    path = WORK / f"fuzz.{name.rpartition('.')[2]}"
    path.write_bytes(data)
    assert nb.cli.main(["inspect", str(path)]) == 0
    assert "warning: tensors with NaN or infinity" in capsys.readouterr().out.replace("\n", " ")


# ------------------------------------------------------------ .pt2 payload edits
def _pt2_edit(change: Callable[[str, bytes], bytes | None]) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(valid("model.pt2")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = change(info.filename, src.read(info.filename))
            if data is not None:
                z.writestr(info.filename, data)
    return out.getvalue()


def _weights_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            edit(config["config"]["a.weight"]["tensor_meta"])
            return json.dumps(config).encode()
        return data
    return change


def _sizes(sizes: list[int], strides: list[int]) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        meta["sizes"] = [{"as_int": s} for s in sizes]
        meta["strides"] = [{"as_int": s} for s in strides]
    return edit


PT2_EDITS = {  # metadata that disagrees with the graph or the data: tests/test_security.py
    "huge view": (_weights_config(_sizes([2**31, 3], [0, 1])), "storage holds"),
    "huge 2-d view": (_weights_config(_sizes([2**40, 2**20], [0, 0])), "storage holds"),
    "negative size": (_weights_config(_sizes([-1, 3], [3, 1])), "cannot read as a torch.export program"),
    "int dtype": (_weights_config(lambda m: m.update(dtype=3)), "cannot read as a torch.export program"),
    "short weight file": (lambda n, d: d[:20] if n.endswith("weights/weight_0") else d, "out of bounds for storage"),
    "deep config": (lambda n, d: (b"[" * 100_000 + b"]" * 100_000) if n.endswith("_config.json") else d,
                    "not a torch.export .pt2 archive"),
    "config not an object": (lambda n, d: b"[1, 2]" if n.endswith("weights_config.json") else d,
                             "not a torch.export .pt2 archive"),
    "no model.json": (lambda n, d: None if n.endswith("models/model.json") else d, ""),
}


@pytest.mark.parametrize("edit", list(PT2_EDITS))
def test_pt2_payload_edits(edit):
    change, needle = PT2_EDITS[edit]
    data = _pt2_edit(change)
    for out in check_all("model.pt2", data).values():
        assert not isinstance(out, nb.NeuralNet) and needle in reason(out), out
