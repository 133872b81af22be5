"""The store as a whole: settings, engines, unit of work, refused actions, faults, concurrency."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from exitwise.calibration.exceptions import ExitwiseError, InputError
from exitwise.policies import audit, lifecycle, store
from exitwise.policies.db import current_generation, make_engine, open_store, translate_errors, unit_of_work
from exitwise.policies.errors import (
    ALL_ERRORS,
    AuthError,
    Conflict,
    DuplicateContent,
    Forbidden,
    FourEyesViolation,
    ImmutableContent,
    InvalidTransition,
    NotFound,
    SchemaOutOfDate,
    StoreUnavailable,
)
from exitwise.policies.models import Activation, AuditEvent, PolicyVersion
from exitwise.policies.principals import authenticate
from exitwise.policies.settings import StoreSettings, get_settings

# ---------------------------------------------------------------- settings, engines, errors


def test_settings_default_to_sqlite_under_the_data_dir_created_on_demand(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXITWISE_DATABASE_URL", raising=False)
    monkeypatch.setenv("EXITWISE_DATA_DIR", str(tmp_path / "data"))
    settings = get_settings()
    assert not (tmp_path / "data").exists()  # nothing happens until a URL is needed
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path / 'data' / 'exitwise.db'}"
    assert (tmp_path / "data").is_dir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXITWISE_DATA_DIR")
    assert get_settings().data_dir == Path(".exitwise")
    monkeypatch.setenv("EXITWISE_DATABASE_URL", "postgresql://u@db.example/exitwise")
    monkeypatch.setenv("EXITWISE_REQUIRE_STAGING_BEFORE_PRODUCTION", "true")
    s = get_settings()
    assert s.resolved_database_url() == "postgresql+psycopg://u@db.example/exitwise"
    assert s.rules().require_staging_before_production and s.rules().production_env == "production"
    assert not (tmp_path / ".exitwise").exists()


def test_open_store_initialises_a_new_sqlite_file(tmp_path: Path) -> None:
    engine = open_store(StoreSettings(data_dir=tmp_path / "d"))
    try:
        with unit_of_work(engine, readonly=True) as s:
            assert current_generation(s) == 0 and store.list_models(session=s) == []
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()


def test_open_store_refuses_an_unmigrated_server_database(backend: str, empty_url: str) -> None:
    if backend != "postgresql":
        pytest.skip("empty SQLite files are initialised on purpose")
    with pytest.raises(SchemaOutOfDate, match="exitwise db upgrade") as err:
        open_store(StoreSettings(database_url=empty_url))
    assert err.value.http_status == 503


def test_unreachable_database_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="unavailable") as err:
        open_store(StoreSettings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"))
    assert err.value.http_status == 503 and err.value.exit_code == 1


def test_every_store_error_knows_how_it_is_shown() -> None:
    expected = {"NotFound": 404, "InvalidTransition": 409, "WeakerPolicy": 409, "CertificateMismatch": 409,
                "Conflict": 409, "DuplicateContent": 409,
                "ImmutableContent": 409, "AuthError": 401, "Forbidden": 403, "FourEyesViolation": 403,
                "StoreUnavailable": 503, "SchemaOutOfDate": 503, "AuditChainBroken": 500, "PolicyError": 500}
    for cls in ALL_ERRORS:
        assert issubclass(cls, ExitwiseError) and cls.title and cls.exit_code == 1
        assert cls.http_status == expected[cls.__name__], cls
    assert issubclass(InvalidTransition, ValueError) and issubclass(NotFound, LookupError)


# ---------------------------------------------------------------- a committed store shared by the module

@pytest.fixture(scope="module")
def gov(databases: Any, make_actors: Any, make_doc: Any) -> Iterator[tuple[Engine, Any]]:
    """A committed store: v1 active in production, v2 approved, v3 draft (by the approver bob)."""
    url = databases.new()
    engine = make_engine(url)
    with unit_of_work(engine) as s:
        actors = make_actors(s)
        lifecycle.create_version(make_doc(), author=actors.author, session=s)
        lifecycle.create_version(make_doc(variant=1), author=actors.author, session=s)
        lifecycle.create_version(make_doc(variant=2), author=actors.approver, session=s)
        for n in (1, 2):
            lifecycle.approve("fashion-cnn", n, approver=actors.approver, reason="ok", session=s)
        lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="go", session=s)
    yield engine, actors
    engine.dispose()
    databases.drop(url)


def _second_active_row(s: Session, actors: Any) -> None:
    v2 = s.scalars(select(PolicyVersion).where(PolicyVersion.number == 2)).one()
    s.add(Activation(model_id=v2.model_id, environment="production", version_id=v2.id, active=True,
                     activated_by_id=actors.approver.id))
    s.flush()


def _change_content(s: Session, _actors: Any) -> None:
    v1 = s.scalars(select(PolicyVersion).where(PolicyVersion.number == 1)).one()
    v1.content = v1.content.replace("0.9", "0.1")
    s.flush()


REFUSED: dict[str, tuple[Callable[[Session, Any], Any], type[Exception], str]] = {
    "self-approval": (lambda s, a: lifecycle.approve("fashion-cnn", 3, approver=a.approver, reason="mine",
                                                     session=s), FourEyesViolation, "four-eyes"),
    "activate a draft": (lambda s, a: lifecycle.activate("fashion-cnn", 3, "production", actor=a.approver,
                                                         reason="r", session=s), InvalidTransition, "draft"),
    "second active version": (_second_active_row, Conflict, "already active"),
    "change content": (_change_content, ImmutableContent, "immutable"),
    "delete a version": (lambda s, a: s.execute(text("DELETE FROM policy_versions WHERE number = 3")),
                         ImmutableContent, "immutable"),
    "duplicate content": (lambda s, a: lifecycle.create_version(
        store.get_version("fashion-cnn", 1, session=s).document, author=a.author, session=s),
        DuplicateContent, "already has this content"),
    "approve twice": (lambda s, a: lifecycle.approve("fashion-cnn", 1, approver=a.approver2, reason="again",
                                                     session=s), InvalidTransition, "only drafts"),
    "retire the active version": (lambda s, a: lifecycle.retire("fashion-cnn", 1, actor=a.approver, session=s),
                                  InvalidTransition, "active in production"),
    "reader activates": (lambda s, a: lifecycle.activate("fashion-cnn", 2, "production", actor=a.reader,
                                                         reason="r", session=s), Forbidden, "approver"),
    "bad token": (lambda s, a: authenticate("ew_forged", session=s), AuthError, "invalid token"),
    "missing reason": (lambda s, a: lifecycle.kill("fashion-cnn", "production", actor=a.author, reason="",
                                                   session=s), InputError, "reason"),
    "unknown version": (lambda s, a: lifecycle.activate("fashion-cnn", 42, "production", actor=a.approver,
                                                        reason="r", session=s), NotFound, "no version 42"),
}


@pytest.mark.parametrize("action", list(REFUSED))
def test_refused_actions_leave_the_database_exactly_as_it_was(gov: tuple[Engine, Any], action: str,
                                                              table_dump: Any) -> None:
    engine, actors = gov
    do, error, message = REFUSED[action]
    before = table_dump(engine)
    with pytest.raises(error, match=message), unit_of_work(engine) as s:
        do(s, actors)
    assert table_dump(engine) == before
    # and inside a larger transaction, the refused change's savepoint leaves nothing either
    with unit_of_work(engine) as s:
        in_tx_before = table_dump(s)
        if error in (Conflict, ImmutableContent):  # direct SQL: the test brings its own savepoint
            with pytest.raises(error), translate_errors(), s.begin_nested():
                do(s, actors)
        else:  # service functions open their own savepoint
            with pytest.raises(error):
                do(s, actors)
        assert table_dump(s) == in_tx_before
        s.rollback()


def test_fault_before_commit_leaves_neither_change_nor_event(gov: tuple[Engine, Any], table_dump: Any) -> None:
    engine, actors = gov
    before = table_dump(engine)
    with pytest.raises(RuntimeError, match="injected"), unit_of_work(engine) as s:
        lifecycle.activate("fashion-cnn", 2, "production", actor=actors.approver, reason="r", session=s)
        assert store.get_active("fashion-cnn", "production", session=s).version == 2  # visible inside
        raise RuntimeError("injected fault after the change, before the commit")
    assert table_dump(engine) == before


def test_connection_dropped_before_commit(gov: tuple[Engine, Any], table_dump: Any) -> None:
    engine, actors = gov
    before = table_dump(engine)
    with pytest.raises(StoreUnavailable), unit_of_work(engine) as s:
        lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="r", session=s)
        if engine.dialect.name == "postgresql":
            pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as killer:
                killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                killer.commit()
        else:
            s.connection().connection.dbapi_connection.close()  # the process loses its connection
    engine.pool.dispose()
    assert table_dump(engine) == before
    with unit_of_work(engine, readonly=True) as s:
        assert not store.get_kill_switch("fashion-cnn", "production", session=s).killed
        assert audit.verify(session=s).ok


# ---------------------------------------------------------------- concurrency

def _run_concurrently(n: int, fn: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_concurrent_activations_end_with_exactly_one_active_version(backend: str, fresh_url: str,
                                                                    make_actors: Any, make_doc: Any) -> None:
    n = 50 if backend == "postgresql" else 12
    engine = make_engine(fresh_url, poolclass=NullPool)  # every thread on its own connection
    try:
        with unit_of_work(engine) as s:
            actors = make_actors(s)
            for i in range(n):
                lifecycle.create_version(make_doc(variant=i), author=actors.author, session=s)
                lifecycle.approve("fashion-cnn", i + 1, approver=actors.approver, reason="ok", session=s)
            seq0 = audit.verify(session=s).head_seq

        def activate(i: int) -> int:
            with unit_of_work(engine) as s:
                s.execute(text("SELECT 1"))  # a connection of its own, opened before the race
                return lifecycle.activate("fashion-cnn", i + 1, "production", actor=actors.approver,
                                          reason=f"race {i}", session=s).version

        results, errors = _run_concurrently(n, activate)
        assert not errors, errors[:3]
        assert sorted(results) == list(range(1, n + 1))
        with unit_of_work(engine, readonly=True) as s:
            active = s.scalars(select(Activation).where(Activation.active)).all()
            assert len(active) == 1
            events = audit.log(session=s, after_seq=seq0, limit=None)
            assert [e.action for e in events] == ["version.activate"] * n
            assert sorted(e.version for e in events) == list(range(1, n + 1))
            assert active[0].version.number == events[-1].version  # the last one to commit won
            for prev, ev in itertools.pairwise(events):  # each superseded the one before
                assert ev.details["superseded"] == prev.version
            assert audit.verify(session=s).ok
            states = [v.state for v in store.list_versions("fashion-cnn", session=s)]
            assert states.count("active") == 1 and states.count("superseded") == n - 1
            assert s.scalar(select(func.count()).select_from(AuditEvent)) == current_generation(s)
    finally:
        engine.dispose()


def test_concurrent_creates_number_versions_without_gaps(fresh_url: str, make_actors: Any, make_doc: Any) -> None:
    engine = make_engine(fresh_url, poolclass=NullPool)
    try:
        with unit_of_work(engine) as s:
            actors = make_actors(s)

        def create(i: int) -> int:
            with unit_of_work(engine) as s:
                return lifecycle.create_version(make_doc(variant=i), author=actors.author, session=s).number

        results, errors = _run_concurrently(8, create)
        assert not errors and sorted(results) == list(range(1, 9))
        with unit_of_work(engine, readonly=True) as s:
            assert audit.verify(session=s).ok
    finally:
        engine.dispose()


def test_generation_moves_with_every_committed_change(session: Session, actors: Any, make_doc: Any) -> None:
    g = current_generation(session)
    lifecycle.create_version(make_doc(), author=actors.author, session=session)
    assert current_generation(session) == g + 1
    with pytest.raises(InvalidTransition):
        lifecycle.activate("fashion-cnn", 1, "staging", actor=actors.approver, reason="r", session=session)
    assert current_generation(session) == g + 1  # refused: no bump
    with pytest.raises(NotFound, match="no active policy"):
        store.get_active("fashion-cnn", "staging", session=session)
    with pytest.raises(NotFound, match="no model"):
        store.get_version("nope", 1, session=session)
