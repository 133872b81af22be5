"""In-process caches of the runtime read path: served policies as bytes, and bearer tokens.

Every replica keeps its own cache and learns about changes from the store's one-row
stamp (:class:`~exitwise.policies.db.StoreStamp`: the generation counter bumped by every
change in the same transaction, whichever replica or CLI made it, the audit chain's head
and the store identity stamped by ``exitwise db upgrade``):

- at most every ``ttl`` seconds a request reads the stamp (one primary-key read, run in
  the thread pool, one reader at a time); if it changed in any way — the counter going
  *back* after a restore or a failover to a replica that was behind included — every cached
  entry is dropped;
- each entry records the stamp read *before* its data, in the same transaction, so an
  entry loaded while a change landed is never kept past the next check, and an answer read
  from another stamp than the current one is served once but never cached;
- a change made through this replica calls :meth:`StoreCache.invalidate`, so its own next
  read re-checks at once.

Staleness bound: a change committed at time t is served by every replica to any request
that starts after t + ttl + one counter read (a primary-key read: about a millisecond on a
local database). With ttl = 0 every request reads the counter (at most one read in flight).

Policies are kept as pre-serialised JSON bytes with their ETag, so a hit costs a dict lookup
and no JSON encoding. Tokens are kept as sha256(token) -> principal (never the token) and
follow the same invalidation, so a disabled principal or rotated token stops working within
the same bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from exitwise.policies import store
from exitwise.policies.db import StoreStamp, current_stamp, unit_of_work
from exitwise.policies.errors import NotFound
from exitwise.policies.principals import Principal, authenticate, hash_token

T = TypeVar("T")
MAX_TOKENS = 10_000
MAX_POLICIES = 10_000


@dataclass(frozen=True)
class ServedPolicy:
    """One (model, environment) answer: the exact body bytes, its validators and raw headers.

    ``headers_200`` / ``headers_304`` are the ASGI headers the FastAPI route sends, built once
    so that the fast lane (:mod:`exitwise.api.fastpath`) only looks them up.
    """

    body: bytes
    etag: str
    version: int
    content_hash: str
    killed: bool
    cache_control: str = "no-cache"
    headers_200: tuple[tuple[bytes, bytes], ...] = ()
    headers_304: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def build(cls, body: bytes, *, etag: str, version: int, content_hash: str, killed: bool,
              cache_control: str) -> ServedPolicy:
        validators = ((b"etag", etag.encode("latin-1")), (b"cache-control", cache_control.encode("latin-1")))
        return cls(body=body, etag=etag, version=version, content_hash=content_hash, killed=killed,
                   cache_control=cache_control, headers_304=validators,
                   headers_200=(*validators, (b"content-length", str(len(body)).encode()),
                                (b"content-type", b"application/json")))


def policy_etag(content_hash: str, version: int, killed: bool, activated_at: datetime | None = None) -> str:
    """Strong ETag: the content hash, the version number, the kill-switch state and the activation.

    The version is included because the body carries it (a rollback to equal content under
    another number is a different body); the kill state because it changes what runtimes do;
    the activation time (microseconds, hex) because a rollback to the *same* version is a new
    activation whose body carries a new ``activated_at``.
    """
    tag = f"{content_hash}.v{version}.{'killed' if killed else 'live'}"
    if activated_at is not None:
        tag += f".a{round(activated_at.timestamp() * 1_000_000):x}"
    return f'"{tag}"'


def serialise(doc: dict) -> bytes:
    """Compact JSON in sorted-key (canonical) order, the same bytes on every replica."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class StoreCache:
    """Generation-checked caches for one engine (one per app, i.e. per worker process)."""

    def __init__(self, engine: Engine, *, ttl_ms: int, cache_control: str = "no-cache",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.ttl = ttl_ms / 1000.0
        self.cache_control = cache_control
        self._clock = clock
        self.stamp: StoreStamp | None = None
        self._checked_at = float("-inf")
        self._checking = False
        self._policies: dict[tuple[str, str], tuple[StoreStamp, ServedPolicy | NotFound]] = {}
        self._tokens: dict[str, tuple[StoreStamp, Principal]] = {}
        self.checks = 0  # stamp reads, for tests and metrics
        self.resets = 0  # times the stamp changed and everything was dropped
        self.overflows = 0  # times a cache was full and was emptied
        # lookups by the routes and the fast lane (exitwise.api.metrics); the peek_* methods count nothing
        self.policy_hits = self.policy_misses = self.token_hits = self.token_misses = 0

    @property
    def generation(self) -> int | None:
        """The store generation the cache currently describes (None before the first read)."""
        return None if self.stamp is None else self.stamp.generation

    # ---------------------------------------------------------------- generation

    def invalidate(self) -> None:
        """Make the next request re-read the generation (after a change through this replica)."""
        self._checked_at = float("-inf")

    async def refresh_generation(self) -> None:
        """Read the stamp if the last read is older than ``ttl``; drop everything if it changed.

        One read at a time: requests that arrive while it is in flight do not queue behind it
        (they are served from the cache as it stands, at most one database round trip older).
        """
        if self._checking or self._clock() - self._checked_at < self.ttl:
            return
        self._checking = True
        try:
            started = self._clock()
            stamp = await run_in_threadpool(self._read_stamp)
            self.checks += 1
            self._observe(stamp)
            self._checked_at = started
        finally:
            self._checking = False

    def _read_stamp(self) -> StoreStamp:
        with unit_of_work(self.engine, readonly=True) as session:
            return current_stamp(session)

    def _observe(self, stamp: StoreStamp) -> None:
        """Adopt ``stamp``; any difference from the current one drops every entry."""
        if stamp != self.stamp:
            if self.stamp is not None:
                self.resets += 1
            self.stamp = stamp
            self._policies.clear()
            self._tokens.clear()

    def _keep(self, stamp: StoreStamp) -> bool:
        """Whether data read at ``stamp`` may be cached.

        A newer generation of the same store is adopted at once. Any other difference (an
        older generation: a slow load that started before a change, or a store that went
        back) is not cached, and the next request re-reads the stamp.
        """
        current = self.stamp
        if current is None or (stamp.store_id == current.store_id and stamp.generation > current.generation):
            self._observe(stamp)
        if stamp == self.stamp:
            return True
        self.invalidate()
        return False

    # ---------------------------------------------------------------- hits only (the fast path)

    def peek_policy(self, model: str, env: str) -> ServedPolicy | None:
        """The cached answer for (model, env) if it is current; None on a miss or a cached 404."""
        hit = self._policies.get((model, env))
        if hit is None or hit[0] != self.stamp or isinstance(hit[1], NotFound):
            return None
        return hit[1]

    def peek_principal(self, token: str) -> Principal | None:
        """The cached principal of ``token`` if current; None on a miss."""
        hit = self._tokens.get(hash_token(token))
        if hit is None or hit[0] != self.stamp:
            return None
        return hit[1]

    def entries(self) -> tuple[int, int]:
        """How many policies and tokens are cached (for metrics)."""
        return len(self._policies), len(self._tokens)

    def fresh(self) -> bool:
        """Whether the last generation read is younger than ``ttl`` (no check is due)."""
        return self._clock() - self._checked_at < self.ttl

    # ---------------------------------------------------------------- policies

    async def active_policy(self, model: str, env: str) -> ServedPolicy:
        """The served policy for (model, env); raises the store's ``NotFound``/``InputError``."""
        await self.refresh_generation()
        key = (model, env)
        hit = self._policies.get(key)
        if hit is None or hit[0] != self.stamp:
            self.policy_misses += 1
            stamp, answer = await run_in_threadpool(self._load_active, model, env)
            if self._keep(stamp):
                if len(self._policies) >= MAX_POLICIES:
                    self.overflows += 1
                    self._policies.clear()
                self._policies[key] = (stamp, answer)
        else:
            self.policy_hits += 1
            answer = hit[1]
        if isinstance(answer, NotFound):
            raise NotFound(str(answer))
        return answer

    def _load_active(self, model: str, env: str) -> tuple[StoreStamp, ServedPolicy | NotFound]:
        """Read (stamp, answer); a missing model/activation is an answer too (cached 404)."""
        with unit_of_work(self.engine, readonly=True) as session:
            stamp = current_stamp(session)
            try:
                active = store.get_active(model, env, session=session)
            except NotFound as exc:
                return stamp, exc
        return stamp, ServedPolicy.build(
            serialise(active.served_document()),
            etag=policy_etag(active.content_hash, active.version, active.killed, active.activated_at),
            version=active.version,
            content_hash=active.content_hash,
            killed=active.killed,
            cache_control=self.cache_control,
        )

    # ---------------------------------------------------------------- tokens

    async def principal(self, token: str) -> Principal:
        """The principal for a bearer token; raises ``AuthError`` (never cached) when invalid."""
        await self.refresh_generation()
        digest = hash_token(token)
        hit = self._tokens.get(digest)
        if hit is not None and hit[0] == self.stamp:
            self.token_hits += 1
            return hit[1]
        self.token_misses += 1
        stamp, principal = await run_in_threadpool(self._load_principal, token)
        if self._keep(stamp):
            if len(self._tokens) >= MAX_TOKENS:
                self.overflows += 1
                self._tokens.clear()
            self._tokens[digest] = (stamp, principal)
        return principal

    def _load_principal(self, token: str) -> tuple[StoreStamp, Principal]:
        with unit_of_work(self.engine, readonly=True) as session:
            stamp = current_stamp(session)
            return stamp, authenticate(token, session=session)
