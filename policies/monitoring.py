"""Monitoring service: shadow batches in, a verdict per (model, environment) out.

The numbers come from :mod:`exitwise.calibration.monitor`; this module keeps them:

- :func:`ingest` stores an uploaded batch (``shadow_batches``) under the version that was active
  when it was served, extends that version's confidence sequences (``monitor_points``, the time
  series), and, when the version is the active one, assesses it again (``monitor_status``). A
  change of verdict is an audit event (``monitor.verdict``) with its evidence; with the automatic
  kill switch on (:func:`configure`, off by default), a new ``breach`` also kills the policy in the
  same transaction, audited as a kill that names the evidence. All of it commits together or not
  at all; a refused upload stores nothing.
- :func:`health` reads the verdict of the active version (assessing it on the fly when it has
  shadow rows but no recorded verdict yet, e.g. right after a rollback).

Uploads of one model are serialised by a row lock on the model; the store's change counter
moves only when something governed changes (a verdict, a kill), so serving caches stay warm
under a steady stream of shadow uploads.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.monitor import (
    Assessment,
    ShadowSummary,
    assess,
    start_bounds,
    summarise_shadow,
    update_bounds,
)
from exitwise.calibration.sequential import RiskBound
from exitwise.policies import audit, lifecycle
from exitwise.policies.db import change, translate_errors
from exitwise.policies.errors import InvalidTransition, NotFound
from exitwise.policies.models import Activation, Model, MonitorPoint, MonitorStatus, ShadowBatch, utcnow
from exitwise.policies.models import PolicyVersion as VersionRow
from exitwise.policies.principals import Principal, require
from exitwise.policies.settings import MonitorSettings
from exitwise.policies.shadow_logs import concat_logs, media_kind, read_shadow_logs
from exitwise.policies.store import active_row, check_environment, kill_row, model_row, version_row

__all__ = ["Health", "IngestResult", "MonitorSettings", "Point", "PreparedBatch", "configure", "environments", "export",
           "health",
           "ingest", "prepare", "record", "recorded_verdicts", "series", "served_document"]

_MAX_AUDIT_REASONS = 10


@dataclass(frozen=True)
class IngestResult:
    """What one upload did: the stored batch and the verdict after it."""

    batch: int
    model: str
    environment: str
    version: int
    rows: int
    duplicate: bool
    verdict: str
    previous: str
    auto_killed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "model": self.model, "environment": self.environment, "version": self.version,
                "rows": self.rows, "duplicate": self.duplicate, "verdict": self.verdict,
                "previous_verdict": self.previous, "auto_killed": self.auto_killed}


@dataclass(frozen=True)
class Health:
    """The verdict of (model, environment) and the numbers behind it."""

    model: str
    environment: str
    version: int | None
    verdict: str
    since: datetime | None
    assessed_at: datetime | None
    recorded: bool
    killed: bool
    auto_kill: bool
    batches: int
    rows: int
    assessment: Mapping[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "environment": self.environment, "version": self.version,
                "verdict": self.verdict, "since": self.since.isoformat() if self.since else None,
                "assessed_at": self.assessed_at.isoformat() if self.assessed_at else None,
                "recorded": self.recorded, "killed": self.killed, "auto_kill": self.auto_kill,
                "batches": self.batches, "rows": self.rows, "assessment": self.assessment}


@dataclass(frozen=True)
class Point:
    """One point of a segment's time series: the running bound after a batch."""

    version: int
    segment: str
    at: datetime
    batch: int
    n: int
    losses: int | None
    eps: float
    lower: float
    upper: float

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "segment": self.segment, "at": self.at.isoformat(), "batch": self.batch,
                "n": self.n, "losses": self.losses, "risk": None if not self.n or self.losses is None
                else self.losses / self.n, "eps": self.eps, "lower": self.lower, "upper": self.upper}


# ---------------------------------------------------------------- reading the kept state

