"""Store identity: a random id in ``store_state``, stamped anew by every ``exitwise db upgrade``.

Replicas cache policies and tokens against the store's stamp (identity, generation, audit
head). The counter alone can go back (a restore from backup, a failover to a replica that
was behind) and then climb to its old value with other content; the audit head and the
identity make such a store look different at once. ``db upgrade`` (idempotent) writes a
new identity, so running it after a restore or a promotion drops every replica's cache at
its next check.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("store_state") as batch:
        batch.add_column(sa.Column("store_id", sa.String(length=36), nullable=False, server_default=""))
    op.execute(sa.text("UPDATE store_state SET store_id = :sid").bindparams(sid=str(uuid.uuid4())))


def downgrade() -> None:
    with op.batch_alter_table("store_state") as batch:
        batch.drop_column("store_id")
