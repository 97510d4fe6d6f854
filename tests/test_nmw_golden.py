"""NMW bytes: identical to the Nim library's for the same weights; every value read back exactly."""

from __future__ import annotations

import numpy as np

import nnbridge as nb
from nnbridge.nmw import encode_nmw
from tests.conftest import KOAN_NMW


def test_reads_koan_exactly(koan_dump):
    w = nb.load_nmw(KOAN_NMW)
    assert w.spec.name == "KoanClassifier"
    assert list(w) == list(koan_dump["tensors"])
    for name, t in koan_dump["tensors"].items():
        assert list(w[name].shape) == t["shape"]
        assert np.array_equal(w[name].reshape(-1), np.array(t["data"], np.float32))


def test_writes_the_nim_librarys_bytes(koan_weights):
    assert encode_nmw(koan_weights, trailer=False) == KOAN_NMW.read_bytes()


def test_trailer_round_trip(tmp_path, koan_weights):
    p = koan_weights.save_nmw(tmp_path / "k.nmw", metadata={"source": "test"})
    f = nb.read_nmw(p)
    assert f.weights == koan_weights
    assert f.trailer["source"] == "test" and f.trailer["tool"] == "nnbridge"
    assert p.read_bytes()[: KOAN_NMW.stat().st_size] == KOAN_NMW.read_bytes()
