"""NeuralNet: construction, predict (torch/MLX), infer/infer_batch, for_inference, NMW save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import nnbridge as nb
from nnbridge.net import InferenceResult, probabilities_of
from tests.conftest import random_weights


def bn_spec() -> nb.NetworkSpec:
    return (nb.new_network("Folded", 12).add_dense("a", 12, 16).add_batch_norm("bn1", 16, activation="relu")
            .add_dropout("d", 16, 0.3).add_dense("b", 16, 8, "tanh", use_bias=False).add_batch_norm("bn2", 8, eps=1e-3)
            .add_dense("c", 8, 8, use_bias=False).add_batch_norm("bn3", 8, activation="sigmoid")
            .add_dense("out", 8, 4, "softmax"))


@pytest.fixture()
def net() -> nb.NeuralNet:
    return nb.NeuralNet(bn_spec(), random_weights(bn_spec(), seed=7))


def test_new_net_has_zero_weights_and_identity_batch_norm() -> None:
    net = nb.NeuralNet(bn_spec())
    assert float(np.abs(net.weights["a.weight"]).sum()) == 0.0
    assert (net.weights["bn1.gamma"] == 1).all() and (net.weights["bn1.running_var"] == 1).all()
    assert np.isfinite(net.predict(np.ones(12, np.float32))).all()
    assert repr(net) == f"NeuralNet('Folded', 8 layers, {bn_spec().total_params()} params)"


def test_predict_shapes_dtypes_and_cache(net: nb.NeuralNet) -> None:
    x = np.random.default_rng(0).standard_normal((7, 12))
    y = net.predict(x)
    assert y.shape == (7, 4) and y.dtype == np.float32
    one = net.predict(x[0])
    assert one.shape == (4,)
    np.testing.assert_allclose(one, y[0], atol=1e-6)
    assert net.predict(x.astype(np.int64)).dtype == np.float32
    assert net._module("torch") is net._module("torch")
    np.testing.assert_allclose(net.predict(x, backend="mlx"), y, atol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros(11), np.zeros((3, 13)), np.zeros((2, 3, 4)), np.array(["a"] * 12)])
def test_wrong_input_is_a_clear_error(net: nb.NeuralNet, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="takes 12 features per sample|must be numbers"):
        net.predict(bad)


def test_unknown_backend(net: nb.NeuralNet) -> None:
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        net.predict(np.zeros(12), backend="jax")


def test_infer_and_infer_batch(net: nb.NeuralNet) -> None:
    x = np.random.default_rng(1).standard_normal((9, 12)).astype(np.float32)
    r = net.infer_batch(x)
    assert isinstance(r, InferenceResult) and len(r) == 9 and r.elapsed >= 0
    assert r.categories.dtype == np.int64 and r.confidences.dtype == np.float32
    np.testing.assert_allclose(r.probabilities, net.predict(x), atol=1e-7)  # softmax last: outputs as given
    np.testing.assert_array_equal(r.categories, net.predict(x).argmax(axis=1))
    np.testing.assert_allclose(r.confidences, net.predict(x).max(axis=1))
    assert net.infer(x[3]) == (int(r.categories[3]), pytest.approx(float(r.confidences[3])))
    mlx = net.infer_batch(x, backend="mlx")
    np.testing.assert_array_equal(mlx.categories, r.categories)


def test_infer_batch_empty_and_errors(net: nb.NeuralNet) -> None:
    r = net.infer_batch(np.zeros((0, 12), np.float32))
    assert r.categories.shape == (0,) and r.confidences.shape == (0,) and r.probabilities.shape == (0, 4)
    with pytest.raises(ValueError, match="takes 12 features"):
        net.infer_batch(np.zeros((0, 5)))
    with pytest.raises(ValueError, match="use infer for one sample"):
        net.infer_batch(np.zeros(12))
    with pytest.raises(ValueError, match="use infer_batch"):
        net.infer(np.zeros((2, 12)))


def test_probabilities_rule() -> None:
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    e = np.exp(logits - 3.0)
    np.testing.assert_allclose(probabilities_of(logits, nb.Activation.NONE), e / e.sum(), rtol=1e-6)
    np.testing.assert_array_equal(probabilities_of(logits, nb.Activation.SOFTMAX), logits)
    binary = probabilities_of(np.array([[0.9], [0.2]], np.float32), nb.Activation.SIGMOID)
    np.testing.assert_allclose(binary, [[0.1, 0.9], [0.8, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(probabilities_of(np.array([[0.0]]), nb.Activation.NONE), [[0.5, 0.5]])


def test_binary_classifier_infer() -> None:
    spec = nb.new_network("Bin", 3).add_dense("h", 3, 4, "relu").add_dense("o", 4, 1, "sigmoid")
    net = nb.NeuralNet(spec, random_weights(spec, seed=2))
    x = np.random.default_rng(3).standard_normal((20, 3)).astype(np.float32)
    p = net.predict(x)[:, 0]
    r = net.infer_batch(x)
    np.testing.assert_array_equal(r.categories, (p > 0.5).astype(np.int64))
    np.testing.assert_allclose(r.confidences, np.maximum(p, 1 - p), rtol=1e-6)


def test_for_inference_folds_batch_norm_and_drops_dropout(net: nb.NeuralNet) -> None:
    fast = net.for_inference()
    assert [(x.name, x.kind.value, x.activation.value) for x in fast.spec.layers] == [
        ("a", "dense", "relu"), ("b", "dense", "tanh"), ("bn2", "batch_norm", "none"), ("c", "dense", "sigmoid"),
        ("out", "dense", "softmax")]
    assert fast.spec.layers[3].use_bias  # the fold adds a bias
    x = np.random.default_rng(4).standard_normal((1000, 12)).astype(np.float32)
    with torch.inference_mode():
        want = net.to_torch().eval()(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(fast.predict(x) - want)) <= 1e-5
    assert net.spec == bn_spec()  # the original is untouched


def test_layer_outputs(net: nb.NeuralNet) -> None:
    x = np.random.default_rng(5).standard_normal((3, 12)).astype(np.float32)
    for backend in ("torch", "mlx"):
        outs = net.layer_outputs(x, backend=backend)
        assert len(outs) == len(net.spec.layers)
        np.testing.assert_allclose(outs[-1], net.predict(x), atol=1e-5)


@pytest.mark.filterwarnings("ignore::nnbridge.NMWPortabilityWarning")
def test_nmw_round_trip(net: nb.NeuralNet, tmp_path: Path) -> None:
    net.save_nmw(tmp_path / "w.nmw")
    back = nb.NeuralNet.load(tmp_path / "w.nmw")
    assert back.spec == net.spec and back.weights == net.weights
    x = np.random.default_rng(6).standard_normal((4, 12)).astype(np.float32)
    np.testing.assert_array_equal(back.predict(x), net.predict(x))


def test_weights_must_belong_to_the_spec(net: nb.NeuralNet) -> None:
    other = nb.NeuralNet(nb.simple_mlp())
    with pytest.raises(nb.SpecError):
        net.weights = other.weights
    with pytest.raises(nb.SpecError):
        nb.NeuralNet(bn_spec(), other.weights)
