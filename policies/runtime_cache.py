"""The runtime client's disk copy of its last good policy (standard library only).

One JSON file per (model, environment) under the cache directory, written atomically: the
format tag, the model, the environment, the ETag, when it was fetched, the exact served bytes
and their sha256. :meth:`PolicyCacheFile.load` refuses a file of another format, model or
environment, or whose bytes do not match their digest; the client then verifies the document
and its ETag as it does a server answer (:mod:`exitwise.policies.runtime`).

This detects corruption, misconfiguration and naive edits, not a forger who can write the
cache directory: it must be writable by the runtime only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitwise.calibration.atomic import atomic_write_text

__all__ = ["CACHE_FORMAT", "CachedPolicy", "PolicyCacheFile", "default_cache_dir"]

CACHE_FORMAT = "exitwise.policy-cache/v2"


def default_cache_dir() -> Path:
    """``$EXITWISE_CACHE_DIR``, else ``$XDG_CACHE_HOME/exitwise``, else ``~/.cache/exitwise``."""
    explicit = os.environ.get("EXITWISE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is ignored
        return Path(xdg) / "exitwise"
    return Path.home() / ".cache" / "exitwise"


@dataclass(frozen=True)
class CachedPolicy:
    """What a cache file holds once its format, owner and digest are checked."""

    document: Any
    etag: str | None
    saved_at: float | None


class PolicyCacheFile:
    """The cache file of one (model, environment) in ``root``."""

    def __init__(self, root: Path, model: str, env: str) -> None:
        self.model, self.env = model, env
        self.path = root / f"{_safe_name(model)}@{_safe_name(env)}.json"

    def load(self) -> CachedPolicy | None:
        """The stored policy; None without a file; ``ValueError`` (or ``OSError``) naming why it is unusable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        saved = json.loads(raw)
        if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT:
            raise ValueError(f"not an {CACHE_FORMAT} file")
        if (saved.get("model"), saved.get("env")) != (self.model, self.env):
            raise ValueError(f"written for {_short(saved.get('model'))}@{_short(saved.get('env'))}, "
                             f"this client is {self.model!r}@{self.env!r}")
        body = str(saved.get("body")).encode("utf-8")
        if hashlib.sha256(body).hexdigest() != saved.get("body_sha256"):
            raise ValueError("body_sha256 does not match the stored body (edited or corrupted)")
        saved_at = saved.get("saved_at")
        return CachedPolicy(
            document=json.loads(body), etag=saved.get("etag"),
            saved_at=float(saved_at) if isinstance(saved_at, int | float) and not isinstance(saved_at, bool) else None)

    def save(self, body: bytes, etag: str | None, fetched_at: float) -> None:
        """Write the served bytes with their digest, owner and ETag atomically (``OSError`` on failure)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        payload = {"format": CACHE_FORMAT, "model": self.model, "env": self.env, "etag": etag,
                   "saved_at": fetched_at, "body_sha256": hashlib.sha256(body).hexdigest(),
                   "body": body.decode("utf-8")}
        atomic_write_text(self.path, json.dumps(payload, separators=(",", ":")))

    def remove(self) -> None:
        """Delete the file (a superseded or withdrawn policy must not come back at a restart)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _safe_name(value: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in value)
