"""Long fuzzing runs over every nnbridge reader: only ``NNBridgeError`` may escape.

Targets: ``nmw`` (NMW bytes, ``decode_nmw`` and ``inspect``), ``spec`` (spec JSON,
``from_json`` and ``load_spec``), ``safetensors``, ``pt`` (``torch.load(weights_only=True)``
state dicts and checkpoints), ``npz`` (MLX ``save_weights``) and ``pt2`` (``torch.export``
archives). Each is seeded with small valid files made in-process and read through every
entry point (``load_source``, ``from_torch``/``from_mlx``, ``describe_source``). The property
checked: a reader returns or raises an ``NNBridgeError`` subclass — any other exception, or
an input running longer than ``--timeout`` (the process is then ended with the stack dumped),
is a failure. Failing inputs are saved under ``--crashes``.

Plain random-mutation loop (no extra dependency; bit flips, interesting integers, truncation,
splices, duplicated and deleted ranges, stacked 1-4 deep)::

    python benchmarks/fuzz_atheris.py                                # every target, 60 s each
    python benchmarks/fuzz_atheris.py safetensors pt --seconds 300   # chosen targets
    python benchmarks/fuzz_atheris.py npz --iterations 10000 --seed 7
    python benchmarks/fuzz_atheris.py --memory                       # also bound each input's memory
    python benchmarks/fuzz_atheris.py --json results.json            # the figures as JSON too

It prints, per target: inputs tried, seconds, inputs/s, how many ended in a typed error or
loaded, and failures (0 is the pass mark); the exit status is 1 when anything failed.

Coverage-guided, with atheris (``pip install atheris``; not a dependency of nnbridge)::

    python benchmarks/fuzz_atheris.py pt --atheris -- -max_total_time=3600 -timeout=30

One target per atheris run; the arguments after ``--`` go to libFuzzer. The seed corpus is
written to ``--corpus`` (default: a temporary folder) and given to libFuzzer first.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import io
import json
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("nmw", "spec", "safetensors", "pt", "npz", "pt2")
SUFFIX = {"nmw": ".nmw", "spec": ".json", "safetensors": ".safetensors", "pt": ".pt", "npz": ".npz", "pt2": ".pt2"}


# ------------------------------------------------------------------ seeds
def _net() -> Any:
    import numpy as np

    import nnbridge as nb

    spec = (nb.new_network("Fuzz", 3).add_dense("a", 3, 4, "relu").add_batch_norm("bn", 4)
            .add_dropout("dr", 4, 0.5).add_dense("b", 4, 2, "softmax"))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in spec.tensor_shapes():
        a = rng.standard_normal(shape).astype(np.float32)
        tensors[name] = np.abs(a) + 0.5 if name.endswith(".running_var") else a
    return nb.NeuralNet(spec, nb.Weights(spec, tensors))


def seeds(target: str, work: Path) -> list[bytes]:
    """Small valid inputs of ``target``, made here (never downloaded)."""
    import torch

    from nnbridge.converters.safetensors import encode_safetensors
    from nnbridge.nmw import encode_nmw

    net = _net()
    state = {k: v.clone() for k, v in net.to_torch().state_dict().items()}

    def via_file(save: Callable[[Path], Any], suffix: str) -> bytes:
        path = work / f"seed{suffix}"
        save(path)
        return path.read_bytes()

    def torch_bytes(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    if target == "nmw":
        return [encode_nmw(net.weights, trailer=True), encode_nmw(net.weights, trailer=False)]
    if target == "spec":
        return [net.spec.to_json().encode()]
    if target == "safetensors":
        from safetensors.torch import save

        return [encode_safetensors(net), save(state),
                via_file(lambda p: net.to_mlx().save_weights(str(p)), ".safetensors")]
    if target == "pt":
        legacy = io.BytesIO()
        torch.save(state, legacy, _use_new_zipfile_serialization=False)  # a bare pickle stream, no zip
        return [torch_bytes(state), torch_bytes({"model_state_dict": state, "epoch": 3}), legacy.getvalue()]
    if target == "npz":
        return [via_file(lambda p: net.to_mlx().save_weights(str(p)), ".npz")]
    if target == "pt2":
        program = torch.export.export(net.to_torch().eval(), (torch.zeros(2, 3),))
        return [via_file(lambda p: torch.export.save(program, p), ".pt2")]
    raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")


# ------------------------------------------------------------------ the property
@functools.cache
def readers(target: str) -> list[Callable[[Path], Any]]:
    """Every entry point that reads a file of ``target``'s kind."""
    import nnbridge as nb
    from nnbridge.converters.safetensors import read_safetensors
    from nnbridge.converters.sources import describe_source
    from nnbridge.inspect import inspect_file
    from nnbridge.nmw import decode_nmw

    arch = _net().spec
    with_arch = [lambda p: nb.load_source(p, arch=arch), describe_source]
    return {
        "nmw": [lambda p: decode_nmw(p.read_bytes(), str(p)), nb.NeuralNet.load, inspect_file],
        "spec": [lambda p: nb.from_json(p.read_bytes()).validate(), nb.load_spec, inspect_file],
        "safetensors": [nb.load_source, read_safetensors, lambda p: nb.from_mlx(p, arch=arch), *with_arch],
        "pt": [*with_arch, lambda p: nb.from_torch(p, arch=arch)],
        "npz": [*with_arch, lambda p: nb.from_mlx(p, arch=arch)],
        "pt2": [nb.load_source, describe_source],
    }[target]


