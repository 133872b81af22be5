"""MLflow mirror bookkeeping: how far each model's MLflow mirror has caught up.

``mlflow_sync`` has one row per model that was ever synced. The audit trail is the outbox:
a model needs a sync while it has audit events with ``seq`` greater than ``synced_seq``
(or when the tracking URI changed), so a change committed while MLflow was down, or by a
process that crashed before syncing, is never lost. ``failures``/``last_error`` say why the
last attempts failed (``exitwise mlflow status``). Not audited and not append-only: it is
the mirror's cursor, not policy state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mlflow_sync",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("synced_seq", sa.BigInteger(), nullable=False),
        sa.Column("tracking_uri", sa.String(length=1000), nullable=True),
        sa.Column("synced_at", TS, nullable=True),
        sa.Column("attempted_at", TS, nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_mlflow_sync")),
    )


def downgrade() -> None:
    op.drop_table("mlflow_sync")
