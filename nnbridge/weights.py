"""Weights: the named float32 tensors of a network, in NMW layout, bound to its spec.

Dense weights are ``[input_size, output_size]`` (element ``(j, o)`` multiplies input ``j``
into output ``o``) — transposed relative to ``torch.nn.Linear`` and ``mlx.nn.Linear``.
Converters translate at the edge; everything in the middle uses this layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import WeightsError
from nnbridge.spec import NetworkSpec


class Weights(Mapping[str, np.ndarray]):
    """Every tensor of ``spec`` by name, in spec order, as C-contiguous float32 arrays.

    Construct with :meth:`from_dict`, :meth:`zeros` or :meth:`from_flat`; the tensors are
    checked against the spec (names and shapes) and copied into read-only arrays, so a
    module or compiled library built from them can never go stale.
    ``metadata`` carries provenance (e.g. from an NMW trailer).
    """

    def __init__(self, spec: NetworkSpec, tensors: Mapping[str, Any], *, metadata: dict[str, Any] | None = None,
                 source: str = "weights") -> None:
        spec.check()
        self.spec = spec
        self.metadata: dict[str, Any] = dict(metadata or {})
        expected = spec.tensor_shapes()
        names = {n for n, _ in expected}
        extra = [k for k in tensors if k not in names]
        if extra:
            raise WeightsError(
                f"{source}: tensor {extra[0]!r} is not part of network {spec.name!r}; expected tensors: "
                f"{', '.join(names) or '(none)'}"
            )
        self._tensors: dict[str, np.ndarray] = {}
        for name, shape in expected:
            if name not in tensors:
                raise WeightsError(f"{source}: missing tensor {name!r} (shape {list(shape)}) for network {spec.name!r}")
            arr = np.asarray(tensors[name])
            if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
                raise WeightsError(f"{source}: tensor {name!r} has dtype {arr.dtype}; expected a float array")
            if tuple(arr.shape) != tuple(shape):
                raise WeightsError(
                    f"{source}: tensor {name!r} has shape {list(arr.shape)}; expected {list(shape)} (NMW layout, "
                    f"dense weights are [input_size, output_size])"
                )
            t = np.array(arr, dtype=np.float32, order="C", copy=True)
            t.flags.writeable = False  # weights are values: change them by making new Weights
            self._tensors[name] = t

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, spec: NetworkSpec, tensors: Mapping[str, Any], **kw: Any) -> Weights:
        """Bind ``tensors`` (name → array in NMW layout) to ``spec``, checking names and shapes."""
        return cls(spec, tensors, **kw)

    @classmethod
    def zeros(cls, spec: NetworkSpec) -> Weights:
        """All-zero tensors for ``spec`` (batch-norm variances too: initialise before use)."""
        spec.check()
        return cls(spec, {n: np.zeros(s, np.float32) for n, s in spec.tensor_shapes()})

    @classmethod
    def from_flat(cls, spec: NetworkSpec, flat: Any) -> Weights:
        """Split one flat float32 vector (the Nim library's flat layout, spec order) into tensors."""
        spec.check()
        vec = np.asarray(flat, dtype=np.float32).reshape(-1)
        total = spec.total_params()
        if vec.size != total:
            raise WeightsError(f"flat weights have {vec.size} values; network {spec.name!r} needs {total}")
        out, pos = {}, 0
        for name, shape in spec.tensor_shapes():
            n = int(np.prod(shape))
            out[name] = vec[pos:pos + n].reshape(shape)
            pos += n
        return cls(spec, out)

    # ---------------------------------------------------------------- access
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r}; tensors: {list(self._tensors)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Weights):
            return NotImplemented
        return self.spec == other.spec and all(np.array_equal(self[k], other[k]) for k in self)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Weights({self.spec.name!r}, {len(self)} tensors, {self.spec.total_params()} values)"

    def layer(self, name: str) -> dict[str, np.ndarray]:
        """The tensors of layer ``name`` by suffix (``weight``, ``bias``, ``gamma`` …)."""
        layer = self.spec.layer(name)
        return {t.split(".", 1)[1]: self[t] for t, _ in layer.tensor_shapes()}

    def to_flat(self) -> np.ndarray:
        """All values as one float32 vector in spec order (the Nim library's flat layout)."""
        if not self._tensors:
            return np.zeros(0, np.float32)
        return np.concatenate([t.reshape(-1) for t in self._tensors.values()])

    def copy(self) -> Weights:
        """A deep copy."""
        return Weights(self.spec, {k: v.copy() for k, v in self.items()}, metadata=self.metadata)

    def nonfinite(self) -> list[str]:
        """Names of tensors holding NaN or infinity (worth a warning before use)."""
        return [k for k, v in self.items() if not np.all(np.isfinite(v))]

    # -------------------------------------------------------------------- I/O
    def save_nmw(self, path: str | PathLike[str], *, trailer: bool = True,
                 metadata: dict[str, Any] | None = None) -> Path:
        """Write NMW v1 to ``path`` atomically; ``trailer`` adds our integrity trailer."""
        from nnbridge.nmw import save_nmw

        return save_nmw(self, path, trailer=trailer, metadata=metadata)
