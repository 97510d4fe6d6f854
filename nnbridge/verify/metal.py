"""Verification backend ``metal``: the generated kernels on an Apple GPU, else in the CPU emulation.

:class:`MetalRunner` implements :class:`nnbridge.verify.core.Runner` for the generated Metal
code of one network:

* **GPU** (``metal (gpu)``, when ``mx.metal.is_available()``): the MLX body form
  (``<name>_mlx.py``) runs through ``mx.fast.metal_kernel`` — the per-layer pipeline, and
  the fused kernel cross-checked against it;
* **CPU emulation** (``metal (cpu-emulated)``, everywhere else): the exact text of
  ``<name>.metal`` is compiled with the shim (:mod:`nnbridge.verify.metal_emu`) and
  dispatched as the manifest says, like a host would — the per-layer pipeline and the
  fused kernel; and the exact sources MLX generates from the body form (captured with
  :func:`nnbridge.verify.mlx_metal.capture_pipeline_sources`) are compiled and run too.

``run(x)`` returns the per-layer pipeline's output; every other form must agree with it
within the verification tolerance, or ``run`` raises :class:`VerificationError` naming the
form. ``layer_outputs(x)`` comes from the per-layer kernels (one buffer per layer); the
fused kernel is checked end to end only.
"""

from __future__ import annotations

import json
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.codegen.common import inference_weights
from nnbridge.errors import VerificationError
from nnbridge.net import NeuralNet
from nnbridge.verify import metal_emu, mlx_metal
from nnbridge.verify.core import DEFAULT_ATOL, register_backend

LABEL_GPU = "metal (gpu)"
LABEL_EMULATED = "metal (cpu-emulated)"
FORMS = ("per_layer", "fused", "mlx")  # what run() executes (per_layer always)
HALF_CROSS_ATOL = 3e-2  # fused (float intermediates) vs per-layer (half intermediates) with half storage


@dataclass
class MetalFiles:
    """The three generated files of one network, as text (the manifest parsed)."""

    metal: str
    manifest: dict[str, Any]
    mlx: str
    metal_name: str = "network.metal"

    @property
    def half(self) -> bool:
        """True when buffers hold half values."""
        return self.manifest.get("storage") == "half"


def files_for(source: Any, *, half: bool = False) -> MetalFiles:
    """Render the Metal files of ``source`` (a spec or a net) in memory."""
    from nnbridge.codegen import GenerateOptions
    from nnbridge.codegen.metal import render

    files = render(source, GenerateOptions(generate_metal=True, metal_half=half))
    by_suffix = {("manifest" if f.endswith(".manifest.json") else "mlx" if f.endswith("_mlx.py") else "metal"): (f, t)
                 for f, t in files.items()}
    return MetalFiles(by_suffix["metal"][1], json.loads(by_suffix["manifest"][1]), by_suffix["mlx"][1],
                      by_suffix["metal"][0])


def files_from_folder(folder: Any) -> MetalFiles:
    """Read ``<stem>.metal``, ``<stem>.manifest.json`` and ``<stem>_mlx.py`` from an output folder."""
    path = Path(folder.path)
    stem = folder.stem
    names = {"metal": f"{stem}.metal", "manifest": f"{stem}.manifest.json", "mlx": f"{stem}_mlx.py"}
    texts = {}
    for key, name in names.items():
        try:
            texts[key] = (path / name).read_text(encoding="utf-8")
        except OSError as e:
            raise VerificationError(f"{path / name}: cannot read the generated Metal file: {e.strerror or e}"
                                    ) from None
    try:
        man = json.loads(texts["manifest"])
    except json.JSONDecodeError as e:
        raise VerificationError(f"{path / names['manifest']}: not valid JSON ({e.msg})") from None
    return MetalFiles(texts["metal"], man, texts["mlx"], names["metal"])


def _resolve(dims: Sequence[int | str], batch: int) -> tuple[int, int, int]:
    out = tuple(batch if d == "batch" else int(d) for d in dims)
    if len(out) != 3:
        raise VerificationError(f"a grid or threadgroup needs 3 dimensions, found {list(dims)}")
    return out  # type: ignore[return-value]


def _clip(tg: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int]:
    return tuple(max(1, min(int(t), int(g))) for t, g in zip(tg, grid))  # type: ignore[return-value]


def _storage(half: bool) -> type:
    return np.float16 if half else np.float32


