"""Every route, every role, through FastAPI's TestClient and a real uvicorn process (``api`` fixture)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from exitwise.policies.audit import check_chain
from exitwise.policies.canonical import verify_content_hash

NAME_OF_ROLE = {"reader": "rita", "author": "alice", "approver": "bob", "admin": "admin"}

# (route, role) -> expected status; None = no token.
WRITE_MATRIX = {
    "create": {None: 401, "reader": 403, "author": 201, "approver": 201, "admin": 201},
    "approve": {None: 401, "reader": 403, "author": 403, "approver": 200, "admin": 200},
    "activate": {None: 401, "reader": 403, "author": 403, "approver": 200, "admin": 200},
    "rollback": {None: 401, "reader": 403, "author": 403, "approver": 200, "admin": 200},
    "kill": {None: 401, "reader": 403, "author": 200, "approver": 200, "admin": 200},
    "unkill": {None: 401, "reader": 403, "author": 403, "approver": 200, "admin": 200},
}
AUDIT_ACTION = {"create": "version.create", "approve": "version.approve", "activate": "version.activate",
                "rollback": "version.rollback", "kill": "killswitch.kill", "unkill": "killswitch.unkill"}


def _write_case(world: Any, make_doc: Callable[..., dict[str, Any]], route: str) -> tuple[str, str, dict[str, Any]]:
    """Seed a fresh model so that ``route`` is allowed by the lifecycle; return (model, path, body)."""
    m = world.model(route)
    if route == "create":
        return m, "/v1/policies", make_doc(model=m)
    if route == "approve":
        world.seed(make_doc, m, versions=1)
        return m, f"/v1/models/{m}/versions/1/approve", {"reason": "looks right"}
    if route == "activate":
        world.seed(make_doc, m, versions=1, approve=1)
        return m, f"/v1/models/{m}/versions/1/activate", {"env": "production", "reason": "release"}
    if route == "rollback":
        world.seed(make_doc, m, versions=2, approve=2, activate={"production": 1})
        world.activate(m, 2, "production")
        return m, f"/v1/models/{m}/rollback", {"env": "production", "reason": "regression"}
    if route == "kill":
        world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
        return m, f"/v1/models/{m}/kill", {"env": "production", "reason": "incident"}
    world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1}, kill=("production",))
    return m, f"/v1/models/{m}/unkill", {"env": "production", "reason": "resolved"}


@pytest.mark.parametrize("role", [None, "reader", "author", "approver", "admin"])
@pytest.mark.parametrize("route", list(WRITE_MATRIX))
def test_write_routes_by_role(api: httpx.Client, world: Any, make_doc: Callable[..., dict[str, Any]],
                              route: str, role: str | None) -> None:
    model, path, body = _write_case(world, make_doc, route)
    who = NAME_OF_ROLE.get(role) if role else None
    resp = api.post(path, json=body, headers=world.auth(who))
    expected = WRITE_MATRIX[route][role]
    assert resp.status_code == expected, resp.text
    if expected >= 400:
        assert resp.headers["content-type"].startswith("application/problem+json")
        problem = resp.json()
        assert problem["status"] == expected
        if expected == 401:
            assert resp.headers["www-authenticate"].startswith("Bearer")
        return
    events = api.get("/v1/audit", params={"model": model, "action": AUDIT_ACTION[route]},
                     headers=world.auth("rita")).json()["events"]
    assert [e["actor"] for e in events] == [who], "the audit actor is the authenticated principal"


GET_ROUTES = [
    "/v1/models/{m}/policy?env=production",
    "/v1/models/{m}/versions/1/policy",
    "/v1/models",
    "/v1/models/{m}/versions",
    "/v1/models/{m}/versions/1",
    "/v1/models/{m}/diff?a=1&b=2",
    "/v1/audit?model={m}",
    "/v1/audit/verify",
    "/v1/audit/export?format=jsonl",
    "/v1/me",
]


@pytest.fixture
def read_model(world: Any, make_doc: Callable[..., dict[str, Any]]) -> str:
    """A model with v1 active in production and v2 approved, seeded once per backend."""
    if "read" not in world.shared:
        m = world.model("read")
        world.seed(make_doc, m, versions=2, approve=2, activate={"production": 1})
        world.shared["read"] = m
    return world.shared["read"]


@pytest.mark.parametrize("who", [None, "bogus", "dora", "rita", "admin"])
@pytest.mark.parametrize("route", GET_ROUTES)
def test_read_routes_by_role(api: httpx.Client, world: Any, read_model: str, route: str, who: str | None) -> None:
    headers = {"Authorization": "Bearer ew_not-a-real-token"} if who == "bogus" else world.auth(who)
    resp = api.get(route.format(m=read_model), headers=headers)
    if who in (None, "bogus", "dora"):  # no token, unknown token, disabled principal
        assert resp.status_code == 401, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.headers["www-authenticate"].startswith("Bearer")
    else:
        assert resp.status_code == 200, resp.text


def test_wrong_auth_scheme_is_401(api: httpx.Client, world: Any) -> None:
    resp = api.get("/v1/me", headers={"Authorization": f"Basic {world.tokens['rita']}"})
    assert resp.status_code == 401
    assert resp.json()["type"] == "urn:exitwise:problem:auth-error"


def test_lifecycle_end_to_end(api: httpx.Client, world: Any, make_doc: Callable[..., dict[str, Any]]) -> None:
    m = world.model("flow")
    alice, bob, carol, rita = (world.auth(n) for n in ("alice", "bob", "carol", "rita"))
    d1 = make_doc(model=m)
    created = api.post("/v1/policies", json=d1, headers=alice)
    assert created.status_code == 201
    assert created.headers["location"] == f"/v1/models/{m}/versions/1"
    body = created.json()
    assert (body["version"], body["state"], body["author"]) == (1, "draft", "alice")
    assert body["document"]["content_hash"] == d1["content_hash"]
    d2 = make_doc(model=m, variant=1, parent=1)
    assert api.post("/v1/policies", json=d2, headers=alice).json()["parent"] == 1

    assert api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "ok"}, headers=bob).json()["state"] \
        == "approved"
    approved = api.post(f"/v1/models/{m}/versions/2/approve", json={"reason": "ok too"}, headers=carol).json()
    assert approved["approvals"][0]["approver"] == "carol"

    act = api.post(f"/v1/models/{m}/versions/1/activate", json={"env": "production", "reason": "r1"}, headers=bob)
    assert act.status_code == 200 and act.json()["version"] == 1
    served = api.get(f"/v1/models/{m}/policy", params={"env": "production"}, headers=rita)
    doc = served.json()
    assert (doc["version"], doc["environment"], doc["killed"], doc["state"]) == (1, "production", False, "active")
    assert verify_content_hash(doc) and doc["content_hash"] == d1["content_hash"]

    api.post(f"/v1/models/{m}/versions/2/activate", json={"env": "production", "reason": "r2"}, headers=bob)
    assert api.get(f"/v1/models/{m}/policy", headers=rita).json()["version"] == 2  # env defaults to production
    back = api.post(f"/v1/models/{m}/rollback", json={"env": "production"}, headers=bob)
    assert back.status_code == 200 and back.json()["version"] == 1
    forward = api.post(f"/v1/models/{m}/rollback", json={"env": "production", "to": 2, "reason": "fixed"},
                       headers=carol)
    assert forward.json()["version"] == 2

    killed = api.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "incident"}, headers=alice)
    assert killed.json() | {"changed_at": None} == {
        "model": m, "environment": "production", "killed": True, "reason": "incident", "changed_at": None,
        "changed_by": "alice"}
    assert api.get(f"/v1/models/{m}/policy", headers=rita).json()["killed"] is True
    unkilled = api.post(f"/v1/models/{m}/unkill", json={"env": "production", "reason": "over"}, headers=bob)
    assert unkilled.json()["killed"] is False
    assert api.get(f"/v1/models/{m}/policy", headers=rita).json()["killed"] is False

    models = {x["name"]: x for x in api.get("/v1/models", headers=rita).json()["models"]}
    assert models[m]["active"] == {"production": 2} and models[m]["versions"] == 2 and models[m]["killed"] == []
    versions = api.get(f"/v1/models/{m}/versions", headers=rita).json()
    assert [(v["version"], v["state"]) for v in versions["versions"]] == [(1, "superseded"), (2, "active")]
    one = api.get(f"/v1/models/{m}/versions/1", headers=rita).json()
    assert one["document"] == d1
    exact = api.get(f"/v1/models/{m}/versions/1/policy", headers=rita)
    assert exact.json()["version"] == 1 and verify_content_hash(exact.json())

    diff = api.get(f"/v1/models/{m}/diff", params={"a": 1, "b": 2}, headers=rita).json()
    assert diff["identical"] is False and diff["thresholds"]
    assert {"segment", "exit", "exit_name", "class", "before", "after"} <= set(diff["thresholds"][0])
    assert "thresholds" in diff["changed_fields"]

    actions = [e["action"] for e in api.get("/v1/audit", params={"model": m}, headers=rita).json()["events"]]
    assert actions == ["version.create", "version.create", "version.approve", "version.approve",
                       "version.activate", "version.activate", "version.rollback", "version.rollback",
                       "killswitch.kill", "killswitch.unkill"]


def test_audit_filters_pagination_verify_export(api: httpx.Client, world: Any,
                                                make_doc: Callable[..., dict[str, Any]]) -> None:
    m = world.model("audit")
    world.seed(make_doc, m, versions=3, approve=3, activate={"production": 1, "staging": 2})
    rita = world.auth("rita")
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10):
        page = api.get("/v1/audit", params={"model": m, "limit": 2, **({"cursor": cursor} if cursor else {})},
                       headers=rita).json()
        seen += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 8 and [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    by_bob = api.get("/v1/audit", params={"model": m, "actor": "bob"}, headers=rita).json()["events"]
    assert len(by_bob) == 5 and {e["actor"] for e in by_bob} == {"bob"}
    acts = api.get("/v1/audit", params={"model": m, "action": "version.activate"}, headers=rita).json()["events"]
    assert [(e["environment"], e["version"]) for e in acts] == [("production", 1), ("staging", 2)]
    assert api.get("/v1/audit", params={"model": m, "action": "nope"}, headers=rita).json() == {
        "events": [], "next_cursor": None}

    report = api.get("/v1/audit/verify", headers=rita).json()
    assert report["ok"] is True and report["problem"] is None and report["events"] == report["head_seq"]

    jsonl = api.get("/v1/audit/export", params={"format": "jsonl"}, headers=rita)
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in jsonl.text.splitlines()]
    assert check_chain(records).ok
    assert int(jsonl.headers["x-audit-head-seq"]) == records[-1]["seq"] >= report["head_seq"]
    as_csv = api.get("/v1/audit/export", params={"format": "csv"}, headers=rita)
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [int(r["seq"]) for r in rows][: len(records)] == [r["seq"] for r in records]


def test_health_and_ready(api: httpx.Client, world: Any) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["database"] == world.backend


def test_whoami(api: httpx.Client, world: Any) -> None:
    for name, role in (("rita", "reader"), ("alice", "author"), ("bob", "approver"), ("admin", "admin")):
        me = api.get("/v1/me", headers=world.auth(name)).json()
        assert (me["name"], me["role"]) == (name, role)


def test_report_route(api: httpx.Client, world: Any, read_model: str) -> None:
    path = f"/v1/models/{read_model}/versions/1/report"
    html = api.get(path, headers=world.auth("rita"))
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert read_model in html.text and "<html" in html.text.lower()
    assert html.headers["content-disposition"] == f'inline; filename="{read_model}-v1.html"'
    assert api.get(path).status_code == 401
    assert api.get(f"/v1/models/{read_model}/versions/99/report", headers=world.auth("rita")).status_code == 404
    assert api.get(path, params={"format": "docx"}, headers=world.auth("rita")).status_code == 422


def test_report_route_without_the_reports_extra_is_501(asgi_client: httpx.Client, world: Any, read_model: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if the [reports] extra were not installed
    monkeypatch.delitem(sys.modules, "exitwise.policies.report.render", raising=False)
    with caplog.at_level("ERROR", logger="exitwise.api"):
        r = asgi_client.get(f"/v1/models/{read_model}/versions/1/report", headers=world.auth("rita"))
    assert r.status_code == 501 and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["title"] == "Optional dependency not installed" and body["type"].endswith("missing-dependency")
    logged = "".join(str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info and body["error_id"] in
                     rec.getMessage())
    assert "pip install 'exitwise[reports]'" in logged  # the operator reads the fix in the log under error_id


def test_report_route_pdf(asgi_client: httpx.Client, world: Any, read_model: str) -> None:
    if world.backend != "sqlite":
        pytest.skip("PDF rendering does not depend on the database backend: rendered once, on SQLite")
    pdf = asgi_client.get(f"/v1/models/{read_model}/versions/2/report", params={"format": "pdf"},
                          headers=world.auth("rita"))
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
