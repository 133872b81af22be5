"""Rollout guardrails: a version that weakens the promises of what it replaces needs an audited acceptance."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from exitwise.api.app import create_app
from exitwise.api.settings import ApiSettings
from exitwise.policies import audit, lifecycle, store
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.diff import weakenings
from exitwise.policies.errors import WeakerPolicy

MODEL = "guarded-cnn"


def _variant(doc: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = copy.deepcopy({k: v for k, v in doc.items() if k != "content_hash"})
    edit(body)
    return with_content_hash(body)


def _drop_studio(doc: dict[str, Any]) -> None:
    del doc["guarantee"]["segments"]["studio"]


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "eps": (lambda d: d["guarantee"].update(eps=0.03), "ε raised from 0.02 to 0.03"),
    "delta": (lambda d: d["guarantee"].update(delta=0.1), "δ raised from 0.05 to 0.1"),
    "risk": (lambda d: d["guarantee"].update(risk="induced_error"), "risk changed"),
    "uncertified": (lambda d: d["guarantee"].update(certified=False), "no longer certified"),
    "dropped": (_drop_studio, "budget of 'studio' (ε 0.02) was dropped"),
    "loosened": (lambda d: d["guarantee"]["segments"]["studio"].update(eps=0.05),
                 "'studio' loosened from ε 0.02 to 0.05"),
    "segment_uncertified": (lambda d: d["guarantee"]["segments"]["studio"].update(certified=False),
                            "segment 'studio' is no longer certified"),
    "forced_class": (lambda d: d["forced_full_depth"].update(classes=[]), "class 'Dress' is no longer forced"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_each_weakening_is_named(make_doc: Callable[..., dict], name: str) -> None:
    edit, needle = EDITS[name]
    base = make_doc(model=MODEL)
    found = weakenings(base, _variant(base, edit))
    assert len(found) == 1 and needle in found[0].message, found


def test_stricter_or_equal_promises_are_not_weaker(make_doc: Callable[..., dict]) -> None:
    base = make_doc(model=MODEL)
    stricter = _variant(base, lambda d: (d["guarantee"].update(eps=0.01, delta=0.01),
                                         d["guarantee"]["segments"]["studio"].update(eps=0.01),
                                         d["forced_full_depth"]["classes"].append("Trouser")))
    assert weakenings(base, stricter) == () and weakenings(base, make_doc(model=MODEL, variant=3)) == ()


def test_approving_a_weaker_version_needs_an_audited_reason(fresh_engine: Engine, make_actors: Callable[..., Any],
                                                            make_doc: Callable[..., dict]) -> None:
    v1 = make_doc(model=MODEL)
    v2 = _variant(make_doc(model=MODEL, variant=1, parent=1), _drop_studio)
    with unit_of_work(fresh_engine) as s:
        actors = make_actors(s)
        lifecycle.create_version(v1, author=actors.author, session=s)
        lifecycle.approve(MODEL, 1, approver=actors.approver, reason="ok", session=s)
        lifecycle.activate(MODEL, 1, "production", actor=actors.approver, reason="go", session=s)
        lifecycle.create_version(v2, author=actors.author, session=s)
    with unit_of_work(fresh_engine) as s, pytest.raises(WeakerPolicy) as refused:
        lifecycle.approve(MODEL, 2, approver=actors.approver, reason="looks fine", session=s)
    message = str(refused.value)
    assert "vs v1 (parent, active in production)" in message and "'studio'" in message and "--accept-weaker" in message
    with unit_of_work(fresh_engine) as s:
        assert store.get_version(MODEL, 2, session=s).state == "draft"
        v = lifecycle.approve(MODEL, 2, approver=actors.approver, reason="ok", session=s,
                              accept_weaker="studio traffic moved to its own model")
        assert v.state == "approved"
        event = audit.log(session=s, model=MODEL, limit=1)[0]
    assert event.action == "version.approve"
    assert event.details["accepted_weaker"] == "studio traffic moved to its own model"
    assert any("'studio'" in w for w in event.details["weaker_than"])


def test_api_refuses_then_accepts_a_weaker_version(fresh_engine: Engine, fresh_url: str, tmp_path: Path,
                                                   make_actors: Callable[..., Any],
                                                   make_doc: Callable[..., dict]) -> None:
    with unit_of_work(fresh_engine) as s:
        actors = make_actors(s)
        lifecycle.create_version(make_doc(model=MODEL), author=actors.author, session=s)
        lifecycle.approve(MODEL, 1, approver=actors.approver, reason="ok", session=s)
        lifecycle.activate(MODEL, 1, "staging", actor=actors.approver, reason="go", session=s)
        weaker = _variant(make_doc(model=MODEL, variant=2), lambda d: d["guarantee"].update(eps=0.05))
        lifecycle.create_version(weaker, author=actors.author, session=s)
    bob = {"Authorization": f"Bearer {actors.token(actors.approver)}"}
    settings = ApiSettings(database_url=fresh_url, data_dir=tmp_path, store_hooks=False)
    with TestClient(create_app(settings, engine=fresh_engine)) as client:
        refused = client.post(f"/v1/models/{MODEL}/versions/2/approve", json={"reason": "ok"}, headers=bob)
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["type"] == "urn:exitwise:problem:weaker-policy"
        assert any("ε raised from 0.02 to 0.05" in e["msg"] for e in body["errors"])
        diff = client.get(f"/v1/models/{MODEL}/diff", params={"a": 1, "b": 2}, headers=bob).json()
        assert [w["what"] for w in diff["weakened"]] == ["guarantee.eps"]
        accepted = client.post(f"/v1/models/{MODEL}/versions/2/approve",
                               json={"reason": "ok", "accept_weaker": "canary only"}, headers=bob)
        assert accepted.status_code == 200 and accepted.json()["state"] == "approved"


def test_cli_diff_and_approve_call_out_the_weakening(store_env: str, tmp_path: Path, make_doc: Callable[..., dict],
                                                     cli: Callable[..., Any]) -> None:
    def run(*args: str, token: str | None = None) -> Any:
        return cli(*args, *(["--token", token] if token else []))

    admin = run("principal", "add", "admin", "--role", "admin", "--quiet").out.strip()
    alice = run("principal", "add", "alice", "--role", "author", "--quiet", token=admin).out.strip()
    bob = run("principal", "add", "bob", "--role", "approver", "--quiet", token=admin).out.strip()
    for i, doc in enumerate((make_doc(model=MODEL), _variant(make_doc(model=MODEL, variant=1, parent=1),
                                                              _drop_studio))):
        path = tmp_path / f"v{i + 1}.json"
        path.write_text(json.dumps(doc))
        assert run("policy", "create", str(path), token=alice).code == 0
    assert run("policy", "approve", MODEL, "1", "--reason", "ok", token=bob).code == 0
    code, out, _ = run("policy", "diff", MODEL, "1", "2")
    assert code == 0 and "WEAKER in v2: the per-segment budget of 'studio'" in out, out
    code, _, err = run("policy", "approve", MODEL, "2", "--reason", "ok", token=bob)
    assert code == 1 and "--accept-weaker" in err, err
    code, out, err = run("policy", "approve", MODEL, "2", "--reason", "ok", "--accept-weaker", "moved", token=bob)
    assert code == 0, err
    assert "certificate as claimed by the author, not re-verified" in out
