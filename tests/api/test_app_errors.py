"""Error paths as RFC 9457 problem+json: 401/403/404/405/409/413/422/503/500, and the error mapping."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import exitwise.calibration.exceptions as core_errors
import exitwise.policies.errors as store_errors
from exitwise.api.app import create_app
from exitwise.api.problems import problem_type
from exitwise.api.settings import ApiSettings
from exitwise.calibration.exceptions import ExitwiseError
from exitwise.policies.db import make_engine
from exitwise.policies.schema import DocumentError

PROBLEM_KEYS = {"type", "title", "status"}


def assert_problem(resp: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert set(body) >= PROBLEM_KEYS and body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    if type_ is not None:
        assert body["type"] == type_
    return body


@pytest.fixture
def active_model(world: Any, make_doc: Callable[..., dict[str, Any]]) -> str:
    m = world.model("err")
    world.seed(make_doc, m, versions=2, approve=1, activate={"production": 1})
    return m


NOT_FOUND = "urn:exitwise:problem:not-found"


def test_404_unknown_model_version_and_route(api: httpx.Client, world: Any, active_model: str) -> None:
    m, ghost = active_model, "no-such-model"
    rita, bob, alice = world.auth("rita"), world.auth("bob"), world.auth("alice")
    for path in (f"/v1/models/{ghost}/policy", f"/v1/models/{ghost}/versions", f"/v1/models/{ghost}/versions/1",
                 f"/v1/models/{ghost}/versions/1/policy", f"/v1/models/{ghost}/diff?a=1&b=2",
                 f"/v1/models/{m}/versions/99", f"/v1/models/{m}/versions/99/policy",
                 f"/v1/models/{m}/diff?a=1&b=99", f"/v1/models/{m}/policy?env=staging"):
        body = assert_problem(api.get(path, headers=rita), 404, NOT_FOUND)
        assert body["instance"] == path.split("?")[0] and body["detail"]
    for path, body in ((f"/v1/models/{ghost}/versions/1/approve", {"reason": "x"}),
                       (f"/v1/models/{m}/versions/99/approve", {"reason": "x"}),
                       (f"/v1/models/{m}/versions/99/activate", {"env": "production", "reason": "x"}),
                       (f"/v1/models/{ghost}/rollback", {"env": "production"}),
                       (f"/v1/models/{m}/rollback", {"env": "production", "to": 99}),
                       (f"/v1/models/{ghost}/unkill", {"env": "production", "reason": "x"})):
        assert_problem(api.post(path, json=body, headers=bob), 404, NOT_FOUND)
    assert_problem(api.post(f"/v1/models/{ghost}/kill", json={"env": "production", "reason": "x"}, headers=alice),
                   404, NOT_FOUND)
    assert_problem(api.get("/v1/nothing-here", headers=rita), 404, "about:blank")


def test_405(api: httpx.Client, world: Any, active_model: str) -> None:
    assert_problem(api.delete("/v1/models", headers=world.auth("admin")), 405)
    assert_problem(api.put(f"/v1/models/{active_model}/policy", headers=world.auth("admin")), 405)


def test_409_conflicts(api: httpx.Client, world: Any, active_model: str, make_doc: Callable[..., dict]) -> None:
    m, bob, alice = active_model, world.auth("bob"), world.auth("alice")
    dup = assert_problem(api.post("/v1/policies", json=make_doc(model=m), headers=alice), 409,
                         "urn:exitwise:problem:duplicate-content")
    assert "version 1" in dup["detail"]
    transition = "urn:exitwise:problem:invalid-transition"
    assert_problem(api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "again"}, headers=bob), 409,
                   transition)
    assert_problem(api.post(f"/v1/models/{m}/versions/2/activate", json={"env": "production", "reason": "x"},
                            headers=bob), 409, transition)  # v2 is a draft
    assert_problem(api.post(f"/v1/models/{m}/versions/1/activate", json={"env": "production", "reason": "x"},
                            headers=bob), 409, transition)  # already active
    assert_problem(api.post(f"/v1/models/{m}/rollback", json={"env": "production"}, headers=bob), 409, transition)
    assert_problem(api.post(f"/v1/models/{m}/unkill", json={"env": "production", "reason": "x"}, headers=bob), 409,
                   transition)
    assert api.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "x"}, headers=alice).status_code \
        == 200
    assert_problem(api.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "x"}, headers=alice), 409,
                   transition)


def test_403_four_eyes(api: httpx.Client, world: Any, make_doc: Callable[..., dict]) -> None:
    m = world.model("eyes")
    assert api.post("/v1/policies", json=make_doc(model=m), headers=world.auth("bob")).status_code == 201
    body = assert_problem(api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "mine"},
                                   headers=world.auth("bob")), 403, "urn:exitwise:problem:four-eyes-violation")
    assert "four-eyes" in body["detail"]
    assert api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "ok"},
                    headers=world.auth("carol")).status_code == 200


def test_422_validation_names_locations(api: httpx.Client, world: Any, active_model: str,
                                        make_doc: Callable[..., dict]) -> None:
    m, bob, alice, rita = active_model, world.auth("bob"), world.auth("alice"), world.auth("rita")
    bad_json = api.post("/v1/policies", content=b"{not json", headers={**alice, "content-type": "application/json"})
    assert_problem(bad_json, 422, "urn:exitwise:problem:request-validation")

    doc = make_doc(model=world.model("bad"))
    doc["exits"][1]["cost"] = 1.0  # costs must increase
    body = assert_problem(api.post("/v1/policies", json=doc, headers=alice), 422,
                          "urn:exitwise:problem:document-error")
    assert any("cost" in e["msg"] for e in body["errors"])
    tampered = make_doc(model=world.model("bad"))
    tampered["shadow_rate"] = 0.5  # content changed, hash not
    body = assert_problem(api.post("/v1/policies", json=tampered, headers=alice), 422)
    assert body["errors"][0]["loc"] == ["content_hash"]
    assert_problem(api.post("/v1/policies", json=[1, 2], headers=alice), 422)

    missing = assert_problem(api.post(f"/v1/models/{m}/versions/2/approve", json={}, headers=bob), 422)
    assert missing["errors"][0]["loc"] == ["body", "reason"]
    extra = assert_problem(api.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "x", "now": 1},
                                    headers=alice), 422)
    assert extra["errors"][0]["loc"] == ["body", "now"]
    env = assert_problem(api.post(f"/v1/models/{m}/kill", json={"env": "Prod uction", "reason": "x"},
                                  headers=alice), 422)
    assert env["errors"][0]["loc"] == ["body", "env"]
    blank = assert_problem(api.post(f"/v1/models/{m}/versions/2/approve", json={"reason": ""}, headers=bob), 422)
    assert blank["errors"][0]["loc"] == ["body", "reason"]
    for path in (f"/v1/models/{m}/policy?env=UPPER", f"/v1/models/{m}/versions/0", f"/v1/models/{m}/versions/x",
                 f"/v1/models/{m}/diff?a=1", "/v1/audit?limit=0", "/v1/audit?limit=501", "/v1/audit/export?format=xml",
                 "/v1/models/-bad-name/versions"):
        problem = assert_problem(api.get(path, headers=rita), 422)
        assert problem["errors"] and all(e["loc"] and e["msg"] for e in problem["errors"])
    cursor = assert_problem(api.get("/v1/audit?cursor=!!!", headers=rita), 422, "urn:exitwise:problem:input-error")
    assert "cursor" in cursor["detail"]


def test_413_body_limit(api: httpx.Client, world: Any, active_model: str) -> None:
    alice = {**world.auth("alice"), "content-type": "application/json"}
    big = b'{"pad": "' + b"x" * (1 << 20) + b'"}'
    body = assert_problem(api.post("/v1/policies", content=big, headers=alice), 413)
    assert "1048576" in body["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the streamed bytes
        yield b'{"pad": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}'

    assert_problem(api.post("/v1/policies", content=chunks(), headers=alice), 413)
    assert_problem(api.post(f"/v1/models/{active_model}/kill", content=big, headers=alice), 413)


def test_413_configurable_limit(world: Any, make_settings: Callable[..., ApiSettings]) -> None:
    app = create_app(make_settings(max_body_bytes=2048), engine=world.engine)
    with TestClient(app) as client:
        headers = {**world.auth("alice"), "content-type": "application/json"}
        assert_problem(client.post("/v1/policies", content=b" " * 3000, headers=headers), 413)
        assert client.post("/v1/policies", content=b"[]", headers=headers).status_code == 422


@pytest.fixture(scope="module")
def offline_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An app whose database is never touched (routes added by the tests raise on their own)."""
    tmp = tmp_path_factory.mktemp("offline")
    engine = make_engine(f"sqlite:///{tmp / 'unused.db'}")
    yield lambda: create_app(ApiSettings(data_dir=tmp, store_hooks=False), engine=engine)
    engine.dispose()


