"""The seed guide's example networks (and the Koan anchor network), ready-made."""

from __future__ import annotations

from nnbridge.spec import NetworkSpec, new_network


def simple_mlp() -> NetworkSpec:
    """The guide's SimpleMLP: 128 → 64 relu → 32 relu → 10 softmax (10,666 parameters)."""
    return (new_network("SimpleMLP", input_size=128)
            .add_dense("hidden1", 128, 64, "relu")
            .add_dense("hidden2", 64, 32, "relu")
            .add_dense("output", 32, 10, "softmax"))


def deep_mlp() -> NetworkSpec:
    """The guide's DeepMLP: 256 → 128 → 64 → 32 → 16 (relu) → 5 softmax (43,845 parameters)."""
    return (new_network("DeepMLP", input_size=256)
            .add_dense("h1", 256, 128, "relu")
            .add_dense("h2", 128, 64, "relu")
            .add_dense("h3", 64, 32, "relu")
            .add_dense("h4", 32, 16, "relu")
            .add_dense("out", 16, 5, "softmax"))


def binary_classifier() -> NetworkSpec:
    """The guide's BinaryClassifier: 100 → 50 relu → 2 softmax (5,152 parameters)."""
    return (new_network("BinaryClassifier", input_size=100)
            .add_dense("hidden", 100, 50, "relu")
            .add_dense("output", 50, 2, "softmax"))


def koan_classifier() -> NetworkSpec:
    """The anchor network of ``fixtures/nmw/koan.nmw``: 64 → 64 relu → 23 softmax (5,655 parameters)."""
    return (new_network("KoanClassifier", input_size=64)
            .add_dense("hidden", 64, 64, "relu")
            .add_dense("output", 64, 23, "softmax"))


PRESETS = {
    "SimpleMLP": simple_mlp,
    "DeepMLP": deep_mlp,
    "BinaryClassifier": binary_classifier,
    "KoanClassifier": koan_classifier,
}
