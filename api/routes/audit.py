"""The audit trail: filtered pages, chain verification and a full export."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from exitwise.api import services
from exitwise.api.deps import ReaderDep, ReadSessionDep
from exitwise.api.problems import problem_responses
from exitwise.api.schemas import AuditEventOut, AuditPage, ChainReportOut
from exitwise.policies import audit
from exitwise.policies.names import MODEL_NAME_MAX, MODEL_NAME_PATTERN, PRINCIPAL_NAME_MAX, PRINCIPAL_NAME_PATTERN

router = APIRouter(tags=["audit"])

MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@router.get("/v1/audit", operation_id="list_audit_events", summary="Audit events, oldest first, filtered and paged",
            response_model=AuditPage, responses=problem_responses(401, 422, 503))
def list_audit_events(
    principal: ReaderDep,
    session: ReadSessionDep,
    model: Annotated[str | None, Query(max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN,
                                       description="Only events of this model")] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z]+(\.[a-z_]+)*$",
                                        description="e.g. version.activate, killswitch.kill")] = None,
    actor: Annotated[str | None, Query(max_length=PRINCIPAL_NAME_MAX, pattern=PRINCIPAL_NAME_PATTERN,
                                       description="Only events by this principal")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=100, description="next_cursor of the previous page")] = None,
) -> AuditPage:
    events, next_cursor = services.audit_page(session=session, model=model, action=action, actor=actor,
                                              limit=limit, cursor=cursor)
    return AuditPage(events=[AuditEventOut.of(e) for e in events], next_cursor=next_cursor)


@router.get("/v1/audit/verify", operation_id="verify_audit_chain",
            summary="Walk the hash chain: ok, or the first edited/deleted/reordered event",
            response_model=ChainReportOut, responses=problem_responses(401, 503))
def verify_audit_chain(principal: ReaderDep, session: ReadSessionDep) -> ChainReportOut:
    return ChainReportOut.of(audit.verify(session=session))


@router.get(
    "/v1/audit/export",
    operation_id="export_audit",
    summary="The whole chain as JSON Lines or CSV (verifiable offline with 'exitwise audit verify-export')",
    response_class=FileResponse,
    responses={200: {"description": "The export file", "content": {
        "application/x-ndjson": {"schema": {"type": "string"}},
        "text/csv": {"schema": {"type": "string"}}}}, **problem_responses(401, 422, 503)},
)
def export_audit(
    principal: ReaderDep,
    session: ReadSessionDep,
    format: Annotated[Literal["jsonl", "csv"], Query(description="jsonl or csv")] = "jsonl",
) -> FileResponse:
    tmp = tempfile.TemporaryDirectory(prefix="exitwise-audit-")
    try:
        result = audit.export(Path(tmp.name) / f"audit.{format}", format, session=session)
    except BaseException:
        tmp.cleanup()
        raise
    return FileResponse(result.path, media_type=MEDIA[format], filename=f"exitwise-audit.{format}",
                        headers={"X-Audit-Head-Seq": str(result.head_seq), "X-Audit-Head-Hash": result.head_hash},
                        background=BackgroundTask(tmp.cleanup))