def run_manifest_pipeline(emu: metal_emu.Emulator, manifest: dict[str, Any], pipeline: str, x: np.ndarray,
                          weights: np.ndarray, *, orders: Sequence[str] = ("asc", "desc")) -> dict[str, np.ndarray]:
    """Dispatch ``pipeline`` of a manifest on the emulator, as a host would; return its buffers ``[batch, width]``."""
    steps = manifest["pipelines"].get(pipeline)
    if steps is None:
        raise VerificationError(f"the manifest has no pipeline {pipeline!r}; it has {', '.join(manifest['pipelines'])}")
    half = manifest.get("storage") == "half"
    dt = _storage(half)
    batch = int(x.shape[0])
    widths = {name: b["per_sample"] for name, b in manifest["buffers"].items() if "per_sample" in b}
    used = [n for s in steps for n in s["buffers"].values()]
    if batch == 0:
        return {n: np.zeros((0, widths[n]), np.float32) for n in used if n != "weights"}
    buffers: dict[str, np.ndarray | metal_emu.Output] = {
        "input": np.ascontiguousarray(x, dtype=dt), "weights": np.ascontiguousarray(weights, dtype=dt)}
    for n in used:
        if n not in buffers:
            if n not in widths:
                raise VerificationError(f"the manifest's pipeline {pipeline!r} uses buffer {n!r}, which it does not "
                                        f"describe")
            buffers[n] = metal_emu.Output(np.dtype(dt).name, batch * widths[n])
    dispatches = []
    for s in steps:
        grid = _resolve(s["grid"], batch)
        dispatches.append(metal_emu.Dispatch(s["kernel"], grid, _clip(s["threadgroup"], grid),
                                             {int(i): b for i, b in s["buffers"].items()}))
    outs = [n for n in buffers if n not in ("input", "weights")]
    got = emu.run(buffers, dispatches, outs, orders=orders)
    return {n: got[n].astype(np.float32).reshape(batch, widths[n]) for n in outs}


def run_mlx_form_emulated(module: types.ModuleType, pipeline: str, x: np.ndarray, weights: np.ndarray, *,
                          orders: Sequence[str] = ("asc", "desc")) -> dict[str, np.ndarray]:
    """Run ``pipeline`` of the MLX body form in the emulator, on the exact sources MLX generates."""
    batch = int(x.shape[0])
    steps = module.PIPELINES[pipeline]
    if batch == 0:
        return {s["output"]: np.zeros((0, s["width"]), np.float32) for s in steps}
    try:
        sources = mlx_metal.capture_pipeline_sources(module, batch, pipeline)
    except VerificationError as e:
        # MLX versions that cannot trace custom kernels without a Metal device: compile the
        # source nnbridge predicts instead (tests check prediction == MLX's print where it can).
        warnings.warn(f"{e}; emulating the predicted MLX source instead", RuntimeWarning, stacklevel=2)
        sources = mlx_metal.predicted_pipeline_sources(module, batch, pipeline)
    emu = metal_emu.build([metal_emu.Source(sources[s["kernel"]], f"{s['kernel']}.metal", metal_emu.MLX_PRELUDE)
                           for s in steps])
    by_file = {sig.filename: sig for sig in emu.kernels.values()}
    dt = np.float16 if "float16" in str(module.STORAGE) else np.float32
    buffers: dict[str, np.ndarray | metal_emu.Output] = {
        "input": np.ascontiguousarray(x, dtype=dt), "weights": np.ascontiguousarray(weights, dtype=dt)}
    dispatches = []
    for s in steps:
        spec = module.KERNELS[s["kernel"]]
        sig = by_file[f"{s['kernel']}.metal"]
        names = dict(zip(spec["input_names"], s["inputs"])) | {spec["output_names"][0]: s["output"]}
        binding = {}
        for p in sig.params:
            if p.attribute != "buffer":
                continue
            if p.name not in names:
                raise VerificationError(f"MLX's source of {s['kernel']} has a buffer parameter {p.name!r} that the "
                                        f"body form does not pass")
            binding[p.index] = names[p.name]
        buffers[s["output"]] = metal_emu.Output(np.dtype(dt).name, batch * s["width"])
        grid = _resolve(spec["grid"], batch)
        dispatches.append(metal_emu.Dispatch(sig.name, grid, _clip(spec["threadgroup"], grid), binding))
    outs = [s["output"] for s in steps]
    got = emu.run(buffers, dispatches, outs, orders=orders)
    width = {s["output"]: s["width"] for s in steps}
    return {n: got[n].astype(np.float32).reshape(batch, width[n]) for n in outs}


def _check_agree(what: str, got: np.ndarray, ref: np.ndarray, scale: np.ndarray, atol: float, rtol: float) -> None:
    tol = atol * scale[:, None] + rtol * np.abs(ref)
    diff = np.abs(got.astype(np.float64) - ref)
    same = (np.isnan(got) & np.isnan(ref)) | (got == ref)
    bad = ~same & ~(diff <= tol)
    if np.any(bad):
        r, c = np.argwhere(bad)[0]
        raise VerificationError(f"{what} disagrees with the per-layer kernels: sample {r}, output {c}: "
                                f"{got[r, c]!r} vs {ref[r, c]!r} (max |diff| {np.nanmax(np.where(same, 0, diff)):.3g})")


