"""The append-only, hash-chained audit trail.

Every state change appends one event in the same transaction as the change (through
:func:`append`, inside :func:`exitwise.policies.db.change`, which holds the store's write lock, so
the chain stays linear under concurrency).

Hash formula (what an external auditor recomputes)::

    fields = {seq, ts, actor, action, model, version, environment, reason,
              before_hash, after_hash, details, prev_hash}
    hash   = sha256( canonical_json(fields) ).hexdigest()
    canonical_json = UTF-8 JSON, keys sorted, separators (",", ":"), ensure_ascii=False
    prev_hash of seq 1 = "0" * 64;  prev_hash of seq n = hash of seq n-1

``seq`` and ``version`` are integers (``version`` may be null), ``details`` is a JSON
object, the other fields are strings or null; ``ts`` is UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
stored as text so it round-trips exactly. :func:`verify_export` checks an exported file
with nothing but this module's standard-library code.

:func:`verify` also compares the chain with signed checkpoints kept outside the database
(``exitwise.policies.anchor``; the in-database head alone cannot reveal a rewritten chain) and
replays it against the tables that decide what is served (``exitwise.policies.replay``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from exitwise.calibration.atomic import atomic_path
from exitwise.calibration.exceptions import InputError
from exitwise.policies import events
from exitwise.policies.canonical import canonical_json
from exitwise.policies.db import in_change, translate_errors
from exitwise.policies.errors import AuditChainBroken
from exitwise.policies.models import AuditEvent, StoreState
from exitwise.policies.names import control_character
from exitwise.policies.replay import check_state

GENESIS_HASH = "0" * 64
HASHED_FIELDS = ("seq", "ts", "actor", "action", "model", "version", "environment", "reason",
                 "before_hash", "after_hash", "details", "prev_hash")
EXPORT_FIELDS = (*HASHED_FIELDS, "hash")
INT_FIELDS = frozenset({"seq", "version"})
Format = Literal["jsonl", "csv"]
REASON_MAX = 2000


@dataclass(frozen=True)
class Event:
    """One audit event as stored and exported."""

    seq: int
    ts: str
    actor: str
    action: str
    model: str | None
    version: int | None
    environment: str | None
    reason: str | None
    before_hash: str | None
    after_hash: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def timestamp(self) -> datetime:
        return datetime.strptime(self.ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class ChainReport:
    """Result of walking the chain: ``ok`` or the first broken link (``broken_seq``, ``problem``)."""

    ok: bool
    events: int
    head_seq: int
    head_hash: str
    broken_seq: int | None = None
    problem: Literal["edited", "deleted", "reordered", "truncated", "unrecorded", "anchor", "state"] | None = None
    message: str = "audit chain verifies"
    details: dict[str, Any] = field(default_factory=dict)

    def raise_if_broken(self) -> ChainReport:
        if not self.ok:
            raise AuditChainBroken(self.message)
        return self


def format_ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the hashed fields (see the module docstring)."""
    return hashlib.sha256(canonical_json({k: fields[k] for k in HASHED_FIELDS})).hexdigest()


def _row_to_event(row: AuditEvent) -> Event:
    return Event(seq=row.seq, ts=row.ts, actor=row.actor, action=row.action, model=row.model,
                 version=row.version, environment=row.environment, reason=row.reason,
                 before_hash=row.before_hash, after_hash=row.after_hash, details=json.loads(row.details),
                 prev_hash=row.prev_hash, hash=row.hash)


def check_reason(reason: str | None) -> str | None:
    """``reason`` if it can be recorded: at most ``REASON_MAX`` characters, no NUL or other
    control characters but tab and line breaks (PostgreSQL refuses NUL; the others hide text)."""
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise InputError(f"a reason is text, got {type(reason).__name__}")
    if len(reason) > REASON_MAX:
        raise InputError(f"reason is {len(reason)} characters long; at most {REASON_MAX}")
    bad = control_character(reason)
    if bad is not None:
        raise InputError(f"reason contains the control character {bad}")
    return reason


