"""mlx.nn ⇄ NeuralNet: build reference modules, import MLX models and weight files.

Mirror of ``nnbridge.converters.torch``: the same public names (``to_mlx``/``from_mlx``,
``run_mlx``, ``mlx_layer_outputs``, ``activation_module``), the same supported table
(``converters/_table.py``), the same kind of refusal.

MLX has no graph tracer, so ``from_mlx`` reads a module's layers in order: an
``nn.Sequential`` (its ``layers`` list, which may hold functions such as ``nn.relu``),
or a custom module whose children (attributes in definition order, lists, nested
Sequentials) are supported layers. A custom module's ``__call__`` may do more than run
its children in order, so its converted network is run against the module on a random
batch and refused when the two differ — never a silently different network.
"""

from __future__ import annotations

import functools
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nnbridge.errors import ConversionError
from nnbridge.names import sanitize_name
from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec

from ._table import FAMILIES, rows_for, supported_text
from .common import Op, as_float32, build_net, finish, match_tensors, open_zip, reading, require_arch, resolve_arch

if TYPE_CHECKING:
    from nnbridge.net import NeuralNet


def activation_module(layer: LayerSpec) -> nn.Module | None:
    """The MLX module computing ``layer``'s activation (None for ``none``)."""
    act = layer.activation
    if act is Activation.NONE:
        return None
    if act is Activation.RELU:
        return nn.ReLU()
    if act is Activation.LEAKY_RELU:
        return nn.LeakyReLU(layer.negative_slope)
    if act is Activation.SIGMOID:
        return nn.Sigmoid()
    if act is Activation.TANH:
        return nn.Tanh()
    if act is Activation.SOFTMAX:
        return nn.Softmax()
    if act is Activation.GELU:
        return nn.GELU(approx="none")
    if act is Activation.GELU_TANH:
        return nn.GELU(approx="precise")
    if act is Activation.SILU:
        return nn.SiLU()
    raise AssertionError(f"unhandled activation {act}")


def to_mlx(net: NeuralNet) -> nn.Sequential:
    """An ``mlx.nn.Sequential`` in eval mode holding ``net``'s weights (Linear weights ``[out, in]``)."""
    spec, w = net.spec, net.weights
    mods: list[Any] = []
    for layer in spec.layers:
        t = w.layer(layer.name)
        if layer.kind is LayerKind.DENSE:
            m: Any = nn.Linear(layer.input_size, layer.output_size, bias=layer.use_bias)
            m.weight = mx.array(np.ascontiguousarray(t["weight"].T))
            if layer.use_bias:
                m.bias = mx.array(t["bias"])
        elif layer.kind is LayerKind.BATCH_NORM:
            m = nn.BatchNorm(layer.output_size, eps=layer.eps)
            m.weight = mx.array(t["gamma"])
            m.bias = mx.array(t["beta"])
            m.running_mean = mx.array(t["running_mean"])
            m.running_var = mx.array(t["running_var"])
        else:
            m = nn.Dropout(layer.dropout_rate)
        mods.append(m)
        act = activation_module(layer)
        if act is not None:
            mods.append(act)
    seq = nn.Sequential(*mods)
    seq.eval()
    return seq