def _served_version(session: Session, m: Model, env: str, version: int | None) -> VersionRow:
    if version is None:
        act = active_row(session, m, env)
        if act is None:
            raise NotFound(f"no active policy for model {m.name!r} in environment {env!r}: "
                           "say which version served the shadow requests")
        return act.version
    row = version_row(session, m.name, version)
    ever = session.scalar(select(func.count()).select_from(Activation).where(
        Activation.model_id == m.id, Activation.environment == env, Activation.version_id == row.id))
    if not ever:
        raise InvalidTransition(f"version {version} of model {m.name!r} was never active in environment {env!r}: "
                                "shadow logs must come from a version that served there")
    return row


def _bounds(session: Session, m: Model, env: str, v: VersionRow, document: Mapping[str, Any]) -> dict[str, RiskBound]:
    """The confidence sequences of version ``v`` in ``env``: the last point of each segment, or fresh ones."""
    bounds = start_bounds(document)
    last = (select(MonitorPoint.segment, func.max(MonitorPoint.id).label("id"))
            .where(MonitorPoint.model_id == m.id, MonitorPoint.environment == env, MonitorPoint.version_id == v.id)
            .group_by(MonitorPoint.segment).subquery())
    for p in session.scalars(select(MonitorPoint).join(last, MonitorPoint.id == last.c.id)):
        if p.segment in bounds and p.losses is not None:
            b = bounds[p.segment]
            bounds[p.segment] = RiskBound(b.eps, b.delta, b.prior, p.n, p.losses, p.lower, p.upper)
    return bounds


def _summaries(session: Session, m: Model, env: str, v: VersionRow, *, newest_rows: int | None = None
               ) -> ShadowSummary | None:
    """The merged summary of version ``v``'s batches: all, or the newest holding at least ``newest_rows``."""
    q = (select(ShadowBatch.summary, ShadowBatch.n_rows)
         .where(ShadowBatch.model_id == m.id, ShadowBatch.environment == env, ShadowBatch.version_id == v.id)
         .order_by(ShadowBatch.id.desc()))
    total: ShadowSummary | None = None
    rows = 0
    for text, n in session.execute(q):
        s = ShadowSummary.from_json(json.loads(text))
        total = s if total is None else total.merge(s)
        rows += n
        if newest_rows is not None and rows >= newest_rows:
            break
    return total


def _assess(session: Session, m: Model, env: str, v: VersionRow, settings: MonitorSettings,
            bounds: Mapping[str, RiskBound] | None = None, total: ShadowSummary | None = None) -> Assessment | None:
    document = json.loads(v.content)
    total = total or _summaries(session, m, env, v)
    if total is None:
        return None
    window = _summaries(session, m, env, v, newest_rows=settings.window_rows)
    return assess(document, bounds or _bounds(session, m, env, v, document), window, total, settings.rules)


def _status(session: Session, m: Model, env: str) -> MonitorStatus:
    status = session.get(MonitorStatus, (m.id, env))
    if status is None:
        status = MonitorStatus(model_id=m.id, environment=env, verdict="unknown", since=utcnow(), auto_kill=False)
        session.add(status)
    return status


def served_document(model: str, environment: str, version: int | None, *, session: Session
                    ) -> tuple[int, dict[str, Any]]:
    """(number, document) of the version that served shadow requests in ``environment`` (default: the active one)."""
    env = check_environment(environment)
    with translate_errors():
        v = _served_version(session, model_row(session, model), env, version)
        return v.number, json.loads(v.content)


# ---------------------------------------------------------------- writes

@dataclass(frozen=True)
class PreparedBatch:
    """An upload read and summarised, before any write (parsing never holds the write lock)."""

    model: str
    environment: str
    version: int
    content_hash: str
    digest: str
    media_type: str
    rows: int
    summary: ShadowSummary
    body: bytes = field(repr=False)


