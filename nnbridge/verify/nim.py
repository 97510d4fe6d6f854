"""Build the generated Nim module as a shared library, load it with ctypes, run it from Python.

:class:`NimBuild` compiles ``<ident>_cpu.nim`` with ``nim c --app:lib`` (``-d:release``,
``-O3``, ``-march=native`` unless ``portable``) into a cache keyed by the hash of source,
flags and compiler versions, so a second build is instant; builds are atomic (temp folder,
rename), safe to run concurrently, and a corrupted entry is rebuilt. :class:`NimLibrary` is
one loaded copy of the library with its own weights; inputs and outputs cross as float32
buffers. The backend ``"nim"`` of :func:`nnbridge.verify.verify` is registered here.

Batch-1 calls go through a small CPython extension (``templates/nim/pyfast.c``, built once
and cached like the library) that calls the exported ``<ident>_infer_batch`` by address:
a ctypes call alone costs more than the whole network. Without a C compiler or Python
headers it falls back to ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nnbridge.errors import BuildError, NMWError, NNBridgeError
from nnbridge.net import NeuralNet
from nnbridge.spec import NetworkSpec
from nnbridge.verify.core import register_backend
from nnbridge.weights import Weights

NIM_MISSING = "nim not found: install it with `apt-get install nim` (Debian/Ubuntu) or `brew install nim` (macOS)"
BUILD_SCHEME = "nnbridge-nim-build/1"  # bump when the flags or the cache layout change meaning
BUILD_TIMEOUT_S = 900
_EXPORT_RE = re.compile(r'exportc:\s*"([A-Za-z][A-Za-z0-9_]*)_infer_batch"')
_LIB_SUFFIX = ".dylib" if sys.platform == "darwin" else ".dll" if os.name == "nt" else ".so"


# ------------------------------------------------------------------ tools
def find_nim(nim: str | PathLike[str] | None = None) -> str:
    """Path of the ``nim`` compiler (``nim`` argument, ``$NIM``, or ``nim`` on PATH) or a BuildError."""
    name = str(nim or os.environ.get("NIM") or "nim")
    found = shutil.which(name)
    if found is None:
        raise BuildError(NIM_MISSING)
    return found


@functools.lru_cache(maxsize=16)
def _tool_version(exe: str, mtime: float) -> str:
    del mtime  # part of the cache key only: a reinstalled compiler is asked again
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{exe}: unknown version ({e})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else f"{exe}: unknown version"


def tool_version(exe: str) -> str:
    """First line of ``exe --version`` (cached per executable and modification time)."""
    try:
        mtime = os.stat(exe).st_mtime
    except OSError:
        mtime = 0.0
    return _tool_version(exe, mtime)


def c_compiler() -> str | None:
    """The C compiler Nim and our extension use: ``$CC``, else ``gcc``, else ``cc`` (None if none)."""
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name:
            found = shutil.which(name.split()[0])
            if found:
                return found
    return None


def compiler_versions(nim: str) -> str:
    """What the cache key records about the tool chain: Nim's and the C compiler's versions."""
    cc = c_compiler()
    return f"{tool_version(nim)} | {tool_version(cc) if cc else 'no C compiler found'} | {platform.machine()}"


def default_cache_dir() -> Path:
    """``$NNBRIDGE_CACHE_DIR/nim``, else ``$XDG_CACHE_HOME/nnbridge/nim``, else ``~/.cache/nnbridge/nim``."""
    if os.environ.get("NNBRIDGE_CACHE_DIR"):
        return Path(os.environ["NNBRIDGE_CACHE_DIR"]) / "nim"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnbridge" / "nim"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_error(log: str) -> str:
    """The first compiler error line of a build log (Nim's ``Error:`` or the C compiler's ``error:``)."""
    for line in log.splitlines():
        if re.search(r"\bError:|\berror:|\bfatal error\b", line):
            return line.strip()
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ------------------------------------------------------------------- build
class NimBuild:
    """Compile a generated Nim module to a cached shared library.

    ``source`` is a ``.nim`` file, or a :class:`NetworkSpec`/:class:`NeuralNet` whose module is
    rendered here (``embed_weights`` compiles a net's weights in). ``portable`` leaves out
    ``-march=native`` (a generic build for the architecture). ``flags`` adds Nim options.
    """

    def __init__(self, source: str | PathLike[str] | NetworkSpec | NeuralNet, *,
                 cache_dir: str | PathLike[str] | None = None, portable: bool = False,
                 nim: str | PathLike[str] | None = None, flags: Sequence[str] = (),
                 embed_weights: bool = False) -> None:
        from nnbridge.codegen import GenerateOptions
        from nnbridge.codegen.nim import module_name, render_module

        if isinstance(source, (NetworkSpec, NeuralNet)):
            opts = GenerateOptions(embed_weights=embed_weights)
            self.source_text = render_module(source, opts)
            self.module = module_name(source)
            self.source_path: Path | None = None
        else:
            path = Path(source)
            try:
                self.source_text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise BuildError(f"{path}: cannot read the Nim module: {e}") from None
            self.module = path.stem
            self.source_path = path
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.module) or "__" in self.module:
            raise BuildError(f"{self.module!r} is not a valid Nim module name; generated modules are <name>_cpu.nim")
        m = _EXPORT_RE.search(self.source_text)
        if m is None:
            raise BuildError(f"{self.source_path or self.module}: no exported <name>_infer_batch; is this a module "
                             "generated by nnbridge?")
        self.ident = m.group(1)
        self.portable = portable
        self.extra_flags = list(flags)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._nim_arg = nim

    # ---------------------------------------------------------------- flags
    def flags(self) -> list[str]:
        """The Nim options of this build (without paths)."""
        out = ["c", "--app:lib", "-d:release", "--opt:speed", "--mm:arc", "--hints:off", "--warnings:on",
               "--passC:-O3", "--passC:-Wno-psabi"]
        if not self.portable:
            out.append("--passC:-march=native")
        return out + self.extra_flags

    @functools.cached_property
    def nim(self) -> str:
        """Path of the Nim compiler used."""
        return find_nim(self._nim_arg)

    @functools.cached_property
    def key(self) -> str:
        """Cache key: hash of the source, the flags and the compiler versions."""
        h = hashlib.sha256()
        for part in (BUILD_SCHEME, self.source_text, json.dumps(self.flags()), compiler_versions(self.nim)):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()[:32]

    @property
    def entry_dir(self) -> Path:
        """Where the cached build lives."""
        return self.cache_dir / f"{self.module}-{self.key}"

    @property
    def library_path(self) -> Path:
        """The shared library (inside :attr:`entry_dir`)."""
        return self.entry_dir / f"lib{self.module}{_LIB_SUFFIX}"

    def cached(self) -> bool:
        """True when a valid build is in the cache (library present and its hash matches)."""
        return _valid_entry(self.entry_dir, self.library_path)

    # ---------------------------------------------------------------- build
    def build(self) -> Path:
        """Compile (or take from the cache) and return the path of the shared library."""
        if self.cached():
            return self.library_path
        nim = self.nim
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.module}-", suffix=".building", dir=self.cache_dir))
        except OSError as e:
            raise BuildError(f"{self.cache_dir}: cannot create the build cache: {e.strerror or e}; set "
                             "NNBRIDGE_CACHE_DIR (or XDG_CACHE_HOME) to a writable folder") from None
        try:
            src = tmp / f"{self.module}.nim"
            src.write_text(self.source_text, encoding="utf-8")
            lib = tmp / self.library_path.name
            cmd = [nim, *self.flags(), f"--nimcache:{tmp / 'nimcache'}", f"-o:{lib}", str(src)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=BUILD_TIMEOUT_S,
                                      check=False)
                log = f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
                ok = proc.returncode == 0 and lib.is_file()
            except subprocess.TimeoutExpired:
                log, ok = f"$ {' '.join(cmd)}\ntimed out after {BUILD_TIMEOUT_S} s", False
            except OSError as e:
                raise BuildError(f"cannot run {nim}: {e.strerror or e}") from None
            (tmp / "build.log").write_text(log, encoding="utf-8")
            if not ok:
                log_path = self._keep_failed_log(log)
                raise BuildError(f"compiling {self.module}.nim failed: {_first_error(log)} (full log: {log_path})")
            shutil.rmtree(tmp / "nimcache", ignore_errors=True)
            meta = {"module": self.module, "ident": self.ident, "flags": self.flags(),
                    "compiler": compiler_versions(nim), "sha256": _sha256_file(lib), "scheme": BUILD_SCHEME}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _install(tmp, self.entry_dir, self.library_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not self.cached():  # pragma: no cover - only if the cache folder is being deleted under us
            raise BuildError(f"{self.entry_dir}: the build vanished from the cache")
        return self.library_path

    def _keep_failed_log(self, log: str) -> Path:
        from nnbridge.fsutil import atomic_write_text

        folder = self.cache_dir / "failed"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.module}-{self.key}.log"
        atomic_write_text(path, log)
        return path

    def load(self, weights: str | PathLike[str] | Weights | NeuralNet | None = None, *,
             spec: NetworkSpec | None = None) -> NimLibrary:
        """Build, then load a private copy of the library (own weights); load ``weights`` if given."""
        lib = NimLibrary(self.build(), self.ident, spec=spec, portable=self.portable, cache_dir=self.cache_dir)
        if weights is not None:
            lib.load_weights(weights)
        return lib


def _valid_entry(entry: Path, lib: Path) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        return bool(lib.is_file() and meta.get("sha256") == _sha256_file(lib))
    except (OSError, ValueError):
        return False


def _install(tmp: Path, entry: Path, lib: Path) -> None:
    """Move a finished build into place atomically; a concurrent valid build wins, a corrupt one is replaced."""
    staged = tmp.parent / f".{entry.name}.{os.getpid()}.{threading.get_ident()}.staged"
    os.replace(tmp, staged)  # tmp is re-created empty by nobody; the caller's rmtree then finds nothing
    try:
        for _ in range(3):
            try:
                os.rename(staged, entry)
                return
            except OSError:
                if _valid_entry(entry, lib):
                    return  # someone else installed the same build first
                trash = entry.parent / f".{entry.name}.{os.getpid()}.{threading.get_ident()}.corrupt"
                with contextlib.suppress(OSError):
                    os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
        raise BuildError(f"{entry}: cannot install the build into the cache")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# ----------------------------------------------------------- fast binding
_FAST: dict[str, Any] = {}
_FAST_LOCK = threading.Lock()


def _fast_module(cache_dir: Path) -> tuple[Any, str | None]:
    """The compiled ``_nnb_nimfast`` extension (built once, cached), or ``(None, why not)``."""
    with _FAST_LOCK:
        if "module" in _FAST or "error" in _FAST:
            return _FAST.get("module"), _FAST.get("error")
        try:
            _FAST["module"] = _build_fast(cache_dir)
        except Exception as e:  # noqa: BLE001 - the fast path is optional: ctypes still works
            _FAST["error"] = f"{type(e).__name__}: {e}"
        return _FAST.get("module"), _FAST.get("error")


def _build_fast(cache_dir: Path) -> Any:
    from importlib import resources

    src = resources.files("nnbridge.templates").joinpath("nim/pyfast.c").read_text(encoding="utf-8")
    cc = c_compiler()
    if cc is None:
        raise BuildError("no C compiler found for the fast binding")
    py_inc = sysconfig.get_paths()["include"]
    if not Path(py_inc, "Python.h").is_file():
        raise BuildError(f"Python headers not found in {py_inc} (install python3-dev)")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    flags = ["-shared", "-fPIC", "-O2", "-Wall", f"-I{py_inc}", f"-I{np.get_include()}"]
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]
    key = hashlib.sha256("\0".join([BUILD_SCHEME, src, sys.version, np.__version__, suffix, " ".join(flags),
                                    tool_version(cc)]).encode()).hexdigest()[:32]
    entry = cache_dir / f"pyfast-{key}"
    lib = entry / f"_nnb_nimfast{suffix}"
    if not _valid_entry(entry, lib):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pyfast-", suffix=".building", dir=cache_dir))
        try:
            (tmp / "pyfast.c").write_text(src, encoding="utf-8")
            out = tmp / lib.name
            proc = subprocess.run([cc, *flags, "pyfast.c", "-o", out.name], capture_output=True, text=True,
                                  cwd=tmp, timeout=BUILD_TIMEOUT_S, check=False)
            if proc.returncode != 0 or not out.is_file():
                raise BuildError(f"building the fast binding failed: {_first_error(proc.stdout + proc.stderr)}")
            meta = {"sha256": _sha256_file(out), "scheme": BUILD_SCHEME}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
            _install(tmp, entry, lib)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    loader = importlib.machinery.ExtensionFileLoader("_nnb_nimfast", str(lib))
    spec = importlib.util.spec_from_file_location("_nnb_nimfast", str(lib), loader=loader)
    if spec is None:  # pragma: no cover
        raise BuildError(f"{lib}: cannot load the fast binding")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# ----------------------------------------------------------------- library
class NimLibrary:
    """One loaded copy of a compiled network library, with its own weights.

    Attributes: ``network`` (name), ``ident`` (symbol prefix), ``input_size``, ``output_size``,
    ``layer_widths``, ``spec`` (the inference form when known), ``path`` (the cached library),
    ``batch_function`` (the ctypes function ``int <ident>_infer_batch(const float *x, ptrdiff_t n,
    float *out)``: thread-safe, releases the GIL), ``vector_width`` (16: AVX-512 kernels) and
    ``fast_path`` (the batch-1 extension is in use). Methods: :meth:`load_weights`,
    :meth:`infer` (``[in]`` or ``[n, in]``), :meth:`infer_batch` (``[n, in]``),
    :meth:`layer_outputs`.
    """

    def __init__(self, path: str | PathLike[str], ident: str, *, spec: NetworkSpec | None = None,
                 portable: bool = False, cache_dir: str | PathLike[str] | None = None) -> None:
        self.path = Path(path)
        self.ident = ident
        self.portable = portable
        self._handle = _load_private_copy(self.path)
        fn = self._fn
        self._n_layers = int(fn("n_layers", ctypes.c_int)())
        self.input_size = int(fn("n_inputs", ctypes.c_int)())
        self.output_size = int(fn("n_outputs", ctypes.c_int)())
        width = fn("layer_width", ctypes.c_int, ctypes.c_int)
        self.layer_widths = [int(width(i)) for i in range(self._n_layers)]
        self.vector_width = int(fn("vector_width", ctypes.c_int)())
        self._load = fn("load", ctypes.c_int, ctypes.c_char_p)
        self._last_error = fn("last_error", ctypes.c_char_p)
        self._is_loaded = fn("is_loaded", ctypes.c_int)
        self.batch_function = fn("infer_batch", ctypes.c_int, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_void_p)
        self.layer_function = fn("infer_layer", ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_ssize_t,
                                 ctypes.c_void_p)
        if spec is not None:
            spec = NeuralNet(spec).for_inference().spec
            if spec.in_size != self.input_size or [x.output_size for x in spec.layers] != self.layer_widths:
                raise BuildError(f"{self.path}: the library computes {self.input_size} -> {self.layer_widths}, "
                                 f"not network {spec.name!r}")
        self.spec = spec
        self.network = spec.name if spec is not None else ident
        self.fast_path_error: str | None = None
        mod, why = _fast_module(Path(cache_dir) if cache_dir else default_cache_dir())
        if mod is not None:
            address = ctypes.cast(self.batch_function, ctypes.c_void_p).value
            self.infer: Callable[[Any], np.ndarray] = mod.bind(address, self.input_size, self.output_size,
                                                               NNBridgeError, self.network)
        else:
            self.fast_path_error = why
            self.infer = self._infer_ctypes

    def _fn(self, name: str, restype: Any, *argtypes: Any) -> Any:
        try:
            f = getattr(self._handle, f"{self.ident}_{name}")
        except AttributeError:
            raise BuildError(f"{self.path}: missing exported function {self.ident}_{name}; rebuild the module "
                             "with this version of nnbridge") from None
        f.restype = restype
        f.argtypes = list(argtypes)
        return f

    @property
    def fast_path(self) -> bool:
        """True when :meth:`infer` goes through the compiled CPython binding (not ctypes)."""
        return self.fast_path_error is None

    @property
    def loaded(self) -> bool:
        """True when weights are loaded."""
        return bool(self._is_loaded())

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "no weights"
        return f"NimLibrary({self.network!r}, {self.input_size} -> {self.output_size}, {state}, {self.path})"

    # ------------------------------------------------------------- weights
    def load_weights(self, source: str | PathLike[str] | Weights | NeuralNet) -> None:
        """Load NMW weights (a file, or Weights/NeuralNet written to a temporary NMW) into this copy."""
        if isinstance(source, (Weights, NeuralNet)):
            weights = source.weights if isinstance(source, NeuralNet) else source
            with tempfile.TemporaryDirectory(prefix="nnbridge-nim-") as d:
                path = Path(d) / "weights.nmw"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    weights.save_nmw(path)
                self._load_path(path)
            return
        self._load_path(Path(source))

    def _load_path(self, path: Path) -> None:
        rc = self._load(os.fsencode(path))
        if rc != 0:
            msg = (self._last_error() or b"").decode("utf-8", "replace")
            raise NMWError(msg or f"{path}: the library could not load these weights")

    # ----------------------------------------------------------- inference
    def _input(self, x: Any, batch: bool) -> tuple[np.ndarray, bool]:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"inputs must be numbers, found dtype {arr.dtype}")
        single = arr.ndim == 1 and not batch
        if single:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.input_size:
            expect = f"[batch, {self.input_size}]" if batch else f"[{self.input_size}] or [batch, {self.input_size}]"
            raise ValueError(f"{self.network} takes {self.input_size} features per sample: expected shape "
                             f"{expect}, found {list(np.shape(x))}")
        return np.ascontiguousarray(arr, dtype=np.float32), single

    def _check(self, rc: int) -> None:
        if rc != 0:
            why = {-1: "no weights loaded; call load_weights(path)", -2: "bad arguments",
                   -3: "out of memory"}.get(rc, f"error {rc}")
            raise NNBridgeError(f"{self.network}: the compiled library failed: {why}")

    def _infer_ctypes(self, x: Any) -> np.ndarray:
        arr, single = self._input(x, batch=False)
        out = np.empty((arr.shape[0], self.output_size), np.float32)
        if len(arr):
            self._check(self.batch_function(arr.ctypes.data, len(arr), out.ctypes.data))
        return out[0] if single else out

    def infer_batch(self, x: Any) -> np.ndarray:
        """Outputs ``[n, out]`` (float32) for a batch ``[n, in]``."""
        arr, _ = self._input(x, batch=True)
        return self.infer(arr)

    __call__ = infer_batch

    def layer_outputs(self, x: Any) -> list[np.ndarray]:
        """Every inference-form layer's output (after its activation) for a batch ``[n, in]``."""
        arr, _ = self._input(x, batch=True)
        outs = []
        for i, width in enumerate(self.layer_widths):
            out = np.empty((len(arr), width), np.float32)
            if len(arr):
                self._check(self.layer_function(i, arr.ctypes.data, len(arr), out.ctypes.data))
            outs.append(out)
        return outs


def _load_private_copy(path: Path) -> ctypes.CDLL:
    """dlopen a private copy of ``path`` so each NimLibrary has its own globals (its own weights)."""
    if os.name == "nt":  # pragma: no cover - not a supported platform for the Nim target
        return ctypes.CDLL(str(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out)
        try:
            return ctypes.CDLL(tmp, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2))
        except OSError as e:
            raise BuildError(f"{path}: cannot load the compiled library: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # the mapping stays valid; nothing is left in the temp folder


# ------------------------------------------------------------------ runner
class NimRunner:
    """A :class:`nnbridge.verify.Runner` over a loaded :class:`NimLibrary`."""

    def __init__(self, lib: NimLibrary) -> None:
        self.lib = lib
        self.label = "nim (portable)" if lib.portable else "nim"

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``[n, out]``."""
        return self.lib.infer_batch(x)

    def layer_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's output."""
        return self.lib.layer_outputs(x)


def load_library(source: NeuralNet | str | PathLike[str] | Any, *, cache_dir: str | PathLike[str] | None = None,
                 portable: bool = False, weights: str | PathLike[str] | Weights | NeuralNet | None = None,
                 embed_weights: bool = False, nim: str | PathLike[str] | None = None) -> NimLibrary:
    """Build (cached) and load the Nim library of ``source`` with its weights.

    ``source``: a :class:`NeuralNet` (module generated here, its weights loaded through an NMW
    file, or compiled in with ``embed_weights``); an output folder of ``nnbridge convert`` /
    ``generate`` (or its :class:`~nnbridge.pipeline.OutputFolder`): its ``*_cpu.nim`` built and
    its ``.nmw`` loaded; or a ``.nim`` file (then pass ``weights``).
    """
    kw: dict[str, Any] = {"cache_dir": cache_dir, "portable": portable, "nim": nim}
    if isinstance(source, NeuralNet):
        build = NimBuild(source if embed_weights else source.spec, embed_weights=embed_weights, **kw)
        lib = NimLibrary(build.build(), build.ident, spec=source.spec, portable=portable, cache_dir=cache_dir)
        if not embed_weights:
            lib.load_weights(weights if weights is not None else source)
        elif weights is not None:
            lib.load_weights(weights)
        return lib
    folder = source if hasattr(source, "nim") and hasattr(source, "nmw") else None
    path = Path(source) if folder is None else Path(folder.path)
    if folder is None and path.is_dir():
        from nnbridge.pipeline import open_output

        folder = open_output(path)
    if folder is not None:
        if folder.nim is None:
            raise NNBridgeError(f"{folder.path}: no {folder.stem}_cpu.nim in this folder; generate the nim target")
        build = NimBuild(folder.nim, **kw)
        lib = NimLibrary(build.build(), build.ident, spec=folder.spec, portable=portable, cache_dir=cache_dir)
        w = weights if weights is not None else folder.nmw
        if w is None:
            raise NNBridgeError(f"{folder.path}: no .nmw weights in this folder; pass weights=")
        lib.load_weights(w)
        return lib
    build = NimBuild(path, **kw)
    lib = NimLibrary(build.build(), build.ident, portable=portable, cache_dir=cache_dir)
    if weights is not None:
        lib.load_weights(weights)
    return lib


def runner_for_folder(folder: Any, **options: Any) -> NimRunner:
    """A runner over the Nim module and weights of an output folder (path or OutputFolder)."""
    return NimRunner(load_library(folder, **options))


def nim_runner(inf_net: NeuralNet, *, cache_dir: str | PathLike[str] | None = None, portable: bool = False,
               embed_weights: bool = False, nim: str | PathLike[str] | None = None) -> NimRunner:
    """Backend ``"nim"`` of :func:`nnbridge.verify.verify`: generate, build (cached), load, run."""
    return NimRunner(load_library(inf_net, cache_dir=cache_dir, portable=portable, embed_weights=embed_weights,
                                  nim=nim))


register_backend("nim", nim_runner)

__all__ = ["NIM_MISSING", "NimBuild", "NimLibrary", "NimRunner", "default_cache_dir", "find_nim", "load_library",
           "nim_runner", "runner_for_folder"]
