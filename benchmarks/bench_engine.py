"""Multi-threaded CPU benchmark: the ParallelInferenceEngine against onnxruntime and torch.

Koan (64 → 64 relu → 23 softmax) at large batches: the engine with 1 and 2 threads,
onnxruntime with 1 and 2 intra-op threads, torch with 2 threads — all in ONE process, with
interleaved repeats (every peer timed once per round, the order rotating) and medians.
Besides samples/s, every timed sample records the process's CPU time, so the table also
says how many cores each peer actually got (CPU s / wall s): on a shared machine a
2-thread peer that gets 1.2 cores cannot scale 2×, whatever its code.

    python benchmarks/bench_engine.py                    # batches 65536 and 4096, 15 rounds
    python benchmarks/bench_engine.py --quick            # 5 rounds, a smoke run

Results: ``benchmarks/results/bench_engine.json`` (every timing, the machine, the load) and
``bench_engine.md`` (the table). ``run_benchmark(...)`` returns the report.
"""

from __future__ import annotations

import os
import sys

# torch's OpenMP pool is sized at import; numpy (not measured) stays single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "2")
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from bench_cpu import calibrate, machine_info, make_network  # noqa: E402

NETWORK = "KoanClassifier"
BATCHES = (65536, 4096)
PEERS = ("engine-1t", "engine-2t", "onnxruntime-1t", "onnxruntime-2t", "torch-2t")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MIN_TIME_S = 0.1  # each timed sample runs the call often enough to last this long
QUIET_CORES = 0.25  # a timed sample is "quiet" when other processes kept less than this busy
SETTLE_S = 0.02  # pause between timed samples: spinning pool threads (OpenMP, onnxruntime) go idle
SCALING_TARGET = 1.8  # engine 2 threads / engine 1 thread
ORT_TARGET = 1.3  # engine 2 threads / onnxruntime with 2 intra-op threads
# onnxruntime with 2 intra-op threads as measured where the targets were set (another machine)
ORT_REFERENCE = {65536: 8.4e6, 4096: 11e6}

Fn = Callable[[], Any]


# ------------------------------------------------------------------ peers
def _onnx_session(net: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort
    import torch

    module = net.to_torch().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, net.spec.in_size),), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # the calling thread included, as our engine's count
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def make_peers(net: Any, cache_dir: str | None = None) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]],
                                                                 dict[str, str], list[Any]]:
    """``{peer: f(x) -> outputs}``, ``{peer: why it is missing}`` and the engines (to close)."""
    from nnbridge.engine import ParallelInferenceEngine

    made: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    missing: dict[str, str] = {}
    engines: list[Any] = []
    for threads in (1, 2):
        e = ParallelInferenceEngine(net, threads=threads, cache_dir=cache_dir)
        engines.append(e)
        made[f"engine-{threads}t"] = e.run
    for threads in (1, 2):
        try:
            made[f"onnxruntime-{threads}t"] = _onnx_session(net, threads)
        except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
            missing[f"onnxruntime-{threads}t"] = f"{type(err).__name__}: {err}"
    try:
        import torch

        torch.set_num_threads(2)
        module = net.to_torch().eval()

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        made["torch-2t"] = run_torch
    except Exception as err:  # noqa: BLE001
        missing["torch-2t"] = f"{type(err).__name__}: {err}"
    return made, missing, engines


