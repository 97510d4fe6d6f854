"""NimBuild and NimLibrary: cache, errors, warnings, the C ABI, threads, the Nim API (needs nim / gcc)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import nnbridge as nb
from nnbridge.codegen import GenerateOptions
from nnbridge.codegen.nim import render_kernels, render_module
from nnbridge.errors import BuildError
from nnbridge.net import NeuralNet
from tests.conftest import KOAN_NMW, needs_nim, random_weights

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="session")
def nim_cache(tmp_path_factory) -> Path:
    """One build cache for the whole test session (shared with test_nim_verify)."""
    return tmp_path_factory.getbasetemp() / "nim-cache"


def tiny(name: str, act: str = "relu") -> NeuralNet:
    spec = nb.new_network(name, input_size=5).add_dense("h", 5, 7, act).add_dense("o", 7, 3, "softmax")
    return NeuralNet(spec, random_weights(spec, 9))


# ------------------------------------------------------------------ errors
def test_missing_nim_says_how_to_install(tmp_path) -> None:
    from nnbridge.verify.nim import NimBuild

    build = NimBuild(nb.koan_classifier(), cache_dir=tmp_path, nim="definitely-not-a-nim-compiler")
    with pytest.raises(BuildError, match=r"nim not found: install it with `apt-get install nim` \(Debian/Ubuntu\) "
                                         r"or `brew install nim` \(macOS\)"):
        build.build()


@needs_nim
def test_compiler_error_names_first_error_and_log(tmp_path) -> None:
    from nnbridge.verify.nim import NimBuild

    src = tmp_path / "Broken_cpu.nim"
    text = render_module(nb.koan_classifier()).replace("proc isLoaded*(w: Weights): bool =",
                                                       "proc isLoaded*(w: Weights): bool = undefinedThing +")
    src.write_text(text)
    with pytest.raises(BuildError) as err:
        NimBuild(src, cache_dir=tmp_path / "cache").build()
    msg = str(err.value)
    assert "compiling Broken_cpu.nim failed:" in msg and "Error:" in msg and "undefinedThing" in msg
    log = Path(msg.rsplit("(full log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "undefinedThing" in log.read_text()
    assert not list((tmp_path / "cache").glob("Broken_cpu-*"))  # nothing half-built in the cache


def test_not_a_generated_module(tmp_path) -> None:
    from nnbridge.verify.nim import NimBuild

    src = tmp_path / "hello.nim"
    src.write_text('echo "hello"\n')
    with pytest.raises(BuildError, match="no exported <name>_infer_batch"):
        NimBuild(src, cache_dir=tmp_path)


# ------------------------------------------------------------------- cache
@needs_nim
def test_second_build_is_instant_and_flags_matter(nim_cache) -> None:
    from nnbridge.verify.nim import NimBuild

    net = NeuralNet(nb.koan_classifier())
    first = NimBuild(net.spec, cache_dir=nim_cache)
    path = first.build()
    log = (first.entry_dir / "build.log").read_text()
    assert "Warning" not in log and "warning:" not in log, log  # --warnings:on, and gcc is quiet
    again = NimBuild(net.spec, cache_dir=nim_cache)
    assert again.cached()
    t0 = time.perf_counter()
    assert again.build() == path
    assert time.perf_counter() - t0 < 1.0
    assert NimBuild(net.spec, cache_dir=nim_cache, portable=True).key != first.key
    assert "--passC:-march=native" in first.flags() and "-d:release" in first.flags()
    assert "--passC:-march=native" not in NimBuild(net.spec, cache_dir=nim_cache, portable=True).flags()


@needs_nim
def test_corrupted_entry_is_rebuilt(nim_cache) -> None:
    from nnbridge.verify.nim import NimBuild

    net = tiny("CorruptMe")
    build = NimBuild(net.spec, cache_dir=nim_cache)
    path = build.build()
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert not build.cached()
    assert build.build() == path and build.cached()
    lib = build.load(net)
    x = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32)
    np.testing.assert_allclose(lib.infer_batch(x), net.predict(x, backend="mlx"), atol=2e-6)


@needs_nim
def test_concurrent_builds_of_one_source(nim_cache) -> None:
    from nnbridge.verify.nim import NimBuild

    net = tiny("Concurrent", act="tanh")
    results: list[object] = []

    def work() -> None:
        try:
            results.append(NimBuild(net.spec, cache_dir=nim_cache).build())
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(map(str, results))) == 1 and isinstance(results[0], Path), results
    assert NimBuild(net.spec, cache_dir=nim_cache).cached()
    assert not list(nim_cache.glob(".Concurrent*"))  # no temp folders left behind


@needs_nim
def test_portable_build(nim_cache) -> None:
    from nnbridge.verify.nim import NimBuild

    net = tiny("Portable", act="gelu")
    lib = NimBuild(net.spec, cache_dir=nim_cache, portable=True).load(net)
    assert lib.vector_width == 4  # x86-64 / aarch64 baseline: 128-bit vectors
    x = np.random.default_rng(1).standard_normal((30, 5)).astype(np.float32)
    np.testing.assert_allclose(lib.infer_batch(x), net.predict(x, backend="mlx"), atol=2e-6)


@needs_gcc
@pytest.mark.parametrize("flags", [["-march=native"], [], ["-mavx2", "-mfma"]])
def test_kernels_compile_warning_free(tmp_path, flags) -> None:
    """The emitted C under gcc -Wall -Wextra -Wpedantic -Werror, for every vector width."""
    spec = (nb.new_network("Warn", input_size=19).add_batch_norm("bn", 19, activation="gelu")
            .add_dense("a", 19, 70, "leaky_relu").add_dense("b", 70, 129, "softmax")
            .add_dense("c", 129, 5, "silu").add_dense("d", 5, 3, "softmax"))
    src = tmp_path / "k.c"
    src.write_text(render_kernels(spec) + "int use(const float *w, const float *x, ptrdiff_t n, float *y) {\n"
                   "  return nnb_forward(w, x, n, y) + nnb_forward_upto(w, x, n, y, 1) + nnb_vector_width();\n}\n")
    proc = subprocess.run(["gcc", "-std=gnu11", "-O2", *flags, "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-c",
                           str(src), "-o", str(tmp_path / "k.o")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr


# ----------------------------------------------------------------- library
@pytest.fixture(scope="module")
def koan(nim_cache):
    from nnbridge.verify.nim import load_library

    w = nb.load_nmw(KOAN_NMW)
    net = NeuralNet(w.spec, w)
    return net, load_library(net, cache_dir=nim_cache)


@needs_nim
def test_library_object(koan) -> None:
    net, lib = koan
    assert (lib.network, lib.input_size, lib.output_size, lib.layer_widths) == ("KoanClassifier", 64, 23, [64, 23])
    assert lib.spec is not None and lib.spec.layers[-1].activation is nb.Activation.SOFTMAX
    assert lib.fast_path, lib.fast_path_error
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    ref = net.predict(x, backend="mlx")
    np.testing.assert_allclose(lib.infer(x), ref, atol=2e-6)
    np.testing.assert_allclose(lib.infer(x[0]), ref[0], atol=2e-6)
    np.testing.assert_allclose(lib.infer(x.astype(np.float64).tolist()), ref, atol=2e-6)  # converted once
    np.testing.assert_allclose(lib.infer(np.asfortranarray(x)), ref, atol=2e-6)
    np.testing.assert_array_equal(lib._infer_ctypes(x), lib.infer(x))  # the ctypes path computes the same
    np.testing.assert_array_equal(lib(x), lib.infer_batch(x))
    assert lib.infer(np.zeros((0, 64), np.float32)).shape == (0, 23)
    with pytest.raises(ValueError, match="takes 64 features per sample"):
        lib.infer(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \[batch, 64\]"):
        lib.infer_batch(np.zeros(64, np.float32))
    out = np.empty((5, 23), np.float32)
    assert lib.batch_function(x.ctypes.data, 5, out.ctypes.data) == 0
    np.testing.assert_array_equal(out, lib.infer(x))


@needs_nim
def test_private_copies_keep_their_own_weights(koan, nim_cache) -> None:
    from nnbridge.verify.nim import NimLibrary

    net, lib = koan
    other = NimLibrary(lib.path, lib.ident, spec=net.spec, cache_dir=nim_cache)
    zero = NeuralNet(net.spec)
    other.load_weights(zero)
    x = np.ones((3, 64), np.float32)
    np.testing.assert_allclose(other.infer(x), np.full((3, 23), 1 / 23, np.float32), rtol=1e-6)
    np.testing.assert_allclose(lib.infer(x), net.predict(x, backend="mlx"), atol=2e-6)


@needs_nim
def test_batch_function_is_thread_safe(koan) -> None:
    """The ParallelInferenceEngine calls <name>_infer_batch on slices from several threads at once; the
    results are bit-identical to one call over the whole batch (tail rows sum in the same order)."""
    _, lib = koan
    x = np.random.default_rng(3).standard_normal((4099, 64)).astype(np.float32)
    expected = lib.infer_batch(x)
    out = np.empty_like(expected)
    bounds = [(0, 1000), (1000, 2007), (2007, 3000), (3000, 4099)]

    def work(lo: int, hi: int) -> None:
        for _ in range(20):
            assert lib.batch_function(x[lo:].ctypes.data, hi - lo, out[lo:].ctypes.data) == 0

    threads = [threading.Thread(target=work, args=b) for b in bounds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out.tobytes() == expected.tobytes()


@needs_nim
def test_module_is_usable_from_nim(koan, tmp_path) -> None:
    """A Nim program imports the module: loadWeights, infer, inferBatch, inferLayer, embedded weights."""
    net, _ = koan
    module = render_module(net, GenerateOptions(embed_weights=True))
    (tmp_path / "KoanClassifier_cpu.nim").write_text(module)
    (tmp_path / "main.nim").write_text(f"""
