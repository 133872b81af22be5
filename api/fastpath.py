"""The runtime read path's fast lane: cache hits answered in raw ASGI, before FastAPI's machinery.

``GET /v1/models/{model}/policy?env=...`` is what every inference server polls, so it must
cost little more than a dict lookup. When everything it needs is already in the replica's
cache (the caller's token, the served bytes, and a generation read younger than the TTL, or
one done here), this lane sends the same status, headers and bytes the FastAPI route would
send, without routing, dependency injection or response classes. Anything else — a cache
miss, an unusual request (other query parameters, percent-encoding, several Authorization
headers, HEAD), an error of any kind — falls through to the FastAPI route, which fills the
cache and answers problems as problem+json. The lane never answers an error itself.
"""

from __future__ import annotations

import re

from starlette.types import Receive, Scope, Send

from exitwise.api.cache import StoreCache
from exitwise.api.routes.runtime import etag_matches
from exitwise.policies.names import ENVIRONMENT_BODY, MODEL_NAME_BODY

_PATH = re.compile(f"/v1/models/({MODEL_NAME_BODY})/policy")
_ENV = re.compile(f"env=({ENVIRONMENT_BODY})".encode())
_DEFAULT_ENV = "production"


class FastPolicyLane:
    """Answers hot policy polls; ``hits`` counts them (tests and metrics)."""

    def __init__(self, cache: StoreCache) -> None:
        self.cache = cache
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """True when the request was answered here; False to let the app handle it."""
        if scope["method"] != "GET":
            return False
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            return False
        query = scope["query_string"]
        if query:
            env_match = _ENV.fullmatch(query)
            if env_match is None:
                return False
            env = env_match.group(1).decode()
        else:
            env = _DEFAULT_ENV
        authorization = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    return False
                authorization = value
            elif name == b"if-none-match":
                if if_none_match is not None:
                    return False
                if_none_match = value
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return False
        cache = self.cache
        if not cache.fresh():
            await cache.refresh_generation()
        principal = cache.peek_principal(authorization[7:].strip().decode("latin-1"))
        if principal is None or principal.disabled:
            return False
        served = cache.peek_policy(match.group(1), env)
        if served is None:
            return False
        if if_none_match is not None and (if_none_match == served.headers_304[0][1]
                                          or etag_matches(if_none_match.decode("latin-1"), served.etag)):
            await send({"type": "http.response.start", "status": 304, "headers": served.headers_304})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": served.headers_200})
            await send({"type": "http.response.body", "body": served.body})
        self.hits += 1
        cache.policy_hits += 1
        cache.token_hits += 1
        return True
