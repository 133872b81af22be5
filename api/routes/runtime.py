"""The runtime read path: what inference servers poll (``exitwise.policies.runtime.PolicyClient``).

Answers are pre-serialised bytes from the replica's cache (:mod:`exitwise.api.cache`), with a strong
``ETag`` (content hash, version, kill state) and ``Cache-Control: no-cache`` (store, but
revalidate every time), so a poll that changes nothing is a 304 without a body.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from exitwise.api.cache import serialise
from exitwise.api.deps import CacheDep, ReaderDep, ReadSessionDep, SettingsDep
from exitwise.api.problems import problem_responses
from exitwise.policies import store
from exitwise.policies.names import ENVIRONMENT_MAX, ENVIRONMENT_PATTERN, MODEL_NAME_MAX, MODEL_NAME_PATTERN

router = APIRouter(tags=["runtime"])

ModelPath = Annotated[str, Path(min_length=1, max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN,
                                description="Model name (the policy document's model.name)")]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1, description="Version number")]
EnvQuery = Annotated[str, Query(min_length=1, max_length=ENVIRONMENT_MAX, pattern=ENVIRONMENT_PATTERN,
                                description="Deployment environment")]
IfNoneMatch = Annotated[str | None, Header(description="ETag(s) the client holds; a match answers 304")]

_HEADERS = {
    "ETag": {"description": "Strong validator: content hash, version and kill state", "schema": {"type": "string"}},
    "Cache-Control": {"description": "no-cache: revalidate with If-None-Match on every use",
                      "schema": {"type": "string"}},
}
_POLICY = {"$ref": "#/components/schemas/PolicyDocument"}


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 If-None-Match: ``*`` or a comma-separated list, compared weakly."""
    value = if_none_match.strip()
    if value == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in value.split(","))


@router.get(
    "/v1/models/{model}/policy",
    operation_id="get_active_policy",
    summary="The active policy of a model in an environment (runtime read path)",
    response_class=Response,
    responses={
        200: {"description": "The active policy document with governance fields (version, environment, "
                             "state, activated_at) and the kill-switch state (killed) folded in",
              "content": {"application/json": {"schema": _POLICY}}, "headers": _HEADERS},
        304: {"description": "The client's copy (If-None-Match) is current", "headers": _HEADERS},
        **problem_responses(401, 404, 422, 503),
    },
)
async def get_active_policy(
    model: ModelPath,
    principal: ReaderDep,
    cache: CacheDep,
    settings: SettingsDep,
    env: EnvQuery = "production",
    if_none_match: IfNoneMatch = None,
) -> Response:
    served = await cache.active_policy(model, env)
    headers = {"ETag": served.etag, "Cache-Control": settings.policy_cache_control}
    if if_none_match is not None and etag_matches(if_none_match, served.etag):
        return Response(status_code=304, headers=headers)
    return Response(served.body, media_type="application/json", headers=headers)


@router.get(
    "/v1/models/{model}/versions/{version}/policy",
    operation_id="get_version_policy",
    summary="The policy document of one exact version (with its governance fields)",
    response_class=Response,
    responses={
        200: {"description": "The document as stored plus version, state, approvals, environments",
              "content": {"application/json": {"schema": _POLICY}}, "headers": _HEADERS},
        304: {"description": "The client's copy (If-None-Match) is current", "headers": _HEADERS},
        **problem_responses(401, 404, 422, 503),
    },
)
def get_version_policy(
    model: ModelPath,
    version: VersionPath,
    principal: ReaderDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    if_none_match: IfNoneMatch = None,
) -> Response:
    v = store.get_version(model, version, session=session)
    body = serialise(v.served_document())
    etag = f'"{v.content_hash}.v{v.number}.{hashlib.sha256(body).hexdigest()[:16]}"'
    headers = {"ETag": etag, "Cache-Control": settings.policy_cache_control}
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
