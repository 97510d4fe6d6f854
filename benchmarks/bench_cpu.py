"""CPU inference benchmark: the generated Nim code against torch, onnxruntime, MLX and numpy.

Everything runs in ONE process, single-threaded, with interleaved repeats (every peer is
timed once per round, in a rotating order, so drifts of a shared machine hit all alike)
and medians. Reported per network and batch size: samples/s of each peer, the ratio of
ours to the best peer, and ours as a percentage of the machine's single-thread SGEMM peak
(measured here with torch and numpy matmul on large square matrices).

    python benchmarks/bench_cpu.py                     # all networks, batches 1 64 4096 65536
    python benchmarks/bench_cpu.py --quick             # fewer repeats, for a smoke run

Results: ``benchmarks/results/bench_cpu.json`` and ``bench_cpu.png`` (``--out`` elsewhere).
``run_benchmark(...)`` is the library entry point (the ``nnbridge bench`` command calls it).
"""

from __future__ import annotations

import os

# Single-threaded peers: these must be set before numpy/torch/onnxruntime start their pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

NETWORKS = ("KoanClassifier", "SimpleMLP", "DeepMLP", "BinaryClassifier")
BATCHES = (1, 64, 4096, 65536)
PEERS = ("nim", "torch", "onnxruntime", "mlx", "numpy")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MIN_TIME_S = 0.02  # each timed sample runs the call often enough to last this long

Fn = Callable[[], Any]
_NIM_BUILD: dict[str, Any] = {}  # how the measured Nim library was built (vector width, fast path)


# --------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS and the versions of everything measured."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python": platform.python_version(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "simd" not in info:
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = next((f for f in ("avx512f", "avx2", "avx", "sse2") if f in flags), "?")
    if "cpu" not in info:
        info["cpu"] = platform.processor() or "unknown"
    for mod in ("numpy", "torch", "onnxruntime", "mlx.core"):
        with contextlib.suppress(Exception):
            m = __import__(mod, fromlist=["__version__"])
            info[mod.split(".")[0]] = getattr(m, "__version__", "?")
    with contextlib.suppress(Exception):
        from nnbridge.verify.nim import compiler_versions, find_nim

        info["nim"] = compiler_versions(find_nim())
    return info


def sgemm_peak(seconds: float = 1.5) -> dict[str, float]:
    """Single-thread SGEMM GFLOP/s: the best of torch.mm and numpy matmul on square float32 matrices."""
    import torch

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    limit = _blas_limit()
    with limit:
        for name, mm in (("torch", lambda a, b: torch.mm(a, b)), ("numpy", np.matmul)):
            best = 0.0
            for n in (512, 1024, 2048):
                a = np.random.default_rng(n).standard_normal((n, n)).astype(np.float32)
                args = (torch.from_numpy(a), torch.from_numpy(a.copy())) if name == "torch" else (a, a.copy())
                mm(*args)
                t_end = time.perf_counter() + seconds / 6
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    mm(*args)
                    best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
            out[name] = best
    out["peak"] = max(out.values())
    return out


def _blas_limit() -> Any:
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()


# ---------------------------------------------------------------- networks
def make_network(name: str, seed: int = 0) -> Any:
    """A preset network with Xavier-initialised weights (random but fixed)."""
    from nnbridge.net import NeuralNet
    from nnbridge.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown network {name!r}; choose from {', '.join(PRESETS)}")
    net = NeuralNet(PRESETS[name]())
    return net.init_weights("xavier", seed=seed)


def flops_per_sample(net: Any) -> int:
    """Multiply-adds × 2 of the dense layers (activations not counted)."""
    return sum(2 * layer.input_size * layer.output_size for layer in net.for_inference().spec.layers
               if layer.kind.value == "dense")


