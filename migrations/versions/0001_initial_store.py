"""Initial policy store: principals, models, versions, approvals, activations, kill switches,
the hash-chained audit trail and the single-row store state.

Database-side guarantees created here (dropped again by ``downgrade``):

- ``uq_activations_active``: a partial unique index, at most one active version per
  (model, environment), on SQLite and PostgreSQL alike;
- triggers refusing UPDATE/DELETE (and TRUNCATE on PostgreSQL) on ``audit_events`` and any
  change of a policy version's content (or its deletion) on ``policy_versions``.

Note for later SQLite migrations: a batch (copy-and-move) alter of these two tables drops
their triggers; recreate them in the same migration.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64
TS = sa.DateTime(timezone=True)

# Columns of policy_versions that never change after insert (only state does).
IMMUTABLE_COLUMNS = ("content", "content_hash", "model_id", "number", "parent_id", "author_id", "created_at")

PG_FUNCTION = """
CREATE FUNCTION exitwise_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'exitwise: % on % refused: %', TG_OP, TG_TABLE_NAME, TG_ARGV[0];
END
$$
"""
APPEND_ONLY = "audit_events is append-only"
IMMUTABLE = "policy content is immutable (create a new version instead)"
NO_DELETE = "policy versions are immutable (retire instead of delete)"


def _pg_triggers() -> list[str]:
    changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in IMMUTABLE_COLUMNS)
    return [
        PG_FUNCTION,
        "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
        f"FOR EACH ROW EXECUTE FUNCTION exitwise_refuse_change('{APPEND_ONLY}')",
        "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
        f"FOR EACH STATEMENT EXECUTE FUNCTION exitwise_refuse_change('{APPEND_ONLY}')",
        f"CREATE TRIGGER policy_versions_immutable BEFORE UPDATE ON policy_versions FOR EACH ROW WHEN ({changed}) "
        f"EXECUTE FUNCTION exitwise_refuse_change('{IMMUTABLE}')",
        "CREATE TRIGGER policy_versions_no_delete BEFORE DELETE ON policy_versions "
        f"FOR EACH ROW EXECUTE FUNCTION exitwise_refuse_change('{NO_DELETE}')",
    ]


def _sqlite_triggers() -> list[str]:
    changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in IMMUTABLE_COLUMNS)
    return [
        "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
        f"BEGIN SELECT RAISE(ABORT, 'exitwise: UPDATE on audit_events refused: {APPEND_ONLY}'); END",
        "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
        f"BEGIN SELECT RAISE(ABORT, 'exitwise: DELETE on audit_events refused: {APPEND_ONLY}'); END",
        f"CREATE TRIGGER policy_versions_immutable BEFORE UPDATE ON policy_versions WHEN {changed} "
        f"BEGIN SELECT RAISE(ABORT, 'exitwise: UPDATE on policy_versions refused: {IMMUTABLE}'); END",
        "CREATE TRIGGER policy_versions_no_delete BEFORE DELETE ON policy_versions "
        f"BEGIN SELECT RAISE(ABORT, 'exitwise: DELETE on policy_versions refused: {NO_DELETE}'); END",
    ]


TRIGGERS = {
    "postgresql": ("audit_events_append_only", "audit_events_no_truncate", "policy_versions_immutable",
                   "policy_versions_no_delete"),
    "sqlite": ("audit_events_no_update", "audit_events_no_delete", "policy_versions_immutable",
               "policy_versions_no_delete"),
}


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.CheckConstraint("role IN ('reader', 'author', 'approver', 'admin')", name=op.f("ck_principals_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_principals")),
        sa.UniqueConstraint("name", name=op.f("uq_principals_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_principals_token_hash")),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("author_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("data_fingerprint", sa.String(length=200), nullable=True),
        sa.Column("compute_fraction", sa.Float(), nullable=True),
        sa.Column("risk", sa.Float(), nullable=True),
        sa.Column("risk_type", sa.String(length=32), nullable=True),
        sa.Column("eps", sa.Float(), nullable=True),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("certified", sa.Boolean(), nullable=True),
        sa.CheckConstraint("state IN ('draft', 'approved', 'active', 'superseded', 'retired')",
                           name=op.f("ck_policy_versions_state")),
        sa.CheckConstraint("number >= 1", name=op.f("ck_policy_versions_number_positive")),
        sa.ForeignKeyConstraint(["author_id"], ["principals.id"], name=op.f("fk_policy_versions_author_id_principals")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_policy_versions_model_id_models")),
        sa.ForeignKeyConstraint(["parent_id"], ["policy_versions.id"],
                                name=op.f("fk_policy_versions_parent_id_policy_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sa.UniqueConstraint("model_id", "content_hash", name=op.f("uq_policy_versions_model_id_content_hash")),
        sa.UniqueConstraint("model_id", "number", name=op.f("uq_policy_versions_model_id_number")),
    )
    op.create_index(op.f("ix_policy_versions_model_id"), "policy_versions", ["model_id"])
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("approver_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["approver_id"], ["principals.id"], name=op.f("fk_approvals_approver_id_principals")),
        sa.ForeignKeyConstraint(["version_id"], ["policy_versions.id"],
                                name=op.f("fk_approvals_version_id_policy_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("version_id", "approver_id", name=op.f("uq_approvals_version_id_approver_id")),
    )
    op.create_index(op.f("ix_approvals_version_id"), "approvals", ["version_id"])
    op.create_table(
        "activations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("activated_at", TS, nullable=False),
        sa.Column("activated_by_id", sa.Integer(), nullable=False),
        sa.Column("deactivated_at", TS, nullable=True),
        sa.Column("deactivated_by_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["activated_by_id"], ["principals.id"],
                                name=op.f("fk_activations_activated_by_id_principals")),
        sa.ForeignKeyConstraint(["deactivated_by_id"], ["principals.id"],
                                name=op.f("fk_activations_deactivated_by_id_principals")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_activations_model_id_models")),
        sa.ForeignKeyConstraint(["version_id"], ["policy_versions.id"],
                                name=op.f("fk_activations_version_id_policy_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activations")),
    )
    op.create_index("ix_activations_model_env", "activations", ["model_id", "environment"])
    op.create_index(op.f("ix_activations_version_id"), "activations", ["version_id"])
    op.create_index("uq_activations_active", "activations", ["model_id", "environment"], unique=True,
                    sqlite_where=sa.text("active"), postgresql_where=sa.text("active"))
    op.create_table(
        "kill_switches",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(length=64), nullable=False),
        sa.Column("killed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("changed_at", TS, nullable=False),
        sa.Column("changed_by_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["changed_by_id"], ["principals.id"],
                                name=op.f("fk_kill_switches_changed_by_id_principals")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_kill_switches_model_id_models")),
        sa.PrimaryKeyConstraint("model_id", "environment", name=op.f("pk_kill_switches")),
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("environment", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("before_hash", sa.String(length=64), nullable=True),
        sa.Column("after_hash", sa.String(length=64), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
    )
    op.create_index(op.f("ix_audit_events_model"), "audit_events", ["model"])
    store_state = op.create_table(
        "store_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("audit_seq", sa.BigInteger(), nullable=False),
        sa.Column("audit_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_store_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_store_state")),
    )
    op.bulk_insert(store_state, [{"id": 1, "generation": 0, "audit_seq": 0, "audit_hash": GENESIS_HASH}])

    dialect = op.get_bind().dialect.name
    statements = {"postgresql": _pg_triggers, "sqlite": _sqlite_triggers}.get(dialect)
    for statement in statements() if statements else []:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for trigger in TRIGGERS.get(dialect, ()):
        table = trigger.split("_", 2)[0] + "_" + trigger.split("_", 2)[1]
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (f" ON {table}" if dialect == "postgresql" else ""))
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS exitwise_refuse_change()")
    op.drop_table("store_state")
    op.drop_index(op.f("ix_audit_events_model"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("kill_switches")
    op.drop_index("uq_activations_active", table_name="activations")
    op.drop_index(op.f("ix_activations_version_id"), table_name="activations")
    op.drop_index("ix_activations_model_env", table_name="activations")
    op.drop_table("activations")
    op.drop_index(op.f("ix_approvals_version_id"), table_name="approvals")
    op.drop_table("approvals")
    op.drop_index(op.f("ix_policy_versions_model_id"), table_name="policy_versions")
    op.drop_table("policy_versions")
    op.drop_table("models")
    op.drop_table("principals")