def prepare(model: str, environment: str, body: bytes, content_type: str | None, *, session: Session,
            version: int | None = None, settings: MonitorSettings | None = None) -> PreparedBatch:
    """Read and summarise an upload against the version that served it; nothing is written.

    ``version`` is the version that served the requests (default: the active one); it must have
    been active in ``environment``. Raises for bad logs (422), an unread format (415), an
    unknown model or version (404) or a version never active there (409).
    """
    env = check_environment(environment)
    settings = settings or MonitorSettings()
    media_kind(content_type)  # 415 before anything is read
    media = (content_type or "").split(";", 1)[0].strip().lower()
    with translate_errors():
        m = model_row(session, model)
        v = _served_version(session, m, env, version)
        number, content_hash, document = v.number, v.content_hash, json.loads(v.content)
    logs = read_shadow_logs(body, content_type, document, max_rows=settings.max_rows)
    return PreparedBatch(model, env, number, content_hash, hashlib.sha256(body).hexdigest(), media, logs.n,
                         summarise_shadow(document, logs), body)


def record(batch: PreparedBatch, *, principal: Principal, session: Session,
           settings: MonitorSettings | None = None) -> IngestResult:
    """Store a prepared batch and bring the verdict up to date (see the module docstring).

    Re-sending the same body is answered with the batch already stored (``duplicate``).
    """
    require(principal, "author", "upload shadow logs")
    settings = settings or MonitorSettings()
    model, env, summary = batch.model, batch.environment, batch.summary
    with translate_errors():
        m = model_row(session, model)
        session.execute(select(Model.id).where(Model.id == m.id).with_for_update())  # one upload per model at a time
        v = _served_version(session, m, env, batch.version)
        if v.content_hash != batch.content_hash:  # a restored or rewritten store under our feet
            raise InvalidTransition(f"version {batch.version} of {model!r} changed while the upload was read")
        status = session.get(MonitorStatus, (m.id, env))
        previous = status.verdict if status is not None else "unknown"
        seen = session.scalars(select(ShadowBatch).where(
            ShadowBatch.model_id == m.id, ShadowBatch.environment == env,
            ShadowBatch.sha256 == batch.digest)).one_or_none()
        if seen is not None:
            number = session.get(VersionRow, seen.version_id).number  # type: ignore[union-attr]
            return IngestResult(seen.id, model, env, number, seen.n_rows, True, previous, previous)
        document = json.loads(v.content)
        row = ShadowBatch(model_id=m.id, environment=env, version_id=v.id, received_by_id=principal.id,
                          n_rows=batch.rows, sha256=batch.digest, media_type=batch.media_type,
                          payload=batch.body, summary=json.dumps(summary.to_json()))
        session.add(row)
        session.flush()
        bounds = update_bounds(_bounds(session, m, env, v, document), summary)
        now = utcnow()
        for name, b in bounds.items():
            _rows, losses = summary.segments.get(name, (0, None))
            session.add(MonitorPoint(batch_id=row.id, model_id=m.id, environment=env, version_id=v.id,
                                     segment=name, at=now, n=b.n, losses=None if losses is None else b.losses,
                                     eps=b.eps, delta=b.delta, lower=b.lower, upper=b.upper))
        act = active_row(session, m, env)
        if act is None or act.version_id != v.id:  # a late batch of an earlier version: kept, not assessed
            session.flush()
            return IngestResult(row.id, model, env, v.number, batch.rows, False, previous, previous)
        status = _status(session, m, env)
        if status.version_id == v.id and status.total:
            total = ShadowSummary.from_json(json.loads(status.total)).merge(summary)
        else:  # the first batch since this version became the assessed one: every batch it has
            total = _summaries(session, m, env, v) or summary
        window = _summaries(session, m, env, v, newest_rows=settings.window_rows)
        assessment = assess(document, bounds, window, total, settings.rules)
        killed = _record(session, m, env, v, status, assessment, principal, row.id, now)
        status.total = json.dumps(total.to_json())
        session.flush()
        return IngestResult(row.id, model, env, v.number, batch.rows, False, assessment.verdict, previous, killed)


def ingest(model: str, environment: str, body: bytes, content_type: str | None, *, principal: Principal,
           session: Session, version: int | None = None, settings: MonitorSettings | None = None) -> IngestResult:
    """:func:`prepare` then :func:`record` in one session (the CLI); refusals store nothing."""
    require(principal, "author", "upload shadow logs")
    batch = prepare(model, environment, body, content_type, session=session, version=version, settings=settings)
    return record(batch, principal=principal, session=session, settings=settings)


