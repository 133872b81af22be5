"""Signed checkpoints outside the database, and the tables replayed against the audit trail.

The attacks are those of a database superuser (triggers bypassed): each is applied inside a
transaction that is rolled back, on a store whose commits were checkpointed by the real hook.
"""

from __future__ import annotations

import base64
import json
import logging
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import InputError
from exitwise.policies import anchor, audit, events, lifecycle, store
from exitwise.policies.db import StoreSession, make_engine, unit_of_work
from exitwise.policies.errors import AuditChainBroken, FourEyesViolation, InvalidTransition
from exitwise.policies.principals import add_principal
from exitwise.policies.settings import GovernanceRules, get_settings

GENESIS = "0" * 64


@dataclass
class Anchored:
    """A committed store whose every audit event was checkpointed by the hook."""

    engine: Engine
    key_path: Path
    file: Path
    head_seq: int

    def checkpoints(self) -> list[anchor.Checkpoint]:
        return anchor.load_verified(self.file, anchor.load_public_key(self.key_path), store="test-store")


@pytest.fixture(scope="module")
def anchored(databases: Any, make_actors: Any, make_doc: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anchored]:
    """fashion-cnn v1, v2 approved and activated in production (v2 active), killed, v3 a draft;
    the last event adds principal ``dave`` (a tail the table replay cannot see)."""
    tmp = tmp_path_factory.mktemp("anchor")
    key_path, file = tmp / "anchor.pem", tmp / "anchor.jsonl"
    anchor.generate_key(key_path)
    hook = anchor.install_anchor_hook(get_settings(anchor_key=key_path, anchor_file=file, anchor_store="test-store"))
    assert hook is not None
    url = databases.new()
    engine = make_engine(url)
    try:
        with unit_of_work(engine) as s:
            actors = make_actors(s)
        for i in range(2):
            with unit_of_work(engine) as s:
                lifecycle.create_version(make_doc(variant=i), author=actors.author, session=s)
                lifecycle.approve("fashion-cnn", i + 1, approver=actors.approver, reason="ok", session=s)
                lifecycle.activate("fashion-cnn", i + 1, "production", actor=actors.approver, reason="go", session=s)
        with unit_of_work(engine) as s:
            lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="incident", session=s)
            lifecycle.create_version(make_doc(variant=3), author=actors.author, session=s)
        with unit_of_work(engine) as s:
            add_principal("dave", "reader", actor=actors.admin, session=s)
            head = audit.verify(session=s).head_seq
    finally:
        events.remove(hook)
    yield Anchored(engine, key_path, file, head)
    engine.dispose()
    databases.drop(url)


def _bypass_triggers(conn: Connection) -> None:
    """What a superuser can do: switch the append-only and immutability triggers off."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    else:
        for name in ("audit_events_no_update", "audit_events_no_delete", "policy_versions_no_delete"):
            conn.exec_driver_sql(f"DROP TRIGGER {name}")


def _set_head(conn: Connection, seq: int) -> None:
    digest = GENESIS if seq == 0 else conn.execute(text("SELECT hash FROM audit_events WHERE seq = :s"),
                                                   {"s": seq}).scalar_one()
    conn.execute(text("UPDATE store_state SET audit_seq = :s, audit_hash = :h WHERE id = 1"), {"s": seq, "h": digest})


def _cut_tail(conn: Connection) -> None:
    head = conn.execute(text("SELECT audit_seq FROM store_state")).scalar_one()
    conn.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": head})
    _set_head(conn, head - 1)


def _wipe(conn: Connection) -> None:
    """Empty the trail and every lifecycle table, and reset the head: "verifies: 0 events"."""
    tables = ("audit_events", "monitor_points", "shadow_batches", "monitor_status", "kill_switches", "activations",
              "approvals", "policy_versions", "models")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)}")
    else:
        for t in tables:
            conn.exec_driver_sql(f"DELETE FROM {t}")
    _set_head(conn, 0)


def _edit_and_rehash_all(conn: Connection) -> None:
    """Edit seq 3's reason, then recompute every hash from there on and the head."""
    rows = conn.execute(text("SELECT * FROM audit_events ORDER BY seq")).mappings().all()
    prev = GENESIS
    for row in rows:
        rec = {**row, "details": json.loads(row["details"]), "prev_hash": prev}
        if rec["seq"] == 3:
            rec["reason"] = "nothing to see"
        new = audit.event_hash(rec)
        if new != row["hash"]:
            conn.execute(text("UPDATE audit_events SET reason = :r, prev_hash = :p, hash = :h WHERE seq = :s"),
                         {"r": rec["reason"], "p": prev, "h": new, "s": rec["seq"]})
        prev = new
    _set_head(conn, rows[-1]["seq"])


