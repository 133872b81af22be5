"""Reading the policy server's answers with bounded memory (httpx and the standard library only).

A policy body is read raw (no decompression) up to a limit; an error answer only far enough
to show its problem detail. Used by :class:`exitwise.policies.runtime.PolicyClient`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from exitwise.policies.runtime_errors import PolicyRejected

__all__ = ["ERROR_BODY_BYTES", "problem_detail", "problem_type", "read_body", "read_prefix"]

ERROR_BODY_BYTES = 64 * 1024  # how much of a non-200 answer is read, for its problem detail


def read_body(resp: httpx.Response, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes; raise :class:`PolicyRejected` past it (nothing more is read)."""
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PolicyRejected(f"policy body has Content-Encoding {encoding!r}; the client asked for identity",
                             "encoding")
    declared = resp.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise PolicyRejected(f"policy body is {int(declared)} bytes (Content-Length), over max_body_bytes={limit}; "
                             "not read", "too_large")
    body = bytearray()
    for chunk in resp.iter_raw():
        body += chunk
        if len(body) > limit:
            raise PolicyRejected(f"policy body exceeds max_body_bytes={limit}; stopped reading after "
                                 f"{len(body)} bytes", "too_large")
    return bytes(body)


def read_prefix(resp: httpx.Response, limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most ``limit`` bytes of a non-200 answer (enough for a problem detail); the rest is not read."""
    body = bytearray()
    for chunk in resp.iter_raw():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _problem_json(headers: httpx.Headers, body: bytes) -> dict[str, Any] | None:
    """The body of a problem+json answer (None otherwise, e.g. a proxy's plain 404 page)."""
    if not headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def problem_type(headers: httpx.Headers, body: bytes) -> str | None:
    problem = _problem_json(headers, body)
    return None if problem is None else problem.get("type")


def problem_detail(headers: httpx.Headers, body: bytes, reason: str) -> str:
    """The ``detail`` (or ``title``) of a JSON error answer, else the HTTP reason phrase."""
    try:
        problem = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return reason
    if not isinstance(problem, dict):
        return reason
    text = str(problem.get("detail") or problem.get("title") or reason)
    return text if len(text) <= 300 else f"{text[:300]}…"
