"""What a compiled kernel says it is, written into the binary when it is built.

A cache entry is found by its key, but the key is only the file's name and the
checksum only proves the bytes are whole: an entry renamed, copied from another
cache, or swapped together with its record would pass both, and running it with
another layer's shapes writes out of bounds. So every build (NVRTC cubin, emulator
library) embeds an identity record - the cache key, the digest of the device sources
and the compile-time defines - as a constant in the binary itself, and every load
reads it back from the bytes and compares it with what was asked for before the
binary is used: a cubin before the driver sees it, an emulator library before it is
opened and again, from the opened library's data, before any of its functions runs.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple

__all__ = ["SYMBOL", "record", "declaration", "read", "mismatch"]

SYMBOL = "flashmoe_identity"
_BEGIN, _END = b"FLASHMOE-IDENTITY{", b"}"
_SAFE = re.compile(r"[A-Za-z0-9_.=,;:+-]*\Z")


def record(key: str, device_digest: str, defines: Mapping[str, str] | Tuple = ()) -> dict:
    """The identity of one build: its key, the device-source digest and its defines."""
    return {"key": str(key), "digest": str(device_digest),
            "defines": ",".join(f"{k}={v}" for k, v in sorted(dict(defines).items()))}


def _text(rec: Mapping[str, str]) -> str:
    body = ";".join(f"{k}:{rec[k]}" for k in ("key", "digest", "defines"))
    if not _SAFE.match(body):
        raise ValueError(f"identity record {body!r} has characters a C string would escape")
    return (_BEGIN + body.encode() + _END).decode()


def declaration(rec: Mapping[str, str], device: bool) -> str:
    """C++ source that defines the identity constant (``device``: a CUDA ``__device__``
    variable of the cubin; else an exported constant of a host shared library)."""
    qual = "__device__ const char" if device else \
        '__attribute__((visibility("default"), used)) const char'
    return f'\nextern "C" {qual} {SYMBOL}[] = "{_text(rec)}";\n'


def read(blob: bytes) -> Optional[dict]:
    """The identity record found in a binary's bytes, or None if it holds none."""
    start = blob.find(_BEGIN)
    if start < 0:
        return None
    end = blob.find(_END, start + len(_BEGIN))
    if end < 0:
        return None
    try:
        body = blob[start + len(_BEGIN):end].decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = dict(part.split(":", 1) for part in body.split(";") if ":" in part)
    return fields if set(fields) == {"key", "digest", "defines"} else None


def mismatch(found: Optional[Mapping[str, str]], expected: Mapping[str, str]) -> Optional[str]:
    """Why ``found`` (a record read from a binary) is not ``expected``; None if it is."""
    if found is None:
        return "it carries no identity record (built by another version, or not ours)"
    if found.get("digest") != expected["digest"]:
        return (f"it was built from other device sources (digest {found.get('digest', '')[:12]}, "
                f"these are {expected['digest'][:12]})")
    if found.get("defines") != expected["defines"]:
        split = lambda text: dict(d.split("=", 1) for d in text.split(",") if "=" in d)  # noqa
        have, want = split(found.get("defines", "")), split(expected["defines"])
        names = sorted(n for n in set(have) | set(want) if have.get(n) != want.get(n))
        show = lambda d: ", ".join(f"{n}={d.get(n, '(unset)')}" for n in names)  # noqa: E731
        return f"it was built with {show(have)}, this build has {show(want)}"
    if found.get("key") != expected["key"]:
        return (f"it is the build of key {found.get('key', '')[:16]}..., not "
                f"{expected['key'][:16]}... (other flags or tool versions)")
    return None
