"""MLX ⇄ NeuralNet: to_mlx layout, from_mlx for Sequential/custom modules/weight files, refusals."""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import nnbridge as nb
from nnbridge.converters._table import TABLE, rows_for
from nnbridge.converters.mlx import FUNCTIONS, MODULES
from tests.conftest import random_weights


def every_kind_spec(act: str = "relu") -> nb.NetworkSpec:
    return (nb.new_network("Kinds", 10).add_dense("a", 10, 16, act).add_dropout("d", 16, 0.1)
            .add_dense("b", 16, 12).add_batch_norm("bn", 12, eps=1e-3, activation=act)
            .add_dense("c", 12, 5, use_bias=False))


def run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    y = module(mx.array(x))
    mx.eval(y)
    return np.array(y)


def test_to_mlx_layout_and_eval_mode() -> None:
    net = nb.NeuralNet(every_kind_spec(), random_weights(every_kind_spec()))
    mm = net.to_mlx()
    linear = mm.layers[0]
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (16, 10)
    np.testing.assert_array_equal(np.array(linear.weight), net.weights["a.weight"].T)
    bn = [m for m in mm.layers if isinstance(m, nn.BatchNorm)][0]
    assert not bn.training and bn.eps == pytest.approx(1e-3)
    x = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)
    np.testing.assert_allclose(run(mm, x), net.predict(x), atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu", "softmax"])
def test_from_mlx_round_trip(act: str) -> None:
    spec = every_kind_spec(act)
    if act == "leaky_relu":
        spec.layers[0].negative_slope = spec.layers[3].negative_slope = 0.2
    net = nb.NeuralNet(spec, random_weights(spec, seed=2))
    back = nb.from_mlx(net.to_mlx())
    assert [x.activation.value for x in back.spec.layers] == [x.activation.value for x in spec.layers]
    assert [x.kind for x in back.spec.layers] == [x.kind for x in spec.layers]
    assert back.spec.layers[1].dropout_rate == pytest.approx(0.1)
    assert back.spec.layers[0].negative_slope == spec.layers[0].negative_slope
    np.testing.assert_array_equal(back.weights.to_flat(), net.weights.to_flat())
    x = np.random.default_rng(1).standard_normal((1000, 10)).astype(np.float32)
    np.testing.assert_allclose(back.predict(x, backend="mlx"), net.predict(x), atol=1e-5)


def test_sequential_with_function_entries() -> None:
    mx.random.seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.relu, nn.Linear(8, 8), functools.partial(nn.leaky_relu, negative_slope=0.3),
        nn.Linear(8, 8), mx.sigmoid, nn.Linear(8, 8), nn.gelu_approx, nn.Identity(), nn.Linear(8, 8), mx.tanh,
        nn.Linear(8, 8), nn.silu, nn.Linear(8, 8), nn.gelu, nn.Linear(8, 4), nn.softmax)
    net = nb.from_mlx(model, name="Funcs")
    assert net.name == "Funcs"
    assert [x.activation.value for x in net.spec.layers] == [
        "relu", "leaky_relu", "sigmoid", "gelu_tanh", "tanh", "silu", "gelu", "softmax"]
    assert net.spec.layers[1].negative_slope == pytest.approx(0.3)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x), run(model, x), atol=1e-5)


class Listed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Hidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def __call__(self, x):
        return self.fc2(nn.relu(self.fc1(x)))


def test_custom_module_of_ordered_layers() -> None:
    model = Listed()
    model.train()
    net = nb.from_mlx(model)
    assert net.name == "Listed" and [x.name for x in net.spec.layers] == ["layers_0", "layers_2", "layers_3"]
    assert model.training and model.layers[2].training  # the check ran in eval mode, the mode is restored
    model.eval()
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x), run(model, x), atol=1e-5)


def test_custom_module_that_hides_work_in_call_is_refused() -> None:
    with pytest.raises(nb.ConversionError) as e:
        nb.from_mlx(Hidden())
    msg = str(e.value)
    assert "Hidden.__call__ does more than run its layers in order" in msg
    assert "fc1" in msg and "nn.Sequential" in msg and "supported: nn.Linear" in msg


class OwnArrays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = mx.zeros((3, 3))
        self.fc = nn.Linear(3, 3)

    def __call__(self, x):
        return self.fc(x) @ self.w


REFUSALS = [
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)), ["layer 'layers.1'", "Conv1d"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.GELU(approx="fast")), ["layer 'layers.1'", "'fast'"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), functools.partial(nn.softmax, axis=0)), ["layer 'layers.1'", "axis 0"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), mx.softmax), ["layer 'layers.1'", "softmax"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm(4, track_running_stats=False)),
     ["layer 'layers.1'", "track_running_stats=False"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), ["layer 'layers.1'", "LayerNorm"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh()), ["layer 'layers.2'", "second activation"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), lambda x: x * 2), ["layer 'layers.1'", "lambda"]),
    (lambda: OwnArrays(), ["module '(root)'", "arrays of its own (w)"]),
]


@pytest.mark.parametrize("make,needles", REFUSALS, ids=[n[1] for _, n in REFUSALS])
def test_refusals_name_the_layer_and_the_supported_set(make, needles) -> None:
    with pytest.raises(nb.ConversionError) as e:
        nb.from_mlx(make())
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    assert "supported: nn.Linear" in msg and "nn.relu" in msg, msg


def test_weight_files_from_save_weights(tmp_path: Path) -> None:
    spec = every_kind_spec("tanh")
    net = nb.NeuralNet(spec, random_weights(spec, seed=3))
    mm = net.to_mlx()
    mm.save_weights(str(tmp_path / "w.npz"))
    mm.save_weights(str(tmp_path / "w.safetensors"))
    spec.save(tmp_path / "arch.json")
    for name in ("w.npz", "w.safetensors"):
        back = nb.from_mlx(tmp_path / name, arch=tmp_path / "arch.json")
        assert back.weights == net.weights and back.name == "Kinds"
    with pytest.raises(nb.ConversionError, match="pass arch="):
        nb.from_mlx(tmp_path / "w.npz")
    with pytest.raises(nb.ConversionError, match="pass arch="):
        nb.from_mlx(tmp_path / "w.safetensors")
    arrays = dict(mx.load(str(tmp_path / "w.npz")))
    assert nb.from_mlx(arrays, arch=spec, name="Dict").weights.to_flat().tolist() == net.weights.to_flat().tolist()
    arrays["layers.0.weight"] = mx.zeros((16, 9))
    with pytest.raises(nb.ConversionError, match=r"tensor 'layers.0.weight' has shape \[16, 9\].*MLX layout"):
        nb.from_mlx(arrays, arch=spec)


def test_bad_weight_files(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(nb.ConversionError, match="cannot read as an .npz"):
        nb.from_mlx(tmp_path / "bad.npz", arch=every_kind_spec())
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(nb.ConversionError, match="cannot read"):
        nb.from_mlx(tmp_path / "obj.npz", arch=every_kind_spec())
    with pytest.raises(nb.ConversionError, match="no such file"):
        nb.from_mlx(tmp_path / "missing.npz")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(nb.ConversionError, match="from_torch or load_source"):
        nb.from_mlx(tmp_path / "w.pt")
    with pytest.raises(nb.ConversionError, match="cannot convert a int"):
        nb.from_mlx(42)


def test_dispatch_tables_follow_the_one_table() -> None:
    assert len(MODULES) + len(FUNCTIONS) == len(rows_for("mlx"))
    assert set(MODULES.values()) | set(FUNCTIONS.values()) == {row.family for row in TABLE if row.mlx}
