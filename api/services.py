"""The few service functions the API needs beyond the store's, built on the store's functions only.

- :func:`audit_page` — filtered, cursor-paginated audit events on top of ``exitwise.policies.audit.log``
  (which filters by model and pages by ``after_seq``); action/actor filters are applied while
  scanning, with a scan budget per page so a rare filter never makes one request unbounded
  (the page then comes back short with a cursor to continue).
- :func:`readiness` — database reachable and migrations at head.
- :func:`reverify_version` — the certificate of a draft recomputed from its evidence, one at a
  time per process, outside any write transaction (it reads logs: seconds, not milliseconds).
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine

from exitwise.calibration.exceptions import InputError
from exitwise.policies import audit
from exitwise.policies.db import check_schema, head_revision
from exitwise.policies.errors import StoreUnavailable
from exitwise.policies.reverify import Reverification, not_reverified
from exitwise.policies.reverify import reverify_version as reverify_stored

CHUNK = 500
SCAN_BUDGET = 5_000


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = raw.partition(":")
        seq = int(value)
        if kind != "seq" or not 0 <= seq < 2**63:
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InputError(f"invalid cursor {cursor!r}: pass back the next_cursor of a previous page") from None
    return seq


def audit_page(
    *,
    session: object,
    model: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[audit.Event], str | None]:
    """Events after ``cursor`` (oldest first) matching the filters; ``(events, next_cursor)``."""
    after = decode_cursor(cursor)
    out: list[audit.Event] = []
    budget = SCAN_BUDGET
    while budget > 0:
        ask = min(CHUNK, budget)
        chunk = audit.log(session=session, model=model, limit=ask, after_seq=after)  # type: ignore[arg-type]
        budget -= len(chunk)
        for event in chunk:
            after = event.seq
            if (action is None or event.action == action) and (actor is None or event.actor == actor):
                out.append(event)
                if len(out) == limit:
                    return out, encode_cursor(after)
        if len(chunk) < ask:
            return out, None  # reached the end of the trail
    return out, encode_cursor(after)


def readiness(engine: Engine) -> tuple[str, str]:
    """``(backend, revision)`` when the database answers and is at head; raises ``StoreUnavailable``."""
    check_schema(engine)  # StoreUnavailable when unreachable, SchemaOutOfDate when not at head
    head = head_revision()
    if not head:
        raise StoreUnavailable("no migrations found")
    return engine.dialect.name, head


_REVERIFY = threading.BoundedSemaphore(1)
REVERIFY_WAIT_S = 120.0


def reverify_version(engine: Engine, model: str, number: int, roots: Sequence[Path]) -> Reverification:
    """Re-verify a draft's certificate from its evidence under ``roots`` (nothing read when empty)."""
    if not roots:
        return not_reverified("this service re-verifies no evidence (EXITWISE_EVIDENCE_ROOTS is not set)")
    if not _REVERIFY.acquire(timeout=REVERIFY_WAIT_S):
        raise StoreUnavailable("another certificate is being re-verified; retry later")
    try:
        return reverify_stored(engine, model, number, roots=roots)
    finally:
        _REVERIFY.release()
