"""safetensors files ⇄ NeuralNet.

:func:`save_safetensors` writes torch/MLX-layout tensors named as ``to_torch()``'s state
dict (``<layer>.weight`` is ``[out, in]``, batch norms with ``num_batches_tracked``), so
``to_torch().load_state_dict(safetensors.torch.load_file(path))`` accepts them, with the
spec JSON in ``__metadata__`` so that :func:`load_safetensors` needs no arch.
:func:`load_safetensors` also reads files written by ``torch``/``safetensors.torch`` or by
MLX ``Module.save_weights`` (with ``arch=``). A file whose stored spec disagrees with its
tensors is refused with the first disagreement named.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnbridge._version import __version__
from nnbridge.errors import ConversionError, SpecError
from nnbridge.fsutil import atomic_write_bytes
from nnbridge.spec import LayerKind, NetworkSpec, from_json

if TYPE_CHECKING:
    from nnbridge.net import NeuralNet

SPEC_KEY = "nnbridge.spec"
MAX_HEADER = 100 * 1024 * 1024


def encode_safetensors(net: NeuralNet) -> bytes:
    """The safetensors bytes of ``net`` (torch layout, spec in ``__metadata__``)."""
    import torch
    from safetensors.torch import save

    from .common import framework_tensors

    tensors: dict[str, torch.Tensor] = {}
    fw = framework_tensors(net)
    for layer in net.spec.layers:  # to_torch()'s state dict order and keys
        for key in [k for k in fw if k.rpartition(".")[0] == layer.name]:
            tensors[key] = torch.from_numpy(np.array(fw[key], dtype=np.float32, order="C"))
        if layer.kind is LayerKind.BATCH_NORM:
            tensors[f"{layer.name}.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    metadata = {"format": "pt", SPEC_KEY: net.spec.to_json(), "nnbridge.version": __version__}
    return save(tensors, metadata=metadata)


def save_safetensors(net: NeuralNet, path: str | PathLike[str]) -> Path:
    """Write ``net`` as a safetensors file (atomically); see :func:`encode_safetensors`."""
    return atomic_write_bytes(path, encode_safetensors(net))


def read_safetensors(path: str | PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file (floats as float32 numpy) and its ``__metadata__``."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{p}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n > p.stat().st_size - 8:
            raise ConversionError(f"{p}: not a safetensors file (header length {n} does not fit the file)")
        out: dict[str, np.ndarray] = {}
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = t.float().numpy() if t.is_floating_point() else t.numpy()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConversionError(f"{p}: cannot read as safetensors: {str(e).splitlines()[0][:300]}") from None
    return out, metadata


def stored_spec(metadata: dict[str, str], source: str) -> NetworkSpec | None:
    """The spec kept in a safetensors ``__metadata__`` (ours), or None."""
    text = metadata.get(SPEC_KEY)
    if text is None:
        return None
    try:
        return from_json(text).check()
    except SpecError as e:
        raise ConversionError(f"{source}: the spec in its metadata ({SPEC_KEY!r}) is invalid: {e}") from None


def load_safetensors(path: str | PathLike[str], arch: NetworkSpec | str | PathLike[str] | None = None,
                     name: str | None = None) -> NeuralNet:
    """A :class:`NeuralNet` from a safetensors file: the spec from ``arch`` or from the file's metadata.

    With the stored spec, tensors must match it by name (else the first disagreement is
    named); with ``arch``, by name when names agree, else by (natural) key order.
    """
    from nnbridge.net import NeuralNet

    from .common import finish, match_tensors, resolve_arch

    p = Path(path)
    tensors, metadata = read_safetensors(p)
    spec = resolve_arch(arch)
    by_name_only = False
    if spec is None:
        spec = stored_spec(metadata, str(p))
        by_name_only = True
        if spec is None:
            fmt = metadata.get("format", "unknown")
            raise ConversionError(
                f"{p}: holds weights only (format {fmt!r}, no {SPEC_KEY!r} in its metadata), not the network; pass "
                f"arch= (a NetworkSpec or spec JSON file, --arch on the command line)")
    layout = "MLX" if metadata.get("format") == "mlx" else "torch"
    weights = match_tensors(spec, tensors, str(p), sort=True, by_name_only=by_name_only, layout=layout)
    meta = {"source_format": "safetensors", "source_file": p.name}
    net = NeuralNet(spec, type(weights)(spec, dict(weights), metadata=meta))
    return finish(net, name=name, arch=None, source=str(p))


def describe_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The metadata shown by ``nnbridge inspect`` (the spec JSON shortened)."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        if k == SPEC_KEY:
            try:
                out[k] = json.loads(v).get("name")
            except ValueError:
                out[k] = "(invalid JSON)"
        else:
            out[k] = v if len(v) <= 200 else v[:197] + "..."
    return out


__all__ = ["SPEC_KEY", "describe_metadata", "encode_safetensors", "load_safetensors", "read_safetensors",
           "save_safetensors", "stored_spec"]
