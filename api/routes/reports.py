"""The audit report of one version (HTML or PDF, ``exitwise.policies.report``).

Rendering needs the ``[reports]`` extra; without it the answer is a 501 problem naming the extra.
Reports are rendered once per content (cached in memory and under the data directory) in a
separate process, at most ``EXITWISE_REPORT_RENDER_WORKERS`` at a time with
``EXITWISE_REPORT_RENDER_QUEUE`` waiting; beyond that the answer is 503 with ``Retry-After``.
The handler is async and only awaits: the policy read path never waits for a render.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Response

from exitwise.api.deps import ReaderDep
from exitwise.api.problems import problem, problem_responses, problem_type
from exitwise.api.routes.runtime import ModelPath, VersionPath
from exitwise.api.settings import ApiSettings
from exitwise.policies.report import MEDIA_TYPES
from exitwise.policies.report.pool import RenderBusy, ReportRenderer
from exitwise.policies.report.service import serve_report

CACHE_DIR = "report-cache"


def report_renderer(app: FastAPI) -> ReportRenderer:
    """The app's renderer (``app.state.reports``), built from its settings on first use."""
    reports = getattr(app.state, "reports", None)
    if reports is None:
        settings: ApiSettings = app.state.settings
        reports = ReportRenderer(settings.data_dir / CACHE_DIR, memory_bytes=settings.report_cache_bytes,
                                 disk_bytes=settings.report_cache_disk_bytes,
                                 workers=settings.report_render_workers, queue=settings.report_render_queue)
        app.state.reports = reports
    return reports


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the app's renderer at start-up; stop its render processes (started on the first render) at shutdown."""
    report_renderer(app)
    try:
        yield
    finally:
        reports = getattr(app.state, "reports", None)
        if reports is not None:
            reports.close()
            app.state.reports = None


router = APIRouter(tags=["reports"], lifespan=lifespan)


@router.get(
    "/v1/models/{model}/versions/{version}/report",
    operation_id="get_report",
    summary="Audit report of a version for a compliance reviewer (HTML or PDF)",
    response_class=Response,
    responses={200: {"description": "The report (header `X-Report-Cache`: memory, disk, rendered or joined)",
                     "content": {"text/html": {"schema": {"type": "string"}},
                                 "application/pdf": {"schema": {"type": "string", "format": "binary"}}}},
               **problem_responses(401, 404, 422, 501, 503)},
)
async def get_report(
    request: Request,
    model: ModelPath,
    version: VersionPath,
    principal: ReaderDep,
    format: Annotated[Literal["html", "pdf"], Query(description="html or pdf")] = "html",
) -> Response:
    try:
        rendered = await serve_report(request.app.state.engine, report_renderer(request.app), model, version, format)
    except RenderBusy as exc:  # expected under load: no error log, no error_id
        return problem(503, title=exc.title, detail=str(exc), type_=problem_type(RenderBusy),
                       instance=request.url.path, headers=exc.headers)
    disposition = "inline" if format == "html" else "attachment"
    return Response(rendered.body, media_type=MEDIA_TYPES[format],
                    headers={"Content-Disposition": f'{disposition}; filename="{model}-v{version}.{format}"',
                             "X-Report-Cache": rendered.source})
