"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would add a task and a copy per request)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitwise.api.problems import PROBLEM_MEDIA_TYPE, TOO_LARGE_PROBLEM, TOO_LARGE_TITLE


class BodyTooLarge(HTTPException):
    """Raised inside ``receive`` when a streamed body passes the limit.

    An ``HTTPException`` (413) so that FastAPI's body reader re-raises it as it is (it wraps
    other errors into a 400) and the problem+json handler answers it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, _detail(limit))
        self.limit = limit


class BodySizeLimit:
    """Answer 413 (problem+json of type ``urn:exitwise:problem:body-too-large``) to bodies over ``max_bytes``.

    Checks ``Content-Length`` before the app runs and counts the bytes of bodies sent
    without one (chunked), so the limit cannot be bypassed by omitting the header.
    ``larger`` gives paths (matched by a regular expression) a limit of their own: shadow-log
    uploads are bigger than policy documents.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int,
                 larger: Sequence[tuple[re.Pattern[str], int]] = ()) -> None:
        self.app = app
        self.default_bytes = max_bytes
        self.larger = tuple(larger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = next((n for pattern, n in self.larger if pattern.fullmatch(path)), self.default_bytes)
        await self._limited(scope, receive, send, limit)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_problem(send, scope, 400, "Bad Request", "invalid Content-Length header")
                    return
                if declared > limit:
                    await _too_large(send, scope, limit)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, scope, limit)


def _detail(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


async def _too_large(send: Send, scope: Scope, limit: int) -> None:
    await _send_problem(send, scope, 413, TOO_LARGE_TITLE, _detail(limit), type_=TOO_LARGE_PROBLEM,
                        limit_bytes=limit)


async def _send_problem(send: Send, scope: Scope, status: int, title: str, detail: str, *,
                        type_: str = "about:blank", **extra: Any) -> None:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail,
                            "instance": scope.get("path"), **extra}
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
