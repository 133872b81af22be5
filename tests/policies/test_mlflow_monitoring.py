"""The MLflow mirror of monitoring (issue 12): each version's risk-bound time series as metrics on its run.

A real embedded MLflow store (SQLite tracking, artifacts under tmp) and a real policy store
(SQLite, like the other mirror tests in ``test_registry.py``; one test also on PostgreSQL, for the
store queries); shadow batches go through
``monitoring.ingest``. What MLflow holds is read back with ``MlflowClient.get_metric_history``
and compared with ``monitoring.series`` value for value, with the steps computed here from the
uploaded batch sizes. Nothing may leave the machine (a guard refuses non-loopback sockets).
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name
from sqlalchemy import Engine

from exitwise.calibration.monitor import constrained_segments
from exitwise.policies import lifecycle, monitoring
from exitwise.policies.db import unit_of_work
from exitwise.policies.mlflow.config import MlflowConfig, client_for, mlflow_config
from exitwise.policies.mlflow.monitor import TAG_SEGMENTS, metric_key, segment_labels, verdict_tag
from exitwise.policies.mlflow.sync import SyncOutcome, pending_models, sync_model, sync_status
from exitwise.policies.mlflow.worker import install_hook

STATS = ("lower", "upper", "eps", "rows", "risk")
CODES = {"unknown": 0.0, "ok": 1.0, "watch": 2.0, "breach": 3.0}


# ---------------------------------------------------------------- no network, a store per test

_real_connect = socket.socket.connect


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection must stay on loopback (the embedded store needs none at all)."""

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith(("127.", "::1")):
            raise ConnectionRefusedError(f"test guard: no connections leave this machine (tried {address})")
        return _real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def _tracking(root: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return mlflow_config(root)


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowConfig:
    """An embedded MLflow store of this test's own (SQLite tracking and registry)."""
    return _tracking(tmp_path / "mlflow-a", monkeypatch)


# ---------------------------------------------------------------- the store side of a test

def _npz(n: int, *, disagree: float = 0.0, seed: int = 0, **segments: str) -> bytes:
    """``n`` full-depth rows for make_doc's policy, every exit confident on class 0; a share
    ``disagree`` of the rows has a last exit that answers class 1 (a loss). ``segments``:
    column -> value (default ``capture=studio``)."""
    rng = np.random.default_rng(seed)
    logits = np.zeros((n, 3, 4), dtype=np.float32)
    logits[:, :, 0] = 10.0
    bad = rng.random(n) < disagree
    logits[bad, -1, 0], logits[bad, -1, 1] = 0.0, 10.0
    arrays = {f"seg_{k}": np.array([v] * n) for k, v in (segments or {"capture": "studio"}).items()}
    buf = io.BytesIO()
    np.savez(buf, logits=logits, **arrays)
    return buf.getvalue()


@dataclass
class World:
    """One model in a fresh policy store, and the steps each uploaded batch should be logged at."""

    engine: Engine
    actors: Any
    model: str
    steps: dict[tuple[int, str], dict[int, int]] = field(default_factory=dict)  # (version, env) -> batch -> step

    def create(self, doc: dict[str, Any], *, activate: tuple[str, ...] = ("production",)) -> int:
        with unit_of_work(self.engine) as s:
            v = lifecycle.create_version(doc, author=self.actors.author, session=s)
            lifecycle.approve(self.model, v.number, approver=self.actors.approver, reason="reviewed", session=s)
            for env in activate:
                lifecycle.activate(self.model, v.number, env, actor=self.actors.approver, reason="go", session=s)
            return v.number

    def ingest(self, n: int, env: str = "production", *, version: int | None = None, **kw: Any
               ) -> monitoring.IngestResult:
        with unit_of_work(self.engine) as s:
            out = monitoring.ingest(self.model, env, _npz(n, **kw), "application/x-npz",
                                    principal=self.actors.author, session=s, version=version)
        stream = self.steps.setdefault((out.version, env), {})
        stream[out.batch] = max(stream.values(), default=0) + n  # cumulative shadow rows of the stream
        return out

    def sync(self, config: MlflowConfig) -> SyncOutcome:
        outcome = sync_model(self.engine, self.model, config=config, reports=False)
        assert outcome.ok and outcome.result is not None, outcome.error
        return outcome

    def series(self, env: str, version: int) -> list[monitoring.Point]:
        with unit_of_work(self.engine, readonly=True) as s:
            return monitoring.series(self.model, env, session=s, version=version)

    def verdict(self, env: str) -> str:
        with unit_of_work(self.engine, readonly=True) as s:
            return monitoring.health(self.model, env, session=s).verdict

    def status(self, config: MlflowConfig) -> Any:
        with unit_of_work(self.engine, readonly=True) as s:
            return next(st for st in sync_status(session=s, config=config) if st.model == self.model)

    def expected(self, env: str, version: int, labels: dict[str, str] | None = None
                 ) -> dict[str, list[tuple[int, float, int]]]:
        """key -> [(step, value, timestamp ms)] that the run must hold for ``series(env, version)``."""
        steps = self.steps[(version, env)]
        out: dict[str, list[tuple[int, float, int]]] = {}
        for p in self.series(env, version):
            step, ts, label = steps[p.batch], int(p.at.timestamp() * 1000), (labels or {}).get(p.segment, p.segment)
            values = {"lower": p.lower, "upper": p.upper, "eps": p.eps, "rows": float(p.n),
                      "risk": None if not p.n or p.losses is None else p.losses / p.n}
            for stat in STATS:
                if values[stat] is not None:
                    out.setdefault(metric_key(env, stat, label), []).append((step, float(values[stat]), ts))
            cursor = out.setdefault(metric_key(env, "shadow_rows"), [])
            if not cursor or cursor[-1][0] != step:
                cursor.append((step, float(step), ts))
        return out


@pytest.fixture
def world(fresh_engine: Engine, committed_actors: Any) -> World:
    return World(fresh_engine, committed_actors, "mon-net")


def _history(config: MlflowConfig, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client_for(config).get_metric_history(run_id, key))


def _monitor_keys(config: MlflowConfig, run_id: str) -> set[str]:
    return {k for k in client_for(config).get_run(run_id).data.metrics if k.startswith("monitor/")}


def _assert_run_holds(config: MlflowConfig, run_id: str, expected: dict[str, list[tuple[int, float, int]]]) -> None:
    for key, points in expected.items():
        assert _history(config, run_id, key) == points, key


# ---------------------------------------------------------------- segment labels (no MLflow store)

def test_segment_labels_keep_valid_names_and_map_the_rest_one_to_one() -> None:
    assert segment_labels(["__all__", "studio", "phone-eu v2.1"]) == {
        "__all__": "__all__", "studio": "studio", "phone-eu v2.1": "phone-eu v2.1"}
    assert segment_labels(["studio|night", "phone/eu x|day", ".."]) == {
        "studio|night": "studio.night", "phone/eu x|day": "phone_eu x.day", "..": "_.."}
    labels = segment_labels(["a|b", "a.b", "a/b", "a_b"])
    assert labels["a.b"] == "a.b" and labels["a_b"] == "a_b"  # valid names keep theirs
    assert labels["a|b"].startswith("a.b-") and labels["a/b"].startswith("a_b-") and len(set(labels.values())) == 4
    long = ["x" * 300 + "|1", "x" * 300 + "|2"]
    cut = segment_labels(long)
    assert {len(v) for v in cut.values()} == {160} and len(set(cut.values())) == 2


SEGMENT_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="|\x00"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(SEGMENT_TEXT, min_size=1, max_size=3).map("|".join), max_size=12, unique=True))
def test_segment_labels_are_distinct_valid_metric_keys(segments: list[str]) -> None:
    labels = segment_labels(segments)
    assert set(labels) == set(segments) and len(set(labels.values())) == len(segments)
    env = "e" * 64  # the longest environment name
    for segment, label in labels.items():
        for stat in STATS:
            _validate_metric_name(metric_key(env, stat, label))  # raises on an invalid or too long key
            assert len(metric_key(env, stat, label)) <= 250
        if all(c.isascii() and (c.isalnum() or c in "_-. ") for c in segment) and segment.strip(".") \
                and len(segment) <= 160:
            assert label == segment