def append(session: Session, *, actor: str, action: str, model: str | None = None, version: int | None = None,
           environment: str | None = None, reason: str | None = None, before_hash: str | None = None,
           after_hash: str | None = None, details: Mapping[str, Any] | None = None) -> Event:
    """Append one event to the chain; must run inside ``exitwise.policies.db.change`` (which holds the lock)."""
    if not in_change(session):
        raise RuntimeError("audit.append must be called inside policies.db.change(session)")
    check_reason(reason)
    head_seq, head_hash = session.execute(
        select(StoreState.audit_seq, StoreState.audit_hash).where(StoreState.id == 1)).one()
    fields: dict[str, Any] = {
        "seq": head_seq + 1, "ts": format_ts(datetime.now(UTC)), "actor": actor, "action": action,
        "model": model, "version": version, "environment": environment, "reason": reason or None,
        "before_hash": before_hash, "after_hash": after_hash, "details": dict(details or {}),
        "prev_hash": head_hash,
    }
    digest = event_hash(fields)
    session.add(AuditEvent(**{**fields, "details": canonical_json(fields["details"]).decode()}, hash=digest))
    session.execute(update(StoreState).where(StoreState.id == 1).values(audit_seq=fields["seq"], audit_hash=digest))
    ev = Event(**fields, hash=digest)
    events.queue(session, ev)
    return ev


def log(*, session: Session, model: str | None = None, limit: int | None = 50,
        after_seq: int | None = None) -> list[Event]:
    """Newest events first (``after_seq``: only events with a larger seq, oldest first)."""
    q = select(AuditEvent)
    if model is not None:
        q = q.where(AuditEvent.model == model)
    if after_seq is not None:
        q = q.where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq)
    else:
        q = q.order_by(AuditEvent.seq.desc())
    if limit is not None:
        q = q.limit(limit)
    with translate_errors():
        return [_row_to_event(r) for r in session.scalars(q)]


def _records(session: Session) -> Iterator[dict[str, Any]]:
    cols = [getattr(AuditEvent, f) for f in EXPORT_FIELDS]
    for row in session.execute(select(*cols).order_by(AuditEvent.seq)).yield_per(2000):
        rec = dict(zip(EXPORT_FIELDS, row, strict=True))
        with contextlib.suppress(ValueError):  # an edited row keeps its text; the hash check names it
            rec["details"] = json.loads(rec["details"])
        yield rec


def check_chain(records: Iterable[Mapping[str, Any]], head: tuple[int, str] | None = None) -> ChainReport:
    """Walk ``records`` (in order) and report the first broken link.

    ``head`` is the (seq, hash) the store recorded for its last append; without it (an
    export) a deleted tail cannot be seen — compare the last hash with a published head.
    """
    recs = list(records)
    by_hash = {r["hash"]: r["seq"] for r in recs}
    seqs = {r["seq"] for r in recs}
    prev, expected, count = GENESIS_HASH, 1, 0

    def broken(seq: int, problem: Any, message: str, **details: Any) -> ChainReport:
        return ChainReport(False, count, expected - 1, prev, seq, problem, message, details)

    for r in recs:
        seq = r["seq"]
        if seq != expected:
            if seq > expected and expected in seqs:
                return broken(seq, "reordered", f"audit row seq={seq} appears before seq={expected} (reordered)")
            if seq > expected:
                gap = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
                return broken(expected, "deleted", f"audit row(s) {gap} missing before seq {seq} (deleted)")
            return broken(seq, "reordered", f"audit row seq={seq} appears after seq={expected - 1} (reordered)")
        try:
            computed = event_hash(r)
        except (KeyError, TypeError, ValueError):
            computed = None
        if r["prev_hash"] != prev:
            linked = by_hash.get(r["prev_hash"])
            if linked is not None and linked != seq - 1:
                return broken(seq, "reordered", f"audit row seq={seq} links to the row now at seq={linked}, "
                                                 f"not to seq={seq - 1} (rows reordered)")
            if computed == r["hash"] and seq > 1:
                return broken(seq - 1, "edited", f"audit row seq={seq - 1} was altered: its hash no longer "
                                                 f"matches the link stored in seq={seq}")
            return broken(seq, "edited", f"audit row seq={seq}: prev_hash does not match the chain (edited)")
        if computed != r["hash"]:
            return broken(seq, "edited", f"audit row seq={seq}: content does not match its hash (edited)")
        prev, expected, count = r["hash"], seq + 1, count + 1
    if head is not None:
        head_seq, head_hash = head
        last = expected - 1
        if head_seq > last:
            return broken(last + 1, "truncated", f"audit row(s) seq {last + 1}..{head_seq} missing at the end "
                                                 f"of the chain (deleted); the store recorded head seq={head_seq}")
        if head_seq < last:
            return broken(head_seq + 1, "unrecorded", f"audit row seq={head_seq + 1} was not written by the store "
                                                      f"(its recorded head is seq={head_seq})")
        if head_hash != prev and last > 0:
            return broken(last, "edited", f"audit row seq={last} was altered: its hash differs from the head "
                                          "the store recorded")
    return ChainReport(True, count, expected - 1, prev)


