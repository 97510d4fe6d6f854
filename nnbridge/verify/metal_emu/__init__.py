"""Run Metal compute kernels on a CPU: a shim ``metal_stdlib`` + a C++20 scheduler + this driver.

The exact text of a Metal source (a generated ``.metal`` file, or the source MLX generates
from a body-form kernel) is compiled as C++20 with the shim header on an otherwise empty
include path, linked with the scheduler (``harness.cpp``) and run as a separate process:

* kernel signatures are read from the text (``[[buffer(n)]]`` and thread-attribute
  parameters), and a small generated *glue* binds buffers and attribute values per thread;
* the scheduler dispatches with Metal semantics (grid in threads, partial last threadgroup,
  every thread attribute, threadgroup memory, ``threadgroup_barrier``, SIMD reductions over
  32-lane groups) and reports what would hang or misbehave on a GPU as an error;
* float32/float16 buffers travel as binary files; the process has a timeout, so a kernel
  that never finishes is an error, not a hang.

Built executables are cached by content hash under ``$NNBRIDGE_METAL_EMU_CACHE`` or
``$XDG_CACHE_HOME/nnbridge/metal_emu`` (default ``~/.cache/nnbridge/metal_emu``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from nnbridge.errors import BuildError, VerificationError

EMU_VERSION = "1"
SIMD_WIDTH = 32
MAX_THREADS_PER_THREADGROUP = 1024
DEFAULT_TIMEOUT_S = 300.0

# Flags for kernel code: no standard library, every warning an error except unknown
# attributes ([[buffer(0)]] …) and unused parameters (MLX adds a parameter for every thread
# attribute whose name appears in the body, comments included).
KERNEL_FLAGS = (
    "-std=c++20", "-O2", "-fno-exceptions", "-fno-rtti", "-nostdinc", "-nostdinc++",
    "-ffp-contract=off", "-fno-fast-math",
    "-Wall", "-Wextra", "-Werror", "-Wno-attributes", "-Wno-unused-parameter",
    "-Wdouble-promotion", "-Wfloat-conversion",
)
HOST_FLAGS = ("-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-attributes")

# Thread attributes the scheduler provides: name -> True for vector-valued (uint3) ones.
ATTRIBUTES: dict[str, bool] = {
    "thread_position_in_grid": True,
    "thread_position_in_threadgroup": True,
    "threadgroup_position_in_grid": True,
    "threads_per_threadgroup": True,
    "dispatch_threads_per_threadgroup": True,
    "threads_per_grid": True,
    "threadgroups_per_grid": True,
    "thread_index_in_threadgroup": False,
    "thread_index_in_simdgroup": False,
    "simdgroup_index_in_threadgroup": False,
    "simdgroups_per_threadgroup": False,
    "threads_per_simdgroup": False,
    "thread_execution_width": False,
    "thread_index_in_quadgroup": False,
    "quadgroup_index_in_threadgroup": False,
    "quadgroups_per_threadgroup": False,
}
_ATTR_TYPES = {"uint": 1, "uint3": 3}  # how attributes may be declared (MLX and our generator use these)

# What MLX's utility headers contribute that our sources rely on (MLX prepends them to
# every custom kernel): the Metal standard library, `using namespace metal` and float16_t.
MLX_PRELUDE = "#include <metal_stdlib>\nusing namespace metal;\ntypedef half float16_t;\n"

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KERNEL_RE = re.compile(r"(?:\[\[\s*kernel\s*\]\]|\bkernel)\s+void\s+([A-Za-z_]\w*)\s*\(")
_PARAM_RE = re.compile(
    r"^(?P<type>.*?)(?P<name>[A-Za-z_]\w*)\s*\[\[\s*(?P<attr>[A-Za-z_]\w*)\s*(?:\(\s*(?P<idx>\d+)\s*\))?\s*\]\]$",
    re.S,
)
_COOPERATIVE_RE = re.compile(r"\bthreadgroup_barrier\b|\bsimdgroup_barrier\b|\bsimd_\w+\s*\(|\bthreadgroup\b")

_lock = threading.Lock()
_built: dict[str, Emulator] = {}
_compiler_ids: dict[tuple[str, ...], str] = {}


# ---------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Param:
    """One kernel parameter: a buffer (``[[buffer(n)]]``) or a thread attribute."""

    type: str  # as written, e.g. "const device float*" or "uint3"
    name: str
    attribute: str  # "buffer" or the thread attribute's name
    index: int | None = None  # buffer index


@dataclass(frozen=True)
class KernelSignature:
    """A kernel function found in a source: its name, parameters and whether it cooperates."""

    name: str
    params: tuple[Param, ...]
    cooperative: bool  # uses barriers, SIMD functions or threadgroup memory
    filename: str

    @property
    def buffer_indices(self) -> list[int]:
        """The buffer indices the kernel binds."""
        return [p.index for p in self.params if p.attribute == "buffer" and p.index is not None]


def strip_comments(text: str) -> str:
    """``text`` with comments replaced by spaces (newlines kept, so line numbers stay)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _matching(text: str, start: int, open_c: str, close_c: str) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_c:
            depth += 1
        elif text[i] == close_c:
            depth -= 1
            if depth == 0:
                return i
    raise BuildError(f"unbalanced {open_c}{close_c} in Metal source")


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([<":
            depth += 1
        elif c in ")]>":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [" ".join(p.split()) for p in parts]


def parse_kernels(source: str, filename: str = "kernel.metal") -> list[KernelSignature]:
    """Every kernel function of ``source`` with its parameters; unsupported forms raise BuildError."""
    text = strip_comments(source)
    if re.search(r"\btemplate\b", text):
        raise BuildError(f"{filename}: templated kernels are not supported by the Metal emulator")
    kernels = []
    for m in _KERNEL_RE.finditer(text):
        name = m.group(1)
        open_paren = m.end() - 1
        close_paren = _matching(text, open_paren, "(", ")")
        params = []
        for raw in _split_params(text[open_paren + 1:close_paren]):
            pm = _PARAM_RE.match(raw)
            if not pm:
                raise BuildError(f"{filename}: kernel {name}: parameter {raw!r} has no [[buffer(n)]] or supported "
                                 f"thread attribute")
            attr, type_ = pm.group("attr"), pm.group("type").strip()
            if attr == "buffer":
                if pm.group("idx") is None or not type_.endswith(("*", "&")):
                    raise BuildError(f"{filename}: kernel {name}: buffer parameter {raw!r} must be a pointer or "
                                     f"reference with an index")
                params.append(Param(type_, pm.group("name"), "buffer", int(pm.group("idx"))))
            elif attr in ATTRIBUTES:
                base = type_.replace("const", "").strip()
                if base not in _ATTR_TYPES or (not ATTRIBUTES[attr] and _ATTR_TYPES[base] != 1):
                    raise BuildError(f"{filename}: kernel {name}: attribute {attr} declared as {type_!r}; supported: "
                                     f"{', '.join(_ATTR_TYPES) if ATTRIBUTES[attr] else 'uint'}")
                params.append(Param(type_, pm.group("name"), attr))
            else:
                raise BuildError(f"{filename}: kernel {name}: attribute [[{attr}]] is not supported by the Metal "
                                 f"emulator; supported: buffer(n), {', '.join(ATTRIBUTES)}")
        brace = text.find("{", close_paren)
        if brace < 0 or text[close_paren + 1:brace].strip():
            raise BuildError(f"{filename}: kernel {name}: expected a body after the parameter list")
        body = text[brace:_matching(text, brace, "{", "}") + 1]
        indices = [p.index for p in params if p.index is not None]
        if len(indices) != len(set(indices)):
            raise BuildError(f"{filename}: kernel {name}: a buffer index is used twice")
        kernels.append(KernelSignature(name, tuple(params), bool(_COOPERATIVE_RE.search(body)), filename))
    if not kernels:
        raise BuildError(f"{filename}: no kernel function found")
    return kernels


def _attr_expr(p: Param) -> str:
    base = p.type.replace("const", "").strip()
    field_ = f"c.{p.attribute}"
    if not ATTRIBUTES[p.attribute]:
        return f"(uint){field_}"
    if _ATTR_TYPES[base] == 1:
        return f"(uint){field_}.x"
    return f"uint3{{{field_}.x, {field_}.y, {field_}.z}}"


def glue(kernels: Sequence[KernelSignature], unit: int) -> str:
    """C++ appended to a kernel translation unit: one thread entry per kernel and their table."""
    lines = ["", "// ---- nnbridge Metal emulator glue (generated) ----", "namespace {"]
    for k, sig in enumerate(kernels):
        args = []
        for p in sig.params:
            if p.attribute == "buffer":
                if p.type.endswith("&"):
                    args.append(f"*({p.type[:-1].rstrip()}*)(__b[{p.index}])")
                else:
                    args.append(f"({p.type})(__b[{p.index}])")
            else:
                args.append(_attr_expr(p))
        joined = ",\n      ".join(args)
        lines += [f"void __nnb_thread_{k}(const __nnb::ThreadCtx& c, void* const* __b) {{",
                  f"  (void)c; (void)__b;\n  {sig.name}(\n      {joined});", "}"]
    lines.append("}  // namespace")
    lines.append(f'extern "C" const __nnb::KernelEntry __nnb_entries_{unit}[] = {{')
    for k, sig in enumerate(kernels):
        lines.append(f'  {{"{sig.name}", __nnb_thread_{k}, "{sig.filename}", {int(sig.cooperative)}}},')
    lines += ["  {nullptr, nullptr, nullptr, 0},", "};", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- building
def find_compiler() -> list[str]:
    """The C++ compiler command: ``$CXX``, else ``g++``, else ``clang++``; BuildError when none."""
    cxx = os.environ.get("CXX")
    if cxx:
        cmd = shlex.split(cxx)
        if cmd and shutil.which(cmd[0]):
            return cmd
        raise BuildError(f"$CXX is {cxx!r}, which is not an executable; unset it or point it to g++ or clang++")
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    raise BuildError("no C++20 compiler found for the Metal emulation (looked for $CXX, g++, clang++); install "
                     "one: `apt-get install g++` (Debian/Ubuntu), `dnf install gcc-c++` (Fedora) or "
                     "`xcode-select --install` (macOS)")


def _compiler_id(cmd: list[str]) -> str:
    key = tuple(cmd)
    if key not in _compiler_ids:
        try:
            out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"cannot run the C++ compiler {cmd[0]}: {e}") from None
        _compiler_ids[key] = out.stdout.strip()
    return _compiler_ids[key]


def cache_root() -> Path:
    """Where built emulators live (see the module docstring)."""
    env = os.environ.get("NNBRIDGE_METAL_EMU_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnbridge" / "metal_emu"


def _support_dir() -> Path:
    return Path(str(resources.files("nnbridge.verify.metal_emu")))


def _support_text() -> str:
    d = _support_dir()
    return "".join((d / f).read_text() for f in ("metal_stdlib", "nnb_emu.hpp", "harness.cpp"))


def _compile(cmds: list[list[str]], cwd: Path, what: list[str]) -> None:
    procs = []
    limit = max(1, os.cpu_count() or 1)
    pending = list(zip(cmds, what))
    running: list[tuple[subprocess.Popen[str], list[str], str]] = []
    try:
        while pending or running:
            while pending and len(running) < limit:
                cmd, label = pending.pop(0)
                p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                running.append((p, cmd, label))
                procs.append(p)
            p, cmd, label = running.pop(0)
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                lines = out.strip().splitlines()
                shown = "\n".join(lines[:40]) + ("\n..." if len(lines) > 40 else "")
                raise BuildError(f"the Metal emulation could not compile {label} (an error in the kernel source "
                                 f"means it left the MSL subset the shim accepts, listed in docs/metal.md; "
                                 f"otherwise check the C++ compiler):\n{shown}\ncommand: {shlex.join(cmd)}")
    except OSError as e:
        raise BuildError(f"cannot run the C++ compiler: {e}") from None
    except subprocess.TimeoutExpired:
        raise BuildError("the C++ compiler did not finish within 10 minutes") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@dataclass(frozen=True)
class Source:
    """One Metal source to compile as its own translation unit."""

    text: str
    filename: str = "kernel.metal"
    prelude: str = ""  # text compiled before the source (e.g. MLX_PRELUDE for MLX's generated sources)


def _host_object(cxx: list[str], root: Path) -> Path:
    d = _support_dir()
    key = hashlib.sha256("\0".join([EMU_VERSION, *cxx, _compiler_id(cxx), *HOST_FLAGS,
                                    _support_text()]).encode()).hexdigest()[:24]
    obj = root / f"harness-{key}.o"
    if obj.exists():
        return obj
    with tempfile.TemporaryDirectory(dir=root, prefix=".harness.") as tmp:
        t = Path(tmp)
        shutil.copy(d / "harness.cpp", t / "harness.cpp")
        shutil.copy(d / "nnb_emu.hpp", t / "nnb_emu.hpp")
        _compile([[*cxx, *HOST_FLAGS, "-c", "harness.cpp", "-o", "harness.o"]], t, ["the emulator harness"])
        os.replace(t / "harness.o", obj)
    return obj


def _build_into(t: Path, cxx: list[str], host: Path, sources: list[Source],
                sigs: list[list[KernelSignature]]) -> None:
    support = _support_dir()
    inc = t / "include"
    inc.mkdir()
    shutil.copy(support / "metal_stdlib", inc / "metal_stdlib")
    shutil.copy(support / "nnb_emu.hpp", inc / "nnb_emu.hpp")
    shutil.copy(support / "nnb_emu.hpp", t / "nnb_emu.hpp")
    cmds, labels, objs = [], [], []
    for u, (src, ks) in enumerate(zip(sources, sigs)):
        (t / src.filename).write_text(src.text)
        (t / f"unit{u}.cpp").write_text(f'{src.prelude}#include "{src.filename}"\n{glue(ks, u)}')
        cmds.append([*cxx, *KERNEL_FLAGS, "-I", "include", "-c", f"unit{u}.cpp", "-o", f"unit{u}.o"])
        labels.append(src.filename)
        objs.append(f"unit{u}.o")
    registry = ['#include "nnb_emu.hpp"']
    registry += [f'extern "C" const __nnb::KernelEntry __nnb_entries_{u}[];' for u in range(len(sources))]
    registry.append('extern "C" const __nnb::KernelEntry* const __nnb_entry_tables[] = {')
    registry += [f"  __nnb_entries_{u}," for u in range(len(sources))] + ["  nullptr,", "};", ""]
    (t / "registry.cpp").write_text("\n".join(registry))
    cmds.append([*cxx, *HOST_FLAGS, "-c", "registry.cpp", "-o", "registry.o"])
    labels.append("the kernel registry")
    objs.append("registry.o")
    _compile(cmds, t, labels)
    _compile([[*cxx, "-pthread", str(host), *objs, "-o", "emu", "-lm"]], t, ["the emulator (link)"])


def build(sources: Source | str | Sequence[Source], *, timeout: float = DEFAULT_TIMEOUT_S) -> Emulator:
    """Compile ``sources`` (each its own translation unit) with the shim into one emulator (cached)."""
    if isinstance(sources, str):
        sources = [Source(sources)]
    elif isinstance(sources, Source):
        sources = [sources]
    sources = list(sources)
    names = [s.filename for s in sources]
    if len(set(names)) != len(names) or not all(re.match(r"^[A-Za-z0-9_.-]+$", n) for n in names):
        raise BuildError(f"source file names must be distinct and plain, found {names}")
    sigs = [parse_kernels(s.text, s.filename) for s in sources]
    all_names = [k.name for ks in sigs for k in ks]
    if len(set(all_names)) != len(all_names):
        raise BuildError(f"kernel names must be distinct across sources, found {all_names}")
    cxx = find_compiler()
    key = hashlib.sha256("\0".join([EMU_VERSION, *cxx, _compiler_id(cxx), *KERNEL_FLAGS, *HOST_FLAGS,
                                    _support_text(), *(f"{s.filename}\0{s.prelude}\0{s.text}" for s in sources)]
                                   ).encode()).hexdigest()[:24]
    with _lock:
        if key in _built:
            return _built[key]
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{root}: cannot create the emulator cache folder: {e.strerror or e}") from None
    target = root / key
    exe = target / "emu"
    if not exe.exists():
        host = _host_object(cxx, root)
        t = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        try:
            _build_into(t, cxx, host, sources, sigs)
            try:
                os.replace(t, target)
            except OSError:
                if not exe.exists():  # else another process built the same content first
                    raise
        except OSError as e:
            raise BuildError(f"{target}: cannot store the built emulator: {e.strerror or e}") from None
        finally:
            shutil.rmtree(t, ignore_errors=True)
    emu = Emulator(exe, {k.name: k for ks in sigs for k in ks}, timeout)
    with _lock:
        _built[key] = emu
    return emu


# ---------------------------------------------------------------------- running
@dataclass(frozen=True)
class Output:
    """A buffer the kernels write: element dtype and count; ``check`` that every element gets written."""

    dtype: str
    count: int
    check: bool = True


@dataclass(frozen=True)
class Dispatch:
    """One ``dispatchThreads``: kernel, grid in threads, threadgroup size, buffer index → buffer name."""

    kernel: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    buffers: Mapping[int, str] = field(default_factory=dict)


@dataclass
class Emulator:
    """A built emulator: run dispatches of its kernels on buffers."""

    executable: Path
    kernels: dict[str, KernelSignature]
    timeout: float = DEFAULT_TIMEOUT_S

    def run(self, buffers: Mapping[str, np.ndarray | Output], dispatches: Sequence[Dispatch],
            outputs: Sequence[str], *, orders: Sequence[str] = ("asc", "desc"),
            timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run ``dispatches`` in order on ``buffers``; return the ``outputs`` buffers.

        Arrays are copied in as initial contents (float32, float16, int32 or uint32);
        :class:`Output` buffers start filled with a NaN pattern. With two ``orders`` the job
        runs twice (threads resumed in increasing, then decreasing index) and must give
        bit-identical results. Errors (barrier misuse, out-of-bounds access, races, elements
        never written, timeouts) raise :class:`VerificationError`.
        """
        for name in buffers:
            if not _NAME_RE.match(name):
                raise VerificationError(f"buffer name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
        lines = ["NNBEMU 1"]
        blobs, offset, dtypes = [], 0, {}
        for name, b in buffers.items():
            if isinstance(b, Output):
                dt = np.dtype(b.dtype)
                lines.append(f"buffer {name} {b.count * dt.itemsize} {dt.itemsize} -1 {int(b.check)}")
            else:
                arr = np.ascontiguousarray(b)
                dt = arr.dtype
                if dt not in (np.float32, np.float16, np.int32, np.uint32):
                    raise VerificationError(f"buffer {name}: dtype {dt} is not supported (float32, float16, int32)")
                data = arr.tobytes()
                lines.append(f"buffer {name} {len(data)} {dt.itemsize} {offset} 0")
                blobs.append(data)
                offset += len(data)
            dtypes[name] = dt
        for d in dispatches:
            sig = self.kernels.get(d.kernel)
            if sig is None:
                raise VerificationError(f"no kernel {d.kernel!r} in this source; kernels: {', '.join(self.kernels)}")
            missing = [i for i in sig.buffer_indices if i not in d.buffers]
            if missing:
                raise VerificationError(f"dispatch of {d.kernel} binds no buffer at index {missing}")
            unknown = [b for b in d.buffers.values() if b not in buffers]
            if unknown:
                raise VerificationError(f"dispatch of {d.kernel} binds unknown buffers {unknown}")
            tg = tuple(int(v) for v in d.threadgroup)
            if any(v < 1 for v in tg) or tg[0] * tg[1] * tg[2] > MAX_THREADS_PER_THREADGROUP:
                raise VerificationError(f"threadgroup {tg} of {d.kernel} must have 1 to "
                                        f"{MAX_THREADS_PER_THREADGROUP} threads")
            binds = " ".join(f"{i} {n}" for i, n in sorted(d.buffers.items()))
            lines.append(f"dispatch {d.kernel} {' '.join(str(int(v)) for v in d.grid)} "
                         f"{' '.join(map(str, tg))} {len(d.buffers)} {binds}")
        for name in outputs:
            if name not in buffers:
                raise VerificationError(f"output {name!r} is not a buffer")
        lines.append("output " + " ".join(outputs))
        lines.append("orders " + " ".join(orders))
        with tempfile.TemporaryDirectory(prefix="nnb-emu-") as tmp:
            t = Path(tmp)
            (t / "job.txt").write_text("\n".join(lines) + "\n")
            (t / "in.bin").write_bytes(b"".join(blobs))
            limit = self.timeout if timeout is None else timeout
            cmd = [str(self.executable), str(t / "job.txt"), str(t / "in.bin"), str(t / "out.bin")]
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
            except OSError as e:
                raise VerificationError(f"cannot run the Metal emulator: {e}") from None
            try:
                _, err = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise VerificationError(
                    f"the Metal emulation did not finish within {limit:g} s: a kernel loops forever or threads wait "
                    f"for each other forever ({', '.join(d.kernel for d in dispatches)})") from None
            if proc.returncode != 0:
                msg = err.strip().removeprefix("error: ") or f"exit status {proc.returncode}"
                raise VerificationError(f"Metal emulation failed: {msg}")
            raw = (t / "out.bin").read_bytes()
        result, pos = {}, 0
        for name in outputs:
            b = buffers[name]
            dt = dtypes[name]
            count = b.count if isinstance(b, Output) else np.asarray(b).size
            n = count * dt.itemsize
            result[name] = np.frombuffer(raw[pos:pos + n], dtype=dt).copy()
            pos += n
        return result


__all__ = [
    "ATTRIBUTES",
    "MLX_PRELUDE",
    "Dispatch",
    "Emulator",
    "KernelSignature",
    "Output",
    "Param",
    "Source",
    "build",
    "cache_root",
    "find_compiler",
    "glue",
    "parse_kernels",
    "strip_comments",
]