# ------------------------------------------------------------------ timing
def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (every process, every core), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def time_interleaved(calls: dict[str, Fn], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per function and timed sample: wall and process CPU seconds per call, and the cores the rest
    of the machine kept busy meanwhile (``others``); ``repeats`` rounds, every function once per
    round, in a rotating order."""
    inner = {k: calibrate(f, MIN_TIME_S, 1 << 16) for k, f in calls.items()}
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "others": []} for k in calls}
    names = list(calls)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f, n = calls[k], inner[k]
            time.sleep(SETTLE_S)
            b0, c0, t0 = _busy_seconds(), time.process_time(), time.perf_counter()
            for _ in range(n):
                f()
            t1, c1, b1 = time.perf_counter(), time.process_time(), _busy_seconds()
            out[k]["wall"].append((t1 - t0) / n)
            out[k]["cpu"].append((c1 - c0) / n)
            if b0 is not None and b1 is not None:
                out[k]["others"].append(max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0))
    return out


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------- benchmark
def run_benchmark(batches: Sequence[int] = BATCHES, repeats: int = 15,
                  out_dir: str | os.PathLike[str] | None = DEFAULT_OUT, cache_dir: str | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every peer at every batch size; write JSON and Markdown to ``out_dir``."""
    say = progress or (lambda _m: None)
    net = make_network(NETWORK)
    say("building peers")
    fns, missing, engines = make_peers(net, cache_dir)
    results: list[dict[str, Any]] = []
    try:
        inputs = {b: np.random.default_rng(b).standard_normal((b, net.spec.in_size)).astype(np.float32)
                  for b in batches}
        for x in inputs.values():
            _check_outputs(net, fns, x)
        say(f"{repeats} rounds of {len(fns)} peers x {len(batches)} batch sizes")
        load_before = _loadavg()
        # one round times every peer at every batch size, so a busy spell of the machine hits all alike
        times = time_interleaved({f"{k}@{b}": (lambda f=f, x=x: f(x)) for b, x in inputs.items()
                                  for k, f in fns.items()}, repeats)
        load_after = _loadavg()
        for batch in batches:
            row: dict[str, Any] = {"batch": batch, "load_before": load_before, "load_after": load_after,
                                   "peers": {}}
            others = [v for k in fns for v in times[f"{k}@{batch}"]["others"]]
            row["others_cores"] = float(np.mean(others)) if others else None
            for k in fns:
                t = times[f"{k}@{batch}"]
                wall, cpu = float(np.median(t["wall"])), float(np.median(t["cpu"]))
                cores = float(np.median(np.array(t["cpu"]) / np.array(t["wall"])))
                entry = {"samples_per_s": batch / wall, "us_per_call": wall * 1e6, "cpu_us_per_call": cpu * 1e6,
                         "cores_used": cores, **t}
                # the same, over the samples during which the rest of the machine was (nearly) idle
                quiet = [w for w, o in zip(t["wall"], t["others"]) if o < QUIET_CORES]
                if quiet:
                    entry["quiet_samples"] = len(quiet)
                    entry["quiet_samples_per_s"] = batch / float(np.median(quiet))
                row["peers"][k] = entry
            for key, suffix in (("samples_per_s", ""), ("quiet_samples_per_s", "_quiet")):
                rate = {k: v[key] for k, v in row["peers"].items() if key in v}
                if "engine-1t" in rate and "engine-2t" in rate:
                    row["scaling" + suffix] = rate["engine-2t"] / rate["engine-1t"]
                if "engine-2t" in rate and "onnxruntime-2t" in rate:
                    row["ratio_to_ort_2t" + suffix] = rate["engine-2t"] / rate["onnxruntime-2t"]
            if "engine-1t" in row["peers"] and "engine-2t" in row["peers"]:
                # CPU time per call, 1 thread over 2 threads: 1.0 = no work lost to the hand-off
                row["cpu_efficiency"] = (row["peers"]["engine-1t"]["cpu_us_per_call"]
                                         / row["peers"]["engine-2t"]["cpu_us_per_call"])
            if batch in ORT_REFERENCE:
                row["target_samples_per_s"] = ORT_TARGET * ORT_REFERENCE[batch]
            results.append(row)
    finally:
        for e in engines:
            e.close()
    report = {"machine": machine_info(), "network": NETWORK, "repeats": repeats, "min_time_s": MIN_TIME_S,
              "quiet_cores": QUIET_CORES,
              "targets": {"scaling": SCALING_TARGET, "ratio_to_ort_2t": ORT_TARGET,
                          "ort_2t_reference_samples_per_s": {str(k): v for k, v in ORT_REFERENCE.items()}},
              "results": results, "missing": missing}
    if out_dir is not None:
        from nnbridge.fsutil import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench_engine.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "bench_engine.md", format_table(report) + "\n")
    return report


def _check_outputs(net: Any, fns: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray) -> None:
    ref = net.predict(x[:512], backend="torch")
    for k, f in fns.items():
        got = np.asarray(f(x))[:512]
        if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"{k} disagrees with the torch reference")
    if "engine-2t" in fns and fns["engine-2t"](x).tobytes() != fns["engine-1t"](x).tobytes():
        raise RuntimeError("the 2-thread engine's outputs differ from the 1-thread engine's")


