"""ParallelInferenceEngine: exact equality with the single-thread path, inputs, lifecycle, threads (needs nim)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import nnbridge as nb
from nnbridge import engine as engine_mod
from nnbridge.engine import MIN_CHUNK_ROWS, MIN_ROWS_PER_THREAD, ParallelInferenceEngine, plan_chunks
from nnbridge.errors import InputError, NNBridgeError
from nnbridge.net import InferenceResult, NeuralNet, probabilities_of
from tests.conftest import needs_nim, random_weights

pytestmark = needs_nim

ROOT = Path(__file__).resolve().parent.parent
M = MIN_ROWS_PER_THREAD
# odd sizes, around the per-thread minimum and the chunk size, and large enough for many chunks per thread
SIZES = (1, 2, 13, M - 1, M, M + 1, 2 * M - 1, 2 * M, 2 * M + 1, 3 * M + 7, 8 * M - 1, 8 * M + 5,
         MIN_CHUNK_ROWS * 2 + 1, 3 * MIN_CHUNK_ROWS - 11, 40_009)
THREADS = (2, 3, 8)


@pytest.fixture(scope="session")
def nim_cache(tmp_path_factory) -> Path:
    """One build cache for the whole test session (shared with test_nim_build and test_nim_verify)."""
    return tmp_path_factory.getbasetemp() / "nim-cache"


@pytest.fixture(scope="module")
def koan_net() -> NeuralNet:
    spec = nb.koan_classifier()
    return NeuralNet(spec, random_weights(spec, 11))


@pytest.fixture(scope="module")
def engines(koan_net, nim_cache):
    """``{threads: engine}`` over one network; threads=1 is the single-thread reference."""
    made = {t: ParallelInferenceEngine(koan_net, threads=t, cache_dir=nim_cache) for t in (1, *THREADS)}
    yield made
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((max(SIZES), 64)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(engines, batch) -> np.ndarray:
    """Single-thread outputs of the whole batch (one call of <name>_infer_batch)."""
    return engines[1].run(batch)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "digits_out"
    from nnbridge.pipeline import convert

    convert(ROOT / "examples" / "digits.pt2", out, verify=False)
    return out


def _recording(engine: ParallelInferenceEngine, monkeypatch) -> list[tuple[int, int, int]]:
    """Wrap the engine's library call; returns the list of (input address, rows, output address) calls."""
    calls: list[tuple[int, int, int]] = []
    real = engine._fn
    lock = threading.Lock()

    def fn(xp: int, n: int, op: int) -> int:
        with lock:
            calls.append((xp, n, op))
        return real(xp, n, op)

    monkeypatch.setattr(engine, "_fn", fn)
    return calls


# ------------------------------------------------------------- exactness
def test_single_thread_is_one_library_call(engines, batch, reference, koan_net, nim_cache, monkeypatch) -> None:
    from nnbridge.verify.nim import load_library

    lib = load_library(koan_net, cache_dir=nim_cache)
    assert reference.tobytes() == lib.infer_batch(batch).tobytes()
    calls = _recording(engines[1], monkeypatch)
    engines[1].run(batch)
    assert calls == [(batch.ctypes.data, len(batch), calls[0][2])]


@pytest.mark.parametrize("threads", THREADS)
def test_threads_give_exactly_the_single_thread_outputs(engines, batch, reference, threads) -> None:
    e = engines[threads]
    for n in SIZES:
        for start in (0, 3):  # a batch starting mid-array: any row offset
            x = batch[start:start + n]
            y = e.run(x)
            assert y.shape == (len(x), 23) and y.dtype == np.float32
            assert y.tobytes() == reference[start:start + n].tobytes(), (threads, n, start)