def test_500_does_not_leak_internals(offline_app: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> None:
    app = offline_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret connection string postgres://user:pw@db")

    @app.get("/not-fitted")
    def not_fitted() -> None:
        raise core_errors.NotFittedError("internal estimator state")

    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/boom", "/not-fitted"):
            resp = client.get(path)
            body = assert_problem(resp, 500, "about:blank")
            assert resp.headers["connection"] == "close"  # the server drops it: say so
            assert "secret" not in str(body) and "internal estimator" not in str(body)
            assert body["error_id"] and body["detail"]
    assert any(body["error_id"] in r.getMessage() for r in caplog.records)


def test_503_when_database_unreachable_or_not_at_head(tmp_path: Path) -> None:
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    app = create_app(ApiSettings(data_dir=tmp_path, store_hooks=False), engine=empty)
    with TestClient(app) as client:
        body = assert_problem(client.get("/readyz"), 503, "urn:exitwise:problem:schema-out-of-date")
        assert body["error_id"] in body["detail"]
        assert client.get("/healthz").status_code == 200
    empty.dispose()
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    app = create_app(ApiSettings(data_dir=tmp_path, store_hooks=False), engine=down)
    with TestClient(app) as client:
        assert_problem(client.get("/readyz"), 503)
        assert_problem(client.get("/v1/me", headers={"Authorization": "Bearer ew_x"}), 503,
                       "urn:exitwise:problem:store-unavailable")
    down.dispose()


def _error_classes() -> list[type[ExitwiseError]]:
    out = []
    for module in (core_errors, store_errors):
        out += [c for _, c in inspect.getmembers(module, inspect.isclass)
                if issubclass(c, ExitwiseError) and c.__module__ == module.__name__]
    return [*out, DocumentError]


@pytest.mark.parametrize("exc_type", _error_classes(), ids=lambda c: c.__name__)
def test_every_exitwise_error_is_mapped(offline_app: Callable[[], Any], exc_type: type[ExitwiseError]) -> None:
    """Each error a caller can hit answers its own http_status/title as problem+json (5xx: generic)."""
    app = offline_app()
    if exc_type is DocumentError:
        exc: ExitwiseError = DocumentError([("exits.1.cost", "must increase")])
    elif exc_type is store_errors.DuplicateContent:
        exc = exc_type("same content", model="m", existing=1)
    else:
        exc = exc_type("what went wrong")

    @app.get("/raise")
    def raise_it() -> None:
        raise exc

    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/raise")
    status = exc_type.http_status
    body = assert_problem(resp, status)
    if status < 500:
        assert body["title"] == exc_type.title and body["type"] == problem_type(exc_type)
        assert body["detail"] == str(exc)
    else:
        assert "what went wrong" not in resp.text and body["error_id"]
    if status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer")
    if exc_type is DocumentError:
        assert body["errors"] == [{"loc": ["exits", "1", "cost"], "msg": "must increase", "type": None}]
