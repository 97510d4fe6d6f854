"""The main job: a trained model file in, a verified output folder out.

``convert`` writes, all-or-nothing, into one folder: the spec JSON, NMW and safetensors
weights, the Metal library (+ manifest and MLX body form), the Nim module, and the
verification report. ``open_output`` reads such a folder back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from nnbridge.codegen import GenerateOptions, render_files
from nnbridge.converters.common import spec_disagreement
from nnbridge.errors import NNBridgeError
from nnbridge.fsutil import atomic_directory, atomic_write_text
from nnbridge.names import identifier
from nnbridge.net import NeuralNet
from nnbridge.nmw import NMWPortabilityWarning, load_nmw
from nnbridge.spec import NetworkSpec, load_spec

TARGETS = ("nmw", "nim", "metal")
HALF_ATOL = 3e-2  # Metal with half storage: every buffer rounded to 11 significant bits
REPORT = "report.json"

Progress = Callable[[str], None]


@dataclass
class ConvertResult:
    """What ``convert`` produced."""

    out_dir: Path
    files: list[Path]
    network: NeuralNet
    report: Any = None  # nnbridge.verify.VerifyReport when verification ran

    @property
    def passed(self) -> bool:
        """True when verification ran and passed, or was not asked for."""
        return self.report is None or bool(self.report.passed)


@dataclass
class OutputFolder:
    """A folder written by ``convert`` or ``generate``: where each artefact is."""

    path: Path
    stem: str
    spec: NetworkSpec
    nmw: Path | None
    nim: Path | None
    metal: Path | None
    _net: NeuralNet | None = field(default=None, init=False, repr=False, compare=False)

    def network(self) -> NeuralNet:
        """The network (spec and weights) stored in the folder, read once."""
        if self._net is None:
            if self.nmw is None:
                raise NNBridgeError(f"{self.path}: no .nmw weights in this folder; convert with the nmw target")
            w = load_nmw(self.nmw)
            self._net = NeuralNet(w.spec, w)
        return self._net


def parse_targets(text: str | Sequence[str] | None) -> list[str]:
    """``"nmw,metal,nim"`` (or a list) → validated target names, in canonical order."""
    if text is None:
        return list(TARGETS)
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in TARGETS]
    if bad or not items:
        raise NNBridgeError(f"unknown target {bad[0] if bad else '(none)'!r}; choose from {', '.join(TARGETS)}")
    return [t for t in TARGETS if t in items]


def write_artifacts(net: NeuralNet, folder: Path, targets: Sequence[str], *, provenance: dict[str, Any]
                    | None = None, progress: Progress | None = None) -> list[Path]:
    """Write spec, weights and generated code of ``net`` into ``folder`` (which exists)."""
    say = progress or (lambda _m: None)
    stem = identifier(net.spec.name)
    files = [net.spec.save(folder / f"{stem}.json")]
    say("writing weights (NMW, safetensors)")  # every target needs them: the generated code loads the NMW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NMWPortabilityWarning)
        files.append(net.save_nmw(folder / f"{stem}.nmw", metadata=provenance or {}))
    files.append(net.save_safetensors(folder / f"{stem}.safetensors"))
    opts = GenerateOptions(output_dir=folder, generate_nim_cpu="nim" in targets, generate_metal="metal" in targets)
    if opts.targets():
        say(f"generating {' and '.join(opts.targets())} code")
        for fname, text in render_files(net.spec, opts).items():
            files.append(atomic_write_text(folder / fname, text))
    return files


def convert(
    source: str | PathLike[str] | NeuralNet,
    out: str | PathLike[str],
    *,
    arch: str | PathLike[str] | NetworkSpec | None = None,
    name: str | None = None,
    trust_pickle: bool = False,
    targets: str | Sequence[str] | None = None,
    verify: bool = True,
    force: bool = False,
    n: int = 1024,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert a model file (or a NeuralNet) into a verified output folder, atomically.

    Verification failures do not raise: the folder is kept and ``result.report`` says why.
    Bad input raises an :class:`NNBridgeError` and leaves ``out`` untouched.
    """
    say = progress or (lambda _m: None)
    chosen = parse_targets(targets)
    if isinstance(source, NeuralNet):
        net = source
    else:
        from nnbridge.converters.sources import load_source

        say(f"reading {source}")
        net = load_source(source, arch=arch, name=name, trust_pickle=trust_pickle)
    provenance = {"source": str(source) if not isinstance(source, NeuralNet) else "NeuralNet"}
    with atomic_directory(out, force=force) as tmp:
        files = write_artifacts(net, tmp, chosen, provenance=provenance, progress=say)
        report = None
        code = [t for t in chosen if t != "nmw"]
        if verify and code:
            report = verify_folder(open_output(tmp), backends=code, n=n, progress=say)
            files.append(atomic_write_text(tmp / REPORT, json.dumps(report.to_dict(), indent=2) + "\n"))
    out_dir = Path(out)
    return ConvertResult(out_dir, [out_dir / f.name for f in files], net, report)


