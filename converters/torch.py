"""torch.nn ⇄ NeuralNet: build reference modules, import trained models and checkpoints.

``to_torch`` builds an ``nn.Sequential`` whose parameter names are the spec's layer names
(``hidden1.weight``), so ``state_dict`` files written from it convert back by name.

``from_torch`` reads a module (traced with ``torch.fx``), an ``ExportedProgram`` or a
``.pt2`` file (its ATen graph), a state dict or ``.pt``/``.pth`` file plus an ``arch``
spec, or a ``.safetensors`` file. Every op must be in the supported table
(``converters/_table.py``); anything else is refused with :class:`ConversionError`
naming the module path or graph node — never a silently different network.
Files are loaded with ``torch.load(weights_only=True)`` unless ``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import operator
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nnbridge.errors import ConversionError
from nnbridge.names import sanitize_name
from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec

from ._table import FAMILIES, rows_for, supported_text
from .common import (
    Op,
    as_float32,
    build_net,
    exception_text,
    file_stem_name,
    finish,
    match_tensors,
    open_zip,
    reading,
    require_arch,
    resolve_arch,
)

if TYPE_CHECKING:
    from nnbridge.net import NeuralNet


def activation_module(layer: LayerSpec) -> nn.Module | None:
    """The torch module computing ``layer``'s activation (None for ``none``)."""
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
        return nn.Softmax(dim=-1)
    if act is Activation.GELU:
        return nn.GELU(approximate="none")
    if act is Activation.GELU_TANH:
        return nn.GELU(approximate="tanh")
    if act is Activation.SILU:
        return nn.SiLU()
    raise AssertionError(f"unhandled activation {act}")


def _act_name(layer: LayerSpec, taken: set[str]) -> str:
    name = f"{layer.name}_{layer.activation.value}"
    while name in taken:
        name += "_"
    return name


def to_torch(net: NeuralNet) -> nn.Sequential:
    """An ``nn.Sequential`` in eval mode holding ``net``'s weights; one module per layer op."""
    spec, w = net.spec, net.weights
    taken = {layer.name for layer in spec.layers}
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for layer in spec.layers:
        t = w.layer(layer.name)
        if layer.kind is LayerKind.DENSE:
            m: nn.Module = nn.Linear(layer.input_size, layer.output_size, bias=layer.use_bias)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.array(t["weight"].T, order="C")))
                if layer.use_bias:
                    m.bias.copy_(torch.from_numpy(t["bias"].copy()))
        elif layer.kind is LayerKind.BATCH_NORM:
            m = nn.BatchNorm1d(layer.output_size, eps=layer.eps)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(t["gamma"].copy()))
                m.bias.copy_(torch.from_numpy(t["beta"].copy()))
                m.running_mean.copy_(torch.from_numpy(t["running_mean"].copy()))
                m.running_var.copy_(torch.from_numpy(t["running_var"].copy()))
        else:
            m = nn.Dropout(layer.dropout_rate)
        mods[layer.name] = m
        act = activation_module(layer)
        if act is not None:
            key = _act_name(layer, taken)
            taken.add(key)
            mods[key] = act
    return nn.Sequential(mods).eval()


def run_torch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """Run ``module`` on a float32 batch in inference mode; float32 out."""
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy().astype(np.float32, copy=False)


def torch_layer_outputs(spec: NetworkSpec, module: nn.Sequential, x: np.ndarray) -> list[np.ndarray]:
    """Each spec layer's output (after its activation) when running ``module`` built by :func:`to_torch`."""
    children = list(module.children())
    outs, pos = [], 0
    with torch.inference_mode():
        h = torch.from_numpy(x)
        for layer in spec.layers:
            n = 1 if layer.activation is Activation.NONE else 2
            for m in children[pos:pos + n]:
                h = m(h)
            pos += n
            outs.append(h.numpy().astype(np.float32, copy=True))
    return outs