class Anchored(Protocol):
    """A signed (seq, hash) kept outside the database (see ``exitwise.policies.anchor.Checkpoint``)."""

    seq: int
    hash: str
    ts: str

    def label(self) -> str: ...


def check_checkpoints(records: Sequence[Mapping[str, Any]], checkpoints: Sequence[Anchored],
                      report: ChainReport) -> ChainReport:
    """Compare a verified chain (``report`` ok) with signed checkpoints, latest first.

    The chain must reach every checkpoint's seq and hold exactly its hash there: a cut
    tail with a rewritten head, an emptied table or a chain re-hashed after an edit all fail.
    """
    if not checkpoints:
        return report
    latest = max(checkpoints, key=lambda c: (c.seq, c.ts))

    def broken(cp: Anchored, message: str) -> ChainReport:
        return ChainReport(False, report.events, report.head_seq, report.head_hash, cp.seq, "anchor", message,
                           {"checkpoint": cp.label(), "checkpoint_seq": cp.seq, "checkpoint_hash": cp.hash})

    for cp in (latest, *checkpoints):
        if cp.seq > report.head_seq:
            return broken(cp, f"{cp.label()} recorded seq={cp.seq} hash={cp.hash[:16]}…, but the chain ends at "
                              f"seq={report.head_seq}: events seq {report.head_seq + 1}..{cp.seq} were deleted "
                              "and the stored head rewritten")
        stored = GENESIS_HASH if cp.seq == 0 else records[cp.seq - 1]["hash"]
        if stored != cp.hash:
            return broken(cp, f"{cp.label()} recorded seq={cp.seq} hash={cp.hash[:16]}…, but the chain holds "
                              f"hash={stored[:16]}… at seq={cp.seq}: events up to seq={cp.seq} were rewritten "
                              "(hashes recomputed)")
    return ChainReport(True, report.events, report.head_seq, report.head_hash,
                       message=f"audit chain verifies against {len(checkpoints)} signed checkpoint(s); the latest, "
                               f"{latest.label()}, is seq={latest.seq}",
                       details={"checkpoints": len(checkpoints), "anchored_seq": latest.seq,
                                "checkpoint": latest.label()})


def verify(*, session: Session, checkpoints: Sequence[Anchored] | None = None) -> ChainReport:
    """Walk the stored chain, compare it with the recorded head (and signed ``checkpoints``), then replay it.

    Order: chain links, then the checkpoints, then the tables (activations, versions, kill
    switches) against the replayed events (``exitwise.policies.replay``).
    """
    with translate_errors():
        head = session.execute(select(StoreState.audit_seq, StoreState.audit_hash).where(StoreState.id == 1)).one()
        recs = list(_records(session))
        report = check_chain(recs, (head[0], head[1]))
        if not report.ok:
            return report
        if checkpoints is not None:
            report = check_checkpoints(recs, checkpoints, report)
            if not report.ok:
                return report
        problems = check_state(session, recs)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return ChainReport(False, report.events, report.head_seq, report.head_hash, first.seq, "state",
                           f"the tables disagree with the audit trail: {first.message}{more}",
                           {**report.details, "problems": [p.message for p in problems]})
    return report


