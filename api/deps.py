"""Typed FastAPI dependencies: settings, the unit of work, the cache and the principal.

``SessionDep`` is one unit of work per request (``exitwise.policies.db.unit_of_work``): committed when
the handler returns — before the response is sent (``scope="function"``), so a failed commit
is an error answer, never a false success — and rolled back on any error.

Authentication: ``Authorization: Bearer <token>``. Reads (``ReaderDep``) resolve the token
through the generation-checked cache (no database round trip on a hit); writes
(``AuthorDep``, ``ApproverDep``, ``AdminDep``) authenticate again inside the request's own
transaction, so the actor recorded in the audit event is checked against the committed state.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exitwise.api.cache import StoreCache
from exitwise.api.settings import ApiSettings
from exitwise.policies.db import unit_of_work
from exitwise.policies.errors import AuthError
from exitwise.policies.principals import Principal, authenticate, require

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A principal's token (`exitwise principal add`); roles reader < author < approver < admin.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_cache(request: Request) -> StoreCache:
    return request.app.state.cache


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
CacheDep = Annotated[StoreCache, Depends(get_cache)]


def get_session(engine: EngineDep, cache: CacheDep) -> Iterator[Session]:
    """One transaction per request; a committed change invalidates this replica's cache at once."""
    with unit_of_work(engine) as session:
        yield session
    cache.invalidate()


def get_read_session(engine: EngineDep) -> Iterator[Session]:
    """A read-only transaction (deferred on SQLite: never queues behind writers)."""
    with unit_of_work(engine, readonly=True) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise AuthError("missing bearer token (send 'Authorization: Bearer <token>')")
    return credentials.credentials


def require_cached(role: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Dependency: the caller's principal, checked for ``role``, via the token cache (reads)."""

    async def dependency(credentials: Credentials, cache: CacheDep) -> Principal:
        principal = await cache.principal(bearer_token(credentials))
        return require(principal, role, f"call this endpoint (role {role})")

    dependency.__name__ = f"require_{role}"
    return dependency


def require_fresh(role: str) -> Callable[..., Principal]:
    """Dependency: the caller's principal authenticated in the request's transaction (writes)."""

    def dependency(credentials: Credentials, session: SessionDep) -> Principal:
        principal = authenticate(bearer_token(credentials), session=session)
        return require(principal, role, f"call this endpoint (role {role})")

    dependency.__name__ = f"require_{role}_fresh"
    return dependency


ReaderDep = Annotated[Principal, Depends(require_cached("reader"))]
AuthorDep = Annotated[Principal, Depends(require_fresh("author"))]
ApproverDep = Annotated[Principal, Depends(require_fresh("approver"))]
AdminDep = Annotated[Principal, Depends(require_fresh("admin"))]
