"""Store identity (``store_state.store_id``) and what an approver saw (``approvals.certificate``).

**Store identity**: a random id, stamped anew by every ``exitwise db upgrade``.

Replicas cache policies and tokens against the store's stamp (identity, generation, audit
head). The counter alone can go back (a restore from backup, a failover to a replica that
was behind) and then climb to its old value with other content; the audit head and the
identity make such a store look different at once. ``db upgrade`` (idempotent) writes a
new identity, so running it after a restore or a promotion drops every replica's cache at
its next check.

**Certificate of an approval**: whether the service re-verified the version's certificate
from its evidence before the approval (``reverified``) or the approver approved the
author's claim (``not_reverified``), and why; NULL for approvals made before this revision.

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
    with op.batch_alter_table("approvals") as batch:
        batch.add_column(sa.Column("certificate", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("certificate_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.drop_column("certificate_detail")
        batch.drop_column("certificate")
    with op.batch_alter_table("store_state") as batch:
        batch.drop_column("store_id")