# ---------------------------------------------------------------- the series in MLflow

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sync_logs_each_environment_series_exactly_and_only_once(
    world: World, tracking: MlflowConfig, make_doc: Callable[..., dict[str, Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1 = world.create(make_doc(model=world.model), activate=("production", "staging"))
    world.ingest(300)
    world.ingest(200, disagree=0.01, seed=1)  # a few losses: the observed risk moves, the verdict stays ok
    world.ingest(250, "staging", seed=2)
    run = world.sync(tracking).result.runs[v1]  # type: ignore[union-attr]
    client = client_for(tracking)

    risk = world.expected("production", v1)[metric_key("production", "risk", "studio")]
    assert risk[0][1] == 0 < risk[1][1] < 0.02
    for env in ("production", "staging"):
        _assert_run_holds(tracking, run, world.expected(env, v1))
        verdict = world.verdict(env)
        assert verdict == "ok"
        assert _history(tracking, run, metric_key(env, "verdict_code"))[-1][1] == CODES[verdict]
        assert client.get_run(run).data.tags[verdict_tag(env)] == verdict
    keys = {metric_key(env, k) for env in ("production", "staging") for k in ("shadow_rows", "verdict_code")}
    keys |= {metric_key(env, stat, seg) for env in ("production", "staging") for seg in ("__all__", "studio")
             for stat in STATS}
    assert _monitor_keys(tracking, run) == keys
    assert TAG_SEGMENTS not in client.get_run(run).data.tags  # every name is its own label
    assert world.status(tracking).pending is False

    # syncing again logs nothing
    before = {k: _history(tracking, run, k) for k in keys}
    assert world.sync(tracking).result.monitor == {v1: 0}  # type: ignore[union-attr]
    assert {k: _history(tracking, run, k) for k in keys} == before

    # a batch that changes no verdict writes no audit event, yet makes the model pending; the sync appends it
    out = world.ingest(400, seed=3)
    assert out.verdict == out.previous == "ok"
    status = world.status(tracking)
    assert status.audit_seq == status.synced_seq and status.monitor_point_id > status.monitor_synced_id
    assert status.pending and status.to_json()["monitor_point_id"] == status.monitor_point_id
    with unit_of_work(world.engine, readonly=True) as s:
        assert pending_models(session=s, config=tracking) == [world.model]
    assert world.sync(tracking).result.monitor == {v1: 2 * len(STATS) + 1}  # type: ignore[union-attr]
    after = world.expected("production", v1)
    _assert_run_holds(tracking, run, after)
    for key, points in after.items():
        assert points[:-1] == before[key] and points[-1][0] == 900  # one new point per key, at 300+200+400 rows
    assert not world.status(tracking).pending

    # another tracking store knows nothing yet: everything is logged there, from MLflow's own cursor
    other = _tracking(tmp_path / "mlflow-b", monkeypatch)
    assert world.status(other).pending
    moved = world.sync(other)
    assert moved.result is not None and moved.result.registered == (v1,)
    for env in ("production", "staging"):
        _assert_run_holds(other, moved.result.runs[v1], world.expected(env, v1))


def test_a_new_version_and_a_changed_verdict_reach_mlflow_in_one_sync(  # on SQLite and PostgreSQL policy stores
    world: World, tracking: MlflowConfig, make_doc: Callable[..., dict[str, Any]],
) -> None:
    v1 = world.create(make_doc(model=world.model))
    world.ingest(500)
    first = world.sync(tracking).result
    assert first is not None and first.monitor == {v1: 2 * len(STATS) + 1 + 1}  # one batch and the verdict

    v2 = world.create(make_doc(model=world.model, variant=1, parent=v1))
    assert world.ingest(300, seed=1).verdict == "ok"  # still ok: no audit event for v2's first batch
    world.ingest(100, version=v1, seed=2)  # a late batch of v1, served before the switch: kept, not assessed
    breach = world.ingest(400, disagree=0.5, seed=3)
    assert (breach.version, breach.previous, breach.verdict) == (v2, "ok", "breach")

    result = world.sync(tracking).result  # registers v2, then logs its points on its new run
    assert result is not None and result.registered == (v2,)
    runs = result.runs
    _assert_run_holds(tracking, runs[v1], world.expected("production", v1))
    _assert_run_holds(tracking, runs[v2], world.expected("production", v2))
    assert world.steps[(v1, "production")] == {1: 500, 3: 600}  # the late batch continues v1's stream
    client = client_for(tracking)
    # the verdict: on the run of the version it is about, at the step of the batch that set it
    assert _history(tracking, runs[v2], metric_key("production", "verdict_code"))[0][:2] == (700, 3.0)
    assert client.get_run(runs[v2]).data.tags[verdict_tag("production")] == "breach"
    assert [h[:2] for h in _history(tracking, runs[v1], metric_key("production", "verdict_code"))] == [(500, 1.0)]
    assert client.get_run(runs[v1]).data.tags[verdict_tag("production")] == "ok"

    again = world.sync(tracking).result
    assert again is not None and again.monitor == {v1: 0, v2: 0}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_after_commit_hook_mirrors_a_verdict_change_with_the_points_before_it(
    world: World, tracking: MlflowConfig, make_doc: Callable[..., dict[str, Any]],
) -> None:
    v1 = world.create(make_doc(model=world.model))
    run = world.sync(tracking).result.runs[v1]  # type: ignore[union-attr]
    hook = install_hook(world.engine, config=tracking, reports=False)  # inline: the commit returns once synced
    try:
        assert world.ingest(300).verdict == "ok"  # unknown -> ok: an audit event, so the hook syncs
        assert _history(tracking, run, metric_key("production", "shadow_rows")) == \
            world.expected("production", v1)[metric_key("production", "shadow_rows")]
        world.ingest(200, seed=1)  # still ok: no audit event, MLflow waits (the model is pending)
        assert [h[0] for h in _history(tracking, run, metric_key("production", "shadow_rows"))] == [300]
        assert world.status(tracking).pending
        assert world.ingest(400, disagree=0.5, seed=2).verdict == "breach"  # an audit event: all of it goes
    finally:
        hook.close()
    _assert_run_holds(tracking, run, world.expected("production", v1))
    assert [h[:2] for h in _history(tracking, run, metric_key("production", "verdict_code"))] == \
        [(300, 1.0), (900, 3.0)]
    assert client_for(tracking).get_run(run).data.tags[verdict_tag("production")] == "breach"
    assert not world.status(tracking).pending


class CountingClient:
    """The real ``MlflowClient``, with the sizes of its ``log_batch`` calls written down."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.batches: list[list[Any]] = []

    def log_batch(self, run_id: str, metrics: Any = (), **kw: Any) -> None:
        self.batches.append(list(metrics))
        self._client.log_batch(run_id, metrics=metrics, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_composite_segments_get_documented_labels_and_big_syncs_go_in_several_calls(
    world: World, tracking: MlflowConfig, make_doc: Callable[..., dict[str, Any]],
) -> None:
    base = make_doc(model=world.model)
    g, t = base["guarantee"], base["thresholds"]
    seg = {"eps": 0.02, "n": 2500, "upper_bound": 0.0191, "certified": True}
    segments = {"__all__": g["segments"]["__all__"], "studio|night": seg, "phone/eu x|day": seg,
                **{f"cam{i}|day": seg for i in range(20)}}
    doc = make_doc(model=world.model, segment_keys=["capture", "light"],
                   forced_full_depth={"classes": [], "segments": []},
                   thresholds={"default": t["default"], "studio|night": t["studio"]},
                   guarantee={**g, "segments": segments, "uncertified_segments": []},
                   expected={**base["expected"], "segments": {}}, data={**base["data"], "segment_counts": {}})
    v1 = world.create(doc)
    assert set(constrained_segments(doc)) == set(segments)
    # 11 batches x (23 segments x 4 metrics + the risk of the segments with rows + shadow_rows) > 1000 metrics,
    # more than MLflow takes in one log_batch call
    for i in range(11):
        world.ingest(40 + i, capture="studio" if i % 2 else "phone/eu x", light="night" if i % 2 else "day", seed=i)
    client = CountingClient(client_for(tracking))
    outcome = sync_model(world.engine, world.model, config=tracking, client=client, reports=False)
    result = outcome.result
    assert result is not None and result.monitor[v1] > 1000, outcome.error
    monitor_calls = [b for b in client.batches if b and b[0].key.startswith("monitor/")]
    assert [len(b) <= 1000 for b in monitor_calls] == [True, True] and len(monitor_calls[0]) == 1000
    assert sum(len(b) for b in monitor_calls) == result.monitor[v1]
    steps = [m.step for b in monitor_calls for m in b]
    assert steps == sorted(steps)  # in step order, each batch's shadow_rows (the cursor) after its segments
    labels = segment_labels(segments)
    assert labels["studio|night"] == "studio.night" and labels["phone/eu x|day"] == "phone_eu x.day"
    assert labels["cam3|day"] == "cam3.day"
    run = result.runs[v1]
    expected = world.expected("production", v1, labels)
    _assert_run_holds(tracking, run, expected)
    assert _monitor_keys(tracking, run) == set(expected) | {metric_key("production", "verdict_code")}
    mapping = json.loads(client_for(tracking).get_run(run).data.tags[TAG_SEGMENTS])
    assert mapping == {label: s for s, label in labels.items() if label != s}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_deleted_run_is_skipped_not_a_failure(
    world: World, tracking: MlflowConfig, make_doc: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture,
) -> None:
    v1 = world.create(make_doc(model=world.model))
    world.ingest(200)
    run = world.sync(tracking).result.runs[v1]  # type: ignore[union-attr]
    client_for(tracking).delete_run(run)  # someone deleted the run in the MLflow UI
    world.ingest(300, seed=1)
    outcome = world.sync(tracking)
    assert outcome.result is not None and outcome.result.monitor == {}
    assert any("run" in r.getMessage() and "deleted" in r.getMessage() for r in caplog.records)
    assert not world.status(tracking).pending  # the rest of the mirror is up to date
