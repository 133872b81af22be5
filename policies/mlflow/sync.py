"""The database side of the mirror: which models MLflow is behind on, syncing them, recording the outcome.

The audit trail is the outbox: a model is pending while it has audit events past the
``synced_seq`` of its ``mlflow_sync`` row (:class:`~exitwise.policies.models.MlflowSync`), or
monitoring points past its ``monitor_synced_id`` (shadow batches that changed no verdict leave
no audit event), or when it was last synced to another tracking URI. :func:`sync_model` reads
the store in a short read-only transaction, talks to MLflow with no transaction open
(:func:`reconcile`, then :func:`~exitwise.policies.mlflow.monitor.mirror_monitoring` for the
monitoring metrics), then records the outcome; an MLflow failure is recorded and leaves the
model pending.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import MissingDependency
from exitwise.calibration.optional import require
from exitwise.policies import store
from exitwise.policies.db import translate_errors, unit_of_work
from exitwise.policies.errors import NotFound, PolicyError
from exitwise.policies.mlflow.config import MlflowConfig, client_for, mlflow_config, redact_uri, registered_model_name
from exitwise.policies.mlflow.errors import RegistryError, translate
from exitwise.policies.mlflow.monitor import (
    PointSource,
    Stream,
    last_points,
    mirror_monitoring,
    monitor_snapshot,
    new_points,
)
from exitwise.policies.mlflow.payload import VersionRecord
from exitwise.policies.mlflow.publish import ReportSource
from exitwise.policies.mlflow.reconcile import DesiredState, DocumentSource, SyncResult, reconcile
from exitwise.policies.models import AuditEvent, KillSwitch, MlflowSync, Model, utcnow
from exitwise.policies.monitoring import Point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncStatus:
    """One model's mirror state as the policy database records it (no MLflow call)."""

    model: str
    audit_seq: int
    synced_seq: int
    pending: bool
    tracking_uri: str | None
    synced_at: datetime | None
    attempted_at: datetime | None
    failures: int
    last_error: str | None
    monitor_point_id: int = 0  # the model's highest monitoring point id
    monitor_synced_id: int = 0  # the highest one mirrored as run metrics

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("synced_at", "attempted_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


@dataclass(frozen=True)
class SyncOutcome:
    """The result of syncing one model: ``result`` when MLflow was updated, else ``error``."""

    model: str
    ok: bool
    synced_seq: int
    audit_seq: int = 0  # the model's audit head when the attempt read the store
    result: SyncResult | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "ok": self.ok, "synced_seq": self.synced_seq, "audit_seq": self.audit_seq,
                "error": self.error,
                "result": self.result.to_json() if self.result is not None else None}


def sync_status(*, session: Session, config: MlflowConfig | None = None) -> list[SyncStatus]:
    """Every model's mirror state; ``pending`` when MLflow is behind the audit trail or the
    monitoring points (or was synced elsewhere)."""
    config = config or mlflow_config()
    uri = redact_uri(config.tracking_uri)
    with translate_errors():
        heads = _audit_heads(session)
        points = last_points(session)
        rows = {r.model: r for r in session.scalars(select(MlflowSync))}
        names = sorted(set(session.scalars(select(Model.name))) | set(heads))
    out = []
    for name in names:
        r = rows.get(name)
        head = heads.get(name, 0)
        synced = r.synced_seq if r is not None else 0
        point, point_synced = points.get(name, 0), (r.monitor_synced_id or 0) if r is not None else 0
        pending = head > synced or point > point_synced or r is None or r.tracking_uri != uri
        out.append(SyncStatus(
            model=name, audit_seq=head, synced_seq=synced, pending=pending,
            tracking_uri=r.tracking_uri if r else None, synced_at=r.synced_at if r else None,
            attempted_at=r.attempted_at if r else None, failures=r.failures if r else 0,
            last_error=r.last_error if r else None, monitor_point_id=point, monitor_synced_id=point_synced,
        ))
    return out


def pending_models(*, session: Session, config: MlflowConfig | None = None) -> list[str]:
    """Models whose MLflow mirror is behind the policy database."""
    return [s.model for s in sync_status(session=session, config=config) if s.pending]


def desired_state(model: str, *, session: Session) -> tuple[DesiredState, int]:
    """The store's view of ``model`` (no documents) and its audit head, read in one transaction."""
    with translate_errors():
        head = _audit_heads(session, model).get(model, 0)
        info = next((m for m in store.list_models(session=session) if m.name == model), None)
        if info is None:
            raise NotFound(f"no model named {model!r}")
        versions = tuple(
            VersionRecord(model=model, number=v.number, content_hash=v.content_hash, author=v.author,
                          state=v.state, data_fingerprint=v.data_fingerprint)
            for v in store.list_versions(model, session=session)
        )
        envs = set(info.active) | set(info.killed)
        killed = {env: env in info.killed for env in envs}
        for env in session.scalars(select(KillSwitch.environment).join(Model).where(Model.name == model)):
            killed.setdefault(env, False)
    return DesiredState(model=model, versions=versions, active=dict(info.active), killed=killed), head


