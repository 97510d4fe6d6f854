"""Nim CPU target: ``<ident>_cpu.nim``, a Nim module with C kernels, an NMW loader and a C ABI.

The module is generated from the *inference form* of the network (:func:`plan`): batch
norm folded, dropout removed. Its loader also reads the NMW of the original network and
folds batch norms itself, exactly as :meth:`NeuralNet.for_inference` does.

The hot path is C inside the Nim module (``{.emit.}``), written with GCC/clang vector
extensions: per dense layer, register tiles of ``rows × 16·nb`` outputs (accumulators in
vector registers, weights broadcast-multiplied), several samples per pass so each loaded
weight vector is reused, bias and activation fused into the tile. Weights are packed at
load time into panels of 16 outputs (``[panel][input][16]``) so the inner loop reads them
contiguously. This module only prepares the data; ``templates/nim/`` holds the code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np

from nnbridge.codegen import GenerateOptions, register_renderer
from nnbridge.codegen.common import NetworkPlan, f32_literal, header_lines, plan, template_env
from nnbridge.errors import CodegenError
from nnbridge.names import comment
from nnbridge.net import NeuralNet
from nnbridge.spec import Activation, LayerKind, NetworkSpec

LANES = 16  # floats per panel (one 512-bit vector)
MB = 12  # samples per block in the batch path

# Register tiles, as data, per vector width the C compiler may target (16 floats: AVX-512, 32
# registers; 8: AVX/AVX2, 16 registers; 4: SSE/NEON). "max_nb": panels of 16 outputs per pass;
# "rows": samples per pass for a given nb (the accumulators, rows × nb·16/w vectors, fit the
# register file with room for the weights). The one-row path (tail rows, batch 1) takes up to
# "row_max_nb" panels per pass, as independent chains; its "row_q" (partial sums per output) is 1:
# the same summation order as the batch path, so a sample's outputs are bit-identical whether it
# is computed alone, in a block or in any slice of a batch.
BUDGETS = [
    {"w": 16, "max_nb": 4, "rows": {4: 6, 3: 6, 2: 12, 1: 12}, "row_max_nb": 8, "row_q": dict.fromkeys(range(1, 9), 1)},
    {"w": 8, "max_nb": 1, "rows": {1: 6}, "row_max_nb": 4, "row_q": dict.fromkeys(range(1, 5), 1)},
    {"w": 4, "max_nb": 1, "rows": {1: 2}, "row_max_nb": 2, "row_q": dict.fromkeys(range(1, 3), 1)},
]

MODULE_TEMPLATE = "nim/module.nim.j2"
KERNELS_TEMPLATE = "nim/kernels.c.j2"


def module_name(source: NetworkSpec | NeuralNet) -> str:
    """The file stem of the generated module: ``<identifier(network name)>_cpu``."""
    from nnbridge.names import identifier

    spec = source.spec if isinstance(source, NeuralNet) else source
    return f"{identifier(spec.name)}_cpu"


def file_name(source: NetworkSpec | NeuralNet) -> str:
    """The generated file name, ``<ident>_cpu.nim``."""
    return module_name(source) + ".nim"


# ----------------------------------------------------------------- literals
def nim_float64(value: float) -> str:
    """A Nim float64 literal that parses back to exactly ``value`` (shortest round-trip repr)."""
    v = float(value)
    if not math.isfinite(v):
        raise CodegenError(f"cannot write the non-finite setting {v!r} into Nim code")
    s = repr(v)
    return s if ("." in s or "e" in s) else s + ".0"


def c_float(value: float) -> str:
    """A C float literal (``1.5f``) that parses back to exactly the same float32."""
    s = f32_literal(value)
    return s if s in ("NAN", "INFINITY", "-INFINITY") else s + "f"


_SAFE = re.compile(r"[A-Za-z0-9_. ]")


def nim_string(text: str) -> str:
    """A Nim string literal of ``text`` with every character outside ``[A-Za-z0-9_. ]`` escaped."""
    out = []
    for ch in str(text):
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02X}" for b in ch.encode("utf-8"))
    return '"' + "".join(out) + '"'


# ------------------------------------------------------------------- tiles
@dataclass
class Tile:
    """One register tile: ``rows`` samples × ``nb`` panels (batch path) or ``q`` partial sums (row path)."""

    nb: int
    rows: int = 1
    q: int = 1
    p0: int = 0


@dataclass
class TileConfig:
    """How one dense layer is cut into tiles for one vector width and register budget."""

    w: int  # floats per vector
    pv: int  # vectors per 16-float panel
    steps: int  # butterfly steps of a horizontal reduction (log2 w)
    cond: str  # C preprocessor condition selecting this configuration
    groups: list[Tile] = field(default_factory=list)  # batch path: one per panel group
    row_groups: list[Tile] = field(default_factory=list)  # one-row path
    tiles: list[Tile] = field(default_factory=list)  # distinct (rows, nb) of groups
    row_tiles: list[Tile] = field(default_factory=list)  # distinct (nb, q) of row_groups


def _split(panels: int, max_nb: int) -> list[tuple[int, int]]:
    """Panels cut into as-equal-as-possible groups of at most ``max_nb``: ``[(first, count)]``."""
    n_groups = -(-panels // max_nb)
    base, extra = divmod(panels, n_groups)
    out, p0 = [], 0
    for g in range(n_groups):
        nb = base + (1 if g < extra else 0)
        out.append((p0, nb))
        p0 += nb
    return out


def tile_config(panels: int, budget: dict[str, Any]) -> TileConfig:
    """The tiles of a dense layer with ``panels`` output panels under a register ``budget``."""
    w = budget["w"]
    cfg = TileConfig(w=w, pv=LANES // w, steps=w.bit_length() - 1, cond=f"NNB_W == {w}")
    for p0, nb in _split(panels, budget["max_nb"]):
        cfg.groups.append(Tile(nb=nb, rows=budget["rows"][nb], p0=p0))
    for p0, nb in _split(panels, budget["row_max_nb"]):
        cfg.row_groups.append(Tile(nb=nb, q=budget["row_q"][nb], p0=p0))
    for g in cfg.groups:
        if not any(t.nb == g.nb and t.rows == g.rows for t in cfg.tiles):
            cfg.tiles.append(Tile(nb=g.nb, rows=g.rows))
    for g in cfg.row_groups:
        if not any(t.nb == g.nb and t.q == g.q for t in cfg.row_tiles):
            cfg.row_tiles.append(Tile(nb=g.nb, q=g.q))
    for budget_rows in {g.rows for g in cfg.groups}:
        if MB % budget_rows:
            raise AssertionError(f"tile rows {budget_rows} do not divide the block of {MB}")
    return cfg


# -------------------------------------------------------------------- plan
@dataclass
class KernelLayer:
    """One inference-form layer as the kernel template sees it."""

    index: int
    name: str  # comment-safe
    kind: str
    K: int
    N: int
    NP: int
    NPAD: int
    act: str
    slope: str  # C float literal
    ldx: int
    off_w: int = 0
    off_b: int = 0
    off_s: int = 0
    off_t: int = 0
    configs: list[TileConfig] = field(default_factory=list)


@dataclass
class KernelNet:
    """Network-wide sizes for the templates."""

    name: str
    ident: str
    module: str
    n_in: int
    n_out: int
    n_layers: int
    mb: int
    sw: int
    nin_pad: int
    first_copy: bool
    scratch_floats: int
    packed_floats: int
    max_file_bytes: int


def _pad(n: int) -> int:
    return -(-n // LANES) * LANES


def kernel_layers(p: NetworkPlan) -> tuple[list[KernelLayer], int]:
    """Kernel view of every plan layer and the packed-weights length (floats, 16-aligned offsets)."""
    out: list[KernelLayer] = []
    offset = 0
    first_copy = bool(p.layers) and p.layers[0].kind == LayerKind.BATCH_NORM.value
    for lp in p.layers:
        npan = -(-lp.output_size // LANES)
        if lp.index == 0:
            ldx = _pad(p.input_size) if first_copy else p.input_size
        else:
            ldx = out[-1].NPAD
        kl = KernelLayer(lp.index, lp.name, lp.kind, lp.input_size, lp.output_size, npan, npan * LANES,
                         lp.activation, c_float(lp.negative_slope), ldx)
        if lp.kind == LayerKind.DENSE.value:
            kl.off_w, offset = offset, offset + npan * lp.input_size * LANES
            kl.off_b, offset = offset, offset + npan * LANES
            kl.configs = [tile_config(npan, b) for b in BUDGETS]
        elif lp.kind == LayerKind.BATCH_NORM.value:
            kl.off_s, offset = offset, offset + npan * LANES
            kl.off_t, offset = offset, offset + npan * LANES
        else:  # pragma: no cover - plan() holds only dense and batch_norm
            raise CodegenError(f"layer {lp.index}: the Nim target cannot compute {lp.kind!r} layers")
        out.append(kl)
    return out, offset


def _layer_rows(spec: NetworkSpec) -> list[dict[str, Any]]:
    return [{"name": layer.name, "kind": layer.kind.value, "in_size": layer.input_size,
             "out_size": layer.output_size, "act": layer.activation.value, "use_bias": layer.use_bias,
             "eps": nim_float64(layer.eps), "slope": nim_float64(layer.negative_slope)} for layer in spec.layers]


def _steps(spec: NetworkSpec, klayers: list[KernelLayer]) -> list[dict[str, Any]]:
    """How ``spec``'s tensors become the inference-form weights, mirroring ``NeuralNet.for_inference``."""
    index = {name: i for i, (name, _) in enumerate(spec.tensor_shapes())}
    steps: list[dict[str, Any]] = []
    inf: list[dict[str, Any]] = []  # inference layers so far: kind, activation
    for layer in spec.layers:
        if layer.kind is LayerKind.DROPOUT:
            continue
        prev = inf[-1] if inf else None
        n = layer.name
        if (layer.kind is LayerKind.BATCH_NORM and prev is not None and prev["kind"] is LayerKind.DENSE
                and prev["act"] is Activation.NONE):
            steps.append({"op": "fold", "layer": prev["j"], "comment": comment(n), "K": prev["K"], "N": prev["N"],
                          "g": index[f"{n}.gamma"], "beta": index[f"{n}.beta"], "mean": index[f"{n}.running_mean"],
                          "var": index[f"{n}.running_var"], "eps": nim_float64(layer.eps)})
            prev["act"] = layer.activation
            continue
        j = len(inf)
        inf.append({"j": j, "kind": layer.kind, "act": layer.activation, "K": layer.input_size,
                    "N": layer.output_size})
        if layer.kind is LayerKind.DENSE:
            steps.append({"op": "dense", "layer": j, "comment": comment(n), "K": layer.input_size,
                          "N": layer.output_size, "w": index[f"{n}.weight"],
                          "b": index.get(f"{n}.bias")})
        else:
            kl = klayers[j]
            steps.append({"op": "norm", "layer": j, "comment": comment(n), "N": layer.output_size,
                          "off_s": kl.off_s, "off_t": kl.off_t, "g": index[f"{n}.gamma"],
                          "beta": index[f"{n}.beta"], "mean": index[f"{n}.running_mean"],
                          "var": index[f"{n}.running_var"], "eps": nim_float64(layer.eps)})
    if len(inf) != len(klayers):
        raise AssertionError("inference form disagrees with the plan")
    for d, kl in zip(inf, klayers):
        if d["kind"] is LayerKind.DENSE:
            steps.append({"op": "pack_dense", "layer": d["j"], "K": kl.K, "N": kl.N, "off_w": kl.off_w,
                          "off_b": kl.off_b})
        if d["act"].value != kl.act:
            raise AssertionError("inference form disagrees with the plan")
    return steps


