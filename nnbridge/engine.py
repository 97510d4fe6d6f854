"""ParallelInferenceEngine: the compiled generated Nim code, on many threads, over numpy batches.

The batch is cut into contiguous row chunks; each chunk is one call of the library's
exported ``<name>_infer_batch(x, n, out)``. ctypes releases the GIL for the call, so
chunks run truly in parallel: the calling thread and ``threads - 1`` helper threads take
chunks from a shared counter until none is left (a thread slowed down by a busy machine
simply takes fewer, and the caller never waits for a helper that took none). Input
already C-contiguous, aligned float32 is not copied; the output is allocated once and
each chunk writes its own rows, so results are bit-identical to the single-threaded path
(a sample's outputs do not depend on its chunk).

The helpers are plain daemon threads fed by a ``queue.SimpleQueue``; the caller waits on
one lock that the thread finishing the last chunk releases — about half the hand-off cost
of a ``concurrent.futures`` pool, which matters at a few thousand rows per call.
"""

from __future__ import annotations

import itertools
import numbers
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import InputError, NNBridgeError
from nnbridge.net import InferenceResult, NeuralNet

# Measured on a 2-vCPU VM whose idle vCPUs halt at once (no guest halt polling): waking a helper
# costs ~60-70 µs, as long as ~700 rows of Koan. Splitting 1024 rows in two ran at 0.6x of one
# thread; chunks of 768 rows let the caller work while the helper wakes (4096 rows: 1.5x, where
# two halves gave 1.25x; 65536: 1.9x).
MIN_ROWS_PER_THREAD = 1024  # a batch of fewer than twice this runs on the calling thread alone
MIN_CHUNK_ROWS = 768  # smallest chunk: a call costs a few µs (ctypes, the GIL)
CHUNKS_PER_THREAD = 4  # chunks per thread on large batches: load balancing on a shared machine
ROW_ALIGN = 48  # chunk sizes are multiples of this (of the kernels' 12-sample blocks): no row-wise tails
CLOSED = "the engine is closed; create a new ParallelInferenceEngine"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def plan_chunks(n: int, threads: int) -> tuple[int, int]:
    """``(threads used, rows per chunk)`` for a batch of ``n`` rows (the last chunk may be shorter)."""
    parts = min(threads, max(1, n // MIN_ROWS_PER_THREAD))
    if parts == 1:
        return 1, max(n, 1)
    per_thread = -(-n // parts)
    chunk = max(-(-n // (parts * CHUNKS_PER_THREAD)), min(MIN_CHUNK_ROWS, per_thread))
    chunk = -(-chunk // ROW_ALIGN) * ROW_ALIGN
    return min(parts, -(-n // chunk)), chunk


def _serve(jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    """A helper thread: run jobs until the ``None`` that stops it."""
    while True:
        job = jobs.get()
        if job is None:
            return
        job()


def _stop(jobs: queue.SimpleQueue[Callable[[], None] | None], count: int) -> None:
    for _ in range(count):
        jobs.put(None)


class _Helpers:
    """``count`` daemon threads running jobs from one queue; stopped by :meth:`close` or when collected."""

    def __init__(self, count: int) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=_serve, args=(self.jobs,), name=f"nnbridge-{i}", daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()
        self._finalizer = weakref.finalize(self, _stop, self.jobs, count)

    def close(self) -> None:
        """Let the queued jobs finish, then stop and join the threads."""
        self._finalizer()
        for t in self.threads:
            t.join()


class ParallelInferenceEngine:
    """High-throughput batch inference with the compiled Nim library of a network.

    ``source`` is a :class:`NeuralNet` (its Nim code is generated and built, cached) or an
    output folder of ``nnbridge convert`` (its ``*_cpu.nim`` is built and its ``.nmw``
    loaded). ``threads=None`` uses every core this process may run on. Safe to call from
    several Python threads at once; :meth:`close` (or a ``with`` block) stops the threads.
    """

    def __init__(self, source: NeuralNet | str | PathLike[str], threads: int | None = None, *,
                 cache_dir: str | PathLike[str] | None = None, portable: bool = False) -> None:
        from nnbridge.verify.nim import load_library

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                    or threads < 1):
            raise InputError(f"threads must be a positive integer or None, found {threads!r}")
        self.threads: int = int(threads) if threads is not None else available_cores()
        self._lib = load_library(source if isinstance(source, NeuralNet) else Path(source),
                                 cache_dir=cache_dir, portable=portable)
        if self._lib.spec is None or not self._lib.loaded:
            raise NNBridgeError(f"{source}: pass a NeuralNet or an output folder of `nnbridge convert` (with its "
                                ".nmw weights)")
        self.network = self._lib.network
        self.input_size: int = self._lib.input_size
        self.output_size: int = self._lib.output_size
        self._last_activation = self._lib.spec.layers[-1].activation
        self._fn = self._lib.batch_function
        # the calling thread takes chunks itself, so one helper thread less
        self._helpers: _Helpers | None = _Helpers(self.threads - 1) if self.threads > 1 else None
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.threads} threads"
        return f"ParallelInferenceEngine({self.network!r}, {self.input_size} -> {self.output_size}, {state})"

    # ------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Stop the helper threads (the batches already running finish first). Idempotent."""
        with self._lock:
            self._closed = True
            helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.close()

    def __enter__(self) -> ParallelInferenceEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------- running
    def _check(self, x: Any) -> np.ndarray:
        if self._closed:
            raise NNBridgeError(CLOSED)
        if not isinstance(x, np.ndarray):
            raise InputError(f"inputs must be a numpy array [n, {self.input_size}] of float32, found "
                             f"{type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise InputError(f"network {self.network!r} takes inputs [n, {self.input_size}], found shape "
                             f"{list(x.shape)}")
        if x.dtype != np.float32:
            raise InputError(f"inputs must be float32 (convert with x.astype(np.float32)), found {x.dtype}")
        if x.flags.c_contiguous and x.flags.aligned:
            return x
        return np.array(x, dtype=np.float32, order="C", copy=True)

    def _fail(self, rc: int) -> None:
        why = {-1: "no weights loaded", -2: "bad arguments", -3: "out of memory"}.get(rc, f"error {rc}")
        raise NNBridgeError(f"{self.network}: the compiled library failed: {why}")

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw network outputs ``[n, out]`` (float32) for a float32 batch ``[n, in]``."""
        x = self._check(x)
        n = x.shape[0]
        out = np.empty((n, self.output_size), np.float32)
        if n == 0:
            return out
        fn, xp, op = self._fn, x.ctypes.data, out.ctypes.data
        parts, chunk = plan_chunks(n, self.threads)
        if parts == 1:
            rc = fn(xp, n, op)
            if rc:
                self._fail(rc)
            return out
        in_b, out_b = 4 * self.input_size, 4 * self.output_size
        n_chunks = -(-n // chunk)
        take = itertools.count()  # next() is atomic: each chunk is taken exactly once ...
        finished = itertools.count(1)  # ... and exactly one thread finishes the last one
        done = threading.Lock()
        done.acquire()
        failures: list[int | BaseException] = []

        def drain() -> bool:
            """Take chunks until none is left; True when this thread finished the batch's last chunk."""
            last = False
            while True:
                i = next(take)
                if i >= n_chunks:
                    return last
                s = i * chunk
                try:
                    rc: int | BaseException = fn(xp + s * in_b, min(chunk, n - s), op + s * out_b)
                except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                    rc = e
                if rc:
                    failures.append(rc)
                last = next(finished) == n_chunks

        # The helpers hold the buffers through `keep` until every chunk is done, so an interrupted
        # caller cannot free them under a helper; then it is emptied: a helper job still queued
        # (it would find no chunk) holds nothing.
        keep: list[np.ndarray] = [x, out]

        def helper() -> None:
            if keep and drain():
                done.release()

        with self._lock:  # close() lets the jobs queued before it finish
            if self._helpers is None:
                raise NNBridgeError(CLOSED)
            for _ in range(parts - 1):
                self._helpers.jobs.put(helper)
        if not drain():  # the caller works too, then waits for the chunks still running elsewhere
            done.acquire()
        keep.clear()
        for rc in failures:
            if isinstance(rc, BaseException):
                raise rc
            self._fail(rc)
        return out

    def infer_batch(self, x: np.ndarray) -> InferenceResult:
        """Outputs, probabilities, categories and confidences of a batch, with throughput."""
        t0 = time.perf_counter()
        y = self.run(x)
        return InferenceResult.from_outputs(y, self._last_activation, time.perf_counter() - t0, keep_outputs=True)
