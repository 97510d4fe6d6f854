"""Describe a file nnbridge can read: spec JSON, NMW weights (and, via converters, checkpoints).

The library returns a plain dict (JSON-ready); the CLI renders it.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import NNBridgeError
from nnbridge.nmw import read_nmw
from nnbridge.spec import NetworkSpec, load_spec

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors", ".npz")


def tensor_stats(name: str, arr: np.ndarray) -> dict[str, Any]:
    """Shape and simple statistics of one tensor (NaN/inf counted, not propagated)."""
    a = np.asarray(arr, dtype=np.float64)
    finite = a[np.isfinite(a)]
    return {
        "name": name,
        "shape": list(a.shape),
        "count": int(a.size),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "nonfinite": int(a.size - finite.size),
    }


def describe_spec(spec: NetworkSpec) -> dict[str, Any]:
    """Name, sizes, layers, parameter count, summary table and portability of a spec."""
    return {
        "network": spec.name,
        "input_size": spec.input_size,
        "output_size": spec.output_size if spec.layers else None,
        "layers": [layer.to_dict() for layer in spec.layers],
        "total_params": spec.total_params(),
        "summary": spec.summary(),
        "nim_portable": spec.is_nim_portable(),
        "problems": spec.problems(),
    }


def inspect_file(path: str | PathLike[str]) -> dict[str, Any]:
    """Everything worth knowing about ``path``; raises :class:`NNBridgeError` on a bad file."""
    p = Path(path)
    if not p.exists():
        raise NNBridgeError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".json":
        spec = load_spec(p)
        return {"kind": "spec", "file": str(p), **describe_spec(spec)}
    if suffix == ".nmw":
        f = read_nmw(p)
        info = {"kind": "nmw", "file": str(p), "size": f.size, "version": f.version, **describe_spec(f.spec)}
        info["tensors"] = [tensor_stats(n, t) for n, t in f.weights.items()]
        info["trailer"] = f.trailer
        info["integrity"] = ("verified (CRC-32 and length match)" if f.trailer is not None
                             else "no trailer (plain NMW v1): structure checked, no checksum")
        info["warnings"] = list(f.warnings)
        return info
    if suffix in CHECKPOINT_SUFFIXES:
        from nnbridge.converters.sources import describe_source

        return describe_source(p)
    raise NNBridgeError(
        f"{p}: unknown file type {suffix or '(no suffix)'!r}; nnbridge reads .json (spec), .nmw (weights) and "
        f"checkpoints ({', '.join(CHECKPOINT_SUFFIXES)})"
    )
