"""Write side of the policy store: the lifecycle of policy versions and the kill switch.

::

    draft --approve--> approved --activate(env)--> active --(another version activated,
    rolled back to, in every env)--> superseded;  draft/approved/superseded --retire--> retired

Rules (enforced here, and by the database where it can):

- the approver is not the author (four eyes, ``FourEyesViolation``);
- only approved versions activate (approved, or active/superseded ones that were approved
  before); at most one active version per (model, environment) — also a partial unique
  index; optional: production only after the same version was active in staging;
- content never changes (a new version instead) — also a database trigger; creating a
  version whose content hash already exists for the model raises ``DuplicateContent``
  (409, carrying the existing number) rather than silently returning it, so a caller never
  mistakes an old version for a new one (``policy create --exist-ok`` opts in to reuse);
- every change writes its audit event and bumps the store generation in the same
  transaction (``exitwise.policies.db.change``), and a refused change leaves nothing behind.

Roles: create — author; kill — author (it only makes serving safer); approve, activate,
rollback, retire, unkill — approver. Admins may do everything, but never approve their own.
Functions take ``*, session``, never commit, and return domain objects from
``exitwise.policies.store``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import InputError
from exitwise.policies import audit
from exitwise.policies.canonical import GOVERNANCE_FIELDS, canonical_json
from exitwise.policies.db import change
from exitwise.policies.diff import weakenings
from exitwise.policies.errors import (
    CertificateMismatch,
    DuplicateContent,
    FourEyesViolation,
    InvalidTransition,
    WeakerPolicy,
)
from exitwise.policies.models import Activation, KillSwitch, Model, utcnow
from exitwise.policies.models import Approval as ApprovalRow
from exitwise.policies.models import PolicyVersion as VersionRow
from exitwise.policies.principals import Principal, require
from exitwise.policies.reverify import Reverification, not_reverified
from exitwise.policies.schema import DocumentError, validate_document
from exitwise.policies.settings import GovernanceRules
from exitwise.policies.store import (
    ActivePolicy,
    KillState,
    PolicyVersion,
    active_row,
    check_environment,
    get_active,
    get_kill_switch,
    get_version,
    kill_row,
    model_row,
    version_domain,
    version_row,
)

ACTIVATABLE = ("approved", "active", "superseded")


def _reason(reason: str | None, action: str, *, required: bool) -> str | None:
    reason = (reason or "").strip() or None
    if required and reason is None:
        raise InputError(f"a reason is required to {action}")
    return audit.check_reason(reason)


def _stored_content(doc: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    body = {k: v for k, v in doc.items() if k not in GOVERNANCE_FIELDS or k == "content_hash"}
    return body, canonical_json(body).decode("utf-8")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def create_version(doc: Mapping[str, Any], *, author: Principal, session: Session) -> PolicyVersion:
    """Store ``doc`` as the next draft version of its model (created on first use).

    The document must validate (``exitwise.policies.schema``) with a matching ``content_hash``;
    governance fields in it (version, state, ...) are dropped. ``parent``, when set, must
    name an existing version of the same model.
    """
    require(author, "author", "create policy versions")
    parsed = validate_document(dict(doc))
    _body, content = _stored_content(doc)
    name = parsed.model.name
    with change(session):
        m = session.scalars(select(Model).where(Model.name == name)).one_or_none()
        new_model = m is None
        if m is None:
            m = Model(name=name)
            session.add(m)
            session.flush()
        existing = session.scalar(select(VersionRow.number).where(
            VersionRow.model_id == m.id, VersionRow.content_hash == parsed.content_hash))
        if existing is not None:
            raise DuplicateContent(f"model {name!r} already has this content as version {existing} "
                                   f"(content_hash {parsed.content_hash[:12]}…)", model=name, existing=existing)
        parent = None
        if parsed.parent is not None:
            parent = session.scalars(select(VersionRow).where(
                VersionRow.model_id == m.id, VersionRow.number == parsed.parent)).one_or_none()
            if parent is None:
                raise DocumentError([("parent", f"model {name!r} has no version {parsed.parent}")])
        number = (session.scalar(select(func.max(VersionRow.number)).where(VersionRow.model_id == m.id)) or 0) + 1
        g, e = parsed.guarantee, parsed.expected
        fingerprint = parsed.data.get("fingerprint")
        row = VersionRow(
            model_id=m.id, number=number, content=content, content_hash=parsed.content_hash,
            parent_id=parent.id if parent else None, author_id=author.id, state="draft",
            data_fingerprint=str(fingerprint)[:200] if fingerprint is not None else None,
            compute_fraction=_number(e.get("compute_fraction")), risk=_number(e.get("risk")),
            risk_type=g.risk, eps=g.eps, delta=g.delta, certified=g.certified,
        )
        session.add(row)
        session.flush()
        audit.append(session, actor=author.name, action="version.create", model=name, version=number,
                     before_hash=parent.content_hash if parent else None, after_hash=parsed.content_hash,
                     details={"parent": parsed.parent, "new_model": new_model, "data_fingerprint": fingerprint})
        return version_domain(row, session)


@dataclass(frozen=True)
class Stored:
    """The version holding a document's content, and whether this call created it."""

    version: PolicyVersion
    created: bool


