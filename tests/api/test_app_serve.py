"""``exitwise serve`` and the OpenAPI document."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from exitwise.api.app import create_app
from exitwise.api.settings import ApiSettings
from exitwise.policies.db import make_engine, upgrade

EXITWISE = Path(sys.executable).with_name("exitwise")


def _env(tmp: Path, url: str | None) -> dict[str, str]:
    env = {**os.environ, "EXITWISE_DATA_DIR": str(tmp / "data")}
    env.pop("EXITWISE_DATABASE_URL", None)
    if url:
        env["EXITWISE_DATABASE_URL"] = url
    return env


def test_serve_refuses_an_out_of_date_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    run = subprocess.run([str(EXITWISE), "serve", "--port", "0"], env=_env(tmp_path, url), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    assert "exitwise db upgrade" in run.stderr and "Traceback" not in run.stderr


def test_serve_with_workers_creates_the_embedded_store(tmp_path: Path, spawn_server: Any) -> None:
    server = spawn_server(None, tmp_path / "data", workers=2)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["database"] == "sqlite"
        assert client.get("/v1/me").status_code == 401
    assert (tmp_path / "data" / "exitwise.db").exists()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def test_openapi_document_is_complete(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'unused.db'}")
    app = create_app(ApiSettings(data_dir=tmp_path, store_hooks=False), engine=engine)
    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
    engine.dispose()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"][
            "description"]}
    ops = _operations(doc)
    expected = {
        ("get", "/v1/models/{model}/policy"), ("get", "/v1/models/{model}/versions/{version}/policy"),
        ("post", "/v1/policies"), ("get", "/v1/models"), ("get", "/v1/models/{model}/versions"),
        ("get", "/v1/models/{model}/versions/{version}"), ("get", "/v1/models/{model}/diff"),
        ("post", "/v1/models/{model}/versions/{version}/approve"),
        ("post", "/v1/models/{model}/versions/{version}/activate"), ("post", "/v1/models/{model}/rollback"),
        ("post", "/v1/models/{model}/kill"), ("post", "/v1/models/{model}/unkill"), ("get", "/v1/audit"),
        ("get", "/v1/audit/verify"), ("get", "/v1/audit/export"),
        ("get", "/v1/models/{model}/versions/{version}/report"), ("get", "/v1/me"), ("get", "/healthz"),
        ("get", "/readyz"), ("get", "/metrics"), ("post", "/v1/models/{model}/shadow"),
        ("get", "/v1/models/{model}/health"), ("get", "/v1/models/{model}/monitor/series"),
        ("put", "/v1/models/{model}/monitor"),
    }
    assert {(m, p) for p, m, _ in ops} == expected
    schemas = doc["components"]["schemas"]
    assert {"Problem", "PolicyDocument", "VersionDetail", "AuditPage"} <= set(schemas)
    assert "HTTPValidationError" not in schemas
    for path, method, op in ops:
        label = f"{method.upper()} {path}"
        assert op.get("summary") and op.get("operationId"), label
        public = path in ("/healthz", "/readyz")
        assert (op.get("security") is None) == public, label
        if not public:
            assert "401" in op["responses"], label
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], label
        if method == "post":
            assert {"400", "403", "409", "413", "422"} <= set(op["responses"]), label
            assert op["requestBody"]["required"] is True, label
        success = [c for c in op["responses"] if c.startswith("2")]
        assert len(success) == 1, label
        assert op["responses"][success[0]].get("content"), label  # every success has a documented body
        for code, response in op["responses"].items():
            if int(code) >= 400:
                assert response["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}, label


def test_store_hooks_write_approval_reports_and_are_removed_at_shutdown(
        world: Any, make_doc: Any, make_settings: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from exitwise.policies import events

    monkeypatch.setenv("EXITWISE_MLFLOW_SYNC", "off")  # the MLflow mirror has its own tests
    m = world.model("hooks")
    world.seed(make_doc, m, versions=1)
    before = len(events.registered())
    app = create_app(make_settings(store_hooks=True, data_dir=tmp_path), engine=world.engine)
    with TestClient(app) as client:
        assert len(events.registered()) == before + 2
        approved = client.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "ok"}, headers=world.auth("bob"))
        assert approved.status_code == 200
        report = tmp_path / "reports" / m / "v1.html"
        deadline = time.monotonic() + 60
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert report.exists() and m in report.read_text()
    assert len(events.registered()) == before
