"""Migrations: the only way the schema is created; up and down on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from exitwise.policies.db import (
    alembic_config,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migrations_dir,
    upgrade,
)
from exitwise.policies.errors import SchemaOutOfDate
from exitwise.policies.models import Base

STORE_TABLES = {"principals", "models", "policy_versions", "approvals", "activations", "kill_switches",
                "audit_events", "store_state"}


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def _tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def _triggers(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            q = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        else:
            q = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        return {r[0] for r in conn.execute(text(q))}


def test_migrations_are_found_where_the_console_script_looks() -> None:
    assert (migrations_dir() / "env.py").is_file() and (migrations_dir() / "script.py.mako").is_file()
    revs = _revisions()
    assert revs[0] == "0001" and revs[-1] == head_revision()


def test_upgrade_step_by_step_and_back_to_empty(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        assert _tables(engine) == set() and current_revision(engine) is None
        for rev in _revisions():
            upgrade(engine, rev)
            assert current_revision(engine) == rev
        assert _tables(engine) >= STORE_TABLES
        assert len(_triggers(engine)) == 4
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, generation, audit_seq FROM store_state")).all() == [(1, 0, 0)]
        for rev in reversed([None, *_revisions()[:-1]]):
            downgrade(engine, rev or "base")
            assert current_revision(engine) == rev
        assert _tables(engine) <= {"alembic_version"} and _triggers(engine) == set()
        upgrade(engine)  # and up again from scratch
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_models_and_migrations_agree(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_schema_check_refuses_an_out_of_date_database(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        with pytest.raises(SchemaOutOfDate, match=r"found version none.*exitwise db upgrade"):
            check_schema(engine)
        upgrade(engine, "0001")
        if head_revision() != "0001":
            with pytest.raises(SchemaOutOfDate, match=r"out-of-date database schema \(found version 0001.*backup"):
                check_schema(engine)
        upgrade(engine)
        check_schema(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(SchemaOutOfDate, match="newer release"):
            check_schema(engine)
    finally:
        engine.dispose()
