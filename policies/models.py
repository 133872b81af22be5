"""SQLAlchemy 2 models of the policy store. Rows never leave the store (see ``exitwise.policies.store``).

The schema is created only by the Alembic migrations in ``migrations/``; these classes
must agree with them (tests/migrations checks it with ``compare_metadata``). Constraints
the database enforces on its own:

- one version number per model: unique ``(model_id, number)``; one content per model:
  unique ``(model_id, content_hash)``;
- at most one active version per (model, environment): the partial unique index
  ``uq_activations_active`` on ``(model_id, environment) WHERE active``;
- policy content never changes and audit rows are append-only: triggers created by the
  migration (PostgreSQL and SQLite).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

VERSION_STATES = ("draft", "approved", "active", "superseded", "retired")
ROLES = ("reader", "author", "approver", "admin")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Principal(Base):
    """An API/CLI identity: a bearer token (stored as its sha256 only) and one role."""

    __tablename__ = "principals"
    __table_args__ = (CheckConstraint(f"role IN {ROLES!r}", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class Model(Base):
    """A governed network (the ``model.name`` of its policy documents)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    versions: Mapped[list[PolicyVersion]] = relationship(back_populates="model", order_by="PolicyVersion.number")


class PolicyVersion(Base):
    """One immutable policy document; only ``state`` changes after creation."""

    __tablename__ = "policy_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number"),
        UniqueConstraint("model_id", "content_hash"),
        CheckConstraint(f"state IN {VERSION_STATES!r}", name="state"),
        CheckConstraint("number >= 1", name="number_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.id"))
    author_id: Mapped[int] = mapped_column(ForeignKey("principals.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="draft")
    data_fingerprint: Mapped[str | None] = mapped_column(String(200))
    compute_fraction: Mapped[float | None] = mapped_column(Float)
    risk: Mapped[float | None] = mapped_column(Float)
    risk_type: Mapped[str | None] = mapped_column(String(32))
    eps: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    certified: Mapped[bool | None] = mapped_column(Boolean)

    model: Mapped[Model] = relationship(back_populates="versions")
    author: Mapped[Principal] = relationship()
    parent: Mapped[PolicyVersion | None] = relationship(remote_side=[id])
    approvals: Mapped[list[Approval]] = relationship(back_populates="version", order_by="Approval.id")


class Approval(Base):
    """A second principal's sign-off on a draft (four eyes)."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("version_id", "approver_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id"), index=True)
    approver_id: Mapped[int] = mapped_column(ForeignKey("principals.id"))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # what the approver saw (migration 0003): the service's re-verification of the certificate
    # ("reverified" | "not_reverified"; NULL for approvals made before it existed) and why
    certificate: Mapped[str | None] = mapped_column(String(16))
    certificate_detail: Mapped[str | None] = mapped_column(Text)

    version: Mapped[PolicyVersion] = relationship(back_populates="approvals")
    approver: Mapped[Principal] = relationship()


class Activation(Base):
    """A version serving in an environment; history rows keep ``active = false``."""

    __tablename__ = "activations"
    __table_args__ = (
        Index("uq_activations_active", "model_id", "environment", unique=True,
              sqlite_where=text("active"), postgresql_where=text("active")),
        Index("ix_activations_model_env", "model_id", "environment"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    environment: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id"), index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    activated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activated_by_id: Mapped[int] = mapped_column(ForeignKey("principals.id"))
    deactivated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deactivated_by_id: Mapped[int | None] = mapped_column(ForeignKey("principals.id"))

    version: Mapped[PolicyVersion] = relationship()
    activated_by: Mapped[Principal] = relationship(foreign_keys=[activated_by_id])


class KillSwitch(Base):
    """Kill-switch state per (model, environment): when killed, the served policy never exits early."""

    __tablename__ = "kill_switches"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    killed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    changed_by_id: Mapped[int] = mapped_column(ForeignKey("principals.id"))

    changed_by: Mapped[Principal] = relationship()


class AuditEvent(Base):
    """One link of the append-only, hash-chained audit trail (see ``exitwise.policies.audit``)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    environment: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    before_hash: Mapped[str | None] = mapped_column(String(64))
    after_hash: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class StoreState(Base):
    """The single row (id = 1) every change updates first, in its own transaction.

    ``generation`` counts committed changes (replicas compare it to drop their caches);
    ``audit_seq``/``audit_hash`` are the head of the audit chain, so a deleted tail shows;
    ``store_id`` is the store's identity, stamped anew by every ``exitwise db upgrade`` (run it
    after a restore or a failover) so that replica caches never take a restored store for theirs.
    Updating this row first is also the write lock that serialises changes (a row lock on
    PostgreSQL; ``BEGIN IMMEDIATE`` already serialises writers on SQLite).
    """

    __tablename__ = "store_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger)
    audit_seq: Mapped[int] = mapped_column(BigInteger)
    audit_hash: Mapped[str] = mapped_column(String(64))
    store_id: Mapped[str] = mapped_column(String(36), server_default="")


class MlflowSync(Base):
    """How far the MLflow mirror of one model has caught up (migration ``0002``).

    The audit trail is the outbox: a model needs a sync while it has audit events with
    ``seq > synced_seq`` or when it was last synced to another tracking URI (see
    ``exitwise.policies.mlflow.sync``); ``monitor_synced_id`` is the last ``monitor_points.id``
    mirrored as run metrics (migration ``0004``; NULL: none yet), so a model with newer monitoring
    points is pending too. Not audited and not append-only: bookkeeping only.
    """

    __tablename__ = "mlflow_sync"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    synced_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    tracking_uri: Mapped[str | None] = mapped_column(String(1000))
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    monitor_synced_id: Mapped[int | None] = mapped_column(BigInteger)


VERDICTS = ("unknown", "ok", "watch", "breach")


class ShadowBatch(Base):
    """One upload of shadow-traffic exit logs (migration ``0004``): kept as uploaded, with its summary.

    ``version_id`` is the version that was active when the requests were served. ``payload`` is
    the body as received (NPZ, Parquet or JSON rows), so the logs can be exported to recalibrate;
    ``summary`` is its :class:`exitwise.calibration.monitor.ShadowSummary` under that version.
    A body is stored once per (model, environment): a retried upload answers with the first batch.
    """

    __tablename__ = "shadow_batches"
    __table_args__ = (
        UniqueConstraint("model_id", "environment", "sha256"),
        Index("ix_shadow_batches_stream", "model_id", "environment", "version_id", "id"),
        CheckConstraint("n_rows > 0", name="rows_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    environment: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id"))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    received_by_id: Mapped[int] = mapped_column(ForeignKey("principals.id"))
    n_rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    summary: Mapped[str] = mapped_column(Text)


class MonitorPoint(Base):
    """The time series of one constrained segment: the running risk bound after each batch.

    ``n``/``losses`` are cumulative over every batch of that version in that environment
    (``losses`` NULL when the risk cannot be measured, e.g. ``induced_error`` without labels);
    ``lower``/``upper`` the confidence sequence's running interval at that point.
    """

    __tablename__ = "monitor_points"
    __table_args__ = (Index("ix_monitor_points_series", "model_id", "environment", "version_id", "segment", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("shadow_batches.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    environment: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id"))
    segment: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    n: Mapped[int] = mapped_column(BigInteger)
    losses: Mapped[int | None] = mapped_column(BigInteger)
    eps: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    lower: Mapped[float] = mapped_column(Float)
    upper: Mapped[float] = mapped_column(Float)


class MonitorStatus(Base):
    """The verdict per (model, environment) and its settings (migration ``0004``).

    ``version_id`` is the version the verdict is about (the active one when it was assessed);
    ``total`` the summary of every batch of that version; ``auto_kill`` (off by default, set by
    an approver, audited) trips the kill switch when the verdict becomes ``breach``.
    """

    __tablename__ = "monitor_status"
    __table_args__ = (CheckConstraint(f"verdict IN {VERDICTS!r}", name="verdict"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.id"))
    verdict: Mapped[str] = mapped_column(String(8), default="unknown")
    since: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    assessed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    assessment: Mapped[str | None] = mapped_column(Text)
    total: Mapped[str | None] = mapped_column(Text)
    auto_kill: Mapped[bool] = mapped_column(Boolean, default=False)
