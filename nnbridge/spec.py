"""Network specs: the seed guide's ``new_network(...).add_dense(...)`` API in Python.

A :class:`NetworkSpec` is an ordered list of :class:`LayerSpec` — dense, batch-norm and
dropout layers with their activations. It validates, counts parameters, prints a summary
and reads/writes the Nim library's spec JSON (``NMW.md``), so a spec file is readable by
nim-metal-compute and every spec it writes is readable here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from os import PathLike
from pathlib import Path
from typing import Any

from nnbridge.errors import SpecError
from nnbridge.names import MAX_NAME_LEN, is_valid_name

SPEC_FORMAT = "nnbridge.spec/1"
DEFAULT_EPS = 1e-5
DEFAULT_NEGATIVE_SLOPE = 0.01
MAX_SPEC_BYTES = 16 * 1024 * 1024


class Activation(str, Enum):
    """Activation applied after a layer. Values are the names used in spec JSON."""

    NONE = "none"
    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    SOFTMAX = "softmax"
    GELU = "gelu"  # exact, with erf
    GELU_TANH = "gelu_tanh"  # tanh approximation
    SILU = "silu"

    @classmethod
    def parse(cls, value: Activation | str) -> Activation:
        """The activation named ``value`` (an ``Activation`` or its lower-case name)."""
        if isinstance(value, Activation):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise SpecError(
            f"unknown activation {value!r}; supported: {', '.join(a.value for a in cls)}"
        )

    def __str__(self) -> str:
        return self.value


class LayerKind(str, Enum):
    """Kind of layer. Values are the names used in spec JSON."""

    DENSE = "dense"
    BATCH_NORM = "batch_norm"
    DROPOUT = "dropout"

    @classmethod
    def parse(cls, value: LayerKind | str) -> LayerKind:
        """The layer kind named ``value``."""
        if isinstance(value, LayerKind):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise SpecError(f"unknown layer kind {value!r}; supported: {', '.join(k.value for k in cls)}")

    def __str__(self) -> str:
        return self.value


# Activations the Nim library knows; any other reads there as "none".
NIM_ACTIVATIONS = frozenset(
    {Activation.NONE, Activation.RELU, Activation.LEAKY_RELU, Activation.SIGMOID, Activation.TANH, Activation.SOFTMAX}
)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class LayerSpec:
    """One layer: its name, kind, sizes, activation and kind-specific settings."""

    name: str
    kind: LayerKind
    input_size: int
    output_size: int
    activation: Activation = Activation.NONE
    use_bias: bool = False
    dropout_rate: float = 0.0
    eps: float = DEFAULT_EPS
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(tensor name, shape)`` of this layer's tensors, in NMW order and layout."""
        n, i, o = self.name, self.input_size, self.output_size
        if self.kind is LayerKind.DENSE:
            out = [(f"{n}.weight", (i, o))]
            if self.use_bias:
                out.append((f"{n}.bias", (o,)))
            return out
        if self.kind is LayerKind.BATCH_NORM:
            return [(f"{n}.{t}", (o,)) for t in ("gamma", "beta", "running_mean", "running_var")]
        return []

    def param_count(self) -> int:
        """Number of stored values (weights, biases, batch-norm statistics)."""
        total = 0
        for _, shape in self.tensor_shapes():
            total += math.prod(shape) if all(_is_int(d) for d in shape) else 0
        return total

    def to_dict(self) -> dict[str, Any]:
        """The Nim library's layer object (its keys first, in its order), plus our extras."""
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind.value,
            "input_size": self.input_size,
            "output_size": self.output_size,
            "activation": self.activation.value,
            "use_bias": self.use_bias,
        }
        if self.kind is LayerKind.DROPOUT:
            d["dropout_rate"] = self.dropout_rate
        if self.kind is LayerKind.BATCH_NORM and self.eps != DEFAULT_EPS:
            d["eps"] = self.eps
        if self.activation is Activation.LEAKY_RELU and self.negative_slope != DEFAULT_NEGATIVE_SLOPE:
            d["negative_slope"] = self.negative_slope
        return d


