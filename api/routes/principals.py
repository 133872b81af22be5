"""Who am I: the principal behind the bearer token (lets clients check a token and its role)."""

from __future__ import annotations

from fastapi import APIRouter

from exitwise.api.deps import ReaderDep
from exitwise.api.problems import problem_responses
from exitwise.api.schemas import PrincipalOut

router = APIRouter(tags=["principals"])


@router.get("/v1/me", operation_id="whoami", summary="The authenticated principal and its role",
            response_model=PrincipalOut, responses=problem_responses(401, 503))
async def whoami(principal: ReaderDep) -> PrincipalOut:
    return PrincipalOut.of(principal)