def _numpy_forward(net: Any) -> Callable[[np.ndarray], np.ndarray]:
    inf = net.for_inference()
    layers = [(layer, inf.weights.layer(layer.name)) for layer in inf.spec.layers]
    for layer, _ in layers:
        if layer.kind.value != "dense" or layer.activation.value not in ("relu", "softmax", "none"):
            raise ValueError("the numpy peer computes dense relu/softmax/none networks only")

    def forward(x: np.ndarray) -> np.ndarray:
        h = x
        for layer, t in layers:
            h = h @ t["weight"]
            if "bias" in t:
                h += t["bias"]
            if layer.activation.value == "relu":
                np.maximum(h, 0, out=h)
            elif layer.activation.value == "softmax":
                h -= h.max(axis=1, keepdims=True)
                np.exp(h, out=h)
                h /= h.sum(axis=1, keepdims=True)
        return h

    return forward


def make_peers(net: Any, peers: Sequence[str], cache_dir: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``{peer: f(x) -> outputs}`` for the requested peers, and ``{peer: why it is missing}``."""
    made: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for peer in peers:
        try:
            made[peer] = _make_peer(peer, net, cache_dir)
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
            missing[peer] = f"{type(e).__name__}: {e}"
    return made, missing


def _make_peer(peer: str, net: Any, cache_dir: str | None) -> Any:
    if peer == "nim":
        from nnbridge.verify.nim import load_library

        lib = load_library(net, cache_dir=cache_dir)
        _NIM_BUILD["vector_width"] = lib.vector_width
        _NIM_BUILD["fast_path"] = lib.fast_path
        return lib.infer
    if peer == "torch":
        import torch

        torch.set_num_threads(1)
        module = net.to_torch().eval()

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run_torch
    if peer == "onnxruntime":
        import onnxruntime as ort
        import torch

        module = net.to_torch().eval()
        buf = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(1, net.spec.in_size),), buf, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"x": x})[0]
    if peer == "mlx":
        import mlx.core as mx

        module = net.to_mlx()
        fwd = mx.compile(lambda a: module(a))

        def run_mlx(x: np.ndarray) -> np.ndarray:
            y = fwd(mx.array(x))
            mx.eval(y)
            return np.asarray(y)

        return run_mlx
    if peer == "numpy":
        return _numpy_forward(net)
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


# ------------------------------------------------------------------ timing
def calibrate(f: Fn, min_time: float = MIN_TIME_S, max_calls: int = 1 << 20) -> int:
    """Calls per timed sample so one sample lasts about ``min_time`` seconds."""
    f()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4 or n >= max_calls:
            return max(1, round(n * min_time / max(dt, 1e-9)))
        n *= 4


def time_interleaved(calls: dict[str, Fn], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` rounds, every function once per round."""
    inner = {k: calibrate(f) for k, f in calls.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            f, n = calls[k], inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t0) / n)
    return times


