"""Monitoring: shadow-traffic batches, the risk-bound time series and the verdict per environment.

- ``shadow_batches``: every upload of shadow exit logs as received (for export and
  recalibration) with its summary under the version that was active when it was served; a
  body is stored once per (model, environment) (unique sha256), so a retried upload is a no-op.
- ``monitor_points``: per (model, environment, version, constrained segment) the cumulative
  counts and the anytime-valid risk interval after each batch: the time series the report plots.
- ``monitor_status``: per (model, environment) the current verdict (``unknown``, ``ok``,
  ``watch``, ``breach``), the assessment behind it, the running summary of the assessed
  version and the automatic kill switch setting. Verdict changes are audit events; these rows
  are bookkeeping, not governed state.
- ``mlflow_sync.monitor_synced_id``: the last monitoring point the MLflow mirror logged as run
  metrics (NULL: none yet); a model with newer points is pending for ``exitwise mlflow sync``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "shadow_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("received_by_id", sa.Integer(), nullable=False),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("media_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.CheckConstraint("n_rows > 0", name=op.f("ck_shadow_batches_rows_positive")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_shadow_batches_model_id_models")),
        sa.ForeignKeyConstraint(["version_id"], ["policy_versions.id"],
                                name=op.f("fk_shadow_batches_version_id_policy_versions")),
        sa.ForeignKeyConstraint(["received_by_id"], ["principals.id"],
                                name=op.f("fk_shadow_batches_received_by_id_principals")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_batches")),
        sa.UniqueConstraint("model_id", "environment", "sha256",
                            name=op.f("uq_shadow_batches_model_id_environment_sha256")),
    )
    op.create_index("ix_shadow_batches_stream", "shadow_batches", ["model_id", "environment", "version_id", "id"])
    op.create_table(
        "monitor_points",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("segment", sa.String(length=200), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("losses", sa.BigInteger(), nullable=True),
        sa.Column("eps", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("lower", sa.Float(), nullable=False),
        sa.Column("upper", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["shadow_batches.id"],
                                name=op.f("fk_monitor_points_batch_id_shadow_batches")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_monitor_points_model_id_models")),
        sa.ForeignKeyConstraint(["version_id"], ["policy_versions.id"],
                                name=op.f("fk_monitor_points_version_id_policy_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_points")),
    )
    op.create_index(op.f("ix_monitor_points_batch_id"), "monitor_points", ["batch_id"])
    op.create_index("ix_monitor_points_series", "monitor_points",
                    ["model_id", "environment", "version_id", "segment", "id"])
    op.create_table(
        "monitor_status",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("verdict", sa.String(length=8), nullable=False),
        sa.Column("since", TS, nullable=False),
        sa.Column("assessed_at", TS, nullable=True),
        sa.Column("assessment", sa.Text(), nullable=True),
        sa.Column("total", sa.Text(), nullable=True),
        sa.Column("auto_kill", sa.Boolean(), nullable=False),
        sa.CheckConstraint("verdict IN ('unknown', 'ok', 'watch', 'breach')", name=op.f("ck_monitor_status_verdict")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_monitor_status_model_id_models")),
        sa.ForeignKeyConstraint(["version_id"], ["policy_versions.id"],
                                name=op.f("fk_monitor_status_version_id_policy_versions")),
        sa.PrimaryKeyConstraint("model_id", "environment", name=op.f("pk_monitor_status")),
    )
    with op.batch_alter_table("mlflow_sync") as batch:
        batch.add_column(sa.Column("monitor_synced_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mlflow_sync") as batch:
        batch.drop_column("monitor_synced_id")
    op.drop_table("monitor_status")
    op.drop_index("ix_monitor_points_series", table_name="monitor_points")
    op.drop_index(op.f("ix_monitor_points_batch_id"), table_name="monitor_points")
    op.drop_table("monitor_points")
    op.drop_index("ix_shadow_batches_stream", table_name="shadow_batches")
    op.drop_table("shadow_batches")