@dataclass
class NetworkSpec:
    """A named network: input size and an ordered list of layers. Build it with ``add_*``."""

    name: str
    input_size: int | None = None
    layers: list[LayerSpec] = field(default_factory=list)

    # ----------------------------------------------------------------- builders
    def add_dense(
        self,
        name: str,
        input_size: int,
        output_size: int,
        activation: Activation | str = Activation.NONE,
        *,
        use_bias: bool = True,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> NetworkSpec:
        """Append a fully connected layer ``y = act(x @ W + b)``; returns the spec for chaining."""
        self.layers.append(
            LayerSpec(name, LayerKind.DENSE, input_size, output_size, Activation.parse(activation),
                      use_bias=use_bias, negative_slope=negative_slope)
        )
        return self

    def add_batch_norm(
        self,
        name: str,
        size: int,
        *,
        eps: float = DEFAULT_EPS,
        activation: Activation | str = Activation.NONE,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> NetworkSpec:
        """Append batch normalisation (inference statistics) over ``size`` features."""
        self.layers.append(
            LayerSpec(name, LayerKind.BATCH_NORM, size, size, Activation.parse(activation),
                      eps=eps, negative_slope=negative_slope)
        )
        return self

    def add_dropout(self, name: str, size: int, rate: float) -> NetworkSpec:
        """Append dropout with the given rate (kept in the spec; identity at inference)."""
        self.layers.append(LayerSpec(name, LayerKind.DROPOUT, size, size, dropout_rate=rate))
        return self

    # --------------------------------------------------------------- properties
    @property
    def output_size(self) -> int:
        """Number of outputs (the last layer's output size)."""
        if not self.layers:
            raise SpecError(f"network {self.name!r} has no layers, so no output size")
        return self.layers[-1].output_size

    @property
    def in_size(self) -> int:
        """Number of inputs: ``input_size``, or the first layer's input size when unset."""
        if self.input_size is not None:
            return self.input_size
        if not self.layers:
            raise SpecError(f"network {self.name!r} has no layers and no input_size")
        return self.layers[0].input_size

    def layer(self, name: str) -> LayerSpec:
        """The layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise SpecError(f"network {self.name!r} has no layer {name!r}; layers: {[x.name for x in self.layers]}")

    def is_nim_portable(self) -> bool:
        """True when the Nim library reads this spec as meant (it knows every activation used)."""
        return all(
            layer.activation in NIM_ACTIVATIONS
            and not (layer.activation is Activation.LEAKY_RELU and layer.negative_slope != DEFAULT_NEGATIVE_SLOPE)
            and not (layer.kind is not LayerKind.DENSE and layer.activation is not Activation.NONE)
            and not (layer.kind is LayerKind.BATCH_NORM and layer.eps != DEFAULT_EPS)
            for layer in self.layers
        )

    # --------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every problem of the spec, each naming the layer (index and name), expected and found."""
        out: list[str] = []
        if not isinstance(self.name, str) or not self.name or len(self.name) > 256:
            out.append(f"network name must be a non-empty string of at most 256 characters, found {self.name!r}")
        if self.input_size is not None and (not _is_int(self.input_size) or self.input_size <= 0):
            out.append(f"network input_size must be a positive integer, found {self.input_size!r}")
        if not self.layers:
            out.append(f"network {self.name!r} has no layers; add one with add_dense()")
            return out
        seen: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            where = f"layer {i} ({layer.name!r})"
            if not isinstance(layer.name, str) or not layer.name:
                out.append(f"layer {i}: name is empty; expected a name matching [A-Za-z_][A-Za-z0-9_]*")
            elif not is_valid_name(layer.name):
                out.append(
                    f"{where}: invalid name; expected [A-Za-z_][A-Za-z0-9_]* of at most {MAX_NAME_LEN} characters"
                )
            elif layer.name in seen:
                out.append(f"{where}: duplicate name, already used by layer {seen[layer.name]}")
            else:
                seen[layer.name] = i
            sizes_ok = True
            for attr in ("input_size", "output_size"):
                v = getattr(layer, attr)
                if not _is_int(v) or v <= 0:
                    out.append(f"{where}: {attr} must be a positive integer, found {v!r}")
                    sizes_ok = False
            if not isinstance(layer.kind, LayerKind):
                out.append(f"{where}: kind must be a LayerKind, found {layer.kind!r}")
                continue
            if not isinstance(layer.activation, Activation):
                out.append(f"{where}: activation must be an Activation, found {layer.activation!r}")
            if layer.kind is not LayerKind.DENSE and sizes_ok and layer.input_size != layer.output_size:
                out.append(
                    f"{where}: {layer.kind.value} must keep the size, found input_size {layer.input_size} "
                    f"!= output_size {layer.output_size}"
                )
            if layer.kind is LayerKind.DROPOUT:
                r = layer.dropout_rate
                if not _is_number(r) or not (0.0 <= r < 1.0):
                    out.append(f"{where}: dropout_rate must be in [0, 1), found {r!r}")
                if layer.activation is not Activation.NONE:
                    out.append(f"{where}: dropout takes no activation, found {layer.activation.value!r}; "
                               f"put it on the layer before")
            if layer.kind is LayerKind.BATCH_NORM:
                e = layer.eps
                if not _is_number(e) or not (0.0 < e < 1.0) or not math.isfinite(e):
                    out.append(f"{where}: eps must be in (0, 1), found {e!r}")
            if layer.kind is not LayerKind.DENSE and layer.use_bias:
                out.append(f"{where}: use_bias is only for dense layers, found true on {layer.kind.value}")
            if layer.activation is Activation.LEAKY_RELU:
                s = layer.negative_slope
                if not _is_number(s) or not math.isfinite(s):
                    out.append(f"{where}: negative_slope must be a finite number, found {s!r}")
            if not isinstance(layer.use_bias, bool):
                out.append(f"{where}: use_bias must be true or false, found {layer.use_bias!r}")
        first = self.layers[0]
        if self.input_size is not None and _is_int(first.input_size) and first.input_size != self.input_size:
            out.append(
                f"layer 0 ({first.name!r}): input_size {first.input_size} does not match the network "
                f"input_size {self.input_size}"
            )
        for i in range(1, len(self.layers)):
            a, b = self.layers[i - 1], self.layers[i]
            if _is_int(a.output_size) and _is_int(b.input_size) and a.output_size != b.input_size:
                out.append(
                    f"layer {i} ({b.name!r}): input_size {b.input_size} does not match layer {i - 1} "
                    f"({a.name!r}) output_size {a.output_size}"
                )
        return out

    def validate(self) -> bool:
        """True when the spec has no problems (see :meth:`problems`). Never raises."""
        try:
            return not self.problems()
        except Exception:  # noqa: BLE001 - the guide's validate() is a predicate
            return False

    def check(self) -> NetworkSpec:
        """Raise :class:`SpecError` listing every problem; return the spec when there is none."""
        problems = self.problems()
        if problems:
            raise SpecError(f"network {self.name!r} is invalid:\n  - " + "\n  - ".join(problems))
        return self

    def total_params(self) -> int:
        """Total stored values of all layers (the guide's ``totalParams``)."""
        return sum(layer.param_count() for layer in self.layers)

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the network in NMW order: ``(name, shape)``."""
        return [t for layer in self.layers for t in layer.tensor_shapes()]

    def summary(self) -> str:
        """A text table: layer, kind, in -> out, activation, params; then the total."""
        rows = [("#", "layer", "kind", "in -> out", "activation", "params")]
        for i, layer in enumerate(self.layers):
            act = layer.activation.value if isinstance(layer.activation, Activation) else str(layer.activation)
            if layer.activation is Activation.LEAKY_RELU:
                act += f"({layer.negative_slope:g})"
            kind = layer.kind.value if isinstance(layer.kind, LayerKind) else str(layer.kind)
            if layer.kind is LayerKind.DROPOUT:
                kind += f"({layer.dropout_rate:g})"
            elif layer.kind is LayerKind.DENSE and not layer.use_bias:
                kind += "(no bias)"
            rows.append((str(i), str(layer.name), kind, f"{layer.input_size} -> {layer.output_size}", act,
                         f"{layer.param_count():,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [f"Network {self.name} (input {self.input_size if self.input_size is not None else '?'})"]
        for j, r in enumerate(rows):
            lines.append("  ".join(v.rjust(w) if c in (0, 5) else v.ljust(w) for c, (v, w) in
                                   enumerate(zip(r, widths))).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"Total parameters: {self.total_params():,}")
        return "\n".join(lines)

    # --------------------------------------------------------------------- JSON
    def to_dict(self, *, marker: bool = True) -> dict[str, Any]:
        """The spec as the Nim library's JSON object; ``marker`` adds our ``format`` key last."""
        d: dict[str, Any] = {
            "name": self.name,
            "input_shape": [] if self.input_size is None else [self.input_size],
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if marker:
            d["format"] = SPEC_FORMAT
        return d

    def to_json(self, *, indent: int | None = None, marker: bool = True) -> str:
        """Compact JSON exactly as the Nim library writes it (``indent`` pretty-prints)."""
        sep = (",", ":") if indent is None else (",", ": ")
        return json.dumps(self.to_dict(marker=marker), indent=indent, separators=sep, ensure_ascii=False,
                          allow_nan=False)

    def save(self, path: str | PathLike[str], *, indent: int | None = 2) -> Path:
        """Write the spec JSON to ``path`` atomically."""
        from nnbridge.fsutil import atomic_write_text

        self.check()
        return atomic_write_text(path, self.to_json(indent=indent) + "\n")

    def generate(self, opts: Any = None) -> list[Path]:
        """Generate code for this spec (weights loaded at run time); see ``nnbridge.codegen``."""
        from nnbridge.codegen import generate

        return generate(self, opts)


def new_network(name: str, input_size: int | None = None) -> NetworkSpec:
    """Start a network spec (the guide's ``newNetwork``)."""
    return NetworkSpec(name=name, input_size=input_size)


# ------------------------------------------------------------------ JSON reader
def _expect(cond: bool, path: str, what: str, found: object) -> None:
    if not cond:
        text = repr(found)
        if len(text) > 60:
            text = text[:57] + "..."
        raise SpecError(f"{path}: expected {what}, found {text}")


def _get(obj: dict[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise SpecError(f"{path}: missing key {key!r}")
    return obj[key]


def spec_from_dict(d: object, where: str = "spec") -> NetworkSpec:
    """Build a spec from the parsed JSON object; strict: every error names its JSON path."""
    _expect(isinstance(d, dict), where, "a JSON object", d)
    assert isinstance(d, dict)
    name = _get(d, "name", where)
    _expect(isinstance(name, str), f"{where}.name", "a string", name)
    shape = _get(d, "input_shape", where)
    _expect(isinstance(shape, list) and len(shape) <= 1, f"{where}.input_shape", "[] or [input_size]", shape)
    input_size = None
    if shape:
        input_size = shape[0]
        _expect(_is_int(input_size) and input_size > 0, f"{where}.input_shape[0]", "a positive integer",
                input_size)
    layers_raw = _get(d, "layers", where)
    _expect(isinstance(layers_raw, list), f"{where}.layers", "a list", layers_raw)
    spec = NetworkSpec(name=name, input_size=input_size)
    for i, lr in enumerate(layers_raw):
        p = f"layers[{i}]"
        _expect(isinstance(lr, dict), p, "a JSON object", lr)
        lname = _get(lr, "name", p)
        _expect(isinstance(lname, str), f"{p}.name", "a string", lname)
        kind_raw = _get(lr, "kind", p)
        _expect(isinstance(kind_raw, str) and kind_raw in {k.value for k in LayerKind}, f"{p}.kind",
                "one of " + ", ".join(k.value for k in LayerKind), kind_raw)
        kind = LayerKind(kind_raw)
        sizes = []
        for key in ("input_size", "output_size"):
            v = _get(lr, key, p)
            _expect(_is_int(v) and v > 0, f"{p}.{key}", "a positive integer", v)
            sizes.append(v)
        act_raw = _get(lr, "activation", p)
        _expect(isinstance(act_raw, str) and act_raw in {a.value for a in Activation}, f"{p}.activation",
                "one of " + ", ".join(a.value for a in Activation), act_raw)
        use_bias = _get(lr, "use_bias", p)
        _expect(isinstance(use_bias, bool), f"{p}.use_bias", "true or false", use_bias)
        layer = LayerSpec(lname, kind, sizes[0], sizes[1], Activation(act_raw), use_bias=use_bias)
        if kind is LayerKind.DROPOUT:
            rate = _get(lr, "dropout_rate", p)
            _expect(_is_number(rate) and 0.0 <= rate < 1.0, f"{p}.dropout_rate", "a number in [0, 1)", rate)
            layer.dropout_rate = float(rate)
        if "eps" in lr:
            eps = lr["eps"]
            _expect(_is_number(eps) and 0.0 < eps < 1.0, f"{p}.eps", "a number in (0, 1)", eps)
            layer.eps = float(eps)
        if "negative_slope" in lr:
            s = lr["negative_slope"]
            _expect(_is_number(s) and math.isfinite(s), f"{p}.negative_slope", "a finite number", s)
            layer.negative_slope = float(s)
        spec.layers.append(layer)
    if "format" in d:
        _expect(d["format"] == SPEC_FORMAT, f"{where}.format", repr(SPEC_FORMAT), d["format"])
    return spec


def from_json(text: str | bytes) -> NetworkSpec:
    """Parse spec JSON (the Nim library's, or ours); raise :class:`SpecError` naming the JSON path."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"spec JSON is not UTF-8 (byte {e.start})") from None
    if not isinstance(text, str):
        raise SpecError(f"spec JSON must be text, found {type(text).__name__}")
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec JSON is {len(text)} characters; at most {MAX_SPEC_BYTES} are accepted")
    try:
        data = json.loads(text, parse_constant=lambda c: _reject_constant(c))
    except json.JSONDecodeError as e:
        raise SpecError(f"spec is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise SpecError("spec JSON is nested too deeply") from None
    return spec_from_dict(data)


def _reject_constant(name: str) -> None:
    raise SpecError(f"spec JSON contains {name}, which is not valid JSON")


def save_spec(spec: NetworkSpec, path: str | PathLike[str]) -> Path:
    """Write ``spec`` as JSON to ``path`` (atomically)."""
    return spec.save(path)


def load_spec(path: str | PathLike[str]) -> NetworkSpec:
    """Read a spec JSON file; errors name the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{p}: {size} bytes; a spec file is at most {MAX_SPEC_BYTES} bytes")
        data = p.read_bytes()
    except OSError as e:
        raise SpecError(f"{p}: cannot read spec file: {e.strerror or e}") from None
    try:
        return from_json(data)
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None

