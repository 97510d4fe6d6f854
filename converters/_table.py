"""The one table of what the bridges support, per framework, and the initialiser gains.

Each :class:`Row` names one *family* of layer or activation and every spelling of it that
the converters accept: torch modules, torch functions/methods (in ``torch.fx`` graphs),
ATen ops (in ``torch.export`` programs) and MLX modules/functions. The converters build
their dispatch dictionaries from these rows (``converters/torch.py``, ``converters/mlx.py``),
the refusal messages list them (:func:`supported_text`), and ``docs/bridges.md`` shows
them (:func:`supported_markdown`) — so what is accepted, what is said and what is
documented cannot drift apart. This module imports neither torch nor MLX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nnbridge.spec import DEFAULT_NEGATIVE_SLOPE, Activation

# Families whose op is a layer of the spec; every other family is an activation or a no-op.
LAYER_FAMILIES = ("dense", "batch_norm", "dropout")
NOOP_FAMILIES = ("identity", "flatten")


@dataclass(frozen=True)
class Row:
    """One supported family and its spellings per framework.

    ``torch_modules`` are ``torch.nn`` class names (exact type, not subclasses);
    ``torch_functions`` are ``F.<name>`` (``torch.nn.functional``), ``torch.<name>`` or
    ``Tensor.<name>`` (a method call); ``torch_aten`` are ``aten.<op>.<overload>``;
    ``mlx`` are ``nn.<Name>`` classes, ``nn.<name>`` functions (``mlx.nn``) or
    ``mx.<name>`` (``mlx.core``) functions. ``maps_to`` is what it becomes in the spec.
    """

    family: str
    maps_to: str
    torch_modules: tuple[str, ...]
    torch_functions: tuple[str, ...]
    torch_aten: tuple[str, ...]
    mlx: tuple[str, ...]
    note: str = ""


TABLE: tuple[Row, ...] = (
    Row("dense", "dense layer", ("Linear",), ("F.linear",),
        ("aten.linear.default", "aten.addmm.default", "aten.mm.default"), ("nn.Linear",),
        "with or without bias; addmm/mm only with a transposed parameter (aten.t / aten.permute [1, 0])"),
    Row("batch_norm", "batch_norm layer", ("BatchNorm1d",), (),
        ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"), ("nn.BatchNorm",),
        "running statistics (eval mode), eps carried; affine optional; track_running_stats required"),
    Row("dropout", "dropout layer", ("Dropout",), ("F.dropout",), ("aten.dropout.default",), ("nn.Dropout",),
        "kept in the spec with its rate; identity at inference"),
    Row("relu", "relu", ("ReLU",), ("F.relu", "torch.relu", "Tensor.relu"), ("aten.relu.default", "aten.relu_.default"),
        ("nn.ReLU", "nn.relu")),
    Row("leaky_relu", "leaky_relu (slope carried)", ("LeakyReLU",), ("F.leaky_relu",),
        ("aten.leaky_relu.default", "aten.leaky_relu_.default"), ("nn.LeakyReLU", "nn.leaky_relu")),
    Row("sigmoid", "sigmoid", ("Sigmoid",), ("torch.sigmoid", "F.sigmoid", "Tensor.sigmoid"), ("aten.sigmoid.default",),
        ("nn.Sigmoid", "nn.sigmoid", "mx.sigmoid")),
    Row("tanh", "tanh", ("Tanh",), ("torch.tanh", "F.tanh", "Tensor.tanh"), ("aten.tanh.default",),
        ("nn.Tanh", "nn.tanh", "mx.tanh")),
    Row("gelu", "gelu / gelu_tanh", ("GELU",), ("F.gelu",), ("aten.gelu.default",),
        ("nn.GELU", "nn.gelu", "nn.gelu_approx"),
        "exact (erf) → gelu; tanh approximation (torch approximate='tanh', MLX approx='precise'/'tanh', "
        "nn.gelu_approx) → gelu_tanh; MLX approx='fast' is refused"),
    Row("silu", "silu", ("SiLU",), ("F.silu",), ("aten.silu.default",), ("nn.SiLU", "nn.silu")),
    Row("softmax", "softmax", ("Softmax",), ("F.softmax", "torch.softmax", "Tensor.softmax"),
        ("aten.softmax.int", "aten._softmax.default"), ("nn.Softmax", "nn.softmax"),
        "over the feature axis only (dim -1 or 1, axis -1); no dtype change"),
    Row("identity", "nothing (no-op)", ("Identity",), ("Tensor.contiguous",),
        ("aten.clone.default", "aten.alias.default"), ("nn.Identity",)),
    Row("flatten", "nothing (flatten to [batch, features])", ("Flatten",),
        ("torch.flatten", "Tensor.flatten", "Tensor.view", "Tensor.reshape", "torch.reshape"),
        ("aten.flatten.using_ints", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"),
        (),
        "start_dim=1 only; view/reshape to (x.size(0), -1), (x.shape[0], -1) or (-1, features); "
        "fine before the first layer (the spec then takes the flattened features)"),
)

FAMILIES = {row.family: row for row in TABLE}

_FRAMEWORK_COLUMNS = {
    "torch": ("torch_modules", "torch_functions"),
    "torch.export": ("torch_aten",),
    "mlx": ("mlx",),
}


def rows_for(column: str) -> list[tuple[str, Row]]:
    """Every ``(spelling, row)`` of one column (``torch_modules``, ``torch_functions``, ``torch_aten``, ``mlx``)."""
    return [(name, row) for row in TABLE for name in getattr(row, column)]


def supported_text(framework: str) -> str:
    """One-line list of what ``framework`` (``torch``, ``torch.export``, ``mlx``) accepts, for error messages."""
    parts = []
    for column in _FRAMEWORK_COLUMNS[framework]:
        names = [n if column != "torch_modules" else f"nn.{n}" for n, _ in rows_for(column)]
        parts.append(", ".join(names))
    return "supported: " + "; ".join(parts) + " (see docs/bridges.md)"


def supported_markdown() -> str:
    """The supported-layers table of ``docs/bridges.md`` (a test checks the page holds exactly this)."""

    def cell(names: tuple[str, ...], prefix: str = "") -> str:
        return "<br>".join(f"`{prefix}{n}`" for n in names) or "—"

    lines = [
        "| spec | torch module | torch function / method (fx) | torch.export (ATen) | MLX | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in TABLE:
        lines.append(
            f"| {row.maps_to} | {cell(row.torch_modules, 'nn.')} | {cell(row.torch_functions)} | "
            f"{cell(row.torch_aten)} | {cell(row.mlx)} | {row.note or ''} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------- initialisation
# torch.nn.init's nonlinearity names, per activation, for the gain of Kaiming/Xavier.
# gelu and silu have no gain in torch: we use relu's (they are rectifier-like).
NONLINEARITY: dict[Activation, str] = {
    Activation.NONE: "linear",
    Activation.SOFTMAX: "linear",
    Activation.SIGMOID: "sigmoid",
    Activation.TANH: "tanh",
    Activation.RELU: "relu",
    Activation.GELU: "relu",
    Activation.GELU_TANH: "relu",
    Activation.SILU: "relu",
    Activation.LEAKY_RELU: "leaky_relu",
}


def init_gain(activation: Activation, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> float:
    """The gain ``torch.nn.init.calculate_gain`` gives for ``activation`` (via :data:`NONLINEARITY`)."""
    nl = NONLINEARITY[activation]
    if nl == "tanh":
        return 5.0 / 3.0
    if nl == "relu":
        return math.sqrt(2.0)
    if nl == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + negative_slope**2))
    return 1.0


__all__ = ["FAMILIES", "NONLINEARITY", "Row", "TABLE", "init_gain", "rows_for", "supported_markdown",
           "supported_text"]
