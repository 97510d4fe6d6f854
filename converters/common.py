"""Framework-neutral conversion logic shared by the torch, MLX and safetensors bridges.

- :class:`Op` and :func:`build_net`: a straight chain of ops read from a module or graph
  (a Linear, a ReLU, a Flatten …) becomes a :class:`NetworkSpec` and its weights. The
  rules live here once: an activation belongs to the layer before it; after a dropout
  it moves to the layer before the dropout when that one has none; two activations in
  a row, an activation before the first layer or sizes that do not chain are refused.
- :func:`match_tensors`: a flat dict of framework-layout tensors (torch/MLX:
  ``<prefix>.weight`` is ``[out, in]``) bound to a spec, by name when the names agree,
  else by order, shapes checked, the first mismatch named.
- :func:`framework_tensors`: the inverse, a spec's weights in torch/MLX layout and names.
- :func:`spec_disagreement`: the first difference between two specs, for "metadata says
  X, tensors say Y" refusals.
- :func:`reading`: the one boundary of every checkpoint reader, where whatever a
  third-party parser raises becomes a :class:`ConversionError`.
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnbridge.errors import ConversionError, NNBridgeError
from nnbridge.names import sanitize_name
from nnbridge.spec import DEFAULT_EPS, DEFAULT_NEGATIVE_SLOPE, Activation, LayerKind, LayerSpec, NetworkSpec, load_spec
from nnbridge.weights import Weights

if TYPE_CHECKING:
    from nnbridge.net import NeuralNet

# Buffers a framework keeps that carry no inference information.
IGNORED_SUFFIXES = ("num_batches_tracked",)


@dataclass
class Op:
    """One step of a straight-line network, as read from a module or a graph.

    ``kind`` is ``dense``, ``batch_norm``, ``dropout``, ``activation`` or ``flatten``
    (identity ops are simply not emitted). ``where`` names the module path or graph node
    for messages; ``path`` is the text the layer name is made from. ``tensors`` are in
    NMW layout (dense ``weight`` is ``[in, out]``).
    """

    kind: str
    where: str
    path: str = ""
    activation: Activation = Activation.NONE
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    eps: float = DEFAULT_EPS
    rate: float = 0.0
    features: int | None = None  # flatten: the feature count it produces, when stated


@contextlib.contextmanager
def reading(path: str | PathLike[str], what: str,
            explain: Callable[[Exception], NNBridgeError | None] | None = None) -> Iterator[None]:
    """The boundary of a reader of untrusted bytes: anything but an :class:`NNBridgeError` becomes a ConversionError.

    zipfile, numpy, torch's unpickler and safetensors' Rust core raise an open-ended set of
    types on corrupt input (IndexError, EOFError, zlib.error, NotImplementedError,
    OverflowError, MemoryError, RecursionError, SafetensorError …), so each reader wraps
    its parsing in this, once, instead of listing types it has happened to see.
    ``explain`` may turn a known failure into a more helpful error (None: the default).
    """
    try:
        yield
    except NNBridgeError:
        raise
    except Exception as e:  # noqa: BLE001 - the point: no foreign exception type crosses this line
        better = explain(e) if explain is not None else None
        raise (better or ConversionError(f"{path}: cannot read as {what}: {exception_text(e)}")) from None


MAX_ZIP_EXPANSION = 64  # weights barely compress; deflate bombs reach ~1000x


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open an untrusted zip (``.npz``, ``.pt2``) from memory, refusing a possible zip bomb.

    Read from memory: an entry's (untrusted) size fields would otherwise size reads of the
    real file. Readers stop at an entry's declared size, so capping the declared total at
    64x the file (+1 MiB) bounds what decompression can allocate.
    """
    data = path.read_bytes()
    z = zipfile.ZipFile(io.BytesIO(data))
    total = sum(info.file_size for info in z.infolist())
    limit = MAX_ZIP_EXPANSION * len(data) + (1 << 20)
    if total > limit:
        z.close()
        raise ConversionError(
            f"{path}: the archive declares {total} bytes uncompressed from {len(data)} on disk (more than "
            f"{MAX_ZIP_EXPANSION}x + 1 MiB); refusing a possible zip bomb — store the weights uncompressed")
    return z


