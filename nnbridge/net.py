"""NeuralNet: a spec plus its weights — the canonical model every adapter converts to and from.

Reference inference, weight initialisation and module building are done by torch and
MLX through ``nnbridge.converters``; this class holds the data and the inference-time
transform (:meth:`NeuralNet.for_inference`) that every code generator uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import InputError, SpecError
from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec
from nnbridge.weights import Weights

BACKENDS = ("torch", "mlx")
INIT_METHODS = ("kaiming", "xavier")
INIT_DISTRIBUTIONS = ("uniform", "normal")


@dataclass(frozen=True)
class InferenceResult:
    """What :meth:`NeuralNet.infer_batch` returns (the Nim library's unified API).

    ``categories`` int64 ``[n]``, ``confidences`` float32 ``[n]`` (the probability of the
    chosen category), ``probabilities`` float32 ``[n, classes]`` (classes = outputs, or 2
    for a one-output binary classifier; see :func:`probabilities_of`), ``elapsed`` seconds.
    """

    categories: np.ndarray
    confidences: np.ndarray
    probabilities: np.ndarray
    elapsed: float
    outputs: np.ndarray | None = None  # raw network outputs [n, out], when the caller kept them

    def __len__(self) -> int:
        return int(self.categories.shape[0])

    @property
    def throughput(self) -> float:
        """Samples per second over ``elapsed`` (0 for an empty batch)."""
        return len(self) / self.elapsed if self.elapsed > 0 else 0.0

    @classmethod
    def from_outputs(cls, outputs: np.ndarray, last_activation: Activation, elapsed: float,
                     keep_outputs: bool = False) -> InferenceResult:
        """Probabilities (:func:`probabilities_of`), argmax categories and their confidences."""
        probs = probabilities_of(outputs, last_activation)
        cats = probs.argmax(axis=1).astype(np.int64) if len(probs) else np.zeros(0, np.int64)
        conf = probs[np.arange(cats.shape[0]), cats]
        return cls(cats, conf, probs, elapsed, outputs if keep_outputs else None)


class NeuralNet:
    """A network spec bound to weights. Weights are zero until initialised or loaded."""

    def __init__(self, spec: NetworkSpec, weights: Weights | None = None) -> None:
        spec.check()
        if weights is None:
            weights = _identity_zeros(spec)
        elif weights.spec != spec:
            raise SpecError(f"weights belong to network {weights.spec.name!r}, which differs from spec {spec.name!r}")
        self._spec = spec
        self._weights = weights
        self._modules: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    @property
    def spec(self) -> NetworkSpec:
        """The network's spec."""
        return self._spec

    @property
    def weights(self) -> Weights:
        """The network's weights (read-only tensors in NMW layout)."""
        return self._weights

    @weights.setter
    def weights(self, value: Weights) -> None:
        if value.spec != self._spec:
            raise SpecError(f"weights belong to network {value.spec.name!r}, not to {self._spec.name!r}")
        self._weights = value
        self._modules.clear()

    @property
    def name(self) -> str:
        """The network's name."""
        return self._spec.name

    def __repr__(self) -> str:
        return f"NeuralNet({self._spec.name!r}, {len(self._spec.layers)} layers, {self._spec.total_params()} params)"

    @classmethod
    def load(cls, path: str | PathLike[str]) -> NeuralNet:
        """Load a network from an NMW file (spec and weights)."""
        from nnbridge.nmw import load_nmw

        w = load_nmw(path)
        return cls(w.spec, w)

    def save_nmw(self, path: str | PathLike[str], **kw: Any) -> Path:
        """Write the weights as NMW (see :func:`nnbridge.nmw.save_nmw`)."""
        return self._weights.save_nmw(path, **kw)

    def save_safetensors(self, path: str | PathLike[str]) -> Path:
        """Write torch-layout tensors (``to_torch().load_state_dict`` accepts them) with the spec in the metadata."""
        from nnbridge.converters.safetensors import save_safetensors

        return save_safetensors(self, path)

    # ---------------------------------------------------------- initialisation
    def init_weights(self, method: str = "kaiming", seed: int = 0, distribution: str = "uniform",
                     backend: str = "torch") -> NeuralNet:
        """Initialise every weight with the framework's own initialiser; returns ``self``.

        Dense weights ``W`` (framework layout ``[out, in]``, stored transposed), with
        ``gain`` = ``torch.nn.init.calculate_gain`` of the layer's activation (that of a
        batch norm right after it when the layer has none): relu √2, leaky_relu
        √(2/(1+slope²)), tanh 5/3, sigmoid/softmax/none 1; gelu and silu use relu's √2.

        - ``kaiming``: std = gain/√fan_in; uniform on ±gain·√(3/fan_in) or normal(0, std).
          torch: ``kaiming_uniform_``/``kaiming_normal_`` (mode fan_in); MLX:
          ``he_uniform``/``he_normal`` (fan_in).
        - ``xavier``: std = gain·√(2/(fan_in+fan_out)); uniform on ±gain·√(6/(fan_in+fan_out))
          or normal(0, std). torch: ``xavier_uniform_``/``xavier_normal_``; MLX:
          ``glorot_uniform``/``glorot_normal``.

        Biases are zero; batch norm gamma 1, beta 0, running mean 0, running variance 1.
        The torch backend draws from a ``torch.Generator`` seeded with ``seed``; the MLX
        backend seeds MLX's generator (``mx.random.seed(seed)``, i.e. ``mx.random.key(seed)``)
        and restores its previous state afterwards. Same arguments → same weights, in any
        process; the two backends give different (equally distributed) values.
        """
        if method not in INIT_METHODS:
            raise SpecError(f"unknown init method {method!r}; choose one of {', '.join(INIT_METHODS)}")
        if distribution not in INIT_DISTRIBUTIONS:
            raise SpecError(f"unknown distribution {distribution!r}; choose one of {', '.join(INIT_DISTRIBUTIONS)}")
        if backend not in BACKENDS:
            raise SpecError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise SpecError(f"seed must be an integer in [0, 2**63), found {seed!r}")
        from nnbridge.converters._table import NONLINEARITY, init_gain

        gains: dict[str, tuple[str, float, float]] = {}  # layer -> (torch nonlinearity, slope, gain)
        layers = self._spec.layers
        for i, layer in enumerate(layers):
            if layer.kind is LayerKind.DENSE:
                act, slope = layer.activation, layer.negative_slope
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                if act is Activation.NONE and nxt is not None and nxt.kind is LayerKind.BATCH_NORM:
                    act, slope = nxt.activation, nxt.negative_slope
                gains[layer.name] = (NONLINEARITY[act], slope, init_gain(act, slope))
        if backend == "torch":
            from nnbridge.converters.torch import init_dense_weights
        else:
            from nnbridge.converters.mlx import init_dense_weights
        dense = init_dense_weights(self._spec, gains, method, distribution, int(seed))
        tensors: dict[str, np.ndarray] = {}
        for layer in layers:
            n = layer.output_size
            if layer.kind is LayerKind.DENSE:
                tensors[f"{layer.name}.weight"] = np.ascontiguousarray(dense[layer.name].T)
                if layer.use_bias:
                    tensors[f"{layer.name}.bias"] = np.zeros(n, np.float32)
            elif layer.kind is LayerKind.BATCH_NORM:
                tensors.update({f"{layer.name}.gamma": np.ones(n, np.float32),
                                f"{layer.name}.beta": np.zeros(n, np.float32),
                                f"{layer.name}.running_mean": np.zeros(n, np.float32),
                                f"{layer.name}.running_var": np.ones(n, np.float32)})
        meta = {"init": {"method": method, "seed": int(seed), "distribution": distribution, "backend": backend}}
        self.weights = Weights(self._spec, tensors, metadata=meta)
        return self

    # ------------------------------------------------------------- transforms
    def for_inference(self) -> NeuralNet:
        """An equivalent network for inference: dropout removed, batch norm folded.

        A batch norm right after a dense layer without activation is folded into it
        (``W' = W·s``, ``b' = (b − mean)·s + beta`` with ``s = gamma/√(var+eps)``, in float64);
        the dense layer takes the batch norm's activation. Other batch norms stay.
        """
        layers: list[LayerSpec] = []
        tensors: dict[str, np.ndarray] = {}
        for layer in self._spec.layers:
            if layer.kind is LayerKind.DROPOUT:
                continue
            prev = layers[-1] if layers else None
            if (layer.kind is LayerKind.BATCH_NORM and prev is not None and prev.kind is LayerKind.DENSE
                    and prev.activation is Activation.NONE):
                bn = self._weights.layer(layer.name)
                s = bn["gamma"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + layer.eps)
                w = tensors[f"{prev.name}.weight"].astype(np.float64)
                b = tensors.get(f"{prev.name}.bias", np.zeros(prev.output_size)).astype(np.float64)
                tensors[f"{prev.name}.weight"] = (w * s[None, :]).astype(np.float32)
                tensors[f"{prev.name}.bias"] = ((b - bn["running_mean"]) * s + bn["beta"]).astype(np.float32)
                layers[-1] = LayerSpec(prev.name, LayerKind.DENSE, prev.input_size, prev.output_size,
                                       layer.activation, use_bias=True, negative_slope=layer.negative_slope)
                continue
            layers.append(LayerSpec(**{f: getattr(layer, f) for f in LayerSpec.__dataclass_fields__}))
            tensors.update({t: self._weights[t] for t, _ in layer.tensor_shapes()})
        spec = NetworkSpec(self._spec.name, self._spec.input_size, layers)
        return NeuralNet(spec, Weights(spec, tensors, metadata=self._weights.metadata))

    # -------------------------------------------------------- framework modules
    def to_torch(self) -> Any:
        """A ``torch.nn.Sequential`` in eval mode holding these weights (names as the spec's layers)."""
        from nnbridge.converters.torch import to_torch

        return to_torch(self)

    def to_mlx(self) -> Any:
        """An ``mlx.nn.Sequential`` in eval mode holding these weights."""
        from nnbridge.converters.mlx import to_mlx

        return to_mlx(self)

    def _module(self, backend: str) -> Any:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend not in self._modules:
            self._modules[backend] = self.to_torch() if backend == "torch" else self.to_mlx()
        return self._modules[backend]

    def _check_input(self, x: Any) -> tuple[np.ndarray, bool]:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise InputError(f"inputs must be numbers, found dtype {arr.dtype}")
        single = arr.ndim == 1
        if single:
            arr = arr[None, :]
        n_in = self._spec.in_size
        if arr.ndim != 2 or arr.shape[1] != n_in:
            raise InputError(
                f"network {self._spec.name!r} takes {n_in} features per sample: expected shape [{n_in}] or "
                f"[batch, {n_in}], found {list(np.shape(x))}"
            )
        return np.ascontiguousarray(arr, dtype=np.float32), single

    def predict(self, x: Any, backend: str = "torch") -> np.ndarray:
        """Reference outputs for ``x`` (``[in]`` or ``[batch, in]``), float32, computed by torch or MLX."""
        arr, single = self._check_input(x)
        module = self._module(backend)
        if backend == "torch":
            from nnbridge.converters.torch import run_torch

            y = run_torch(module, arr)
        else:
            from nnbridge.converters.mlx import run_mlx

            y = run_mlx(module, arr)
        return y[0] if single else y

    def infer(self, x: Any, backend: str = "torch") -> tuple[int, float]:
        """``(category, confidence)`` for one sample ``[in]`` (see :meth:`infer_batch`)."""
        arr = np.asarray(x)
        if arr.ndim != 1:
            raise InputError(f"infer takes one sample of shape [{self._spec.in_size}], found {list(arr.shape)}; "
                             f"use infer_batch for batches")
        r = self.infer_batch(arr[None, :], backend=backend)
        return int(r.categories[0]), float(r.confidences[0])

    def infer_batch(self, x: Any, backend: str = "torch") -> InferenceResult:
        """Categories, confidences and probabilities for a batch ``[n, in]``; an empty batch gives empty results.

        Probabilities follow :func:`probabilities_of`; category = argmax of the
        probabilities, confidence = that probability. ``elapsed`` is the inference time.
        """
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise InputError(f"infer_batch takes a batch of shape [n, {self._spec.in_size}], found "
                             f"{list(arr.shape)}; use infer for one sample")
        last = self._spec.layers[-1].activation
        if arr.shape[0] == 0:
            self._check_input(np.zeros((1, arr.shape[1]), np.float32))  # still a clear error for bad widths
            return InferenceResult.from_outputs(np.zeros((0, self._spec.output_size), np.float32), last, 0.0)
        start = time.perf_counter()
        y = self.predict(arr, backend=backend)
        return InferenceResult.from_outputs(y, last, time.perf_counter() - start)

    def layer_outputs(self, x: Any, backend: str = "mlx") -> list[np.ndarray]:
        """Every layer's output (after its activation) for ``x`` — the reference for per-layer traces."""
        arr, _ = self._check_input(x)
        module = self._module(backend)
        if backend == "torch":
            from nnbridge.converters.torch import torch_layer_outputs

            return torch_layer_outputs(self._spec, module, arr)
        from nnbridge.converters.mlx import mlx_layer_outputs

        return mlx_layer_outputs(self._spec, module, arr)

    def generate(self, opts: Any = None) -> list[Path]:
        """Generate code with these weights embedded (``opts.embed_weights``); see ``nnbridge.codegen``."""
        from nnbridge.codegen import generate

        return generate(self, opts)


def probabilities_of(outputs: np.ndarray, last_activation: Activation) -> np.ndarray:
    """Class probabilities (float32) from network outputs ``[n, out]`` — the one rule every ``infer_batch`` uses.

    - more than one output: the outputs themselves when the last activation is softmax
      (or sigmoid: independent per-output probabilities), else the softmax of the outputs
      (they are logits);
    - one output: a binary classifier with p = the output after a sigmoid (or softmax),
      else sigmoid of the logit; probabilities are ``[1 − p, p]`` (shape ``[n, 2]``), so
      category 1 means p > 0.5.
    """
    y = np.asarray(outputs, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"outputs must be [n, outputs], found shape {list(y.shape)}")
    if y.shape[1] == 1:
        p = y[:, 0] if last_activation in (Activation.SIGMOID, Activation.SOFTMAX) else 1.0 / (1.0 + np.exp(-y[:, 0]))
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    if last_activation in (Activation.SOFTMAX, Activation.SIGMOID):
        return y.astype(np.float32)
    if y.shape[0] == 0:
        return y.astype(np.float32)
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _identity_zeros(spec: NetworkSpec) -> Weights:
    """Zero weights, except batch-norm gamma and variance at 1 so an uninitialised net stays finite."""
    tensors = {}
    for name, shape in spec.tensor_shapes():
        fill = 1.0 if name.endswith((".gamma", ".running_var")) else 0.0
        tensors[name] = np.full(shape, fill, np.float32)
    return Weights(spec, tensors)