def _under_attack(engine: Engine, attack: Callable[[Connection], None],
                  check: Callable[[Session], Any]) -> Any:
    """Run ``attack`` as a superuser, then ``check`` in a store session on the same connection; roll back."""
    with engine.connect() as conn:
        outer = conn.begin()
        session = StoreSession(bind=conn, join_transaction_mode="create_savepoint")
        try:
            _bypass_triggers(conn)
            attack(conn)
            return check(session)
        finally:
            session.close()
            outer.rollback()


def _both(checkpoints: list[anchor.Checkpoint]) -> Callable[[Session], tuple[audit.ChainReport, audit.ChainReport]]:
    return lambda s: (audit.verify(session=s), audit.verify(session=s, checkpoints=checkpoints))


def test_every_commit_is_checkpointed_and_the_store_verifies(anchored: Anchored) -> None:
    cps = anchored.checkpoints()
    assert [c.seq for c in cps] == list(range(1, anchored.head_seq + 1))  # one per event, in order
    with unit_of_work(anchored.engine, readonly=True) as s:
        report = audit.verify(session=s, checkpoints=cps)
    assert report.ok and report.details["anchored_seq"] == anchored.head_seq, report
    assert report.head_hash == cps[-1].hash
    line = json.loads(anchored.file.read_text().splitlines()[0])
    assert set(line) == {"v", "store", "seq", "hash", "ts", "key_id", "sig"} and line["store"] == "test-store"


ATTACKS = {"cut_tail_and_rewrite_head": _cut_tail, "truncate_and_reset_head": _wipe,
           "edit_and_rehash_every_event": _edit_and_rehash_all}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_superuser_rewrites_pass_the_chain_but_fail_the_anchor(anchored: Anchored, name: str) -> None:
    cps = anchored.checkpoints()
    plain, report = _under_attack(anchored.engine, ATTACKS[name], _both(cps))
    assert plain.ok, plain  # what the in-database head alone cannot see
    n = anchored.head_seq
    assert not report.ok and report.problem == "anchor" and report.broken_seq == n, report
    assert f"seq={n}" in report.message and f"{anchored.file}:{n}" in report.message, report.message
    expected = "were rewritten" if name == "edit_and_rehash_every_event" else "were deleted"
    assert expected in report.message
    with unit_of_work(anchored.engine, readonly=True) as s:  # the real store is intact
        assert audit.verify(session=s, checkpoints=cps).ok


def test_every_checkpoint_must_match_not_only_the_latest(anchored: Anchored) -> None:
    """Rewrite seq 3 and re-hash; a signed checkpoint at seq 3 (not the latest) names the rewrite."""
    cps = [c for c in anchored.checkpoints() if c.seq in (3, anchored.head_seq)]
    latest_only = [cps[-1]]
    # replace the latest by a checkpoint of the rewritten head, as if the attacker got one signed later
    key = anchor.load_private_key(anchored.key_path)

    def attack_then_sign(session: Session) -> audit.ChainReport:
        forged_head = audit.verify(session=session)
        fresh = anchor.sign(key, seq=forged_head.head_seq, head_hash=forged_head.head_hash, store="test-store")
        assert audit.verify(session=session, checkpoints=[fresh]).ok
        assert not audit.verify(session=session, checkpoints=latest_only).ok
        return audit.verify(session=session, checkpoints=[cps[0], fresh])

    report = _under_attack(anchored.engine, _edit_and_rehash_all, attack_then_sign)
    assert not report.ok and report.broken_seq == 3 and "seq=3" in report.message, report


def _activate_draft_by_sql(conn: Connection) -> None:
    """Serve the draft v3 in production: deactivate v2, insert an active row for v3, fix the states."""
    conn.execute(text("UPDATE activations SET active = false WHERE active"))
    conn.execute(text(
        "INSERT INTO activations (model_id, environment, version_id, active, activated_at, activated_by_id) "
        "SELECT v.model_id, 'production', v.id, true, CURRENT_TIMESTAMP, v.author_id "
        "FROM policy_versions v WHERE v.number = 3"))
    conn.execute(text("UPDATE policy_versions SET state = 'active' WHERE number = 3"))
    conn.execute(text("UPDATE policy_versions SET state = 'superseded' WHERE number = 2"))


def _insert_activation_only(conn: Connection) -> None:
    conn.execute(text(
        "INSERT INTO activations (model_id, environment, version_id, active, activated_at, activated_by_id) "
        "SELECT v.model_id, 'canary', v.id, true, CURRENT_TIMESTAMP, v.author_id "
        "FROM policy_versions v WHERE v.number = 3"))


def _unkill_by_sql(conn: Connection) -> None:
    conn.execute(text("UPDATE kill_switches SET killed = false"))


