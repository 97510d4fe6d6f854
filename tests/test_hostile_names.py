"""Hostile names, end to end (issue 7): no name injects code or escapes the output folder.

Network names (from JSON, NMW, ``--name``, file stems, module class names) may be any
text up to 256 characters; layer names must be identifiers, so hostile ones are refused
by the spec, and those derived from torch module paths or MLX keys are sanitised. Either
way a name reaches generated code only as :func:`nnbridge.names.identifier` (symbols, file
stems) or :func:`nnbridge.names.comment` (comments). ``tests/test_names.py`` unit-tests those
two functions; this file checks the property on everything the generators write, compiles
the Nim code of several hostile networks in one build and runs it, runs the Metal code of
two through the emulator, and drives the CLI with hostile names.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import nnbridge as nb
from nnbridge.cli import main
from nnbridge.codegen import GenerateOptions, generate, render_files
from nnbridge.names import comment, identifier, is_valid_name
from tests.conftest import needs_nim, random_weights

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PT2 = ROOT / "examples" / "digits.pt2"

INJECTION = 'x"; quit(1) #\n*/ {.emit: "abort();".} /* \\ `y` """ ../../z'
NAMES = {  # accepted network names
    "injection": INJECTION,
    "double_quote": 'say "hi"',
    "single_quote": "it's",
    "newlines": "line1\nline2\r\nline3",
    "c_comment_close": "x */ int evil(void) { return 1; } /* y",
    "cpp_line_comment": "x // y\n#define float double",
    "nim_comment": "# not a comment\n## doc",
    "nim_block_comment": "#[ open block",
    "nim_pragma": '{.emit: "abort();".}',
    "backslashes": "back\\slash\\",
    "escape_sequences": "\\x41\\n\\u0041\\0",
    "dot_dot_slash": "../../../etc/passwd",
    "absolute_path": "/etc/passwd",
    "windows_path": "C:\\Windows\\System32\\evil",
    "nim_reserved": "proc",
    "nim_result": "result",
    "metal_reserved": "kernel",
    "metal_device": "device",
    "cpp_reserved": "class",
    "c_main": "main",
    "unicode": "résumé Ω 🙂",
    "bidi_zero_width": "a\u202eb\u200bc",
    "control_chars": "\x00\x1b[2J\x07",
    "rich_markup": "[/bold][link=http://x]y",
    "whitespace": "   ",
    "underscores": "__",
    "leading_digit": "9lives",
    "shell": "$(rm -rf ~); `id`",
    "jinja": "{{ 7*7 }}{% raw %}",
    "python": '"""; import os; os.system("x"); """',
    "printf": "%s%n%x",
    "max_length": "N" * 256,
    "max_length_mixed": "a/" * 128,
}
REFUSED_NETWORK_NAMES = {"empty": "", "257_chars": "n" * 257, "10000_chars": "N" * 10000}
BAD_LAYER_NAMES = {
    "empty": "", "quote": 'a"b', "newline": "a\nb", "comment_close": "a*/b", "hash": "#a", "pragma": "{.a.}",
    "backslash": "a\\b", "dot_dot_slash": "../a", "absolute": "/a", "unicode": "résumé", "space": "a b",
    "leading_digit": "9a", "dotted": "a.b", "dash": "a-b", "129_chars": "a" * 129, "10000_chars": "a" * 10000,
}
COMPILED = ["injection", "dot_dot_slash", "nim_reserved", "metal_reserved", "unicode", "max_length"]
EMULATED = ["injection", "metal_reserved"]
CLI_NAMES = ["injection", "control_chars", "rich_markup", "dot_dot_slash", "c_main"]

# Reserved words of the target languages, listed here independently of nnbridge.names.
RESERVED_SAMPLE = {"proc", "result", "discard", "kernel", "device", "threadgroup", "class", "main", "template",
                   "int", "auto", "false", "alignas", "constant", "half"}
