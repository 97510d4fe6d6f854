"""The one sanitiser: how user text (network and layer names) may reach code and files.

Names come from JSON, NMW files, torch module paths and MLX keys. None of them reaches
generated source, a comment or a file name without passing through this module.
Generated code names its internal identifiers by index (``layer0``); user names appear
only as :func:`identifier` (exported symbols, file stems) and :func:`comment` text.
"""

from __future__ import annotations

import hashlib
import re

LAYER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LEN = 128
MAX_IDENT_LEN = 48

# Reserved words of Nim, C, C++ and the Metal Shading Language (which is C++14 plus a few).
_NIM = """addr and as asm bind block break case cast concept const continue converter defer discard
distinct div do elif else end enum except export finally for from func if import in include interface
is isnot iterator let macro method mixin mod nil not notin object of or out proc ptr raise ref return
shl shr static template try tuple type using var when while xor yield result"""
_C = """auto break case char const continue default do double else enum extern float for goto if inline
int long register restrict return short signed sizeof static struct switch typedef union unsigned void
volatile while bool true false"""
_CPP = """alignas alignof and_eq asm bitand bitor catch char8_t char16_t char32_t class compl concept
consteval constexpr constinit const_cast co_await co_return co_yield decltype delete dynamic_cast
explicit export friend mutable namespace new noexcept not_eq nullptr operator or_eq private protected
public reinterpret_cast requires static_assert static_cast template this thread_local throw try typeid
typename using virtual wchar_t xor_eq main"""
_METAL = """kernel vertex fragment device threadgroup threadgroup_imageblock thread constant ray_data
object_data half uint ushort uchar float2 float3 float4 half2 half3 half4 uint2 uint3 uint4 metal
simd_sum simd_shuffle threadgroup_barrier mem_flags sampler texture exp max min fma tanh sqrt rsqrt"""
RESERVED = frozenset(w.lower() for w in " ".join((_NIM, _C, _CPP, _METAL)).split())


def is_valid_name(name: object) -> bool:
    """True when ``name`` is a layer name the spec accepts: ``[A-Za-z_][A-Za-z0-9_]*``, ≤128 chars."""
    return isinstance(name, str) and len(name) <= MAX_NAME_LEN and bool(LAYER_NAME_RE.match(name))


def sanitize_name(text: object, fallback: str = "layer") -> str:
    """Turn arbitrary text (a module path like ``features.0``) into a valid layer name.

    Characters outside ``[A-Za-z0-9_]`` become ``_``; a leading digit gets a ``_`` prefix;
    empty text gives ``fallback``; overlong text is cut and suffixed with a short hash so
    that two different long names stay different.
    """
    s = re.sub(r"[^A-Za-z0-9_]", "_", str(text))
    if not s.strip("_"):
        s = fallback
    if s[0].isdigit():
        s = "_" + s
    if len(s) > MAX_NAME_LEN:
        digest = hashlib.sha1(str(text).encode("utf-8", "replace")).hexdigest()[:8]
        s = s[: MAX_NAME_LEN - 9] + "_" + digest
    return s


def identifier(text: object, fallback: str = "network") -> str:
    """A name safe as a Nim/C/C++/Metal identifier *and* a file stem, derived from ``text``.

    The result matches ``[a-zA-Z][a-zA-Z0-9]*(_[a-zA-Z0-9]+)*`` (Nim forbids leading,
    trailing and doubled underscores), is at most 48 characters, and is never a reserved
    word of those languages (compared case-insensitively, as Nim does).
    """
    raw = str(text)
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", raw) if p]
    s = "_".join(parts) or fallback
    if not s[0].isalpha():
        s = "n" + s
    if len(s) > MAX_IDENT_LEN or (parts and "_".join(parts) != raw and len(raw) > MAX_IDENT_LEN):
        digest = hashlib.sha1(raw.encode("utf-8", "replace")).hexdigest()[:8]
        s = s[: MAX_IDENT_LEN - 9].rstrip("_") + "_" + digest
    if s.lower() in RESERVED or s.replace("_", "").lower() in RESERVED:
        s = s + "_net"
    return s


def comment(text: object, limit: int = 80) -> str:
    """Text safe inside a one-line comment of any target (Nim ``#``, C ``//`` and ``/* */``)."""
    s = re.sub(r"[^A-Za-z0-9_ .:,()=+\-]", "?", str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."