def store_document(doc: Mapping[str, Any], *, author: Principal, session: Session) -> Stored:
    """Like :func:`create_version`, but content already stored reports that version instead of failing.

    For idempotent pipelines: running the same solve twice stores one version.
    """
    try:
        return Stored(create_version(doc, author=author, session=session), created=True)
    except DuplicateContent as exc:  # the change's savepoint was rolled back; the session is usable
        return Stored(get_version(exc.model, exc.existing, session=session), created=False)


def approve(model: str, number: int, *, approver: Principal, reason: str | None, session: Session,
            verification: Reverification | None = None, accept_weaker: str | None = None) -> PolicyVersion:
    """Approve a draft; the approver must not be its author.

    ``verification`` is the service's re-verification of the certificate
    (:func:`exitwise.policies.reverify.reverify`, run *before* this transaction: it reads the
    logs); it is recorded with the approval, and a failed one refuses it. None records
    "as claimed by the author, not re-verified". A version that drops or loosens promises of
    its parent or of a version active anywhere (:func:`exitwise.policies.diff.weakenings`) is
    refused unless ``accept_weaker`` gives the reason, which is audited.
    """
    require(approver, "approver", "approve policy versions")
    reason = _reason(reason, "approve a version", required=True)
    accept_weaker = audit.check_reason((accept_weaker or "").strip() or None)
    verification = verification or not_reverified("approved without re-verification by the service")
    with change(session):
        row = version_row(session, model, number)
        if row.state != "draft":
            raise InvalidTransition(f"{model} v{number} is {row.state}; only drafts can be approved")
        if row.author_id == approver.id:
            raise FourEyesViolation(f"{approver.name!r} authored {model} v{number} and cannot approve it "
                                    "(four-eyes rule: another approver must)")
        if verification.status == "failed":
            raise CertificateMismatch(f"{model} v{number}: the service re-ran the certification from the "
                                      f"version's evidence and it does not hold: {verification.detail}")
        weaker = _weaker_than_references(session, row)
        if weaker and accept_weaker is None:
            raise WeakerPolicy(f"{model} v{number} is weaker than what it replaces: {'; '.join(weaker)}. "
                               "Approve with --accept-weaker REASON (API: accept_weaker) to accept it",
                               weakened=weaker)
        session.add(ApprovalRow(version_id=row.id, approver_id=approver.id, reason=reason,
                                certificate=verification.status, certificate_detail=verification.detail))
        row.state = "approved"
        session.flush()
        session.refresh(row, ["approvals"])
        details: dict[str, Any] = {"certificate": verification.status, "certificate_detail": verification.detail}
        if weaker:
            details.update(weaker_than=weaker, accepted_weaker=accept_weaker)
        audit.append(session, actor=approver.name, action="version.approve", model=model, version=number,
                     reason=reason, before_hash=row.content_hash, after_hash=row.content_hash, details=details)
        return version_domain(row, session)


