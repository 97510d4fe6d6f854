"""Metal target: ``<name>.metal``, ``<name>.manifest.json`` and ``<name>_mlx.py``.

Everything is generated from the inference form of the network (:func:`nnbridge.codegen.common.plan`:
batch norm folded where it can be, dropout removed):

* a **fused** kernel — one thread per sample, the whole network in thread memory — for
  small networks;
* **per-layer** kernels — dense + bias + activation on 16×16 tiles staged in threadgroup
  memory with ``threadgroup_barrier``; batch norm that could not be folded as an
  elementwise kernel; softmax inside the dense kernel when the whole row fits one tile,
  else as a row kernel reducing with ``simd_max``/``simd_sum``;
* every kernel reads the weights from ONE buffer holding the flat float32 tensor data of
  the inference form in spec order (the NMW tensor payload of a network without batch
  norm); element offsets are ``constant`` values in the source.

Each kernel's *body* is the same text in the ``.metal`` file and in the MLX body form
(``mx.fast.metal_kernel`` writes its own signature; we write the same one, with parameters
named as MLX names them). This module holds the data; ``templates/metal/`` the code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jinja2

from nnbridge.codegen import GenerateOptions, register_renderer
from nnbridge.codegen.common import LayerPlan, NetworkPlan, f32_literal, header_lines, plan, template_env
from nnbridge.errors import CodegenError
from nnbridge.names import comment
from nnbridge.net import NeuralNet
from nnbridge.spec import NetworkSpec

MANIFEST_FORMAT = "nnbridge.metal-manifest/1"
TILE = 16  # dense tiles: TILE outputs x TILE samples per threadgroup, TILE inputs per step
FUSED_THREADS = 64  # threads per threadgroup of the fused kernel (one per sample)
FUSED_MAX_WIDTH = 1024  # widest layer the fused kernel keeps in thread memory
FUSED_RECOMMENDED_WIDTH = 128  # up to this width the manifest recommends the fused kernel
MAX_SOFTMAX_THREADS = 256
SIMD_WIDTH = 32

# MLX's table of thread attributes, in MLX's order (mlx/backend/common/metal_kernel.cpp):
# MLX declares every one whose name occurs anywhere in a kernel's body (a substring match).
MLX_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

BUFFER_INDEX = {"x": 0, "weights": 1, "y": 2}  # every kernel uses these slots


def thread_attributes(body: str) -> list[tuple[str, str]]:
    """``(name, type)`` of the thread attributes MLX declares for ``body`` (and so do we)."""
    return [(name, t) for name, t in MLX_ATTRIBUTES if name in body]


def msl_float(value: float) -> str:
    """A float32 literal for MSL: exact (``%.9g``) with the ``f`` suffix (MSL has no double)."""
    s = f32_literal(value)
    return s if s in ("NAN", "INFINITY", "-INFINITY") else s + "f"


@dataclass
class LayerCode:
    """One inference-form layer as the kernel templates need it."""

    index: int
    name: str  # comment-safe
    kind: str  # "dense" | "batch_norm"
    in_size: int
    out_size: int
    activation: str  # applied in the layer's own kernel ("none" when softmax follows separately)
    softmax: str  # "" | "tile" (inside the dense tile kernel) | "row" (separate row kernel)
    use_bias: bool
    slope: str  # leaky_relu slope literal
    eps: str  # batch norm eps literal
    prefix: str  # constant prefix, e.g. "L0_"
    sm_threads: int = 0  # row softmax: threads per row (one threadgroup)
    sm_simds: int = 0

    @property
    def full_activation(self) -> str:
        """The layer's activation as the spec says it."""
        return "softmax" if self.softmax else self.activation


@dataclass
class KernelPlan:
    """One kernel: its data, body text, signature and dispatch rule."""

    name: str
    role: str  # "fused" | "dense" | "batch_norm" | "softmax"
    layer: LayerCode | None
    summary: str
    inputs: list[str]  # parameter names of the inputs, in order
    grid: list[int | str]  # per dimension: an int, or "batch"
    threadgroup: list[int]
    threadgroup_memory_bytes: int
    output: str = "y"
    body: str = ""
    attributes: list[tuple[str, str]] = field(default_factory=list)

    def params(self, storage: str) -> list[dict[str, Any]]:
        """Buffer parameters as the ``.metal`` signature declares them."""
        out = []
        for name in [*self.inputs, self.output]:
            out.append({"name": name, "index": BUFFER_INDEX[name], "const": name != self.output,
                        "type": storage})
        return out


@dataclass
class Step:
    """One dispatch of a pipeline: kernel, buffers read, buffer written, its row width."""

    kernel: str
    inputs: list[str]  # buffer names, one per kernel input (same order)
    output: str
    width: int  # elements per sample of the output buffer