def init_dense_weights(spec: NetworkSpec, gains: Mapping[str, tuple[str, float, float]], method: str,
                       distribution: str, seed: int) -> dict[str, np.ndarray]:
    """Dense weights ``[out, in]`` drawn by ``torch.nn.init`` from a ``torch.Generator`` seeded with ``seed``.

    ``gains[layer]`` is ``(nonlinearity, negative_slope, gain)``: Kaiming takes torch's
    nonlinearity name (torch computes the gain), Xavier the gain. See ``NeuralNet.init_weights``.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in spec.layers:
        if layer.kind is not LayerKind.DENSE:
            continue
        nonlinearity, slope, gain = gains[layer.name]
        w = torch.empty(layer.output_size, layer.input_size, dtype=torch.float32)
        if method == "kaiming":
            init = nn.init.kaiming_uniform_ if distribution == "uniform" else nn.init.kaiming_normal_
            init(w, a=slope if nonlinearity == "leaky_relu" else 0.0, mode="fan_in", nonlinearity=nonlinearity,
                 generator=gen)
        else:
            init = nn.init.xavier_uniform_ if distribution == "uniform" else nn.init.xavier_normal_
            init(w, gain=gain, generator=gen)
        out[layer.name] = w.numpy()
    return out


# =================================================================== from_torch
TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors")


def from_torch(source: Any, arch: NetworkSpec | str | PathLike[str] | None = None, name: str | None = None,
               trust_pickle: bool = False) -> NeuralNet:
    """A :class:`NeuralNet` from a torch model or checkpoint.

    ``source`` is an ``nn.Module`` (``nn.Sequential`` or a custom module, traced with
    ``torch.fx``), an ``ExportedProgram``, a state dict (with ``arch``), or the path of a
    ``.pt2`` (``torch.export.save``), ``.pt``/``.pth`` (a state dict, with ``arch``; a
    pickled whole module only with ``trust_pickle=True``) or ``.safetensors`` file.
    ``arch`` (a spec or spec JSON path) is required for bare weights and checked
    against the model otherwise. ``name`` overrides the network name (default: the
    module's class name, the spec's name, or the file stem).
    """
    spec = resolve_arch(arch)
    if isinstance(source, torch.jit.ScriptModule):
        raise ConversionError(
            f"{type(source).__name__}: TorchScript modules are not supported; pass the eager nn.Module, a state "
            f"dict with arch=, or a torch.export program")
    if isinstance(source, nn.Module):
        label = type(source).__name__
        net = module_to_net(source, sanitize_name(label, fallback="network"), label)
        return finish(net, name=name, arch=spec, source=label)
    if isinstance(source, torch.export.ExportedProgram):
        default = _program_class_name(source)
        net = program_to_net(source, default, f"ExportedProgram({default})")
        return finish(net, name=name, arch=spec, source="ExportedProgram")
    if isinstance(source, Mapping):
        return state_dict_to_net(source, spec, name or (spec.name if spec else None), "state dict")
    if isinstance(source, (str, PathLike)):
        return _from_file(Path(source), spec, name, trust_pickle)
    raise ConversionError(
        f"from_torch: cannot convert a {type(source).__name__}; pass an nn.Module, an ExportedProgram, a state dict "
        f"(with arch=) or the path of a {'/'.join(TORCH_SUFFIXES)} file")


def state_dict_to_net(state: Mapping[str, Any], arch: NetworkSpec | None, name: str | None,
                      source: str, *, sort: bool = False) -> NeuralNet:
    """Bind a state dict (torch layout) to ``arch``: by name when names agree, else by order."""
    from nnbridge.net import NeuralNet

    arch = require_arch(arch, source, "a state dict")
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                f"(name -> tensor)")
        tensors[key] = tensor_to_numpy(value, f"{source}: tensor {key!r}")
    weights = match_tensors(arch, tensors, source, sort=sort)
    net = NeuralNet(arch, weights)
    return finish(net, name=name, arch=None, source=source)


_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                 torch.uint32, torch.uint64, torch.complex64, torch.complex128}


def tensor_to_numpy(t: torch.Tensor, where: str = "tensor") -> np.ndarray:
    """``t`` as numpy (floating point as float32); refuses tensors numpy cannot hold or that hold less than they show.

    A checkpoint can describe a tensor of 2**31 elements over a 4-byte storage (stride 0):
    copying it would allocate gigabytes from a tiny file, so the elements a tensor shows
    must fit in the storage it has.
    """
    if not isinstance(t, torch.Tensor):
        raise ConversionError(f"{where}: is a {type(t).__name__}; expected a tensor")
    t = t.detach()
    if t.device.type == "meta":
        raise ConversionError(f"{where}: tensor is on the meta device (no data); load real weights first")
    if t.layout is not torch.strided or t.is_quantized:
        kind = "quantized" if t.layout is torch.strided else str(t.layout).removeprefix("torch.")
        raise ConversionError(f"{where}: is a {kind} tensor ({t.dtype}); expected a dense floating-point tensor")
    if not t.is_floating_point() and t.dtype not in _NUMPY_DTYPES:
        raise ConversionError(f"{where}: has dtype {t.dtype}; expected floating point")
    shown, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if shown > held:
        raise ConversionError(
            f"{where}: shape {list(t.shape)} (stride {list(t.stride())}) shows {shown} bytes but its storage holds "
            f"{held}; expected a tensor that owns its elements (save t.contiguous() or t.clone())")
    t = t.cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


# ------------------------------------------------------------------ files
def _from_file(path: Path, arch: NetworkSpec | None, name: str | None, trust_pickle: bool) -> NeuralNet:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if suffix == ".safetensors":
        from .safetensors import load_safetensors

        return load_safetensors(path, arch=arch, name=name)
    if suffix == ".pt2":
        program = load_program(path, trust_pickle=trust_pickle)
        net = program_to_net(program, file_stem_name(path), str(path))
        return finish(net, name=name, arch=arch, source=str(path))
    if suffix not in (".pt", ".pth"):
        raise ConversionError(
            f"{path}: unknown torch file type {suffix or '(no suffix)'!r}; from_torch reads "
            f"{', '.join(TORCH_SUFFIXES)} (MLX .npz files: from_mlx or load_source)")
    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        if isinstance(obj, torch.jit.ScriptModule):
            raise ConversionError(f"{path}: TorchScript modules are not supported; save a state dict instead")
        net = module_to_net(obj, file_stem_name(path), f"{path}: {type(obj).__name__}")
        return finish(net, name=name, arch=arch, source=str(path))
    state = find_state_dict(obj, str(path))
    default = arch.name if arch is not None else None
    return state_dict_to_net(state, arch, name or default, str(path))


class PickledCheckpointError(ConversionError):
    """A checkpoint holds pickled Python objects and ``trust_pickle`` was not given."""


def load_checkpoint(path: Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU: ``weights_only=True`` unless ``trust_pickle``.

    A legacy (non-zip) checkpoint is unpickled straight from the file, where a length in the
    pickle makes the file read allocate what it claims (4 bytes of a 4 KB file can ask for
    4 GB); it is read into memory first, so a read can only return what the file holds.
    """
    with reading(path, "a torch checkpoint", _explain_load_error(path)), warnings_silenced():
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        source = path if zipped else io.BytesIO(path.read_bytes())
        return torch.load(source, map_location="cpu", weights_only=not trust_pickle)


