"""On-disk cache of compiled kernels (cubin), safe under concurrent writers.

An entry is ``MAGIC + sha256(payload) + payload``; a load that finds a short file,
another magic or a digest mismatch treats the entry as corrupt, removes it and
reports a miss, so the caller rebuilds. A checksum proves an entry whole, not that it
is the kernel asked for: a load given the identity it expects (:mod:`.identity`)
also reads the identity record built into the payload, and an entry that cannot
prove it is that kernel is removed and missed the same way (``rejected`` says why). Writes go to a temporary file in the same
folder, are flushed to disk and then renamed over the entry, so a reader sees either
nothing or a whole entry. Ranks compiling the same kernel at once serialise on a
per-entry lock file (``fcntl.flock``), and the losers find the winner's entry; the
wait is bounded, after which a rank compiles on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

from . import identity
from .errors import FlashMoEError

__all__ = ["KernelCache", "SCHEMA"]

SCHEMA = 1
_MAGIC = b"FLASHMOE-CUBIN-1\n"
_DIGEST_LEN = 64


class KernelCache:
    """A folder of compiled kernels keyed by content hash.

    Parameters
    ----------
    root : path
        Cache folder (created on first write).
    lock_timeout_s : float
        Longest wait for another process compiling the same entry.
    """

    def __init__(self, root, lock_timeout_s: float = 900.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self.rejected: Dict[str, str] = {}  # key -> why its entry was not loaded

    def _proven(self, key: str, payload: bytes, expect: Optional[Mapping[str, str]]) -> bool:
        if expect is None:
            return True
        why = identity.mismatch(identity.read(payload), expect)
        if why is not None:
            self.rejected[key] = why
        return why is None

    def check_writable(self) -> None:
        """Raise FlashMoEError unless entries can be written here (called before a
        compile, so that an unusable folder fails in a second, not after the build)."""
        d = self._dir()
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=d, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            where = exc.filename or d
            raise FlashMoEError(
                f"the kernel cache folder {self.root} is not usable ({exc.strerror}: {where}); "
                "point FLASHMOE_CACHE_DIR at a writable folder") from None

    def _dir(self) -> Path:
        return self.root / f"v{SCHEMA}"

    def path(self, key: str) -> Path:
        """File of the entry for ``key``."""
        return self._dir() / key[:2] / f"{key}.cubin"

    # ------------------------------------------------------------------ entries
    def load(self, key: str, expect: Optional[Mapping[str, str]] = None) -> Optional[bytes]:
        """The cached payload, or None on a miss, a corrupt entry or one whose identity
        is not ``expect`` (those are removed)."""
        p = self.path(key)
        try:
            blob = p.read_bytes()
        except OSError:
            return None
        head = len(_MAGIC) + _DIGEST_LEN
        if len(blob) > head and blob.startswith(_MAGIC):
            digest = blob[len(_MAGIC):head].decode("ascii", "replace")
            payload = blob[head:]
            if hashlib.sha256(payload).hexdigest() == digest and \
                    self._proven(key, payload, expect):
                return payload
        for q in (p, p.with_suffix(".json")):
            with contextlib.suppress(OSError):
                q.unlink()
        return None

    def store(self, key: str, payload: bytes, meta: Optional[dict] = None) -> Path:
        """Write an entry atomically; ``meta`` goes to a JSON file beside it."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        blob = _MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + payload
        self._atomic_write(p, blob)
        if meta is not None:
            self._atomic_write(p.with_suffix(".json"),
                               json.dumps(meta, indent=1, sort_keys=True, default=str).encode())
        return p

    def file_path(self, key: str, suffix: str) -> Path:
        """File of a plain-file entry (a library that is loaded from disk as it is)."""
        return self.path(key).with_suffix(suffix)

    def load_file(self, key: str, suffix: str,
                  expect: Optional[Mapping[str, str]] = None) -> Optional[Path]:
        """Path of a plain-file entry whose digest matches its record and whose identity
        is ``expect``, else None (a corrupt, half-recorded or foreign entry is removed)."""
        p = self.file_path(key, suffix)
        meta = p.with_name(p.name + ".json")
        try:
            digest = json.loads(meta.read_text())["sha256"]
            payload = p.read_bytes()
            ok = hashlib.sha256(payload).hexdigest() == digest and \
                self._proven(key, payload, expect)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            return p
        for q in (p, meta):
            with contextlib.suppress(OSError):
                q.unlink()
        return None

    def store_file(self, key: str, payload: bytes, suffix: str,
                   meta: Optional[dict] = None) -> Path:
        """Write a plain-file entry atomically; its digest (and ``meta``) go to a JSON
        record beside it, written last, so a reader never trusts a partial entry."""
        p = self.file_path(key, suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(p, payload)
        record = dict(meta or {}, sha256=hashlib.sha256(payload).hexdigest())
        self._atomic_write(p.with_name(p.name + ".json"),
                           json.dumps(record, indent=1, sort_keys=True, default=str).encode())
        return p

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[bool]:
        """Hold the entry's lock; yields False if it could not be had in time."""
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic writes alone keep entries whole
            yield False
            return
        p = self.path(key).with_suffix(".lock")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield False
            return
        got = False
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ------------------------------------------------------------------ compile times
    def _timings(self) -> Path:
        return self._dir() / "compile-seconds.json"

    def estimate_seconds(self, name: str, default: float) -> float:
        """Last measured compile time of a kernel family (for progress messages)."""
        try:
            return float(json.loads(self._timings().read_text())[name])
        except (OSError, ValueError, KeyError, TypeError):
            return default

    def record_seconds(self, name: str, seconds: float) -> None:
        try:
            data = json.loads(self._timings().read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[name] = round(seconds, 1)
        with contextlib.suppress(OSError):
            self._timings().parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(self._timings(), json.dumps(data, sort_keys=True).encode())

    def clear(self) -> int:
        """Remove every entry; returns how many kernels were removed."""
        n = 0
        d = self._dir()
        if not d.exists():
            return 0
        for p in sorted(d.rglob("*"), reverse=True):
            if p.is_file():
                n += p.suffix in (".cubin", ".so")
                p.unlink()
            else:
                with contextlib.suppress(OSError):
                    p.rmdir()
        return n