def test_outputs_match_torch(engines, batch, koan_net) -> None:
    x = batch[:3 * MIN_CHUNK_ROWS + 17]
    np.testing.assert_allclose(engines[3].run(x), koan_net.predict(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("threads", THREADS)
def test_batch_is_split_into_disjoint_chunks(engines, batch, monkeypatch, threads) -> None:
    e = engines[threads]
    calls = _recording(e, monkeypatch)
    for n in SIZES:
        calls.clear()
        x = batch[:n]
        out = e.run(x)
        starts = sorted(((xp - x.ctypes.data) // (4 * 64), rows, (op - out.ctypes.data) // (4 * 23))
                        for xp, rows, op in calls)
        parts, chunk = plan_chunks(n, threads)
        assert len(starts) == -(-n // chunk) and parts <= threads
        assert (parts > 1) == (n >= 2 * M)  # below twice the minimum one call does it
        pos = 0
        for s_in, rows, s_out in starts:  # contiguous, disjoint, input and output rows aligned
            assert s_in == s_out == pos and rows > 0
            assert rows == chunk or s_in + rows == n
            pos += rows
        assert pos == n


def test_plan_chunks() -> None:
    assert plan_chunks(1, 8) == (1, 1) and plan_chunks(2 * M - 1, 8)[0] == 1
    for n in (2 * M, 4096, 4097, 65536, 1_000_003):
        for threads in (2, 3, 8, 64):
            parts, chunk = plan_chunks(n, threads)
            assert 2 <= parts <= min(threads, n // M) and parts <= -(-n // chunk)
            assert chunk % engine_mod.ROW_ALIGN == 0 and chunk >= min(MIN_CHUNK_ROWS, n // parts)
    assert -(-65536 // plan_chunks(65536, 2)[1]) == 2 * engine_mod.CHUNKS_PER_THREAD  # balanced on a busy machine


def test_engine_from_an_output_folder(digits_folder, nim_cache) -> None:
    from nnbridge.pipeline import open_output, predict_folder

    folder = open_output(digits_folder)
    net = folder.network()
    x = np.random.default_rng(2).standard_normal((5 * M + 3, 64)).astype(np.float32)
    with ParallelInferenceEngine(digits_folder, threads=1, cache_dir=nim_cache) as one, \
            ParallelInferenceEngine(str(digits_folder), threads=3, cache_dir=nim_cache) as three:
        assert (one.network, one.input_size, one.output_size) == ("digits", 64, 10)
        ref = one.run(x)
        for n in (0, 1, 7, M + 1, 2 * M + 1, len(x)):
            assert three.run(x[:n]).tobytes() == ref[:n].tobytes()
        np.testing.assert_allclose(ref, net.predict(x), rtol=0, atol=1e-5)
        r = three.infer_batch(x)
        assert r.outputs.tobytes() == ref.tobytes()
        np.testing.assert_array_equal(r.categories, probabilities_of(ref, nb.Activation.SOFTMAX).argmax(axis=1))
    with ParallelInferenceEngine(net, threads=2, cache_dir=nim_cache) as from_net:
        assert from_net.run(x).tobytes() == ref.tobytes()  # the folder's code and weights are the network's
    assert predict_folder(folder, x, threads=2).tobytes() == ref.tobytes()


# ----------------------------------------------------------------- inputs
@pytest.mark.parametrize("threads", (1, 3))
def test_contiguous_float32_input_is_not_copied(engines, batch, monkeypatch, threads) -> None:
    e = engines[threads]
    x = batch[:4 * M + 1]
    copies: list[object] = []
    for name in ("ascontiguousarray", "array", "require", "copy"):
        real = getattr(np, name)
        monkeypatch.setattr(engine_mod.np, name, lambda *a, _r=real, _n=name, **k: copies.append(_n) or _r(*a, **k))
    calls = _recording(e, monkeypatch)
    e.run(x)
    monkeypatch.undo()
    assert copies == []
    assert min(xp for xp, _, _ in calls) == x.ctypes.data  # the library read the caller's buffer itself


@pytest.mark.parametrize("threads", (1, 3))
def test_non_contiguous_and_unaligned_inputs_work(engines, batch, reference, threads) -> None:
    e = engines[threads]
    n = 4 * M + 3
    ref = reference[:n].tobytes()
    fortran = np.asfortranarray(batch[:n])
    strided = np.repeat(batch[:n], 2, axis=0)[::2]
    wide = np.concatenate([batch[:n], np.zeros((n, 5), np.float32)], axis=1)[:, :64]
    raw = bytearray(batch[:n].nbytes + 1)
    unaligned = np.frombuffer(raw, np.uint8)[1:].view(np.float32).reshape(n, 64)
    unaligned[...] = batch[:n]
    assert not unaligned.flags.aligned and unaligned.flags.c_contiguous
    readonly = batch[:n].copy()
    readonly.flags.writeable = False
    for x in (fortran, strided, wide, unaligned, readonly):
        assert e.run(x).tobytes() == ref
    assert e.run(batch[:n][::-1]).tobytes() == reference[:n][::-1].tobytes()


@pytest.mark.parametrize("threads", (1, 3))
def test_empty_batch(engines, threads) -> None:
    e = engines[threads]
    y = e.run(np.zeros((0, 64), np.float32))
    assert y.shape == (0, 23) and y.dtype == np.float32
    r = e.infer_batch(np.zeros((0, 64), np.float32))
    assert r.probabilities.shape == (0, 23) and r.probabilities.dtype == np.float32
    assert r.categories.shape == (0,) and r.categories.dtype == np.int64
    assert r.confidences.shape == (0,) and r.confidences.dtype == np.float32
    assert len(r) == 0 and r.throughput == 0.0 and r.outputs.shape == (0, 23)
    with pytest.raises(InputError, match=r"takes inputs \[n, 64\], found shape \[0, 5\]"):
        e.run(np.zeros((0, 5), np.float32))


@pytest.mark.parametrize("threads", (1, 3))
def test_bad_inputs_raise_input_error(engines, threads) -> None:
    e = engines[threads]
    cases = [
        (np.zeros((4, 63), np.float32), r"network 'KoanClassifier' takes inputs \[n, 64\], found shape \[4, 63\]"),
        (np.zeros(64, np.float32), r"takes inputs \[n, 64\], found shape \[64\]"),
        (np.zeros((2, 2, 64), np.float32), r"takes inputs \[n, 64\], found shape \[2, 2, 64\]"),
        (np.zeros((4, 64)), r"inputs must be float32 \(convert with x.astype\(np.float32\)\), found float64"),
        (np.zeros((4, 64), np.int32), r"must be float32 .*found int32"),
        (np.zeros((4, 64), ">f4"), r"must be float32 .*found >f4"),
        ([[0.0] * 64], r"inputs must be a numpy array \[n, 64\] of float32, found list"),
        (None, r"must be a numpy array .* found NoneType"),
    ]
    for x, msg in cases:
        with pytest.raises(InputError, match=msg):
            e.run(x)
        with pytest.raises(InputError, match=msg):
            e.infer_batch(x)
    assert issubclass(InputError, ValueError)


def test_threads_argument(koan_net, nim_cache) -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer or None"):
            ParallelInferenceEngine(koan_net, threads=bad, cache_dir=nim_cache)
    with ParallelInferenceEngine(koan_net, cache_dir=nim_cache) as e:
        assert e.threads == engine_mod.available_cores() >= 1
    with ParallelInferenceEngine(koan_net, threads=np.int64(2), cache_dir=nim_cache) as e:
        assert e.threads == 2 and type(e.threads) is int


def test_a_nim_file_alone_is_not_a_source(digits_folder, nim_cache) -> None:
    with pytest.raises(NNBridgeError, match="pass a NeuralNet or an output folder"):
        ParallelInferenceEngine(digits_folder / "digits_cpu.nim", cache_dir=nim_cache)


def test_library_failure_is_an_error(engines, batch, monkeypatch) -> None:
    for threads in (1, 3):
        e = engines[threads]
        monkeypatch.setattr(e, "_fn", lambda xp, n, op: -3)
        with pytest.raises(NNBridgeError, match="KoanClassifier: the compiled library failed: out of memory"):
            e.run(batch[:4 * M])
        monkeypatch.undo()
    e = engines[3]
    real = e._fn
    helpers = set()

    def fails_off_the_caller(xp: int, n: int, op: int) -> int:  # raises on the helper threads only
        if threading.current_thread() is not threading.main_thread():
            helpers.add(threading.current_thread().name)
            raise RuntimeError("boom in a helper")
        time.sleep(0.005)  # leave the helpers time to take chunks
        return real(xp, n, op)

    monkeypatch.setattr(e, "_fn", fails_off_the_caller)
    with pytest.raises(RuntimeError, match="boom in a helper"):
        e.run(batch[:16 * M])
    monkeypatch.undo()
    assert helpers and all(t.is_alive() for t in _pool_threads())  # the helpers survive a failed chunk
    assert e.run(batch[:16 * M]).shape == (16 * M, 23)


# -------------------------------------------------------------- lifecycle
def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nnbridge")]


def test_close_and_context_manager(koan_net, nim_cache, batch) -> None:
    before = len(_pool_threads())
    e = ParallelInferenceEngine(koan_net, threads=3, cache_dir=nim_cache)
    assert "3 threads" in repr(e) and not e.closed
    assert len(_pool_threads()) == before + 2  # the caller works too: threads - 1 helpers
    e.run(batch[:8 * M])
    e.close()
    assert e.closed and "closed" in repr(e) and len(_pool_threads()) == before
    e.close()  # idempotent
    for call in (e.run, e.infer_batch):
        for x in (batch[:8 * M], batch[:1], batch[:0]):
            with pytest.raises(NNBridgeError, match="the engine is closed; create a new ParallelInferenceEngine"):
                call(x)
    for threads in (1, 2):
        with ParallelInferenceEngine(koan_net, threads=threads, cache_dir=nim_cache) as e2:
            assert e2.run(batch[:4 * M]).shape == (4 * M, 23)
        assert e2.closed and len(_pool_threads()) == before
        with pytest.raises(NNBridgeError, match="closed"):
            e2.run(batch[:4 * M])


def test_a_dropped_engine_stops_its_threads(koan_net, nim_cache, batch) -> None:
    before = {t.ident for t in _pool_threads()}
    e = ParallelInferenceEngine(koan_net, threads=4, cache_dir=nim_cache)
    e.run(batch[:8 * M])
    mine = [t for t in _pool_threads() if t.ident not in before]
    assert len(mine) == 3 and all(t.daemon for t in mine)
    del e
    gc.collect()
    for t in mine:
        t.join(10)
    assert not any(t.is_alive() for t in mine)


def test_close_while_another_thread_runs(koan_net, nim_cache, batch, reference) -> None:
    e = ParallelInferenceEngine(koan_net, threads=3, cache_dir=nim_cache)
    outcomes: list[str] = []
    started = threading.Event()

    def work() -> None:
        while True:
            try:
                y = e.run(batch[:16 * M])
            except NNBridgeError as err:
                outcomes.append("closed" if "closed" in str(err) else repr(err))
                return
            outcomes.append("ok" if y.tobytes() == reference[:16 * M].tobytes() else "WRONG")
            started.set()

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(60)
    e.close()
    t.join(60)
    assert not t.is_alive() and outcomes[-1] == "closed" and set(outcomes[:-1]) == {"ok"}


# ---------------------------------------------------------------- results
def test_inference_result(engines, batch) -> None:
    x = batch[:3 * M + 1]
    r = engines[3].infer_batch(x)
    y = engines[1].run(x)
    assert isinstance(r, InferenceResult) and len(r) == len(x)
    assert r.outputs.tobytes() == y.tobytes()
    assert r.probabilities.shape == (len(x), 23) and r.probabilities.dtype == np.float32
    np.testing.assert_array_equal(r.probabilities, probabilities_of(y, nb.Activation.SOFTMAX))
    assert r.categories.shape == (len(x),) and r.categories.dtype == np.int64
    np.testing.assert_array_equal(r.categories, r.probabilities.argmax(axis=1))
    assert r.confidences.shape == (len(x),) and r.confidences.dtype == np.float32
    np.testing.assert_array_equal(r.confidences, r.probabilities[np.arange(len(x)), r.categories])
    assert r.elapsed > 0 and r.throughput == pytest.approx(len(x) / r.elapsed)


def test_binary_classifier_probabilities(nim_cache) -> None:
    spec = nb.new_network("Binary", input_size=6).add_dense("h", 6, 9, "relu").add_dense("o", 9, 1, "sigmoid")
    net = NeuralNet(spec, random_weights(spec, 4))
    x = np.random.default_rng(0).standard_normal((2 * M + 5, 6)).astype(np.float32)
    with ParallelInferenceEngine(net, threads=2, cache_dir=nim_cache) as e:
        r = e.infer_batch(x)
    assert r.outputs.shape == (len(x), 1) and r.probabilities.shape == (len(x), 2)
    np.testing.assert_array_equal(r.categories, (r.outputs[:, 0] > 0.5).astype(np.int64))
    np.testing.assert_allclose(r.outputs, net.predict(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- threads
def test_several_python_threads_at_once(engines, batch, reference) -> None:
    e = engines[3]
    errors: list[str] = []
    barrier = threading.Barrier(6)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(25):
            n = int(rng.integers(0, 6 * M))
            s = int(rng.integers(0, len(batch) - n))
            got = e.run(batch[s:s + n]) if seed % 2 else e.infer_batch(batch[s:s + n]).outputs
            if got.tobytes() != reference[s:s + n].tobytes():
                errors.append(f"thread {seed}: rows {s}..{s + n} differ")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)