def _explain_load_error(path: Path) -> Callable[[Exception], ConversionError | None]:
    """The errors of ``torch.load`` worth a specific message: pickled objects refused, TorchScript."""
    def explain(e: Exception) -> ConversionError | None:
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in text:
            found = text.split("Unsupported global:", 1)[1].split("was not")[0].strip()
            return PickledCheckpointError(
                f"{path}: holds a pickled Python object ({found}), not just tensors. Loading it runs code from "
                f"the file (unpickling can execute arbitrary code), so it is refused by default. If you trust the "
                f"file, pass trust_pickle=True (--trust-pickle on the command line); better, save "
                f"model.state_dict() or a torch.export program instead")
        if isinstance(e, pickle.UnpicklingError):
            detail = text.split("WeightsUnpickler error:", 1)[-1]
            return ConversionError(
                f"{path}: cannot read with torch.load(weights_only=True) ({_first_line(detail)}): the file is corrupt "
                f"or holds pickled Python objects; only if you trust it, pass trust_pickle=True")
        if isinstance(e, RuntimeError) and "TorchScript" in text:
            return ConversionError(
                f"{path}: is a TorchScript archive, which is not supported; save model.state_dict() (with arch=) "
                f"or export with torch.export.save")
        return None

    return explain


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def find_state_dict(obj: Any, source: str) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint: the object itself or a ``state_dict``-like entry."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        raise ConversionError(
            f"{source}: a dict without a state dict in it (keys: {', '.join(map(repr, list(obj)[:10]))}); expected "
            f"name -> tensor, or one of {', '.join(_STATE_KEYS)} holding it")
    raise ConversionError(f"{source}: holds a {type(obj).__name__}; expected a state dict (name -> tensor)")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


