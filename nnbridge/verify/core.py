"""Run generated code and the MLX/torch references on the same inputs; compare; trace on failure.

Backends (the compiled Nim library, the Metal kernels on a GPU or in the CPU emulation)
plug in through :func:`register_backend`: a factory that takes the *inference form* of
the network and returns a :class:`Runner`. :func:`verify` does the rest, identically for
every backend: inputs (seeded random plus edge rows), the MLX reference of the original
network (torch as second reference), tolerances, and — on failure — a per-layer trace
that names the first layer whose output diverges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from nnbridge.errors import VerificationError
from nnbridge.net import NeuralNet

DEFAULT_ATOL = 1e-5


class Runner(Protocol):
    """A compiled/emulated implementation of one network (its inference form)."""

    label: str  # shown in reports, e.g. "nim" or "metal (cpu-emulated)"

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``[n, out]`` for a C-contiguous float32 batch ``[n, in]``."""
        ...

    def layer_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every inference-form layer's output (after activation) for ``x``."""
        ...


RunnerFactory = Callable[..., Runner]
_BACKENDS: dict[str, RunnerFactory] = {}


def register_backend(name: str, factory: RunnerFactory) -> None:
    """Register ``factory(inference_net, **options) -> Runner`` under ``name``; duplicates are refused."""
    if name in _BACKENDS and _BACKENDS[name] is not factory:
        raise ValueError(f"verification backend {name!r} is already registered")
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    """Names accepted by :func:`verify` (importing the built-in backends first)."""
    _load_builtin_backends()
    return sorted(_BACKENDS)