def _weaker_than_references(session: Session, row: VersionRow) -> list[str]:
    """What ``row`` weakens relative to its parent and to every version active in any environment."""
    references: dict[int, tuple[VersionRow, list[str]]] = {}
    if row.parent is not None:
        references[row.parent.id] = (row.parent, ["parent"])
    for act in session.scalars(select(Activation).where(Activation.model_id == row.model_id, Activation.active)
                               .order_by(Activation.environment)):
        if act.version_id != row.id:
            references.setdefault(act.version_id, (act.version, []))[1].append(f"active in {act.environment}")
    after = json.loads(row.content)
    out = []
    for ref, roles in references.values():
        for w in weakenings(json.loads(ref.content), after):
            out.append(f"vs v{ref.number} ({', '.join(roles)}): {w.message}")
    return out


def _refresh_state(session: Session, row: VersionRow) -> None:
    if row.state in ("retired", "draft"):
        return
    session.flush()
    if session.scalar(select(exists().where(Activation.version_id == row.id, Activation.active))):
        row.state = "active"
    elif session.scalar(select(exists().where(Activation.version_id == row.id))):
        row.state = "superseded"
    else:
        row.state = "approved"


def _check_activatable(row: VersionRow, model: str) -> None:
    if row.state == "draft":
        raise InvalidTransition(f"{model} v{row.number} is a draft; it must be approved before it can be activated")
    if row.state not in ACTIVATABLE:
        raise InvalidTransition(f"{model} v{row.number} is {row.state} and cannot be activated")


def _check_staging(session: Session, row: VersionRow, model: str, env: str, rules: GovernanceRules) -> None:
    if not rules.require_staging_before_production or env != rules.production_env:
        return
    if not session.scalar(select(exists().where(Activation.version_id == row.id,
                                                Activation.environment == rules.staging_env))):
        raise InvalidTransition(f"{model} v{row.number} has never been active in {rules.staging_env!r}; "
                                f"this store requires that before {rules.production_env!r}")


def _switch(session: Session, m: Model, env: str, target: VersionRow, actor: Principal) -> VersionRow | None:
    """Deactivate the current version of (m, env), if any, and activate ``target``; returns the old one."""
    current = active_row(session, m, env)
    previous = None
    if current is not None:
        current.active = False
        current.deactivated_at = utcnow()
        current.deactivated_by_id = actor.id
        previous = current.version
        session.flush()  # free the partial unique index before the new active row
    session.add(Activation(model_id=m.id, environment=env, version_id=target.id, active=True,
                           activated_by_id=actor.id))
    session.flush()
    if previous is not None:
        _refresh_state(session, previous)
    _refresh_state(session, target)
    return previous


def activate(model: str, number: int, environment: str, *, actor: Principal, reason: str | None,
             session: Session, rules: GovernanceRules | None = None) -> ActivePolicy:
    """Make an approved version the active one in ``environment``; the previous one is superseded."""
    require(actor, "approver", "activate policy versions")
    env = check_environment(environment)
    reason = _reason(reason, "activate a version", required=True)
    rules = rules or GovernanceRules()
    with change(session):
        row = version_row(session, model, number)
        _check_activatable(row, model)
        m = row.model
        current = active_row(session, m, env)
        if current is not None and current.version_id == row.id:
            raise InvalidTransition(f"{model} v{number} is already active in {env!r}")
        _check_staging(session, row, model, env, rules)
        previous = _switch(session, m, env, row, actor)
        audit.append(session, actor=actor.name, action="version.activate", model=model, version=number,
                     environment=env, reason=reason, before_hash=previous.content_hash if previous else None,
                     after_hash=row.content_hash,
                     details={"superseded": previous.number if previous else None})
        return get_active(model, env, session=session)