def open_output(path: str | PathLike[str]) -> OutputFolder:
    """Find the artefacts in a folder written by ``convert``/``generate``."""
    folder = Path(path)
    if not folder.is_dir():
        raise NNBridgeError(f"{folder}: not a folder; pass the output folder of `nnbridge convert`")
    specs = sorted(p for p in folder.glob("*.json") if not p.name.endswith(".manifest.json") and p.name != REPORT)
    if len(specs) != 1:
        found = ", ".join(p.name for p in specs) or "none"
        raise NNBridgeError(f"{folder}: expected exactly one network spec <name>.json, found {found}")
    stem = specs[0].stem
    spec = load_spec(specs[0])

    def opt(name: str) -> Path | None:
        p = folder / name
        return p if p.is_file() else None

    return OutputFolder(folder, stem, spec, opt(f"{stem}.nmw"), opt(f"{stem}_cpu.nim"), opt(f"{stem}.metal"))


def verify_folder(folder: OutputFolder, backends: Sequence[str] | None = None, *, inputs: Any = None,
                  n: int = 1024, seed: int = 0, progress: Progress | None = None) -> Any:
    """Verify the generated code *in the folder* (not a regeneration) against MLX and torch."""
    from nnbridge.verify import verify
    from nnbridge.verify.core import DEFAULT_ATOL

    say = progress or (lambda _m: None)
    net = folder.network()
    wanted = list(backends) if backends is not None else [b for b, p in (("nim", folder.nim),
                                                                          ("metal", folder.metal)) if p]
    if not wanted:
        raise NNBridgeError(f"{folder.path}: no generated code to verify (no {folder.stem}_cpu.nim or .metal)")
    atol = DEFAULT_ATOL
    runners: dict[str, Any] = {}
    for b in wanted:
        if b == "nim":
            if folder.nim is None:
                raise NNBridgeError(f"{folder.path}: no {folder.stem}_cpu.nim to verify; convert with the nim target")
            say("compiling the Nim module")
            from nnbridge.verify.nim import runner_for_folder

            runners["nim"] = runner_for_folder(folder)
        elif b == "metal":
            if folder.metal is None:
                raise NNBridgeError(f"{folder.path}: no {folder.stem}.metal to verify; convert with the metal target")
            say("compiling the Metal kernels (GPU through MLX, else the CPU emulation)")
            from nnbridge.verify.metal import runner_for_folder as metal_runner

            runners["metal"] = metal_runner(folder)
            manifest = folder.path / f"{folder.stem}.manifest.json"
            if manifest.is_file() and json.loads(manifest.read_text()).get("storage") == "half":
                atol = HALF_ATOL
        else:
            raise NNBridgeError(f"unknown backend {b!r}; choose nim or metal")
    say(f"verifying {', '.join(wanted)} against MLX and torch")
    return verify(net, backends=[], inputs=inputs, n=n, seed=seed, runners=runners, atol=atol)


def predict_folder(folder: OutputFolder, x: Any, backend: str = "nim", threads: int | None = None) -> Any:
    """Outputs of the network in ``folder`` for the batch ``x``, computed by ``backend``."""
    if backend == "nim":
        from nnbridge.engine import ParallelInferenceEngine

        with ParallelInferenceEngine(folder.path, threads=threads) as engine:
            return engine.run(x)
    if backend == "metal":
        if folder.metal is None:
            raise NNBridgeError(f"{folder.path}: no {folder.stem}.metal; convert with the metal target")
        from nnbridge.verify.metal import runner_for_folder

        return runner_for_folder(folder).run(x)
    if backend in ("torch", "mlx"):
        return folder.network().predict(x, backend=backend)
    raise NNBridgeError(f"unknown backend {backend!r}; choose nim, metal, torch or mlx")


def generate_folder(arch: str | PathLike[str] | NetworkSpec, out: str | PathLike[str], *,
                    weights: str | PathLike[str] | None = None, targets: str | Sequence[str] | None = "metal,nim",
                    force: bool = False) -> list[Path]:
    """Generate code for a spec into ``out`` (with the weights copied in when given), atomically."""
    spec = arch if isinstance(arch, NetworkSpec) else load_spec(arch)
    spec.check()
    chosen = [t for t in parse_targets(targets) if t != "nmw"]
    with atomic_directory(out, force=force) as tmp:
        if weights is not None:
            w = load_nmw(weights)
            if w.spec != spec:
                diff = spec_disagreement(spec, w.spec) or (
                    f"same layers, but names or input size differ: {spec.to_json(marker=False)[:300]} vs "
                    f"{w.spec.to_json(marker=False)[:300]}")
                raise NNBridgeError(f"{weights}: its spec differs from {arch}: {diff}")
            files = write_artifacts(NeuralNet(spec, w), tmp, ["nmw", *chosen])
        else:
            stem = identifier(spec.name)
            files = [spec.save(tmp / f"{stem}.json")]
            opts = GenerateOptions(output_dir=tmp, generate_nim_cpu="nim" in chosen, generate_metal="metal" in chosen)
            files += [atomic_write_text(tmp / f, t) for f, t in render_files(spec, opts).items()]
    return [Path(out) / f.name for f in files]
