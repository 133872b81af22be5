"""Rendered reports, cached by what they show: the key, a byte-bounded memory LRU and a disk store.

A report is a pure function of its :class:`~exitwise.policies.report.context.ReportContext`
(plus the renderer's own code), so :func:`report_key` hashes exactly that: the document, the
governance facts (state, approvals, where the version is active, kill switches), the version's
audit events, the diff against the parent and the audit-chain check — everything except the two
timestamps of the rendering itself (``generated_at`` and the chain's ``verified_at``). Whatever
changes what a reviewer would read changes the key; asking again for an unchanged version does not.

:class:`DiskCache` keeps one file per key under the data directory, written atomically, each
holding the SHA-256 of its body: a file whose body does not match is removed and reported as a
miss (so it is rendered again), never served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from exitwise.calibration.atomic import atomic_write_bytes
from exitwise.policies.report.context import ReportContext
from exitwise.policies.report.formats import check_format

_log = logging.getLogger(__name__)

# what the rendered bytes depend on besides the context: this package and these modules beside it
_RENDERER_HELPERS = ("figures.py", "diff.py")
_MAGIC = b"exitwise-report-cache/1 sha256:"
_DIGEST_HEX = 64


def _plain(value: Any) -> Any:
    """A JSON-able, order-independent form of a context value (dataclasses, mappings, times)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@lru_cache(maxsize=1)
@functools.lru_cache(maxsize=1)
def renderer_fingerprint() -> str:
    """SHA-256 of the exitwise version and the renderer's sources and templates.

    Part of every key, so an upgrade never serves reports rendered by older code. Read once
    per process (the code a process runs does not change under it).
    """
    h = hashlib.sha256()
    try:
        h.update(version("exitwise").encode())
    except PackageNotFoundError:
        h.update(b"0")
    package = Path(__file__).resolve().parent
    sources = sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in {".py", ".j2", ".css"})
    for path in [*sources, *(package.parent / name for name in _RENDERER_HELPERS)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def report_key(context: ReportContext, format: str) -> str:
    """The cache key of ``context`` rendered as ``format``: SHA-256 hex of what the report shows."""
    facts = _plain(context)
    facts.pop("generated_at", None)
    if isinstance(facts.get("chain"), dict):
        facts["chain"].pop("verified_at", None)
    text = json.dumps({"renderer": renderer_fingerprint(), "format": check_format(format), "context": facts},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class MemoryCache:
    """A least-recently-used map of key -> bytes holding at most ``max_bytes`` of bodies (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            body = self._items.get(key)
            if body is not None:
                self._items.move_to_end(key)
            return body

    def put(self, key: str, body: bytes) -> None:
        if len(body) > self.max_bytes:
            return  # larger than the whole budget (or the cache is off): not kept
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old is not None else 0
            self._items[key] = body
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class DiskCache:
    """One file per key under ``directory`` (``<key>.<fmt>``): a digest line, then the body.

    Written atomically; read back only if the body matches its SHA-256 (a torn, truncated or
    edited file is deleted and treated as a miss). After each write the oldest files are removed
    while the directory holds more than ``max_bytes``. ``max_bytes`` 0 turns the disk cache off.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max(0, int(max_bytes))
        self.corrupt = 0  # files found corrupted and removed (for the logs and tests)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, key: str, format: str) -> Path:
        """Where the report of ``key`` lives (``key`` is a SHA-256 hex string)."""
        if len(key) != _DIGEST_HEX or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"report cache key must be 64 lower-case hex digits, got {key!r}")
        return self.directory / f"{key}.{check_format(format)}"

    def get(self, key: str, format: str) -> bytes | None:
        """The cached body, or None when absent or corrupted (a corrupted file is removed)."""
        if not self.enabled:
            return None
        path = self.path(key, format)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        head, sep, body = raw.partition(b"\n")
        digest = head[len(_MAGIC):].decode("ascii", "replace") if head.startswith(_MAGIC) else ""
        if not sep or digest != hashlib.sha256(body).hexdigest():
            self.corrupt += 1
            _log.warning("report cache file %s is corrupted (digest mismatch); removed, the report is rendered again",
                         path)
            path.unlink(missing_ok=True)
            return None
        return body

    def put(self, key: str, format: str, body: bytes) -> Path | None:
        """Write ``body`` for ``key`` atomically, then prune; None when the disk cache is off or too small."""
        if not self.enabled or len(body) > self.max_bytes:
            return None
        path = atomic_write_bytes(self.path(key, format),
                                  _MAGIC + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body)
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        files = []
        for p in self.directory.iterdir():
            if p.suffix in {".html", ".pdf"} and p.is_file():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size
