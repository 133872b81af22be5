"""Monitoring in MLflow: a version's risk-bound time series as metrics on its run.

For every (version, environment) that received shadow logs, the run of that version gets,
after each shadow batch (``environment`` is ``<env>``, ``<seg>`` a segment's label, see
:func:`segment_labels`):

- ``monitor/<env>/<seg>/{lower,upper,eps,rows,risk}``: the anytime-valid interval of the
  segment's risk, its budget ε, the segment's cumulative shadow rows and the observed risk
  (losses / rows; absent while the risk cannot be measured or the segment has no rows);
- ``monitor/<env>/shadow_rows``: the cumulative shadow rows of the version in ``<env>``.

``step`` is that cumulative row count of the batch (the same for every key of one batch, strictly
increasing along a stream, so the charts are the bounds against traffic seen) and ``timestamp``
the point's ``at`` in milliseconds. The verdict of the environment's assessed version is
``monitor/<env>/verdict_code`` (0 unknown, 1 ok, 2 watch, 3 breach; logged when it differs from
the run's latest value, at the step of the assessed batch) and the tag ``monitor.<env>.verdict``.

Incremental without bookkeeping of its own: ``shadow_rows`` is logged last for each batch and
its latest value (MLflow's latest metric is the one with the highest step) is the step up to
which the run is complete, so only later batches are logged; re-running logs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from exitwise.calibration.monitor import constrained_segments
from exitwise.calibration.rule import SEGMENT_SEPARATOR
from exitwise.policies import store
from exitwise.policies.db import translate_errors
from exitwise.policies.mlflow.config import load_mlflow
from exitwise.policies.mlflow.errors import error_code
from exitwise.policies.models import VERDICTS, Model, MonitorPoint, MonitorStatus, ShadowBatch
from exitwise.policies.models import PolicyVersion as VersionRow
from exitwise.policies.monitoring import Point, series

log = logging.getLogger(__name__)

PREFIX = "monitor"
CURSOR = "shadow_rows"
VERDICT = "verdict_code"
STATS = ("lower", "upper", "eps", "rows", "risk")
TAG_SEGMENTS = "monitor.segments"  # JSON {label: segment} of the labels that differ from their segment
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
_LABEL_MAX = 160  # monitor/<env (64)>/<label>/<stat> stays under MLflow's 250-character keys
_MAX_TAG = 8000
_NOT_KEY_CHAR = re.compile(r"[^A-Za-z0-9_.\- ]")  # what every MLflow store accepts in a key, minus "/"


def metric_key(environment: str, stat: str, label: str | None = None) -> str:
    """``monitor/<env>/<label>/<stat>``, or ``monitor/<env>/<stat>`` for per-environment metrics."""
    return f"{PREFIX}/{environment}/{stat}" if label is None else f"{PREFIX}/{environment}/{label}/{stat}"


def verdict_tag(environment: str) -> str:
    """``monitor.<env>.verdict``: the run tag holding the version's last recorded verdict in ``env``."""
    return f"{PREFIX}.{environment}.verdict"


def verdict_code(verdict: str) -> int:
    """0 unknown, 1 ok, 2 watch, 3 breach (the order of the store's verdicts)."""
    return VERDICTS.index(verdict)


def millis(at: datetime) -> int:
    """``at`` as MLflow's metric timestamp (milliseconds since the epoch)."""
    return int(at.timestamp() * 1000)


def _readable(segment: str) -> str:
    text = _NOT_KEY_CHAR.sub("_", segment.replace(SEGMENT_SEPARATOR, "."))
    if not text.strip("."):  # "", ".", "..": MLflow refuses keys that resolve to another path
        text = "_" + text
    return text[:_LABEL_MAX]


def _suffixed(segment: str, label: str) -> str:
    return f"{label[:_LABEL_MAX - 9]}-{hashlib.sha256(segment.encode()).hexdigest()[:8]}"


def segment_labels(segments: Iterable[str]) -> dict[str, str]:
    """{segment: label in metric keys}, one-to-one over ``segments`` (a version's constrained segments).

    A name MLflow accepts as it is keeps it (``__all__``, ``studio``); otherwise the composite
    separator ``|`` becomes ``.``, any other character outside ``A-Z a-z 0-9 _ - . space``
    becomes ``_`` and names are cut to 160 characters; a label that two segments would share
    gets ``-`` and 8 hex digits of the segment's SHA-256 on each segment it was changed for.
    """
    names = sorted(set(segments))
    base = {s: _readable(s) for s in names}
    shared = Counter(base.values())
    out = {s: _suffixed(s, label) if label != s and shared[label] > 1 else label for s, label in base.items()}
    if len(set(out.values())) < len(out):
        out = {s: label if label == s else _suffixed(s, base[s]) for s, label in out.items()}
    if len(set(out.values())) < len(out):
        raise ValueError(f"segments {names!r} have no distinct MLflow metric labels")
    return out


