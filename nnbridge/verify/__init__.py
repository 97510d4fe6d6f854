"""Build and run generated code, and prove it computes what the torch/MLX model computes."""

from nnbridge.verify.core import (
    BackendReport,
    LayerTrace,
    Runner,
    VerifyReport,
    available_backends,
    make_inputs,
    register_backend,
    verify,
)

__all__ = [
    "BackendReport",
    "LayerTrace",
    "Runner",
    "VerifyReport",
    "available_backends",
    "make_inputs",
    "register_backend",
    "verify",
]