def rollback(model: str, environment: str, *, actor: Principal, to: int | None = None, reason: str | None = None,
             session: Session, rules: GovernanceRules | None = None) -> ActivePolicy:
    """Re-activate an earlier version in ``environment``: ``to``, or the one active before the current."""
    require(actor, "approver", "roll back policies")
    env = check_environment(environment)
    reason = _reason(reason, "roll back", required=False)
    rules = rules or GovernanceRules()
    with change(session):
        m = model_row(session, model)
        current = active_row(session, m, env)
        current_version = current.version if current else None
        if to is not None:
            target = version_row(session, model, to)
            if current_version is not None and target.id == current_version.id:
                raise InvalidTransition(f"{model} v{to} is already active in {env!r}")
            _check_activatable(target, model)
        else:
            target = None
            history = session.scalars(select(Activation).where(
                Activation.model_id == m.id, Activation.environment == env, Activation.active.is_(False))
                .order_by(Activation.id.desc()))
            for act in history:
                v = act.version
                if (current_version is None or v.id != current_version.id) and v.state in ACTIVATABLE:
                    target = v
                    break
            if target is None:
                raise InvalidTransition(f"no earlier version of {model!r} to roll back to in {env!r}")
        was_here = session.scalar(select(exists().where(Activation.version_id == target.id,
                                                        Activation.environment == env)))
        if not was_here:
            _check_staging(session, target, model, env, rules)
        _switch(session, m, env, target, actor)
        audit.append(session, actor=actor.name, action="version.rollback", model=model, version=target.number,
                     environment=env, reason=reason,
                     before_hash=current_version.content_hash if current_version else None,
                     after_hash=target.content_hash,
                     details={"from": current_version.number if current_version else None, "to": target.number})
        return get_active(model, env, session=session)


def retire(model: str, number: int, *, actor: Principal, reason: str | None = None,
           session: Session) -> PolicyVersion:
    """Retire a version that is not active anywhere; it can never be approved or activated again."""
    require(actor, "approver", "retire policy versions")
    reason = _reason(reason, "retire a version", required=False)
    with change(session):
        row = version_row(session, model, number)
        if row.state == "retired":
            raise InvalidTransition(f"{model} v{number} is already retired")
        envs = list(session.scalars(select(Activation.environment).where(
            Activation.version_id == row.id, Activation.active)))
        if envs:
            raise InvalidTransition(f"{model} v{number} is active in {', '.join(sorted(envs))}; "
                                    "activate another version or roll back first")
        before = row.state
        row.state = "retired"
        audit.append(session, actor=actor.name, action="version.retire", model=model, version=number,
                     reason=reason, before_hash=row.content_hash, after_hash=row.content_hash,
                     details={"previous_state": before})
        return version_domain(row, session)


def _set_kill(model: str, environment: str, killed: bool, *, actor: Principal, reason: str | None,
              session: Session, evidence: Mapping[str, Any] | None = None) -> KillState:
    env = check_environment(environment)
    verb = "kill" if killed else "unkill"
    reason = _reason(reason, f"{verb} a policy", required=True)
    with change(session):
        m = model_row(session, model)
        ks = kill_row(session, m, env)
        if (ks is not None and ks.killed == killed) or (ks is None and not killed):
            raise InvalidTransition(f"{model!r} in {env!r} is {'already' if killed else 'not'} killed")
        if ks is None:
            ks = KillSwitch(model_id=m.id, environment=env, killed=killed, reason=reason, changed_by_id=actor.id)
            session.add(ks)
        else:
            ks.killed, ks.reason, ks.changed_by_id, ks.changed_at = killed, reason, actor.id, utcnow()
        session.flush()
        act = active_row(session, m, env)
        h = act.version.content_hash if act else None
        audit.append(session, actor=actor.name, action=f"killswitch.{verb}", model=model,
                     version=act.version.number if act else None, environment=env, reason=reason,
                     before_hash=h, after_hash=h, details={"killed": killed, **({"evidence": dict(evidence)}
                                                                                if evidence else {})})
        session.refresh(ks)
        return get_kill_switch(model, env, session=session)


def kill(model: str, environment: str, *, actor: Principal, reason: str | None, session: Session,
         evidence: Mapping[str, Any] | None = None) -> KillState:
    """Turn the kill switch on: the served policy for (model, env) never exits early, at once.

    ``evidence`` (recorded in the audit event) says what triggered an automatic kill.
    """
    require(actor, "author", "kill a policy")
    return _set_kill(model, environment, True, actor=actor, reason=reason, session=session, evidence=evidence)


def unkill(model: str, environment: str, *, actor: Principal, reason: str | None, session: Session) -> KillState:
    """Turn the kill switch off again."""
    require(actor, "approver", "unkill a policy")
    return _set_kill(model, environment, False, actor=actor, reason=reason, session=session)


__all__ = ["activate", "approve", "create_version", "kill", "retire", "rollback", "unkill"]
