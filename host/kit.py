"""A kernel kit: cubins built on one machine, loaded as they are on another.

A GPU machine may have other versions of NVRTC, nvJitLink or cuda-core than the
machine that compiled its kernels, no CUTLASS headers and no time to compile. A kit
is a folder that carries the cubins together with the tool versions that made them,
so the machine that loads it computes the very cache keys the builder computed:

    kit.json        format, tool versions, device-source digest, provenance, entries
    k/<key>.cubin.z each cubin, zlib-compressed (cubins shrink about tenfold)
    misses.jsonl    appended by the loading side: kernels asked for but not in the kit

A key hashes the kernel's defines, flags, target, the tool versions and the digest
of the device sources (see :func:`~.compiler.cache_key`); the loading side takes the
versions from ``kit.json`` and the digest from its own sources, so a kit goes stale
exactly when the device sources change. Entries are checksummed; a kit is written
to a temporary folder and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from . import identity
from .errors import FlashMoEError

__all__ = ["KernelKit", "KitWriter", "FORMAT"]

FORMAT = 1
_MANIFEST = "kit.json"
_MISSES = "misses.jsonl"


class KernelKit:
    """A kit opened for loading.

    Parameters
    ----------
    root : path
        The kit folder (holding ``kit.json``).

    Raises
    ------
    FlashMoEError
        When the folder holds no readable kit of a known format.
    """

    def __init__(self, root) -> None:
        self.root = Path(root)
        path = self.root / _MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise FlashMoEError(f"{self.root} is not a kernel kit (no {_MANIFEST}); build one "
                                "with python -m flashmoe_core.build --kit DIR") from None
        except (OSError, ValueError) as exc:
            raise FlashMoEError(f"cannot read the kernel kit manifest {path} ({exc}); "
                                "rebuild the kit") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise FlashMoEError(f"{path} is a kit of format {manifest.get('format')!r}, this "
                                f"flashmoe_core reads format {FORMAT}; rebuild the kit")
        self.manifest: Dict[str, Any] = manifest
        self.versions: Dict[str, str] = dict(manifest["versions"])
        self.device_digest: str = manifest["device_digest"]
        self.entries: Dict[str, Dict[str, Any]] = dict(manifest["entries"])

    def load(self, key: str, expect: Optional[Mapping[str, str]] = None) -> Optional[bytes]:
        """The cubin of ``key``, or None if the kit lacks it, the entry is damaged or the
        cubin's own identity record is not ``expect`` (see :mod:`.identity`)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        try:
            cubin = zlib.decompress((self.root / entry["file"]).read_bytes())
        except (OSError, zlib.error):
            return None
        if hashlib.sha256(cubin).hexdigest() != entry["sha256"]:
            return None
        if expect is not None and identity.mismatch(identity.read(cubin), expect) is not None:
            return None
        return cubin

    def record_miss(self, record: Mapping[str, Any]) -> None:
        """Append one request the kit could not serve to ``misses.jsonl`` (best effort:
        a read-only kit still raises the miss, it only goes unlogged)."""
        line = json.dumps(dict(record), sort_keys=True, default=str) + "\n"
        with contextlib.suppress(OSError):
            with open(self.root / _MISSES, "a") as f:
                f.write(line)

    def misses(self) -> list:
        """Every miss recorded so far (oldest first)."""
        try:
            text = (self.root / _MISSES).read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stored_bytes(self) -> int:
        """Bytes the kit occupies on disk (what travels with it)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


class KitWriter:
    """Builds a kit in a temporary folder beside ``root``; :meth:`finish` swaps it in.

    Parameters
    ----------
    root : path
        Where the kit goes (replaced if it exists).
    versions : mapping
        The tool versions the cubins were built with (``Toolchain.versions``).
    device_digest : str
        Digest of the device sources they were built from.
    provenance : mapping
        Recorded as is (commit, device tree hash, date, builder, ...).
    """

    def __init__(self, root, versions: Mapping[str, str], device_digest: str,
                 provenance: Mapping[str, Any] = ()) -> None:
        self.root = Path(root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(dir=self.root.parent, prefix=f".{self.root.name}."))
        (self._tmp / "k").mkdir()
        self._manifest = {
            "format": FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "versions": dict(versions),
            "device_digest": device_digest,
            "provenance": dict(provenance),
            "entries": {},
        }

    def add(self, key: str, cubin: bytes, **info: Any) -> None:
        """Store one cubin under its cache key; ``info`` (entry, arch, defines, ...) goes
        to the manifest. Adding a key twice merges its ``origins``."""
        entries = self._manifest["entries"]
        origins = list(info.pop("origins", ()))
        if key in entries:
            entries[key]["origins"] = sorted(set(entries[key]["origins"]) | set(origins))
            return
        rel = f"k/{key}.cubin.z"
        blob = zlib.compress(cubin, 9)
        (self._tmp / rel).write_bytes(blob)
        entries[key] = dict(info, file=rel, bytes=len(cubin), stored_bytes=len(blob),
                            sha256=hashlib.sha256(cubin).hexdigest(), origins=sorted(origins))

    def finish(self) -> KernelKit:
        """Write the manifest and move the kit into place."""
        (self._tmp / _MANIFEST).write_text(json.dumps(self._manifest, indent=1, sort_keys=True))
        if self.root.exists():
            old = Path(tempfile.mkdtemp(dir=self.root.parent, prefix=f".{self.root.name}.old."))
            os.replace(self.root, old / "kit")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(self._tmp, self.root)
        return KernelKit(self.root)

    def abandon(self) -> None:
        """Drop the half-built kit (after a failed build)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
