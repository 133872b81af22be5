"""Rendering reports for a server: cached, single-flight, bounded and in a separate process.

A PDF report costs seconds of CPU. Rendered inside the API process it holds the GIL and starves
the policy read path, so :class:`ReportRenderer`:

- answers from the caches first (memory LRU, then disk; :mod:`~exitwise.policies.report.cache`),
  keyed by what the report shows, so each distinct report is rendered once;
- shares one render among all requests for the same key (single-flight);
- renders in a pool of ``workers`` separate processes (default 1, ``nice`` +10), so the event
  loop and the API process's GIL never wait for it;
- admits at most ``workers + queue`` distinct renders at once; a request for one more raises
  :class:`RenderBusy` (HTTP 503 with ``Retry-After``) instead of piling up.

Its state belongs to one event loop (the server's); the caches are thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from exitwise.calibration.optional import require
from exitwise.policies.errors import PolicyError
from exitwise.policies.report.cache import DiskCache, MemoryCache
from exitwise.policies.report.context import ReportContext
from exitwise.policies.report.formats import check_format

_log = logging.getLogger(__name__)
WORKER_NICE = 10


class RenderBusy(PolicyError):
    """Too many distinct reports are being rendered; retry after ``retry_after`` seconds (HTTP 503)."""

    http_status = 503
    title = "Report renderer busy"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


@dataclass(frozen=True)
class Rendered:
    """A report body and its source: ``memory``, ``disk``, ``rendered`` or ``joined`` (another request's render)."""

    body: bytes
    source: str
    key: str


def _worker_init(nice: int) -> None:
    """Runs once in each render process: lower its priority so the API process comes first."""
    if nice:
        with contextlib.suppress(OSError):  # not allowed here: render at normal priority
            os.nice(nice)


def _render_in_process(context: ReportContext, format: str) -> tuple[bytes, float]:
    """The rendered report and the seconds it took (runs in a render process)."""
    started = time.perf_counter()
    body = require("exitwise.policies.report.render", "reports", "the audit report").render(context, format)
    return body, time.perf_counter() - started


class ReportRenderer:
    """Cached, single-flight, bounded rendering in worker processes (one instance per server process)."""

    def __init__(self, cache_dir: str | os.PathLike[str], *, memory_bytes: int = 64 << 20,
                 disk_bytes: int = 512 << 20, workers: int = 1, queue: int = 2, nice: int = WORKER_NICE) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"report renderer needs workers >= 1 and queue >= 0, got workers={workers}, queue={queue}")
        self.memory = MemoryCache(memory_bytes)
        self.disk = DiskCache(Path(cache_dir), disk_bytes)
        self.workers, self.queue, self.nice = workers, queue, nice
        self.renders = 0  # renders started (each distinct key once while it stays cached)
        self.rejected = 0  # requests answered RenderBusy
        self._seconds = 10.0  # the last render's duration: the basis of Retry-After
        self._flights: dict[str, asyncio.Task[bytes]] = {}
        self._pool: ProcessPoolExecutor | None = None

    @property
    def in_flight(self) -> int:
        """Distinct renders running or queued now."""
        return len(self._flights)

    async def get(self, key: str, context: ReportContext, format: str) -> Rendered:
        """The report of ``context`` as ``format`` under ``key``, rendered only if no cache holds it.

        Raises :class:`RenderBusy` when it would have to start a render and ``workers + queue``
        renders are already in flight.
        """
        fmt = check_format(format)
        body = self.memory.get(key)
        if body is not None:
            return Rendered(body, "memory", key)
        if key in self._flights:
            return Rendered(await asyncio.shield(self._flights[key]), "joined", key)
        body = await asyncio.to_thread(self.disk.get, key, fmt)
        if body is not None:
            self.memory.put(key, body)
            return Rendered(body, "disk", key)
        if key in self._flights:  # started while this request read the disk
            return Rendered(await asyncio.shield(self._flights[key]), "joined", key)
        if len(self._flights) >= self.workers + self.queue:
            self.rejected += 1
            raise RenderBusy(f"{len(self._flights)} reports are being rendered (at most {self.workers} at a time, "
                             f"{self.queue} waiting); retry later", retry_after=self.retry_after())
        task = asyncio.get_running_loop().create_task(self._render(key, context, fmt), name=f"report-{key[:12]}")
        self._flights[key] = task
        task.add_done_callback(lambda _: self._flights.pop(key, None))
        return Rendered(await asyncio.shield(task), "rendered", key)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the last render's duration times the renders per worker ahead."""
        ahead = max(1, math.ceil(len(self._flights) / self.workers))
        return max(1, min(300, math.ceil(self._seconds * ahead)))

    async def _render(self, key: str, context: ReportContext, fmt: str) -> bytes:
        """Render in a worker process, then keep the body in memory and on disk (a disk failure is logged)."""
        self.renders += 1
        loop = asyncio.get_running_loop()
        try:
            body, seconds = await loop.run_in_executor(self._executor(), _render_in_process, context, fmt)
        except BrokenProcessPool:
            self._discard_pool()
            raise RenderBusy("the report render process stopped unexpectedly; retry",
                             retry_after=self.retry_after()) from None
        self._seconds = seconds
        self.memory.put(key, body)
        try:
            await asyncio.to_thread(self.disk.put, key, fmt, body)
        except OSError as exc:
            _log.warning("report %s not written to the disk cache %s: %s", key[:12], self.disk.directory, exc)
        return body

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:  # started on the first render: servers that never render pay nothing
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(self.nice,))
        return self._pool

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the render processes (a render in progress is abandoned: it is pure and redone on demand)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # the executor has no public handle on its processes; a render in progress would otherwise run to its end
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(timeout=5)
