"""Managing policies: create versions, list/show/diff them, approve, activate, roll back, kill.

Every write authenticates in its own transaction (``AuthorDep``/``ApproverDep``) and passes
the principal to the lifecycle function, which re-checks the role and records the principal
as the actor of the audit event written in the same transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response, status
from starlette.concurrency import run_in_threadpool

from exitwise.api import services
from exitwise.api.deps import (
    ApproverDep,
    AuthorDep,
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
from exitwise.api.routes.runtime import ModelPath, VersionPath
from exitwise.api.schemas import (
    ActivateRequest,
    ActiveOut,
    ApproveRequest,
    DiffOut,
    KillRequest,
    KillStateOut,
    ModelList,
    ModelOut,
    RollbackRequest,
    VersionDetail,
    VersionList,
    VersionOut,
)
from exitwise.policies import lifecycle, store
from exitwise.policies.db import unit_of_work
from exitwise.policies.principals import authenticate, require

router = APIRouter(tags=["policies"])

READ = problem_responses(401, 404, 422, 503)
WRITE = problem_responses(400, 401, 403, 404, 409, 413, 422, 503)

PolicyBody = Annotated[dict[str, Any], Body(
    description="A policy document (exitwise.policy/v1) with a matching content_hash; governance fields "
                "(version, state, ...) are ignored. Bodies are limited to EXITWISE_MAX_BODY_BYTES.",
)]


@router.post(
    "/v1/policies",
    operation_id="create_policy_version",
    summary="Store a policy document as the next draft version of its model",
    status_code=status.HTTP_201_CREATED,
    response_model=VersionDetail,
    responses=WRITE,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PolicyDocument"}}}}},
)
def create_policy_version(document: PolicyBody, author: AuthorDep, session: SessionDep,
                          response: Response) -> VersionDetail:
    version = lifecycle.create_version(document, author=author, session=session)
    response.headers["Location"] = f"/v1/models/{version.model}/versions/{version.number}"
    return VersionDetail.of(version)


@router.get("/v1/models", operation_id="list_models", summary="Models with their versions and active versions",
            response_model=ModelList, responses=problem_responses(401, 503))
def list_models(principal: ReaderDep, session: ReadSessionDep) -> ModelList:
    return ModelList(models=[ModelOut.of(m) for m in store.list_models(session=session)])


@router.get("/v1/models/{model}/versions", operation_id="list_versions", summary="Versions of a model",
            response_model=VersionList, responses=READ)
def list_versions(model: ModelPath, principal: ReaderDep, session: ReadSessionDep) -> VersionList:
    return VersionList(model=model, versions=[VersionOut.of(v) for v in store.list_versions(model, session=session)])


@router.get("/v1/models/{model}/versions/{version}", operation_id="get_version",
            summary="One version: governance facts and its document", response_model=VersionDetail, responses=READ)
def get_version(model: ModelPath, version: VersionPath, principal: ReaderDep, session: ReadSessionDep) -> VersionDetail:
    return VersionDetail.of(store.get_version(model, version, session=session))


@router.get("/v1/models/{model}/diff", operation_id="diff_versions",
            summary="Thresholds, guarantee and expectations of two versions side by side",
            response_model=DiffOut, responses=READ)
def diff_versions(
    model: ModelPath,
    principal: ReaderDep,
    session: ReadSessionDep,
    a: Annotated[int, Query(ge=1, le=2**31 - 1, description="Base version")],
    b: Annotated[int, Query(ge=1, le=2**31 - 1, description="Compared version")],
) -> DiffOut:
    return DiffOut.of(store.diff_versions(model, a, b, session=session))


@router.post("/v1/models/{model}/versions/{version}/approve", operation_id="approve_version",
             summary="Approve a draft (four eyes: not by its author); the certificate is re-verified when "
                     "its evidence is reachable", response_model=VersionDetail, responses=WRITE)
async def approve_version(model: ModelPath, version: VersionPath, body: ApproveRequest, credentials: Credentials,
                          cache: CacheDep, engine: EngineDep, settings: SettingsDep) -> VersionDetail:
    # who asks is checked before anything expensive: only approvers make the service read logs
    token = bearer_token(credentials)
    require(await cache.principal(token), "approver", "approve policy versions")
    verification = await run_in_threadpool(services.reverify_version, engine, model, version,
                                           settings.evidence_paths())

    def write() -> VersionDetail:
        with unit_of_work(engine) as session:
            approver = require(authenticate(token, session=session), "approver", "approve policy versions")
            return VersionDetail.of(lifecycle.approve(model, version, approver=approver, reason=body.reason,
                                                      session=session, verification=verification,
                                                      accept_weaker=body.accept_weaker))

    try:
        return await run_in_threadpool(write)
    finally:
        cache.invalidate()


@router.post("/v1/models/{model}/versions/{version}/activate", operation_id="activate_version",
             summary="Make an approved version the active one in an environment", response_model=ActiveOut,
             responses=WRITE)
def activate_version(model: ModelPath, version: VersionPath, body: ActivateRequest, approver: ApproverDep,
                     session: SessionDep, settings: SettingsDep) -> ActiveOut:
    return ActiveOut.of(lifecycle.activate(model, version, body.env, actor=approver, reason=body.reason,
                                           session=session, rules=settings.rules()))


@router.post("/v1/models/{model}/rollback", operation_id="rollback",
             summary="Re-activate an earlier version (default: the one active before the current)",
             response_model=ActiveOut, responses=WRITE)
def rollback(model: ModelPath, body: RollbackRequest, approver: ApproverDep, session: SessionDep,
             settings: SettingsDep) -> ActiveOut:
    return ActiveOut.of(lifecycle.rollback(model, body.env, actor=approver, to=body.to, reason=body.reason,
                                           session=session, rules=settings.rules()))


@router.post("/v1/models/{model}/kill", operation_id="kill",
             summary="Kill switch on: the served policy never exits early (role author or higher)",
             response_model=KillStateOut, responses=WRITE)
def kill(model: ModelPath, body: KillRequest, author: AuthorDep, session: SessionDep) -> KillStateOut:
    return KillStateOut.of(lifecycle.kill(model, body.env, actor=author, reason=body.reason, session=session))


@router.post("/v1/models/{model}/unkill", operation_id="unkill", summary="Kill switch off (role approver or higher)",
             response_model=KillStateOut, responses=WRITE)
def unkill(model: ModelPath, body: KillRequest, approver: ApproverDep, session: SessionDep) -> KillStateOut:
    return KillStateOut.of(lifecycle.unkill(model, body.env, actor=approver, reason=body.reason, session=session))
