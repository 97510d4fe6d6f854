"""init_weights: the frameworks' Kaiming/Xavier initialisers, gains, seeding, reproducibility across processes."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import nnbridge as nb
from nnbridge.converters._table import NONLINEARITY, init_gain

WIDE = 512


def wide(act: str) -> nb.NetworkSpec:
    return nb.new_network("Wide", WIDE).add_dense("w", WIDE, WIDE, act).add_dense("o", WIDE, 3)


def expected_std(method: str, act: str) -> float:
    gain = init_gain(nb.Activation(act))
    if method == "kaiming":
        return gain / math.sqrt(WIDE)
    return gain * math.sqrt(2.0 / (WIDE + WIDE))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("distribution", ["uniform", "normal"])
@pytest.mark.parametrize("method,act", [("kaiming", "relu"), ("xavier", "tanh"), ("kaiming", "none")])
def test_empirical_std_matches_the_formula(method: str, act: str, distribution: str, backend: str) -> None:
    net = nb.NeuralNet(wide(act)).init_weights(method, seed=42, distribution=distribution, backend=backend)
    w = net.weights["w.weight"]
    std = expected_std(method, act)
    assert abs(float(w.std()) - std) <= 0.05 * std
    assert abs(float(w.mean())) < 0.05 * std
    if distribution == "uniform":
        assert float(np.abs(w).max()) <= std * math.sqrt(3.0) * (1 + 1e-6)
    np.testing.assert_array_equal(net.weights["w.bias"], np.zeros(WIDE, np.float32))


@pytest.mark.parametrize("act", [a for a in nb.Activation])
def test_gain_is_torchs(act: nb.Activation) -> None:
    slope = 0.2
    assert init_gain(act, slope) == pytest.approx(torch.nn.init.calculate_gain(NONLINEARITY[act], slope))


def test_gain_of_a_dense_layer_before_batch_norm_comes_from_the_batch_norm() -> None:
    spec = nb.new_network("BN", WIDE).add_dense("w", WIDE, WIDE).add_batch_norm("bn", WIDE, activation="relu")
    net = nb.NeuralNet(spec).init_weights("kaiming", seed=3)
    assert float(net.weights["w.weight"].std()) == pytest.approx(math.sqrt(2.0 / WIDE), rel=0.05)
    bn = net.weights.layer("bn")
    assert (bn["gamma"] == 1).all() and (bn["beta"] == 0).all()
    assert (bn["running_mean"] == 0).all() and (bn["running_var"] == 1).all()


def test_layout_is_nmw_fan_in_is_inputs() -> None:
    spec = nb.new_network("Thin", 1000).add_dense("w", 1000, 4, "relu")
    for backend in ("torch", "mlx"):
        w = nb.NeuralNet(spec).init_weights("kaiming", seed=0, backend=backend, distribution="normal").weights
        assert w["w.weight"].shape == (1000, 4)
        assert float(w["w.weight"].std()) == pytest.approx(math.sqrt(2.0 / 1000), rel=0.08)  # fan_in = 1000


def test_seeds_backends_and_module_cache() -> None:
    spec = nb.simple_mlp()
    a = nb.NeuralNet(spec).init_weights("kaiming", seed=42)
    b = nb.NeuralNet(spec).init_weights("kaiming", seed=42)
    assert a.weights == b.weights
    x = np.ones((1, 128), np.float32)
    before = b.predict(x)
    assert b.init_weights("kaiming", seed=43) is b
    assert a.weights != b.weights
    assert not np.array_equal(b.predict(x), before)  # the cached module follows the new weights
    m = nb.NeuralNet(spec).init_weights("kaiming", seed=42, backend="mlx")
    assert m.weights != a.weights
    assert m.weights == nb.NeuralNet(spec).init_weights("kaiming", seed=42, backend="mlx").weights
    assert a.weights.metadata["init"] == {"method": "kaiming", "seed": 42, "distribution": "uniform",
                                          "backend": "torch"}


def test_mlx_global_generator_is_restored() -> None:
    mx.random.seed(2**40 + 99)
    before = np.array(mx.random.state[0])
    nb.NeuralNet(nb.simple_mlp()).init_weights("xavier", seed=1, backend="mlx")
    np.testing.assert_array_equal(np.array(mx.random.state[0]), before)


def _digest(backend: str, method: str, distribution: str) -> str:
    net = nb.NeuralNet(nb.deep_mlp()).init_weights(method, seed=42, distribution=distribution, backend=backend)
    return hashlib.sha256(net.weights.to_flat().tobytes()).hexdigest()


CASES = [("torch", "kaiming", "uniform"), ("torch", "xavier", "normal"), ("mlx", "kaiming", "normal"),
         ("mlx", "xavier", "uniform")]


def test_same_seed_same_weights_in_a_new_process() -> None:
    code = (
        "import hashlib, nnbridge as nb\n"
        f"for b, m, d in {CASES!r}:\n"
        "    n = nb.NeuralNet(nb.deep_mlp()).init_weights(m, seed=42, distribution=d, backend=b)\n"
        "    print(hashlib.sha256(n.weights.to_flat().tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [_digest(*case) for case in CASES]


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "he"}, "unknown init method 'he'"),
    ({"distribution": "gauss"}, "unknown distribution 'gauss'"),
    ({"backend": "jax"}, "unknown backend 'jax'"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(nb.SpecError, match=match):
        nb.NeuralNet(nb.simple_mlp()).init_weights(**kwargs)
