"""mlx.nn ⇄ NeuralNet: build reference modules, import MLX models and weight files.

Mirror of ``nnbridge.converters.torch``: the same public names, the same supported set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec

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


__all__ = ["activation_module", "mlx_layer_outputs", "run_mlx", "to_mlx"]
