"""Replay the audit trail and compare what it says is served with the tables that serve it.

The chain proves the events were not altered; it says nothing about a row changed beside it.
A draft activated by direct SQL (an ``activations`` row, a ``policy_versions.state``) would be
served while every event still verifies. :func:`check_state` derives, from the events alone:

- per (model, environment): the active version (last ``version.activate``/``version.rollback``)
  and how many activation rows each version must have (one per such event);
- per (model, environment): the kill switch (last ``killswitch.kill``/``unkill``);
- per version: its content hash (``version.create``), its approvals (``version.approve``) and
  its state (retired > draft without approval > active somewhere > superseded > approved);

and reports every table row that disagrees, naming model, environment and version.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from exitwise.policies.canonical import content_hash
from exitwise.policies.models import Activation, Approval, KillSwitch, Model, PolicyVersion

ACTIVATING = ("version.activate", "version.rollback")


@dataclass
class _Version:
    seq: int
    content_hash: str | None
    approvals: int = 0
    retired: bool = False


@dataclass
class Derived:
    """What the events say the tables must hold (read ``state`` only once the replay is done)."""

    versions: dict[tuple[str, int], _Version] = field(default_factory=dict)
    active: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (model, env) -> (version, seq)
    activations: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    killed: dict[tuple[str, str], tuple[bool, int]] = field(default_factory=dict)

    def state(self, model: str, number: int) -> str:
        """The state the lifecycle gives this version after these events."""
        v = self.versions[(model, number)]
        if v.retired:
            return "retired"
        if v.approvals == 0:
            return "draft"
        if (model, number) in self.served:
            return "active"
        if (model, number) in self.ever_activated:
            return "superseded"
        return "approved"

    @cached_property
    def served(self) -> frozenset[tuple[str, int]]:
        return frozenset((m, n) for (m, _e), (n, _s) in self.active.items())

    @cached_property
    def ever_activated(self) -> frozenset[tuple[str, int]]:
        return frozenset((m, n) for (m, _e, n) in self.activations)


def derive(records: Iterable[Mapping[str, Any]]) -> Derived:
    """Replay the lifecycle events of a (verified) chain."""
    d = Derived()
    for r in records:
        action, model, number, env = r["action"], r["model"], r["version"], r["environment"]
        if action == "version.create":
            d.versions[(model, number)] = _Version(r["seq"], r["after_hash"])
        elif action == "version.approve" and (model, number) in d.versions:
            d.versions[(model, number)].approvals += 1
        elif action == "version.retire" and (model, number) in d.versions:
            d.versions[(model, number)].retired = True
        elif action in ACTIVATING:
            d.active[(model, env)] = (number, r["seq"])
            d.activations[(model, env, number)] += 1
        elif action in ("killswitch.kill", "killswitch.unkill"):
            d.killed[(model, env)] = (action == "killswitch.kill", r["seq"])
    return d


@dataclass(frozen=True)
class StateProblem:
    message: str
    seq: int | None = None


def _seq_note(seq: int | None) -> str:
    return f"audit seq={seq}" if seq is not None else "no audit event"


def _check_activations(session: Session, d: Derived) -> list[StateProblem]:
    out: list[StateProblem] = []
    rows = session.execute(select(Model.name, Activation.environment, PolicyVersion.number, Activation.active)
                           .join(Model, Model.id == Activation.model_id)
                           .join(PolicyVersion, PolicyVersion.id == Activation.version_id)).all()
    served = {(m, e): n for m, e, n, active in rows if active}
    for key in sorted(served.keys() | d.active.keys()):
        model, env = key
        have, (want, seq) = served.get(key), d.active.get(key, (None, None))
        if have != want:
            said = f"v{want} ({_seq_note(seq)})" if want is not None else "no version (no activation event)"
            now = f"v{have} is active" if have is not None else "no version is active"
            out.append(StateProblem(f"{model} {env}: {now} in the activations table, but the audit trail "
                                    f"says {said} — changed outside exitwise (direct SQL?)", seq))
    counted = Counter((m, e, n) for m, e, n, _a in rows)
    for key in sorted(counted.keys() | d.activations.keys()):
        if counted[key] != d.activations[key]:
            model, env, number = key
            out.append(StateProblem(f"{model} v{number} {env}: {counted[key]} activation row(s) but "
                                    f"{d.activations[key]} version.activate/rollback event(s) — an activation "
                                    "was written or removed outside exitwise"))
    return out


def _check_versions(session: Session, d: Derived) -> list[StateProblem]:
    out: list[StateProblem] = []
    approvals = Counter({vid: n for vid, n in session.execute(
        select(Approval.version_id, func.count()).group_by(Approval.version_id)).all()})
    rows = session.execute(select(Model.name, PolicyVersion.id, PolicyVersion.number, PolicyVersion.state,
                                  PolicyVersion.content_hash, PolicyVersion.content)
                           .join(Model, Model.id == PolicyVersion.model_id)).all()
    seen = set()
    for model, vid, number, state, chash, content in rows:
        seen.add((model, number))
        ev = d.versions.get((model, number))
        if ev is None:
            out.append(StateProblem(f"{model} v{number}: the version exists but has no version.create event "
                                    "— inserted outside exitwise"))
            continue
        if chash != ev.content_hash:
            out.append(StateProblem(f"{model} v{number}: content_hash {chash[:12]}… differs from the one its "
                                    f"version.create event recorded ({(ev.content_hash or '')[:12]}…)", ev.seq))
        else:
            try:
                actual = content_hash(json.loads(content))
            except (ValueError, TypeError):
                actual = None
            if actual != chash:
                out.append(StateProblem(f"{model} v{number}: stored content no longer matches its content_hash "
                                        "— altered outside exitwise", ev.seq))
        if approvals[vid] != ev.approvals:
            out.append(StateProblem(f"{model} v{number}: {approvals[vid]} approval row(s) but {ev.approvals} "
                                    "version.approve event(s) — approved outside exitwise", ev.seq))
        want = d.state(model, number)
        if state != want:
            out.append(StateProblem(f"{model} v{number}: state is {state!r} but the audit trail makes it "
                                    f"{want!r} — changed outside exitwise (direct SQL?)", ev.seq))
    for (model, number), ev in sorted(d.versions.items()):
        if (model, number) not in seen:
            out.append(StateProblem(f"{model} v{number}: created at audit seq={ev.seq} but missing from "
                                    "policy_versions — deleted outside exitwise", ev.seq))
    return out


def _check_kill(session: Session, d: Derived) -> list[StateProblem]:
    out: list[StateProblem] = []
    rows = {(m, e): k for m, e, k in session.execute(
        select(Model.name, KillSwitch.environment, KillSwitch.killed).join(Model, Model.id == KillSwitch.model_id))}
    for key in sorted(rows.keys() | d.killed.keys()):
        model, env = key
        have = rows.get(key)
        want, seq = d.killed.get(key, (None, None))
        if have != want:
            def word(k: bool | None) -> str:
                return "no kill switch" if k is None else ("killed" if k else "not killed")
            out.append(StateProblem(f"{model} {env}: kill switch table says {word(have)}, the audit trail says "
                                    f"{word(want)} ({_seq_note(seq)}) — changed outside exitwise", seq))
    return out


def check_state(session: Session, records: Iterable[Mapping[str, Any]]) -> list[StateProblem]:
    """Every disagreement between the replayed events and the activations, versions and kill switches."""
    d = derive(records)
    return [*_check_activations(session, d), *_check_versions(session, d), *_check_kill(session, d)]