def exception_text(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for one-line errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def as_float32(arr: Any, where: str) -> np.ndarray:
    """``arr`` as a float32 numpy array; refuses non-float data."""
    a = np.asarray(arr)
    if a.dtype.kind != "f":
        raise ConversionError(f"{where}: tensor has dtype {a.dtype}; expected floating point")
    return np.ascontiguousarray(a, dtype=np.float32)


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 2
    while out in taken:
        out = f"{name}_{n}"
        n += 1
    taken.add(out)
    return out


def build_net(ops: list[Op], name: str, source: str, supported: str = "") -> NeuralNet:
    """The :class:`NeuralNet` computing the chain ``ops``; refuses what the spec cannot express.

    Raises :class:`ConversionError` naming the op (module path / graph node) at fault,
    followed by ``supported`` (the framework's supported list).
    """
    try:
        return _build(ops, name, source)
    except ConversionError as e:
        if not supported:
            raise
        raise ConversionError(f"{e}; {supported}") from None


def _build(ops: list[Op], name: str, source: str) -> NeuralNet:
    from nnbridge.net import NeuralNet

    layers: list[LayerSpec] = []
    tensors: dict[str, np.ndarray] = {}
    where_of: list[str] = []
    taken: set[str] = set()
    width: int | None = None  # feature count flowing out of the last op, when known
    pending_flatten: list[Op] = []  # flattens before the first sized op: checked against the first layer
    last_was_activation = False
    for op in ops:
        if op.kind == "flatten":
            if op.features is not None:
                if width is None:
                    pending_flatten.append(op)
                elif op.features != width:
                    raise ConversionError(
                        f"{source}: {op.where}: reshapes {width} features into {op.features} per sample; only a "
                        f"flatten to [batch, features] is supported")
            continue
        if op.kind == "activation":
            _attach_activation(op, layers, where_of, source, last_was_activation)
            last_was_activation = True
            continue
        last_was_activation = False
        lname = _unique(sanitize_name(op.path or op.kind, fallback=op.kind), taken)
        if op.kind == "dense":
            w = op.tensors["weight"]
            n_in, n_out = int(w.shape[0]), int(w.shape[1])
            if width is not None and width != n_in:
                raise ConversionError(
                    f"{source}: {op.where}: takes {n_in} features but the layer before ({where_of[-1]}) gives "
                    f"{width}; sizes must chain")
            layer = LayerSpec(lname, LayerKind.DENSE, n_in, n_out, use_bias="bias" in op.tensors)
            width = n_out
        elif op.kind == "batch_norm":
            n = int(op.tensors["running_mean"].shape[0])
            if width is not None and width != n:
                raise ConversionError(
                    f"{source}: {op.where}: normalises {n} features but the layer before ({where_of[-1]}) gives "
                    f"{width}; sizes must chain")
            layer = LayerSpec(lname, LayerKind.BATCH_NORM, n, n, eps=float(op.eps))
            width = n
        elif op.kind == "dropout":
            layer = LayerSpec(lname, LayerKind.DROPOUT, width or 0, width or 0, dropout_rate=float(op.rate))
        else:  # pragma: no cover - converters only emit the kinds above
            raise AssertionError(op.kind)
        for suffix, arr in op.tensors.items():
            tensors[f"{lname}.{suffix}"] = arr
        layers.append(layer)
        where_of.append(op.where)
    if not any(layer.kind is not LayerKind.DROPOUT for layer in layers):
        raise ConversionError(
            f"{source}: found no Linear or BatchNorm layer; a network needs at least one (ops seen: "
            f"{', '.join(op.where for op in ops) or 'none'})")
    _size_dropouts(layers)
    first = layers[0]
    for op in pending_flatten:
        if op.features != first.input_size:
            raise ConversionError(
                f"{source}: {op.where}: flattens to {op.features} features but the first layer ({where_of[0]}) "
                f"takes {first.input_size}")
    spec = NetworkSpec(name, first.input_size, layers)
    try:
        spec.check()
        weights = Weights(spec, tensors, source=source)
    except NNBridgeError as e:
        raise ConversionError(f"{source}: the converted network is invalid: {e}") from None
    return NeuralNet(spec, weights)


def _attach_activation(op: Op, layers: list[LayerSpec], where_of: list[str], source: str,
                       after_activation: bool) -> None:
    act = op.activation
    if not layers:
        raise ConversionError(
            f"{source}: {op.where}: activation {act.value} before the first layer; the spec applies activations "
            f"after a layer only")
    if after_activation:
        raise ConversionError(
            f"{source}: {op.where}: second activation in a row ({act.value} after {layers[-1].activation.value} "
            f"of {where_of[-1]}); a layer takes one activation")
    target = len(layers) - 1
    if layers[target].kind is LayerKind.DROPOUT:
        # Dropout is the identity at inference: act(dropout(x)) == dropout(act(x)) there.
        prev = target - 1
        while prev >= 0 and layers[prev].kind is LayerKind.DROPOUT:
            prev -= 1
        if prev < 0 or layers[prev].activation is not Activation.NONE:
            before = "nothing" if prev < 0 else f"{where_of[prev]}, which already has {layers[prev].activation.value}"
            raise ConversionError(
                f"{source}: {op.where}: activation {act.value} after dropout {where_of[target]} cannot move to the "
                f"layer before it ({before}); dropout layers take no activation")
        target = prev
    layers[target].activation = act
    layers[target].negative_slope = float(op.negative_slope)


def _size_dropouts(layers: list[LayerSpec]) -> None:
    """Give each dropout the width of the layer before it (or after it, when it comes first)."""
    for i, layer in enumerate(layers):
        if layer.kind is not LayerKind.DROPOUT:
            continue
        size = layers[i - 1].output_size if i > 0 else next(
            x.input_size for x in layers if x.kind is not LayerKind.DROPOUT)
        layer.input_size = layer.output_size = size


def finish(net: NeuralNet, *, name: str | None, arch: NetworkSpec | None, source: str) -> NeuralNet:
    """Apply the ``name=`` override and check the result against ``arch`` when one was given."""
    from nnbridge.net import NeuralNet

    if arch is not None:
        diff = spec_disagreement(arch, net.spec)
        if diff:
            raise ConversionError(f"{source}: the model disagrees with the given arch {arch.name!r}: {diff}")
    if name is not None and name != net.spec.name:
        spec = NetworkSpec(name, net.spec.input_size, net.spec.layers)
        return NeuralNet(spec, Weights(spec, dict(net.weights), metadata=net.weights.metadata))
    return net


# ----------------------------------------------------------------- arch specs
def require_arch(arch: NetworkSpec | None, source: str, holder: str) -> NetworkSpec:
    """``arch``, or the error for a file that holds weights only (``holder``: "a state dict", …)."""
    if arch is None:
        raise ConversionError(
            f"{source}: {holder} holds weights only, not the network (activations, order); pass arch= (a "
            f"NetworkSpec or spec JSON file, --arch on the command line)")
    return arch


def resolve_arch(arch: NetworkSpec | str | PathLike[str] | None) -> NetworkSpec | None:
    """``arch`` as a checked spec: a :class:`NetworkSpec` or the path of a spec JSON file."""
    if arch is None:
        return None
    if isinstance(arch, NetworkSpec):
        return arch.check()
    if isinstance(arch, (str, PathLike)):
        return load_spec(arch).check()
    raise ConversionError(f"arch must be a NetworkSpec or the path of a spec JSON file, found {type(arch).__name__}")


def spec_disagreement(expected: NetworkSpec, found: NetworkSpec) -> str | None:
    """The first difference between two specs' computations (names aside), or None."""
    if len(expected.layers) != len(found.layers):
        return (f"{len(expected.layers)} layers expected, found {len(found.layers)} "
                f"({', '.join(_describe(x) for x in found.layers)})")
    for i, (a, b) in enumerate(zip(expected.layers, found.layers)):
        da, db = _describe(a), _describe(b)
        if da != db:
            return f"layer {i}: expected {a.name!r} {da}, found {b.name!r} {db}"
    return None


def _describe(layer: LayerSpec) -> str:
    kind = layer.kind.value
    if layer.kind is LayerKind.DENSE:
        kind += "" if layer.use_bias else "(no bias)"
    elif layer.kind is LayerKind.BATCH_NORM:
        kind += f"(eps={layer.eps:g})"
    act = layer.activation.value
    if layer.activation is Activation.LEAKY_RELU:
        act += f"({layer.negative_slope:g})"
    return f"{kind} {layer.input_size}->{layer.output_size} {act}"


# -------------------------------------------------- framework-layout tensors
def framework_shapes(layer: LayerSpec) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(suffix, shape, required)`` of ``layer``'s tensors in torch/MLX layout (Linear weight ``[out, in]``)."""
    i, o = layer.input_size, layer.output_size
    if layer.kind is LayerKind.DENSE:
        out = [("weight", (o, i), True)]
        if layer.use_bias:
            out.append(("bias", (o,), True))
        return out
    if layer.kind is LayerKind.BATCH_NORM:  # affine=False modules have no weight/bias
        return [("weight", (o,), False), ("bias", (o,), False), ("running_mean", (o,), True),
                ("running_var", (o,), True)]
    return []


_BN_NMW = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}