def _evidence(assessment: Assessment) -> dict[str, Any]:
    segs = {k: {"n": b.n, "losses": b.losses, "lower": b.lower, "upper": b.upper, "eps": b.eps}
            for k, b in assessment.segments.items()}
    return {"segments": segs, "reasons": list(assessment.reasons[:_MAX_AUDIT_REASONS]),
            "recommendation": assessment.recommendation, "rows": assessment.n}


def _record(session: Session, m: Model, env: str, v: VersionRow, status: MonitorStatus, assessment: Assessment,
            actor: Principal, batch: int, now: datetime) -> bool:
    """Keep the assessment; audit a change of verdict; trip the kill switch on a new breach if asked to."""
    before = status.verdict
    status.version_id, status.assessed_at = v.id, now
    status.assessment = json.dumps(_finite(assessment.to_json()), allow_nan=False)
    if assessment.verdict == before:
        return False
    status.verdict, status.since = assessment.verdict, now
    evidence = _finite(_evidence(assessment))
    reason = assessment.reasons[0][:1900] if assessment.reasons else "risk bounds under eps and no drift"
    with change(session):
        audit.append(session, actor=actor.name, action="monitor.verdict", model=m.name, version=v.number,
                     environment=env, reason=reason, before_hash=v.content_hash, after_hash=v.content_hash,
                     details={"from": before, "to": assessment.verdict, "batch": batch, **evidence})
    if assessment.verdict != "breach" or not status.auto_kill:
        return False
    ks = kill_row(session, m, env)
    if ks is not None and ks.killed:
        return False
    lifecycle.kill(m.name, env, actor=actor, session=session,
                   reason=f"automatic kill switch (monitor auto_kill on): {reason}"[:1990],
                   evidence={"trigger": "monitor.breach", "batch": batch, **evidence})
    return True


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (stored JSON is strict)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def configure(model: str, environment: str, *, auto_kill: bool, actor: Principal, reason: str | None,
              session: Session) -> Health:
    """Turn the automatic kill switch on a ``breach`` on or off (approver; audited as ``monitor.configure``)."""
    require(actor, "approver", "configure monitoring")
    env = check_environment(environment)
    reason = audit.check_reason((reason or "").strip() or None)
    if reason is None:
        raise InvalidTransition("a reason is required to configure monitoring")
    with translate_errors(), change(session):
        m = model_row(session, model)
        status = _status(session, m, env)
        if status.auto_kill == auto_kill:
            raise InvalidTransition(f"automatic kill switch is already {'on' if auto_kill else 'off'} "
                                    f"for {model!r} in {env!r}")
        status.auto_kill = auto_kill
        act = active_row(session, m, env)
        audit.append(session, actor=actor.name, action="monitor.configure", model=model,
                     version=act.version.number if act else None, environment=env, reason=reason,
                     details={"auto_kill": auto_kill})
        session.flush()
    return health(model, env, session=session)


# ---------------------------------------------------------------- reads

def health(model: str, environment: str, *, session: Session, settings: MonitorSettings | None = None) -> Health:
    """The verdict of the active version of (model, environment), with its assessment."""
    env = check_environment(environment)
    settings = settings or MonitorSettings()
    with translate_errors():
        m = model_row(session, model)
        act = active_row(session, m, env)
        status = session.get(MonitorStatus, (m.id, env))
        ks = kill_row(session, m, env)
        killed, auto_kill = bool(ks and ks.killed), bool(status and status.auto_kill)
        if act is None:
            return Health(model, env, None, "unknown", None, None, False, killed, auto_kill, 0, 0, None)
        v = act.version
        batches, rows = session.execute(select(func.count(), func.coalesce(func.sum(ShadowBatch.n_rows), 0)).where(
            ShadowBatch.model_id == m.id, ShadowBatch.environment == env, ShadowBatch.version_id == v.id)).one()
        if status is not None and status.version_id == v.id and status.assessment:
            return Health(model, env, v.number, status.verdict, status.since, status.assessed_at, True, killed,
                          auto_kill, int(batches), int(rows), json.loads(status.assessment))
        assessment = _assess(session, m, env, v, settings) if batches else None
        verdict = assessment.verdict if assessment is not None else "unknown"
        return Health(model, env, v.number, verdict, None, None, False, killed, auto_kill, int(batches), int(rows),
                      None if assessment is None else assessment.to_json())


