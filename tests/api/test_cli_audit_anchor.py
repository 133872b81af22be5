"""``exitwise audit keygen | checkpoint | verify --anchor`` and the anchor hook of the CLI and the app."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from exitwise.api.app import create_app
from exitwise.policies import audit, events
from exitwise.policies.db import make_engine


def _rehash_after_editing_seq3(url: str) -> None:
    """A superuser edits event 3 and recomputes every later hash and the stored head."""
    engine = make_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
        prev = "0" * 64
        for row in conn.execute(text("SELECT * FROM audit_events ORDER BY seq")).mappings().all():
            rec = {**row, "details": json.loads(row["details"]), "prev_hash": prev}
            if rec["seq"] == 3:
                rec["reason"] = "edited"
            prev = audit.event_hash(rec)
            conn.execute(text("UPDATE audit_events SET reason = :r, prev_hash = :p, hash = :h WHERE seq = :s"),
                         {"r": rec["reason"], "p": rec["prev_hash"], "h": prev, "s": rec["seq"]})
        conn.execute(text("UPDATE store_state SET audit_seq = (SELECT max(seq) FROM audit_events), audit_hash = :h"),
                     {"h": prev})
    engine.dispose()


def test_keygen_hook_checkpoint_and_verify(cli: Any, store_env: str, tmp_path: Path, make_doc: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    key, pub, file = tmp_path / "anchor.pem", tmp_path / "anchor.pub", tmp_path / "anchor.jsonl"
    code, out, _ = cli("audit", "keygen", key)
    assert code == 0 and stat.S_IMODE(key.stat().st_mode) == 0o600 and "key id" in out
    pub.write_text(out[out.index("-----BEGIN PUBLIC KEY-----"):])
    code, _, err = cli("audit", "keygen", key)
    assert code == 2 and "already exists" in err
    monkeypatch.setenv("EXITWISE_ANCHOR_KEY", str(key))
    monkeypatch.setenv("EXITWISE_ANCHOR_FILE", str(file))

    admin = cli("principal", "add", "admin", "--role", "admin", "--quiet")[1].strip()
    tokens = {n: json.loads(cli("principal", "add", n, "--role", r, "--token", admin, "--json")[1])["token"]
              for n, r in (("alice", "author"), ("bob", "approver"))}
    doc = tmp_path / "p.json"
    doc.write_text(json.dumps(make_doc()))
    assert cli("policy", "create", doc, "--token", tokens["alice"])[0] == 0
    assert cli("policy", "approve", "fashion-cnn", "1", "-r", "ok", "--token", tokens["bob"])[0] == 0
    assert cli("policy", "activate", "fashion-cnn", "1", "--env", "production", "-r", "go",
               "--token", tokens["bob"])[0] == 0
    seqs = [json.loads(x)["seq"] for x in file.read_text().splitlines()]
    assert seqs == [2, 3, 4, 5, 6]  # every write after the bootstrap (which runs without a principal)

    code, out, _ = cli("audit", "checkpoint")
    assert code == 0 and "checkpoint seq=6" in out and len(file.read_text().splitlines()) == 6
    code, out, _ = cli("audit", "verify")  # EXITWISE_ANCHOR_FILE is set: checked by default
    assert code == 0 and "matches 6 signed checkpoint(s), latest seq=6" in out, out

    _rehash_after_editing_seq3(store_env)
    monkeypatch.delenv("EXITWISE_ANCHOR_KEY")
    monkeypatch.delenv("EXITWISE_ANCHOR_FILE")
    code, out, _ = cli("audit", "verify")
    assert code == 0 and "6 events" in out  # the chain alone cannot tell
    code, out, err = cli("audit", "verify", "--anchor", file, "--public-key", pub)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"checkpoint {file}:6" in err and "seq=6" in err and "rewritten" in err, err
    code, out, _ = cli("audit", "verify", "--anchor", file, "--public-key", pub, "--json")
    assert code == 1 and json.loads(out)["problem"] == "anchor" and json.loads(out)["broken_seq"] == 6
    code, _, err = cli("audit", "verify", "--anchor", file)
    assert code == 2 and "--public-key" in err
    monkeypatch.setenv("EXITWISE_ANCHOR_KEY", str(key))
    monkeypatch.setenv("EXITWISE_ANCHOR_FILE", str(file))
    code, _, err = cli("audit", "checkpoint")
    assert code == 1 and "not checkpointing" in err and len(file.read_text().splitlines()) == 6


def test_the_app_checkpoints_committed_changes(world: Any, make_doc: Any, make_settings: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    monkeypatch.setenv("EXITWISE_MLFLOW_SYNC", "off")
    key, file = tmp_path / "anchor.pem", tmp_path / "anchor.jsonl"
    assert cli("audit", "keygen", key)[0] == 0
    m = world.model("anchor")
    world.seed(make_doc, m, versions=1)
    before = len(events.registered())
    app = create_app(make_settings(store_hooks=True, data_dir=tmp_path, anchor_key=key, anchor_file=file,
                                   anchor_store="api"), engine=world.engine)
    with TestClient(app) as client:
        assert len(events.registered()) == before + 3
        r = client.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "drill"},
                        headers=world.auth("alice"))  # a kill: no approval report rendering in a thread
        assert r.status_code == 200
        head = client.get("/v1/audit/verify", headers=world.auth("rita")).json()
    assert len(events.registered()) == before
    lines = [json.loads(x) for x in file.read_text().splitlines()]
    assert [(c["seq"], c["hash"], c["store"]) for c in lines] == [(head["head_seq"], head["head_hash"], "api")]