IDENT_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*")
COMMENT_RE = re.compile(r"[A-Za-z0-9_ .:,()=+\-?]*")
FILE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(_cpu\.nim|\.metal|\.manifest\.json|_mlx\.py|\.json|\.nmw|\.safetensors)")
DANGEROUS = re.compile(r"[\"'\n\r\\#{}`]|\*/|[^\x00-\x7f]")  # what could end a comment or a string
BASELINE = "Zqxjv"  # identifier(BASELINE) == comment(BASELINE) == BASELINE


def tiny(name: str) -> nb.NetworkSpec:
    return (nb.new_network(name, 8).add_dense("h", 8, 6, "relu").add_batch_norm("bn", 6)
            .add_dropout("drop", 6, 0.1).add_dense("o", 6, 3, "softmax"))


def tiny_net(name: str, seed: int = 1) -> nb.NeuralNet:
    spec = tiny(name)
    return nb.NeuralNet(spec, random_weights(spec, seed))


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders), relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def render_all(spec: nb.NetworkSpec) -> dict[str, str]:
    return render_files(spec, GenerateOptions(generate_nim_cpu=True, generate_metal=True))


def assert_name_only_through_sanitiser(name: str, got: dict[str, str], base: dict[str, str]) -> None:
    """``got`` (rendered for ``name``) is ``base`` (rendered for BASELINE) with each BASELINE replaced by
    identifier(name) or comment(name): the name has no other way into the text."""
    assert len(got) == len(base)
    hole = "(?:" + "|".join(re.escape(s) for s in {identifier(name), comment(name)}) + ")"
    for (fname, text), (bname, btext) in zip(got.items(), base.items()):
        assert fname.replace(identifier(name), BASELINE, 1) == bname
        lines, blines = text.splitlines(), btext.splitlines()
        assert len(lines) == len(blines), f"{fname}: the name added or removed lines"
        for i, (a, b) in enumerate(zip(lines, blines)):
            if a != b:
                assert BASELINE in b and re.fullmatch(hole.join(map(re.escape, b.split(BASELINE))), a), \
                    f"{fname}:{i + 1}: {a!r}"
        if comment(name) != name:
            assert name not in text, f"{fname} holds the raw name"


@pytest.fixture(scope="module")
def baseline() -> dict[str, str]:
    return render_all(tiny(BASELINE))


# ------------------------------------------------------------ network names
@pytest.mark.parametrize("key", list(NAMES))
def test_sanitised_forms_are_safe(key):
    name = NAMES[key]
    ident = identifier(name)
    assert IDENT_RE.fullmatch(ident) and len(ident) <= 48, ident
    assert ident.lower() not in RESERVED_SAMPLE
    assert COMMENT_RE.fullmatch(comment(name)), comment(name)
    assert len(comment(name)) <= 80


@pytest.mark.parametrize("key", list(NAMES))
def test_network_name_reaches_generated_code_only_through_the_sanitiser(key, baseline, tmp_path):
    name = NAMES[key]
    spec = tiny(name)
    assert spec.check() is spec and tiny(name).name == name  # accepted, and kept as given
    got = render_all(spec)
    assert_name_only_through_sanitiser(name, got, baseline)
    out = tmp_path / "out"
    before = tree(tmp_path)
    paths = generate(spec, GenerateOptions(output_dir=out, generate_nim_cpu=True, generate_metal=True))
    assert tree(tmp_path) - before == {"out"} | {f"out/{f}" for f in got}
    assert all(p.parent == out and FILE_RE.fullmatch(p.name) for p in map(Path, paths))
    manifest = json.loads((out / f"{identifier(name)}.manifest.json").read_text())
    assert manifest["ident"] == identifier(name)


@pytest.mark.parametrize("key", list(NAMES))
def test_network_name_round_trips_through_json_and_nmw(key, tmp_path):
    name = NAMES[key]
    net = tiny_net(name)
    spec_path = net.spec.save(tmp_path / "spec.json")
    assert nb.load_spec(spec_path).name == name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nmw = net.save_nmw(tmp_path / "w.nmw")
    assert nb.load_nmw(nmw).spec.name == name
    assert tree(tmp_path) == {"spec.json", "w.nmw"}


