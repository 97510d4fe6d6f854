"""The MLX body form of the generated Metal kernels: load it, run it, and capture MLX's own source.

``<name>_mlx.py`` (rendered by :mod:`nnbridge.codegen.metal`) holds every kernel in the form
``mx.fast.metal_kernel(name, input_names, output_names, source, header)`` takes, plus
``run``/``layer_outputs`` over MLX arrays. This module

* loads that file (:func:`load_module`) or renders and loads it for a network
  (:func:`module_for`), and runs it on an Apple GPU (:func:`run_on_gpu`);
* predicts the full Metal source MLX generates around a body (:func:`predict_source`, a
  re-implementation of MLX's ``write_signature`` for untemplated kernels);
* captures the source MLX itself generates (:func:`capture_sources`): inside
  ``mx.export_function`` a ``metal_kernel`` call with ``verbose=True`` is recorded, not run,
  and MLX prints the source it would compile — on Linux too, without a GPU. MLX prints from
  C++, so the capture redirects file descriptor 1, not ``sys.stdout``.

The emulator (:mod:`nnbridge.verify.metal_emu`) compiles the captured text, so what runs on
the CPU is exactly what MLX would hand to the Metal compiler.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import VerificationError
from nnbridge.net import NeuralNet
from nnbridge.spec import NetworkSpec

MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes inputs with fewer elements in the constant address space
_TYPE_STRINGS = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "int32": "int32_t",
                 "uint32": "uint32_t", "int64": "int64_t", "bool": "bool"}
_BLOCK_RE = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```\n", re.S)
_capture_lock = threading.Lock()


# ---------------------------------------------------------------------- the generated module
def load_module(text: str, name: str = "nnbridge_metal_mlx") -> types.ModuleType:
    """Execute the text of a generated ``<name>_mlx.py`` as a fresh module and return it."""
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    try:
        exec(compile(text, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own generated code
    except Exception as e:  # noqa: BLE001 - report any failure of generated code as verification failure
        raise VerificationError(f"the generated MLX module does not load: {type(e).__name__}: {e}") from None
    return module


def module_for(source: NetworkSpec | NeuralNet, *, half: bool = False) -> types.ModuleType:
    """Render the MLX body form of ``source`` and load it."""
    from nnbridge.codegen import GenerateOptions
    from nnbridge.codegen.metal import render

    files = render(source, GenerateOptions(generate_metal=True, metal_half=half))
    text = next(t for f, t in files.items() if f.endswith("_mlx.py"))
    return load_module(text)


def metal_available() -> bool:
    """True when MLX has a Metal device (an Apple GPU) to run kernels on."""
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - any failure means no usable device
        return False


def run_on_gpu(module: types.ModuleType, x: np.ndarray, weights: np.ndarray,
               pipeline: str = "per_layer") -> dict[str, np.ndarray]:
    """Run ``pipeline`` of the generated module through ``mx.fast.metal_kernel`` on the GPU."""
    import mlx.core as mx

    if not metal_available():
        raise VerificationError("no Metal device: MLX cannot run custom Metal kernels here")
    buffers = module.run_pipeline(x, weights, pipeline)
    mx.eval(*buffers.values())
    return {k: np.array(v.astype(mx.float32)) for k, v in buffers.items()}


# ---------------------------------------------------------------------- MLX's generated source
def _type_string(dtype: Any) -> str:
    if isinstance(dtype, (type, np.dtype)):
        name = str(np.dtype(dtype))
    else:
        name = str(dtype).replace("mlx.core.", "")
    if name not in _TYPE_STRINGS:
        raise VerificationError(f"dtype {name} is not supported by nnbridge's MLX source prediction")
    return _TYPE_STRINGS[name]


def predict_source(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str, header: str,
                   inputs: Sequence[tuple[Any, Sequence[int]]], output_dtypes: Sequence[Any]) -> str:
    """The full Metal source MLX generates for an untemplated ``metal_kernel`` call.

    ``inputs`` are ``(dtype, shape)`` of the arrays passed. Mirrors MLX's ``write_signature``
    (``mlx/backend/common/metal_kernel.cpp``): kernel name ``custom_kernel_<name>`` plus a type
    suffix per array, ``const device``/``const constant`` inputs, shape/strides/ndim buffers
    when the body names them, outputs, then the thread attributes named in the body.
    """
    from nnbridge.codegen.metal import thread_attributes

    kname = "custom_kernel_" + name
    for dtype, shape in inputs:
        size = int(np.prod(shape)) if len(shape) else 1
        kname += "_" + _type_string(dtype)
        if len(shape) == 0:
            kname += "s"
        elif size < MAX_CONSTANT_ARRAY_SIZE:
            kname += "c"
    for dtype in output_dtypes:
        kname += "_" + _type_string(dtype)
    attrs = [f"  {t} {a} [[{a}]]" for a, t in thread_attributes(source)]
    lines = [header, "[[kernel]] void ", kname, "(\n"]
    index = 0
    for n, (dtype, shape) in zip(input_names, inputs):
        size = int(np.prod(shape)) if len(shape) else 1
        location = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if len(shape) == 0 else "*"
        lines.append(f"  const {location} {_type_string(dtype)}{ref} {n} [[buffer({index})]],\n")
        index += 1
        if len(shape) > 0:
            if f"{n}_shape" in source:
                lines.append(f"  const constant int* {n}_shape [[buffer({index})]],\n")
                index += 1
            if f"{n}_strides" in source:
                lines.append(f"  const constant int64_t* {n}_strides [[buffer({index})]],\n")
                index += 1
            if f"{n}_ndim" in source:
                lines.append(f"  const constant int& {n}_ndim [[buffer({index})]],\n")
                index += 1
    for n, dtype in zip(output_names, output_dtypes):
        lines.append(f"  device {_type_string(dtype)}* {n} [[buffer({index})]]")
        # MLX's own condition, quirk included (shape buffers count in `index`)
        lines.append(",\n" if index < len(inputs) + len(output_names) - 1 or attrs else ") {\n")
        index += 1
    for i, a in enumerate(attrs):
        lines.append(a + (",\n" if i < len(attrs) - 1 else ") {\n"))
    lines.append(source)
    lines.append("\n}\n")
    return "".join(lines)


def _capture_fd1(fn: Callable[[], Any]) -> str:
    """Run ``fn`` with file descriptor 1 redirected to a file; return what was written there."""
    sys.stdout.flush()
    with _capture_lock, tempfile.TemporaryFile() as tmp:
        saved = os.dup(1)
        try:
            os.dup2(tmp.fileno(), 1)
            try:
                fn()
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
        finally:
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode("utf-8", "replace")


def capture_sources(fn: Callable[..., Any], *example_args: Any) -> dict[str, str]:
    """The sources MLX generates for every ``metal_kernel`` call (made with ``verbose=True``) in ``fn``.

    ``fn`` is traced by ``mx.export_function`` with ``example_args`` (MLX arrays), which records
    the kernels without running them and prints each one's full source. Returns
    ``{kernel name: source}``.
    """
    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="nnb-mlx-export-") as tmp:
        path = str(Path(tmp) / "trace.mlxfn")

        def trace() -> None:
            mx.export_function(path, fn, *example_args)

        try:
            printed = _capture_fd1(trace)
        except Exception as e:  # noqa: BLE001 - MLX raises plain exceptions
            raise VerificationError(f"MLX could not trace the Metal kernels for export: {type(e).__name__}: {e}"
                                    ) from None
    found = {m.group(1): m.group(2) for m in _BLOCK_RE.finditer(printed)}
    if not found:
        raise VerificationError("MLX printed no generated kernel source while exporting (does this MLX version "
                                "support export_function and verbose metal_kernel calls?)")
    return found


def capture_pipeline_sources(module: types.ModuleType, batch: int, pipeline: str) -> dict[str, str]:
    """MLX's generated source of every kernel of ``pipeline`` for a batch of ``batch`` samples."""
    import mlx.core as mx

    x = mx.zeros((batch, module.INPUT_SIZE), dtype=module.STORAGE)
    w = mx.zeros((module.WEIGHTS_COUNT,), dtype=module.STORAGE)

    def fn(xa: Any, wa: Any) -> Any:
        buffers = module.run_pipeline(xa, wa, pipeline, verbose=True)
        return tuple(v for k, v in buffers.items() if k not in ("input", "weights"))

    sources = capture_sources(fn, x, w)
    missing = [s["kernel"] for s in module.PIPELINES[pipeline] if s["kernel"] not in sources]
    if missing:
        raise VerificationError(f"MLX printed no source for kernels {missing}")
    return sources


def predicted_pipeline_sources(module: types.ModuleType, batch: int, pipeline: str) -> dict[str, str]:
    """What :func:`capture_pipeline_sources` should return, predicted without MLX."""
    dt = np.float16 if "float16" in str(module.STORAGE) else np.float32
    widths = {"input": module.INPUT_SIZE}
    out = {}
    for step in module.PIPELINES[pipeline]:
        spec = module.KERNELS[step["kernel"]]
        shapes = [(module.WEIGHTS_COUNT,) if b == "weights" else (batch, widths[b]) for b in step["inputs"]]
        out[step["kernel"]] = predict_source(step["kernel"], spec["input_names"], spec["output_names"],
                                             spec["source"], module.HEADER, [(dt, s) for s in shapes], [dt])
        widths[step["output"]] = step["width"]
    return out


__all__ = [
    "capture_pipeline_sources",
    "capture_sources",
    "load_module",
    "metal_available",
    "module_for",
    "predict_source",
    "predicted_pipeline_sources",
    "run_on_gpu",
]