def sync_model(
    engine: Engine,
    model: str,
    *,
    config: MlflowConfig | None = None,
    client: Any = None,
    reports: bool = True,
) -> SyncOutcome:
    """Bring ``model``'s MLflow mirror up to date with the policy database (idempotent).

    The registered versions, aliases and tags (:func:`reconcile`), then the monitoring time
    series of every version as metrics on its run (:mod:`exitwise.policies.mlflow.monitor`).
    Reads the store in a short read-only transaction, talks to MLflow with no transaction
    open, then records the outcome. MLflow failures do not raise: they are recorded (the
    model stays pending) and returned as ``ok=False``; database failures raise, and so does
    ``MissingDependency`` when the ``mlflow`` extra is not installed.
    """
    config = config or mlflow_config()
    with unit_of_work(engine, readonly=True) as s:
        desired, head = desired_state(model, session=s)
        monitored = monitor_snapshot(model, session=s)
    document_for, report_for = _loaders(engine, model, reports)
    try:
        client = client or client_for(config)
        result = reconcile(client, config, desired, document_for=document_for, report_for=report_for)
        mirrored = mirror_monitoring(client, result.runs, monitored, _points_loader(engine, model))
        result = replace(result, monitor=mirrored.metrics)
    except MissingDependency:
        raise
    except PolicyError as exc:
        if not isinstance(exc, RegistryError):
            raise
        seq = _record(engine, model, config, synced_seq=None, error=str(exc))
        log.warning("MLflow sync of %s failed (stays pending): %s", model, exc)
        return SyncOutcome(model=model, ok=False, synced_seq=seq, audit_seq=head, error=str(exc))
    except Exception as exc:  # mlflow import/config problems: same treatment, never a crash
        err = translate(exc, f"syncing {registered_model_name(model)}", config)
        seq = _record(engine, model, config, synced_seq=None, error=str(err))
        log.warning("MLflow sync of %s failed (stays pending): %s", model, err)
        return SyncOutcome(model=model, ok=False, synced_seq=seq, audit_seq=head, error=str(err))
    seq = _record(engine, model, config, synced_seq=head, error=None, monitor_id=monitored.last_point)
    return SyncOutcome(model=model, ok=True, synced_seq=seq, audit_seq=head, result=result)


def sync_all(
    engine: Engine,
    *,
    config: MlflowConfig | None = None,
    client: Any = None,
    only_pending: bool = False,
    reports: bool = True,
) -> list[SyncOutcome]:
    """Sync every model (or only the pending ones); stops talking to MLflow once it is unreachable."""
    config = config or mlflow_config()
    with unit_of_work(engine, readonly=True) as s:
        statuses = sync_status(session=s, config=config)
    models = [st.model for st in statuses if st.pending or not only_pending]
    outcomes: list[SyncOutcome] = []
    for i, model in enumerate(models):
        outcome = sync_model(engine, model, config=config, client=client, reports=reports)
        outcomes.append(outcome)
        if not outcome.ok and outcome.error and outcome.error.startswith("MLflow unreachable"):
            for rest in models[i + 1:]:  # record the outage without waiting on the server again
                seq = _record(engine, rest, config, synced_seq=None, error=outcome.error)
                outcomes.append(SyncOutcome(model=rest, ok=False, synced_seq=seq, error=outcome.error))
            break
    return outcomes


def _audit_heads(session: Session, model: str | None = None) -> dict[str, int]:
    """The last audit ``seq`` of every model (or of ``model``)."""
    q = select(AuditEvent.model, func.max(AuditEvent.seq)).where(AuditEvent.model.is_not(None))
    if model is not None:
        q = q.where(AuditEvent.model == model)
    return {m: int(seq) for m, seq in session.execute(q.group_by(AuditEvent.model))}


def _loaders(engine: Engine, model: str, reports: bool) -> tuple[DocumentSource, ReportSource | None]:
    """Read one version's document (or its audit report) in its own short read-only transaction."""

    def document_for(number: int) -> Mapping[str, Any]:
        with unit_of_work(engine, readonly=True) as s:
            return store.get_version(model, number, session=s).document

    def report_for(number: int) -> bytes | None:
        report = require("exitwise.policies.report", "reports", "the audit report attached in MLflow")
        with unit_of_work(engine, readonly=True) as s:
            return report.report_bytes(s, model, number, "html")

    return document_for, (report_for if reports else None)


def _points_loader(engine: Engine, model: str) -> PointSource:
    """A stream's points past a step (with the version's segment labels), in a short read-only transaction."""

    def points_for(stream: Stream, after: int) -> tuple[dict[str, str], list[tuple[int, Point]]]:
        with unit_of_work(engine, readonly=True) as s:
            return new_points(model, stream, after, session=s)

    return points_for


def _record(engine: Engine, model: str, config: MlflowConfig, *, synced_seq: int | None, error: str | None,
            monitor_id: int = 0) -> int:
    """Write the outcome of one attempt; returns the synced seq now recorded."""
    now = utcnow()
    with unit_of_work(engine) as s:
        row = s.get(MlflowSync, model)
        if row is None:
            row = MlflowSync(model=model, synced_seq=0, failures=0)
            s.add(row)
        row.attempted_at = now
        if error is None and synced_seq is not None:
            uri = redact_uri(config.tracking_uri)
            if row.tracking_uri != uri:
                row.synced_seq, row.monitor_synced_id = 0, None
            row.synced_seq = max(row.synced_seq, synced_seq)
            row.monitor_synced_id = max(row.monitor_synced_id or 0, monitor_id) or None
            row.tracking_uri, row.synced_at, row.failures, row.last_error = uri, now, 0, None
        else:
            row.failures = (row.failures or 0) + 1
            row.last_error = (error or "")[:2000]
        return row.synced_seq
