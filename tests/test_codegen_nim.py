"""Nim target, no toolchain needed: file names, identifiers, literals, data prepared for the templates."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

import nnbridge as nb
from nnbridge.codegen import GenerateOptions, default_options, render_files, renderers
from nnbridge.codegen.nim import (
    BUDGETS,
    c_float,
    file_name,
    module_data,
    nim_float64,
    nim_string,
    render_kernels,
    render_module,
    tile_config,
)
from nnbridge.errors import CodegenError
from nnbridge.net import NeuralNet
from tests.conftest import random_weights

HOSTILE = 'evil""" {.emit: "abort();".} `x` */ #\n\t../../etc/passwd \u00e4'


def bn_net() -> NeuralNet:
    """Batch norm folded, unfolded (first layer, after an activation), dropout, a dense without bias."""
    spec = (nb.new_network("Folding", input_size=6)
            .add_batch_norm("bn_in", 6)
            .add_dense("d1", 6, 20, "none", use_bias=False).add_batch_norm("bn1", 20, activation="relu")
            .add_dropout("drop", 20, 0.5)
            .add_dense("d2", 20, 18, "tanh").add_batch_norm("bn2", 18, eps=1e-3)
            .add_dense("d3", 18, 3, "softmax"))
    return NeuralNet(spec, random_weights(spec, 1))


def test_registered_and_file_name() -> None:
    assert "nim" in renderers()
    files = render_files(nb.koan_classifier(), GenerateOptions(generate_nim_cpu=True))
    assert list(files) == ["KoanClassifier_cpu.nim"]
    assert file_name(nb.simple_mlp()) == "SimpleMLP_cpu.nim"


def test_generate_writes_module(tmp_path) -> None:
    opts = default_options()
    opts.output_dir = tmp_path / "generated"
    opts.generate_nim_cpu = True
    paths = nb.koan_classifier().generate(opts)
    assert [p.name for p in paths] == ["KoanClassifier_cpu.nim"]
    text = paths[0].read_text()
    lines = text.splitlines()
    assert lines[0] == "# Nim CPU inference module for network KoanClassifier"
    assert "do not edit" in lines[1]


def test_module_shape() -> None:
    text = render_module(nb.koan_classifier())
    for needle in ("nInputs* = 64", "nOutputs* = 23", "proc loadWeights*(path: string): Weights",
                   "proc infer*(w: Weights, x: openArray[float32]): array[nOutputs, float32]",
                   "proc inferBatch*(w: Weights, x: openArray[float32], y: var openArray[float32])",
                   '{.exportc: "KoanClassifier_load", dynlib, cdecl.}',
                   '{.exportc: "KoanClassifier_infer_batch", dynlib,',
                   '"KoanClassifier_infer_layer"', "layer 0: hidden - dense 64 -> 64, relu",
                   "layer 1: output - dense 64 -> 23, softmax"):
        assert needle in text, needle
    # internal identifiers come from indices, never from layer names
    assert re.findall(r"\bnnb_l\d+_(?:block|row)\b", text)
    assert "nnb_hidden" not in text and "proc hidden" not in text


def test_hostile_names_only_as_identifier_and_comment() -> None:
    spec = nb.new_network(HOSTILE, input_size=4).add_dense("ok_layer", 4, 3, "softmax")
    text = render_module(spec)
    name = file_name(spec)
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*_cpu\.nim", name)
    ident = name[:-len("_cpu.nim")]
    assert f'exportc: "{ident}_infer_batch"' in text
    assert '{.emit: "abort' not in text and "`x` */" not in text
    assert text.count('"""') == 2  # the one emit block of kernels
    for line in text.replace(ident, "IDENT").splitlines():
        if re.search(r"evil|passwd|abort", line):
            assert line.lstrip().startswith(("#", "/*")), line  # only in comments


@pytest.mark.parametrize("value", [0.0, -0.0, 0.1, 1 / 3, 1e-38, 1.4e-45, 3.4028235e38, -2.5e-7, 123456.78,
                                   float(np.float32(np.pi))])