# ---------------------------------------------------------------- export

def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return canonical_json(value).decode()
    return str(value)


def write_export(records: Iterable[Mapping[str, Any]], stream: TextIO, fmt: Format) -> int:
    """Write records as JSON Lines (canonical JSON per line) or CSV (header = EXPORT_FIELDS)."""
    n = 0
    if fmt == "jsonl":
        for r in records:
            stream.write(canonical_json({k: r[k] for k in EXPORT_FIELDS}).decode() + "\n")
            n += 1
    elif fmt == "csv":
        w = csv.writer(stream, lineterminator="\n")
        w.writerow(EXPORT_FIELDS)
        for r in records:
            w.writerow([_csv_value(r[k]) for k in EXPORT_FIELDS])
            n += 1
    else:
        raise InputError(f"unknown export format {fmt!r}; use jsonl or csv")
    return n


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    events: int
    head_seq: int
    head_hash: str


def export(path: str | os.PathLike[str], fmt: Format = "jsonl", *, session: Session) -> ExportResult:
    """Export the whole chain to ``path`` atomically (temp file + rename)."""
    if fmt not in ("jsonl", "csv"):
        raise InputError(f"unknown export format {fmt!r}; use jsonl or csv")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    head: list[tuple[int, str]] = []

    def tracked() -> Iterator[dict[str, Any]]:
        for r in _records(session):
            head[:] = [(r["seq"], r["hash"])]
            yield r

    with atomic_path(target) as tmp, translate_errors(), open(tmp, "w", encoding="utf-8", newline="") as fh:
        n = write_export(tracked(), fh, fmt)
    seq, digest = head[0] if head else (0, GENESIS_HASH)
    return ExportResult(str(target), fmt, n, seq, digest)


def read_export(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse an export (JSON Lines or CSV, by extension or first character) into records."""
    text = Path(path).read_text(encoding="utf-8")
    is_csv = str(path).endswith(".csv") or (not str(path).endswith(".jsonl") and text.startswith("seq,"))
    out: list[dict[str, Any]] = []
    if not is_csv:
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as exc:
                    raise InputError(f"{path}: line {i} is not JSON ({exc})") from None
        return out
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if tuple(reader.fieldnames or ()) != EXPORT_FIELDS:
        raise InputError(f"{path}: CSV header must be {','.join(EXPORT_FIELDS)}")
    for i, row in enumerate(reader, 2):
        rec: dict[str, Any] = {}
        for k in EXPORT_FIELDS:
            v = row[k]
            try:
                rec[k] = (None if v == "" else int(v)) if k in INT_FIELDS else (
                    json.loads(v) if k == "details" else (None if v == "" else v))
            except ValueError:
                raise InputError(f"{path}: row {i}, column {k}: bad value {v!r}") from None
        out.append(rec)
    return out


def verify_export(path: str | os.PathLike[str], *, head_hash: str | None = None,
                  checkpoints: Sequence[Anchored] | None = None) -> ChainReport:
    """Check an exported trail independently of the database.

    ``head_hash`` (optional): the last hash published by the store (``audit verify``
    prints it), so a deleted tail in the file is detected as well; ``checkpoints``
    (optional, signatures already checked): the anchor's signed heads.
    """
    recs = read_export(path)
    report = check_chain(recs)
    if report.ok and head_hash is not None and report.head_hash != head_hash:
        return ChainReport(False, report.events, report.head_seq, report.head_hash, report.head_seq + 1,
                           "truncated", f"the export ends at seq={report.head_seq} with a hash different from the "
                                        "published head (rows missing at the end or altered)")
    if report.ok and checkpoints is not None:
        return check_checkpoints(recs, checkpoints, report)
    return report