def _form(spec: NetworkSpec, title: str, klayers: list[KernelLayer]) -> dict[str, Any]:
    return {"title": title, "layers": _layer_rows(spec),
            "tensors": [{"name": name, "dims": list(shape)} for name, shape in spec.tensor_shapes()],
            "steps": _steps(spec, klayers)}


def _embedded(net: NeuralNet) -> tuple[list[dict[str, Any]], str]:
    """Inference-form tensors as C arrays (emitted) and Nim ``importc`` variables."""
    inf = net.for_inference()
    rows, lines = [], []
    for i, (name, shape) in enumerate(inf.spec.tensor_shapes()):
        values = np.asarray(inf.weights[name], np.float32).reshape(-1)
        n = int(np.prod(shape))
        var, cname = f"embedded{i}", f"nnb_embedded{i}"
        body = ",\n".join(", ".join(c_float(v) for v in values[k:k + 8]) for k in range(0, n, 8))
        lines.append(f"# {comment(name)} {list(shape)}")
        lines.append('{.emit: """')
        lines.append(f"static float {cname}[{n}] = {{\n{body}\n}};")
        lines.append('""".}')
        lines.append(f'var {var} {{.importc: "{cname}", nodecl.}}: array[{n}, float32]')
        rows.append({"var": var, "n": n})
    return rows, "\n".join(lines)


