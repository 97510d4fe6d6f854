"""nnbridge: move trained PyTorch/MLX networks to NMW weights, Metal kernels and Nim code — verified.

The canonical model is a :class:`NetworkSpec` (layers) plus :class:`Weights` (float32
tensors in NMW layout); every format and framework is an adapter at the edge.
"""

from nnbridge._version import __version__
from nnbridge.codegen import GenerateOptions, default_options
from nnbridge.converters.sources import from_mlx, from_torch, load_source
from nnbridge.engine import ParallelInferenceEngine
from nnbridge.errors import (
    BuildError,
    CodegenError,
    ConversionError,
    InputError,
    NMWError,
    NNBridgeError,
    OutputError,
    SpecError,
    VerificationError,
    WeightsError,
)
from nnbridge.net import InferenceResult, NeuralNet
from nnbridge.nmw import NMWPortabilityWarning, load_nmw, read_nmw, save_nmw
from nnbridge.presets import binary_classifier, deep_mlp, koan_classifier, simple_mlp
from nnbridge.spec import Activation, LayerKind, LayerSpec, NetworkSpec, from_json, load_spec, new_network, save_spec
from nnbridge.verify import VerifyReport, verify
from nnbridge.weights import Weights

__all__ = [
    "GenerateOptions",
    "InferenceResult",
    "InputError",
    "ParallelInferenceEngine",
    "VerifyReport",
    "default_options",
    "verify",
    "__version__",
    "Activation",
    "BuildError",
    "CodegenError",
    "ConversionError",
    "LayerKind",
    "LayerSpec",
    "NMWError",
    "NMWPortabilityWarning",
    "NNBridgeError",
    "NetworkSpec",
    "NeuralNet",
    "OutputError",
    "SpecError",
    "VerificationError",
    "Weights",
    "WeightsError",
    "binary_classifier",
    "deep_mlp",
    "from_json",
    "from_mlx",
    "from_torch",
    "koan_classifier",
    "load_nmw",
    "load_source",
    "load_spec",
    "new_network",
    "read_nmw",
    "save_nmw",
    "save_spec",
    "simple_mlp",
]