class _LoggedErrors(logging.Handler):
    """Collects the exceptions torch logs (with ``exc_info``) before raising a generic error."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(logging.WARNING)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def warnings_silenced(errors: list[BaseException] | None = None) -> Iterator[None]:
    """Keep torch's loader chatter (warnings, log lines) off the user's console; logged exceptions go to ``errors``."""
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.export.pt2_archive._package")]
    saved = [(lg.level, lg.propagate, lg.handlers) for lg in loggers]
    collector = _LoggedErrors([] if errors is None else errors)
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
            lg.propagate = False
            lg.handlers = [collector]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = handlers


# ------------------------------------------------------------------ .pt2
def pt2_risks(path: Path) -> list[str]:
    """Parts of a ``.pt2`` archive whose loading would unpickle or run code (empty when it is safe).

    ``torch.export.load`` unpickles pickled weights/constants, custom objects and sample
    inputs, and loads AOTInductor libraries; when its own reader fails (e.g. on a file
    outside the archive folder) it falls back to a legacy loader that unpickles top-level
    ``serialized_*.pt`` entries. This looks at the archive (plain zip and JSON reads, sample
    inputs with ``weights_only=True``) before anything is loaded. Every entry is read
    through its own zip record, and duplicate names are refused, so that torch's C++ zip
    reader cannot be shown a different entry than the one checked here.
    """
    def explain(e: Exception) -> ConversionError:
        return ConversionError(f"{path}: not a torch.export .pt2 archive: {exception_text(e)}")

    risks: list[str] = []
    with reading(path, "a torch.export .pt2 archive", explain), open_zip(path) as z:
        infos = z.infolist()
        seen: set[str] = set()
        for info in infos:
            if info.filename in seen:
                return [f"entry {info.filename!r} appears twice (zip readers may pick different copies)"]
            seen.add(info.filename)
        roots = sorted({info.filename.split("/", 1)[0] for info in infos})
        outside = [info.filename for info in infos if "/" not in info.filename]
        if len(roots) != 1 or outside:
            return [f"not a single-folder torch.export archive (top-level entries {roots[:5]}); torch.export.load "
                    f"would fall back to its legacy loader, which unpickles"]
        root = roots[0] + "/"
        rel = {info.filename[len(root):]: info for info in infos}
        fmt = z.read(rel["archive_format"]).decode("utf-8", "replace").strip() if "archive_format" in rel else ""
        if fmt != "pt2":
            return ["an old-format export archive (pickled payloads)"]
        for r in rel:
            if r.startswith("data/aotinductor/") and not r.endswith("/"):
                risks.append(f"an AOTInductor compiled library ({r})")
                break
        for r, info in rel.items():
            in_payload = r.startswith(("data/weights/", "data/constants/"))
            if in_payload and r.endswith(".pt"):
                risks.append(f"legacy pickled payload {r}")
            if in_payload and r.endswith("_config.json"):
                config = json.loads(z.read(info)).get("config", {})
                for fqn, meta in config.items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or path_name.startswith(("custom_obj_", "opaque_obj_")):
                        risks.append(f"pickled entry {fqn!r} in {r}")
            if r.startswith("data/sample_inputs/") and r.endswith(".pt"):
                data = z.read(info)
                if data:
                    try:
                        with warnings_silenced():
                            torch.load(io.BytesIO(data), weights_only=True)
                    except Exception:  # noqa: BLE001 - any failure means torch would unpickle it unsafely
                        risks.append(f"sample inputs {r} that need full unpickling")
    return risks


def load_program(path: Path, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a ``.pt2`` file, refusing archives that would unpickle unless ``trust_pickle``."""
    risks = pt2_risks(path)
    if risks and not trust_pickle:
        raise PickledCheckpointError(
            f"{path}: loading this archive would run code from it ({'; '.join(risks[:3])}); unpickling can execute "
            f"arbitrary code, so it is refused by default. If you trust the file, pass trust_pickle=True "
            f"(--trust-pickle on the command line)")
    logged: list[BaseException] = []

    def explain(e: Exception) -> ConversionError | None:
        if not logged:
            return None  # torch logs the real cause, then raises "check the warnings above": name the cause
        return ConversionError(f"{path}: cannot read as a torch.export program: {exception_text(logged[0])}")

    with reading(path, "a torch.export program", explain), warnings_silenced(logged):
        return torch.export.load(path)


# ======================================================= dispatch tables (from _table)
def _resolve_function(spelling: str) -> tuple[str, Any]:
    """``("function", obj)`` for ``F.x``/``torch.x``, ``("method", name)`` for ``Tensor.x``."""
    space, _, attr = spelling.partition(".")
    if space == "Tensor":
        return "method", attr
    return "function", getattr(F if space == "F" else torch, attr)


def _resolve_aten(spelling: str) -> Any:
    _, op, overload = spelling.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


MODULES: dict[type, str] = {getattr(nn, n): row.family for n, row in rows_for("torch_modules")}
FUNCTIONS: dict[Any, str] = {}
METHODS: dict[str, str] = {}
for _spelling, _row in rows_for("torch_functions"):
    _how, _obj = _resolve_function(_spelling)
    if _how == "method":
        METHODS[_obj] = _row.family
    else:
        FUNCTIONS[_obj] = _row.family
ATEN: dict[Any, str] = {_resolve_aten(s): row.family for s, row in rows_for("torch_aten")}
_SIMPLE_ACTIVATIONS = {"relu": Activation.RELU, "sigmoid": Activation.SIGMOID, "tanh": Activation.TANH,
                       "silu": Activation.SILU}


def _refuse(source: str, where: str, framework: str, why: str = "is not supported") -> ConversionError:
    return ConversionError(f"{source}: {where} {why}; {supported_text(framework)}")


