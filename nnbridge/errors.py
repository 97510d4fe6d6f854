"""The one exception hierarchy of nnbridge.

Every error the library raises on bad input is an :class:`NNBridgeError`; the
message says what was expected, what was found, and where (file, offset, layer,
JSON path), so the CLI can print it as one line.
"""

from __future__ import annotations


class NNBridgeError(Exception):
    """Base of every error nnbridge raises on purpose."""


class SpecError(NNBridgeError, ValueError):
    """A network spec is invalid or a spec file cannot be read."""


class NMWError(NNBridgeError, ValueError):
    """An NMW weights file is malformed, truncated, corrupt or disagrees with its spec."""


class WeightsError(NNBridgeError, ValueError):
    """Tensors do not fit the spec they are bound to (missing, extra, wrong shape or dtype)."""


class InputError(NNBridgeError, ValueError):
    """Inference inputs have the wrong shape, dtype or width for the network."""


class ConversionError(NNBridgeError, ValueError):
    """A model, checkpoint or weights file cannot be converted to a NeuralNet."""


class CodegenError(NNBridgeError):
    """Code generation failed (unsupported network for a target, bad options)."""


class BuildError(NNBridgeError):
    """Compiling or loading generated code failed (missing compiler, compiler error)."""


class VerificationError(NNBridgeError):
    """Generated code could not be verified (it could not run or produced no output)."""


class OutputError(NNBridgeError, OSError):
    """An output file or folder cannot be written (exists, read-only, disk full)."""
