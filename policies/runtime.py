"""The runtime client an inference server embeds to fetch and apply its exit policy.

Depends on numpy, httpx and the standard library only (plus :mod:`exitwise.calibration.rule`, the one
decision rule, and :mod:`exitwise.policies.canonical`, both numpy/stdlib), so a model server can embed
it without the service's dependencies (no fastapi, sqlalchemy, mlflow, pandas or scipy)::

    client = PolicyClient("http://policies:8000", "fashion-cnn", "production", token,
                          cache_dir="/var/cache/exitwise")
    client.start()                       # optional background polling; or call client.refresh()
    policy = client.policy               # an immutable snapshot, safe to use from any thread
    mask = policy.decide(k, logits_k)    # (n,) bool: which samples stop at exit k
    if policy.shadow(): ...              # also run this request at full depth and log it

Safety properties, in order of precedence:

- A policy is used only after its ``content_hash`` matches its content and it compiles with
  :meth:`exitwise.calibration.rule.CompiledPolicy.from_document`; a corrupted or malformed body is
  rejected and the previous policy is kept.
- The last good policy is kept on disk (atomic write) and reloaded at start-up, so a server
  outage, at start-up or later, never changes what the runtime does.
- With no valid policy at all (never fetched, nothing on disk, or the server says no version
  is active), every early exit is refused: the model runs at full depth.
- The kill switch is part of the served document (``"killed": true``); it makes every early
  exit refuse, exactly like the rule says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np

from exitwise.calibration.atomic import atomic_write_text
from exitwise.calibration.rule import CompiledPolicy, decide
from exitwise.policies.canonical import SCHEMA, content_hash
from exitwise.policies.names import NOT_FOUND_PROBLEM

__all__ = ["PolicyClient", "RefreshResult", "RuntimePolicy", "verify_policy_document"]

log = logging.getLogger("exitwise.runtime")

Source = Literal["server", "disk", "fallback"]
Outcome = Literal["updated", "not_modified", "unavailable", "rejected", "no_active_policy"]


class PolicyRejected(ValueError):
    """A policy body that must not be used (bad JSON, hash mismatch, wrong model, malformed)."""


def verify_policy_document(doc: Any, model: str | None = None, *, n_exits: int | None = None,
                           n_classes: int | None = None) -> CompiledPolicy:
    """Check a served policy document and compile it; raise :class:`PolicyRejected` if unusable.

    Checks: a JSON object with the v1 schema, the model asked for, a ``content_hash`` equal to
    the hash of its content (governance fields excluded, see :mod:`exitwise.policies.canonical`), a
    shape the decision rule accepts and, when given, the runtime's own number of exits and
    classes (a policy solved for another architecture is never applied).
    """
    if not isinstance(doc, dict):
        raise PolicyRejected(f"policy body is not a JSON object ({type(doc).__name__})")
    if doc.get("schema") != SCHEMA:
        raise PolicyRejected(f"policy schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    name = (doc.get("model") or {}).get("name") if isinstance(doc.get("model"), dict) else None
    if model is not None and name != model:
        raise PolicyRejected(f"policy is for model {name!r}, expected {model!r}")
    claimed = doc.get("content_hash")
    try:
        actual = content_hash(doc)
    except (TypeError, ValueError) as exc:
        raise PolicyRejected(f"policy cannot be hashed: {exc}") from None
    if claimed != actual:
        raise PolicyRejected(f"content_hash mismatch: body claims {claimed!r}, content hashes to {actual!r}")
    try:
        compiled = CompiledPolicy.from_document(doc)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PolicyRejected(f"policy does not compile: {type(exc).__name__}: {exc}") from None
    if n_exits is not None and compiled.n_exits != n_exits:
        raise PolicyRejected(f"policy has {compiled.n_exits} exits, this runtime's model has {n_exits}")
    if n_classes is not None and compiled.n_classes != n_classes:
        raise PolicyRejected(f"policy has {compiled.n_classes} classes, this runtime's model has {n_classes}")
    return compiled


@dataclass(frozen=True, eq=False)
class RuntimePolicy:
    """One verified policy (or the full-depth fallback) as the runtime applies it.

    Immutable: the client swaps whole snapshots, so a request that took ``client.policy``
    decides every exit with the same policy even if a refresh lands meanwhile.
    """

    compiled: CompiledPolicy | None
    document: Mapping[str, Any] | None
    source: Source
    etag: str | None = None
    n_exits: int | None = None  # the runtime's model, when known: the fallback's last exit answers
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def full_depth(cls, rng: random.Random | None = None, n_exits: int | None = None) -> RuntimePolicy:
        """The fallback: never exit early, no shadow traffic."""
        return cls(compiled=None, document=None, source="fallback", n_exits=n_exits, _rng=rng or random.Random())

    @property
    def is_fallback(self) -> bool:
        return self.compiled is None

    @property
    def killed(self) -> bool:
        return bool(self.compiled is not None and self.compiled.killed)

    @property
    def version(self) -> int | None:
        return None if self.document is None else self.document.get("version")

    @property
    def content_hash(self) -> str | None:
        return None if self.document is None else self.document.get("content_hash")

    @property
    def shadow_rate(self) -> float:
        if self.document is None:
            return 0.0
        return float(self.document.get("shadow_rate") or 0.0)

    def decide(
        self,
        exit_index: int,
        logits_batch: np.ndarray,
        segments: Sequence[str] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean exit mask (n,) for the exit-``exit_index`` logits (n, C) of a batch.

        Delegates to :func:`exitwise.calibration.rule.decide`. Under the fallback every early exit
        refuses: the caller runs to its last exit, which always answers (all True there when
        the client was told ``n_exits``; without it the fallback cannot tell which is last).
        """
        logits = np.asarray(logits_batch)
        if self.compiled is None:
            if logits.ndim != 2:
                raise ValueError(f"logits must have shape (n, C), got {logits.shape}")
            if self.n_exits is not None and not 0 <= exit_index < self.n_exits:
                raise ValueError(f"exit index {exit_index} out of range 0..{self.n_exits - 1}")
            last = self.n_exits is not None and exit_index == self.n_exits - 1
            return np.full(logits.shape[0], last, dtype=bool)
        return decide(self.compiled, exit_index, logits, segments)

    def shadow(self) -> bool:
        """Whether this request should also run at full depth and be logged (``shadow_rate``)."""
        rate = self.shadow_rate
        if rate <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < rate