def _activation_op(family: str, where: str, *, slope: float | None = None, approximate: str | None = None,
                   dim: Any = -1, source: str, framework: str) -> Op:
    if family in _SIMPLE_ACTIVATIONS:
        return Op("activation", where, activation=_SIMPLE_ACTIVATIONS[family])
    if family == "leaky_relu":
        return Op("activation", where, activation=Activation.LEAKY_RELU,
                  negative_slope=float(0.01 if slope is None else slope))
    if family == "gelu":
        if approximate not in ("none", "tanh", None):
            raise _refuse(source, where, framework, f"uses GELU approximation {approximate!r}, which is not supported")
        return Op("activation", where, activation=Activation.GELU_TANH if approximate == "tanh" else Activation.GELU)
    if family == "softmax":
        if dim not in (-1, 1, None):
            raise _refuse(source, where, framework,
                          f"is softmax over dim {dim}; only the feature dimension (dim=-1 or 1) is supported")
        return Op("activation", where, activation=Activation.SOFTMAX)
    raise AssertionError(family)


# ================================================================ fx (modules)
def module_to_net(module: nn.Module, name: str, source: str) -> NeuralNet:
    """Trace ``module`` with ``torch.fx`` and convert its graph (see the supported table)."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises assorted errors on untraceable code
        raise ConversionError(
            f"{source}: torch.fx cannot trace {type(module).__name__}.forward ({_first_line(str(e))}); export it "
            f"with torch.export.export(model.eval(), (example_input,)) and pass the ExportedProgram, or rebuild it "
            f"as nn.Sequential") from None
    return build_net(list(_fx_ops(gm, source)), name, source, supported_text("torch"))


def _arg(node: torch.fx.Node, index: int, key: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _fx_ops(gm: torch.fx.GraphModule, source: str) -> Iterator[Op]:
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _refuse(source, f"forward({', '.join(n.name for n in inputs)})", "torch",
                      f"takes {len(inputs)} inputs; only one input tensor is supported")
    current = inputs[0]
    chain = {current}  # every value the data has passed through
    shape_nodes: set[torch.fx.Node] = set()  # x.shape
    batch_nodes: set[torch.fx.Node] = set()  # x.size(0), x.shape[0]
    attrs: dict[torch.fx.Node, Any] = {}
    for node in nodes:
        where = _fx_where(gm, node)
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            attrs[node] = _fetch_attr(gm, str(node.target))
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)) and len(out) == 1:
                out = out[0]
            if out is not current:
                raise _refuse(source, f"the output ({out})", "torch",
                              "is not the single result of the layer chain (several outputs or a branch)")
            return
        # shape helpers: the batch size feeds view/reshape
        if node.op == "call_method" and node.target == "size" and node.args[0] in chain:
            if _arg(node, 1, "dim") != 0:
                raise _refuse(source, where, "torch", "reads a shape other than the batch size")
            batch_nodes.add(node)
            continue
        if node.op == "call_function" and node.target is getattr and node.args[0] in chain \
                and node.args[1] == "shape":
            shape_nodes.add(node)
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in shape_nodes:
            if node.args[1] != 0:
                raise _refuse(source, where, "torch", "reads a shape other than the batch size")
            batch_nodes.add(node)
            continue
        family, label = _fx_family(gm, node)
        where = f"{where} ({label})"
        if family is None:
            raise _refuse(source, where, "torch")
        data = node.args[0] if node.args else node.kwargs.get("input")
        if data is not current:
            raise _refuse(source, where, "torch",
                          f"reads {data} instead of the running value {current}; only a straight chain is "
                          f"supported (no second input, skip connection or branch)")
        extra = [a for a in node.all_input_nodes if a is not data and a not in batch_nodes
                 and (a not in attrs or family != "dense")]
        if extra:
            raise _refuse(source, where, "torch",
                          f"also reads {extra[0]} (a residual/skip connection, a second input or a computed "
                          f"argument)")
        try:
            op = _fx_op(gm, node, family, where, attrs, batch_nodes, source)
        except ConversionError:
            raise
        except (TypeError, ValueError) as e:
            raise _refuse(source, where, "torch", f"has arguments that are not plain constants ({e})") from None
        if op is not None:
            yield op
        current = node
        chain.add(node)
    raise ConversionError(f"{source}: the traced graph has no output")  # pragma: no cover


def _fx_where(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    return f"graph node {node.name!r}"


def _fx_family(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return MODULES.get(type(mod)), f"{type(mod).__module__}.{type(mod).__qualname__}"
    if node.op == "call_method":
        return METHODS.get(str(node.target)), f"Tensor.{node.target}"
    if node.op == "call_function":
        target = node.target
        label = f"{getattr(target, '__module__', None) or 'torch'}.{getattr(target, '__name__', target)}"
        try:
            return FUNCTIONS.get(target), label
        except TypeError:  # unhashable callables
            return None, label
    return None, node.op


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fx_op(gm: torch.fx.GraphModule, node: torch.fx.Node, family: str, where: str,
           attrs: dict[torch.fx.Node, Any], batch_nodes: set[torch.fx.Node], source: str) -> Op | None:
    if node.op == "call_module":
        return _module_op(gm.get_submodule(str(node.target)), str(node.target), family, where, source)
    if family == "dense":  # F.linear(x, weight, bias)
        w_node, b_node = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if w_node not in attrs or (b_node is not None and b_node not in attrs):
            raise _refuse(source, where, "torch", "uses a weight that is computed, not a parameter")
        w_target = str(w_node.target)
        path = w_target.rpartition(".")[0] or node.name
        tensors = {"weight": _weight_t(attrs[w_node], f"{source}: {where}")}
        if b_node is not None:
            tensors["bias"] = _f32(attrs[b_node], f"{source}: {where}")
        return Op("dense", where, path=path, tensors=tensors)
    if family == "dropout":
        return Op("dropout", where, path=node.name, rate=float(_arg(node, 1, "p", 0.5)))
    if family == "identity":
        return None
    if family == "flatten":
        return _fx_flatten(node, where, batch_nodes, source)
    if family == "leaky_relu":
        return _activation_op(family, where, slope=_arg(node, 1, "negative_slope", 0.01), source=source,
                              framework="torch")
    if family == "gelu":
        return _activation_op(family, where, approximate=_arg(node, 1, "approximate", "none"), source=source,
                              framework="torch")
    if family == "softmax":
        if _arg(node, 3 if node.target is F.softmax else 2, "dtype") is not None:
            raise _refuse(source, where, "torch", "changes the dtype of the softmax; only float32 is supported")
        return _activation_op(family, where, dim=_arg(node, 1, "dim"), source=source, framework="torch")
    return _activation_op(family, where, source=source, framework="torch")


def _fx_flatten(node: torch.fx.Node, where: str, batch_nodes: set[torch.fx.Node], source: str) -> Op:
    target = node.target
    if target in ("flatten",) or target is torch.flatten:
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if start != 1 or end != -1:
            raise _refuse(source, where, "torch",
                          f"flattens dims {start}..{end}; only flatten(x, 1) (keep the batch) is supported")
        return Op("flatten", where)
    shape = list(node.args[1:]) if target in ("view", "reshape") else [_arg(node, 1, "shape")]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    ok = len(shape) == 2 and (
        (shape[0] in batch_nodes and (shape[1] == -1 or isinstance(shape[1], int)))
        or (shape[0] == -1 and isinstance(shape[1], int) and not isinstance(shape[1], bool) and shape[1] > 0))
    if not ok:
        raise _refuse(source, where, "torch",
                      f"reshapes to {shape}; only (x.size(0), -1), (x.shape[0], -1) or (-1, features) is supported")
    features = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else None
    return Op("flatten", where, features=features)


def _f32(t: Any, at: str) -> np.ndarray:
    """A parameter or buffer as a float32 numpy array; ``at`` (source and op) names it in errors."""
    return as_float32(tensor_to_numpy(t, at), at)


def _weight_t(w: Any, at: str) -> np.ndarray:
    """A torch ``[out, in]`` weight as an NMW ``[in, out]`` float32 array."""
    a = _f32(w, at)
    if a.ndim != 2:
        raise ConversionError(f"{at}: weight has shape {list(a.shape)}; expected [out, in]")
    return np.ascontiguousarray(a.T)


def _module_op(mod: nn.Module, path: str, family: str, where: str, source: str) -> Op | None:
    if family == "dense":
        tensors = {"weight": _weight_t(mod.weight, f"{source}: {where}")}
        if mod.bias is not None:
            tensors["bias"] = _f32(mod.bias, f"{source}: {where}")
        return Op("dense", where, path=path, tensors=tensors)
    if family == "batch_norm":
        return _bn_op(where, path, mod.weight, mod.bias, mod.running_mean, mod.running_var, mod.eps,
                      mod.num_features, source)
    if family == "dropout":
        return Op("dropout", where, path=path, rate=float(mod.p))
    if family == "identity":
        return None
    if family == "flatten":
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise _refuse(source, where, "torch",
                          f"is Flatten({mod.start_dim}, {mod.end_dim}); only Flatten(1, -1) is supported")
        return Op("flatten", where)
    if family == "leaky_relu":
        return _activation_op(family, where, slope=mod.negative_slope, source=source, framework="torch")
    if family == "gelu":
        return _activation_op(family, where, approximate=mod.approximate, source=source, framework="torch")
    if family == "softmax":
        return _activation_op(family, where, dim=mod.dim, source=source, framework="torch")
    return _activation_op(family, where, source=source, framework="torch")


def _bn_op(where: str, path: str, weight: Any, bias: Any, mean: Any, var: Any, eps: float, size: int | None,
           source: str) -> Op:
    if mean is None or var is None:
        raise _refuse(source, where, "torch",
                      "has no running statistics (track_running_stats=False), so it normalises with batch "
                      "statistics at inference, which the spec cannot express")
    at = f"{source}: {where}"
    m = _f32(mean, at)
    n = int(m.shape[0]) if size is None else int(size)
    tensors = {
        "gamma": _f32(weight, at) if weight is not None else np.ones(n, np.float32),
        "beta": _f32(bias, at) if bias is not None else np.zeros(n, np.float32),
        "running_mean": m,
        "running_var": _f32(var, at),
    }
    return Op("batch_norm", where, path=path, tensors=tensors, eps=float(eps))


# =================================================== torch.export (ATen graphs)
def _program_class_name(program: torch.export.ExportedProgram) -> str:
    for node in program.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
            short = str(cls_name or "").rsplit(".", 1)[-1]
            if path == "" and short and not short.startswith("_"):
                return sanitize_name(short, fallback="network")
    return "network"


def program_to_net(program: torch.export.ExportedProgram, name: str, source: str) -> NeuralNet:
    """Convert an ``ExportedProgram``'s ATen graph (see the supported table)."""
    return build_net(list(_aten_ops(program, source)), name, source, supported_text("torch.export"))