def _approve_by_sql(conn: Connection) -> None:
    conn.execute(text("UPDATE policy_versions SET state = 'approved' WHERE number = 3"))


STATE_ATTACKS = {
    "activate_draft": (_activate_draft_by_sql, "fashion-cnn production: v3 is active"),
    "insert_activation": (_insert_activation_only, "fashion-cnn canary: v3 is active"),
    "unkill": (_unkill_by_sql, "fashion-cnn production: kill switch table says not killed"),
    "approve_draft": (_approve_by_sql, "fashion-cnn v3: state is 'approved'"),
}


@pytest.mark.parametrize("name", list(STATE_ATTACKS))
def test_tables_changed_outside_exitwise_fail_verification(anchored: Anchored, name: str) -> None:
    attack, needle = STATE_ATTACKS[name]

    def check(s: Session) -> tuple[Any, audit.ChainReport, audit.ChainReport]:
        served = store.get_active("fashion-cnn", "production", session=s)
        return served, audit.verify(session=s), audit.verify(session=s, checkpoints=anchored.checkpoints())

    served, plain, with_anchor = _under_attack(anchored.engine, attack, check)
    if name == "activate_draft":
        assert served.version == 3  # the draft really is what the store serves
    for report in (plain, with_anchor):
        assert not report.ok and report.problem == "state", report
        assert needle in report.message and "outside exitwise" in report.message, report.message
        with pytest.raises(AuditChainBroken, match="disagree with the audit trail"):
            report.raise_if_broken()


def test_legitimate_histories_verify(session: Session, actors: Any, make_doc: Any, tmp_path: Path) -> None:
    """Activate, rollback (default and --to), multi-env, staging rule, retire, kill/unkill, refusals."""
    anchor.generate_key(tmp_path / "k.pem")
    key = anchor.load_private_key(tmp_path / "k.pem")
    cps: list[anchor.Checkpoint] = []

    def step() -> None:
        report = audit.verify(session=session)
        assert report.ok, report
        cps.append(anchor.sign(key, seq=report.head_seq, head_hash=report.head_hash))

    rules = GovernanceRules(require_staging_before_production=True)
    step()
    for i in range(4):
        lifecycle.create_version(make_doc(variant=i), author=actors.author if i < 3 else actors.approver2,
                                 session=session)
        if i < 3:
            lifecycle.approve("fashion-cnn", i + 1, approver=actors.approver, reason="ok", session=session)
    assert not lifecycle.store_document(make_doc(variant=0), author=actors.author, session=session).created
    with pytest.raises(FourEyesViolation):
        lifecycle.approve("fashion-cnn", 4, approver=actors.approver2, reason="mine", session=session)
    with pytest.raises(InvalidTransition):
        lifecycle.activate("fashion-cnn", 4, "staging", actor=actors.approver, reason="draft", session=session)
    step()
    for number in (1, 2):
        lifecycle.activate("fashion-cnn", number, "staging", actor=actors.approver, reason="s", session=session)
        lifecycle.activate("fashion-cnn", number, "production", actor=actors.approver, reason="p", session=session,
                           rules=rules)
    step()
    lifecycle.rollback("fashion-cnn", "production", actor=actors.approver, reason="regression", session=session)
    lifecycle.rollback("fashion-cnn", "production", actor=actors.approver, to=2, session=session)
    lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="incident", session=session)
    lifecycle.unkill("fashion-cnn", "production", actor=actors.approver2, reason="fixed", session=session)
    lifecycle.kill("fashion-cnn", "staging", actor=actors.author, reason="drill", session=session)
    step()
    lifecycle.activate("fashion-cnn", 3, "staging", actor=actors.approver, reason="s", session=session)
    lifecycle.rollback("fashion-cnn", "staging", actor=actors.approver, session=session)
    lifecycle.retire("fashion-cnn", 3, actor=actors.approver, session=session)
    lifecycle.retire("fashion-cnn", 4, actor=actors.approver, session=session)
    step()
    report = audit.verify(session=session, checkpoints=cps)
    assert report.ok and report.details["checkpoints"] == len(cps), report
    states = {v.number: v.state for v in store.list_versions("fashion-cnn", session=session)}
    assert states == {1: "superseded", 2: "active", 3: "retired", 4: "retired"}



# ---------------------------------------------------------------- the anchor file, the key, the hook

