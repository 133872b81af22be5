"""The runtime client an inference server embeds to fetch and apply its exit policy.

Depends on numpy, httpx and the standard library only (plus :mod:`exitwise.calibration.rule`, the one
decision rule, and :mod:`exitwise.policies.canonical`, both numpy/stdlib), so a model server can embed
it without the service's dependencies (no fastapi, sqlalchemy, mlflow, pandas or scipy)::

    client = PolicyClient("http://policies:8000", "fashion-cnn", "production", token)
    client.start()                       # poll now (PolicyAuthError on a refused token), then in the background
    policy = client.policy               # an immutable snapshot, safe to use from any thread
    mask = policy.decide(k, logits_k)    # (n,) bool: which samples stop at exit k (numpy or torch, any device)
    if policy.shadow():                  # also run this request at full depth and upload its exit logits:
        client.record_shadow(all_exit_logits, policy=policy)   # (K, C) or (n, K, C); never blocks
    client.status()                      # source, version, age, fallback time, failures: for health checks
    client.counters()                    # polls, refusals, rows decided/exited per exit, shadow rows

Safety properties, in order of precedence:

- A policy is used only after its ``content_hash`` matches its content, its runtime fields
  (``shadow_rate``, ``killed``, ``version``, ``environment``) are well-typed and its own, and it
  compiles with :meth:`exitwise.calibration.rule.CompiledPolicy.from_document`; a corrupted,
  malformed or oversized body (``max_body_bytes``) is rejected and the previous policy is kept.
- The last good policy is kept on disk (atomic write) and reloaded at start-up, so a server
  outage, at start-up or later, never changes what the runtime does. The cache file records
  the model, the environment, the served bytes, their sha256 and the ETag; a file that
  disagrees with any of them is ignored. That detects corruption, misconfiguration and naive
  edits, not a forger who can write the cache directory: it must be writable by the runtime only.
- With no valid policy at all (never fetched, nothing on disk, or the server says no version
  is active), every early exit is refused: the model runs at full depth.
- The kill switch is part of the served document (``"killed": true``); it makes every early
  exit refuse, exactly like the rule says.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np

from exitwise.calibration.arrays import namespace
from exitwise.calibration.rule import CompiledPolicy, decide
from exitwise.policies.names import NOT_FOUND_PROBLEM
from exitwise.policies.runtime_cache import PolicyCacheFile, default_cache_dir
from exitwise.policies.runtime_errors import PolicyAuthError, PolicyClientError, PolicyRejected
from exitwise.policies.runtime_http import problem_detail, problem_type, read_body, read_prefix
from exitwise.policies.runtime_shadow import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_ROWS,
    ShadowUploader,
)
from exitwise.policies.runtime_status import ClientStatus, ExitCounter, Outcome, Source
from exitwise.policies.runtime_verify import check_etag, short, verify_policy_document

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ClientStatus",
    "PolicyAuthError",
    "PolicyClient",
    "PolicyClientError",
    "PolicyRejected",
    "RefreshResult",
    "RuntimePolicy",
    "default_cache_dir",
    "verify_policy_document",
]

log = logging.getLogger("exitwise.runtime")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # policies are tens of KB; this only stops a runaway body
@dataclass(frozen=True, eq=False, repr=False)
class RuntimePolicy:
    """One verified policy (or the full-depth fallback) as the runtime applies it.

    Immutable: the client swaps whole snapshots, so a request that took ``client.policy``
    decides every exit with the same policy even if a refresh lands meanwhile.
    ``fetched_at``: epoch seconds when the server served this copy (for a disk copy, when it
    was served and saved); None for the fallback.
    """

    compiled: CompiledPolicy | None
    document: Mapping[str, Any] | None
    source: Source
    etag: str | None = None
    n_exits: int | None = None  # the runtime's model, when known: the fallback's last exit answers
    fetched_at: float | None = None
    _rng: random.Random = field(default_factory=random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counts: ExitCounter = field(default_factory=ExitCounter)  # a client shares one across its snapshots

    @classmethod
    def full_depth(cls, rng: random.Random | None = None, n_exits: int | None = None,
                   counts: ExitCounter | None = None) -> RuntimePolicy:
        """The fallback: never exit early, no shadow traffic."""
        return cls(compiled=None, document=None, source="fallback", n_exits=n_exits, _rng=rng or random.Random(),
                   _counts=counts or ExitCounter())

    def __repr__(self) -> str:
        digest = self.content_hash
        if isinstance(digest, str) and len(digest) > 12:
            digest = f"{digest[:12]}…"
        return (f"RuntimePolicy(source={self.source!r}, version={self.version!r}, killed={self.killed!r}, "
                f"content_hash={digest!r})")

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
        logits_batch: Any,
        segments: Sequence[str] | np.ndarray | None = None,
    ) -> Any:
        """Boolean exit mask (n,) for the exit-``exit_index`` logits (n, C) of a batch.

        Delegates to :func:`exitwise.calibration.rule.decide`: numpy logits give a numpy mask, a
        torch tensor (any device) a bool tensor on its device. Under the fallback every early exit
        refuses: the caller runs to its last exit, which always answers (all True there when
        the client was told ``n_exits``; without it the fallback cannot tell which is last).
        Counts the rows decided and stopped at ``exit_index`` (``PolicyClient.counters``; for a
        GPU tensor that count waits for the device).
        """
        o = namespace(logits_batch)
        logits = o.prepare(logits_batch)
        if self.compiled is None:
            if len(logits.shape) != 2:
                raise ValueError(f"logits must have shape (n, C), got {tuple(logits.shape)}")
            if self.n_exits is not None and not 0 <= exit_index < self.n_exits:
                raise ValueError(f"exit index {exit_index} out of range 0..{self.n_exits - 1}")
            last = self.n_exits is not None and exit_index == self.n_exits - 1
            mask = o.full_bool(logits.shape[0], last, logits)
        else:
            mask = decide(self.compiled, exit_index, logits, segments)
        self._counts.add(exit_index, int(mask.shape[0]), o.count_true(mask))
        return mask

    def shadow(self) -> bool:
        """Whether this request should also run at full depth and be logged (``shadow_rate``)."""
        rate = self.shadow_rate
        if rate <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < rate


@dataclass(frozen=True)
class RefreshResult:
    """What one poll did: ``outcome``, the HTTP status if any, a message when it failed and,
    for a rejected body, a short ``reason`` code (``too_large``, ``hash``, ``field``, ...)."""

    outcome: Outcome
    status: int | None = None
    detail: str | None = None
    reason: str | None = None

    @property
    def changed(self) -> bool:
        return self.outcome in ("updated", "no_active_policy")


class PolicyClient:
    """Polls ``GET /v1/models/{model}/policy?env=`` and keeps the last good policy.

    ``cache_dir``: where the last good policy is kept; None (default) is
    :func:`default_cache_dir`, False disables the disk cache (a restart then runs at full depth
    until the server answers). ``poll_interval`` (seconds) applies to the background thread
    started by :meth:`start` (with +-10% jitter so replicas do not poll in lock-step);
    :meth:`refresh` polls once, now. ``seed`` makes :meth:`RuntimePolicy.shadow` reproducible.
    ``n_exits`` / ``n_classes`` (optional, recommended): the runtime model's shape; a policy of
    another shape is rejected. ``max_body_bytes``: a larger answer is rejected without being
    read past the limit. ``fallback_alarm_after`` (seconds, None for never): once the client
    has run at full depth that long, every poll logs an ERROR saying so.

    ``shadow_*``: the :class:`~exitwise.policies.runtime_shadow.ShadowUploader` that uploads
    :meth:`record_shadow`'s rows with this token (an author's); ``shadow_upload=False`` drops them.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        env: str,
        token: str | None,
        *,
        cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
        poll_interval: float = 10.0,
        timeout: float = 5.0,
        seed: int | None = None,
        n_exits: int | None = None,
        n_classes: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        fallback_alarm_after: float | None = 300.0,
        shadow_upload: bool = True,
        shadow_max_rows: int = DEFAULT_MAX_ROWS,
        shadow_batch_rows: int = DEFAULT_BATCH_ROWS,
        shadow_flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
        if fallback_alarm_after is not None and not fallback_alarm_after >= 0:
            raise ValueError(f"fallback_alarm_after must be >= 0 seconds or None, got {fallback_alarm_after!r}")
        if cache_dir is True:
            raise ValueError("cache_dir=True is not a directory: pass a path, None (the default directory) "
                             "or False (no disk cache)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.env = env
        self.poll_interval = float(poll_interval)
        self.n_exits, self.n_classes = n_exits, n_classes
        self.max_body_bytes = max_body_bytes
        self.fallback_alarm_after = fallback_alarm_after
        self._path = f"/v1/models/{quote(model, safe='')}/policy"
        self._shadow = ShadowUploader(self.base_url, model, env, token, upload=shadow_upload, timeout=timeout,
                                      max_rows=shadow_max_rows, batch_rows=shadow_batch_rows,
                                      flush_interval=shadow_flush_interval, n_exits=n_exits, n_classes=n_classes)
        self._exit_counts = ExitCounter()  # shared by every snapshot this client installs
        self._cache: PolicyCacheFile | None = None
        if cache_dir is not False:
            self._cache = PolicyCacheFile(default_cache_dir() if cache_dir is None else Path(cache_dir), model, env)
        # identity: the body is read raw, so max_body_bytes bounds what is held (no decompression bomb)
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "exitwise-runtime/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # one poll at a time
        self._state_lock = threading.Lock()  # the policy, the last result and the counters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: RefreshResult | None = None
        self.last_success: float | None = None
        self._failures = 0
        self._polls: Counter[str] = Counter()
        self._refusals: Counter[str] = Counter()
        self._fallback_since: tuple[float, float] | None = None  # (epoch, monotonic)
        self._policy = self._fallback()
        self._install(self._load_disk() or self._fallback())

    # ------------------------------------------------------------------ public API

    @property
    def policy(self) -> RuntimePolicy:
        """The current snapshot (never None: the full-depth fallback when nothing is valid)."""
        return self._policy

    @property
    def cache_file(self) -> Path | None:
        """The file the last good policy is kept in (None: the disk cache is off)."""
        return None if self._cache is None else self._cache.path

    def refresh(self) -> RefreshResult:
        """Poll the server once with ``If-None-Match``; never raises for server or body problems."""
        if self._http.is_closed:
            raise RuntimeError("PolicyClient is closed")
        with self._lock:
            result = self._refresh_locked()
        with self._state_lock:
            self.last_result = result
            self._polls[result.outcome] += 1
            if result.outcome in ("unavailable", "unauthorized", "rejected"):
                self._failures += 1
            else:
                self._failures = 0
                self.last_success = time.time()
            if result.outcome == "rejected":
                self._refusals[result.reason or "invalid"] += 1
        self._log(result)
        return result

    def start(self) -> PolicyClient:
        """Poll once now, then every ``poll_interval`` seconds in a daemon thread.

        Raises :class:`PolicyAuthError` when the server refuses the token (401/403) and the
        client has no policy to keep (nothing valid on disk): a wrong token must not leave the
        runtime at full depth unnoticed. With a disk policy it logs an ERROR and keeps that.
        """
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            result = self.refresh()
            if result.outcome == "unauthorized" and self._policy.is_fallback:
                raise PolicyAuthError(
                    f"policy server {self.base_url} refused the token for {self.model}@{self.env} "
                    f"(HTTP {result.status}: {result.detail}) and no cached policy exists; check the token "
                    "(a reader's, from `exitwise principal add NAME --role reader`)", result.status)
            self._thread = threading.Thread(target=self._loop, name=f"exitwise-poll-{self.model}", daemon=True)
            self._thread.start()
        self._shadow.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop polling (the policy stays) and upload the shadow rows held, for at most ``timeout``
        seconds plus one HTTP timeout; True when none are left."""
        self._stop_polling()
        return self._shadow.stop(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """:meth:`stop`, drop the shadow rows still held and close the connections; no thread is left."""
        self._stop_polling()
        self._shadow.close(timeout)
        self._http.close()

    def record_shadow(
        self,
        logits: Any,
        *,
        policy: RuntimePolicy | None = None,
        segments: Mapping[str, Any] | None = None,
        labels: Any = None,
        request_ids: Any = None,
    ) -> int:
        """Keep all exits' logits of shadow requests, (K, C) or (n, K, C), for upload; return the rows kept.

        Filed under the version of ``policy``, the snapshot that decided them (default: the
        current one; the fallback's rows are dropped, counted). Never waits on the network; see
        :meth:`~exitwise.policies.runtime_shadow.ShadowUploader.record` for the other arguments.
        """
        snapshot = self._policy if policy is None else policy
        if not isinstance(snapshot, RuntimePolicy):
            raise TypeError(f"policy must be a RuntimePolicy snapshot, got {type(snapshot).__name__}")
        compiled = snapshot.compiled
        return self._shadow.record(logits, version=snapshot.version, segments=segments, labels=labels,
                                   request_ids=request_ids,
                                   shape=None if compiled is None else (compiled.n_exits, compiled.n_outputs))

    def flush_shadow(self, timeout: float = 10.0) -> bool:
        """Upload the shadow rows recorded so far, now, in this thread; True when none is left."""
        return self._shadow.flush(timeout)

    def status(self) -> ClientStatus:
        """A consistent snapshot of the policy in use, its age, the fallback time and the last poll."""
        with self._state_lock:
            policy, since, result = self._policy, self._fallback_since, self.last_result
            failures, success = self._failures, self.last_success
        return ClientStatus(
            source=policy.source, version=policy.version, killed=policy.killed, content_hash=policy.content_hash,
            policy_age_s=None if policy.fetched_at is None else max(0.0, time.time() - policy.fetched_at),
            on_fallback_since=None if since is None else since[0],
            last_outcome=None if result is None else result.outcome,
            last_status=None if result is None else result.status,
            last_detail=None if result is None else result.detail,
            last_success=success, consecutive_failures=failures,
            fallback_alarm=self._alarm_due() is not None,
            shadow_pending=self._shadow.pending, shadow_last_error=self._shadow.last_error,
        )

    def counters(self) -> dict[str, dict[str, int] | dict[int, int]]:
        """Totals since construction: ``polls`` by outcome, ``refusals`` (rejected bodies) by reason,
        ``decided`` / ``exited``: rows decided and stopped per exit index, ``shadow``: shadow rows
        (:data:`~exitwise.policies.runtime_shadow.SHADOW_COUNTERS` and ``pending``)."""
        with self._state_lock:
            polls, refusals = dict(self._polls), dict(self._refusals)
        decided, exited = self._exit_counts.snapshot()
        return {"polls": polls, "refusals": refusals, "decided": decided, "exited": exited,
                "shadow": self._shadow.counters()}

    def __repr__(self) -> str:
        return f"PolicyClient({self.base_url!r}, model={self.model!r}, env={self.env!r}, policy={self._policy!r})"

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _stop_polling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)  # at most one in-flight poll, bounded by the HTTP timeout
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval * (0.9 + 0.2 * random.random())):
            try:
                self.refresh()
            except Exception:  # the poller must survive anything; decisions keep the last good policy
                log.exception("exitwise policy poll failed")

    def _log(self, result: RefreshResult) -> None:
        where, kept = f"{self.model}@{self.env}", self._policy.source
        if result.outcome == "unauthorized":
            log.error("exitwise policy %s: the server %s refused the token (HTTP %s: %s); keeping the %s policy "
                      "until the token is fixed", where, self.base_url, result.status, result.detail, kept)
        elif result.outcome in ("unavailable", "rejected"):
            log.warning("exitwise policy %s: %s (%s); keeping the %s policy", where, result.outcome, result.detail,
                        kept)
        waited = self._alarm_due()
        if waited is not None:
            log.error("exitwise policy %s: FULL DEPTH for %.0f s (fallback_alarm_after=%g s): no early exit is "
                      "taken; last poll: %s (%s)", where, waited, self.fallback_alarm_after, result.outcome,
                      result.detail or result.status)

    def _alarm_due(self) -> float | None:
        """Seconds on the fallback (monotonic clock) once they reach ``fallback_alarm_after``, else None."""
        since, after = self._fallback_since, self.fallback_alarm_after
        waited = None if since is None else time.monotonic() - since[1]
        return waited if waited is not None and after is not None and waited >= after else None

    def _install(self, policy: RuntimePolicy) -> None:
        with self._state_lock:
            if not policy.is_fallback:
                self._fallback_since = None
            elif self._fallback_since is None:
                self._fallback_since = (time.time(), time.monotonic())
            self._policy = policy

    def _refresh_locked(self) -> RefreshResult:
        headers = {}
        current = self._policy
        if current.etag and current.source != "fallback":
            headers["If-None-Match"] = current.etag
        try:
            with self._http.stream("GET", self._path, params={"env": self.env}, headers=headers) as resp:
                status, resp_headers = resp.status_code, resp.headers
                body = read_body(resp, self.max_body_bytes) if status == 200 else read_prefix(resp)
        except PolicyRejected as exc:
            return RefreshResult("rejected", 200, str(exc), exc.reason)
        except httpx.HTTPError as exc:
            return RefreshResult("unavailable", None, f"{type(exc).__name__}: {exc}")
        if status == 304:
            return RefreshResult("not_modified", 304)
        if status in (401, 403):
            return RefreshResult("unauthorized", status, problem_detail(resp_headers, body, resp.reason_phrase))
        if status == 404 and problem_type(resp_headers, body) == NOT_FOUND_PROBLEM:
            # The server says no version is active here (or no such model): stop using any older one.
            self._install(self._fallback())
            if self._cache is not None:
                self._cache.remove()
            return RefreshResult("no_active_policy", 404, problem_detail(resp_headers, body, resp.reason_phrase))
        if status != 200:
            return RefreshResult("unavailable", status, problem_detail(resp_headers, body, resp.reason_phrase))
        try:
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            return RefreshResult("rejected", 200, f"policy body is not UTF-8 JSON: {type(exc).__name__}: {exc}",
                                 "json")
        etag = resp_headers.get("etag")
        try:
            compiled = self._verify(doc)
            exitwise_etag = check_etag(etag, doc)
        except PolicyRejected as exc:
            return RefreshResult("rejected", 200, str(exc), exc.reason)
        fetched_at = time.time()
        self._install(RuntimePolicy(compiled=compiled, document=doc, source="server", etag=etag,
                                    n_exits=self.n_exits, fetched_at=fetched_at, _rng=self._rng,
                                    _counts=self._exit_counts))
        self._save_disk(body, etag, fetched_at, exitwise_etag)
        return RefreshResult("updated", 200)

    def _fallback(self) -> RuntimePolicy:
        return RuntimePolicy.full_depth(self._rng, self.n_exits, self._exit_counts)

    def _verify(self, doc: Any) -> CompiledPolicy:
        return verify_policy_document(doc, self.model, env=self.env, n_exits=self.n_exits, n_classes=self.n_classes)

    def _load_disk(self) -> RuntimePolicy | None:
        """The cached policy, or None (with a warning naming the reason when the file is unusable)."""
        if self._cache is None:
            return None
        try:
            cached = self._cache.load()
            if cached is None:
                return None
            compiled = self._verify(cached.document)
            if not check_etag(cached.etag, cached.document):
                raise PolicyRejected(f"stored ETag {short(cached.etag)} is not an exitwise policy ETag", "etag")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning("exitwise: ignoring the policy cache %s: %s; full depth until the server answers",
                        self._cache.path, exc)
            return None
        return RuntimePolicy(compiled=compiled, document=cached.document, source="disk", etag=cached.etag,
                             n_exits=self.n_exits, fetched_at=cached.saved_at, _rng=self._rng,
                             _counts=self._exit_counts)

    def _save_disk(self, body: bytes, etag: str | None, fetched_at: float, exitwise_etag: bool) -> None:
        """Keep the served bytes on disk; never raises.

        A body served without an exitwise ETag could not be checked at load, so it is not kept
        (and an older copy is removed: a restart must not bring back a superseded policy).
        """
        if self._cache is None:
            return
        try:
            if not exitwise_etag:
                log.warning("exitwise: not caching the policy of %s@%s: the answer has no exitwise ETag (%s)",
                            self.model, self.env, short(etag))
                self._cache.remove()
                return
            self._cache.save(body, etag, fetched_at)
        except OSError as exc:  # a read-only cache dir must not stop decisions
            log.warning("exitwise: cannot write the policy cache %s: %s", self._cache.path, exc)
