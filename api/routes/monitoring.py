"""Monitoring: runtimes upload shadow traffic; operators read the verdict and set the automatic kill switch.

The upload is checked in three steps, cheapest first: the caller's role (from the token cache),
then the body is read and summarised against the version that served it (a read-only
transaction; a bad body stores nothing), then one write transaction stores the batch, extends
the risk bounds and records the verdict (re-authenticating the caller in it).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from exitwise.api.deps import (
    ApproverDep,
    CacheDep,
    Credentials,
    EngineDep,
    ReaderDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    bearer_token,
)
from exitwise.api.problems import problem_responses
from exitwise.api.routes.runtime import EnvQuery, ModelPath
from exitwise.api.schemas import HealthOut, IngestOut, MonitorConfigRequest, PointOut
from exitwise.policies import monitoring
from exitwise.policies.db import unit_of_work
from exitwise.policies.names import MODEL_NAME_BODY
from exitwise.policies.principals import authenticate, require
from exitwise.policies.shadow_logs import MEDIA_TYPES

router = APIRouter(tags=["monitoring"])
SHADOW_PATH = re.compile(rf"/v1/models/{MODEL_NAME_BODY}/shadow")

VersionQuery = Annotated[int | None, Query(ge=1, le=2**31 - 1, description="The version that served the "
                                           "requests (RuntimePolicy.version); default: the active one")]


_UPLOAD_BODY = {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                              for t in MEDIA_TYPES}}


@router.post("/v1/models/{model}/shadow", operation_id="upload_shadow_logs",
             summary="Upload full-depth exit logs of shadow requests (role author or higher)",
             response_model=IngestOut, openapi_extra={"requestBody": _UPLOAD_BODY},
             responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503))
async def upload_shadow_logs(model: ModelPath, request: Request, credentials: Credentials,
                             cache: CacheDep, engine: EngineDep, settings: SettingsDep, env: EnvQuery = "production",
                             version: VersionQuery = None) -> IngestOut:
    token = bearer_token(credentials)
    require(await cache.principal(token), "author", "upload shadow logs")
    body = await request.body()
    content_type = request.headers.get("content-type")
    limits = settings.monitor_settings()

    def prepare() -> monitoring.PreparedBatch:
        with unit_of_work(engine, readonly=True) as session:
            return monitoring.prepare(model, env, body, content_type, session=session, version=version,
                                      settings=limits)

    def write(batch: monitoring.PreparedBatch) -> monitoring.IngestResult:
        with unit_of_work(engine) as session:
            author = require(authenticate(token, session=session), "author", "upload shadow logs")
            return monitoring.record(batch, principal=author, session=session, settings=limits)

    batch = await run_in_threadpool(prepare)
    try:
        result = await run_in_threadpool(write, batch)
    finally:
        cache.invalidate()
    return IngestOut(**result.to_json())  # a body stored before answers the same way, with duplicate: true


@router.get("/v1/models/{model}/health", operation_id="get_model_health",
            summary="Is the active policy keeping its promise? The verdict and the numbers behind it",
            response_model=HealthOut, responses=problem_responses(401, 404, 422, 503))
def get_model_health(model: ModelPath, principal: ReaderDep, session: ReadSessionDep, settings: SettingsDep,
                     env: EnvQuery = "production") -> HealthOut:
    return HealthOut.of(monitoring.health(model, env, session=session, settings=settings.monitor_settings()))


@router.get("/v1/models/{model}/monitor/series", operation_id="get_monitor_series",
            summary="The risk bounds after every shadow batch, per constrained segment (oldest first)",
            response_model=list[PointOut], responses=problem_responses(401, 404, 422, 503))
def get_monitor_series(model: ModelPath, principal: ReaderDep, session: ReadSessionDep,
                       env: EnvQuery = "production", version: VersionQuery = None) -> list[PointOut]:
    return [PointOut(**p.to_json()) for p in monitoring.series(model, env, session=session, version=version)]


@router.put("/v1/models/{model}/monitor", operation_id="configure_monitor",
            summary="Turn the automatic kill switch on breach on or off (role approver or higher; audited)",
            response_model=HealthOut, responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 503))
def configure_monitor(model: ModelPath, body: MonitorConfigRequest, approver: ApproverDep,
                      session: SessionDep) -> HealthOut:
    return HealthOut.of(monitoring.configure(model, body.env, auto_kill=body.auto_kill, actor=approver,
                                             reason=body.reason, session=session))
