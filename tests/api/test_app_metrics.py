"""``GET /metrics``: access, request and cache counters (fast lane included), the generation gauge
and the monitoring verdicts and risk bounds read from the store, on SQLite and PostgreSQL.

Exposition text is read back with prometheus-client's own parser, so what is checked is what a
Prometheus server would ingest.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from exitwise.api.app import create_app
from exitwise.api.metrics import STORE_TTL_S, HttpMetrics, MonitorCollector, monitor_families
from exitwise.policies import monitoring
from exitwise.policies.db import current_stamp, make_engine, unit_of_work
from exitwise.policies.models import VERDICTS
from exitwise.policies.monitoring import RecordedVerdict
from exitwise.policies.principals import get_principal

POLICY_ROUTE = "/v1/models/{model}/policy"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    """{(sample name, sorted labels): value} of an exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client: httpx.Client, world: Any, who: str | None = "rita") -> Samples:
    resp = client.get("/metrics", headers=world.auth(who))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples_of(resp.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def shadow_npz(n: int, *, agree: bool, seed: int = 0) -> bytes:
    """Full-depth exit logs for the ``make_doc`` policy (3 exits, 4 classes, segment key ``capture``).

    ``agree``: every exit is confident in the same class (no disagreement: verdict ok); otherwise
    random logits (early exits disagree with the final one: breach).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    if agree:
        logits = np.zeros((n, 3, 4), np.float32)
        logits[np.arange(n), :, labels] = 12.0
    else:
        logits = (3 * rng.normal(size=(n, 3, 4))).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, logits=logits, labels=labels, seg_capture=np.array(["studio", "phone"] * (n // 2)))
    return buf.getvalue()


def ingest(world: Any, model: str, body: bytes) -> monitoring.IngestResult:
    """Upload shadow logs through the monitoring service, as alice (an author)."""
    with unit_of_work(world.engine) as s:
        return monitoring.ingest(model, "production", body, "application/x-npz",
                                 principal=get_principal("alice", session=s), session=s)


# ---------------------------------------------------------------- access


def test_metrics_need_a_reader_token(api: httpx.Client, world: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, world.auth("dora")):
        resp = api.get("/metrics", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    samples = scrape(api, world, "rita")
    assert value(samples, "exitwise_metrics_store_up") == 1.0


def test_public_metrics_answer_without_a_token(world: Any, make_settings: Callable[..., Any],
                                               start_live_server: Callable[..., Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(make_settings(metrics_public=True), engine=world.engine)) as client:
        assert value(scrape(client, world, None), "exitwise_metrics_store_up") == 1.0
        assert client.get("/v1/models").status_code == 401  # only /metrics is public
    monkeypatch.setenv("EXITWISE_METRICS_PUBLIC", "true")
    server = start_live_server()
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert value(scrape(client, world, None), "exitwise_metrics_store_up") == 1.0


# ---------------------------------------------------------------- requests and caches


def test_requests_304s_and_cache_hits_are_counted_on_both_lanes(api: httpx.Client, world: Any,
                                                                make_doc: Callable[..., dict]) -> None:
    m = world.model("metered")
    world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
    before = scrape(api, world)
    url, auth = f"/v1/models/{m}/policy", world.auth("rita")
    first = api.get(url, headers=auth)  # a cache miss: answered by FastAPI
    assert first.status_code == 200
    assert api.get(url, headers=auth).status_code == 200
    assert api.get(url, headers={**auth, "If-None-Match": first.headers["etag"]}).status_code == 304
    assert api.get(f"/v1/models/{m}/versions/1", headers=auth).status_code == 200
    assert api.get("/no/such/route/1234", headers=auth).status_code == 404
    after = scrape(api, world)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "exitwise_http_requests_total"
    # the fast lane's answers are counted under the route's template, like FastAPI's
    assert moved(requests, method="GET", route=POLICY_ROUTE, status="200") == 2
    assert moved(requests, method="GET", route=POLICY_ROUTE, status="304") == 1
    assert moved("exitwise_http_not_modified_total", route=POLICY_ROUTE) == 1
    assert moved("exitwise_http_request_duration_seconds_count", route=POLICY_ROUTE) == 3
    assert moved(requests, method="GET", route="/v1/models/{model}/versions/{version}", status="200") == 1
    assert moved(requests, method="GET", route="other", status="404") == 1
    assert moved(requests, method="GET", route="/metrics", status="200") == 1  # the first scrape
    assert not any(dict(labels).get("route", "").startswith(("/no/", f"/v1/models/{m}"))
                   for _, labels in after), "raw paths must never become label values"
    assert moved("exitwise_fast_lane_answers_total") >= 1
    assert moved("exitwise_cache_misses_total", cache="policy") >= 1  # the first poll
    assert moved("exitwise_cache_hits_total", cache="policy") >= 2  # the next two
    assert moved("exitwise_cache_hits_total", cache="token") >= 2
    assert value(after, "exitwise_cache_entries", cache="policy") >= 1


def test_the_generation_gauge_follows_a_change(api: httpx.Client, world: Any, make_doc: Callable[..., dict]) -> None:
    m = world.model("generation")
    world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
    before = value(scrape(api, world), "exitwise_store_generation")
    assert api.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "metrics test"},
                    headers=world.auth("alice")).status_code == 200
    after = value(scrape(api, world), "exitwise_store_generation")  # the scrape's token check reads the stamp
    with unit_of_work(world.engine, readonly=True) as s:
        generation = current_stamp(s).generation
    assert after == generation > before


def test_each_app_has_its_own_registry(world: Any, make_settings: Callable[..., Any]) -> None:
    with TestClient(create_app(make_settings(), engine=world.engine)) as one, \
            TestClient(create_app(make_settings(), engine=world.engine)) as two:
        for _ in range(3):
            one.get("/healthz")
        one.request("BREW", "/healthz")
        counts = scrape(one, world)
        assert value(counts, "exitwise_http_requests_total", method="GET", route="/healthz", status="200") == 3
        assert value(counts, "exitwise_http_requests_total", method="other", route="/healthz", status="405") == 1
        assert value(scrape(two, world), "exitwise_http_requests_total", method="GET", route="/healthz",
                     status="200") == 0


# ---------------------------------------------------------------- monitoring verdicts


def test_verdicts_and_risk_bounds_of_the_monitoring_service(api: httpx.Client, world: Any,
                                                           make_doc: Callable[..., dict]) -> None:
    breach, ok = world.model("breach"), world.model("calm")
    for m in (breach, ok):
        world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
    results = {breach: ingest(world, breach, shadow_npz(500, agree=False)),
               ok: ingest(world, ok, shadow_npz(2000, agree=True))}
    assert {r.verdict for r in results.values()} == {"breach", "ok"}
    time.sleep(STORE_TTL_S + 0.1)  # past the collector's reuse of its last read
    samples = scrape(api, world)
    assert value(samples, "exitwise_metrics_store_up") == 1.0
    with unit_of_work(world.engine, readonly=True) as s:
        recorded = {v.model: v for v in monitoring.recorded_verdicts(session=s) if v.model in results}
    for m, result in results.items():
        pair = {"model": m, "environment": "production"}
        assert [value(samples, "exitwise_monitor_verdict", **pair, verdict=state) for state in VERDICTS] == \
            [1.0 if state == result.verdict else 0.0 for state in VERDICTS]
        assert value(samples, "exitwise_monitor_version", **pair) == 1
        assert ("exitwise_monitor_auto_kill", tuple(sorted(pair.items()))) in samples
        assert value(samples, "exitwise_monitor_auto_kill", **pair) == 0
        segments = recorded[m].segments
        assert set(segments) == {"__all__", "studio"}
        for segment, fields in segments.items():
            labels = {**pair, "segment": segment}
            assert value(samples, "exitwise_monitor_risk_lower", **labels) == pytest.approx(fields["lower"])
            assert value(samples, "exitwise_monitor_risk_upper", **labels) == pytest.approx(fields["upper"])
            assert value(samples, "exitwise_monitor_risk_eps", **labels) == pytest.approx(fields["eps"])
            assert value(samples, "exitwise_monitor_risk_observed", **labels) == pytest.approx(fields["risk"])
            assert value(samples, "exitwise_monitor_shadow_rows", **labels) == fields["n"]
            assert value(samples, "exitwise_monitor_evalue", **labels) == pytest.approx(fields["e_value"])
        assert value(samples, "exitwise_monitor_segments_omitted", model=m) == 0
    high = {"model": breach, "environment": "production", "segment": "studio"}
    assert value(samples, "exitwise_monitor_risk_lower", **high) > value(samples, "exitwise_monitor_risk_eps", **high)

    with unit_of_work(world.engine) as s:
        monitoring.configure(breach, "production", auto_kill=True, actor=get_principal("bob", session=s),
                             reason="metrics test", session=s)
    time.sleep(STORE_TTL_S + 0.1)
    assert value(scrape(api, world), "exitwise_monitor_auto_kill", model=breach, environment="production") == 1


def test_the_store_read_is_reused_for_a_while(world: Any) -> None:
    now = [0.0]
    collector = MonitorCollector(world.engine, ttl_s=1.0, clock=lambda: now[0])
    first = collector.collect()
    assert collector.collect() == first and collector.reads == 1
    now[0] += 0.5
    collector.collect()
    assert collector.reads == 1
    now[0] += 0.6
    collector.collect()
    assert collector.reads == 2


def test_a_failing_store_read_answers_store_up_0(world: Any, empty_url: str, make_settings: Callable[..., Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A database without the schema: the monitoring read fails, the scrape still answers (public mode:
    no token to check against that database)."""
    engine: Engine = make_engine(empty_url)
    try:
        app = create_app(make_settings(database_url=empty_url, metrics_public=True), engine=engine)
        with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="exitwise.api.metrics"):
            samples = scrape(client, world, None)
        assert value(samples, "exitwise_metrics_store_up") == 0.0
        assert not any(name.startswith("exitwise_monitor_") for name, _ in samples)
        assert value(samples, "exitwise_http_requests_total", method="GET", route="/metrics", status="200") == 0
        assert "could not read the monitoring verdicts" in caplog.text
    finally:
        engine.dispose()