# ---------------------------------------------------------------- the store side

@dataclass(frozen=True)
class Stream:
    """One (version, environment) with monitoring points: its last batch and the rows through it."""

    version: int
    environment: str
    last_batch: int
    rows: int  # cumulative shadow rows through ``last_batch``: the step of its points


@dataclass(frozen=True)
class VerdictNow:
    """The recorded verdict of an environment, about ``version``, at step ``rows``."""

    version: int
    environment: str
    verdict: str
    at: datetime
    rows: int


@dataclass(frozen=True)
class MonitorSnapshot:
    """What the store holds for one model's monitoring, read in the sync's read-only transaction."""

    last_point: int  # the highest monitor_points.id of the model (0: none)
    streams: tuple[Stream, ...] = ()
    verdicts: tuple[VerdictNow, ...] = ()


def last_points(session: Session, model: str | None = None) -> dict[str, int]:
    """The highest ``monitor_points.id`` of every model with points (or of ``model``)."""
    q = select(Model.name, func.max(MonitorPoint.id)).join(Model, Model.id == MonitorPoint.model_id)
    if model is not None:
        q = q.where(Model.name == model)
    return {name: int(last) for name, last in session.execute(q.group_by(Model.name))}


def _rows_through(session: Session, model_id: int, env: str, version_id: int, batch: int) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(ShadowBatch.n_rows), 0)).where(
        ShadowBatch.model_id == model_id, ShadowBatch.environment == env, ShadowBatch.version_id == version_id,
        ShadowBatch.id <= batch)) or 0)


def monitor_snapshot(model: str, *, session: Session) -> MonitorSnapshot:
    """The streams and recorded verdicts of ``model`` up to its highest point id (one consistent cut).

    The verdicts are read first: the points of the batch behind a verdict commit with it, so the
    highest point id read next covers them; later points wait for the next sync.
    """
    with translate_errors():
        m = store.model_row(session, model)
        statuses = list(session.execute(
            select(MonitorStatus, VersionRow.number).join(VersionRow, VersionRow.id == MonitorStatus.version_id)
            .where(MonitorStatus.model_id == m.id, MonitorStatus.assessed_at.is_not(None))
            .order_by(MonitorStatus.environment)))
        last = last_points(session, model).get(model, 0)
        if not last:
            return MonitorSnapshot(0)
        mine = (MonitorPoint.model_id == m.id, MonitorPoint.id <= last)
        streams = []
        for number, version_id, env, batch in session.execute(
                select(VersionRow.number, VersionRow.id, MonitorPoint.environment, func.max(MonitorPoint.batch_id))
                .join(VersionRow, VersionRow.id == MonitorPoint.version_id).where(*mine)
                .group_by(VersionRow.number, VersionRow.id, MonitorPoint.environment)
                .order_by(VersionRow.number, MonitorPoint.environment)):
            streams.append(Stream(number, env, batch, _rows_through(session, m.id, env, version_id, batch)))
        verdicts = []
        for status, number in statuses:
            batch = session.scalar(select(func.max(MonitorPoint.batch_id)).where(
                *mine, MonitorPoint.environment == status.environment, MonitorPoint.version_id == status.version_id,
                MonitorPoint.at <= status.assessed_at))
            if batch is not None:
                rows = _rows_through(session, m.id, status.environment, status.version_id, batch)
                verdicts.append(VerdictNow(number, status.environment, status.verdict, status.assessed_at, rows))
    return MonitorSnapshot(last, tuple(streams), tuple(verdicts))


def new_points(model: str, stream: Stream, after: int, *, session: Session
               ) -> tuple[dict[str, str], list[tuple[int, Point]]]:
    """(segment labels of the version, [(step, point)] of ``stream`` with a step over ``after``), oldest first."""
    with translate_errors():
        m = store.model_row(session, model)
        v = store.version_row(session, model, stream.version)
        steps: dict[int, int] = {}
        total = 0
        for batch, n_rows in session.execute(
                select(ShadowBatch.id, ShadowBatch.n_rows).where(
                    ShadowBatch.model_id == m.id, ShadowBatch.environment == stream.environment,
                    ShadowBatch.version_id == v.id, ShadowBatch.id <= stream.last_batch).order_by(ShadowBatch.id)):
            total += n_rows
            if total > after:
                steps[batch] = total
        points = [p for p in series(model, stream.environment, session=session, version=stream.version)
                  if p.batch in steps] if steps else []
        segments = set(constrained_segments(store.get_version(model, stream.version, session=session).document))
    return segment_labels(segments | {p.segment for p in points}), [(steps[p.batch], p) for p in points]