def _aten_where(node: torch.fx.Node) -> str:
    where = f"graph node {node.name!r} ({node.target})"
    stack = node.meta.get("nn_module_stack") or {}
    if len(stack) > 1:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        where += f" in module {path!r} ({cls_name})"
    return where


def _module_path(node: torch.fx.Node, cls_suffix: str) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if len(stack) > 1:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
        if str(cls_name).endswith(cls_suffix):
            return str(path)
    return None


def _aten_ops(program: torch.export.ExportedProgram, source: str) -> Iterator[Op]:
    sig = program.graph_signature
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    values = {**program.state_dict, **program.constants}
    user_inputs = list(sig.user_inputs)
    if len(user_inputs) != 1:
        raise _refuse(source, f"the program's inputs ({', '.join(map(str, user_inputs))})", "torch.export",
                      f"number {len(user_inputs)}; only one input tensor is supported")
    user_outputs = list(sig.user_outputs)
    fqn: dict[torch.fx.Node, str] = {}
    current: torch.fx.Node | None = None
    transposed: dict[torch.fx.Node, torch.fx.Node] = {}  # t(param) -> param
    batch_nodes: set[torch.fx.Node] = set()
    tuple_node: torch.fx.Node | None = None
    nodes = list(program.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            if node.name in params:
                fqn[node] = params[node.name]
            elif node.name == user_inputs[0]:
                current = node
            else:
                raise _refuse(source, f"graph input {node.name!r}", "torch.export",
                              "is a lifted constant or an unknown input")
            continue
        where = _aten_where(node)
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            user = [o for o in outs if getattr(o, "name", None) in user_outputs]
            if len(user_outputs) != 1 or len(user) != 1 or user[0] is not current:
                raise _refuse(source, f"the program output ({', '.join(map(str, user_outputs))})", "torch.export",
                              "is not the single result of the layer chain (several outputs or a branch)")
            return
        target = node.target
        if target is torch.ops.aten.sym_size.int and node.args[1] == 0:
            batch_nodes.add(node)
            continue
        if target in (torch.ops.aten.t.default, torch.ops.aten.permute.default) and node.args[0] in fqn:
            if target is torch.ops.aten.permute.default and list(node.args[1]) != [1, 0]:
                raise _refuse(source, where, "torch.export", "permutes a parameter other than a transpose")
            transposed[node] = node.args[0]
            continue
        if target is operator.getitem and node.args[0] is tuple_node:
            if node.args[1] == 0:
                current = node
            continue
        family = ATEN.get(target) if callable(target) else None
        if family is None:
            raise _refuse(source, where, "torch.export")
        data_index = 1 if target is torch.ops.aten.addmm.default else 0
        data = node.args[data_index]
        if data is not current:
            raise _refuse(source, where, "torch.export",
                          f"reads {data} instead of the running value {current}; only a straight chain is "
                          f"supported (no second input, skip connection or branch)")
        extra = [a for a in node.all_input_nodes
                 if a is not data and a not in fqn and a not in transposed and a not in batch_nodes]
        if extra:
            raise _refuse(source, where, "torch.export",
                          f"also reads {extra[0]} (a residual/skip connection or a second input)")
        op = _aten_op(node, family, where, fqn, values, transposed, source)
        if op is not None:
            yield op
        if target is torch.ops.aten._native_batch_norm_legit_no_training.default:
            tuple_node = node
            current = None
        else:
            current = node
    raise ConversionError(f"{source}: the program graph has no output")  # pragma: no cover


def _param(node: Any, fqn: dict[torch.fx.Node, str], values: Mapping[str, Any], where: str, source: str) -> Any:
    if node is None:
        return None
    if node not in fqn:
        raise _refuse(source, where, "torch.export", f"uses {node}, which is computed, not a parameter or buffer")
    return values[fqn[node]]


def _aten_op(node: torch.fx.Node, family: str, where: str, fqn: dict[torch.fx.Node, str],
             values: Mapping[str, Any], transposed: dict[torch.fx.Node, torch.fx.Node], source: str) -> Op | None:
    a = node.args
    target = node.target
    if family == "dense":
        if target is torch.ops.aten.linear.default:
            w_node, b_node = a[1], (a[2] if len(a) > 2 else node.kwargs.get("bias"))
        else:
            w_t = a[2] if target is torch.ops.aten.addmm.default else a[1]
            if w_t not in transposed:
                raise _refuse(source, where, "torch.export", "multiplies by something other than a transposed weight")
            w_node = transposed[w_t]
            b_node = a[0] if target is torch.ops.aten.addmm.default else None
            if target is torch.ops.aten.addmm.default and (node.kwargs.get("beta", 1) != 1
                                                           or node.kwargs.get("alpha", 1) != 1):
                raise _refuse(source, where, "torch.export", "scales addmm (alpha/beta != 1)")
        weight = _param(w_node, fqn, values, where, source)
        tensors = {"weight": _weight_t(weight, f"{source}: {where}")}
        if b_node is not None:
            tensors["bias"] = _f32(_param(b_node, fqn, values, where, source), f"{source}: {where}")
        path = fqn[w_node].rpartition(".")[0] or node.name
        return Op("dense", where, path=path, tensors=tensors)
    if family == "batch_norm":
        if target is torch.ops.aten.batch_norm.default:
            w, b, rm, rv, eps = a[1], a[2], a[3], a[4], a[7]
        else:
            w, b, rm, rv, eps = a[1], a[2], a[3], a[4], a[6]
        if rm is None or rv is None:
            raise _refuse(source, where, "torch.export", "normalises with batch statistics (no running statistics)")
        path = fqn[rm].rpartition(".")[0] if rm in fqn else node.name
        return _bn_op(where, path or node.name, _param(w, fqn, values, where, source),
                      _param(b, fqn, values, where, source), _param(rm, fqn, values, where, source),
                      _param(rv, fqn, values, where, source), float(eps), None, source)
    if family == "dropout":
        return Op("dropout", where, path=_module_path(node, "Dropout") or node.name, rate=float(a[1]))
    if family == "identity":
        return None
    if family == "flatten":
        return _aten_flatten(node, where, source)
    if family == "leaky_relu":
        return _activation_op(family, where, slope=a[1] if len(a) > 1 else node.kwargs.get("negative_slope", 0.01),
                              source=source, framework="torch.export")
    if family == "gelu":
        return _activation_op(family, where, approximate=node.kwargs.get("approximate", a[1] if len(a) > 1 else "none"),
                              source=source, framework="torch.export")
    if family == "softmax":
        if target is torch.ops.aten.softmax.int and (len(a) > 2 and a[2] is not None):
            raise _refuse(source, where, "torch.export", "changes the dtype of the softmax")
        return _activation_op(family, where, dim=a[1], source=source, framework="torch.export")
    return _activation_op(family, where, source=source, framework="torch.export")


def _aten_flatten(node: torch.fx.Node, where: str, source: str) -> Op:
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if src is None or out is None:
        raise _refuse(source, where, "torch.export", "has no shape information")
    in_shape, out_shape = list(src.shape), list(out.shape)
    try:
        per_sample = math.prod(in_shape[1:]) if len(in_shape) > 1 else None
        ok = len(in_shape) >= 2 and len(out_shape) == 2 and bool(out_shape[0] == in_shape[0]) \
            and bool(out_shape[1] == per_sample)
    except Exception:  # noqa: BLE001 - symbolic shapes may refuse to compare
        ok = False
    if not ok:
        raise _refuse(source, where, "torch.export",
                      f"reshapes {in_shape} to {out_shape}; only a flatten to [batch, features] is supported")
    feats = out_shape[1]
    return Op("flatten", where, features=int(feats) if isinstance(feats, int) else None)


def _check_table() -> None:
    """Every family in the table has a converter here (import-time consistency check)."""
    handled = {"dense", "batch_norm", "dropout", "identity", "flatten", "leaky_relu", "gelu", "softmax",
               *_SIMPLE_ACTIVATIONS}
    missing = set(FAMILIES) - handled
    if missing:  # pragma: no cover - guards edits of _table.py
        raise AssertionError(f"converters/torch.py handles no {sorted(missing)}")


_check_table()

__all__ = ["PickledCheckpointError", "activation_module", "from_torch", "init_dense_weights", "load_checkpoint",
           "load_program", "module_to_net", "program_to_net", "pt2_risks", "run_torch", "state_dict_to_net",
           "tensor_to_numpy", "to_torch", "torch_layer_outputs"]