import KoanClassifier_cpu
let w = loadWeights("{KOAN_NMW}")
var x: array[nInputs, float32]
for i in 0 ..< nInputs: x[i] = float32(i mod 7) / 7'f32 - 0.4'f32
let y = infer(w, x)
let e = infer(embeddedWeights(), x)
let ys = inferBatch(w, @x & @x)
var hidden = newSeq[float32](layerWidths[0])
inferLayer(w, 0, x, hidden)
doAssert y == e and ys[0 ..< nOutputs] == @y and ys[nOutputs ..< 2 * nOutputs] == @y
for v in y: echo v
try:
  discard loadWeights("{tmp_path / 'missing.nmw'}")
except NMWError as err:
  echo "NMWError ", err.msg
""")
    exe = tmp_path / "main"
    proc = subprocess.run(["nim", "c", "-d:release", "--hints:off", "--warnings:on", "--passC:-march=native",
                           f"--nimcache:{tmp_path / 'nimcache'}", f"-o:{exe}", str(tmp_path / "main.nim")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    lines = run.stdout.splitlines()
    x = np.array([(i % 7) / 7 - 0.4 for i in range(64)], np.float32)
    got = np.array([float(v) for v in lines[:23]], np.float32)
    np.testing.assert_allclose(got, net.predict(x, backend="mlx"), atol=2e-6)
    assert lines[23].startswith("NMWError ") and "missing.nmw: cannot read" in lines[23]


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    from nnbridge.verify.nim import default_cache_dir

    monkeypatch.delenv("NNBRIDGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "nnbridge" / "nim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "nnbridge" / "nim"
    monkeypatch.setenv("NNBRIDGE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "nim"
