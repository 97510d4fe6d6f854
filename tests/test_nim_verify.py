"""Generated Nim code compiled and run against the MLX/torch reference (needs nim).

Builds are shared through one cache folder per test session; networks are chosen so that
few builds cover every activation x layer kind, folded and unfolded batch norm, dropout,
layers with and without bias, partial and multi-group panels, and the guide's networks.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import jinja2
import numpy as np
import pytest

import nnbridge as nb
from nnbridge.codegen.nim import render_module
from nnbridge.errors import NMWError, NNBridgeError
from nnbridge.net import NeuralNet
from nnbridge.presets import PRESETS
from nnbridge.spec import Activation
from nnbridge.verify import verify
from tests.conftest import KOAN_NMW, needs_nim, random_weights

pytestmark = needs_nim

ACTS = [a.value for a in Activation]
HOSTILE = 'all """kinds"""; {.emit: "abort();".} `x` */ ../../x'
BATCHES = (1, 2, 7, 4097)


@pytest.fixture(scope="session")
def nim_cache(tmp_path_factory) -> Path:
    """One build cache for the whole test session (shared with test_nim_build)."""
    return tmp_path_factory.getbasetemp() / "nim-cache"


def all_kinds() -> NeuralNet:
    """Every activation on a dense layer and on a batch norm; folds; dropout; odd widths; no bias."""
    widths = [19, 40, 33, 70, 17, 16, 5, 129, 23, 8]
    spec = nb.new_network(HOSTILE, input_size=widths[0]).add_batch_norm("bn_in", widths[0], activation="tanh")
    for i, act in enumerate(ACTS):
        k, n = widths[i % len(widths)], widths[(i + 1) % len(widths)]
        spec.add_dense(f"d{i}", k, n, act, use_bias=i % 3 != 1, negative_slope=0.2)
        spec.add_batch_norm(f"bn{i}", n, activation=ACTS[(i + 4) % len(ACTS)], eps=1e-3 if i == 2 else 1e-5)
        if i == 3:
            spec.add_dropout("drop", n, 0.4)
    last = widths[len(ACTS) % len(widths)]
    spec.add_dense("fold_me", last, 12, "none", use_bias=False).add_batch_norm("folded", 12, activation="silu")
    spec.add_dense("linear", 12, 10, "none", use_bias=False).add_dense("out", 10, 7, "softmax")
    return NeuralNet(spec, random_weights(spec, 5))


@pytest.fixture(scope="module")
def kinds_net() -> NeuralNet:
    return all_kinds()


@pytest.fixture(scope="module")
def kinds_lib(kinds_net, nim_cache):
    from nnbridge.verify.nim import load_library

    return load_library(kinds_net, cache_dir=nim_cache)


def _runner(lib):
    from nnbridge.verify.nim import NimRunner

    return NimRunner(lib)


def test_every_activation_and_layer_kind_verifies(kinds_net, kinds_lib) -> None:
    inf = kinds_net.for_inference().spec
    kinds = {(layer.kind.value, layer.activation.value) for layer in inf.layers}
    for act in ACTS:
        assert ("dense", act) in kinds and ("batch_norm", act) in kinds, act
    report = verify(kinds_net, backends=[], runners={"nim": _runner(kinds_lib)})
    assert report.passed, report.table()
    assert report.backends[0].argmax_agreement == 1.0


@pytest.mark.parametrize("n", BATCHES)
def test_batch_sizes(kinds_net, kinds_lib, n) -> None:
    x = np.random.default_rng(n).standard_normal((n, kinds_net.spec.in_size)).astype(np.float32) * 3
    report = verify(kinds_net, backends=[], inputs=x, runners={"nim": _runner(kinds_lib)})
    assert report.passed, report.table()


def test_inference_form_nmw_gives_identical_bits(kinds_net, kinds_lib, tmp_path) -> None:
    """The loader folds batch norms exactly like NeuralNet.for_inference (float64, then float32)."""
    from nnbridge.verify.nim import NimLibrary

    inf_path = tmp_path / "inference.nmw"
    with pytest.warns(nb.NMWPortabilityWarning):
        kinds_net.for_inference().save_nmw(inf_path)
    other = NimLibrary(kinds_lib.path, kinds_lib.ident)
    other.load_weights(inf_path)
    x = np.random.default_rng(1).standard_normal((100, kinds_net.spec.in_size)).astype(np.float32)
    assert kinds_lib.infer_batch(x).tobytes() == other.infer_batch(x).tobytes()
    for a, b in zip(kinds_lib.layer_outputs(x), other.layer_outputs(x)):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_guide_networks_and_koan(name, nim_cache, koan_weights) -> None:
    from nnbridge.verify.nim import load_library

    spec = PRESETS[name]()
    if name == "KoanClassifier":
        net = NeuralNet(koan_weights.spec, koan_weights)  # from the Nim library's JSON dump
        lib = load_library(NeuralNet(koan_weights.spec), cache_dir=nim_cache, weights=KOAN_NMW)  # its .nmw
    else:
        net = NeuralNet(spec, random_weights(spec, 2))
        lib = load_library(net, cache_dir=nim_cache)
    for n in BATCHES:
        x = np.random.default_rng(n).standard_normal((n, spec.in_size)).astype(np.float32)
        report = verify(net, backends=[], inputs=x, runners={"nim": _runner(lib)})
        assert report.passed, report.table()
    report = verify(net, backends=[], runners={"nim": _runner(lib)})  # random rows + 0, ±1e4, one-hot
    assert report.passed, report.table()
    one = np.ones(spec.in_size, np.float32)
    assert lib.infer(one).shape == (spec.output_size,)
    np.testing.assert_allclose(lib.infer(one), net.predict(one, backend="mlx"), atol=2e-6)


def test_verify_backend_by_name(nim_cache) -> None:
    spec = nb.new_network("ByName", input_size=10).add_dense("h", 10, 9, "tanh").add_dense("o", 9, 4, "sigmoid")
    net = NeuralNet(spec, random_weights(spec, 4))
    report = verify(net, backends=["nim"], n=64, backend_options={"nim": {"cache_dir": nim_cache}})
    assert report.passed, report.table()
    assert report.backends[0].backend == "nim"


def test_embedded_weights(nim_cache, koan_weights) -> None:
    from nnbridge.verify.nim import load_library

    net = NeuralNet(koan_weights.spec, koan_weights)
    lib = load_library(net, cache_dir=nim_cache, embed_weights=True)
    assert lib.loaded
    x = np.random.default_rng(3).standard_normal((33, 64)).astype(np.float32)
    np.testing.assert_allclose(lib.infer_batch(x), net.predict(x, backend="mlx"), atol=2e-6)


def test_planted_bug_is_caught_and_located(nim_cache, tmp_path) -> None:
    """A copy of the templates reading a wrong weight row in layer 1: verify fails, the trace names layer 1."""
    from nnbridge.codegen.nim import module_name
    from nnbridge.verify.nim import NimBuild, NimRunner

    templates = Path(nb.__file__).parent.parent / "templates"
    if not (templates / "nim" / "kernels.c.j2").is_file():
        from importlib import resources

        templates = Path(str(resources.files("nnbridge.templates")))
    copy = tmp_path / "templates"
    shutil.copytree(templates, copy)
    kernels = copy / "nim" / "kernels.c.j2"
    text = kernels.read_text()
    good = "const nnb_v w{{ j }} = nnb_ld(wp + {{ wofs(cfg, layer, j) }} + 16 * k);"
    assert good in text
    bad = ("const nnb_v w{{ j }} = nnb_ld(wp + {{ wofs(cfg, layer, j) }} + 16 * "
           "{{ '((k + 1) %% %d)' % layer.K if layer.index == 1 else 'k' }});")
    kernels.write_text(text.replace(good, bad))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(copy)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    spec = (nb.new_network("Planted", input_size=12).add_dense("first", 12, 20, "relu")
            .add_dense("second", 20, 18, "tanh").add_dense("third", 18, 5, "softmax"))
    net = NeuralNet(spec, random_weights(spec, 6))
    src = tmp_path / f"{module_name(spec)}.nim"
    src.write_text(render_module(spec, env=env))
    lib = NimBuild(src, cache_dir=nim_cache).load(net, spec=spec)
    report = verify(net, backends=[], runners={"nim": NimRunner(lib)})
    assert not report.passed
    b = report.backends[0]
    assert b.first_divergent_layer == "1 (second)", report.table()
    assert [t.ok for t in b.trace] == [True, False, False]
    assert "first divergent layer: 1 (second)" in report.table()


# ----------------------------------------------------------- loader errors
@pytest.fixture(scope="module")
def koan_lib(nim_cache):
    from nnbridge.verify.nim import load_library

    return load_library(NeuralNet(nb.koan_classifier()), cache_dir=nim_cache, weights=KOAN_NMW)


def _rewrite_trailer(body: bytes) -> bytes:
    meta = b"{}"
    head = body + b"NMWX" + struct.pack("<i", len(meta)) + meta
    return head + struct.pack("<IQ", zlib.crc32(body), len(head) + 12)


def _body_of(path: Path) -> bytes:
    info = nb.read_nmw(path)
    return path.read_bytes()[: info.trailer_offset or info.size]


@pytest.mark.parametrize("case, message", [
    ("truncated", "(bytes left in the file), found 64"),
    ("crc", "trailer crc32: expected"),
    ("magic", "magic: expected 0x4E4D5701"),
    ("other_network", "spec_json: expected the spec this module was generated for"),
    ("shape", 'tensor "hidden.weight" shape: expected [64, 64], found [64, 65]'),
    ("garbage", "bytes after the last tensor"),
    ("missing", "cannot read"),
])
def test_loader_errors(koan_lib, tmp_path, case, message) -> None:
    data = KOAN_NMW.read_bytes()
    info = nb.read_nmw(KOAN_NMW)
    path = tmp_path / f"{case}.nmw"
    if case == "truncated":
        data = data[: info.records[1].data_offset + 10]
    elif case == "crc":
        body = bytearray(_rewrite_trailer(_body_of(KOAN_NMW)))
        body[info.records[0].data_offset + 3] ^= 0x40
        data = bytes(body)
    elif case == "magic":
        data = b"\x02" + data[1:]
    elif case == "other_network":
        other = nb.simple_mlp()
        nb.Weights.zeros(other).save_nmw(path)
        data = path.read_bytes()
    elif case == "shape":
        rec = info.records[0]
        body = bytearray(_body_of(KOAN_NMW))
        dims_at = rec.offset + 4 + len(rec.name) + 4
        body[dims_at + 4: dims_at + 8] = struct.pack("<i", 65)
        data = bytes(body)
    elif case == "garbage":
        data = _body_of(KOAN_NMW) + b"junk"
    if case != "missing":
        path.write_bytes(data)
    with pytest.raises(NMWError) as err:
        koan_lib.load_weights(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    x = np.ones((2, 64), np.float32)
    assert np.isfinite(koan_lib.infer_batch(x)).all()  # a failed load keeps the previous weights


def test_trailer_is_optional_and_checked(koan_lib, tmp_path) -> None:
    plain = tmp_path / "plain.nmw"
    plain.write_bytes(_body_of(KOAN_NMW))
    koan_lib.load_weights(plain)
    with_trailer = tmp_path / "trailer.nmw"
    with_trailer.write_bytes(_rewrite_trailer(_body_of(KOAN_NMW)))
    koan_lib.load_weights(with_trailer)
    longer = tmp_path / "length.nmw"
    longer.write_bytes(_rewrite_trailer(_body_of(KOAN_NMW))[:-8] + struct.pack("<Q", 12345))
    with pytest.raises(NMWError, match="trailer total_len"):
        koan_lib.load_weights(longer)


def test_unloaded_library_says_so(nim_cache) -> None:
    from nnbridge.verify.nim import NimBuild

    lib = NimBuild(nb.koan_classifier(), cache_dir=nim_cache).load()
    assert not lib.loaded
    with pytest.raises(NNBridgeError, match="no weights loaded"):
        lib.infer(np.zeros(64, np.float32))
    with pytest.raises(NNBridgeError, match="no weights loaded"):
        lib.layer_outputs(np.zeros((1, 64), np.float32))


def test_runner_for_an_output_folder(nim_cache, tmp_path) -> None:
    """What `nnbridge verify out/` does: build the folder's module, load the folder's (original) NMW."""
    from nnbridge.codegen import GenerateOptions, render_files
    from nnbridge.verify.nim import runner_for_folder

    spec = (nb.new_network("Folder Net", input_size=10).add_dense("a", 10, 12, "none")
            .add_batch_norm("bn", 12, activation="relu").add_dropout("dr", 12, 0.2).add_dense("o", 12, 4, "softmax"))
    net = NeuralNet(spec, random_weights(spec, 8))
    out = tmp_path / "out"
    out.mkdir()
    spec.save(out / "Folder_Net.json")
    with pytest.warns(nb.NMWPortabilityWarning):  # batch norm with an activation: not the Nim library's
        net.save_nmw(out / "Folder_Net.nmw")
    for fname, text in render_files(spec, GenerateOptions(output_dir=out)).items():
        (out / fname).write_text(text)
    runner = runner_for_folder(out, cache_dir=nim_cache)
    report = verify(net, backends=[], runners={"nim": runner})
    assert report.passed, report.table()
    assert runner.lib.network == "Folder Net" and runner.lib.spec.layers[-1].activation is Activation.SOFTMAX
