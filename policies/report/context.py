"""The facts an audit report shows, and how they are collected from the store's services.

:class:`ReportContext` is everything the report shows: the document plus governance facts,
audit events, the diff against the parent version (:mod:`exitwise.policies.diff`) and the
audit-chain check done at render time. Rendering is a pure function of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from exitwise.policies import audit, monitoring, store
from exitwise.policies.diff import PolicyDiff, diff_documents
from exitwise.policies.errors import NotFound
from exitwise.policies.report.formatting import fmt_time
from exitwise.policies.schema import validate_document


@dataclass(frozen=True)
class Approval:
    """One approval of the version (four eyes: never the author)."""

    principal: str
    at: dt.datetime | str | None = None
    comment: str | None = None
    certificate: str | None = None  # "reverified" | "not_reverified" | None (approved before it was recorded)
    certificate_detail: str | None = None


@dataclass(frozen=True)
class EnvironmentStatus:
    """Where the version stands in one environment, and that environment's kill switch."""

    environment: str
    state: str  # e.g. "active", "superseded", "retired", "not deployed"
    killed: bool = False
    since: dt.datetime | str | None = None
    active_version: int | None = None  # the version active there now (may be another one)


@dataclass(frozen=True)
class AuditEvent:
    """One audit-trail event of the version, as the store returns it."""

    at: dt.datetime | str | None
    actor: str
    action: str
    reason: str | None = None
    environment: str | None = None
    before_hash: str | None = None
    after_hash: str | None = None
    seq: int | None = None
    event_hash: str | None = None


@dataclass(frozen=True)
class ChainVerification:
    """The result of verifying the audit hash chain when the report was rendered."""

    ok: bool
    checked: int
    message: str = ""
    verified_at: dt.datetime | str | None = None


@dataclass(frozen=True)
class Monitoring:
    """What shadow traffic showed about the version in one environment (``exitwise.policies.monitoring``).

    ``verdict`` is the environment's verdict now when the version is active there (None when it
    no longer is); ``points`` the risk bounds after every batch (``Point.to_json`` dicts).
    """

    environment: str
    verdict: str | None
    rows: int = 0
    reasons: tuple[str, ...] = ()
    recommendation: str | None = None
    points: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class ReportContext:
    """Every fact the report shows; rendering is a pure function of it."""

    document: Mapping[str, Any]
    version: int | None = None
    state: str | None = None
    author: str | None = None
    created_at: dt.datetime | str | None = None
    approvals: tuple[Approval, ...] = ()
    environments: tuple[EnvironmentStatus, ...] = ()
    audit_events: tuple[AuditEvent, ...] = ()
    chain: ChainVerification | None = None
    parent_version: int | None = None
    diff: PolicyDiff | None = None  # the parent's document (before) against this one (after)
    generated_at: dt.datetime | str | None = None
    mlflow_run_id: str | None = None
    monitoring: tuple[Monitoring, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)  # more summary rows, shown as given

    @property
    def model(self) -> str:
        return str(self.document.get("model", {}).get("name", "?"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def make_context(
    document: Mapping[str, Any], *, parent_document: Mapping[str, Any] | None = None,
    parent_version: int | None = None, generated_at: dt.datetime | str | None = None, **facts: Any,
) -> ReportContext:
    """A :class:`ReportContext` with the diff against ``parent_document`` (when given) computed here.

    ``parent_version`` defaults to the document's own ``parent`` field.
    """
    diff = diff_documents(parent_document, document) if parent_document is not None else None
    return ReportContext(document=document, diff=diff,
                         parent_version=parent_version if parent_version is not None else document.get("parent"),
                         generated_at=generated_at or _now(), **facts)


def context_from_document(document: Mapping[str, Any], *, parent_document: Mapping[str, Any] | None = None,
                          **facts: Any) -> ReportContext:
    """A context for a policy document that is not (yet) in the store: no governance facts.

    Validates the document first, so a report is never drawn from a malformed or tampered file.
    """
    validate_document(dict(document))
    facts.setdefault("state", "unregistered")
    return make_context(document, parent_document=parent_document, **facts)


def _environments(session: Session, model: str, number: int) -> tuple[EnvironmentStatus, ...]:
    """Where version ``number`` stands in every environment the model was deployed to or has a kill switch in."""
    activations = store.list_activations(model, session=session)  # newest first
    killed_envs = next((m.killed for m in store.list_models(session=session) if m.name == model), ())
    environments = []
    for env in sorted({a.environment for a in activations} | set(killed_envs)):
        current = next((a for a in activations if a.environment == env and a.active), None)
        mine = next((a for a in activations if a.environment == env and a.version == number), None)
        if mine is None:
            state, since = "not deployed", None
        elif mine.active:
            state, since = "active", mine.activated_at
        else:
            state, since = f"was active until {fmt_time(mine.deactivated_at)}", mine.activated_at
        ks = store.get_kill_switch(model, env, session=session)
        environments.append(EnvironmentStatus(env, state, bool(ks.killed), since,
                                              current.version if current is not None else None))
    return tuple(environments)


def _monitoring(session: Session, model: str, number: int) -> tuple[Monitoring, ...]:
    """The version's monitoring in every environment that sent shadow logs of it."""
    out = []
    for env in monitoring.environments(model, session=session):
        points = tuple(p.to_json() for p in monitoring.series(model, env, session=session, version=number))
        if not points:
            continue
        health = monitoring.health(model, env, session=session)
        current = health.version == number
        a = (health.assessment or {}) if current else {}
        out.append(Monitoring(env, health.verdict if current else None, max(p["n"] for p in points),
                              tuple(a.get("reasons") or ()), a.get("recommendation"), points))
    return tuple(out)


def build_context(session: Session, model: str, version: int) -> ReportContext:
    """Collect the facts of (``model``, ``version``) from the store's services into a context.

    Reads only (``session`` may be read-only): the version and its parent's document, the
    approvals, where the version stands in every environment the model was ever deployed to
    (or has a kill switch in), the version's audit events (oldest first), its monitoring from
    shadow traffic and a verification of the whole audit chain done now. Raises ``NotFound`` for
    an unknown model or version.
    """
    number = int(version)
    v = store.get_version(model, number, session=session)
    parent_doc = None
    if v.parent is not None:
        try:
            parent_doc = store.get_version(model, v.parent, session=session).document
        except NotFound:
            parent_doc = None
    events = sorted((e for e in audit.log(session=session, model=model, limit=None) if e.version == number),
                    key=lambda e: e.seq)
    chain = audit.verify(session=session)
    return make_context(
        v.document,
        parent_document=parent_doc,
        parent_version=v.parent,
        version=number,
        state=v.state,
        author=v.author,
        created_at=v.created_at,
        approvals=tuple(Approval(a.approver, a.created_at, a.reason, a.certificate, a.certificate_detail)
                        for a in v.approvals),
        environments=_environments(session, model, number),
        audit_events=tuple(
            AuditEvent(at=e.timestamp, actor=e.actor, action=e.action, reason=e.reason, environment=e.environment,
                       before_hash=e.before_hash, after_hash=e.after_hash, seq=e.seq, event_hash=e.hash)
            for e in events),
        chain=ChainVerification(ok=chain.ok, checked=chain.events, message=chain.message, verified_at=_now()),
        monitoring=_monitoring(session, model, number),
    )