# --------------------------------------------------------------- benchmark
def run_benchmark(networks: Sequence[str] = NETWORKS, batches: Sequence[int] = BATCHES, repeats: int = 9,
                  out_dir: str | os.PathLike[str] | None = DEFAULT_OUT, peers: Sequence[str] = PEERS,
                  cache_dir: str | None = None, check: bool = True,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every peer on every network and batch size; write JSON and a PNG plot to ``out_dir``.

    Returns ``{"machine", "sgemm", "results": [{network, batch, flops_per_sample, peers: {peer:
    {samples_per_s, us_per_call, times}}, best_peer, ratio_to_best_peer, percent_of_sgemm_peak}],
    "missing"}``. ``check`` first compares every peer's outputs with the torch reference.
    """
    say = progress or (lambda _m: None)
    import torch

    torch.set_num_threads(1)
    say("measuring the single-thread SGEMM peak")
    sgemm = sgemm_peak()
    results: list[dict[str, Any]] = []
    missing: dict[str, dict[str, str]] = {}
    with _blas_limit():
        for name in networks:
            net = make_network(name)
            flops = flops_per_sample(net)
            say(f"{name}: building peers")
            fns, missing[name] = make_peers(net, peers, cache_dir)
            for batch in batches:
                x = np.random.default_rng(batch).standard_normal((batch, net.spec.in_size)).astype(np.float32)
                if check:
                    _check_outputs(net, fns, x[:256])
                say(f"{name}: batch {batch}")
                times = time_interleaved({k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}, repeats)
                row: dict[str, Any] = {"network": name, "batch": batch, "flops_per_sample": flops, "peers": {}}
                for k, ts in times.items():
                    med = float(np.median(ts))
                    row["peers"][k] = {"samples_per_s": batch / med, "us_per_call": med * 1e6, "times": ts}
                others = {k: v["samples_per_s"] for k, v in row["peers"].items() if k != "nim"}
                if "nim" in row["peers"]:
                    ours = row["peers"]["nim"]["samples_per_s"]
                    row["percent_of_sgemm_peak"] = 100.0 * ours * flops / (sgemm["peak"] * 1e9)
                    if others:
                        best = max(others, key=others.__getitem__)
                        row["best_peer"] = best
                        row["ratio_to_best_peer"] = ours / others[best]
                results.append(row)
    report = {"machine": machine_info(), "nim_build": dict(_NIM_BUILD), "sgemm_gflops": sgemm, "repeats": repeats,
              "results": results, "missing": {k: v for k, v in missing.items() if v}}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from nnbridge.fsutil import atomic_write_text

        atomic_write_text(out / "bench_cpu.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "bench_cpu.md", format_table(report) + "\n")
        with contextlib.suppress(ImportError):
            plot(report, out / "bench_cpu.png")
    return report


def _check_outputs(net: Any, fns: dict[str, Any], x: np.ndarray) -> None:
    ref = net.predict(x, backend="torch")
    for k, f in fns.items():
        got = np.asarray(f(x))
        if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"{k} disagrees with the torch reference on {net.name}: max abs error "
                               f"{np.max(np.abs(got - ref)) if got.shape == ref.shape else 'shape ' + str(got.shape)}")


# ------------------------------------------------------------------ output
def _rate(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table: samples/s per peer, ratio of ours to the best peer, % of SGEMM peak."""
    peers = [p for p in PEERS if any(p in r["peers"] for r in report["results"])]
    m = report["machine"]
    lines = [f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('simd', '?')}), {m.get('platform')}; "
             f"generated code: {m.get('nim', 'nim ?')}, vector width {report.get('nim_build', {}).get('vector_width')}"
             f"; single-thread SGEMM peak "
             f"{report['sgemm_gflops']['peak']:.0f} GFLOP/s. Samples/s (median of {report['repeats']} interleaved "
             "repeats, one thread each); batch 1 also as microseconds per call from Python.", "",
             "| network | batch | " + " | ".join(peers) + " | ours / best peer | % SGEMM peak |",
             "|---|---:|" + "---:|" * len(peers) + "---:|---:|"]
    for r in report["results"]:
        cells = []
        for p in peers:
            v = r["peers"].get(p)
            if v is None:
                cells.append("-")
            elif r["batch"] == 1:
                cells.append(f"{_rate(v['samples_per_s'])} ({v['us_per_call']:.2f} µs)")
            else:
                cells.append(_rate(v["samples_per_s"]))
        ratio = f"{r['ratio_to_best_peer']:.2f}x ({r['best_peer']})" if "ratio_to_best_peer" in r else "-"
        pct = f"{r['percent_of_sgemm_peak']:.0f}%" if "percent_of_sgemm_peak" in r else "-"
        lines.append(f"| {r['network']} | {r['batch']} | " + " | ".join(cells) + f" | {ratio} | {pct} |")
    for net, why in report.get("missing", {}).items():
        for peer, reason in why.items():
            lines.append(f"\n{net}: {peer} not measured: {reason}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Samples/s against batch size, one panel per network, one line per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["network"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(nets), figsize=(4.2 * len(nets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], nets):
        rows = [r for r in report["results"] if r["network"] == name]
        for peer in PEERS:
            pts = [(r["batch"], r["peers"][peer]["samples_per_s"]) for r in rows if peer in r["peers"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=peer, linewidth=2.5 if peer == "nim" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("samples / s (1 thread)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from nnbridge.fsutil import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), help="preset networks to measure")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="batch sizes")
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds per measurement (median)")
    p.add_argument("--peers", nargs="+", default=list(PEERS), help="what to measure")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for bench_cpu.json/.md/.png")
    p.add_argument("--quick", action="store_true", help="3 repeats (a smoke run)")
    args = p.parse_args(argv)
    report = run_benchmark(args.networks, args.batches, 3 if args.quick else args.repeats, args.out, args.peers,
                           progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