def read_all(target: str, data: bytes, path: Path) -> str:
    """Feed ``data`` to every reader of ``target``; "typed" or "loaded"; anything else raises."""
    import nnbridge as nb

    path.write_bytes(data)
    outcome = "loaded"
    for read in readers(target):
        try:
            read(path)
        except nb.NNBridgeError:
            outcome = "typed"
    return outcome


# ------------------------------------------------------------------ mutations
INTERESTING = [0, 1, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63,
               2**64 - 1]


ZIPPED = {"pt", "npz", "pt2"}


def mutate_member(data: bytes, rng: random.Random) -> bytes | None:
    """A zip (``.pt``, ``.npz``, ``.pt2``) with one member's content mutated and the zip rebuilt around it.

    Random bytes in a zip mostly hit its structure or a CRC; this reaches the parsers behind it
    (torch's weights-only unpickler, ``.npy`` headers, ``torch.export``'s JSON). None: not a zip.
    """
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(info.filename, z.read(info)) for info in z.infolist()]
    except Exception:  # noqa: BLE001 - a mutated input need not be a zip any more
        return None
    if not members:
        return None
    i = rng.randrange(len(members))
    name, content = members[i]
    members[i] = (name, mutate(content or b"\0", [content or b"\0"], rng, zipped=False))
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
        warnings.simplefilter("ignore")
        for name, content in members:
            z.writestr(name, content)
    return out.getvalue()


def mutate(data: bytes, pool: list[bytes], rng: random.Random, zipped: bool = False) -> bytes:
    """1-4 stacked random mutations of ``data`` (``pool``: other seeds to splice from).

    For zip formats (``zipped``), half the inputs instead mutate one member inside a valid zip.
    """
    if zipped and rng.random() < 0.5:
        inner = mutate_member(data, rng)
        if inner is not None:
            return inner
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b = bytearray(rng.choice(pool))
        op = rng.randrange(8)
        at = rng.randrange(len(b))
        if op == 0:  # flip bits
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:  # random bytes
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:  # an interesting integer (length fields, counts, offsets)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            b[at:at + width] = value.to_bytes(width, rng.choice(("little", "big")))
        elif op == 3:  # truncate
            del b[at:]
        elif op == 4:  # splice from another seed
            other = rng.choice(pool)
            start = rng.randrange(len(other))
            chunk = other[start:start + rng.randint(1, 256)]
            b[at:at + len(chunk)] = chunk
        elif op == 5:  # duplicate a range
            chunk = b[at:at + rng.randint(1, 256)]
            b[at:at] = chunk
        elif op == 6:  # delete a range
            del b[at:at + rng.randint(1, 64)]
        else:  # insert random bytes
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


# ------------------------------------------------------------------ the loop
@dataclass
class Figures:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    typed: int = 0
    loaded: int = 0
    failures: int = 0
    slowest_s: float = 0.0
    peak_rss_mb: float | None = None  # the process's resident high-water mark after this target
    failure_kinds: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        kinds = f"  {self.failure_kinds}" if self.failure_kinds else ""
        rss = f"  peak RSS {self.peak_rss_mb:.0f} MB" if self.peak_rss_mb is not None else ""
        return (f"{self.target:<12} {self.inputs:>9} inputs {self.seconds:>7.1f} s {rate:>8.0f}/s  "
                f"typed {self.typed:>8}  loaded {self.loaded:>6}  slowest {self.slowest_s:6.3f} s{rss}  "
                f"failures {self.failures}{kinds}")


def peak_rss_mb() -> float | None:
    """The process's resident high-water mark in MB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class OverAllocation(Exception):
    """An input made a reader allocate more than ``MEMORY_FACTOR`` times its size (``--memory``)."""


MEMORY_FACTOR, MEMORY_SLACK = 16, 4 << 20


def read_bounded(target: str, data: bytes, path: Path) -> str:
    """:func:`read_all` under tracemalloc (kept running: its peak is reset per input); raises
    :class:`OverAllocation` past the bound."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    outcome = read_all(target, data, path)
    grew = tracemalloc.get_traced_memory()[1] - before
    if grew > MEMORY_FACTOR * len(data) + MEMORY_SLACK:
        raise OverAllocation(f"tracemalloc peak {grew} bytes above the start for a {len(data)}-byte input")
    return outcome


