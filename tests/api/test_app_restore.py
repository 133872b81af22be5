"""Replica caches after the store goes back: a restore from backup, a failover to a replica that was behind.

The counter alone can move back and then climb to its old value with other content; any
change of the store's stamp (generation in either direction, audit head, identity) must
drop a replica's cached policies and tokens.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from exitwise.api.app import create_app
from exitwise.api.settings import ApiSettings
from exitwise.policies import lifecycle
from exitwise.policies.db import StoreStamp, current_stamp, make_engine, unit_of_work, upgrade
from exitwise.policies.models import StoreState
from exitwise.policies.principals import disable_principal, get_principal

MODEL = "restore-cnn"
EXITWISE = Path(sys.executable).with_name("exitwise")


def _seed(engine: Engine, make_actors: Callable[..., Any], make_doc: Callable[..., dict], versions: int) -> Any:
    with unit_of_work(engine) as s:
        actors = make_actors(s)
        for i in range(versions):
            lifecycle.create_version(make_doc(model=MODEL, variant=i), author=actors.author, session=s)
            lifecycle.approve(MODEL, i + 1, approver=actors.approver, reason="ok", session=s)
        lifecycle.activate(MODEL, 1, "production", actor=actors.approver, reason="first", session=s)
    return actors


def _activate_in_turn(engine: Engine, numbers: list[int]) -> None:
    with unit_of_work(engine) as s:
        bob = get_principal("bob", session=s)
        for n in numbers:
            lifecycle.activate(MODEL, n, "production", actor=bob, reason="turn", session=s)


def test_counter_going_back_drops_cached_policies_and_tokens(fresh_engine: Engine, fresh_url: str, tmp_path: Path,
                                                             make_actors: Callable[..., Any],
                                                             make_doc: Callable[..., dict]) -> None:
    """Both backends: the counter set back by 7 (what a restore does), then a kill and a disabled reader."""
    actors = _seed(fresh_engine, make_actors, make_doc, versions=3)
    _activate_in_turn(fresh_engine, [2, 3, 1, 2, 3, 1, 2])
    settings = ApiSettings(database_url=fresh_url, data_dir=tmp_path, cache_ttl_ms=0, store_hooks=False)
    app = create_app(settings, engine=fresh_engine)
    reader = {"Authorization": f"Bearer {actors.token(actors.reader)}"}
    with TestClient(app) as client:
        first = client.get(f"/v1/models/{MODEL}/policy", params={"env": "production"}, headers=reader)
        assert first.status_code == 200 and first.json()["killed"] is False
        with unit_of_work(fresh_engine) as s:  # the store goes back 7 changes
            s.execute(update(StoreState).where(StoreState.id == 1).values(generation=StoreState.generation - 7))
        with unit_of_work(fresh_engine) as s:
            lifecycle.kill(MODEL, "production", actor=actors.author, reason="after restore", session=s)
            disable_principal("rita", actor=actors.admin, reason="after restore", session=s)
        assert client.get(f"/v1/models/{MODEL}/policy", params={"env": "production"},
                          headers=reader).status_code == 401
        alice = {"Authorization": f"Bearer {actors.token(actors.author)}"}
        again = client.get(f"/v1/models/{MODEL}/policy", params={"env": "production"}, headers=alice)
        assert again.status_code == 200 and again.json()["killed"] is True
        assert app.state.cache.resets >= 1


def test_equal_counter_with_other_content_is_a_different_store(fresh_engine: Engine, fresh_url: str, tmp_path: Path,
                                                               make_actors: Callable[..., Any],
                                                               make_doc: Callable[..., dict]) -> None:
    """The counter back and up again to the very value the replica saw: the audit head tells them apart."""
    actors = _seed(fresh_engine, make_actors, make_doc, versions=2)
    settings = ApiSettings(database_url=fresh_url, data_dir=tmp_path, cache_ttl_ms=0, store_hooks=False)
    app = create_app(settings, engine=fresh_engine)
    alice = {"Authorization": f"Bearer {actors.token(actors.author)}"}
    with TestClient(app) as client:
        assert client.get(f"/v1/models/{MODEL}/policy", headers=alice).json()["killed"] is False
        with unit_of_work(fresh_engine) as s:
            seen = current_stamp(s)
            s.execute(update(StoreState).where(StoreState.id == 1).values(generation=StoreState.generation - 1))
            lifecycle.kill(MODEL, "production", actor=actors.author, reason="same counter", session=s)
        with unit_of_work(fresh_engine) as s:
            now = current_stamp(s)
        assert now.generation == seen.generation and now != seen
        assert client.get(f"/v1/models/{MODEL}/policy", headers=alice).json()["killed"] is True


def test_db_upgrade_stamps_a_new_store_identity(fresh_engine: Engine) -> None:
    with unit_of_work(fresh_engine, readonly=True) as s:
        before = current_stamp(s)
    upgrade(fresh_engine)  # already at head: the migration is a no-op, the identity is new
    with unit_of_work(fresh_engine, readonly=True) as s:
        after = current_stamp(s)
        assert s.scalar(select(StoreState.generation)) == before.generation
    assert isinstance(after, StoreStamp) and len(after.store_id) == 36
    assert after.store_id != before.store_id and after.generation == before.generation


def _backup(db: Path, to: Path) -> None:
    """SQLite's online backup API: what an operator's backup or restore of a live file does."""
    src, dst = sqlite3.connect(db), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def test_live_server_after_a_sqlite_restore(tmp_path: Path, make_actors: Callable[..., Any],
                                            make_doc: Callable[..., dict],
                                            spawn_server: Callable[..., Any]) -> None:
    """The reported reproduction: a real server, a file restored under it, kill and disable with the CLI."""
    data = tmp_path / "data"
    db = data / "exitwise.db"
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    upgrade(engine)
    actors = _seed(engine, make_actors, make_doc, versions=3)
    _backup(db, tmp_path / "backup.db")
    _activate_in_turn(engine, [2, 3, 1, 2, 3, 1, 2])
    engine.dispose()
    server = spawn_server(url, data, ttl_ms=50)
    try:
        reader = {"Authorization": f"Bearer {actors.token(actors.reader)}"}
        served = httpx.get(f"{server.base_url}/v1/models/{MODEL}/policy", headers=reader, timeout=10)
        assert served.status_code == 200 and served.json()["version"] == 2

        _backup(tmp_path / "backup.db", db)  # restore under the running server
        env = {**os.environ, "EXITWISE_DATABASE_URL": url, "EXITWISE_DATA_DIR": str(data),
               "EXITWISE_TOKEN": actors.token(actors.admin), "EXITWISE_STORE_HOOKS": "false"}
        for args in (["policy", "kill", MODEL, "--env", "production", "--reason", "restored"],
                     ["principal", "disable", "rita", "--reason", "restored"]):
            done = subprocess.run([str(EXITWISE), *args], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr

        after = httpx.get(f"{server.base_url}/v1/models/{MODEL}/policy", headers=reader, timeout=10)
        assert after.status_code == 401, after.text
        admin = {"Authorization": f"Bearer {actors.token(actors.admin)}"}
        body = httpx.get(f"{server.base_url}/v1/models/{MODEL}/policy", headers=admin, timeout=10).json()
        assert body["killed"] is True and body["version"] == 1
    finally:
        server.stop()