def _signed_file(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    key_path, file = tmp_path / "k.pem", tmp_path / "anchor.jsonl"
    anchor.generate_key(key_path)
    key = anchor.load_private_key(key_path)
    for seq in range(1, n + 1):
        anchor.append_checkpoint(file, anchor.sign(key, seq=seq, head_hash=f"{seq:064x}", store="s"))
    return key_path, file


def test_keygen_writes_a_private_0600_key_and_never_overwrites(tmp_path: Path) -> None:
    public = anchor.generate_key(tmp_path / "k.pem")
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert anchor.key_id(anchor.load_public_key(tmp_path / "k.pem")) == anchor.key_id(public)
    (tmp_path / "k.pub").write_text(anchor.public_pem(public))
    assert anchor.key_id(anchor.load_public_key(tmp_path / "k.pub")) == anchor.key_id(public)
    with pytest.raises(InputError, match="already exists"):
        anchor.generate_key(tmp_path / "k.pem")


def test_altered_torn_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    key_path, file = _signed_file(tmp_path)
    public = anchor.load_public_key(key_path)
    assert [c.seq for c in anchor.load_verified(file, public, store="s")] == [1, 2, 3]
    lines = file.read_text().splitlines(keepends=True)

    forged = json.loads(lines[1])
    forged["seq"] = 7  # move a checkpoint: its signature no longer matches
    file.write_text(lines[0] + json.dumps(forged) + "\n" + lines[2])
    with pytest.raises(AuditChainBroken, match=rf"{file}:2: signature does not verify \(seq=7\)"):
        anchor.load_verified(file, public, store="s")

    file.write_text(lines[0] + lines[1][:40] + "\n")
    with pytest.raises(AuditChainBroken, match=rf"{file}:2: not JSON"):
        anchor.load_verified(file, public, store="s")

    file.write_text("".join(lines))
    anchor.generate_key(tmp_path / "other.pem")
    other = anchor.load_public_key(tmp_path / "other.pem")
    with pytest.raises(AuditChainBroken, match=rf"{file}:1: signed with key {anchor.key_id(public)}"):
        anchor.load_verified(file, other, store="s")
    sig = base64.b64decode(json.loads(lines[0])["sig"])
    assert len(sig) == 64
    with pytest.raises(AuditChainBroken, match="no checkpoint for store 'elsewhere'"):
        anchor.load_verified(file, public, store="elsewhere")


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback HTTP server that keeps the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/checkpoints", received
    server.shutdown()
    server.server_close()


def _commit_one(engine: Engine, actors: Any, name: str) -> None:
    with unit_of_work(engine) as s:
        add_principal(name, "reader", actor=actors.admin, session=s)


def test_hook_posts_each_checkpoint_to_the_operator_url(fresh_engine: Engine, committed_actors: Any,
                                                        tmp_path: Path,
                                                        collector: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = collector
    anchor.generate_key(tmp_path / "k.pem")
    hook = anchor.install_anchor_hook(get_settings(anchor_key=tmp_path / "k.pem", anchor_file=tmp_path / "a.jsonl",
                                                   anchor_url=url))
    try:
        _commit_one(fresh_engine, committed_actors, "dave")
    finally:
        events.remove(hook)
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert received == lines and len(lines) == 1 and lines[0]["seq"] == 6  # 5 principals, then dave
    anchor.check_signatures([anchor.parse(received[0], "posted")], anchor.load_public_key(tmp_path / "k.pem"))


def test_anchor_failures_are_logged_and_never_undo_the_change(fresh_engine: Engine, committed_actors: Any,
                                                              tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    anchor.generate_key(tmp_path / "k.pem")
    (tmp_path / "a-directory").mkdir()
    dead = f"http://127.0.0.1:{_closed_port()}/x"
    bad_file = anchor.install_anchor_hook(get_settings(anchor_key=tmp_path / "k.pem",
                                                       anchor_file=tmp_path / "a-directory"))
    bad_url = anchor.install_anchor_hook(get_settings(anchor_key=tmp_path / "k.pem", anchor_file=tmp_path / "a.jsonl",
                                                      anchor_url=dead, anchor_timeout_s=0.5))
    caplog.set_level(logging.ERROR)
    try:
        _commit_one(fresh_engine, committed_actors, "dave")
    finally:
        events.remove(bad_file)
        events.remove(bad_url)
    with unit_of_work(fresh_engine, readonly=True) as s:
        report = audit.verify(session=s)
    assert report.ok and report.head_seq == 6  # committed regardless
    text_ = caplog.text
    assert "ANCHOR NOT WRITTEN for audit seq=6" in text_ and "ANCHOR NOT POSTED: checkpoint seq=6" in text_
    assert json.loads((tmp_path / "a.jsonl").read_text())["seq"] == 6  # the file did not wait for the URL
    assert anchor.install_anchor_hook(get_settings(anchor_key=tmp_path / "k.pem")) is None
    assert "ANCHOR DISABLED: nowhere to write checkpoints" in caplog.text
    assert anchor.install_anchor_hook(get_settings()) is None  # not configured: silently off


def _closed_port() -> int:
    import socket  # lazy: only this helper needs a raw socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