def module_data(source: NetworkSpec | NeuralNet, opts: GenerateOptions | None = None) -> dict[str, Any]:
    """Everything the Nim templates need, computed from the plan of ``source``."""
    embed = bool(opts and opts.embed_weights)
    if embed and not isinstance(source, NeuralNet):
        raise CodegenError("embed_weights needs weights: call net.generate(opts) on a NeuralNet, not spec.generate")
    p = plan(source)
    klayers, packed = kernel_layers(p)
    first_copy = klayers[0].kind == LayerKind.BATCH_NORM.value
    nin_pad = _pad(p.input_size)
    sw = max(kl.NPAD for kl in klayers)
    forms = [_form(p.original, "original network", klayers)]
    if p.inference.to_dict() != p.original.to_dict():
        forms.append(_form(p.inference, "inference form", klayers))
    tensor_bytes = max(4 * sum(int(np.prod(s)) for _, s in spec.tensor_shapes())
                       for spec in (p.original, p.inference))
    net = KernelNet(
        name=comment(p.name), ident=p.ident, module=f"{p.ident}_cpu", n_in=p.input_size, n_out=p.output_size,
        n_layers=len(klayers), mb=MB, sw=sw, nin_pad=nin_pad, first_copy=first_copy,
        scratch_floats=2 * MB * sw + (MB * nin_pad if first_copy else 0), packed_floats=packed,
        max_file_bytes=tensor_bytes + 64 * 1024 * 1024 + 64 * len(p.original.layers))
    data: dict[str, Any] = {"net": net, "layers": klayers, "forms": forms, "embedded": [], "embedded_arrays": "",
                            "header": header_lines(p.name, "Nim CPU inference module")}
    if embed:
        assert isinstance(source, NeuralNet)
        data["embedded"], data["embedded_arrays"] = _embedded(source)
    return data


