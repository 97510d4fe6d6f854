"""NeuralNet: a spec plus its weights — the canonical model every adapter converts to and from.

Reference inference, weight initialisation and module building are done by torch and
MLX through ``nnbridge.converters``; this class holds the data and the inference-time
transform (:meth:`NeuralNet.for_inference`) that every code generator uses.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import SpecError
from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec
from nnbridge.weights import Weights

BACKENDS = ("torch", "mlx")


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
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend not in self._modules:
            self._modules[backend] = self.to_torch() if backend == "torch" else self.to_mlx()
        return self._modules[backend]

    def _check_input(self, x: Any) -> tuple[np.ndarray, bool]:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"inputs must be numbers, found dtype {arr.dtype}")
        single = arr.ndim == 1
        if single:
            arr = arr[None, :]
        n_in = self._spec.in_size
        if arr.ndim != 2 or arr.shape[1] != n_in:
            raise ValueError(
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


def _identity_zeros(spec: NetworkSpec) -> Weights:
    """Zero weights, except batch-norm gamma and variance at 1 so an uninitialised net stays finite."""
    tensors = {}
    for name, shape in spec.tensor_shapes():
        fill = 1.0 if name.endswith((".gamma", ".running_var")) else 0.0
        tensors[name] = np.full(shape, fill, np.float32)
    return Weights(spec, tensors)
