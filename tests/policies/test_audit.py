"""The hash-chained audit trail: formula, verify, tamper evidence, export, after-commit hooks."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from exitwise.policies import audit, events, lifecycle
from exitwise.policies.db import StoreSession, change, make_engine, unit_of_work
from exitwise.policies.errors import AuditChainBroken, ImmutableContent

GENESIS = "0" * 64


def _independent_hash(rec: dict[str, Any]) -> str:
    """The documented formula, re-implemented with the standard library only (what an auditor runs)."""
    fields = {k: rec[k] for k in ("seq", "ts", "actor", "action", "model", "version", "environment", "reason",
                                  "before_hash", "after_hash", "details", "prev_hash")}
    text_ = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text_.encode("utf-8")).hexdigest()


def _populate(session: Session, actors: Any, make_doc: Any) -> None:
    for i in range(2):
        lifecycle.create_version(make_doc(variant=i), author=actors.author, session=session)
        lifecycle.approve("fashion-cnn", i + 1, approver=actors.approver, reason="ok ✓", session=session)
        lifecycle.activate("fashion-cnn", i + 1, "production", actor=actors.approver, reason="go",
                           session=session)
    lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="incident", session=session)


@pytest.fixture(scope="module")
def populated(databases: Any, make_actors: Any, make_doc: Any) -> Iterator[Engine]:
    """A committed store with 12 audit events (5 principals, 2x create/approve/activate, kill).

    Shared by the module: tests that tamper do it inside a transaction they roll back.
    """
    url = databases.new()
    engine = make_engine(url)
    with unit_of_work(engine) as s:
        _populate(s, make_actors(s), make_doc)
    yield engine
    engine.dispose()
    databases.drop(url)


def test_chain_links_and_hash_formula(session: Session, actors: Any, make_doc: Any) -> None:
    _populate(session, actors, make_doc)
    evs = list(reversed(audit.log(session=session, limit=None)))
    assert [e.seq for e in evs] == list(range(1, 13))
    prev = GENESIS
    for e in evs:
        assert e.prev_hash == prev and e.hash == _independent_hash(e.to_dict()) == audit.event_hash(e.to_dict())
        assert e.ts.endswith("Z") and len(e.ts) == 27
        prev = e.hash
    report = audit.verify(session=session)
    assert report.ok and report.events == 12 and report.head_seq == 12 and report.head_hash == prev
    assert audit.log(session=session, model="fashion-cnn", limit=2)[0].action == "killswitch.kill"
    assert [e.seq for e in audit.log(session=session, after_seq=10, limit=None)] == [11, 12]


def test_append_outside_a_change_is_a_programming_error(session: Session) -> None:
    with pytest.raises(RuntimeError, match=r"inside policies\.db\.change"):
        audit.append(session, actor="x", action="y")


def _bypass_triggers(conn: Connection) -> None:
    """What a superuser can do: switch the append-only triggers off (inside the caller's transaction)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    else:
        conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
        conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")


def _rehash_seq7(conn: Connection) -> None:
    row = conn.execute(text("SELECT * FROM audit_events WHERE seq = 7")).mappings().one()
    rec = {**row, "actor": "mallory", "details": json.loads(row["details"])}
    conn.execute(text("UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 7"),
                 {"h": _independent_hash(rec)})


def _sql(*statements: str, **params: Any) -> Callable[[Connection], None]:
    def run(conn: Connection) -> None:
        for st in statements:
            conn.execute(text(st), params)
    return run


TAMPERS: dict[str, tuple[Callable[[Connection], None], int, str]] = {
    "edit": (_sql("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 7"), 7, "edited"),
    "edit_details": (_sql("UPDATE audit_events SET details = :d WHERE seq = 7", d='{"x":1}'), 7, "edited"),
    "edit_and_rehash": (_rehash_seq7, 7, "edited"),
    "delete": (_sql("DELETE FROM audit_events WHERE seq = 7"), 7, "deleted"),
    "delete_tail": (_sql("DELETE FROM audit_events WHERE seq = 12"), 12, "truncated"),
    "reorder": (_sql("UPDATE audit_events SET seq = -1 WHERE seq = 6", "UPDATE audit_events SET seq = 6 WHERE seq = 7",
                     "UPDATE audit_events SET seq = 7 WHERE seq = -1"), 6, "reordered"),
}


@pytest.mark.parametrize("kind", list(TAMPERS))
def test_tampering_is_detected_and_names_the_row(populated: Engine, kind: str) -> None:
    do, seq, problem = TAMPERS[kind]
    with populated.connect() as conn:
        outer = conn.begin()
        session = StoreSession(bind=conn, join_transaction_mode="create_savepoint")
        assert audit.verify(session=session).ok
        _bypass_triggers(conn)
        do(conn)
        report = audit.verify(session=session)
        session.close()
        outer.rollback()  # the shared store stays intact for the next test
    assert not report.ok and (report.broken_seq, report.problem) == (seq, problem), report
    assert f"seq={seq}" in report.message or f"seq {seq}" in report.message
    with pytest.raises(AuditChainBroken, match=str(seq)):
        report.raise_if_broken()
    with unit_of_work(populated, readonly=True) as s:
        assert audit.verify(session=s).ok


@pytest.mark.parametrize("sql", ["UPDATE audit_events SET reason = 'x' WHERE seq = 3",
                                 "DELETE FROM audit_events WHERE seq = 3",
                                 "DELETE FROM audit_events"])
def test_plain_update_and_delete_are_refused(populated: Engine, sql: str, table_dump: Any) -> None:
    before = table_dump(populated)
    with pytest.raises(ImmutableContent, match="append-only"), unit_of_work(populated) as s:
        s.execute(text(sql))
    assert table_dump(populated) == before


def test_truncate_is_refused_on_postgresql(populated: Engine) -> None:
    if populated.dialect.name != "postgresql":
        pytest.skip("TRUNCATE exists on PostgreSQL only")
    with pytest.raises(ImmutableContent, match="append-only"), unit_of_work(populated) as s:
        s.execute(text("TRUNCATE audit_events"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_round_trips_and_verifies_independently(populated: Engine, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"trail.{fmt}"
    with unit_of_work(populated, readonly=True) as s:
        result = audit.export(out, fmt, session=s)  # type: ignore[arg-type]
        stored = [e.to_dict() for e in reversed(audit.log(session=s, limit=None))]
    assert (result.events, result.head_seq) == (12, 12) and result.head_hash == stored[-1]["hash"]
    records = audit.read_export(out)
    assert records == stored
    prev = GENESIS  # the auditor's recipe, nothing from exitwise
    for rec in records:
        assert rec["prev_hash"] == prev and _independent_hash(rec) == rec["hash"]
        prev = rec["hash"]
    assert audit.verify_export(out).ok
    assert audit.verify_export(out, head_hash=result.head_hash).ok
    if fmt == "jsonl":
        lines = out.read_text(encoding="utf-8").splitlines()
        assert all(json.dumps(json.loads(x), sort_keys=True, separators=(",", ":"), ensure_ascii=False) == x
                   for x in lines)
    else:
        with out.open(newline="", encoding="utf-8") as fh:
            assert next(csv.reader(fh)) == list(audit.EXPORT_FIELDS)


def test_tampered_exports_fail(populated: Engine, tmp_path: Path) -> None:
    out = tmp_path / "trail.jsonl"
    with unit_of_work(populated, readonly=True) as s:
        head = audit.export(out, "jsonl", session=s).head_hash
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)

    def check(new_lines: list[str], seq: int, problem: str, **kw: Any) -> None:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(new_lines), encoding="utf-8")
        report = audit.verify_export(bad, **kw)
        assert not report.ok and (report.broken_seq, report.problem) == (seq, problem), report

    edited = json.loads(lines[4])
    edited["reason"] = "changed"
    check([*lines[:4], json.dumps(edited) + "\n", *lines[5:]], 5, "edited")
    check([*lines[:4], *lines[5:]], 5, "deleted")
    check([*lines[:4], lines[5], lines[4], *lines[6:]], 6, "reordered")
    check(lines[:-1], 12, "truncated", head_hash=head)


def test_hooks_run_after_commit_only(fresh_engine: Engine, make_actors: Any, make_doc: Any,
                                     caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, str]] = []

    def hook(ev: audit.Event) -> None:
        seen.append((ev.seq, ev.action))

    def broken(ev: audit.Event) -> None:
        raise RuntimeError("mirror down")

    events.on_commit(hook)
    events.on_commit(broken)
    try:
        with unit_of_work(fresh_engine) as s:
            actors = make_actors(s)
            lifecycle.create_version(make_doc(), author=actors.author, session=s)
            assert seen == []  # nothing before the commit
        assert [a for _, a in seen] == ["principal.add"] * 5 + ["version.create"]
        assert "mirror down" in caplog.text
        seen.clear()
        with pytest.raises(ZeroDivisionError), unit_of_work(fresh_engine) as s:
            lifecycle.create_version(make_doc(variant=1), author=actors.author, session=s)
            1 / 0  # noqa: B018 - a fault after the change, before the commit
        with unit_of_work(fresh_engine) as s:  # a refused change inside a good unit: its event is dropped
            with pytest.raises(Exception, match="draft"):
                lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=s)
            lifecycle.approve("fashion-cnn", 1, approver=actors.approver, reason="ok", session=s)
        assert seen == [(7, "version.approve")]
    finally:
        events.remove(hook)
        events.remove(broken)


def test_nested_changes_each_bump_the_generation(session: Session) -> None:
    with change(session) as g1, change(session) as g2:
        assert g2 == g1 + 1


def test_hooks_fire_only_for_the_store_sessions(fresh_url: str) -> None:
    """Another library's plain SQLAlchemy Session in the same process never runs the store's hooks."""
    seen: list[int] = []

    def hook(ev: audit.Event) -> None:
        seen.append(ev.seq)

    engine = make_engine(fresh_url)
    events.on_commit(hook)
    try:
        with Session(bind=engine) as other:
            events.queue(other, audit.Event(seq=-1, ts="", actor="x", action="x", model=None, version=None,
                                            environment=None, reason=None, before_hash=None, after_hash=None,
                                            details={}, prev_hash="", hash=""))
            other.commit()
        assert seen == []
        with pytest.raises(TypeError, match="own Session subclass"):
            events.listen(Session)
    finally:
        events.remove(hook)
        engine.dispose()
