"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: database at head)."""

from __future__ import annotations

from fastapi import APIRouter

from exitwise.api import services
from exitwise.api.deps import EngineDep
from exitwise.api.problems import problem_responses
from exitwise.api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", summary="The process is up (no database access)",
            response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", operation_id="readyz", summary="The database answers and its schema is at the migrations' head",
            response_model=Ready, responses=problem_responses(503))
def readyz(engine: EngineDep) -> Ready:
    backend, revision = services.readiness(engine)
    return Ready(status="ready", database=backend, revision=revision)
