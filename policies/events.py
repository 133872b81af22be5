"""After-commit hooks: the extension point for mirrors of the store (MLflow sync, reports).

``on_commit(callback)`` registers ``callback(event)``; it is called once per audit event,
in order, after the transaction that wrote the event has committed (never for a rolled-back
change). A failing callback is logged and skipped: the policy database is the source of
truth and a mirror that is down must not undo or block a committed change (re-sync later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from exitwise.policies.audit import Event

log = logging.getLogger(__name__)

PENDING_KEY = "exitwise.pending_events"
Callback = Callable[["Event"], Any]
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


def queue(session: Session, item: Event) -> None:
    """Hold ``item`` until ``session`` commits (called by ``exitwise.policies.audit.append``)."""
    session.info.setdefault(PENDING_KEY, []).append(item)


def _outer_still_open(session: Session) -> bool:
    """True when only a SAVEPOINT ended (SQLAlchemy fires after_commit/after_rollback for those too)."""
    root = session.get_transaction()
    return root is not None and root.is_active


def _after_commit(session: Session) -> None:
    if _outer_still_open(session):  # policies.db.change released its SAVEPOINT; the real commit comes later
        return
    pending = session.info.pop(PENDING_KEY, None)
    if not pending:
        return
    for item in pending:
        for callback in list(_callbacks):
            try:
                callback(item)
            except Exception:  # a mirror must never break the source of truth
                log.exception("after-commit hook %r failed for audit event %s", callback, item.seq)


def _after_rollback(session: Session) -> None:
    if _outer_still_open(session):  # a SAVEPOINT rolled back; policies.db.change drops its own events
        return
    session.info.pop(PENDING_KEY, None)


event.listen(Session, "after_commit", _after_commit)
event.listen(Session, "after_rollback", _after_rollback)