def test_c_float_round_trips(value: float) -> None:
    lit = c_float(value)
    assert lit.endswith("f")
    back = np.float32(float(lit[:-1]))
    assert struct.pack("<f", back) == struct.pack("<f", np.float32(value))


def test_special_floats_and_nim_literals() -> None:
    assert c_float(float("nan")) == "NAN"
    assert c_float(float("-inf")) == "-INFINITY"
    assert float(nim_float64(1e-5)) == 1e-5 and float(nim_float64(0.1)) == 0.1
    assert nim_float64(2.0) == "2.0"
    with pytest.raises(CodegenError):
        nim_float64(float("inf"))
    assert nim_string('a"b\n') == '"a\\x22b\\x0A"'


def test_embedded_weights_exact() -> None:
    spec = nb.new_network("Emb", input_size=3).add_dense("d", 3, 4, "relu")
    values = np.array([[0.1, -0.0, 1e-38, 3.4028235e38], [1.4e-45, -7.25, 1 / 3, 2.0], [5e-8, 6, 7, 8]], np.float32)
    net = NeuralNet(spec, nb.Weights(spec, {"d.weight": values, "d.bias": np.arange(4, dtype=np.float32)}))
    text = render_module(net, GenerateOptions(embed_weights=True))
    arrays = re.findall(r"static float nnb_embedded\d+\[(\d+)\] = \{\n(.*?)\n\};", text, re.S)
    assert len(arrays) == 2
    got = [np.array([float(v.strip()[:-1]) for v in body.replace("\n", " ").split(",")], np.float32)
           for _, body in arrays]
    assert got[0].tobytes() == values.reshape(-1).tobytes()
    assert got[1].tobytes() == np.arange(4, dtype=np.float32).tobytes()
    assert "embeddedWeightsAvailable* = true" in text and "proc embeddedWeights*(): Weights" in text


def test_embed_needs_weights() -> None:
    with pytest.raises(CodegenError, match="embed_weights needs weights"):
        render_module(nb.koan_classifier(), GenerateOptions(embed_weights=True))


def test_loader_steps_mirror_for_inference() -> None:
    net = bn_net()
    data = module_data(net)
    inf = net.for_inference().spec
    assert [(x.kind, x.N, x.act) for x in data["layers"]] == [
        (layer.kind.value, layer.output_size, layer.activation.value) for layer in inf.layers]
    original, inference = data["forms"]
    assert [t["name"] for t in original["tensors"]] == [n for n, _ in net.spec.tensor_shapes()]
    assert [t["name"] for t in inference["tensors"]] == [n for n, _ in inf.tensor_shapes()]
    ops = [s["op"] for s in original["steps"]]
    assert ops.count("fold") == 1  # bn1 into d1 (which had no activation)
    assert ops.count("norm") == 2  # bn_in (first layer) and bn2 (after d2's tanh) stay layers
    assert [s["op"] for s in inference["steps"]].count("fold") == 0


def test_unfoldable_batch_norm_after_activation() -> None:
    spec = (nb.new_network("NoFold", input_size=4).add_dense("d", 4, 5, "relu").add_batch_norm("bn", 5)
            .add_dense("o", 5, 2))
    data = module_data(spec)
    assert [x.kind for x in data["layers"]] == ["dense", "batch_norm", "dense"]
    assert len(data["forms"]) == 1  # nothing to fold: the network is its own inference form


def test_tile_configs_cover_all_panels() -> None:
    for budget in BUDGETS:
        for panels in range(1, 20):
            cfg = tile_config(panels, budget)
            covered = [p for g in cfg.groups for p in range(g.p0, g.p0 + g.nb)]
            assert covered == list(range(panels))
            covered = [p for g in cfg.row_groups for p in range(g.p0, g.p0 + g.nb)]
            assert covered == list(range(panels))
            assert all(12 % g.rows == 0 for g in cfg.groups)


def test_kernels_have_every_width_and_no_user_text() -> None:
    c = render_kernels(bn_net())
    for cond in ("#if NNB_W == 16", "#elif NNB_W == 8", "#elif NNB_W == 4"):
        assert cond in c
    assert "`" not in c and '"""' not in c