# ---------------------------------------------------------------- bounded, escaped label values


def test_segment_series_are_capped_per_model() -> None:
    fields = {"n": 10, "losses": 1, "risk": 0.1, "lower": 0.01, "upper": 0.4, "eps": 0.05, "e_value": 2.0}
    wide = [RecordedVerdict("wide", env, 1, "watch", False, {f"s{i:03d}": fields for i in range(150)})
            for env in ("production", "staging")]
    narrow = RecordedVerdict("narrow", "production", None, "unknown", False, {})
    samples = samples_of(_exposition(monitor_families([*wide, narrow], max_segments=100)))
    rows = [dict(labels) for name, labels in samples if name == "exitwise_monitor_risk_upper"]
    assert len(rows) == 200 and {r["segment"] for r in rows} == {f"s{i:03d}" for i in range(100)}
    assert value(samples, "exitwise_monitor_segments_omitted", model="wide") == 50
    assert value(samples, "exitwise_monitor_segments_omitted", model="narrow") == 0
    assert value(samples, "exitwise_monitor_verdict", model="narrow", environment="production", verdict="unknown") == 1
    assert ("exitwise_monitor_version", (("environment", "production"), ("model", "narrow"))) not in samples


def test_label_values_are_escaped_and_nulls_left_out() -> None:
    odd = 'seg "quoted" \\ back\nslash'
    verdict = RecordedVerdict("m", "production", 2, "ok", True,
                              {odd: {"n": 5, "losses": None, "risk": None, "lower": 0.0, "upper": 0.3, "eps": 0.05,
                                     "e_value": None}})
    samples = samples_of(_exposition(monitor_families([verdict])))
    labels = {"model": "m", "environment": "production", "segment": odd}
    assert value(samples, "exitwise_monitor_risk_upper", **labels) == 0.3
    assert value(samples, "exitwise_monitor_shadow_rows", **labels) == 5
    key = tuple(sorted(labels.items()))
    assert ("exitwise_monitor_risk_observed", key) not in samples and ("exitwise_monitor_evalue", key) not in samples


def _exposition(families: list[Any]) -> str:
    class Fixed:
        def collect(self) -> list[Any]:
            return families

    return generate_latest(Fixed()).decode()  # type: ignore[arg-type]


def test_latency_histogram_buckets() -> None:
    """Bucket boundaries are inclusive (``le``), cumulative, and the sum is kept; unknown methods are "other"."""
    http = HttpMetrics()
    scope = {"method": "GET"}
    for seconds in (0.0005, 0.003, 0.003, 100.0):
        http.observe(scope, 200, seconds)
    http.observe({"method": "PROPFIND"}, 405, 0.001)
    samples = samples_of(_exposition(list(http.collect())))
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items() if name.endswith("_bucket")}
    assert buckets["0.0005"] == 1 and buckets["0.001"] == 2 and buckets["0.0025"] == 2 and buckets["0.005"] == 4
    assert buckets["30.0"] == 4 and buckets["+Inf"] == 5
    assert value(samples, "exitwise_http_request_duration_seconds_count", route="other") == 5
    assert value(samples, "exitwise_http_request_duration_seconds_sum", route="other") == pytest.approx(100.0075)
    assert value(samples, "exitwise_http_requests_total", method="other", route="other", status="405") == 1
