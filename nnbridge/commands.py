"""The CLI's main-job commands: convert, predict, verify, generate, bench.

Each is a ``configure_parser`` registered with :func:`nnbridge.cli.command` and a ``run``
that calls the library (:mod:`nnbridge.pipeline`) and renders its result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, _console, command, shown
from nnbridge.errors import NNBridgeError


def _progress(args: argparse.Namespace) -> Any:
    """A status callback printing steps on stderr (silent with --quiet/--json)."""
    if args.quiet or getattr(args, "json", False):
        return None
    from rich.console import Console

    con = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per step, however long
    return lambda msg: con.print(f"[dim]…[/dim] {shown(msg)}")


def render_report(con: Any, report: Any) -> None:
    """The verification table (rich)."""
    from rich.table import Table

    t = Table(title=f"verification of {shown(report.network)}: {report.samples} samples against {report.reference} "
                    f"(torch gap {report.reference_gap:.2g})")
    for col in ("backend", "max abs", "max rel", "argmax agree", "vs torch", "result"):
        t.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    for b in report.backends:
        res = "[green]PASS[/green]" if b.passed else "[red]FAIL[/red]"
        t.add_row(shown(b.backend), f"{b.max_abs:.3g}", f"{b.max_rel:.3g}", f"{b.argmax_agreement:.2%}",
                  f"{b.vs_torch_max_abs:.3g}", res)
    con.print(t)
    for b in report.backends:
        if b.error:
            con.print(f"[red]{shown(b.backend)}:[/red] {shown(b.error)}")
        if b.first_divergent_layer:
            con.print(f"[red]{shown(b.backend)}:[/red] first divergent layer {shown(b.first_divergent_layer)}")
            for tr in b.trace:
                mark = "ok" if tr.ok else "DIVERGES"
                con.print(f"    layer {tr.index} {shown(tr.layer)}: max abs {tr.max_abs:.3g} (tolerance "
                          f"{tr.tolerance:.2g}) {mark}")


def _load_inputs(path: str, input_size: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise NNBridgeError(f"{p}: no such file; pass a .npy file of float32 inputs [n, {input_size}]")
    try:
        x = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise NNBridgeError(f"{p}: cannot read as a .npy array ({e}); save inputs with numpy.save") from None
    if x.dtype.kind != "f":
        raise NNBridgeError(f"{p}: expected float32 inputs [n, {input_size}], found dtype {x.dtype}")
    if x.ndim == 1 and x.shape[0] == input_size:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != input_size:
        raise NNBridgeError(f"{p}: expected float32 inputs [n, {input_size}], found shape {list(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------- convert
@command("convert", "convert a trained model file into NMW, Metal and Nim, and verify them")
def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="model file: .pt/.pth (state dict or pickled module), .pt2, .safetensors, .npz")
    p.add_argument("-o", "--out", required=True, help="output folder (written all-or-nothing)")
    p.add_argument("--arch", help="spec JSON for state dicts / weight files that carry no architecture")
    p.add_argument("--name", help="network name (default: from the model or the file name)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled module (runs code from the file: only for files you trust)")
    p.add_argument("--targets", default="nmw,nim,metal", help="comma list of nmw, nim, metal (default: all)")
    p.add_argument("--no-verify", action="store_true", help="skip compiling and verifying the generated code")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("-n", "--samples", type=int, default=1024, help="random samples to verify (default 1024)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.epilog = "example: nnbridge convert examples/digits.pt2 -o digits_out"
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from nnbridge.errors import BuildError
    from nnbridge.pipeline import convert

    try:
        res = convert(args.source, args.out, arch=args.arch, name=args.name, trust_pickle=args.trust_pickle,
                      targets=args.targets, verify=not args.no_verify, force=args.force, n=args.samples,
                      progress=_progress(args))
    except BuildError as e:  # the verification step could not build: say how to convert without it
        raise BuildError(f"{e}; or convert without verification (--no-verify)") from e
    if args.json:
        sys.stdout.write(json.dumps({"out": str(res.out_dir), "files": [str(f) for f in res.files],
                                     "passed": res.passed,
                                     "report": res.report.to_dict() if res.report else None}, indent=2) + "\n")
    else:
        con = _console(args.quiet)
        con.print(shown(res.network.spec.summary()))
        if res.report is not None:
            render_report(con, res.report)
        con.print(f"wrote {len(res.files)} files to {shown(res.out_dir)}/: " + ", ".join(f.name for f in res.files))
    return EXIT_OK if res.passed else EXIT_FAILED


# ---------------------------------------------------------------- predict
BACKENDS = ("nim", "metal", "torch", "mlx")


@command("predict", "run a converted model on a .npy batch")
def _configure_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="output folder of `nnbridge convert`")
    p.add_argument("--inputs", required=True, help=".npy file, float32 [n, input_size]")
    p.add_argument("--backend", default="nim", choices=BACKENDS, help="who computes (default: nim, the fast path)")
    p.add_argument("-o", "--output", required=True, help=".npy file to write the outputs [n, output_size] to")
    p.add_argument("--threads", type=int, default=None, help="threads for the nim backend (default: all cores)")
    p.epilog = "example: nnbridge predict digits_out --inputs x.npy -o y.npy"
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import io

    from nnbridge.fsutil import atomic_write_bytes
    from nnbridge.pipeline import open_output, predict_folder

    folder = open_output(args.out_dir)
    x = _load_inputs(args.inputs, folder.spec.in_size)
    y = predict_folder(folder, x, backend=args.backend, threads=args.threads)
    buf = io.BytesIO()
    np.save(buf, y)
    atomic_write_bytes(args.output, buf.getvalue())
    if not args.quiet:
        _console().print(f"{len(y)} samples -> {shown(args.output)} ({args.backend}); outputs {list(y.shape)}")
    return EXIT_OK


# ----------------------------------------------------------------- verify
@command("verify", "build and run the generated code in an output folder and compare it with MLX and torch")
def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="output folder of `nnbridge convert` or `nnbridge generate`")
    p.add_argument("--inputs", help=".npy inputs to verify on (default: seeded random rows plus edge rows)")
    p.add_argument("--backends", help="comma list of nim, metal (default: every target in the folder)")
    p.add_argument("-n", "--samples", type=int, default=1024, help="random samples (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.epilog = "example: nnbridge verify digits_out --backends nim"
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from nnbridge.pipeline import open_output, verify_folder

    folder = open_output(args.out_dir)
    x = _load_inputs(args.inputs, folder.spec.in_size) if args.inputs else None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    report = verify_folder(folder, backends, inputs=x, n=args.samples, seed=args.seed, progress=_progress(args))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        render_report(_console(args.quiet), report)
    return EXIT_OK if report.passed else EXIT_FAILED


# --------------------------------------------------------------- generate
@command("generate", "generate code from a spec JSON (and NMW weights)")
def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("arch", help="network spec JSON")
    p.add_argument("--weights", help="NMW weights for the spec (copied into the folder, so `verify` can run)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--targets", default="nim,metal", help="comma list of nim, metal (default: both)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.epilog = "example: nnbridge generate arch.json --weights w.nmw -o out/ && nnbridge verify out/"
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from nnbridge.pipeline import generate_folder

    files = generate_folder(args.arch, args.out, weights=args.weights, targets=args.targets, force=args.force)
    if not args.quiet:
        _console().print(f"wrote {len(files)} files to {shown(args.out)}/: " + ", ".join(f.name for f in files))
    return EXIT_OK


# ------------------------------------------------------------------ bench
@command("bench", "run the CPU benchmark (generated Nim code against torch, onnxruntime, MLX, numpy)")
def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="3 repeats instead of 9 (a smoke run)")
    p.add_argument("--networks", nargs="+", help="preset networks (default: Koan, SimpleMLP, DeepMLP, Binary)")
    p.add_argument("--batches", nargs="+", help="batch sizes (default: 1 64 4096 65536)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.epilog = "example: nnbridge bench --quick"
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import importlib.util

    here = Path.cwd() / "benchmarks" / "bench_cpu.py"
    if not here.is_file():
        raise NNBridgeError("benchmarks/bench_cpu.py not found: run `nnbridge bench` from a source checkout")
    spec = importlib.util.spec_from_file_location("nnbridge_bench_cpu", here)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--quick"] if args.quick else []
    for flag in ("networks", "batches"):
        if getattr(args, flag):
            argv += [f"--{flag}", *getattr(args, flag)]
    if args.out:
        argv += ["--out", args.out]
    return int(mod.main(argv) or 0)


__all__ = ["EXIT_BAD_INPUT", "render_report"]
