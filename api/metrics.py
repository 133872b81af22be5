"""Prometheus metrics of one app, served as ``GET /metrics`` (text exposition format 0.0.4).

Everything is kept in the app's own ``CollectorRegistry`` (never prometheus-client's global
one: tests build many apps in one process, and two apps must not share counters). Three
sources feed it:

- :class:`HttpMetrics`, called by :class:`exitwise.api.app.ExitwiseAPI` around *both* the
  raw-ASGI fast lane and FastAPI, counts every answer by method, route template (the
  route's path pattern, never the raw path; ``other`` when no route matched) and status,
  and times it by route template, with plain integers turned into metric families at
  scrape time (the hot path takes no lock).
- :class:`CacheCollector` reads the replica's cache counters at scrape time
  (:class:`~exitwise.api.cache.StoreCache` counts hits and misses as plain integers).
- :class:`MonitorCollector` reads the monitoring verdicts of the store
  (:func:`exitwise.policies.monitoring.recorded_verdicts`) at scrape time, in one read-only
  unit of work, at most once per ``store_ttl_s``; a failed read answers
  ``exitwise_metrics_store_up 0`` instead of failing the scrape.

Counters are per process: with ``exitwise serve --workers N`` a scrape sees one worker's.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine
from starlette.types import Message, Receive, Scope, Send

from exitwise.api.cache import StoreCache
from exitwise.api.deps import CacheDep, Credentials, SettingsDep, require_cached
from exitwise.api.fastpath import FastPolicyLane
from exitwise.api.problems import problem_responses
from exitwise.policies.db import unit_of_work
from exitwise.policies.models import VERDICTS
from exitwise.policies.monitoring import RecordedVerdict, recorded_verdicts

log = logging.getLogger("exitwise.api.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
FAST_LANE_ROUTE = "/v1/models/{model}/policy"  # the route the fast lane answers for (a test checks it)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_SEGMENTS = 100  # segment series per model (bounded cardinality)
STORE_TTL_S = 1.0   # the monitoring read is reused this long: scrapes cannot hammer the database

# segment field of recorded_verdicts -> metric name and help
SEGMENT_GAUGES = (
    ("lower", "exitwise_monitor_risk_lower", "Lower end of the segment's anytime-valid risk interval"),
    ("upper", "exitwise_monitor_risk_upper", "Upper end of the segment's anytime-valid risk interval"),
    ("eps", "exitwise_monitor_risk_eps", "The segment's risk budget eps (breach when the lower end passes it)"),
    ("risk", "exitwise_monitor_risk_observed", "Observed risk on the shadow rows (losses / rows)"),
    ("n", "exitwise_monitor_shadow_rows", "Shadow rows of the assessed version in the segment"),
    ("e_value", "exitwise_monitor_evalue",
     "E-value of the evidence that the risk is over eps (a breach once it reaches 1/delta)"),
)

Answer = Callable[[Scope, Receive, Send], Awaitable[bool]]


class HttpMetrics:
    """Requests by method, route template and status; latency by route template; 304s by route.

    Counted with plain integers on the event loop (no locks: only the loop writes) and turned
    into metric families at scrape time, so an answer costs two dictionary updates and a bisect.
    """

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, list[float]] = {}  # route -> per-bucket counts (+Inf last), then the sum

    async def __call__(self, scope: Scope, receive: Receive, send: Send, answer: Answer) -> None:
        """Run ``answer`` (True when the fast lane answered) and record what it sent."""
        status = 500  # nothing sent: the app failed (or the client went away) before answering

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        fast = False
        try:
            fast = await answer(scope, receive, observed_send)
        finally:
            self.observe(scope, status, time.perf_counter() - started, fast=fast)

    def observe(self, scope: Scope, status: int, seconds: float, *, fast: bool = False) -> None:
        """Count one answer. The route is the matched route's template (``scope["route"]``)."""
        if fast:
            route = FAST_LANE_ROUTE
        else:
            route = getattr(scope.get("route"), "path", None) or OTHER
        method = scope["method"]
        if method not in METHODS:
            method = OTHER
        key = (method, route, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        timing = self._latency.get(route)
        if timing is None:
            timing = self._latency[route] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        timing[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        timing[-1] += seconds

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("exitwise_http_requests", "HTTP answers by method, route template and status",
                                       labels=("method", "route", "status"))
        not_modified = CounterMetricFamily("exitwise_http_not_modified",
                                           "304 Not Modified answers (If-None-Match matched)", labels=("route",))
        latency = HistogramMetricFamily("exitwise_http_request_duration_seconds",
                                        "Time from the request to the end of the answer, by route template",
                                        labels=("route",))
        answers_304: dict[str, int] = {}
        for (method, route, status), n in sorted(dict(self._requests).items()):  # dict(): one atomic copy
            requests.add_metric((method, route, str(status)), n)
            if status == 304:
                answers_304[route] = answers_304.get(route, 0) + n
        for route, n in answers_304.items():
            not_modified.add_metric((route,), n)
        bounds = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]
        for route, timing in sorted(dict(self._latency).items()):
            counts = list(timing)  # one consistent copy of the buckets and the sum
            latency.add_metric((route,), list(zip(bounds, accumulate(counts[:-1]), strict=True)),
                               sum_value=counts[-1])
        return [requests, not_modified, latency]


class CacheCollector:
    """The replica's cache counters, read at scrape time (the cache counts with plain integers)."""

    def __init__(self, cache: StoreCache, lane: FastPolicyLane | None) -> None:
        self.cache = cache
        self.lane = lane

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        c = self.cache
        hits = CounterMetricFamily("exitwise_cache_hits", "Lookups answered from the replica's cache",
                                   labels=("cache",))
        misses = CounterMetricFamily("exitwise_cache_misses", "Lookups that read the database", labels=("cache",))
        entries = GaugeMetricFamily("exitwise_cache_entries", "Entries in the replica's cache", labels=("cache",))
        policies, tokens = c.entries()
        for name, hit, miss, size in (("policy", c.policy_hits, c.policy_misses, policies),
                                      ("token", c.token_hits, c.token_misses, tokens)):
            hits.add_metric((name,), hit)
            misses.add_metric((name,), miss)
            entries.add_metric((name,), size)
        drops = CounterMetricFamily("exitwise_cache_drops", "Times the cache was emptied: the store's stamp "
                                    "changed (stamp) or a cache was full (full)", labels=("reason",))
        drops.add_metric(("stamp",), c.resets)
        drops.add_metric(("full",), c.overflows)
        yield from (hits, misses, entries, drops)
        yield CounterMetricFamily("exitwise_cache_stamp_reads", "Reads of the store's generation stamp",
                                  value=c.checks)
        generation = c.generation
        if generation is not None:
            yield GaugeMetricFamily("exitwise_store_generation",
                                    "Generation of the store stamp this replica's cache last read", value=generation)
        if self.lane is not None:
            yield CounterMetricFamily("exitwise_fast_lane_answers",
                                      "Policy polls answered by the raw-ASGI fast lane", value=self.lane.hits)


class MonitorCollector:
    """The monitoring verdicts and risk bounds of the store, read at scrape time (at most every ``ttl_s``)."""

    def __init__(self, engine: Engine, *, ttl_s: float = STORE_TTL_S, max_segments: int = MAX_SEGMENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self.max_segments = max_segments
        self.reads = 0  # database reads, for tests
        self._clock = clock
        self._lock = threading.Lock()  # one read at a time; concurrent scrapes wait and reuse it
        self._read_at = float("-inf")
        self._families: list[Metric] = []

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("exitwise_metrics_store_up", "")]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._clock() - self._read_at >= self.ttl_s:
                self._families = self._read()
                self._read_at = self._clock()
            return list(self._families)

    def _read(self) -> list[Metric]:
        self.reads += 1
        up = GaugeMetricFamily("exitwise_metrics_store_up",
                               "1 when the monitoring verdicts were read from the store, 0 when that failed")
        try:
            with unit_of_work(self.engine, readonly=True) as session:
                verdicts = recorded_verdicts(session=session)
        except Exception:  # a scrape must answer even when the database does not
            log.warning("metrics: could not read the monitoring verdicts from the store", exc_info=True)
            up.add_metric((), 0)
            return [up]
        up.add_metric((), 1)
        return [up, *monitor_families(verdicts, max_segments=self.max_segments)]


def monitor_families(verdicts: Sequence[RecordedVerdict], *, max_segments: int = MAX_SEGMENTS) -> list[Metric]:
    """The ``exitwise_monitor_*`` families of ``recorded_verdicts`` (at most ``max_segments`` segments per model)."""
    pair = ("model", "environment")
    verdict = GaugeMetricFamily("exitwise_monitor_verdict", "1 for the recorded verdict of (model, environment), "
                                "0 for the other states", labels=(*pair, "verdict"))
    version = GaugeMetricFamily("exitwise_monitor_version", "The version the verdict is about", labels=pair)
    auto_kill = GaugeMetricFamily("exitwise_monitor_auto_kill", "1 when a breach trips the kill switch automatically",
                                  labels=pair)
    omitted = GaugeMetricFamily("exitwise_monitor_segments_omitted",
                                f"Segments of the model left out of the segment series (more than {max_segments})",
                                labels=("model",))
    gauges = [GaugeMetricFamily(name, doc, labels=(*pair, "segment")) for _, name, doc in SEGMENT_GAUGES]
    kept: dict[str, set[str]] = {}
    dropped: dict[str, set[str]] = {}
    for v in verdicts:
        labels = (v.model, v.environment)
        for state in VERDICTS:
            verdict.add_metric((*labels, state), 1.0 if v.verdict == state else 0.0)
        if v.version is not None:
            version.add_metric(labels, v.version)
        auto_kill.add_metric(labels, 1.0 if v.auto_kill else 0.0)
        names = kept.setdefault(v.model, set())
        for segment, fields in v.segments.items():
            if segment not in names:
                if len(names) >= max_segments:
                    dropped.setdefault(v.model, set()).add(segment)
                    continue
                names.add(segment)
            _add_segment(gauges, (*labels, segment), fields)
    for model in kept:
        omitted.add_metric((model,), len(dropped.get(model, ())))
    return [verdict, version, auto_kill, *gauges, omitted]


def _add_segment(gauges: Sequence[GaugeMetricFamily], labels: tuple[str, str, str], fields: Mapping[str, Any]) -> None:
    """One sample per numeric field; a missing or null one (e.g. no labels: no observed risk) is left out."""
    for gauge, (key, _, _) in zip(gauges, SEGMENT_GAUGES, strict=True):
        value = fields.get(key) if isinstance(fields, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            gauge.add_metric(labels, float(value))


class AppMetrics:
    """The registry of one app and what feeds it (see the module docstring)."""

    def __init__(self, cache: StoreCache, engine: Engine, lane: FastPolicyLane | None, *,
                 store_ttl_s: float = STORE_TTL_S, max_segments: int = MAX_SEGMENTS) -> None:
        self.registry = CollectorRegistry()
        self.http = HttpMetrics()
        self.registry.register(self.http)
        self.registry.register(CacheCollector(cache, lane))
        self.monitor = MonitorCollector(engine, ttl_s=store_ttl_s, max_segments=max_segments)
        self.registry.register(self.monitor)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the route

_reader = require_cached("reader")


async def metrics_access(credentials: Credentials, cache: CacheDep, settings: SettingsDep) -> None:
    """A reader's token, unless ``EXITWISE_METRICS_PUBLIC`` is set."""
    if not settings.metrics_public:
        await _reader(credentials, cache)


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics: requests, caches, monitoring verdicts and risk bounds (reader, or public with "
            "EXITWISE_METRICS_PUBLIC)",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition format 0.0.4",
                     "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
               **problem_responses(401)},
)
def metrics(request: Request, _access: Annotated[None, Depends(metrics_access)]) -> Response:
    # a plain function: FastAPI runs it in the thread pool, where the monitoring read may block
    return Response(request.app.metrics.exposition(), media_type=CONTENT_TYPE)
