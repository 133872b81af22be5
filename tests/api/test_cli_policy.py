"""The store's CLI: ``exitwise db | principal | policy | audit`` (in-process, on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from exitwise.policies.db import make_engine


def _one_line_error(r: Any, code: int, *needles: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    assert r.err.startswith("error: ") and r.err.count("\n") == 1, r.err
    assert "Traceback" not in r.err + r.out
    for n in needles:
        assert n in r.err, (n, r.err)


@pytest.fixture
def tokens(cli: Any, store_env: str) -> dict[str, str]:
    """admin (bootstrap), alice (author), bob and carol (approvers), via the CLI."""
    out = {"admin": cli("principal", "add", "admin", "--role", "admin", "--quiet").out.strip()}
    for name, role in (("alice", "author"), ("bob", "approver"), ("carol", "approver")):
        r = cli("principal", "add", name, "--role", role, "--token", out["admin"], "--json")
        assert r.code == 0, r.err
        out[name] = r.json()["token"]
    return out


@pytest.fixture
def docs(tmp_path: Path, make_doc: Any) -> list[Path]:
    paths = []
    for i, doc in enumerate([make_doc(), make_doc(variant=5, parent=1), make_doc(variant=9)]):
        p = tmp_path / f"policy{i + 1}.json"
        p.write_text(json.dumps(doc), encoding="utf-8")
        paths.append(p)
    return paths


def test_workflow(cli: Any, tokens: dict[str, str], docs: list[Path], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = tokens["alice"], tokens["bob"]
    r = cli("policy", "create", docs[0], "--token", alice)
    assert r.code == 0 and "created fashion-cnn v1 (draft)" in r.out
    r = cli("policy", "create", docs[1], "--token", alice, "--json")
    assert r.json()["number"] == 2 and r.json()["parent"] == 1 and r.json()["created"] is True
    r = cli("policy", "create", docs[0], "--token", alice, "--exist-ok", "--json")
    assert (r.code, r.json()["number"], r.json()["created"]) == (0, 1, False)

    monkeypatch.setenv("EXITWISE_TOKEN", bob)  # the token from the environment
    assert "approved fashion-cnn v1" in cli("policy", "approve", "fashion-cnn", "1", "--reason", "reviewed").out
    assert cli("policy", "approve", "fashion-cnn", "2", "-r", "reviewed", "--json").json()["state"] == "approved"
    r = cli("policy", "activate", "fashion-cnn", "1", "--env", "production", "--reason", "first")
    assert r.code == 0 and "activated fashion-cnn v1 in production" in r.out
    r = cli("policy", "activate", "fashion-cnn", "2", "--env", "production", "--reason", "better", "--json")
    assert (r.json()["version"], r.json()["killed"]) == (2, False)

    r = cli("policy", "list")
    assert r.code == 0 and "superseded" in r.out and "production" in r.out and "bob" in r.out
    listed = cli("policy", "list", "fashion-cnn", "--json").json()["versions"]
    assert [(v["number"], v["state"]) for v in listed] == [(1, "superseded"), (2, "active")]
    shown = cli("policy", "show", "fashion-cnn", "2", "--json").json()
    assert shown["version"] == 2 and shown["state"] == "active" and shown["environments"] == ["production"]
    assert "content_hash" in cli("policy", "show", "fashion-cnn", "2").out
    r = cli("policy", "diff", "fashion-cnn", "1", "2")
    assert r.code == 0 and "thresholds" in r.out and "T-shirt" in r.out and "0.905" in r.out
    d = cli("policy", "diff", "fashion-cnn", "1", "2", "--json").json()
    assert d["thresholds"][0] == {"segment": "default", "exit": 0, "exit_name": "stage1", "class": "T-shirt",
                                  "a": 0.9, "b": 0.905}
    assert d["guarantee"]["eps"] == {"a": 0.02, "b": 0.02} and "parent" in d["changed_fields"]

    r = cli("policy", "rollback", "fashion-cnn", "--env", "production", "--reason", "regression")
    assert r.code == 0 and "rolled back to fashion-cnn v1" in r.out
    assert cli("policy", "rollback", "fashion-cnn", "--env", "production", "--to", "2", "--json").json()["version"] == 2
    r = cli("policy", "kill", "fashion-cnn", "--env", "production", "--reason", "incident", "--token", alice)
    assert r.code == 0 and "kill switch ON" in r.out
    assert cli("policy", "active", "fashion-cnn", "--env", "production", "--json").json()["killed"] is True
    assert cli("policy", "unkill", "fashion-cnn", "--env", "production", "--reason", "ok", "--json"
               ).json()["killed"] is False
    assert cli("policy", "retire", "fashion-cnn", "1", "--reason", "old", "--json").json()["state"] == "retired"

    log = cli("audit", "log", "--model", "fashion-cnn", "--limit", "3", "--json").json()["events"]
    assert [e["action"] for e in log] == ["version.retire", "killswitch.unkill", "killswitch.kill"]
    r = cli("audit", "log")
    assert r.code == 0 and "principal.add" in r.out and "version.rollback" in r.out
    r = cli("audit", "verify")
    assert r.code == 0 and "audit chain verifies: 15 events" in r.out
    report = cli("audit", "verify", "--json").json()
    assert report["ok"] and report["head_seq"] == 15
    for fmt in ("jsonl", "csv"):
        out = tmp_path / "export" / f"trail.{fmt}"
        r = cli("audit", "export", "--format", fmt, "--out", out, "--json")
        assert r.json()["events"] == 15 and out.is_file()
        r = cli("audit", "verify", "--file", out, "--head", report["head_hash"])
        assert r.code == 0 and "15 events" in r.out


def test_write_commands_need_an_authenticated_principal(cli: Any, tokens: dict[str, str], docs: list[Path],
                                                        table_dump: Any, store_env: str) -> None:
    engine = make_engine(store_env)
    before = table_dump(engine)
    _one_line_error(cli("policy", "create", docs[0]), 1, "pass --token or set EXITWISE_TOKEN")
    _one_line_error(cli("policy", "create", docs[0], "--token", "ew_forged"), 1, "invalid token")
    _one_line_error(cli("principal", "add", "eve", "--role", "admin"), 1, "needs an admin token")
    _one_line_error(cli("principal", "add", "eve", "--role", "admin", "--token", tokens["bob"]), 1, "admin")
    assert table_dump(engine) == before
    engine.dispose()


def test_refusals_and_bad_input(cli: Any, tokens: dict[str, str], docs: list[Path], tmp_path: Path) -> None:
    alice, bob = tokens["alice"], tokens["bob"]
    assert cli("policy", "create", docs[2], "--token", bob).code == 0  # authored by an approver
    _one_line_error(cli("policy", "approve", "fashion-cnn", "1", "-r", "mine", "--token", bob), 1, "four-eyes")
    _one_line_error(cli("policy", "activate", "fashion-cnn", "1", "--env", "production", "-r", "x", "--token", bob),
                    1, "draft")
    _one_line_error(cli("policy", "approve", "fashion-cnn", "1", "--token", tokens["carol"]), 2, "reason")
    _one_line_error(cli("policy", "approve", "fashion-cnn", "1", "-r", "x", "--token", alice), 1, "approver")
    _one_line_error(cli("policy", "create", docs[2], "--token", alice), 1, "already has this content as version 1")
    _one_line_error(cli("policy", "show", "fashion-cnn", "7"), 1, "no version 7")
    _one_line_error(cli("policy", "list", "nope"), 1, "no model named 'nope'")
    _one_line_error(cli("policy", "rollback", "fashion-cnn", "--env", "production", "--token", bob), 1,
                    "no earlier version")
    _one_line_error(cli("policy", "kill", "fashion-cnn", "--env", "Bad Env", "-r", "x", "--token", bob), 2,
                    "invalid environment")
    missing = tmp_path / "missing.json"
    _one_line_error(cli("policy", "create", missing, "--token", alice), 2, "missing.json", "no such file")
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": ', encoding="utf-8")
    _one_line_error(cli("policy", "create", broken, "--token", alice), 2, "broken.json", "not JSON", "line 1")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({**json.loads(docs[0].read_text()), "exits": []}), encoding="utf-8")
    _one_line_error(cli("policy", "create", invalid, "--token", alice), 2, "invalid policy document", "exits")
    _one_line_error(cli("audit", "export", "--format", "xml", "--out", tmp_path / "x"), 2, "jsonl or csv")
    _one_line_error(cli("audit", "verify", "--file", missing), 2, "no such file")
    assert cli("policy", "approve", "fashion-cnn").code == 2  # usage error from click


def test_audit_verify_names_the_broken_row(cli: Any, tokens: dict[str, str], store_env: str) -> None:
    engine = make_engine(store_env)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
    engine.dispose()
    _one_line_error(cli("audit", "verify"), 1, "seq=2", "edited")
    r = cli("audit", "verify", "--json")
    assert r.code == 1 and r.json()["broken_seq"] == 2 and r.json()["problem"] == "edited"


def test_principal_commands(cli: Any, tokens: dict[str, str]) -> None:
    r = cli("principal", "list")
    assert r.code == 0 and "carol" in r.out and "ew_" not in r.out
    assert [p["name"] for p in cli("principal", "list", "--json").json()["principals"]] == [
        "admin", "alice", "bob", "carol"]
    r = cli("principal", "add", "rita", "--role", "reader", "--token", tokens["admin"])
    assert r.code == 0 and "shown once" in r.out and r.out.strip().splitlines()[-1].startswith("ew_")
    _one_line_error(cli("principal", "add", "x", "--role", "root", "--token", tokens["admin"]), 2, "unknown role")
    assert cli("principal", "disable", "alice", "--reason", "left", "--token", tokens["admin"]).code == 0
    _one_line_error(cli("policy", "kill", "fashion-cnn", "--env", "prod", "-r", "x", "--token", tokens["alice"]),
                    1, "disabled")


def test_db_commands(cli: Any, empty_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITWISE_DATABASE_URL", empty_url)
    monkeypatch.setenv("EXITWISE_DATA_DIR", str(tmp_path))
    info = cli("db", "current", "--json").json()
    assert info["current"] is None and not info["up_to_date"]
    if not empty_url.startswith("sqlite"):  # (an empty SQLite file is initialised on first use)
        _one_line_error(cli("policy", "list"), 1, "exitwise db upgrade")
    _one_line_error(cli("db", "current", "--check"), 1, "out-of-date")
    r = cli("db", "upgrade")
    assert r.code == 0 and "upgraded from empty to" in r.out
    assert "already at revision" in cli("db", "upgrade").out
    info = cli("db", "current", "--check", "--json").json()
    assert info["up_to_date"] and info["current"] == info["head"]
    assert cli("policy", "list").out.strip() == "no policy versions stored"


def test_console_script_finds_its_migrations(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("exitwise")
    env = {**os.environ, "EXITWISE_DATA_DIR": str(tmp_path / "data")}
    env.pop("EXITWISE_DATABASE_URL", None)
    r = subprocess.run([str(exe), "db", "upgrade", "--json"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["to"] == json.loads(r.stdout)["head"]
    assert (tmp_path / "data" / "exitwise.db").is_file()
