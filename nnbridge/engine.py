"""ParallelInferenceEngine: the compiled generated Nim code, on many threads, over numpy batches.

The batch is cut into contiguous row slices; each slice is one call of the library's
exported ``<name>_infer_batch(x, n, out)`` on a pool thread. ctypes releases the GIL for
the call, so the slices run truly in parallel. Input already C-contiguous float32 is not
copied; the output is allocated once and each slice writes its own rows, so results are
bit-identical to the single-threaded path.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import InputError, NNBridgeError
from nnbridge.net import InferenceResult, NeuralNet

MIN_ROWS_PER_THREAD = 512  # below this a slice costs more in hand-off than it saves


class ParallelInferenceEngine:
    """High-throughput batch inference with the compiled Nim library of a network.

    ``source`` is a :class:`NeuralNet` (its Nim code is generated and built, cached) or an
    output folder of ``nnbridge convert`` (its ``*_cpu.nim`` is built and its ``.nmw``
    loaded). ``threads=None`` uses every core. Safe to call from several Python threads.
    """

    def __init__(self, source: NeuralNet | str | PathLike[str], threads: int | None = None, *,
                 cache_dir: str | PathLike[str] | None = None, portable: bool = False) -> None:
        from nnbridge.verify.nim import load_library

        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, found {threads!r}")
        self.threads = threads or os.cpu_count() or 1
        self._lib = load_library(source if isinstance(source, NeuralNet) else Path(source),
                                 cache_dir=cache_dir, portable=portable)
        self.network = self._lib.network
        self.input_size: int = self._lib.input_size
        self.output_size: int = self._lib.output_size
        self._last_activation = self._lib.spec.layers[-1].activation
        self._fn = self._lib.batch_function
        # the calling thread computes one slice itself, so the pool needs one thread less
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max(1, self.threads - 1),
                                                                   thread_name_prefix="nnbridge")
        self._lock = threading.Lock()

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the thread pool (waits for running batches). Idempotent."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> ParallelInferenceEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # --------------------------------------------------------------- running
    def _check(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InputError(f"inputs must be a numpy array [n, {self.input_size}], found {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise InputError(f"network {self.network!r} takes inputs [n, {self.input_size}], found shape "
                                f"{list(x.shape)}")
        if x.dtype != np.float32:
            raise InputError(f"inputs must be float32 (convert with x.astype(np.float32)), found {x.dtype}")
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw network outputs ``[n, out]`` for a float32 batch ``[n, in]``."""
        x = self._check(x)
        n = x.shape[0]
        out = np.empty((n, self.output_size), np.float32)
        if n == 0:
            return out
        pool = self._pool
        if pool is None:
            raise NNBridgeError("the engine is closed; create a new ParallelInferenceEngine")
        xp, op = x.ctypes.data, out.ctypes.data
        parts = min(self.threads, max(1, n // MIN_ROWS_PER_THREAD))
        if parts == 1:
            self._fn(ctypes.c_void_p(xp), n, ctypes.c_void_p(op))
            return out
        step = -(-n // parts)
        bounds = [(s, min(step, n - s)) for s in range(0, n, step)]
        in_b, out_b = 4 * self.input_size, 4 * self.output_size
        futures = [pool.submit(self._fn, ctypes.c_void_p(xp + s * in_b), rows, ctypes.c_void_p(op + s * out_b))
                   for s, rows in bounds[1:]]
        self._fn(ctypes.c_void_p(xp), bounds[0][1], ctypes.c_void_p(op))  # the caller works too
        for f in futures:
            f.result()
        return out

    def infer_batch(self, x: np.ndarray) -> InferenceResult:
        """Outputs, probabilities, categories and confidences of a batch, with throughput."""
        t0 = time.perf_counter()
        y = self.run(x)
        return InferenceResult.from_outputs(y, self._last_activation, time.perf_counter() - t0, keep_outputs=True)