@pytest.mark.parametrize("key", list(REFUSED_NETWORK_NAMES))
def test_unusable_network_names_are_refused(key, capsys, tmp_path):
    name = REFUSED_NETWORK_NAMES[key]
    with pytest.raises(nb.SpecError, match="network name must be"):
        tiny(name).check()
    with pytest.raises(nb.SpecError):
        render_all(tiny(name))
    assert main(["convert", str(DIGITS_PT2), "-o", str(tmp_path / "out"), "--name", name, "--no-verify", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and len(err) < 600
    assert "network name must be" in err and tree(tmp_path) == set()


# --------------------------------------------------------------- layer names
def raw_nmw(spec: dict, tensors: list[tuple[str, np.ndarray]]) -> bytes:
    """NMW v1 bytes written by hand (so that a spec nnbridge would refuse can be stored)."""
    spec_json = json.dumps(spec, separators=(",", ":")).encode()
    out = [struct.pack("<IHi", 0x4E4D5701, 1, len(spec_json)), spec_json, struct.pack("<i", len(tensors))]
    for tname, arr in tensors:
        raw = tname.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<i", arr.ndim), struct.pack(f"<{arr.ndim}i", *arr.shape),
                struct.pack("<i", arr.size), arr.astype("<f4").tobytes()]
    return b"".join(out)


@pytest.mark.parametrize("key", list(BAD_LAYER_NAMES))
def test_hostile_layer_names_are_refused(key, tmp_path, capsys):
    bad = BAD_LAYER_NAMES[key]
    assert not is_valid_name(bad)
    d = json.loads(tiny("ok").to_json())
    d["layers"][0]["name"] = bad
    loaded = nb.from_json(json.dumps(d))  # read leniently (inspect shows the problem) ...
    assert not loaded.validate()
    with pytest.raises(nb.SpecError, match="layer 0"):  # ... and refused before any use
        loaded.check()
    with pytest.raises(nb.SpecError):
        render_all(loaded)
    with pytest.raises(nb.SpecError):
        nb.NeuralNet(loaded)
    with pytest.raises(nb.SpecError):
        nb.new_network("ok", 8).add_dense(bad, 8, 3).check()
    w = np.zeros((8, 6), np.float32)
    tensors = [(f"{bad}.weight", w), (f"{bad}.bias", w[0])] + [
        (t, np.ones(s, np.float32)) for t, s in tiny("ok").tensor_shapes() if not t.startswith("h.")]
    (tmp_path / "bad.nmw").write_bytes(raw_nmw({k: d[k] for k in ("name", "input_shape", "layers")}, tensors))
    with pytest.raises(nb.NMWError, match="spec_json"):
        nb.load_nmw(tmp_path / "bad.nmw")
    (tmp_path / "bad.json").write_text(json.dumps(d))
    assert main(["generate", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "layer 0" in err
    assert tree(tmp_path) == {"bad.nmw", "bad.json"}


TORCH_CHILDREN = ['a"b', "x\ny", "end */ evil", "#{ emit: x }", "back\\slash", "proc", "résumé🙂", "N" * 10000,
                  "kernel", "9lives", "__", "/abs", "a b", "a-b"]


@pytest.fixture(scope="module")
def torch_net():
    """A torch model whose module paths are hostile (through torch.export; fx refuses quotes itself)."""
    import torch
    from torch import nn

    from nnbridge.converters.torch import from_torch

    torch.manual_seed(0)
    seq = nn.Sequential()
    for i, child in enumerate(TORCH_CHILDREN[:6]):
        seq.add_module(child, nn.Linear(8 if i == 0 else 5, 5))
        seq.add_module(child + "_relu", nn.ReLU())
    for child in TORCH_CHILDREN[6:]:
        seq.add_module(child, nn.Linear(5, 5))
    seq.eval()
    program = torch.export.export(seq, (torch.zeros(2, 8),))
    net = from_torch(program, name="Torch\n*/Evil")
    x = np.random.default_rng(0).standard_normal((9, 8)).astype(np.float32)
    with torch.inference_mode():
        ref = seq(torch.from_numpy(x)).numpy()
    return net, x, ref


def test_torch_module_paths_are_sanitised(torch_net, baseline):
    net, x, ref = torch_net
    names = [layer.name for layer in net.spec.layers]
    assert all(is_valid_name(n) for n in names) and len(set(names)) == len(names)
    assert names[:3] == ["a_b", "x_y", "end____evil"] and "a_b_2" in names  # "a b" and "a-b" collide
    np.testing.assert_allclose(net.predict(x, backend="torch"), ref, rtol=1e-5, atol=1e-6)
    texts = "\n".join(render_all(net.spec).values())
    for child in TORCH_CHILDREN:
        if DANGEROUS.search(child):
            assert child not in texts


def test_torch_class_names_are_sanitised():
    from torch import nn

    from nnbridge.converters.torch import from_torch

    evil = type('Evil"Class*/\n{.emit.}', (nn.Sequential,), {})
    net = from_torch(evil(nn.Linear(3, 2)))
    assert is_valid_name(net.spec.name) and net.spec.name.startswith("Evil_Class")
    long = type("L" * 10000, (nn.Sequential,), {})
    assert is_valid_name(from_torch(long(nn.Linear(3, 2))).spec.name)


@pytest.fixture(scope="module")
def mlx_net():
    """An MLX model whose children have hostile keys."""
    import mlx.core as mx
    import mlx.nn as mnn

    from nnbridge.converters.mlx import from_mlx

    keys = ['m"x', "m\ny", "c*/d", "#{.e", "back\\", "résumé", "M" * 10000, "../k", "proc"]

    class Hostile(mnn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, k in enumerate(keys):
                setattr(self, k, mnn.Linear(8 if i == 0 else 4, 4))
                setattr(self, k + " relu", mnn.ReLU())

        def __call__(self, x):
            for k in keys:
                x = getattr(self, k + " relu")(getattr(self, k)(x))
            return x

    mx.random.seed(0)
    model = Hostile()
    net = from_mlx(model, name="mlx\x00{.emit.}")
    x = np.random.default_rng(1).standard_normal((9, 8)).astype(np.float32)
    ref = np.array(model(mx.array(x)))
    return net, x, ref, keys


def test_mlx_keys_are_sanitised(mlx_net):
    net, x, ref, keys = mlx_net
    names = [layer.name for layer in net.spec.layers if layer.kind is nb.LayerKind.DENSE]
    assert len(names) == len(keys) and all(is_valid_name(n) for n in names) and len(set(names)) == len(names)
    np.testing.assert_allclose(net.predict(x, backend="mlx"), ref, rtol=1e-5, atol=1e-6)
    texts = "\n".join(render_all(net.spec).values())
    assert not any(k in texts for k in keys if DANGEROUS.search(k))


# ------------------------------------------------------- compiled and run
@pytest.fixture(scope="module")
def nim_batch(tmp_path_factory, torch_net, mlx_net):
    """The Nim modules of several hostile networks, compiled together in one build (a driver imports them)."""
    from nnbridge.verify.nim import NimBuild, find_nim

    root = tmp_path_factory.mktemp("hostile_nim")
    build = root / "build"
    build.mkdir()
    nets = [tiny_net(NAMES[k], seed=i) for i, k in enumerate(COMPILED)] + [torch_net[0], mlx_net[0]]
    idents = [identifier(n.spec.name) for n in nets]
    assert len(set(idents)) == len(idents)
    before = tree(root)
    for net in nets:
        generate(net.spec, GenerateOptions(output_dir=build, generate_nim_cpu=True))
    modules = sorted(p.stem for p in build.glob("*_cpu.nim"))
    assert modules == sorted(f"{i}_cpu" for i in idents)
    (build / "driver.nim").write_text("".join(f"import {m}\n" for m in modules))
    # the flags nnbridge builds with, without optimisation: this build checks that the code compiles and runs
    flags = [f for f in NimBuild(build / f"{modules[0]}.nim").flags()
             if f not in ("-d:release", "--opt:speed", "--passC:-O3")]
    lib = build / "libhostile.so"
    cmd = [find_nim(), *flags, "--opt:none", f"--nimcache:{build / 'nimcache'}", f"-o:{lib}", "driver.nim"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=build, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(p.startswith("build") for p in tree(root) - before)  # nothing written beside the build folder
    return lib, nets


@needs_nim
def test_generated_nim_of_hostile_networks_compiles_and_runs(nim_batch, tmp_path):
    from nnbridge.verify.nim import NimLibrary

    lib_path, nets = nim_batch
    x = np.random.default_rng(2).standard_normal((17, 8)).astype(np.float32)
    for net in nets:
        lib = NimLibrary(lib_path, identifier(net.spec.name), spec=net.spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nmw = net.save_nmw(tmp_path / f"{identifier(net.spec.name)}.nmw")  # the hostile name is inside
        lib.load_weights(nmw)
        np.testing.assert_allclose(lib.infer_batch(x), net.predict(x, backend="torch"), rtol=1e-5, atol=1e-5,
                                   err_msg=repr(net.spec.name))


@pytest.mark.parametrize("key", EMULATED)
def test_generated_metal_of_hostile_networks_compiles_and_runs(key):
    from nnbridge.verify.metal import MetalRunner

    net = tiny_net(NAMES[key])
    runner = MetalRunner(net)  # the .metal text through the emulator (or the GPU), every kernel form
    x = np.random.default_rng(3).standard_normal((11, 8)).astype(np.float32)
    np.testing.assert_allclose(runner.run(x), net.predict(x, backend="torch"), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- CLI
@pytest.mark.parametrize("key", CLI_NAMES)
def test_cli_convert_and_generate_with_hostile_names(key, tmp_path, monkeypatch, capsys):
    name = NAMES[key]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    assert main(["convert", str(DIGITS_PT2), "-o", "out", "--name", name, "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x00" not in out  # the summary shows the name escaped
    stem = identifier(name)
    expected = {f"{stem}{s}" for s in (".json", ".nmw", ".safetensors", "_cpu.nim", ".metal", ".manifest.json",
                                       "_mlx.py")}
    assert tree(tmp_path) - before == {"work/out"} | {f"work/out/{f}" for f in expected}
    assert nb.load_spec(work / "out" / f"{stem}.json").name == name
    assert main(["inspect", f"out/{stem}.nmw"]) == 0
    assert "\x1b" not in capsys.readouterr().out
    assert main(["generate", f"out/{stem}.json", "-o", "gen", "-q"]) == 0
    assert {p.name for p in (work / "gen").iterdir()} == {f"{stem}{s}" for s in (".json", "_cpu.nim", ".metal",
                                                                                    ".manifest.json", "_mlx.py")}
    assert tree(tmp_path) - before - {"work/out"} - {f"work/out/{f}" for f in expected} == \
        {"work/gen"} | {f"work/gen/{p.name}" for p in (work / "gen").iterdir()}


def test_cli_hostile_file_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / 'evil"; {.emit: "x".} *\\ résumé\n.pt2'
    shutil.copyfile(DIGITS_PT2, src)
    assert main(["convert", str(src), "-o", "out", "--no-verify", "-q"]) == 0
    (spec,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".json" and "manifest" not in p.name]
    assert FILE_RE.fullmatch(spec.name) and is_valid_name(nb.load_spec(spec).name)
    assert tree(tmp_path) - {src.name} == {"out"} | {f"out/{p.name}" for p in (tmp_path / "out").iterdir()}


@needs_nim
def test_cli_convert_verified_with_a_hostile_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(DIGITS_PT2), "-o", "out", "--name", INJECTION, "-n", "64"]) == 0
    shown = capsys.readouterr().out
    assert "PASS" in shown and "FAIL" not in shown
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] is True and report["network"] == INJECTION
    assert {p.split("/")[0] for p in tree(tmp_path)} == {"out"}
