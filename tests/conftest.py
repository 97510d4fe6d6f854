"""Shared fixtures: the Koan NMW file written by the Nim library, its JSON dump, helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import nnbridge as nb

FIXTURES = Path(__file__).parent / "fixtures"
KOAN_NMW = FIXTURES / "koan.nmw"
KOAN_JSON = FIXTURES / "koan.weights.json"


@pytest.fixture(scope="session")
def koan_dump() -> dict:
    """The Nim library's JSON dump of koan.nmw (spec, metadata, tensors)."""
    return json.loads(KOAN_JSON.read_text())


@pytest.fixture(scope="session")
def koan_weights(koan_dump) -> nb.Weights:
    """Koan weights built from the JSON dump (not from the NMW file)."""
    spec = nb.spec.spec_from_dict(koan_dump["spec"])
    tensors = {k: np.array(v["data"], np.float32).reshape(v["shape"]) for k, v in koan_dump["tensors"].items()}
    return nb.Weights(spec, tensors)


def random_weights(spec: nb.NetworkSpec, seed: int = 0) -> nb.Weights:
    """Random weights for ``spec`` with positive batch-norm variances (for round-trip tests)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in spec.tensor_shapes():
        a = rng.standard_normal(shape).astype(np.float32) * 0.5
        if name.endswith(".running_var"):
            a = np.abs(a) + 0.5
        tensors[name] = a
    return nb.Weights(spec, tensors)


needs_nim = pytest.mark.skipif(shutil.which("nim") is None, reason="nim is not installed (make test installs it)")
