"""The audit report of one version (HTML or PDF, ``exitwise.policies.report``).

Rendering needs the ``[reports]`` extra; without it the answer is a 501 problem naming the extra.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from exitwise.api.deps import ReaderDep, ReadSessionDep
from exitwise.api.problems import problem_responses
from exitwise.api.routes.runtime import ModelPath, VersionPath
from exitwise.policies.report import report_response

router = APIRouter(tags=["reports"])


@router.get(
    "/v1/models/{model}/versions/{version}/report",
    operation_id="get_report",
    summary="Audit report of a version for a compliance reviewer (HTML or PDF)",
    response_class=Response,
    responses={200: {"description": "The report", "content": {
        "text/html": {"schema": {"type": "string"}},
        "application/pdf": {"schema": {"type": "string", "format": "binary"}}}},
        **problem_responses(401, 404, 422, 501, 503)},
)
def get_report(
    model: ModelPath,
    version: VersionPath,
    principal: ReaderDep,
    session: ReadSessionDep,
    format: Annotated[Literal["html", "pdf"], Query(description="html or pdf")] = "html",
) -> Response:
    body, media_type = report_response(session, model, version, format)
    disposition = "inline" if format == "html" else "attachment"
    return Response(body, media_type=media_type,
                    headers={"Content-Disposition": f'{disposition}; filename="{model}-v{version}.{format}"'})