def run_loop(target: str, *, iterations: int | None, seconds: float, seed: int, timeout: float,
             crashes: Path, work: Path, memory: bool = False) -> Figures:
    """Random-mutation loop over ``target`` until ``iterations`` inputs or ``seconds`` have passed.

    With ``memory``, an input whose reading allocates (as tracemalloc sees it) more than 16x
    its size + 4 MiB is a failure too.
    """
    read = read_bounded if memory else read_all
    rng = random.Random(seed)
    pool = seeds(target, work)
    path = work / f"input{SUFFIX[target]}"
    figures = Figures(target)
    kinds: Counter[str] = Counter()
    for data in pool:  # the seeds themselves must load
        read_all(target, data, path)
    start = time.perf_counter()
    while (iterations is None or figures.inputs < iterations) and time.perf_counter() - start < seconds:
        data = mutate(rng.choice(pool), pool, rng, zipped=target in ZIPPED)
        faulthandler.dump_traceback_later(timeout, exit=True)
        t0 = time.perf_counter()
        try:
            outcome = read(target, data, path)
        except Exception as e:  # noqa: BLE001 - the property under test: report, keep going
            figures.failures += 1
            kind = f"{type(e).__module__}.{type(e).__name__}"
            kinds[kind] += 1
            crashes.mkdir(parents=True, exist_ok=True)
            saved = crashes / f"{target}-{kind}-{kinds[kind]}{SUFFIX[target]}"
            saved.write_bytes(data)
            if kinds[kind] == 1:
                print(f"FAILURE {kind} on {saved}:\n{traceback.format_exc(limit=-4)}", file=sys.stderr)
        else:
            if outcome == "typed":
                figures.typed += 1
            else:
                figures.loaded += 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        figures.slowest_s = max(figures.slowest_s, time.perf_counter() - t0)
        figures.inputs += 1
    figures.seconds = round(time.perf_counter() - start, 2)
    figures.slowest_s = round(figures.slowest_s, 4)
    figures.failure_kinds = dict(kinds)
    figures.peak_rss_mb = peak_rss_mb()
    return figures


def run_atheris(target: str, corpus: Path, work: Path, libfuzzer_args: list[str]) -> None:
    """Coverage-guided run with atheris: the same property, one target; never returns normally."""
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (or run without --atheris for the plain loop)")
    import nnbridge as nb

    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds(target, work)):
        (corpus / f"seed{i}{SUFFIX[target]}").write_bytes(data)
    readers(target)  # import and warm every reader before instrumenting
    atheris.instrument_all()
    path = work / f"input{SUFFIX[target]}"

    def one_input(data: bytes) -> None:
        try:
            read_all(target, data, path)
        except nb.NNBridgeError:  # pragma: no cover - read_all already catches these
            pass

    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    libfuzzer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"readers to fuzz: {', '.join(TARGETS)} (default: all)")
    p.add_argument("--iterations", type=int, help="inputs per target (default: until --seconds)")
    p.add_argument("--seconds", type=float, default=60.0, help="time per target (default 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutation loop")
    p.add_argument("--timeout", type=float, default=30.0, help="an input running longer is a hang (default 30 s)")
    p.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"), help="folder for failing inputs")
    p.add_argument("--memory", action="store_true",
                   help="also fail inputs that make a reader allocate over 16x their size + 4 MiB (slower)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--atheris", action="store_true", help="coverage-guided with atheris (one target)")
    p.add_argument("--corpus", type=Path, help="atheris seed corpus folder (default: temporary)")
    args = p.parse_args(argv)
    targets = args.targets or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    warnings.simplefilter("ignore")  # framework chatter; the property is about exceptions
    with tempfile.TemporaryDirectory(prefix="nnbridge-fuzz-") as tmp:
        work = Path(tmp)
        if args.atheris:
            if len(targets) != 1:
                p.error("--atheris takes exactly one target")
            run_atheris(targets[0], args.corpus or work / "corpus", work, libfuzzer_args)
            return 0
        print(f"nnbridge reader fuzzing: seed {args.seed}, {args.iterations or 'unlimited'} inputs / "
              f"{args.seconds:g} s per target{', memory bounded' if args.memory else ''}")
        results = []
        for target in targets:
            figures = run_loop(target, iterations=args.iterations, seconds=args.seconds, seed=args.seed,
                               timeout=args.timeout, crashes=args.crashes, work=work, memory=args.memory)
            print(figures.line(), flush=True)
            results.append(figures)
    total = sum(f.failures for f in results)
    print(f"total: {sum(f.inputs for f in results)} inputs, {sum(f.seconds for f in results):.1f} s, "
          f"{total} failures")
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in results], indent=2) + "\n")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