def series(model: str, environment: str, *, session: Session, version: int | None = None,
           segments: Sequence[str] | None = None) -> list[Point]:
    """The time series of the risk bounds of (model, environment), oldest first (one version, or all)."""
    env = check_environment(environment)
    with translate_errors():
        m = model_row(session, model)
        q = (select(MonitorPoint, VersionRow.number).join(VersionRow, VersionRow.id == MonitorPoint.version_id)
             .where(MonitorPoint.model_id == m.id, MonitorPoint.environment == env).order_by(MonitorPoint.id))
        if version is not None:
            q = q.where(MonitorPoint.version_id == version_row(session, model, version).id)
        if segments:
            q = q.where(MonitorPoint.segment.in_(list(segments)))
        return [Point(number, p.segment, p.at, p.batch_id, p.n, p.losses, p.eps, p.lower, p.upper)
                for p, number in session.execute(q)]


def environments(model: str, *, session: Session) -> list[str]:
    """Environments of ``model`` that received shadow logs, sorted."""
    with translate_errors():
        m = model_row(session, model)
        return sorted(session.scalars(select(ShadowBatch.environment).where(ShadowBatch.model_id == m.id).distinct()))


@dataclass(frozen=True)
class RecordedVerdict:
    """A row of ``monitor_status``: the last recorded verdict of (model, environment)."""

    model: str
    environment: str
    version: int | None
    verdict: str
    auto_kill: bool
    segments: Mapping[str, Mapping[str, Any]]


def recorded_verdicts(*, session: Session) -> list[RecordedVerdict]:
    """Every recorded verdict with its segments' bounds (for ``/metrics``), in one query."""
    with translate_errors():
        q = (select(Model.name, MonitorStatus, VersionRow.number).join(Model, Model.id == MonitorStatus.model_id)
             .outerjoin(VersionRow, VersionRow.id == MonitorStatus.version_id)
             .order_by(Model.name, MonitorStatus.environment))
        out = []
        for name, st, number in session.execute(q):
            segs = (json.loads(st.assessment).get("segments") or {}) if st.assessment else {}
            out.append(RecordedVerdict(name, st.environment, number, st.verdict, st.auto_kill, segs))
        return out


def export(model: str, environment: str, *, session: Session, version: int | None = None) -> ExitLogs:
    """Every stored shadow row of (model, environment) served by ``version`` (default: the active one).

    The logs to recalibrate on when the verdict says so (``exitwise monitor export``), in upload
    order; a request id uploaded twice is kept once (its first upload), so the file reads back.
    """
    env = check_environment(environment)
    with translate_errors():
        m = model_row(session, model)
        v = _served_version(session, m, env, version)
        document = json.loads(v.content)
        rows = session.execute(select(ShadowBatch.payload, ShadowBatch.media_type).where(
            ShadowBatch.model_id == m.id, ShadowBatch.environment == env, ShadowBatch.version_id == v.id)
            .order_by(ShadowBatch.id)).all()
    source = f"shadow logs of {model} v{v.number} in {env}"
    parts = [read_shadow_logs(payload, media, document, max_rows=len(payload) + 1) for payload, media in rows]
    if not parts:
        raise NotFound(f"no shadow logs of {model!r} version {v.number} in environment {env!r}")
    logs = concat_logs(parts, source)
    if logs.request_ids is not None:
        _, first = np.unique(np.asarray(logs.request_ids).astype(str), return_index=True)
        if first.size < logs.n:
            logs = logs.take(np.sort(first))
    return logs
