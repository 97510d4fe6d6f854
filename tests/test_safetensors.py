"""safetensors: torch-layout files with the spec in the metadata; reading ours, torch's and MLX's."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import nnbridge as nb
from nnbridge.converters.safetensors import SPEC_KEY, read_safetensors
from tests.conftest import random_weights


@pytest.fixture()
def net() -> nb.NeuralNet:
    spec = (nb.new_network("Safe", 6).add_dense("hidden", 6, 8, "relu").add_batch_norm("norm", 8, eps=1e-3)
            .add_dropout("drop", 8, 0.5).add_dense("out", 8, 3, "softmax", use_bias=False))
    return nb.NeuralNet(spec, random_weights(spec, seed=1))


def _rewrite_metadata(path: Path, change) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_save_is_torch_loadable_with_spec_metadata(net: nb.NeuralNet, tmp_path: Path) -> None:
    path = net.save_safetensors(tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # atomic: no temporary left
    tm = net.to_torch()
    state = load_file(path)
    assert sorted(state) == sorted(tm.state_dict())
    tm.load_state_dict(state)  # strict
    tensors, metadata = read_safetensors(path)
    assert metadata["format"] == "pt" and nb.from_json(metadata[SPEC_KEY]) == net.spec
    np.testing.assert_array_equal(tensors["hidden.weight"], net.weights["hidden.weight"].T)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(tm(torch.from_numpy(x)).numpy(), net.predict(x), atol=1e-6)


def test_read_back_without_arch(net: nb.NeuralNet, tmp_path: Path) -> None:
    path = net.save_safetensors(tmp_path / "m.safetensors")
    for back in (nb.from_torch(path), nb.from_mlx(path), nb.load_source(path)):
        assert back.spec == net.spec and back.weights == net.weights
    assert nb.from_torch(path, name="Renamed").name == "Renamed"


def test_metadata_that_disagrees_with_tensors_is_refused(net: nb.NeuralNet, tmp_path: Path) -> None:
    path = net.save_safetensors(tmp_path / "m.safetensors")

    def grow(header):
        spec = json.loads(header["__metadata__"][SPEC_KEY])
        spec["layers"][0]["output_size"] = 9
        for layer in spec["layers"][1:3]:
            layer["input_size"] = layer["output_size"] = 9
        spec["layers"][3]["input_size"] = 9
        header["__metadata__"][SPEC_KEY] = json.dumps(spec)

    _rewrite_metadata(path, grow)
    with pytest.raises(nb.ConversionError, match=r"tensor 'hidden.weight' has shape \[8, 6\]; layer 'hidden'"):
        nb.from_torch(path)

    path2 = net.save_safetensors(tmp_path / "m2.safetensors")

    def rename(header):
        spec = json.loads(header["__metadata__"][SPEC_KEY])
        spec["layers"][3]["name"] = "final"
        header["__metadata__"][SPEC_KEY] = json.dumps(spec)

    _rewrite_metadata(path2, rename)
    with pytest.raises(nb.ConversionError, match="disagree with the spec 'Safe' stored with them: no tensors for "
                                                 "layer 'final'"):
        nb.from_torch(path2)

    path3 = net.save_safetensors(tmp_path / "m3.safetensors")
    _rewrite_metadata(path3, lambda h: h["__metadata__"].update({SPEC_KEY: "{not json"}))
    with pytest.raises(nb.ConversionError, match="spec in its metadata"):
        nb.from_torch(path3)


def test_plain_torch_safetensors_need_arch(net: nb.NeuralNet, tmp_path: Path) -> None:
    state = {}  # keys as an nn.Sequential called "model" would have them; the last layer in bfloat16
    for old, value in net.to_torch().state_dict().items():
        layer, suffix = old.split(".", 1)
        state[f"model.{['hidden', 'norm', 'out'].index(layer) * 2}.{suffix}"] = value.to(torch.bfloat16) \
            if value.is_floating_point() and layer == "out" else value
    save_file(state, tmp_path / "plain.safetensors")
    with pytest.raises(nb.ConversionError, match="holds weights only.*pass arch="):
        nb.from_torch(tmp_path / "plain.safetensors")
    back = nb.from_torch(tmp_path / "plain.safetensors", arch=net.spec)
    assert back.name == "Safe"
    np.testing.assert_array_equal(back.weights["hidden.weight"], net.weights["hidden.weight"])
    np.testing.assert_allclose(back.weights["out.weight"], net.weights["out.weight"], rtol=1e-2)  # bfloat16


def test_corrupt_files_are_conversion_errors(tmp_path: Path) -> None:
    cases = {"short": b"\x01\x02", "huge": struct.pack("<Q", 2**40) + b"{}", "garbage": struct.pack("<Q", 4) + b"{{{{",
             "empty": b""}
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(nb.ConversionError, match=str(p).replace(".", r"\.")):
            nb.from_torch(p)


def test_write_failure_leaves_nothing(net: nb.NeuralNet, tmp_path: Path) -> None:
    with pytest.raises(nb.OutputError):
        net.save_safetensors(tmp_path / "missing" / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
