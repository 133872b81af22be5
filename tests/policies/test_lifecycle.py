"""Lifecycle rules (design contract, "Lifecycle and governance"), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import InputError
from exitwise.policies import audit, lifecycle, store
from exitwise.policies.db import current_generation
from exitwise.policies.errors import DuplicateContent, Forbidden, FourEyesViolation, InvalidTransition, NotFound
from exitwise.policies.schema import DocumentError
from exitwise.policies.settings import GovernanceRules


def _approved(session: Session, actors: Any, make_doc: Any, n: int, model: str = "fashion-cnn") -> list[int]:
    out = []
    for i in range(n):
        v = lifecycle.create_version(make_doc(model=model, variant=i), author=actors.author, session=session)
        lifecycle.approve(model, v.number, approver=actors.approver, reason="reviewed", session=session)
        out.append(v.number)
    return out


def test_create_numbers_versions_per_model_and_records_headline(session: Session, actors: Any, make_doc: Any) -> None:
    v1 = lifecycle.create_version(make_doc(), author=actors.author, session=session)
    v2 = lifecycle.create_version(make_doc(variant=1, parent=1), author=actors.author, session=session)
    other = lifecycle.create_version(make_doc(model="other"), author=actors.author, session=session)
    assert (v1.number, v2.number, other.number) == (1, 2, 1)
    assert v1.state == "draft" and v1.author == "alice" and v2.parent == 1 and v1.parent is None
    assert v1.compute_fraction == pytest.approx(0.61) and v1.eps == 0.02 and v1.certified is True
    assert v1.risk_type == "disagreement" and v1.data_fingerprint == "sha256:" + "ab" * 32
    assert v1.document == make_doc() and v1.content_hash == make_doc()["content_hash"]
    assert [v.number for v in store.list_versions("fashion-cnn", session=session)] == [1, 2]


def test_governance_fields_are_dropped_and_hash_checked(session: Session, actors: Any, make_doc: Any) -> None:
    doc = dict(make_doc(), version=7, state="active", killed=True)
    v = lifecycle.create_version(doc, author=actors.author, session=session)
    assert v.number == 1 and "state" not in v.document and v.document == make_doc()
    bad = dict(make_doc(variant=1), content_hash="0" * 64)
    with pytest.raises(DocumentError, match="content_hash"):
        lifecycle.create_version(bad, author=actors.author, session=session)


def test_duplicate_content_is_refused_with_the_existing_number(session: Session, actors: Any, make_doc: Any) -> None:
    lifecycle.create_version(make_doc(), author=actors.author, session=session)
    with pytest.raises(DuplicateContent) as err:
        lifecycle.create_version(make_doc(), author=actors.approver, session=session)
    assert err.value.existing == 1 and err.value.http_status == 409


def test_unknown_parent_is_an_input_error(session: Session, actors: Any, make_doc: Any) -> None:
    with pytest.raises(DocumentError, match="parent"):
        lifecycle.create_version(make_doc(parent=3), author=actors.author, session=session)


def test_roles_are_enforced(session: Session, actors: Any, make_doc: Any) -> None:
    with pytest.raises(Forbidden):
        lifecycle.create_version(make_doc(), author=actors.reader, session=session)
    lifecycle.create_version(make_doc(), author=actors.author, session=session)
    with pytest.raises(Forbidden, match="approver"):
        lifecycle.approve("fashion-cnn", 1, approver=actors.author, reason="me", session=session)


def test_four_eyes(session: Session, actors: Any, make_doc: Any) -> None:
    lifecycle.create_version(make_doc(), author=actors.approver, session=session)
    with pytest.raises(FourEyesViolation, match="four-eyes") as err:
        lifecycle.approve("fashion-cnn", 1, approver=actors.approver, reason="mine", session=session)
    assert err.value.http_status == 403
    with pytest.raises(FourEyesViolation):  # admins do not escape it either
        lifecycle.create_version(make_doc(variant=1), author=actors.admin, session=session)
        lifecycle.approve("fashion-cnn", 2, approver=actors.admin, reason="mine", session=session)
    v = lifecycle.approve("fashion-cnn", 1, approver=actors.approver2, reason="ok", session=session)
    assert v.state == "approved" and [a.approver for a in v.approvals] == ["carol"]
    with pytest.raises(InvalidTransition, match="only drafts"):
        lifecycle.approve("fashion-cnn", 1, approver=actors.approver2, reason="again", session=session)


def test_activation_supersedes_and_rollback_restores(session: Session, actors: Any, make_doc: Any) -> None:
    _approved(session, actors, make_doc, 3)
    a1 = lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)
    assert (a1.version, a1.killed) == (1, False)
    lifecycle.activate("fashion-cnn", 2, "production", actor=actors.approver, reason="r", session=session)
    lifecycle.activate("fashion-cnn", 3, "staging", actor=actors.approver, reason="r", session=session)
    states = {v.number: (v.state, v.active_in) for v in store.list_versions("fashion-cnn", session=session)}
    assert states == {1: ("superseded", ()), 2: ("active", ("production",)), 3: ("active", ("staging",))}
    back = lifecycle.rollback("fashion-cnn", "production", actor=actors.approver, session=session)
    assert back.version == 1
    assert store.get_version("fashion-cnn", 2, session=session).state == "superseded"
    again = lifecycle.rollback("fashion-cnn", "production", actor=actors.approver, to=2, reason="fwd",
                               session=session)
    assert again.version == 2
    with pytest.raises(InvalidTransition, match="already active"):
        lifecycle.rollback("fashion-cnn", "production", actor=actors.approver, to=2, session=session)
    with pytest.raises(InvalidTransition, match="no earlier version"):
        lifecycle.rollback("fashion-cnn", "staging", actor=actors.approver, session=session)
    hist = store.list_activations("fashion-cnn", "production", session=session)
    assert [(h.version, h.active) for h in hist] == [(2, True), (1, False), (2, False), (1, False)]


def test_activation_refusals(session: Session, actors: Any, make_doc: Any) -> None:
    lifecycle.create_version(make_doc(), author=actors.author, session=session)
    with pytest.raises(InvalidTransition, match="draft"):
        lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)
    lifecycle.approve("fashion-cnn", 1, approver=actors.approver, reason="ok", session=session)
    with pytest.raises(InputError, match="reason"):
        lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason=" ", session=session)
    with pytest.raises(InputError, match="environment"):
        lifecycle.activate("fashion-cnn", 1, "Prod uction", actor=actors.approver, reason="r", session=session)
    with pytest.raises(Forbidden):
        lifecycle.activate("fashion-cnn", 1, "production", actor=actors.author, reason="r", session=session)
    with pytest.raises(NotFound):
        lifecycle.activate("fashion-cnn", 9, "production", actor=actors.approver, reason="r", session=session)
    with pytest.raises(NotFound):
        lifecycle.activate("nope", 1, "production", actor=actors.approver, reason="r", session=session)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)
    with pytest.raises(InvalidTransition, match="already active"):
        lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)


def test_staging_before_production_rule(session: Session, actors: Any, make_doc: Any) -> None:
    _approved(session, actors, make_doc, 1)
    rules = GovernanceRules(require_staging_before_production=True)
    with pytest.raises(InvalidTransition, match="staging"):
        lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session,
                           rules=rules)
    lifecycle.activate("fashion-cnn", 1, "staging", actor=actors.approver, reason="r", session=session, rules=rules)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session,
                       rules=rules)
    assert store.get_active("fashion-cnn", "production", session=session).version == 1


def test_retire(session: Session, actors: Any, make_doc: Any) -> None:
    _approved(session, actors, make_doc, 2)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)
    with pytest.raises(InvalidTransition, match="active in production"):
        lifecycle.retire("fashion-cnn", 1, actor=actors.approver, session=session)
    v = lifecycle.retire("fashion-cnn", 2, actor=actors.approver, reason="obsolete", session=session)
    assert v.state == "retired"
    with pytest.raises(InvalidTransition, match="retired"):
        lifecycle.activate("fashion-cnn", 2, "production", actor=actors.approver, reason="r", session=session)
    with pytest.raises(InvalidTransition, match="already retired"):
        lifecycle.retire("fashion-cnn", 2, actor=actors.approver, session=session)
    lifecycle.create_version(make_doc(variant=5), author=actors.author, session=session)
    assert lifecycle.retire("fashion-cnn", 3, actor=actors.approver, session=session).state == "retired"
    with pytest.raises(InvalidTransition):
        lifecycle.approve("fashion-cnn", 3, approver=actors.approver, reason="late", session=session)


def test_kill_switch(session: Session, actors: Any, make_doc: Any) -> None:
    _approved(session, actors, make_doc, 1)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)
    with pytest.raises(InvalidTransition, match="not killed"):
        lifecycle.unkill("fashion-cnn", "production", actor=actors.approver, reason="r", session=session)
    ks = lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="incident 42", session=session)
    assert ks.killed and ks.reason == "incident 42" and ks.changed_by == "alice"
    active = store.get_active("fashion-cnn", "production", session=session)
    assert active.killed and active.served_document()["killed"] is True
    with pytest.raises(InvalidTransition, match="already killed"):
        lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="again", session=session)
    with pytest.raises(Forbidden):
        lifecycle.unkill("fashion-cnn", "production", actor=actors.author, reason="r", session=session)
    assert not lifecycle.unkill("fashion-cnn", "production", actor=actors.approver, reason="fixed",
                                session=session).killed
    assert not store.get_active("fashion-cnn", "production", session=session).killed
    # a kill switch works before anything is active, too
    assert lifecycle.kill("fashion-cnn", "staging", actor=actors.author, reason="pre", session=session).killed
    with pytest.raises(NotFound):
        store.get_active("fashion-cnn", "staging", session=session)


def test_every_change_writes_one_event_and_bumps_the_generation(session: Session, actors: Any,
                                                                make_doc: Any) -> None:
    g0, n0 = current_generation(session), len(audit.log(session=session, limit=None))
    _approved(session, actors, make_doc, 2)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="go", session=session)
    lifecycle.activate("fashion-cnn", 2, "production", actor=actors.approver, reason="go", session=session)
    lifecycle.rollback("fashion-cnn", "production", actor=actors.approver, session=session)
    lifecycle.kill("fashion-cnn", "production", actor=actors.author, reason="k", session=session)
    events = audit.log(session=session, limit=None)
    assert len(events) - n0 == 8 and current_generation(session) - g0 == 8
    last = events[0]
    assert (last.action, last.actor, last.model, last.environment, last.version) == (
        "killswitch.kill", "alice", "fashion-cnn", "production", 1)
    act = next(e for e in events if e.action == "version.activate" and e.version == 2)
    v1, v2 = (store.get_version("fashion-cnn", n, session=session) for n in (1, 2))
    assert (act.before_hash, act.after_hash, act.details) == (v1.content_hash, v2.content_hash, {"superseded": 1})
    assert audit.verify(session=session).ok


def test_served_document_keeps_the_content_hash(session: Session, actors: Any, make_doc: Any) -> None:
    from exitwise.policies.canonical import verify_content_hash
    from exitwise.policies.schema import validate_document

    _approved(session, actors, make_doc, 1)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="r", session=session)
    served = store.get_active("fashion-cnn", "production", session=session).served_document()
    assert verify_content_hash(served) and served["version"] == 1 and served["environment"] == "production"
    validate_document(served)
    full = store.get_version("fashion-cnn", 1, session=session).served_document()
    assert verify_content_hash(full) and full["approvals"][0]["by"] == "bob"


def test_diff_versions(session: Session, actors: Any, make_doc: Any) -> None:
    lifecycle.create_version(make_doc(), author=actors.author, session=session)
    doc2 = make_doc(variant=10, parent=1, guarantee={**make_doc()["guarantee"], "eps": 0.03})
    lifecycle.create_version(doc2, author=actors.author, session=session)
    v = store.diff_versions("fashion-cnn", 1, 2, session=session)
    assert (v.model, v.a, v.b) == ("fashion-cnn", 1, 2)
    d = v.diff
    assert not d.identical and set(d.changed_fields) == {"thresholds", "guarantee", "expected", "parent"}
    assert d.guarantee["eps"] == (0.02, 0.03)
    assert d.expected["compute_fraction"] == (pytest.approx(0.61), pytest.approx(0.62))
    first = d.thresholds[0]
    assert (first.segment, first.exit, first.exit_name, first.class_) == ("default", 0, "stage1", "T-shirt")
    assert first.before == pytest.approx(0.9) and first.after == pytest.approx(0.91)
    assert {t.segment for t in d.thresholds} == {"default", "studio"}  # "phone" is null in both
    assert all(t.class_ != "Trouser" or t.exit != 1 for t in d.thresholds)  # null cell in both
    same = store.diff_versions("fashion-cnn", 1, 1, session=session).diff
    assert same.identical and not same.thresholds and not same.changed_fields


def test_list_models(session: Session, actors: Any, make_doc: Any) -> None:
    _approved(session, actors, make_doc, 2)
    lifecycle.activate("fashion-cnn", 2, "production", actor=actors.approver, reason="r", session=session)
    lifecycle.kill("fashion-cnn", "staging", actor=actors.author, reason="r", session=session)
    (m,) = store.list_models(session=session)
    assert (m.name, m.versions, m.latest, m.active, m.killed) == ("fashion-cnn", 2, 2, {"production": 2}, ("staging",))
