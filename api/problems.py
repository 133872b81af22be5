"""RFC 9457 problem details (``application/problem+json``) for every error the API answers.

One place maps errors to HTTP answers:

- every :class:`~calibration.exceptions.ExitwiseError` subclass -> its ``http_status`` and
  ``title``, ``detail`` = the error's message, ``type`` = ``urn:exitwise:problem:<kind>``;
  errors that carry a list of problems (``DocumentError.errors``) add ``errors``;
- request validation -> 422 with ``errors`` = [{loc, msg, type}] naming every bad field;
- a request body over the size limit (413, :mod:`exitwise.api.middleware`) -> ``TOO_LARGE_PROBLEM``
  (``urn:exitwise:problem:body-too-large``), the detail naming the limit in bytes and the
  ``limit_bytes`` member carrying it;
- other Starlette HTTP errors (404 unknown route, 405...) -> ``about:blank``;
- anything else -> a generic 500; no 5xx answer carries the error's text (it may name hosts,
  paths or SQL): the traceback goes to the log, the answer carries an ``error_id`` to find it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitwise.calibration.exceptions import ExitwiseError
from exitwise.policies.names import REQUEST_VALIDATION_PROBLEM, kebab, problem_urn

PROBLEM_MEDIA_TYPE = "application/problem+json"
TOO_LARGE_PROBLEM = problem_urn("body-too-large")  # 413: the request body is over the configured limit
TOO_LARGE_TITLE = "Request body too large"
log = logging.getLogger("exitwise.api")


class ValidationIssue(BaseModel):
    """One invalid field: where (``loc``, a path into the request) and what is wrong."""

    loc: list[str | int]
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details; extension members are allowed."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="URI identifying the problem kind")
    title: str = Field(description="short, human-readable summary of the problem kind")
    status: int = Field(ge=400, le=599, description="the HTTP status code")
    detail: str | None = Field(None, description="explanation specific to this occurrence")
    instance: str | None = Field(None, description="the request path")
    errors: list[ValidationIssue] | None = Field(None, description="every invalid field (422)")


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    *,
    title: str | None = None,
    detail: str | None = None,
    type_: str = "about:blank",
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> ProblemResponse:
    """A problem+json response; ``title`` defaults to the status phrase."""
    body: dict[str, Any] = {
        "type": type_,
        "title": title or _phrase(status),
        "status": status,
    }
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def problem_type(exc_type: type[BaseException]) -> str:
    """``urn:exitwise:problem:<kebab-case class name>``, stable per error class."""
    return problem_urn(kebab(exc_type.__name__))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _issues(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Normalise ``DocumentError.errors`` (loc, msg) pairs and pydantic error dicts."""
    out = []
    for err in errors:
        if isinstance(err, Mapping):
            loc = err.get("loc", ())
            loc = [loc] if isinstance(loc, str) else list(loc)
            out.append({"loc": [p if isinstance(p, int) else str(p) for p in loc],
                        "msg": str(err.get("msg", "")), "type": err.get("type")})
        elif isinstance(err, tuple | list) and len(err) == 2:
            loc, msg = err
            out.append({"loc": [p for p in str(loc).split(".") if p] or ["$"], "msg": str(msg), "type": None})
        else:
            out.append({"loc": ["$"], "msg": str(err), "type": None})
    return out


def exitwise_problem(request: Request, exc: ExitwiseError) -> ProblemResponse:
    status = int(getattr(exc, "http_status", 500) or 500)
    if status >= 500:
        return internal_problem(request, exc, status=status, title=getattr(exc, "title", None),
                                type_=problem_type(type(exc)) if status != 500 else "about:blank")
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="exitwise"')
    errors = getattr(exc, "errors", None)
    return problem(
        status,
        title=getattr(exc, "title", None) or _phrase(status),
        detail=str(exc) or None,
        type_=problem_type(type(exc)),
        instance=request.url.path,
        headers=headers,
        errors=_issues(errors) if isinstance(errors, list | tuple) else None,
    )


def internal_problem(request: Request, exc: BaseException, *, status: int = 500, title: str | None = None,
                     type_: str = "about:blank") -> ProblemResponse:
    """A 5xx answer whose detail never carries the exception's text (it may name hosts, paths, SQL).

    The full error goes to the log under ``error_id``, which the answer carries.
    """
    error_id = uuid.uuid4().hex
    log.error("error %s (%d) on %s %s", error_id, status, request.method, request.url.path,
              exc_info=(type(exc), exc, exc.__traceback__))
    detail = ("The service is not available right now; retry later." if status == 503
              else "An unexpected error occurred.")
    # A 503 says when to retry; after a 500 the server closes the connection (Starlette re-raises
    # unhandled errors to the server), so the answer says so instead of leaving the client guessing.
    headers = {"Retry-After": "5"} if status == 503 else {"Connection": "close"}
    return problem(status, title=title if status != 500 else None, type_=type_, instance=request.url.path,
                   detail=f"{detail} The server log has the details under error_id {error_id}.", error_id=error_id,
                   headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""

    @app.exception_handler(ExitwiseError)
    async def _exitwise(request: Request, exc: ExitwiseError) -> ProblemResponse:
        return exitwise_problem(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> ProblemResponse:
        issues = _issues(exc.errors())
        summary = "; ".join(f"{'.'.join(str(p) for p in i['loc'])}: {i['msg']}" for i in issues[:5])
        return problem(422, title="Request validation failed", detail=summary, instance=request.url.path,
                       type_=REQUEST_VALIDATION_PROBLEM, errors=issues)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != _phrase(exc.status_code) else None
        if exc.status_code == 413:
            limit = getattr(exc, "limit", None)
            return problem(413, title=TOO_LARGE_TITLE, detail=detail, type_=TOO_LARGE_PROBLEM,
                           instance=request.url.path, headers=exc.headers, limit_bytes=limit)
        return problem(exc.status_code, detail=detail, instance=request.url.path, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> ProblemResponse:
        return internal_problem(request, exc)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers for ``statuses``."""
    descriptions = {
        400: "Bad request (e.g. a body that is not UTF-8 JSON)", 401: "Missing or invalid bearer token",
        403: "The principal's role may not do this",
        404: "Not found", 409: "Conflicts with the current state", 413: "Request body too large",
        415: "Unsupported media type", 422: "Invalid input", 503: "Not ready",
    }
    return {
        s: {"model": Problem, "description": descriptions.get(s, _phrase(s)),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for s in statuses
    }
