"""Fuzzing the NMW and spec-JSON readers: mutations of valid files end in a typed error, bounded.

CI runs a bounded number of examples (``FUZZ_EXAMPLES``, default 400 per target); the long
run is ``python benchmarks/fuzz_atheris.py`` (see the README's reliability section).
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnbridge as nb
from nnbridge.nmw import decode_nmw, encode_nmw
from tests.conftest import random_weights

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

SPEC = (nb.new_network("Fuzz", 3).add_dense("a", 3, 4, "relu").add_batch_norm("bn", 4)
        .add_dropout("dr", 4, 0.5).add_dense("b", 4, 2, "softmax"))
VALID = encode_nmw(random_weights(SPEC), trailer=True)
PLAIN = encode_nmw(random_weights(SPEC), trailer=False)
LENGTH_VALUES = [0, -1, 1, 2**31 - 1, -(2**31), 2**16, 7]


def _length_fields(data: bytes) -> list[int]:
    """Byte offsets of every i32 length/count/dim field of a valid NMW file."""
    offs = [6]
    pos = 10 + struct.unpack_from("<i", data, 6)[0]
    offs.append(pos)
    count = struct.unpack_from("<i", data, pos)[0]
    pos += 4
    for _ in range(count):
        offs.append(pos)
        name_len = struct.unpack_from("<i", data, pos)[0]
        pos += 4 + name_len
        offs.append(pos)
        ndim = struct.unpack_from("<i", data, pos)[0]
        offs.extend(pos + 4 + 4 * i for i in range(ndim))
        pos += 4 + 4 * ndim
        offs.append(pos)
        n = struct.unpack_from("<i", data, pos)[0]
        pos += 4 + 4 * n
    return offs


FIELDS = _length_fields(PLAIN)


def _decode_bounded(data: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            decode_nmw(data, "fuzz.nmw")
        except nb.NMWError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(data) + 512 * 1024, f"peak {peak} bytes for a {len(data)}-byte file"


@FUZZ
@given(st.sampled_from(FIELDS), st.sampled_from(LENGTH_VALUES), st.booleans())
def test_length_fields_set_to_extremes(offset, value, trailer):
    data = bytearray(VALID if trailer else PLAIN)
    struct.pack_into("<i", data, offset, value)
    _decode_bounded(bytes(data))


@FUZZ
@given(st.binary(min_size=1, max_size=len(VALID)), st.integers(0, len(VALID)))
def test_splices_and_truncations(chunk, at):
    _decode_bounded(VALID[:at] + chunk + VALID[at + len(chunk):])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_bit_flips_with_trailer_are_always_caught(flips):
    data = bytearray(VALID)
    for off, xor in flips:
        data[off] ^= xor
    if bytes(data) == VALID:
        return
    meta = range(len(PLAIN) + 8, len(VALID) - 12)  # NMW.md: the CRC covers the bytes before the trailer
    if all(data[i] == VALID[i] or i in meta for i in range(len(VALID))):
        try:
            decode_nmw(bytes(data), "flip.nmw")
        except nb.NMWError:
            pass
        return
    with pytest.raises(nb.NMWError):  # the CRC-32 trailer catches every change of the body
        decode_nmw(bytes(data), "flip.nmw")


def test_duplicated_tensor_record():
    pos = FIELDS[2]  # first tensor record
    end = FIELDS[6]  # the second tensor record starts after a.weight (name, ndim, 2 dims, count, data)
    n = struct.unpack_from("<i", PLAIN, end)[0]
    end = end + 4 + 4 * n
    dup = PLAIN[:pos] + PLAIN[pos:end] + PLAIN[pos:]
    with pytest.raises(nb.NMWError, match="duplicate|expected"):
        decode_nmw(dup, "dup.nmw")


# ---------------------------------------------------------------- spec JSON
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)
SPEC_DICT = SPEC.to_dict()


@FUZZ
@given(st.sampled_from(["name", "kind", "input_size", "output_size", "activation", "use_bias", "dropout_rate",
                        "eps", "negative_slope"]), st.integers(0, 3), json_values)
def test_spec_field_replaced_by_any_json(key, layer, value):
    d = json.loads(json.dumps(SPEC_DICT))
    d["layers"][layer][key] = value
    try:
        spec = nb.from_json(json.dumps(d))
    except nb.SpecError:
        return
    spec.validate()  # whatever parsed must be checkable without raising


@FUZZ
@given(st.text(max_size=300))
def test_spec_text_garbage(text):
    try:
        nb.from_json(text)
    except nb.SpecError:
        pass


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deeply_nested_json(depth):
    with pytest.raises(nb.SpecError):
        nb.from_json("[" * depth + "]" * depth)
    with pytest.raises(nb.SpecError):
        nb.from_json('{"name":"x","input_shape":[],"layers":' + "[" * depth + "]" * depth + "}")


def test_huge_sizes_in_spec_do_not_allocate():
    d = json.loads(json.dumps(SPEC_DICT))
    d["layers"][0]["output_size"] = 2**40
    d["layers"][1]["input_size"] = d["layers"][1]["output_size"] = 2**40
    spec = nb.from_json(json.dumps(d))  # parses; the tensors it would need are never allocated here
    assert spec.total_params() > 2**40
    body = encode_nmw(random_weights(SPEC), trailer=False)
    spec_json = json.dumps(d, separators=(",", ":")).encode()
    old_len = struct.unpack_from("<i", body, 6)[0]
    forged = body[:6] + struct.pack("<i", len(spec_json)) + spec_json + body[10 + old_len:]
    _decode_bounded(forged)