def to_nmw(layer: LayerSpec, group: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's torch/MLX-layout tensors (by suffix) as NMW tensors (``<layer>.<name>``)."""
    n = layer.name
    if layer.kind is LayerKind.DENSE:
        out = {f"{n}.weight": np.ascontiguousarray(group["weight"].T)}
        if layer.use_bias:
            out[f"{n}.bias"] = group["bias"]
        return out
    if layer.kind is LayerKind.BATCH_NORM:
        size = layer.output_size
        full = {"weight": np.ones(size, np.float32), "bias": np.zeros(size, np.float32), **group}
        return {f"{n}.{_BN_NMW[k]}": full[k] for k in _BN_NMW}
    return {}


def framework_tensors(net: NeuralNet) -> dict[str, np.ndarray]:
    """``net``'s weights in torch/MLX layout, named as ``to_torch()``'s state dict (no counters)."""
    out: dict[str, np.ndarray] = {}
    for layer in net.spec.layers:
        t = net.weights.layer(layer.name)
        if layer.kind is LayerKind.DENSE:
            out[f"{layer.name}.weight"] = np.ascontiguousarray(t["weight"].T)
            if layer.use_bias:
                out[f"{layer.name}.bias"] = t["bias"]
        elif layer.kind is LayerKind.BATCH_NORM:
            for fw, nmw in _BN_NMW.items():
                out[f"{layer.name}.{fw}"] = t[nmw]
    return out


def _natural_key(text: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text)]


