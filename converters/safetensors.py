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
    """Every tensor of a safetensors file (floats as float32 numpy) and its ``__metadata__``.

    The header length is checked against the file before the header is read; the
    safetensors core then checks every tensor's shape and dtype against its byte range,
    so nothing is allocated beyond what the file holds (float16/bfloat16 double to float32).
    """
    from safetensors import safe_open

    from .common import reading

    p = Path(path)
    with reading(p, "safetensors"):
        with p.open("rb") as f:
            head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{p}: not a safetensors file: expected an 8-byte header length, found "
                                  f"{len(head)} bytes")
        n = int.from_bytes(head, "little")
        room = p.stat().st_size - 8
        if n > min(MAX_HEADER, room):
            raise ConversionError(f"{p}: not a safetensors file: header length (u64 at offset 0) is {n}; expected "
                                  f"at most {min(MAX_HEADER, room)} (the bytes after it)")
        out: dict[str, np.ndarray] = {}
        with safe_open(str(p), framework="pt") as f:  # checks the header (depth, dtypes, offsets) first
            metadata = dict(f.metadata() or {})
            with p.open("rb") as raw:
                raw.seek(8)
                _refuse_duplicate_keys(p, raw.read(n))
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = t.float().numpy() if t.is_floating_point() else t.numpy()
    return out, metadata


def _refuse_duplicate_keys(p: Path, header: bytes) -> None:
    """Refuse a header naming a key twice: the safetensors core keeps the last, other readers may not."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise ConversionError(f"{p}: the header names {key!r} twice; expected each tensor and metadata key "
                                      f"once")
            seen.add(key)
        return dict(items)

    json.loads(header, object_pairs_hook=pairs)


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
    """The metadata shown by ``nnbridge inspect`` (the spec JSON shortened to its name)."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        if k == SPEC_KEY:
            try:
                doc = json.loads(v)
            except (ValueError, RecursionError):
                doc = None
            name = doc.get("name") if isinstance(doc, dict) else None
            out[k] = name if isinstance(name, str) else "(not a spec: invalid JSON or no name)"
        else:
            out[k] = v if len(v) <= 200 else v[:197] + "..."
    return out


__all__ = ["SPEC_KEY", "describe_metadata", "encode_safetensors", "load_safetensors", "read_safetensors",
           "save_safetensors", "stored_spec"]
