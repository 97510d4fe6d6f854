"""Code generation: the guide's ``defaultOptions()`` / ``spec.generate(opts)``.

One renderer per target (``nim`` → ``<name>_cpu.nim``, ``metal`` → ``<name>.metal`` with
its manifest and MLX body form), registered here; each returns ``{file name: text}`` and
:func:`generate` writes them atomically into ``opts.output_dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from nnbridge.errors import CodegenError
from nnbridge.fsutil import atomic_write_text
from nnbridge.net import NeuralNet
from nnbridge.spec import NetworkSpec


@dataclass
class GenerateOptions:
    """What to generate and where (the guide's ``defaultOptions()`` plus our settings)."""

    output_dir: str | PathLike[str] = "generated"
    generate_metal: bool = False
    generate_nim_cpu: bool = True
    embed_weights: bool = False  # Nim: weights as constants (needs a NeuralNet, not a bare spec)
    metal_half: bool = False  # Metal: half storage, float accumulation

    def targets(self) -> list[str]:
        """Target names selected by these options, in generation order."""
        out = []
        if self.generate_nim_cpu:
            out.append("nim")
        if self.generate_metal:
            out.append("metal")
        return out


def default_options() -> GenerateOptions:
    """Options as the guide's ``defaultOptions()``: Nim CPU code into ``generated/``."""
    return GenerateOptions()


Renderer = Callable[[NetworkSpec | NeuralNet, GenerateOptions], dict[str, str]]
_RENDERERS: dict[str, Renderer] = {}


def register_renderer(target: str, renderer: Renderer) -> None:
    """Register the renderer of ``target``; a second, different one is refused."""
    if target in _RENDERERS and _RENDERERS[target] is not renderer:
        raise ValueError(f"renderer for target {target!r} already registered")
    _RENDERERS[target] = renderer


def renderers() -> dict[str, Renderer]:
    """Every registered renderer by target (importing the built-in ones first)."""
    import importlib

    for mod in ("nnbridge.codegen.nim", "nnbridge.codegen.metal"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return dict(_RENDERERS)


def render_files(source: NetworkSpec | NeuralNet, opts: GenerateOptions | None = None) -> dict[str, str]:
    """Render every selected target to ``{file name: text}`` without writing anything."""
    opts = opts or default_options()
    spec = source.spec if isinstance(source, NeuralNet) else source
    spec.check()
    if opts.embed_weights and not isinstance(source, NeuralNet):
        raise CodegenError("embed_weights needs weights: call net.generate(opts) on a NeuralNet, not spec.generate")
    available = renderers()
    files: dict[str, str] = {}
    targets = opts.targets()
    if not targets:
        raise CodegenError("no target selected: set opts.generate_nim_cpu and/or opts.generate_metal")
    for target in targets:
        if target not in available:
            raise CodegenError(f"no renderer for target {target!r}; available: {', '.join(sorted(available))}")
        for fname, text in available[target](source, opts).items():
            if "/" in fname or "\\" in fname or fname.startswith("."):
                raise CodegenError(f"renderer {target!r} produced an unsafe file name {fname!r}")
            files[fname] = text
    return files


def generate(source: NetworkSpec | NeuralNet, opts: GenerateOptions | None = None) -> list[Path]:
    """Render the selected targets and write them atomically into ``opts.output_dir``; return the paths."""
    opts = opts or default_options()
    files = render_files(source, opts)
    out = Path(opts.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CodegenError(f"{out}: cannot create the output folder: {e.strerror or e}") from None
    return [atomic_write_text(out / fname, text) for fname, text in files.items()]


__all__ = ["GenerateOptions", "default_options", "generate", "register_renderer", "render_files", "renderers"]

