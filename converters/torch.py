"""torch.nn ⇄ NeuralNet: build reference modules, import trained models and checkpoints.

``to_torch`` builds an ``nn.Sequential`` whose parameter names are the spec's layer names
(``hidden1.weight``), so ``state_dict`` files written from it convert back by name.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec

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
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(t["weight"].T)))
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


__all__ = ["activation_module", "run_torch", "to_torch", "torch_layer_outputs"]
