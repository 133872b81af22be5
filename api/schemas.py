"""Request and response bodies of the REST API (pydantic), built from the store's domain objects."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from exitwise.policies import monitoring, store
from exitwise.policies.audit import ChainReport, Event
from exitwise.policies.names import ENVIRONMENT_MAX, ENVIRONMENT_PATTERN, MODEL_NAME_MAX, MODEL_NAME_PATTERN
from exitwise.policies.principals import Principal

Environment = Annotated[str, Field(
    min_length=1, max_length=ENVIRONMENT_MAX, pattern=ENVIRONMENT_PATTERN,
    description="Deployment environment, e.g. production, staging", examples=["production"])]
Reason = Annotated[str, Field(min_length=1, max_length=2000, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*$",
                                description="Why (recorded in the audit trail); no control characters "
                                            "other than tab and line breaks")]
ModelName = Annotated[str, Field(min_length=1, max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- requests

class ApproveRequest(_In):
    reason: Reason
    accept_weaker: Reason | None = Field(
        None, description="Approve a version that drops or loosens promises of its parent or of an active "
                          "version (higher eps or delta, a per-segment budget dropped, ...): why (audited)")


class ActivateRequest(_In):
    env: Environment
    reason: Reason


class RollbackRequest(_In):
    env: Environment
    to: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        None, description="Version to re-activate; default: the one active before the current one")
    reason: Reason | None = None


class KillRequest(_In):
    env: Environment
    reason: Reason


class MonitorConfigRequest(_In):
    env: Environment
    auto_kill: bool = Field(description="trip the kill switch when the verdict becomes breach (off by default)")
    reason: Reason


# ---------------------------------------------------------------- responses

class PrincipalOut(_Out):
    name: str
    role: Literal["reader", "author", "approver", "admin"]
    created_at: datetime

    @classmethod
    def of(cls, p: Principal) -> PrincipalOut:
        return cls(name=p.name, role=p.role, created_at=p.created_at)  # type: ignore[arg-type]


class ApprovalOut(_Out):
    approver: str
    reason: str | None
    created_at: datetime
    certificate: Literal["reverified", "not_reverified"] | None = Field(
        None, description="reverified: the service re-ran the certification from the version's evidence; "
                          "not_reverified: approved as claimed by the author; null: approved before this was recorded")
    certificate_detail: str | None = None


class VersionOut(_Out):
    """A policy version's governance facts and headline numbers (no document)."""

    model: str
    version: int
    content_hash: str
    state: Literal["draft", "approved", "active", "superseded", "retired"]
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
    approvals: list[ApprovalOut]
    active_in: list[str]

    @classmethod
    def of(cls, v: store.VersionInfo) -> VersionOut:
        return cls(
            model=v.model, version=v.number, content_hash=v.content_hash, state=v.state,  # type: ignore[arg-type]
            parent=v.parent, author=v.author, created_at=v.created_at, data_fingerprint=v.data_fingerprint,
            compute_fraction=v.compute_fraction, risk=v.risk, risk_type=v.risk_type, eps=v.eps, delta=v.delta,
            certified=v.certified, active_in=list(v.active_in),
            approvals=[ApprovalOut(approver=a.approver, reason=a.reason, created_at=a.created_at,
                                   certificate=a.certificate, certificate_detail=a.certificate_detail)  # type: ignore[arg-type]
                       for a in v.approvals],
        )


class VersionDetail(VersionOut):
    """A version with its policy document as stored (``content_hash`` included)."""

    document: dict[str, Any]

    @classmethod
    def of(cls, v: store.PolicyVersion) -> VersionDetail:  # type: ignore[override]
        return cls(**VersionOut.of(v).model_dump(), document=v.document)


class VersionList(_Out):
    model: str
    versions: list[VersionOut]


class ModelOut(_Out):
    name: str
    created_at: datetime
    versions: int
    latest: int | None
    active: dict[str, int] = Field(description="environment -> active version number")
    killed: list[str] = Field(description="environments whose kill switch is on")

    @classmethod
    def of(cls, m: store.ModelInfo) -> ModelOut:
        return cls(name=m.name, created_at=m.created_at, versions=m.versions, latest=m.latest,
                   active=dict(m.active), killed=list(m.killed))


class ModelList(_Out):
    models: list[ModelOut]


class ActiveOut(_Out):
    """What runtimes of (model, environment) are served after the change."""

    model: str
    environment: str
    version: int
    content_hash: str
    killed: bool
    activated_at: datetime
    activated_by: str

    @classmethod
    def of(cls, a: store.ActivePolicy) -> ActiveOut:
        return cls(model=a.model, environment=a.environment, version=a.version, content_hash=a.content_hash,
                   killed=a.killed, activated_at=a.activated_at, activated_by=a.activated_by)


