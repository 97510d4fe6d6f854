"""Load test of the ParallelInferenceEngine (issue 7): many Python threads, many calls, one engine.

8 Python threads × 200 calls of random batch sizes (1 … 10 000) against one engine: every
result equals the single-thread reference exactly, nothing crashes, no thread outlives
``close()``, and memory stays bounded (tracemalloc: nothing retained, a bounded peak; RSS
from /proc/self/statm: growth under ``RSS_BOUND`` = 64 MiB after a warm-up). About 8 M samples in all,
through the small Koan network (64-64-23), so it runs in seconds (needs nim).
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import nnbridge as nb
from nnbridge.engine import ParallelInferenceEngine
from nnbridge.net import NeuralNet, probabilities_of
from tests.conftest import needs_nim, random_weights

pytestmark = needs_nim

CALLERS = 8  # Python threads calling the engine at once
CALLS = 200  # calls per Python thread
MAX_BATCH = 10_000
ENGINE_THREADS = 4  # more than the cores of a small CI machine: the pool is oversubscribed on purpose
WARMUP_CALLS = 50  # per caller, before memory is measured
# RSS growth allowed after the warm-up. The allocator's per-thread arenas keep freed batches: RSS
# rises ~50 MiB in the first 10 calls per caller, ~20 MiB more by 100, then creeps to a plateau
# (+85 MiB after 2 500 calls, the same with a 1-thread engine); a leaked output would add ~0.5 MiB/call.
RSS_BOUND = 64 << 20
TRACED_BOUND = 1 << 20  # bytes still allocated (tracemalloc) once every result is dropped
PEAK_BOUND = CALLERS * (16 << 20)  # traced peak: one batch in flight per caller (a 10 000-row call needs < 12 MiB)
STATM = Path("/proc/self/statm")


@pytest.fixture(scope="session")
def nim_cache(tmp_path_factory) -> Path:
    """One build cache for the whole test session (shared with the other Nim tests)."""
    return tmp_path_factory.getbasetemp() / "nim-cache"


def rss() -> int | None:
    """Resident set size in bytes (Linux), else None."""
    try:
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def hammer(engine: ParallelInferenceEngine, x: np.ndarray, ref: np.ndarray, cats: np.ndarray, calls: int,
           seed: int, errors: list[str], done: dict[int, int]) -> None:
    """``calls`` calls of random sizes and row offsets; every 4th through infer_batch, every 7th a strided copy."""
    rng = np.random.default_rng(seed)
    done[seed] = 0
    try:
        for i in range(calls):
            n = int(rng.integers(1, MAX_BATCH + 1))
            s = int(rng.integers(0, len(x) - n + 1))
            xs = x[s:s + n]
            if i % 7 == 3:
                xs = np.asfortranarray(xs)  # the engine's copy path, under load too
            if i % 4 == 1:
                r = engine.infer_batch(xs)
                got = r.outputs
                if not np.array_equal(r.categories, cats[s:s + n]) or len(r) != n:
                    errors.append(f"caller {seed} call {i}: categories of rows {s}..{s + n} differ")
            else:
                got = engine.run(xs)
            if got.shape != (n, ref.shape[1]) or got.tobytes() != ref[s:s + n].tobytes():
                errors.append(f"caller {seed} call {i}: outputs of rows {s}..{s + n} differ")
            done[seed] += 1
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(f"caller {seed}: {type(e).__name__}: {e}")


def run_callers(engine: ParallelInferenceEngine, x: np.ndarray, ref: np.ndarray, cats: np.ndarray, calls: int,
                seed0: int) -> tuple[list[str], list[int]]:
    errors: list[str] = []
    done: dict[int, int] = {}
    threads = [threading.Thread(target=hammer, args=(engine, x, ref, cats, calls, seed0 + k, errors, done),
                                name=f"caller-{k}") for k in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a caller is stuck"
    return errors, [done.get(seed0 + k, 0) for k in range(CALLERS)]


def test_eight_threads_two_hundred_calls_each(nim_cache) -> None:
    spec = nb.koan_classifier()
    net = NeuralNet(spec, random_weights(spec, 7))
    x = np.random.default_rng(0).standard_normal((MAX_BATCH + 4096, 64)).astype(np.float32)
    threads_before = threading.active_count()
    alive_before = set(threading.enumerate())
    with ParallelInferenceEngine(net, threads=1, cache_dir=nim_cache) as single:
        ref = single.run(x)  # the single-thread reference: one call over every row
    cats = probabilities_of(ref, nb.Activation.SOFTMAX).argmax(axis=1)
    np.testing.assert_allclose(ref[:512], net.predict(x[:512]), rtol=0, atol=1e-5)

    engine = ParallelInferenceEngine(net, threads=ENGINE_THREADS, cache_dir=nim_cache)
    # warm-up: the pool threads, the allocator's arenas of every caller, numpy's caches
    errors, _ = run_callers(engine, x, ref, cats, WARMUP_CALLS, seed0=100)
    assert errors == []
    tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    rss0 = rss()

    t0 = time.perf_counter()
    errors, done = run_callers(engine, x, ref, cats, CALLS, seed0=0)
    elapsed = time.perf_counter() - t0

    traced1, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = rss()
    engine.close()
    engine.close()

    assert errors == [], errors[:5]
    assert done == [CALLS] * CALLERS
    alive_after = set(threading.enumerate())
    assert not alive_after - alive_before, f"threads left running: {[t.name for t in alive_after - alive_before]}"
    # (a thread of an earlier test that ended meanwhile is not ours to count)
    assert threading.active_count() == threads_before - len(alive_before - alive_after)
    # every result was dropped: what is still traced is the interpreter's bookkeeping, not batches
    assert traced1 - traced0 < TRACED_BOUND, f"{(traced1 - traced0) / 2**20:.1f} MiB still allocated"
    # at most one batch in flight per caller (input copy, outputs, probabilities in float64)
    assert traced_peak - traced0 < PEAK_BOUND, f"traced peak {(traced_peak - traced0) / 2**20:.0f} MiB"
    if rss0 is not None and rss1 is not None:
        assert rss1 - rss0 < RSS_BOUND, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB (bound {RSS_BOUND >> 20} MiB)"
    samples = CALLERS * CALLS * MAX_BATCH / 2
    print(f"\n{CALLERS}x{CALLS} calls, ~{samples / 1e6:.0f}M samples in {elapsed:.1f} s; RSS "
          f"{(rss1 - rss0) / 2**20 if rss0 and rss1 else float('nan'):+.1f} MiB, traced peak "
          f"{(traced_peak - traced0) / 2**20:.1f} MiB")