@dataclass(frozen=True)
class RefreshResult:
    """What one poll did: ``outcome``, the HTTP status if any, and a message when it failed."""

    outcome: Outcome
    status: int | None = None
    detail: str | None = None

    @property
    def changed(self) -> bool:
        return self.outcome in ("updated", "no_active_policy")


class PolicyClient:
    """Polls ``GET /v1/models/{model}/policy?env=`` and keeps the last good policy.

    ``poll_interval`` (seconds) applies to the background thread started by :meth:`start`
    (with +-10% jitter so replicas do not poll in lock-step); :meth:`refresh` polls once, now.
    ``seed`` makes :meth:`RuntimePolicy.shadow` reproducible. ``n_exits`` / ``n_classes``
    (optional, recommended): the runtime model's shape; a policy of another shape is rejected.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        env: str,
        token: str | None,
        *,
        cache_dir: str | os.PathLike[str],
        poll_interval: float = 10.0,
        timeout: float = 5.0,
        seed: int | None = None,
        n_exits: int | None = None,
        n_classes: int | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
        self.model = model
        self.env = env
        self.poll_interval = float(poll_interval)
        self.n_exits, self.n_classes = n_exits, n_classes
        self._path = f"/v1/models/{quote(model, safe='')}/policy"
        self._cache_file = Path(cache_dir) / f"{_safe_name(model)}@{_safe_name(env)}.json"
        headers = {"Accept": "application/json", "User-Agent": "exitwise-runtime/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: RefreshResult | None = None
        self.last_success: float | None = None
        self._policy = self._load_disk() or self._fallback()

    # ------------------------------------------------------------------ public API

    @property
    def policy(self) -> RuntimePolicy:
        """The current snapshot (never None: the full-depth fallback when nothing is valid)."""
        return self._policy

    def refresh(self) -> RefreshResult:
        """Poll the server once with ``If-None-Match``; never raises for server or body problems."""
        if self._http.is_closed:
            raise RuntimeError("PolicyClient is closed")
        with self._lock:
            result = self._refresh_locked()
        self.last_result = result
        if result.outcome in ("unavailable", "rejected"):
            log.warning("exitwise policy %s@%s: %s (%s); keeping %s policy",
                        self.model, self.env, result.outcome, result.detail, self._policy.source)
        return result

    def start(self) -> PolicyClient:
        """Poll once now, then every ``poll_interval`` seconds in a daemon thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self.refresh()
            self._thread = threading.Thread(target=self._loop, name=f"exitwise-poll-{self.model}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop background polling (the current policy stays; :meth:`refresh` still works)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)  # at most one in-flight poll, bounded by the HTTP timeout
            self._thread = None

    def close(self) -> None:
        """Stop polling and close the HTTP connection pool; the client cannot poll afterwards."""
        self.stop()
        self._http.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval * (0.9 + 0.2 * random.random())):
            try:
                self.refresh()
            except Exception:  # the poller must survive anything; decisions keep the last good policy
                log.exception("exitwise policy poll failed")

    def _refresh_locked(self) -> RefreshResult:
        headers = {}
        current = self._policy
        if current.etag and current.source != "fallback":
            headers["If-None-Match"] = current.etag
        try:
            resp = self._http.get(self._path, params={"env": self.env}, headers=headers)
            body = resp.content
        except httpx.HTTPError as exc:
            return RefreshResult("unavailable", None, f"{type(exc).__name__}: {exc}")
        if resp.status_code == 304:
            self.last_success = time.time()
            return RefreshResult("not_modified", 304)
        if resp.status_code == 404 and _problem_type(resp) == NOT_FOUND_PROBLEM:
            # The server says no version is active here (or no such model): stop using any older one.
            self._policy = self._fallback()
            with contextlib.suppress(FileNotFoundError):
                self._cache_file.unlink()
            self.last_success = time.time()
            return RefreshResult("no_active_policy", 404, _problem_detail(resp))
        if resp.status_code != 200:
            return RefreshResult("unavailable", resp.status_code, _problem_detail(resp))
        try:
            doc = json.loads(body)
            compiled = self._verify(doc)
        except (ValueError, PolicyRejected) as exc:
            return RefreshResult("rejected", 200, str(exc))
        etag = resp.headers.get("etag")
        self._policy = RuntimePolicy(compiled=compiled, document=doc, source="server", etag=etag, _rng=self._rng)
        self.last_success = time.time()
        try:
            self._save_disk(doc, etag)
        except OSError as exc:  # a read-only cache dir must not stop decisions
            log.warning("exitwise: cannot write policy cache %s: %s", self._cache_file, exc)
        return RefreshResult("updated", 200)

    def _fallback(self) -> RuntimePolicy:
        return RuntimePolicy.full_depth(self._rng, self.n_exits)

    def _verify(self, doc: Any) -> CompiledPolicy:
        return verify_policy_document(doc, self.model, n_exits=self.n_exits, n_classes=self.n_classes)

    def _load_disk(self) -> RuntimePolicy | None:
        try:
            saved = json.loads(self._cache_file.read_bytes())
            doc = saved["policy"]
            compiled = self._verify(doc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, PolicyRejected) as exc:
            log.warning("exitwise: ignoring unusable policy cache %s: %s", self._cache_file, exc)
            return None
        return RuntimePolicy(compiled=compiled, document=doc, source="disk", etag=saved.get("etag"), _rng=self._rng)

    def _save_disk(self, doc: Mapping[str, Any], etag: str | None) -> None:
        """Write the cache file atomically: temp file in the same directory, fsync, rename."""
        payload = json.dumps({"etag": etag, "saved_at": time.time(), "policy": doc}, separators=(",", ":"))
        atomic_write_text(self._cache_file, payload)


def _safe_name(value: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in value)


def _problem_type(resp: httpx.Response) -> str | None:
    """The ``type`` of a problem+json answer (None otherwise, e.g. a proxy's plain 404 page)."""
    if not resp.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("type") if isinstance(body, dict) else None


def _problem_detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body.get("title") or resp.reason_phrase)
    except ValueError:
        return resp.reason_phrase
