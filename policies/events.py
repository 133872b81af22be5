"""After-commit hooks: the extension point for mirrors of the store (MLflow sync, reports).

``on_commit(callback)`` registers ``callback(event)``; it is called once per audit event,
in order, after the transaction that wrote the event has committed (never for a rolled-back
change). A failing callback is logged and skipped: the policy database is the source of
truth and a mirror that is down must not undo or block a committed change (re-sync later).

Hooks fire only for the store's own sessions: :func:`listen` is called with the store's
session class (:class:`exitwise.policies.db.StoreSession`), never with SQLAlchemy's
``Session``, so other code in the same process is not affected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

PENDING_KEY = "exitwise.pending_events"


class Committed(Protocol):
    """What a hook receives: an audit event (see :class:`exitwise.policies.audit.Event`)."""

    @property
    def seq(self) -> int: ...


Callback = Callable[[Any], Any]
_callbacks: list[Callback] = []


def on_commit(callback: Callback) -> Callback:
    """Register ``callback(event)`` for every committed audit event; usable as a decorator."""
    if callback not in _callbacks:
        _callbacks.append(callback)
    return callback


def remove(callback: Callback) -> None:
    """Unregister a callback (no error when it was not registered)."""
    if callback in _callbacks:
        _callbacks.remove(callback)


def registered() -> tuple[Callback, ...]:
    """The callbacks registered now, in call order."""
    return tuple(_callbacks)


def queue(session: Session, item: Committed) -> None:
    """Hold ``item`` until ``session`` commits (called by ``exitwise.policies.audit.append``)."""
    session.info.setdefault(PENDING_KEY, []).append(item)


def pending(session: Session) -> list[Committed]:
    """The events ``session`` holds for its commit (``exitwise.policies.db.change`` trims it on a refusal)."""
    return session.info.setdefault(PENDING_KEY, [])


def _outer_still_open(session: Session) -> bool:
    """True when only a SAVEPOINT ended (SQLAlchemy fires after_commit/after_rollback for those too)."""
    root = session.get_transaction()
    return root is not None and root.is_active


def _after_commit(session: Session) -> None:
    if _outer_still_open(session):  # a SAVEPOINT was released; the real commit comes later
        return
    items = session.info.pop(PENDING_KEY, None)
    if not items:
        return
    for item in items:
        for callback in list(_callbacks):
            try:
                callback(item)
            except Exception:  # a mirror must never break the source of truth
                log.exception("after-commit hook %r failed for audit event %s", callback, item.seq)


def _after_rollback(session: Session) -> None:
    if _outer_still_open(session):  # a SAVEPOINT rolled back; db.change drops its own events
        return
    session.info.pop(PENDING_KEY, None)


def listen(session_class: type[Session]) -> None:
    """Run the hooks for commits and rollbacks of sessions of ``session_class`` (the store's own)."""
    if session_class is Session:
        raise TypeError("listen on the store's own Session subclass, not on every Session in the process")
    if not event.contains(session_class, "after_commit", _after_commit):
        event.listen(session_class, "after_commit", _after_commit)
        event.listen(session_class, "after_rollback", _after_rollback)
