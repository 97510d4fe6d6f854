"""Any model file → NeuralNet, by suffix; and what ``nnbridge inspect`` says about checkpoints.

``load_source`` dispatches ``.pt``/``.pth``/``.pt2`` to the torch bridge, ``.safetensors``
to the safetensors reader and ``.npz`` to the MLX bridge. ``describe_source`` reads a
checkpoint without running code from it and reports whether (and why not) it converts.

This module imports neither torch nor MLX at import time, so ``import nnbridge`` stays
fast; ``from_torch``/``from_mlx`` here are the lazy entry points ``nnbridge`` exports.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnbridge.errors import ConversionError, NNBridgeError
from nnbridge.spec import NetworkSpec

if TYPE_CHECKING:
    from nnbridge.net import NeuralNet

SOURCE_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors", ".npz")
Arch = NetworkSpec | str | PathLike[str] | None


def from_torch(source: Any, arch: Arch = None, name: str | None = None, trust_pickle: bool = False) -> NeuralNet:
    """A NeuralNet from a torch module, ExportedProgram, state dict or file; see ``converters.torch.from_torch``."""
    from .torch import from_torch as convert

    return convert(source, arch=arch, name=name, trust_pickle=trust_pickle)


def from_mlx(source: Any, arch: Arch = None, name: str | None = None) -> NeuralNet:
    """A NeuralNet from an MLX module, dict of arrays or weights file; see ``converters.mlx.from_mlx``."""
    from .mlx import from_mlx as convert

    return convert(source, arch=arch, name=name)


def load_source(path: str | PathLike[str], arch: Arch = None, name: str | None = None,
                trust_pickle: bool = False) -> NeuralNet:
    """A NeuralNet from a model file, chosen by suffix (``.pt``, ``.pth``, ``.pt2``, ``.safetensors``, ``.npz``).

    ``arch`` (spec or spec JSON path) is needed for bare weights (state dicts, ``.npz``,
    safetensors without our metadata). Pickled modules load only with ``trust_pickle``.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise ConversionError(f"{p}: no such file")
    if suffix in (".pt", ".pth", ".pt2"):
        return from_torch(p, arch=arch, name=name, trust_pickle=trust_pickle)
    if suffix == ".safetensors":
        from .safetensors import load_safetensors

        return load_safetensors(p, arch=arch, name=name)
    if suffix == ".npz":
        return from_mlx(p, arch=arch, name=name)
    raise ConversionError(
        f"{p}: unknown model file type {suffix or '(no suffix)'!r}; supported: {', '.join(SOURCE_SUFFIXES)} "
        f"(.nmw files: NeuralNet.load)")


# ------------------------------------------------------------------ describe
def describe_source(path: str | PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds and whether it converts without more input.

    Keys: ``kind`` ("checkpoint"), ``file``, ``source_kind``, ``convertible``, ``reason``
    (why not, else None), ``tensors`` (statistics), ``warnings`` (e.g. tensors holding NaN
    or infinity, which load but are worth a look); when convertible also the keys of
    :func:`nnbridge.inspect.describe_spec`, and then ``tensors`` are the converted
    weights in NMW layout. Never unpickles: a pickled module is reported, not loaded.
    Raises only :class:`NNBridgeError` (for a file that cannot be read at all).
    """
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"{p}: no such file")
    suffix = p.suffix.lower()
    info: dict[str, Any] = {"kind": "checkpoint", "file": str(p), "source_kind": None, "convertible": False,
                            "reason": None, "tensors": []}
    if suffix == ".safetensors":
        _describe_safetensors(p, info)
    elif suffix == ".pt2":
        _describe_pt2(p, info)
    elif suffix in (".pt", ".pth"):
        _describe_pt(p, info)
    elif suffix == ".npz":
        from .mlx import load_npz

        info["source_kind"] = "MLX weights (.npz)"
        info["tensors"] = _stats(load_npz(p))
        info["reason"] = "holds weights only, not the network; convert with an arch spec (--arch spec.json)"
    else:
        raise ConversionError(f"{p}: not a checkpoint ({', '.join(SOURCE_SUFFIXES)})")
    bad = [f"{t['name']} ({t['nonfinite']} of {t['count']} values)" for t in info["tensors"] if t["nonfinite"]]
    info["warnings"] = [f"tensors with NaN or infinity: {', '.join(bad)}"] if bad else []
    return info


def _stats(tensors: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    from nnbridge.inspect import tensor_stats

    out = []
    with np.errstate(all="ignore"):  # signalling NaNs, float128 or huge integers: counted, not warned
        for name, arr in tensors.items():
            a = np.asarray(arr)
            if a.dtype.kind in "fiu":
                out.append(tensor_stats(name, a))
    return out


def _converted(info: dict[str, Any], convert: Any) -> None:
    """Try ``convert()``; record the network or the reason it does not convert."""
    from nnbridge.inspect import describe_spec

    try:
        net = convert()
    except NNBridgeError as e:
        info["reason"] = str(e)
        return
    except Exception as e:  # noqa: BLE001 - inspect reports, it does not crash on odd models
        info["reason"] = f"conversion failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return
    info.update(describe_spec(net.spec))
    info["convertible"] = True
    info["tensors"] = _stats(dict(net.weights.items()))


def _describe_safetensors(p: Path, info: dict[str, Any]) -> None:
    from .safetensors import describe_metadata, load_safetensors, read_safetensors

    tensors, metadata = read_safetensors(p)
    fmt = metadata.get("format")
    info["source_kind"] = "safetensors" + (f" ({'MLX' if fmt == 'mlx' else 'torch' if fmt == 'pt' else fmt})"
                                           if fmt else "")
    info["metadata"] = describe_metadata(metadata)
    info["tensors"] = _stats(tensors)
    _converted(info, lambda: load_safetensors(p))


def _describe_pt2(p: Path, info: dict[str, Any]) -> None:
    from .common import file_stem_name
    from .torch import load_program, program_to_net, pt2_risks

    info["source_kind"] = "torch.export program (.pt2)"
    risks = pt2_risks(p)
    if risks:
        info["reason"] = (f"loading it would run code from the file ({'; '.join(risks[:3])}); convert with "
                          f"--trust-pickle only if you trust it")
        return
    _converted(info, lambda: program_to_net(load_program(p), file_stem_name(p), str(p)))


def _describe_pt(p: Path, info: dict[str, Any]) -> None:
    from .torch import PickledCheckpointError, find_state_dict, load_checkpoint, tensor_to_numpy

    try:
        obj = load_checkpoint(p, trust_pickle=False)
    except PickledCheckpointError as e:
        info["source_kind"] = "torch pickled object (e.g. torch.save(model))"
        info["reason"] = str(e)
        return
    info["source_kind"] = "torch checkpoint"
    try:
        state = find_state_dict(obj, str(p))
        info["source_kind"] = "torch state dict"
        info["tensors"] = _stats({k: tensor_to_numpy(v, f"{p}: tensor {k!r}") for k, v in state.items()})
    except ConversionError as e:
        info["reason"] = str(e)
        return
    info["reason"] = "holds weights only, not the network; convert with an arch spec (--arch spec.json)"


__all__ = ["SOURCE_SUFFIXES", "describe_source", "from_mlx", "from_torch", "load_source"]
