"""Read side of the policy store and its domain objects (ORM rows never leave this layer).

Changes live in :mod:`exitwise.policies.lifecycle`; both take ``*, session`` and never commit
(wrap calls in :func:`exitwise.policies.db.unit_of_work`). Like MLflow's ``SqlAlchemyStore``,
every function hands back frozen dataclasses built from rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from exitwise.calibration.exceptions import InputError
from exitwise.policies.db import translate_errors
from exitwise.policies.diff import PolicyDiff, diff_documents
from exitwise.policies.errors import NotFound
from exitwise.policies.models import Activation, KillSwitch, Model
from exitwise.policies.models import PolicyVersion as VersionRow
from exitwise.policies.names import ENVIRONMENT_RE, ENVIRONMENT_RULE

# ---------------------------------------------------------------- domain objects

@dataclass(frozen=True)
class Approval:
    approver: str
    reason: str | None
    created_at: datetime
    certificate: str | None = None  # "reverified" | "not_reverified" | None (before migration 0003)
    certificate_detail: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """A policy version without its document (cheap to list)."""

    model: str
    number: int
    content_hash: str
    state: str
    parent: int | None
    author: str
    created_at: datetime
    data_fingerprint: str | None
    compute_fraction: float | None
    risk: float | None
    risk_type: str | None
    eps: float | None
    delta: float | None
    certified: bool | None
    approvals: tuple[Approval, ...] = ()
    active_in: tuple[str, ...] = ()

    def governance(self) -> dict[str, Any]:
        """The governance fields added to a served document (excluded from the hash)."""
        return {
            "version": self.number,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
            "approvals": [{"by": a.approver, "reason": a.reason, "at": a.created_at.isoformat(),
                           "certificate": a.certificate, "certificate_detail": a.certificate_detail}
                          for a in self.approvals],
            "environments": list(self.active_in),
        }


@dataclass(frozen=True)
class PolicyVersion(VersionInfo):
    """A policy version with its document (a fresh dict per call: mutate freely)."""

    content: str = ""

    @property
    def document(self) -> dict[str, Any]:
        """The stored content: the document as created, ``content_hash`` included."""
        return json.loads(self.content)

    def served_document(self) -> dict[str, Any]:
        return {**self.document, **self.governance()}


@dataclass(frozen=True)
class ActivePolicy:
    """What a runtime is served for (model, environment): the read path of the API."""

    model: str
    environment: str
    version: int
    content_hash: str
    killed: bool
    activated_at: datetime
    activated_by: str
    content: str = field(repr=False, default="")

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.content)

    def served_document(self) -> dict[str, Any]:
        """The document plus governance fields (version, state, environment, killed, activated_at)."""
        return {**self.document, "version": self.version, "state": "active", "environment": self.environment,
                "killed": self.killed, "activated_at": self.activated_at.isoformat()}


@dataclass(frozen=True)
class KillState:
    model: str
    environment: str
    killed: bool
    reason: str | None = None
    changed_at: datetime | None = None
    changed_by: str | None = None


@dataclass(frozen=True)
class ActivationRecord:
    model: str
    environment: str
    version: int
    content_hash: str
    active: bool
    activated_at: datetime
    activated_by: str
    deactivated_at: datetime | None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    created_at: datetime
    versions: int
    latest: int | None
    active: dict[str, int]
    killed: tuple[str, ...]


@dataclass(frozen=True)
class VersionDiff:
    """Two stored versions of ``model`` compared (``a`` before, ``b`` after; see :mod:`exitwise.policies.diff`)."""

    model: str
    a: int
    b: int
    diff: PolicyDiff


# ---------------------------------------------------------------- row -> domain

def check_environment(env: str) -> str:
    if not isinstance(env, str) or not ENVIRONMENT_RE.match(env):
        raise InputError(f"invalid environment {env!r}: {ENVIRONMENT_RULE}")
    return env


def _info_fields(row: VersionRow, session: Session) -> dict[str, Any]:
    active_in = tuple(session.scalars(
        select(Activation.environment).where(Activation.version_id == row.id, Activation.active)
        .order_by(Activation.environment)))
    return dict(
        model=row.model.name, number=row.number, content_hash=row.content_hash, state=row.state,
        parent=row.parent.number if row.parent is not None else None, author=row.author.name,
        created_at=row.created_at, data_fingerprint=row.data_fingerprint, compute_fraction=row.compute_fraction,
        risk=row.risk, risk_type=row.risk_type, eps=row.eps, delta=row.delta, certified=row.certified,
        approvals=tuple(Approval(a.approver.name, a.reason, a.created_at, a.certificate, a.certificate_detail)
                        for a in row.approvals),
        active_in=active_in,
    )


def version_info(row: VersionRow, session: Session) -> VersionInfo:
    return VersionInfo(**_info_fields(row, session))


def version_domain(row: VersionRow, session: Session) -> PolicyVersion:
    return PolicyVersion(**_info_fields(row, session), content=row.content)


def model_row(session: Session, name: str) -> Model:
    row = session.scalars(select(Model).where(Model.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"no model named {name!r}")
    return row


def version_row(session: Session, model: str, number: int) -> VersionRow:
    m = model_row(session, model)
    row = session.scalars(select(VersionRow).where(VersionRow.model_id == m.id, VersionRow.number == number)
                          ).one_or_none()
    if row is None:
        raise NotFound(f"model {model!r} has no version {number}")
    return row


def active_row(session: Session, model: Model, env: str) -> Activation | None:
    return session.scalars(select(Activation).where(
        Activation.model_id == model.id, Activation.environment == env, Activation.active)).one_or_none()


def kill_row(session: Session, model: Model, env: str) -> KillSwitch | None:
    return session.get(KillSwitch, (model.id, env))


# ---------------------------------------------------------------- reads

def list_models(*, session: Session) -> list[ModelInfo]:
    with translate_errors():
        out = []
        for m in session.scalars(select(Model).order_by(Model.name)):
            numbers = list(session.scalars(select(VersionRow.number).where(VersionRow.model_id == m.id)))
            active = {a.environment: a.version.number for a in session.scalars(
                select(Activation).where(Activation.model_id == m.id, Activation.active))}
            killed = tuple(sorted(session.scalars(select(KillSwitch.environment).where(
                KillSwitch.model_id == m.id, KillSwitch.killed))))
            out.append(ModelInfo(m.name, m.created_at, len(numbers), max(numbers, default=None),
                                 dict(sorted(active.items())), killed))
        return out


def list_versions(model: str | None = None, *, session: Session) -> list[VersionInfo]:
    """Versions (no documents), by model then number; ``NotFound`` for an unknown model."""
    with translate_errors():
        q = (select(VersionRow).join(Model).options(selectinload(VersionRow.approvals))
             .order_by(Model.name, VersionRow.number))
        if model is not None:
            q = q.where(VersionRow.model_id == model_row(session, model).id)
        return [version_info(r, session) for r in session.scalars(q)]


def documents(model: str | None = None, *, session: Session) -> dict[tuple[str, int], dict[str, Any]]:
    """Every stored document (of ``model``), keyed by (model, number), in one query."""
    with translate_errors():
        q = select(Model.name, VersionRow.number, VersionRow.content).join(Model)
        if model is not None:
            q = q.where(VersionRow.model_id == model_row(session, model).id)
        return {(name, number): json.loads(content) for name, number, content in session.execute(q)}


def get_version(model: str, number: int, *, session: Session) -> PolicyVersion:
    with translate_errors():
        return version_domain(version_row(session, model, number), session)


def get_active(model: str, environment: str, *, session: Session) -> ActivePolicy:
    """The active version for (model, environment) and its kill-switch state; ``NotFound`` if none."""
    check_environment(environment)
    with translate_errors():
        m = model_row(session, model)
        act = active_row(session, m, environment)
        if act is None:
            raise NotFound(f"no active policy for model {model!r} in environment {environment!r}")
        ks = kill_row(session, m, environment)
        v = act.version
        return ActivePolicy(model=model, environment=environment, version=v.number, content_hash=v.content_hash,
                            killed=bool(ks and ks.killed), activated_at=act.activated_at,
                            activated_by=act.activated_by.name, content=v.content)


def get_kill_switch(model: str, environment: str, *, session: Session) -> KillState:
    check_environment(environment)
    with translate_errors():
        m = model_row(session, model)
        ks = kill_row(session, m, environment)
        if ks is None:
            return KillState(model, environment, False)
        return KillState(model, environment, ks.killed, ks.reason, ks.changed_at, ks.changed_by.name)


def list_activations(model: str, environment: str | None = None, *, session: Session) -> list[ActivationRecord]:
    """Activation history, newest first."""
    with translate_errors():
        m = model_row(session, model)
        q = select(Activation).where(Activation.model_id == m.id).order_by(Activation.id.desc())
        if environment is not None:
            q = q.where(Activation.environment == check_environment(environment))
        return [ActivationRecord(model, a.environment, a.version.number, a.version.content_hash, a.active,
                                 a.activated_at, a.activated_by.name, a.deactivated_at) for a in session.scalars(q)]


def diff_versions(model: str, a: int, b: int, *, session: Session) -> VersionDiff:
    """Versions ``a`` and ``b`` of ``model`` compared (:func:`exitwise.policies.diff.diff_documents`)."""
    va, vb = get_version(model, a, session=session), get_version(model, b, session=session)
    return VersionDiff(model=model, a=a, b=b, diff=diff_documents(va.document, vb.document))