class KillStateOut(_Out):
    model: str
    environment: str
    killed: bool
    reason: str | None
    changed_at: datetime | None
    changed_by: str | None

    @classmethod
    def of(cls, k: store.KillState) -> KillStateOut:
        return cls(model=k.model, environment=k.environment, killed=k.killed, reason=k.reason,
                   changed_at=k.changed_at, changed_by=k.changed_by)


class ThresholdChangeOut(_Out):
    segment: str
    exit: int
    exit_name: str
    class_: str | None = Field(alias="class", serialization_alias="class")
    before: float | None = Field(description="null: never exit")
    after: float | None = Field(description="null: never exit")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class WeakeningOut(_Out):
    what: str = Field(description="the promise, as a path into the document")
    before: Any
    after: Any
    message: str


class DiffOut(_Out):
    model: str
    a: int
    b: int
    a_hash: str
    b_hash: str
    identical: bool
    thresholds: list[ThresholdChangeOut]
    guarantee: dict[str, list[Any]] = Field(description="field -> [value in a, value in b]")
    expected: dict[str, list[Any]] = Field(description="headline expectation -> [value in a, value in b]")
    changed_fields: list[str]
    weakened: list[WeakeningOut] = Field(
        description="promises of a that b drops or loosens (approving such a version needs accept_weaker)")

    @classmethod
    def of(cls, d: store.VersionDiff) -> DiffOut:
        x = d.diff
        return cls(
            model=d.model, a=d.a, b=d.b, a_hash=x.before_hash, b_hash=x.after_hash, identical=x.identical,
            thresholds=[ThresholdChangeOut(segment=t.segment, exit=t.exit, exit_name=t.exit_name, class_=t.class_,
                                           before=t.before, after=t.after) for t in x.thresholds],
            guarantee={k: list(v) for k, v in x.guarantee.items()},
            expected={k: list(v) for k, v in x.expected.items()},
            changed_fields=list(x.changed_fields),
            weakened=[WeakeningOut(what=w.what, before=w.before, after=w.after, message=w.message)
                      for w in x.weakened],
        )


class AuditEventOut(_Out):
    seq: int
    ts: str = Field(description="UTC, YYYY-MM-DDTHH:MM:SS.ffffffZ")
    actor: str
    action: str
    model: str | None
    version: int | None
    environment: str | None
    reason: str | None
    before_hash: str | None
    after_hash: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def of(cls, e: Event) -> AuditEventOut:
        return cls(**e.to_dict())


class AuditPage(_Out):
    events: list[AuditEventOut] = Field(description="Oldest first")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


class ChainReportOut(_Out):
    ok: bool
    events: int
    head_seq: int
    head_hash: str
    broken_seq: int | None
    problem: Literal["edited", "deleted", "reordered", "truncated", "unrecorded", "anchor", "state"] | None
    message: str
    details: dict[str, Any]

    @classmethod
    def of(cls, r: ChainReport) -> ChainReportOut:
        return cls(ok=r.ok, events=r.events, head_seq=r.head_seq, head_hash=r.head_hash, broken_seq=r.broken_seq,
                   problem=r.problem, message=r.message, details=dict(r.details))


class Health(_Out):
    status: Literal["ok"]


class Ready(_Out):
    status: Literal["ready"]
    database: str = Field(description="backend name, e.g. sqlite, postgresql")
    revision: str = Field(description="the migration revision (head)")


# ---------------------------------------------------------------- monitoring

class IngestOut(_Out):
    batch: int = Field(description="id of the stored batch (of the first upload, for a duplicate)")
    model: str
    environment: str
    version: int
    rows: int
    duplicate: bool = Field(description="the same body was uploaded before; nothing was added")
    verdict: str = Field(description="unknown | ok | watch | breach, after this batch")
    previous_verdict: str
    auto_killed: bool = Field(description="this batch made the verdict breach and tripped the kill switch")


class HealthOut(_Out):
    model: str
    environment: str
    version: int | None = Field(description="the active version (null: none)")
    verdict: str = Field(description="unknown (no shadow rows yet) | ok | watch | breach")
    since: datetime | None
    assessed_at: datetime | None
    recorded: bool = Field(description="false: assessed now from stored batches, not yet recorded")
    killed: bool
    auto_kill: bool
    batches: int
    rows: int
    assessment: dict[str, Any] | None = Field(description="reasons, recommendation, per-segment bounds, drift")

    @classmethod
    def of(cls, h: monitoring.Health) -> HealthOut:
        return cls(**h.to_json())


class PointOut(_Out):
    version: int
    segment: str
    at: datetime
    batch: int
    n: int
    losses: int | None
    risk: float | None
    eps: float
    lower: float
    upper: float