@dataclass
class MetalPlan:
    """Everything the Metal templates render, derived from the inference-form plan."""

    net: NetworkPlan
    storage: str  # "float" | "half"
    layers: list[LayerCode]
    constants: list[tuple[str, str, str, str]]  # (type, name, value, comment)
    helpers: list[str]  # helper functions needed: "sigmoid", "erf", "gelu", …
    kernels: list[KernelPlan]
    pipelines: dict[str, list[Step]]
    layer_buffers: list[str]  # per inference-form layer: the per-layer pipeline buffer with its output
    buffer_widths: dict[str, int]  # activation buffers: elements per sample
    recommended: str
    weights_identical_to_nmw: bool
    max_width: int
    header: str = ""  # shared prelude: constants and helpers (the MLX `header`)

    def kernel(self, name: str) -> KernelPlan:
        """The kernel called ``name``."""
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)


def _layer_code(lp: LayerPlan) -> LayerCode:
    act = lp.activation
    softmax = ""
    if act == "softmax":
        softmax = "tile" if lp.kind == "dense" and lp.output_size <= TILE else "row"
        act = "none"
    lc = LayerCode(lp.index, lp.name, lp.kind, lp.input_size, lp.output_size, act, softmax, lp.use_bias,
                   msl_float(lp.negative_slope), msl_float(lp.eps), f"L{lp.index}_")
    if softmax == "row":
        warps = min(MAX_SOFTMAX_THREADS // SIMD_WIDTH, -(-lp.output_size // SIMD_WIDTH))
        lc.sm_threads, lc.sm_simds = warps * SIMD_WIDTH, warps
    return lc


def _helpers_for(activations: set[str]) -> list[str]:
    need = []
    if activations & {"sigmoid", "silu"}:
        need.append("sigmoid")
    if "silu" in activations:
        need.append("silu")
    if "gelu" in activations:
        need += ["erf", "gelu"]
    if "gelu_tanh" in activations:
        need.append("gelu_tanh")
    return need


_OFFSET_NAMES = {"weight": "W", "bias": "B", "gamma": "GAMMA", "beta": "BETA", "running_mean": "MEAN",
                 "running_var": "VAR"}


def _constants(net: NetworkPlan, layers: list[LayerCode]) -> list[tuple[str, str, str, str]]:
    consts = [
        ("uint", "NNB_TILE", str(TILE), "dense tile: outputs x samples per threadgroup, inputs per step"),
        ("uint", "NNB_IN", str(net.input_size), "network inputs per sample"),
        ("uint", "NNB_OUT", str(net.output_size), "network outputs per sample"),
        ("uint", "NNB_MAXW", str(net.max_width), "widest layer (thread memory of the fused kernel)"),
    ]
    for lc, lp in zip(layers, net.layers):
        p = lc.prefix
        consts.append(("uint", f"{p}IN", str(lc.in_size), f"layer {lc.index} ({lc.name}): {lc.kind}, "
                                                            f"{lc.full_activation}"))
        consts.append(("uint", f"{p}OUT", str(lc.out_size), ""))
        for suffix, off in lp.offsets.items():
            consts.append(("uint", f"{p}{_OFFSET_NAMES[suffix]}", str(off), f"offset of {lp.name}.{suffix}"))
        if lc.kind == "batch_norm":
            consts.append(("float", f"{p}EPS", lc.eps, ""))
        if lc.softmax == "row":
            consts.append(("uint", f"{p}SM_THREADS", str(lc.sm_threads), "row softmax: threads per row"))
            consts.append(("uint", f"{p}SM_SIMDS", str(lc.sm_simds), "row softmax: SIMD groups per row"))
    return consts


def _per_layer(ident: str, layers: list[LayerCode], input_size: int
               ) -> tuple[list[KernelPlan], list[Step], list[str], dict[str, int]]:
    """Kernels and steps of the per-layer pipeline, each layer's output buffer, buffer widths."""
    kernels: list[KernelPlan] = []
    steps: list[Step] = []
    layer_buffers: list[str] = []
    widths: dict[str, int] = {"input": input_size}
    src = "input"
    for lc in layers:
        dst = "output" if lc.index == len(layers) - 1 else f"layer{lc.index}"
        main_dst = f"layer{lc.index}_pre" if lc.softmax == "row" else dst
        desc = f"layer {lc.index} ({lc.name}): {lc.kind} {lc.in_size} -> {lc.out_size}, {lc.full_activation}"
        tgmem = 0
        if lc.kind == "dense":
            tgmem = 2 * TILE * TILE * 4 + (TILE * TILE * 4 if lc.softmax == "tile" else 0)
        kernels.append(KernelPlan(f"{ident}_layer{lc.index}", lc.kind, lc, desc, ["x", "weights"],
                                  [lc.out_size, "batch", 1], [TILE, TILE, 1], tgmem))
        steps.append(Step(f"{ident}_layer{lc.index}", [src, "weights"], main_dst, lc.out_size))
        widths[main_dst] = lc.out_size
        if lc.softmax == "row":
            kernels.append(KernelPlan(f"{ident}_layer{lc.index}_softmax", "softmax", lc,
                                      f"layer {lc.index} ({lc.name}): softmax over {lc.out_size} values",
                                      ["x"], [lc.sm_threads, "batch", 1], [lc.sm_threads, 1, 1],
                                      lc.sm_simds * 4))
            steps.append(Step(f"{ident}_layer{lc.index}_softmax", [main_dst], dst, lc.out_size))
            widths[dst] = lc.out_size
        layer_buffers.append(dst)
        src = dst
    return kernels, steps, layer_buffers, widths


def metal_plan(source: NetworkSpec | NeuralNet, *, half: bool = False) -> MetalPlan:
    """Plan the Metal code of ``source`` (a spec, or a net with weights): kernels, pipelines, buffers."""
    net = plan(source)
    if not net.layers:
        raise CodegenError(f"network {net.name!r} has no layers left after the inference transform")
    layers = [_layer_code(lp) for lp in net.layers]
    helpers = _helpers_for({lc.activation for lc in layers})
    kernels, steps, layer_buffers, widths = _per_layer(net.ident, layers, net.input_size)
    pipelines = {"per_layer": steps}
    if net.max_width <= FUSED_MAX_WIDTH:
        fused = KernelPlan(f"{net.ident}_fused", "fused", None, "the whole network, one thread per sample",
                           ["x", "weights"], ["batch", 1, 1], [FUSED_THREADS, 1, 1], 0)
        kernels.insert(0, fused)
        pipelines = {"fused": [Step(fused.name, ["input", "weights"], "output", net.output_size)], **pipelines}
    recommended = "fused" if "fused" in pipelines and net.max_width <= FUSED_RECOMMENDED_WIDTH else "per_layer"
    same_tensors = [n for n, _ in net.original.tensor_shapes()] == [n for n, _ in net.inference.tensor_shapes()]
    mp = MetalPlan(net, "half" if half else "float", layers, _constants(net, layers), helpers, kernels, pipelines,
                   layer_buffers, widths, recommended, same_tensors, net.max_width)
    env = template_env()
    env.filters["msl_float"] = msl_float
    _render_bodies(mp, env)
    return mp


def _render_bodies(mp: MetalPlan, env: jinja2.Environment) -> None:
    macros = env.get_template("metal/kernels.j2").module
    mp.header = macros.prelude(mp)  # type: ignore[attr-defined]
    for k in mp.kernels:
        k.body = macros.body(k, mp)  # type: ignore[attr-defined]
        k.attributes = thread_attributes(k.body)
        if not any(a == "thread_position_in_grid" for a, _ in k.attributes):
            raise CodegenError(f"kernel {k.name} declares no thread position (MLX needs a thread attribute)")


def manifest(mp: MetalPlan, files: dict[str, str]) -> dict[str, Any]:
    """The dispatch manifest: kernels, buffers, weight offsets, and dispatch as a function of batch size."""
    net = mp.net
    tensors = []
    for lp in net.layers:
        for suffix, off in lp.offsets.items():
            shape = list(lp.tensors[suffix].shape)
            count = 1
            for d in shape:
                count *= d
            tensors.append({"name": f"{lp.name}.{suffix}", "layer": lp.index, "offset": off, "count": count,
                            "shape": shape})
    kernels = {}
    for k in mp.kernels:
        buffers = []
        for p in k.params(mp.storage):
            meaning = {"x": "activations in, [batch, in] row-major", "weights": "the weights buffer",
                       "y": "activations out, [batch, out] row-major"}[p["name"]]
            buffers.append({"index": p["index"], "name": p["name"], "access": "read" if p["const"] else "write",
                            "dtype": mp.storage, "meaning": meaning})
        kernels[k.name] = {
            "role": k.role,
            "layer": None if k.layer is None else k.layer.index,
            "summary": k.summary,
            "buffers": buffers,
            "grid": k.grid,
            "threadgroup": k.threadgroup,
            "threadgroup_memory_bytes": k.threadgroup_memory_bytes,
            "thread_attributes": [a for a, _ in k.attributes],
        }
    pipelines = {}
    for pname, steps in mp.pipelines.items():
        pipelines[pname] = [{
            "kernel": s.kernel,
            "buffers": {str(BUFFER_INDEX[param]): buf for param, buf in
                        zip([*mp.kernel(s.kernel).inputs, "y"], [*s.inputs, s.output])},
            "grid": mp.kernel(s.kernel).grid,
            "threadgroup": mp.kernel(s.kernel).threadgroup,
        } for s in steps]
    bytes_per = 2 if mp.storage == "half" else 4
    return {
        "format": MANIFEST_FORMAT,
        "network": comment(net.name),
        "ident": net.ident,
        "files": files,
        "storage": mp.storage,
        "accumulate": "float",
        "input_size": net.input_size,
        "output_size": net.output_size,
        "weights_layout": {
            "description": ("one buffer: the flat tensor data of the network's inference form (batch norm "
                            "folded into the dense layer before it where possible, dropout removed), in spec "
                            "order, row-major, dense weights [input_size, output_size] - the NMW tensor order"),
            "dtype": mp.storage,
            "count": net.total_params,
            "bytes": net.total_params * bytes_per,
            "identical_to_nmw_tensor_data": mp.weights_identical_to_nmw,
            "note": ("the concatenated data blocks of the original network's .nmw file, as they are"
                     if mp.weights_identical_to_nmw else
                     "differs from the original .nmw (batch norm was folded): use the inference form's "
                     "weights, e.g. nnbridge.codegen.common.inference_weights(net) or "
                     "net.for_inference().save_nmw(path)"),
            "tensors": tensors,
        },
        "buffers": {
            "weights": {"count": net.total_params, "dtype": mp.storage},
            **{name: {"per_sample": w, "dtype": mp.storage} for name, w in mp.buffer_widths.items()},
        },
        "layer_outputs": mp.layer_buffers,
        "recommended": mp.recommended,
        "dispatch": ("dispatchThreads(grid, threadgroup): the grid counts threads and a \"batch\" entry is the "
                     "number of samples; clip each threadgroup dimension to the grid (as MLX does); encode the "
                     "steps of a pipeline in order in one compute encoder with the default serial dispatch type, "
                     "so each step sees the previous step's writes; threadgroup memory is declared inside the "
                     "kernels (no setThreadgroupMemoryLength); skip the pipeline when batch is 0"),
        "pipelines": pipelines,
        "kernels": kernels,
    }


def render(source: NetworkSpec | NeuralNet, opts: GenerateOptions | None = None, *,
           env: jinja2.Environment | None = None) -> dict[str, str]:
    """Render ``<ident>.metal``, ``<ident>.manifest.json`` and ``<ident>_mlx.py``.

    ``env`` replaces the template environment (tests render planted bugs from a copy of
    the templates this way).
    """
    opts = opts or GenerateOptions(generate_metal=True)
    mp = metal_plan(source, half=bool(opts.metal_half))
    if env is not None:
        env.filters.setdefault("msl_float", msl_float)
        env.filters.setdefault("f32", f32_literal)
        env.filters.setdefault("comment", comment)
        _render_bodies(mp, env)
    else:
        env = template_env()
        env.filters["msl_float"] = msl_float
    ident = mp.net.ident
    files = {"metal": f"{ident}.metal", "manifest": f"{ident}.manifest.json", "mlx": f"{ident}_mlx.py"}
    metal_text = env.get_template("metal/library.metal.j2").render(
        m=mp, header=header_lines(mp.net.name, "Metal compute kernels"))
    man = manifest(mp, files)
    mlx_text = env.get_template("metal/mlx_module.py.j2").render(
        m=mp, header=header_lines(mp.net.name, "MLX body-form Metal kernels"), py=_py_literal,
        pipelines={p: [s.__dict__ for s in steps] for p, steps in mp.pipelines.items()})
    return {files["metal"]: metal_text, files["manifest"]: _json(man), files["mlx"]: mlx_text}


_SCALAR_LIST = re.compile(r"\[\s*\n[^\[\]{}]*?\]")


def _json(obj: Any) -> str:
    """Indented JSON with lists of scalars (shapes, grids) kept on one line."""
    text = json.dumps(obj, indent=2)
    return _SCALAR_LIST.sub(lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def _py_literal(text: str) -> str:
    """``text`` as a Python string literal: a readable raw triple-quoted one when that is exact."""
    if '"""' not in text and "\\" not in text and not text.endswith('"'):
        return 'r"""' + text + '"""'
    return repr(text)


def _renderer(source: NetworkSpec | NeuralNet, opts: GenerateOptions) -> dict[str, str]:
    return render(source, opts)


register_renderer("metal", _renderer)

__all__ = ["MANIFEST_FORMAT", "MetalPlan", "KernelPlan", "Step", "manifest", "metal_plan", "msl_float", "render",
           "thread_attributes"]
