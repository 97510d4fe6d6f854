"""NMW reader: every check of "What a careful reader checks", typed errors only, atomic writes."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnbridge as nb
from nnbridge.nmw import decode_nmw, encode_nmw
from tests.conftest import KOAN_NMW, random_weights

KOAN = KOAN_NMW.read_bytes()
SPEC_END = 10 + struct.unpack_from("<i", KOAN, 6)[0]  # offset of tensor_count
FIRST = SPEC_END + 4  # first tensor record


def expect_error(data: bytes, *fragments: str) -> str:
    with pytest.raises(nb.NMWError) as e:
        decode_nmw(data, "f.nmw")
    msg = str(e.value)
    assert msg.startswith("f.nmw: offset "), msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_bad_magic():
    expect_error(b"\x00" * 4 + KOAN[4:], "offset 0", "magic", "expected 0x4E4D5701", "found 0x00000000")


def test_bad_version():
    expect_error(patch(KOAN, 4, "<H", 2), "offset 4", "version", "expected 1", "found 2")


def test_spec_len_beyond_file_does_not_allocate():
    expect_error(patch(KOAN, 6, "<i", 2**31 - 1), "offset 6", "spec_len", "bytes left", "found 2147483647")
    expect_error(patch(KOAN, 6, "<i", -1), "spec_len", "non-negative", "found -1")


def test_spec_json_broken():
    expect_error(KOAN[:10] + b"}" + KOAN[11:], "offset 10", "spec_json", "valid JSON")
    bad = KOAN.replace(b'"relu"', b'"relx"')
    expect_error(bad, "spec_json", "layers[0].activation")


def test_tensor_count_mismatch():
    expect_error(patch(KOAN, SPEC_END, "<i", 3), f"offset {SPEC_END}", "tensor_count", "expected 4", "found 3")
    expect_error(patch(KOAN, SPEC_END, "<i", 2**31 - 1), "tensor_count", "found 2147483647")


def test_unknown_and_duplicate_tensor():
    expect_error(KOAN.replace(b"hidden.weight", b"hidden.wxight"), "tensor 0 name", "found 'hidden.wxight'")
    # make the output.weight record claim to be hidden.weight: a duplicate
    dup = KOAN.replace(b"\x0d\x00\x00\x00output.weight", b"\x0d\x00\x00\x00hidden.weight", 1)
    expect_error(dup, "duplicate 'hidden.weight'")


def test_shape_and_count_checks():
    ndim_at = FIRST + 4 + len("hidden.weight")
    expect_error(patch(KOAN, ndim_at + 4, "<i", 65), "hidden.weight", "shape", "expected [64, 64]", "found [65, 64]")
    expect_error(patch(KOAN, ndim_at + 4, "<i", -64), "dims", "non-negative", "found [-64, 64]")
    expect_error(patch(KOAN, ndim_at, "<i", 1000), "ndim", "found 1000")
    expect_error(patch(KOAN, ndim_at + 12, "<i", 4095), "count", "expected 4096", "found 4095")


def test_truncated_at_every_offset_of_a_small_file():
    spec = nb.new_network("T", 2).add_dense("d", 2, 2).add_batch_norm("bn", 2)
    for trailer in (False, True):
        data = encode_nmw(random_weights(spec), trailer=trailer)
        body = len(encode_nmw(random_weights(spec), trailer=False))
        for cut in range(len(data)):
            if cut == body:  # cut exactly before the trailer: a valid plain v1 file (the trailer is optional)
                assert decode_nmw(data[:cut]).trailer is None
                continue
            with pytest.raises(nb.NMWError):
                decode_nmw(data[:cut], "t.nmw")
        assert decode_nmw(data).weights.spec == spec


def test_trailing_garbage_and_trailer_checks(koan_weights):
    expect_error(KOAN + b"\x00\x01", "bytes after the last tensor", "NMWX")
    full = encode_nmw(koan_weights)
    body = len(KOAN)
    flipped = bytearray(full)
    flipped[body - 1] ^= 0x40
    expect_error(bytes(flipped), "crc32", "corrupt")
    expect_error(full[:-1], "trailer")
    expect_error(full + b"\x00", "extra bytes")
    expect_error(patch(full, len(full) - 8, "<Q", len(full) + 5), "total_len")
    assert decode_nmw(full).trailer["tool"] == "nnbridge"


def test_plain_v1_without_trailer(tmp_path, koan_weights):
    p = koan_weights.save_nmw(tmp_path / "plain.nmw", trailer=False)
    assert p.read_bytes() == KOAN
    assert nb.read_nmw(p).trailer is None


def test_every_layer_kind_round_trips(tmp_path):
    spec = (nb.new_network("All", 5).add_dense("a", 5, 6, "tanh", use_bias=False).add_batch_norm("bn", 6)
            .add_dropout("dr", 6, 0.1).add_dense("b", 6, 3, "softmax"))
    w = random_weights(spec)
    p = w.save_nmw(tmp_path / "all.nmw")
    assert nb.load_nmw(p) == w


def test_nonportable_spec_warns(tmp_path):
    spec = nb.new_network("G", 3).add_dense("d", 3, 2, "gelu")
    with pytest.warns(nb.NMWPortabilityWarning, match="not portable"):
        p = random_weights(spec).save_nmw(tmp_path / "g.nmw")
    assert nb.read_nmw(p).trailer["nim_portable"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nb.koan_classifier()  # no warning for plain specs
        random_weights(nb.koan_classifier()).save_nmw(tmp_path / "k.nmw")


def test_nan_weights_are_read_with_a_warning_note(tmp_path):
    spec = nb.new_network("N", 2).add_dense("d", 2, 2)
    w = nb.Weights(spec, {"d.weight": np.array([[np.nan, 1], [2, np.inf]]), "d.bias": np.zeros(2)})
    f = decode_nmw(encode_nmw(w))
    assert "d.weight" in f.warnings[0]


def test_missing_file_is_an_nmw_error(tmp_path):
    with pytest.raises(nb.NMWError, match="cannot read"):
        nb.load_nmw(tmp_path / "nope.nmw")


def test_failed_save_leaves_nothing(tmp_path, koan_weights, monkeypatch):
    target = tmp_path / "w.nmw"
    koan_weights.save_nmw(target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(nb.OutputError, match="disk is full"):
        random_weights(nb.koan_classifier(), 3).save_nmw(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.nmw"]


def test_weights_shape_errors():
    spec = nb.koan_classifier()
    with pytest.raises(nb.WeightsError, match=r"hidden.weight.*shape \[64, 63\]; expected \[64, 64\]"):
        nb.Weights(spec, {"hidden.weight": np.zeros((64, 63)), "hidden.bias": np.zeros(64),
                          "output.weight": np.zeros((64, 23)), "output.bias": np.zeros(23)})
    with pytest.raises(nb.WeightsError, match="missing tensor 'output.bias'"):
        nb.Weights(spec, {"hidden.weight": np.zeros((64, 64)), "hidden.bias": np.zeros(64),
                          "output.weight": np.zeros((64, 23))})
    with pytest.raises(nb.WeightsError, match="'extra' is not part"):
        nb.Weights(spec, {"extra": np.zeros(1)})


def test_flat_round_trip(koan_weights):
    flat = koan_weights.to_flat()
    assert flat.shape == (5655,)
    assert nb.Weights.from_flat(koan_weights.spec, flat) == koan_weights
    with pytest.raises(nb.WeightsError, match="5654 values"):
        nb.Weights.from_flat(koan_weights.spec, flat[:-1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_garbage_bytes_only_raise_nmw_error(data):
    try:
        decode_nmw(data, "g.nmw")
    except nb.NMWError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(KOAN) - 1), st.integers(1, 255))
def test_bit_flips_of_a_valid_file(offset, xor):
    b = bytearray(KOAN)
    b[offset] ^= xor
    try:
        f = decode_nmw(bytes(b), "flip.nmw")
    except nb.NMWError:
        return
    # without a trailer there is no checksum: a flip inside float data or the network's name stays valid
    in_data = any(r.data_offset <= offset < r.data_offset + 4 * int(np.prod(r.shape)) for r in f.records)
    assert in_data or f.spec.name != "KoanClassifier", offset