def _load_builtin_backends() -> None:
    import importlib

    for mod in ("nnbridge.verify.nim", "nnbridge.verify.metal"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def make_inputs(in_size: int, n: int = 1024, seed: int = 0) -> np.ndarray:
    """``n`` seeded standard-normal rows, then edge rows: zeros, +1e4, −1e4, a one-hot."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, in_size)).astype(np.float32)
    edge = np.zeros((4, in_size), np.float32)
    edge[1] = 1e4
    edge[2] = -1e4
    edge[3, in_size // 2] = 1.0
    return np.ascontiguousarray(np.concatenate([x, edge]))


@dataclass
class LayerTrace:
    """One layer's comparison in a per-layer trace."""

    index: int
    layer: str
    max_abs: float
    tolerance: float
    ok: bool


@dataclass
class BackendReport:
    """Result of verifying one backend against the reference."""

    backend: str
    samples: int
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    argmax_agreement: float = float("nan")
    vs_torch_max_abs: float = float("nan")
    passed: bool = False
    seconds: float = 0.0
    error: str | None = None
    first_divergent_layer: str | None = None
    trace: list[LayerTrace] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Verification of every requested backend of one network."""

    network: str
    samples: int
    reference: str
    atol: float
    rtol: float
    reference_gap: float  # max |mlx - torch|: how far the two references disagree
    backends: list[BackendReport]

    @property
    def passed(self) -> bool:
        """True when every backend passed."""
        return bool(self.backends) and all(b.passed for b in self.backends)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``report.json``)."""
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        """A plain-text table, one row per backend (the CLI renders its own rich version)."""
        head = f"{'backend':<24} {'samples':>7} {'max abs':>10} {'max rel':>10} {'argmax':>8} {'result':>6}"
        rows = [head, "-" * len(head)]
        for b in self.backends:
            res = "PASS" if b.passed else "FAIL"
            rows.append(f"{b.backend:<24} {b.samples:>7} {b.max_abs:>10.3g} {b.max_rel:>10.3g} "
                        f"{b.argmax_agreement:>8.2%} {res:>6}")
            if b.error:
                rows.append(f"  error: {b.error}")
            if b.first_divergent_layer:
                rows.append(f"  first divergent layer: {b.first_divergent_layer}")
        return "\n".join(rows)


def _row_scale(ref_layers: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Per-row magnitude of everything the computation touches (input and every layer output).

    Float32 cannot resolve an output better than ~1e-7 of the largest value summed into
    it; the tolerance of a row grows with this scale (rows of ±1e4 inputs get a larger one).
    """
    s = np.max(np.abs(x), axis=1)
    for h in ref_layers:
        s = np.maximum(s, np.max(np.abs(np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)), axis=1))
    return np.maximum(s, 1.0)


def tolerance(ref: np.ndarray, row_scale: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Per-element tolerance ``atol·scale + rtol·|ref|``."""
    return atol * row_scale[:, None] + rtol * np.abs(np.nan_to_num(np.asarray(ref, np.float64)))


def compare(got: np.ndarray, ref: np.ndarray, tol: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Max abs error, max rel error and a per-row ok mask (NaN must match NaN, inf must match inf)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    same_special = (np.isnan(got) & np.isnan(ref)) | (np.isinf(got) & (got == ref))
    diff = np.where(same_special, 0.0, np.abs(got - ref))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(ref), 1e-30)
    rel = np.where(diff == 0, 0.0, rel)
    ok_rows = np.all(diff <= tol, axis=1)
    return float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), ok_rows


def verify(
    net: NeuralNet,
    backends: Sequence[str] = ("nim",),
    inputs: np.ndarray | None = None,
    n: int = 1024,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = 1e-5,
    backend_options: dict[str, dict[str, Any]] | None = None,
    runners: dict[str, Runner] | None = None,
) -> VerifyReport:
    """Run each backend and the references on the same inputs; report errors and pass/fail.

    An element passes when ``|got − ref| ≤ atol·scale + rtol·|ref|`` where ``scale`` is the
    row's magnitude (≥ 1, see :func:`_row_scale`). ``runners`` passes ready-made runners
    (e.g. an already built library) instead of building them from ``backends``.
    """
    _load_builtin_backends()
    x = make_inputs(net.spec.in_size, n, seed) if inputs is None else np.ascontiguousarray(inputs, np.float32)
    if x.ndim != 2 or x.shape[1] != net.spec.in_size:
        raise VerificationError(f"inputs must be [n, {net.spec.in_size}], found {list(x.shape)}")
    inf_net = net.for_inference()
    ref = net.predict(x, backend="mlx")
    ref_torch = net.predict(x, backend="torch")
    ref_layers = inf_net.layer_outputs(x, backend="mlx")
    scale = _row_scale(ref_layers, x)
    gap = float(np.nanmax(np.abs(ref.astype(np.float64) - ref_torch), initial=0.0))
    reports = []
    todo: list[tuple[str, Runner | None]] = [(name, None) for name in backends]
    todo += list((runners or {}).items())
    for name, runner in todo:
        rep = BackendReport(backend=name, samples=len(x))
        t0 = time.perf_counter()
        try:
            if runner is None:
                if name not in _BACKENDS:
                    raise VerificationError(
                        f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS)) or '(none)'}")
                runner = _BACKENDS[name](inf_net, **(backend_options or {}).get(name, {}))
            rep.backend = runner.label
            got = np.asarray(runner.run(x))
            if got.shape != ref.shape:
                raise VerificationError(f"{runner.label} returned shape {list(got.shape)}, expected {list(ref.shape)}")
            rep.max_abs, rep.max_rel, ok_rows = compare(got, ref, tolerance(ref, scale, atol, rtol))
            rep.vs_torch_max_abs = float(np.nanmax(np.abs(got.astype(np.float64) - ref_torch), initial=0.0))
            rep.argmax_agreement = float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1))) if len(x) else 1.0
            rep.passed = bool(np.all(ok_rows))
            if not rep.passed:
                bad = np.flatnonzero(~ok_rows)[:64]
                rep.trace = trace_layers(inf_net, runner, x[bad], [h[bad] for h in ref_layers], scale[bad], atol, rtol)
                first = next((t for t in rep.trace if not t.ok), None)
                rep.first_divergent_layer = f"{first.index} ({first.layer})" if first else None
        except Exception as e:  # noqa: BLE001 - a backend failure is a result, reported per backend
            rep.passed = False
            rep.error = f"{type(e).__name__}: {e}"
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
    return VerifyReport(net.spec.name, len(x), "mlx", atol, rtol, gap, reports)


def trace_layers(inf_net: NeuralNet, runner: Runner, x: np.ndarray, ref_layers: list[np.ndarray],
                 row_scale: np.ndarray, atol: float, rtol: float) -> list[LayerTrace]:
    """Compare every layer's output of ``runner`` with the reference's, in order."""
    got_layers = runner.layer_outputs(x)
    if len(got_layers) != len(ref_layers):
        raise VerificationError(f"{runner.label} traced {len(got_layers)} layers; the network has {len(ref_layers)}")
    out = []
    for i, (layer, got, ref) in enumerate(zip(inf_net.spec.layers, got_layers, ref_layers)):
        tol = tolerance(ref, row_scale, atol, rtol)
        max_abs, _, ok_rows = compare(got, ref, tol)
        out.append(LayerTrace(i, layer.name, max_abs, float(tol.max(initial=0.0)), bool(np.all(ok_rows))))
    return out