# ---------------------------------------------------------------- the MLflow side

PointSource = Callable[[Stream, int], tuple[Mapping[str, str], Sequence[tuple[int, Point]]]]


def point_metrics(environment: str, labels: Mapping[str, str], points: Sequence[tuple[int, Point]]) -> list[Any]:
    """The MLflow metrics of ``points``, batch by batch, each batch's ``shadow_rows`` after its segments."""
    metric = load_mlflow().entities.Metric
    by_step: dict[int, list[Point]] = {}
    for step, p in points:
        by_step.setdefault(step, []).append(p)
    out: list[Any] = []
    for step in sorted(by_step):
        batch = sorted(by_step[step], key=lambda p: labels[p.segment])
        ts = millis(batch[0].at)
        for p in batch:
            values = {"lower": p.lower, "upper": p.upper, "eps": p.eps, "rows": float(p.n),
                      "risk": p.losses / p.n if p.n and p.losses is not None else None}
            out += [metric(metric_key(environment, stat, labels[p.segment]), float(values[stat]), ts, step)
                    for stat in STATS if values[stat] is not None]
        out.append(metric(metric_key(environment, CURSOR), float(step), ts, step))
    return out


@dataclass(frozen=True)
class MonitorMirror:
    """What one sync logged: metrics per store version; versions whose run was deleted in MLflow."""

    metrics: Mapping[int, int]
    skipped: tuple[int, ...] = ()


def mirror_monitoring(client: Any, runs: Mapping[int, str], snapshot: MonitorSnapshot, load: PointSource
                      ) -> MonitorMirror:
    """Log to each version's run (``runs``: store version -> run id) what MLflow lacks of ``snapshot``.

    Reads each run once for its cursors (latest ``shadow_rows`` per environment, latest verdict
    code, tags) and asks ``load`` only for the streams the run is behind on; metrics go in
    ``log_batch`` calls of at most 1000, in step order.
    """
    versions = sorted({s.version for s in snapshot.streams} | {v.version for v in snapshot.verdicts})
    logged: dict[int, int] = {}
    skipped: list[int] = []
    metric = load_mlflow().entities.Metric
    for number in versions:
        run = _run(client, runs.get(number))
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("monitoring of version %s not mirrored: its MLflow run %s is missing or deleted",
                        number, runs.get(number))
            skipped.append(number)
            continue
        have, tags = dict(run.data.metrics), dict(run.data.tags)
        metrics: list[Any] = []
        renamed: dict[str, str] = {}
        for stream in (s for s in snapshot.streams if s.version == number):
            cursor = int(have.get(metric_key(stream.environment, CURSOR), 0))
            if cursor >= stream.rows:
                continue
            labels, points = load(stream, cursor)
            renamed |= {label: seg for seg, label in labels.items() if label != seg}
            metrics += point_metrics(stream.environment, labels, points)
        for v in (v for v in snapshot.verdicts if v.version == number):
            key = metric_key(v.environment, VERDICT)
            if have.get(key) != verdict_code(v.verdict):
                metrics.append(metric(key, float(verdict_code(v.verdict)), millis(v.at), v.rows))
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + MAX_METRICS_PER_CALL])
        for v in (v for v in snapshot.verdicts if v.version == number):
            if tags.get(verdict_tag(v.environment)) != v.verdict:
                client.set_tag(run.info.run_id, verdict_tag(v.environment), v.verdict)
        mapping = json.dumps(renamed, sort_keys=True, separators=(",", ":"))
        if renamed and tags.get(TAG_SEGMENTS) != mapping:
            if len(mapping) <= _MAX_TAG:
                client.set_tag(run.info.run_id, TAG_SEGMENTS, mapping)
            else:
                log.warning("tag %s of version %s not set: %d segment names are too long for a tag",
                            TAG_SEGMENTS, number, len(renamed))
        logged[number] = len(metrics)
    return MonitorMirror(logged, tuple(skipped))


def _run(client: Any, run_id: str | None) -> Any:
    """The run ``run_id``, or None when there is none or MLflow no longer has it."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception as exc:
        if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
