"""Principals: bootstrap, tokens stored hashed, authentication, roles."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import InputError
from exitwise.policies import audit
from exitwise.policies.errors import AuthError, Conflict, Forbidden, InvalidTransition, NotFound
from exitwise.policies.principals import (
    ROLE_RANK,
    add_principal,
    authenticate,
    disable_principal,
    get_principal,
    list_principals,
    require,
    rotate_token,
)


def test_bootstrap_only_while_empty_and_only_an_admin(session: Session) -> None:
    with pytest.raises(InputError, match="first principal must be an admin"):
        add_principal("root", "author", actor=None, session=session)
    first = add_principal("root", "admin", actor=None, session=session)
    assert first.principal.role == "admin"
    with pytest.raises(AuthError, match="needs an admin token"):
        add_principal("sneaky", "admin", actor=None, session=session)
    assert [p.name for p in list_principals(session=session)] == ["root"]
    (ev,) = audit.log(session=session)
    assert (ev.action, ev.actor, ev.details) == ("principal.add", "root",
                                                 {"bootstrap": True, "principal": "root", "role": "admin"})


def test_tokens_are_random_shown_once_and_stored_hashed(session: Session, actors: Any, table_dump: Any) -> None:
    tokens = list(actors.tokens.values())
    assert len(set(tokens)) == len(tokens)
    assert all(re.fullmatch(r"ew_[A-Za-z0-9_-]{43}", t) for t in tokens)
    dump = repr(table_dump(session))
    assert not any(t in dump for t in tokens)  # plaintext never stored
    assert all(hashlib.sha256(t.encode()).hexdigest() in dump for t in tokens)
    assert authenticate(actors.token(actors.approver), session=session) == actors.approver


@pytest.mark.parametrize("token", [None, "", "ew_nope", "Bearer x"])
def test_bad_tokens_are_refused(session: Session, actors: Any, token: str | None) -> None:
    with pytest.raises(AuthError) as err:
        authenticate(token, session=session)
    assert err.value.http_status == 401


def test_only_admins_add_and_names_are_unique(session: Session, actors: Any) -> None:
    with pytest.raises(Forbidden, match="admin"):
        add_principal("x", "reader", actor=actors.approver, session=session)
    with pytest.raises(Conflict, match="already exists"):
        add_principal("alice", "reader", actor=actors.admin, session=session)
    with pytest.raises(InputError, match="unknown role"):
        add_principal("x", "root", actor=actors.admin, session=session)
    with pytest.raises(InputError, match="invalid principal name"):
        add_principal("no spaces", "reader", actor=actors.admin, session=session)


def test_roles_are_ordered(actors: Any) -> None:
    assert list(ROLE_RANK) == ["reader", "author", "approver", "admin"]
    assert require(actors.admin, "approver") is actors.admin
    assert actors.approver.has_role("author") and not actors.author.has_role("approver")
    with pytest.raises(Forbidden) as err:
        require(actors.reader, "author", "create policies")
    assert err.value.http_status == 403 and "create policies" in str(err.value)
    with pytest.raises(AuthError):
        require(None, "reader")


def test_disable_and_rotate(session: Session, actors: Any) -> None:
    old = actors.token(actors.author)
    with pytest.raises(Forbidden):
        disable_principal("alice", actor=actors.approver, session=session)
    rotated = rotate_token("alice", actor=actors.author, session=session)  # a principal may rotate its own
    with pytest.raises(AuthError, match="invalid token"):
        authenticate(old, session=session)
    assert authenticate(rotated.token, session=session).name == "alice"
    with pytest.raises(Forbidden):
        rotate_token("bob", actor=actors.author, session=session)
    disabled = disable_principal("alice", actor=actors.admin, reason="left", session=session)
    assert disabled.disabled
    with pytest.raises(AuthError, match="disabled"):
        authenticate(rotated.token, session=session)
    with pytest.raises(InvalidTransition):
        disable_principal("alice", actor=actors.admin, session=session)
    with pytest.raises(NotFound):
        get_principal("nobody", session=session)
    actions = [e.action for e in audit.log(session=session, limit=3)]
    assert actions == ["principal.disable", "principal.rotate", "principal.add"]
