"""The FastAPI application factory: ``create_app(settings)``.

Nothing happens at import time: settings are read, the engine and the caches are built
inside the factory (``uvicorn api.app:create_app --factory``, or ``exitwise serve``), so tests
build as many independent apps as they like, each on its own database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from exitwise.api.cache import StoreCache
from exitwise.api.fastpath import FastPolicyLane
from exitwise.api.metrics import AppMetrics
from exitwise.api.metrics import router as metrics_router
from exitwise.api.middleware import BodySizeLimit
from exitwise.api.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from exitwise.api.routes import audit, health, monitoring, policies, principals, reports, runtime
from exitwise.api.routes.monitoring import SHADOW_PATH
from exitwise.api.settings import ApiSettings
from exitwise.policies import events
from exitwise.policies.anchor import install_anchor_hook
from exitwise.policies.db import make_engine, open_store
from exitwise.policies.errors import StoreUnavailable
from exitwise.policies.mlflow.worker import install_hook
from exitwise.policies.report import install_approval_hook
from exitwise.policies.schema import PolicyDocument

log = logging.getLogger("exitwise.api")

DESCRIPTION = """\
Policies for early-exit networks: the runtime read path inference servers poll
(`GET /v1/models/{model}/policy?env=`, ETag/304, kill switch folded in), the governed
lifecycle (create, approve with four eyes, activate, roll back, kill) and the audit trail.

Every endpoint except `/healthz` and `/readyz` needs `Authorization: Bearer <token>`; roles
are ordered reader < author < approver < admin. Errors are RFC 9457 problem details
(`application/problem+json`).
"""


class ExitwiseAPI(FastAPI):
    """FastAPI with the runtime read path's fast lane in front (see :mod:`exitwise.api.fastpath`)."""

    fast_lane: FastPolicyLane | None = None
    metrics: AppMetrics | None = None  # counts every answer, the fast lane's included

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.metrics is not None:
            await self.metrics.http(scope, receive, send, self._answer)
        else:
            await self._answer(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer from the fast lane if it can (True), else through FastAPI (False)."""
        if scope["type"] == "http" and self.fast_lane is not None:
            try:
                if await self.fast_lane(scope, receive, send):
                    return True
            except Exception:  # the lane never answers an error; the app will, as problem+json
                log.debug("fast lane fell through on an error", exc_info=True)
        await super().__call__(scope, receive, send)
        return False


def create_app(settings: ApiSettings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the app. ``engine`` (tests) overrides the one built from ``settings``."""
    settings = settings or ApiSettings()
    owned = engine is None
    if engine is None:
        engine = make_engine(settings.resolved_database_url())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await run_in_threadpool(_prepare, settings)
        remove_hooks = _install_store_hooks(engine, settings) if settings.store_hooks else []
        try:
            yield
        finally:
            for remove in remove_hooks:
                remove()
            if owned:
                engine.dispose()

    app = ExitwiseAPI(
        title="exitwise",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "runtime", "description": "What inference servers poll"},
            {"name": "policies", "description": "Versions and their lifecycle"},
            {"name": "monitoring", "description": "Shadow traffic in, a verdict per environment out"},
            {"name": "audit", "description": "The hash-chained audit trail"},
            {"name": "reports", "description": "Audit reports for reviewers"},
            {"name": "principals", "description": "Identities"},
            {"name": "health", "description": "Liveness and readiness"},
        ],
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.cache = cache = StoreCache(engine, ttl_ms=settings.cache_ttl_ms,
                                         cache_control=settings.policy_cache_control)
    app.fast_lane = FastPolicyLane(cache)
    app.metrics = AppMetrics(cache, engine, app.fast_lane)
    install_problem_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       larger=[(SHADOW_PATH, settings.shadow_max_bytes)])
    for module in (runtime, policies, monitoring, audit, reports, principals, health):
        app.include_router(module.router)
    app.include_router(metrics_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _install_store_hooks(engine: Engine, settings: ApiSettings) -> list[Callable[[], None]]:
    """The after-commit mirrors: signed audit checkpoints (file written inline, POST in a thread;
    only with ``EXITWISE_ANCHOR_KEY``), MLflow sync and approval reports (background threads).

    Returns the functions that remove them (events are process-wide; the app removes its own
    at shutdown). A mirror that fails never undoes a committed change.
    """
    checkpoint = install_anchor_hook(settings, background=True)
    sync = install_hook(engine, background=True)
    approval = install_approval_hook(engine, data_dir=settings.data_dir, background=True)
    removers = [sync.close, lambda: events.remove(approval)]
    if checkpoint is not None:
        removers.append(lambda: events.remove(checkpoint))
    return removers


def _prepare(settings: ApiSettings) -> None:
    """Create an empty embedded SQLite store; warn (``/readyz`` answers 503) if the schema is not at head."""
    try:
        open_store(settings).dispose()
    except StoreUnavailable as exc:
        log.warning("policy store not ready: %s", exc)


def _version() -> str:
    try:
        return version("exitwise")
    except PackageNotFoundError:
        return "0"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with every error answer as problem+json and the policy document schema."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                      tags=app.openapi_tags)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    policy_schema = PolicyDocument.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    for name, sub in policy_schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas["PolicyDocument"] = policy_schema
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in doc.get("paths", {}).values():
        for operation in path_item.values():
            for code, response in operation.get("responses", {}).items():
                if code.isdigit() and int(code) >= 400:
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
                    if code == "401":
                        response.setdefault("headers", {})["WWW-Authenticate"] = {
                            "description": "Bearer", "schema": {"type": "string"}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    app.openapi_schema = doc
    return doc