class MetalRunner:
    """The generated Metal code of one network, run on the GPU or in the CPU emulation."""

    def __init__(self, net: NeuralNet, files: MetalFiles | None = None, *, device: str = "auto",
                 forms: Sequence[str] = FORMS, orders: Sequence[str] = ("asc", "desc"), atol: float = DEFAULT_ATOL,
                 rtol: float = 1e-5, half: bool = False) -> None:
        if device not in ("auto", "gpu", "emulated"):
            raise VerificationError(f"device must be auto, gpu or emulated, found {device!r}")
        bad = [f for f in forms if f not in FORMS]
        if bad:
            raise VerificationError(f"unknown Metal kernel form {bad[0]!r}; choose from {', '.join(FORMS)}")
        self.files = files or files_for(net, half=half)
        self.weights = inference_weights(net)
        man = self.files.manifest
        if int(man["weights_layout"]["count"]) != self.weights.size or int(man["input_size"]) != net.spec.in_size:
            raise VerificationError(
                f"the Metal files do not fit network {net.spec.name!r}: they expect {man['input_size']} inputs and "
                f"{man['weights_layout']['count']} weights, the network has {net.spec.in_size} and {self.weights.size}")
        self.gpu = mlx_metal.metal_available() if device == "auto" else device == "gpu"
        if self.gpu and not mlx_metal.metal_available():
            raise VerificationError("device='gpu' but MLX has no Metal device here")
        self.label = LABEL_GPU if self.gpu else LABEL_EMULATED
        self.forms = tuple(forms)
        self.orders = tuple(orders)
        self.atol, self.rtol = (HALF_CROSS_ATOL, 1e-2) if self.files.half else (atol, rtol)
        self.module = mlx_metal.load_module(self.files.mlx)
        self.layer_buffers: list[str] = list(man["layer_outputs"])
        self._emu: metal_emu.Emulator | None = None
        if not self.gpu:
            self._emu = metal_emu.build(metal_emu.Source(self.files.metal, self.files.metal_name))

    # ------------------------------------------------------------------ forms
    def _per_layer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.gpu:
            return mlx_metal.run_on_gpu(self.module, x, self.weights, "per_layer")
        assert self._emu is not None
        return run_manifest_pipeline(self._emu, self.files.manifest, "per_layer", x, self.weights,
                                     orders=self.orders)

    def _other_forms(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        out = []
        has_fused = "fused" in self.files.manifest["pipelines"]
        if self.gpu:
            if "fused" in self.forms and has_fused:
                out.append(("the fused kernel (MLX, GPU)",
                            mlx_metal.run_on_gpu(self.module, x, self.weights, "fused")["output"]))
            return out
        assert self._emu is not None
        if "fused" in self.forms and has_fused:
            out.append((f"the fused kernel of {self.files.metal_name}",
                        run_manifest_pipeline(self._emu, self.files.manifest, "fused", x, self.weights,
                                              orders=self.orders)["output"]))
        if "mlx" in self.forms:
            for pipeline in self.module.PIPELINES:
                got = run_mlx_form_emulated(self.module, pipeline, x, self.weights, orders=self.orders)
                out.append((f"MLX's generated source ({pipeline} kernels)", got["output"]))
        return out

    # ------------------------------------------------------------------ Runner
    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``[n, out]`` of the per-layer kernels; the other forms must agree (else VerificationError)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        buffers = self._per_layer(x)
        ref = buffers["output"]
        scale = np.maximum(np.max(np.abs(x), axis=1, initial=0.0), 1.0)
        for name in self.layer_buffers:
            h = np.nan_to_num(buffers[name], nan=0.0, posinf=0.0, neginf=0.0)
            scale = np.maximum(scale, np.max(np.abs(h), axis=1, initial=0.0))
        for what, got in self._other_forms(x):
            _check_agree(what, got, ref, scale, self.atol, self.rtol)
        return ref

    def layer_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every inference-form layer's output, from the per-layer kernels."""
        buffers = self._per_layer(np.ascontiguousarray(x, dtype=np.float32))
        return [buffers[name] for name in self.layer_buffers]


def runner_for_folder(folder: Any, **options: Any) -> MetalRunner:
    """A runner for the Metal files *in* an output folder (``nnbridge verify``), as they are."""
    return MetalRunner(folder.network(), files_from_folder(folder), **options)


def _factory(net: NeuralNet, **options: Any) -> MetalRunner:
    return MetalRunner(net, **options)


register_backend("metal", _factory)

__all__ = [
    "FORMS",
    "LABEL_EMULATED",
    "LABEL_GPU",
    "MetalFiles",
    "MetalRunner",
    "files_for",
    "files_from_folder",
    "run_manifest_pipeline",
    "run_mlx_form_emulated",
    "runner_for_folder",
]