def _groups(tensors: Mapping[str, np.ndarray], source: str, sort: bool) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in IGNORED_SUFFIXES:
            continue
        groups.setdefault(prefix, {})[suffix] = arr
    if sort:
        groups = dict(sorted(groups.items(), key=lambda kv: _natural_key(kv[0])))
    return groups


def _strip_common(prefixes: list[str]) -> dict[str, str]:
    parts = [p.split(".") if p else [] for p in prefixes]
    common = 0
    if parts and all(len(p) > 1 for p in parts):
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    return {p: ".".join(q[common:]) for p, q in zip(prefixes, parts)}


def match_tensors(spec: NetworkSpec, tensors: Mapping[str, Any], source: str, *, sort: bool = False,
                  by_name_only: bool = False, layout: str = "torch") -> Weights:
    """Bind framework-layout ``tensors`` (``<prefix>.weight`` …, Linear ``[out, in]``) to ``spec``.

    By name when every layer with tensors finds its prefix (``layers.0`` matches layer
    ``layers_0``; a prefix common to all keys, e.g. ``model.``, is ignored); otherwise by
    order (``sort`` orders prefixes naturally, for formats that do not keep order). Shapes
    are checked, unused tensors refused; the message names the first mismatch.
    ``by_name_only`` refuses order matching (the spec came with the tensors).
    """
    spec.check()
    arrays = {k: _as_array(k, v, source) for k, v in tensors.items()}
    groups = _groups(arrays, source, sort)
    wanted = [layer for layer in spec.layers if framework_shapes(layer)]
    stripped = _strip_common(list(groups))
    by_name: dict[str, str] = {}
    for prefix in groups:
        for cand in (prefix, stripped[prefix]):
            by_name.setdefault(sanitize_name(cand), prefix)
    named = all(layer.name in by_name for layer in wanted) and len(groups) == len(wanted)
    if named:
        pairs = [(layer, by_name[layer.name]) for layer in wanted]
    elif by_name_only:
        missing = [x.name for x in wanted if x.name not in by_name]
        detail = (f"no tensors for layer {missing[0]!r} (expected {missing[0]}.weight …)" if missing else
                  f"tensors {sorted(set(groups) - {by_name[x.name] for x in wanted})[0]!r}.* belong to no layer")
        raise ConversionError(f"{source}: tensors disagree with the spec {spec.name!r} stored with them: {detail}")
    else:
        if len(groups) != len(wanted):
            raise ConversionError(
                f"{source}: {len(groups)} tensor groups ({', '.join(repr(g) for g in groups) or 'none'}) but spec "
                f"{spec.name!r} has {len(wanted)} layers with weights ({', '.join(x.name for x in wanted)}); "
                f"names do not agree either, so they cannot be matched")
        pairs = list(zip(wanted, groups))
    out: dict[str, np.ndarray] = {}
    for layer, prefix in pairs:
        group = groups[prefix]
        expected = framework_shapes(layer)
        for suffix, shape, required in expected:
            key = f"{prefix}.{suffix}" if prefix else suffix
            if suffix not in group:
                if required:
                    raise ConversionError(
                        f"{source}: layer {layer.name!r} ({_describe(layer)}) needs tensor {key!r} {list(shape)}; "
                        f"found only {sorted(group)} under {prefix!r}")
                continue
            if tuple(group[suffix].shape) != shape:
                raise ConversionError(
                    f"{source}: tensor {key!r} has shape {list(group[suffix].shape)}; layer {layer.name!r} "
                    f"({_describe(layer)}) expects {list(shape)} ({layout} layout, Linear weight [out, in])")
        extra = sorted(set(group) - {s for s, _, _ in expected})
        if extra:
            key = f"{prefix}.{extra[0]}" if prefix else extra[0]
            raise ConversionError(
                f"{source}: tensor {key!r} is not used by layer {layer.name!r} ({_describe(layer)}); expected "
                f"{', '.join(s for s, _, _ in expected)}")
        if ("weight" in group) != ("bias" in group) and layer.kind is LayerKind.BATCH_NORM:
            raise ConversionError(f"{source}: batch norm {prefix!r} has only one of weight and bias")
        out.update(to_nmw(layer, group))
    return Weights(spec, out, source=source)


def _as_array(key: str, value: Any, source: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind != "f":
        if key.rpartition(".")[2] in IGNORED_SUFFIXES:
            return a
        raise ConversionError(f"{source}: tensor {key!r} has dtype {a.dtype}; expected floating point")
    return np.ascontiguousarray(a, dtype=np.float32)


def file_stem_name(path: str | PathLike[str]) -> str:
    """The default network name of a file: its stem, sanitised."""
    return sanitize_name(Path(path).stem, fallback="network")


__all__ = ["Op", "as_float32", "build_net", "exception_text", "file_stem_name", "finish", "framework_shapes",
           "framework_tensors", "match_tensors", "reading", "resolve_arch", "spec_disagreement", "to_nmw"]