def run_mlx(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """Run ``module`` on a float32 batch; float32 numpy out."""
    y = module(mx.array(x))
    mx.eval(y)
    return np.array(y, dtype=np.float32)


def mlx_layer_outputs(spec: NetworkSpec, module: nn.Sequential, x: np.ndarray) -> list[np.ndarray]:
    """Each spec layer's output (after its activation) when running ``module`` built by :func:`to_mlx`."""
    children = list(module.layers)
    outs, pos = [], 0
    h = mx.array(x)
    for layer in spec.layers:
        n = 1 if layer.activation is Activation.NONE else 2
        for m in children[pos:pos + n]:
            h = m(h)
        pos += n
        mx.eval(h)
        outs.append(np.array(h, dtype=np.float32))
    return outs




def init_dense_weights(spec: NetworkSpec, gains: Mapping[str, tuple[str, float, float]], method: str,
                       distribution: str, seed: int) -> dict[str, np.ndarray]:
    """Dense weights ``[out, in]`` drawn by ``mlx.nn.init`` (``he_*``/``glorot_*``, fan_in = ``in``).

    MLX's initialisers draw from its global generator: it is seeded with ``seed`` (the
    state becomes ``mx.random.key(seed)``) and its previous state restored afterwards.
    """
    saved = np.array(mx.random.state[0]).astype(np.uint64)
    mx.random.seed(seed)
    try:
        if method == "kaiming":
            init = nn.init.he_uniform() if distribution == "uniform" else nn.init.he_normal()
        else:
            init = nn.init.glorot_uniform() if distribution == "uniform" else nn.init.glorot_normal()
        out = {}
        for layer in spec.layers:
            if layer.kind is not LayerKind.DENSE:
                continue
            gain = gains[layer.name][2]
            shape = mx.zeros((layer.output_size, layer.input_size))
            w = init(shape, mode="fan_in", gain=gain) if method == "kaiming" else init(shape, gain=gain)
            mx.eval(w)
            out[layer.name] = np.array(w, dtype=np.float32)
    finally:
        mx.random.seed(int((int(saved[0]) << 32) | int(saved[1])))  # key(s) is [s >> 32, s & 0xffffffff]
    return out


# ==================================================================== from_mlx
MLX_SUFFIXES = (".npz", ".safetensors")


def from_mlx(source: Any, arch: NetworkSpec | str | PathLike[str] | None = None, name: str | None = None
             ) -> NeuralNet:
    """A :class:`NeuralNet` from an MLX model or weight file.

    ``source`` is an ``mlx.nn.Module`` (``nn.Sequential``, or a custom module whose
    children are supported layers in order), a flat dict of arrays (with ``arch``), or
    the path of a ``.npz``/``.safetensors`` file written by ``Module.save_weights`` (with
    ``arch``, unless the safetensors metadata carries the spec). ``name`` overrides the
    network name (default: the module's class name, the spec's name or the file stem).
    """
    spec = resolve_arch(arch)
    if isinstance(source, nn.Module):
        label = type(source).__name__
        net = module_to_net(source, sanitize_name(label, fallback="network"), label)
        return finish(net, name=name, arch=spec, source=label)
    if isinstance(source, Mapping):
        return arrays_to_net(source, spec, name, "weights dict")
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConversionError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from .safetensors import load_safetensors

            return load_safetensors(path, arch=spec, name=name)
        if suffix == ".npz":
            return arrays_to_net(load_npz(path), spec, name, str(path))
        raise ConversionError(
            f"{path}: unknown MLX weights file type {suffix or '(no suffix)'!r}; from_mlx reads "
            f"{', '.join(MLX_SUFFIXES)} (torch files: from_torch or load_source)")
    raise ConversionError(
        f"from_mlx: cannot convert a {type(source).__name__}; pass an mlx.nn.Module, a dict of arrays (with arch=) "
        f"or the path of a {'/'.join(MLX_SUFFIXES)} file")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (``Module.save_weights``), as stored; never unpickles.

    Each member's ``.npy`` header is checked against the member's size before any array
    is allocated, so a header claiming 2**40 elements costs nothing; duplicate names and
    object (pickled) arrays are refused.
    """
    out: dict[str, np.ndarray] = {}
    with reading(path, "an .npz weights file"), open_zip(path) as z:
        for info in z.infolist():
            name = info.filename
            key = name[:-4] if name.endswith(".npy") else name
            if key in out:
                raise ConversionError(f"{path}: member {name!r} appears twice; expected one array per name")
            out[key] = _read_npy_member(z, info, path)
    return out


def _read_npy_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One ``.npy`` member: header first, then exactly the bytes the header promises (never more than stored)."""
    fmt = np.lib.format
    where = f"{path}: cannot read member {info.filename!r}"
    with z.open(info) as f:
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        with warnings.catch_warnings():  # the header is a Python literal: odd escapes in it warn, not fail
            warnings.simplefilter("ignore")
            shape, fortran_order, dtype = read_header(f)
        if dtype.hasobject:
            raise ConversionError(f"{where}: holds Python objects (dtype {dtype}); expected numbers (pickled arrays "
                                  f"are never loaded)")
        if any(d < 0 for d in shape):
            raise ConversionError(f"{where}: header shape {list(shape)}; expected non-negative sizes")
        count = 1
        for d in shape:
            count *= d
        want, have = count * dtype.itemsize, info.file_size - f.tell()
        if want != have:
            raise ConversionError(f"{where}: header says shape {list(shape)} of {dtype} ({want} bytes); expected it "
                                  f"to match the {have} data bytes stored")
        data = bytearray(want)
        got = f.readinto(data)
    if got != want:
        raise ConversionError(f"{where}: truncated: expected {want} data bytes, found {got}")
    flat = np.frombuffer(data, dtype=dtype, count=count) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def arrays_to_net(arrays: Mapping[str, Any], arch: NetworkSpec | None, name: str | None, source: str) -> NeuralNet:
    """Bind flat MLX-layout arrays (``layers.0.weight`` …, Linear ``[out, in]``) to ``arch``."""
    from nnbridge.net import NeuralNet

    arch = require_arch(arch, source, "a weights file")
    tensors = {}
    for key, value in arrays.items():
        if isinstance(value, mx.array):
            value = np.array(value.astype(mx.float32)) if mx.issubdtype(value.dtype, mx.floating) else np.array(value)
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise ConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not an array")
        tensors[key] = value
    net = NeuralNet(arch, match_tensors(arch, tensors, source, sort=True, layout="MLX"))
    return finish(net, name=name if name is not None else arch.name, arch=None, source=source)


# ------------------------------------------------------------ dispatch tables
def _resolve(spelling: str) -> Any:
    space, _, attr = spelling.partition(".")
    return getattr(nn if space == "nn" else mx, attr)


MODULES: dict[type, str] = {}
FUNCTIONS: dict[Any, str] = {}
for _spelling, _row in rows_for("mlx"):
    _obj = _resolve(_spelling)
    if isinstance(_obj, type):
        MODULES[_obj] = _row.family
    else:
        FUNCTIONS[_obj] = _row.family
_SIMPLE_ACTIVATIONS = {"relu": Activation.RELU, "sigmoid": Activation.SIGMOID, "tanh": Activation.TANH,
                       "silu": Activation.SILU}


def _refuse(source: str, where: str, why: str = "is not supported") -> ConversionError:
    return ConversionError(f"{source}: {where} {why}; {supported_text('mlx')}")


def module_to_net(module: nn.Module, name: str, source: str) -> NeuralNet:
    """Convert ``module``'s layers in order; a custom module is then checked against its own output."""
    exact = [True]
    ops = [op for op in (_leaf_op(path, item, source) for path, item in _leaves(module, "", source, exact))
           if op is not None]
    net = build_net(ops, name, source, supported_text("mlx"))
    if not exact[0]:
        _check_same(module, net, source)
    return net


def _leaves(obj: Any, path: str, source: str, exact: list[bool]) -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` of every leaf layer in call order; ``exact[0]`` turns False for custom modules."""
    def sub(key: str) -> str:
        return f"{path}.{key}" if path else key

    if type(obj) is nn.Sequential:
        for i, layer in enumerate(obj.layers):
            yield from _leaves(layer, sub(f"layers.{i}"), source, exact)
    elif isinstance(obj, nn.Module) and type(obj) in MODULES:
        yield path, obj
    elif isinstance(obj, nn.Module) and type(obj).__module__.startswith("mlx."):
        raise _refuse(source, f"layer {path or '(root)'!r} ({_label(obj)})")
    elif isinstance(obj, nn.Module):
        own = [k for k, v in obj.items() if isinstance(v, mx.array)]
        if own:
            raise _refuse(source, f"module {path or '(root)'!r} ({type(obj).__name__})",
                          f"holds arrays of its own ({', '.join(own)}) besides layers; only modules made of "
                          f"supported layers can be read")
        exact[0] = False
        children = obj.children()
        if not children:
            raise _refuse(source, f"module {path or '(root)'!r} ({type(obj).__module__}.{type(obj).__name__})")
        for key, child in children.items():
            yield from _leaves(child, sub(key), source, exact)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _leaves(item, sub(str(i)), source, exact)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _leaves(item, sub(str(key)), source, exact)
    else:
        yield path, obj


def _label(item: Any) -> str:
    if isinstance(item, functools.partial):
        return f"partial({_label(item.func)}, {item.keywords})"
    if isinstance(item, nn.Module):
        return f"{type(item).__module__}.{type(item).__name__}"
    return getattr(item, "__qualname__", None) or getattr(item, "__name__", None) or type(item).__name__


def _leaf_op(path: str, item: Any, source: str) -> Op | None:
    where = f"layer {path!r} ({_label(item)})"
    if isinstance(item, nn.Module):
        family = MODULES.get(type(item))
        if family is None:
            raise _refuse(source, where)
        return _module_op(item, path, family, where, source)
    func, kwargs = item, {}
    if isinstance(item, functools.partial) and not item.args:
        func, kwargs = item.func, dict(item.keywords)
    try:
        family = FUNCTIONS.get(func)
    except TypeError:
        family = None
    if family is None:
        raise _refuse(source, where)
    if family == "leaky_relu":
        slope = kwargs.pop("negative_slope", 0.01)
        op = Op("activation", where, activation=Activation.LEAKY_RELU, negative_slope=float(slope))
    elif family == "softmax":
        axis = kwargs.pop("axis", -1)
        if axis != -1:
            raise _refuse(source, where, f"is softmax over axis {axis}; only axis=-1 (the features) is supported")
        op = Op("activation", where, activation=Activation.SOFTMAX)
    elif family == "gelu":
        op = Op("activation", where, activation=Activation.GELU_TANH if func is nn.gelu_approx else Activation.GELU)
    elif family in _SIMPLE_ACTIVATIONS:
        op = Op("activation", where, activation=_SIMPLE_ACTIVATIONS[family])
    else:
        raise _refuse(source, where, "is supported as a module only")
    if kwargs:
        raise _refuse(source, where, f"has arguments {sorted(kwargs)} that are not supported")
    return op


def _arr(a: Any, where: str) -> np.ndarray:
    return as_float32(np.array(a.astype(mx.float32)) if mx.issubdtype(a.dtype, mx.floating) else np.array(a), where)


def _module_op(m: nn.Module, path: str, family: str, where: str, source: str) -> Op | None:
    if family == "dense":
        tensors = {"weight": np.ascontiguousarray(_arr(m.weight, where).T)}
        if "bias" in m:
            tensors["bias"] = _arr(m.bias, where)
        return Op("dense", where, path=path, tensors=tensors)
    if family == "batch_norm":
        if not getattr(m, "track_running_stats", False) or "running_mean" not in m:
            raise _refuse(source, where, "has no running statistics (track_running_stats=False), so it normalises "
                          "with batch statistics at inference, which the spec cannot express")
        mean = _arr(m.running_mean, where)
        n = mean.shape[0]
        tensors = {
            "gamma": _arr(m.weight, where) if "weight" in m else np.ones(n, np.float32),
            "beta": _arr(m.bias, where) if "bias" in m else np.zeros(n, np.float32),
            "running_mean": mean,
            "running_var": _arr(m.running_var, where),
        }
        return Op("batch_norm", where, path=path, tensors=tensors, eps=float(m.eps))
    if family == "dropout":
        return Op("dropout", where, path=path, rate=round(1.0 - float(m._p_1), 7))
    if family == "identity":
        return None
    if family == "leaky_relu":
        return Op("activation", where, activation=Activation.LEAKY_RELU, negative_slope=float(m._negative_slope))
    if family == "gelu":
        approx = getattr(m, "_approx", "none")
        if approx not in ("none", "precise", "tanh"):
            raise _refuse(source, where, f"uses GELU approximation {approx!r}, which is not supported")
        return Op("activation", where, activation=Activation.GELU if approx == "none" else Activation.GELU_TANH)
    if family == "softmax":
        return Op("activation", where, activation=Activation.SOFTMAX)
    if family in _SIMPLE_ACTIVATIONS:
        return Op("activation", where, activation=_SIMPLE_ACTIVATIONS[family])
    raise _refuse(source, where)  # pragma: no cover - every MLX family is handled above


def _check_same(module: nn.Module, net: NeuralNet, source: str) -> None:
    """Refuse unless the custom ``module`` computes what ``net`` computes (eval mode, one random batch)."""
    x = np.random.default_rng(0).standard_normal((7, net.spec.in_size)).astype(np.float32)
    modes = sorted(((k, m, m.training) for k, m in module.named_modules()), key=lambda t: t[0].count(".") +
                   (0 if t[0] else -1))
    module.eval()
    try:
        y = module(mx.array(x))
        mx.eval(y)
        got = np.array(y, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - whatever the user's __call__ raises
        raise ConversionError(
            f"{source}: {type(module).__name__} cannot be checked: calling it on a [7, {net.spec.in_size}] batch "
            f"failed ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); use nn.Sequential") from None
    finally:
        for _, m, training in modes:
            m.train(training)
    want = run_mlx(to_mlx(net), x)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        diff = "shape " + str(list(got.shape)) if got.shape != want.shape else \
            f"max difference {float(np.max(np.abs(got - want))):.3g}"
        layers = ", ".join(f"{x.name} ({x.kind.value}, {x.activation.value})" for x in net.spec.layers)
        raise ConversionError(
            f"{source}: {type(module).__name__}.__call__ does more than run its layers in order ({layers}): its "
            f"output differs ({diff}). Functions applied inside __call__ (e.g. nn.relu(x)), skips or reshapes are "
            f"invisible to nnbridge; build the model as nn.Sequential with activations as entries, or see "
            f"{supported_text('mlx')}")


def _check_table() -> None:
    """Every family the MLX column names has a converter here (import-time consistency check)."""
    handled = {"dense", "batch_norm", "dropout", "identity", "leaky_relu", "gelu", "softmax", *_SIMPLE_ACTIVATIONS}
    missing = {row.family for row in FAMILIES.values() if row.mlx} - handled
    if missing:  # pragma: no cover - guards edits of _table.py
        raise AssertionError(f"converters/mlx.py handles no {sorted(missing)}")


_check_table()

__all__ = ["activation_module", "arrays_to_net", "from_mlx", "init_dense_weights", "load_npz", "mlx_layer_outputs",
           "module_to_net", "run_mlx", "to_mlx"]