def nim_env(env: jinja2.Environment | None = None) -> jinja2.Environment:
    """The template environment of this target: the shared one (or ``env``, e.g. over a copy of
    the templates) with the Nim filters added."""
    env = env or template_env()
    env.filters["nimstr"] = nim_string
    env.filters.setdefault("f32", f32_literal)
    env.filters.setdefault("comment", comment)
    return env


def render_kernels(source: NetworkSpec | NeuralNet, opts: GenerateOptions | None = None, *,
                   env: jinja2.Environment | None = None) -> str:
    """The C kernels alone (what the module emits), e.g. to compile them with ``-Wall -Wextra``."""
    data = module_data(source, opts)
    return nim_env(env).get_template(KERNELS_TEMPLATE).render(**data)


def render_module(source: NetworkSpec | NeuralNet, opts: GenerateOptions | None = None, *,
                  env: jinja2.Environment | None = None) -> str:
    """The text of ``<ident>_cpu.nim`` for ``source`` (``env``: another template environment)."""
    data = module_data(source, opts)
    env = nim_env(env)
    data["kernels"] = env.get_template(KERNELS_TEMPLATE).render(**data)
    if '"""' in data["kernels"]:  # pragma: no cover - the template never writes one
        raise CodegenError("kernel code would end the Nim emit string")
    return env.get_template(MODULE_TEMPLATE).render(**data)


def render(source: NetworkSpec | NeuralNet, opts: GenerateOptions) -> dict[str, str]:
    """Renderer of the ``nim`` target: ``{"<ident>_cpu.nim": text}``."""
    return {file_name(source): render_module(source, opts)}


register_renderer("nim", render)

__all__ = ["file_name", "module_data", "module_name", "nim_env", "render", "render_kernels", "render_module"]