# ------------------------------------------------------------------ output
def _rate(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _mark(value: float, target: float) -> str:
    return f"{value:.2f}x {'✓' if value >= target else '✗'}"


def format_table(report: dict[str, Any]) -> str:
    """Markdown: samples/s per peer (all samples, then quiet samples only) against the targets."""
    m = report["machine"]
    reps = report["repeats"]
    peers = [p for p in PEERS if any(p in r["peers"] for r in report["results"])]
    head = (" | " + " | ".join(peers) + f" | 2t / 1t (≥ {SCALING_TARGET}) | ours 2t / onnxruntime 2t (≥ {ORT_TARGET})")
    lines = [f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('simd', '?')}), {m.get('platform')}; "
             f"{report['network']}; samples/s, median of {reps} interleaved rounds in one process (every peer "
             "at every batch size once per round). In brackets: the cores the peer got (its process CPU s / "
             "wall s). Other processes: the cores the rest of the machine kept busy meanwhile (mean).", "",
             "| batch" + head + " | CPU efficiency 2t | other processes |",
             "|---:|" + "---:|" * (len(peers) + 4)]
    for r in report["results"]:
        cells = [f"{_rate(r['peers'][p]['samples_per_s'])} ({r['peers'][p]['cores_used']:.2f})"
                 if p in r["peers"] else "-" for p in peers]
        scaling = _mark(r["scaling"], SCALING_TARGET) if "scaling" in r else "-"
        ort = _mark(r["ratio_to_ort_2t"], ORT_TARGET) if "ratio_to_ort_2t" in r else "-"
        eff = f"{r['cpu_efficiency']:.2f}" if "cpu_efficiency" in r else "-"
        others = f"{r['others_cores']:.2f} cores" if r.get("others_cores") is not None else "-"
        lines.append(f"| {r['batch']} | " + " | ".join(cells) + f" | {scaling} | {ort} | {eff} | {others} |")
    partly_busy = any(v.get("quiet_samples", 0) < reps for r in report["results"] for v in r["peers"].values())
    if partly_busy and any("scaling_quiet" in r or "ratio_to_ort_2t_quiet" in r for r in report["results"]):
        lines += ["", f"Quiet samples only (other processes kept < {QUIET_CORES} cores busy); in brackets: how many "
                  f"of the {reps} samples were quiet.", "", "| batch" + head + " |",
                  "|---:|" + "---:|" * (len(peers) + 2)]
        for r in report["results"]:
            cells = [f"{_rate(r['peers'][p]['quiet_samples_per_s'])} ({r['peers'][p]['quiet_samples']})"
                     if "quiet_samples_per_s" in r["peers"].get(p, {}) else "-" for p in peers]
            scaling = _mark(r["scaling_quiet"], SCALING_TARGET) if "scaling_quiet" in r else "-"
            ort = _mark(r["ratio_to_ort_2t_quiet"], ORT_TARGET) if "ratio_to_ort_2t_quiet" in r else "-"
            lines.append(f"| {r['batch']} | " + " | ".join(cells) + f" | {scaling} | {ort} |")
    refs = ", ".join(f"{_rate(v)} at {k}" for k, v in report["targets"]["ort_2t_reference_samples_per_s"].items())
    lines += ["", f"Targets: the 2-thread engine ≥ {SCALING_TARGET}× the 1-thread engine and ≥ {ORT_TARGET}× "
              f"onnxruntime with 2 intra-op threads (measured elsewhere: {refs}; that is ≥ "
              + ", ".join(f"{_rate(r['target_samples_per_s'])} at {r['batch']}" for r in report["results"]
                          if "target_samples_per_s" in r) + ")."]
    for peer, why in report.get("missing", {}).items():
        lines.append(f"\n{peer} not measured: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="batch sizes")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per measurement (median)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for bench_engine.json/.md")
    p.add_argument("--quick", action="store_true", help="5 rounds (a smoke run)")
    args = p.parse_args(argv)
    report = run_benchmark(args.batches, 5 if args.quick else args.repeats, args.out,
                           progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
