"""Principals (API/CLI identities), bearer tokens and roles.

Tokens look like ``ew_<43 url-safe chars>`` (32 random bytes); only ``sha256(token)`` is
stored, the plaintext is returned once by :func:`add_principal`. Roles are ordered
``reader < author < approver < admin``; :func:`require` checks "at least".

Bootstrap: the first principal may be added without an acting principal, only while no
principal exists, and it must be an admin (otherwise nobody could ever add another).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import InputError
from exitwise.policies import audit
from exitwise.policies.db import change, translate_errors
from exitwise.policies.errors import AuthError, Conflict, Forbidden, InvalidTransition, NotFound
from exitwise.policies.models import ROLES
from exitwise.policies.models import Principal as PrincipalRow
from exitwise.policies.names import PRINCIPAL_NAME_RE, PRINCIPAL_NAME_RULE

ROLE_RANK = {role: i for i, role in enumerate(ROLES)}
TOKEN_PREFIX = "ew_"


@dataclass(frozen=True)
class Principal:
    """An authenticated identity (never carries the token or its hash)."""

    id: int
    name: str
    role: str
    created_at: datetime
    disabled: bool = False

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[_check_role(role)]


@dataclass(frozen=True)
class NewPrincipal:
    """A freshly added principal and its plaintext token, shown exactly once."""

    principal: Principal
    token: str


def _check_role(role: str) -> str:
    if role not in ROLE_RANK:
        raise InputError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    return role


def _domain(row: PrincipalRow) -> Principal:
    return Principal(id=row.id, name=row.name, role=row.role, created_at=row.created_at, disabled=row.disabled)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def require(principal: Principal | None, role: str, action: str = "do this") -> Principal:
    """Return ``principal`` when it holds at least ``role``; else raise ``AuthError``/``Forbidden``."""
    if principal is None:
        raise AuthError(f"authentication required to {action}")
    if principal.disabled:
        raise AuthError(f"principal {principal.name!r} is disabled")
    if not principal.has_role(role):
        raise Forbidden(f"principal {principal.name!r} has role {principal.role!r}; "
                        f"to {action} needs role {role!r} or higher")
    return principal


def authenticate(token: str | None, *, session: Session) -> Principal:
    """The principal holding ``token``; ``AuthError`` for a missing, unknown or disabled token."""
    if not token:
        raise AuthError("missing bearer token")
    with translate_errors():
        row = session.scalars(select(PrincipalRow).where(PrincipalRow.token_hash == hash_token(token))).one_or_none()
    if row is None:
        raise AuthError("invalid token")
    if row.disabled:
        raise AuthError(f"principal {row.name!r} is disabled")
    return _domain(row)


def add_principal(name: str, role: str, *, actor: Principal | None, session: Session) -> NewPrincipal:
    """Add a principal (admin only, or the bootstrap admin when none exists); returns its token once."""
    _check_role(role)
    if not isinstance(name, str) or not PRINCIPAL_NAME_RE.match(name):
        raise InputError(f"invalid principal name {name!r}: {PRINCIPAL_NAME_RULE}")
    with change(session):
        if actor is None:
            if session.scalar(select(func.count()).select_from(PrincipalRow)):
                raise AuthError("principals already exist: adding one needs an admin token")
            if role != "admin":
                raise InputError(f"the first principal must be an admin (got role {role!r})")
        else:
            require(actor, "admin", "add principals")
        if session.scalar(select(PrincipalRow.id).where(PrincipalRow.name == name)) is not None:
            raise Conflict(f"principal {name!r} already exists")
        token = new_token()
        row = PrincipalRow(name=name, role=role, token_hash=hash_token(token), disabled=False)
        session.add(row)
        session.flush()
        audit.append(session, actor=actor.name if actor else name, action="principal.add",
                     details={"principal": name, "role": role, "bootstrap": actor is None})
    return NewPrincipal(_domain(row), token)


def list_principals(*, session: Session) -> list[Principal]:
    with translate_errors():
        return [_domain(r) for r in session.scalars(select(PrincipalRow).order_by(PrincipalRow.id))]


def get_principal(name: str, *, session: Session) -> Principal:
    with translate_errors():
        row = session.scalars(select(PrincipalRow).where(PrincipalRow.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"no principal named {name!r}")
    return _domain(row)


def disable_principal(name: str, *, actor: Principal, session: Session, reason: str | None = None) -> Principal:
    """Disable a principal (admin only); its token stops working at once."""
    require(actor, "admin", "disable principals")
    with change(session):
        row = session.scalars(select(PrincipalRow).where(PrincipalRow.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"no principal named {name!r}")
        if row.disabled:
            raise InvalidTransition(f"principal {name!r} is already disabled")
        row.disabled = True
        audit.append(session, actor=actor.name, action="principal.disable", reason=reason,
                     details={"principal": name})
    return _domain(row)


def rotate_token(name: str, *, actor: Principal, session: Session) -> NewPrincipal:
    """Issue a new token for ``name`` (admin, or the principal itself); the old one stops working."""
    if actor.name != name:
        require(actor, "admin", "rotate another principal's token")
    with change(session):
        row = session.scalars(select(PrincipalRow).where(PrincipalRow.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"no principal named {name!r}")
        token = new_token()
        row.token_hash = hash_token(token)
        audit.append(session, actor=actor.name, action="principal.rotate", details={"principal": name})
    return NewPrincipal(_domain(row), token)
