"""Re-verifying a certificate from its evidence: genuine, forged, unreachable, and what approval records."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from exitwise.api.app import create_app
from exitwise.api.settings import ApiSettings
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.pipeline import SolveSpec
from exitwise.policies import lifecycle
from exitwise.policies.authoring import solve_policy
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.errors import CertificateMismatch
from exitwise.policies.models import Approval
from exitwise.policies.reverify import reverify, reverify_version

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "digits"


@pytest.fixture(scope="module")
def evidence_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evidence")
    for name in ("logs.parquet", "card.json"):
        shutil.copyfile(FIXTURE / name, root / name)
    return root


@pytest.fixture(scope="module")
def solved(evidence_dir: Path) -> dict[str, Any]:
    """A real solve of the digits logs with a per-segment budget, evidence recorded as ``exitwise solve`` does."""
    logs = load_logs(evidence_dir / "logs.parquet", load_card(evidence_dir / "card.json"))
    level = str(sorted(set(logs.segments["ink"].levels))[0])
    spec = SolveSpec(risk="disagreement", eps=0.05, delta=0.1, segment_keys=("ink",), segment_budgets=((level, 0.1),))
    doc = solve_policy(logs, spec, baselines=(), evidence={"logs": str(evidence_dir / "logs.parquet"),
                                                          "card": str(evidence_dir / "card.json")}).document
    assert doc["guarantee"]["certified"] and level in doc["guarantee"]["segments"]
    return doc


def _forged(doc: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = copy.deepcopy({k: v for k, v in doc.items() if k != "content_hash"})
    edit(body)
    return with_content_hash(body)


def test_a_genuine_certificate_is_reverified(solved: dict[str, Any]) -> None:
    result = reverify(solved)
    assert result.status == "reverified", result.detail
    claimed = solved["guarantee"]["segments"]
    assert set(result.constraints) == {k for k, v in claimed.items() if v["certified"]}
    for name, got in result.constraints.items():
        assert got["n"] == claimed[name]["n"] and got["upper_bound"] == pytest.approx(claimed[name]["upper_bound"])
        assert got["upper_bound"] <= got["eps"]


def test_forged_certificates_fail(solved: dict[str, Any]) -> None:
    def always_first_exit(doc: dict[str, Any]) -> None:  # exit everything at the first exit, claim certified
        for table in doc["thresholds"].values():
            if table is not None:
                table[0] = [0.0] * len(doc["classes"])

    def tighter_bound(doc: dict[str, Any]) -> None:
        doc["guarantee"]["segments"]["__all__"]["upper_bound"] = 0.001

    def fewer_rows_claimed(doc: dict[str, Any]) -> None:
        doc["guarantee"]["segments"]["__all__"]["n"] = 10

    for edit, needle in ((always_first_exit, "do not certify"), (tighter_bound, "claims an upper bound"),
                         (fewer_rows_claimed, "claims 10 certify rows")):
        result = reverify(_forged(solved, edit))
        assert result.status == "failed" and needle in result.detail, (edit.__name__, result)


def test_unreachable_or_changed_evidence_is_not_reverified(solved: dict[str, Any], evidence_dir: Path,
                                                          tmp_path: Path) -> None:
    def moved(to: str) -> Callable[[dict[str, Any]], None]:
        return lambda doc: doc["data"]["evidence"].update(logs=to)

    changed = tmp_path / "changed.parquet"
    logs = load_logs(evidence_dir / "logs.parquet", load_card(evidence_dir / "card.json"))
    logs.logits[0, 0, 0] += 1.0  # one logit of one row: another data set
    write_logs(logs, changed)
    cases = {
        "s3://bucket/logs.parquet": "s3:// location", "relative/logs.parquet": "not absolute",
        str(tmp_path / "gone.parquet"): "not reachable", str(changed): "no longer matches",
    }
    for location, needle in cases.items():
        result = reverify(_forged(solved, moved(location)))
        assert result.status == "not_reverified" and needle in result.detail, (location, result)
    no_evidence = _forged(solved, lambda doc: doc["data"].pop("evidence"))
    assert reverify(no_evidence).status == "not_reverified"
    outside = reverify(solved, roots=[tmp_path])
    assert outside.status == "not_reverified" and "outside the directories" in outside.detail
    assert reverify(solved, roots=[evidence_dir]).status == "reverified"


def test_approval_records_what_the_approver_saw(fresh_engine: Engine, make_actors: Callable[..., Any],
                                                solved: dict[str, Any]) -> None:
    forged = _forged(solved, lambda doc: doc["guarantee"]["segments"]["__all__"].update(upper_bound=0.001))
    with unit_of_work(fresh_engine) as s:
        actors = make_actors(s)
        for doc in (solved, forged):
            lifecycle.create_version(doc, author=actors.author, session=s)
    model = solved["model"]["name"]
    failed = reverify_version(fresh_engine, model, 2, roots=None)
    with unit_of_work(fresh_engine) as s, pytest.raises(CertificateMismatch, match="claims an upper bound"):
        lifecycle.approve(model, 2, approver=actors.approver, reason="ok", session=s, verification=failed)
    with unit_of_work(fresh_engine) as s:
        assert s.scalar(select(func.count()).select_from(Approval)) == 0
        v = lifecycle.approve(model, 1, approver=actors.approver, reason="ok", session=s,
                              verification=reverify_version(fresh_engine, model, 1, roots=None))
        assert v.approvals[0].certificate == "reverified"


def test_api_reverifies_only_under_its_evidence_roots(fresh_engine: Engine, fresh_url: str, tmp_path: Path,
                                                      make_actors: Callable[..., Any], solved: dict[str, Any],
                                                      evidence_dir: Path) -> None:
    forged = _forged(solved, lambda doc: doc["guarantee"].update(eps=0.04))
    other_root = _forged(solved, lambda doc: doc["guarantee"].update(delta=0.09))
    with unit_of_work(fresh_engine) as s:
        actors = make_actors(s)
        for doc in (solved, forged, other_root):
            lifecycle.create_version(doc, author=actors.author, session=s)
    model = solved["model"]["name"]
    bob = {"Authorization": f"Bearer {actors.token(actors.approver)}"}
    settings = ApiSettings(database_url=fresh_url, data_dir=tmp_path, store_hooks=False,
                           evidence_roots=str(evidence_dir))
    with TestClient(create_app(settings, engine=fresh_engine)) as client:
        ok = client.post(f"/v1/models/{model}/versions/1/approve", json={"reason": "ok"}, headers=bob)
        assert ok.status_code == 200, ok.text
        assert ok.json()["approvals"][0]["certificate"] == "reverified"
        refused = client.post(f"/v1/models/{model}/versions/2/approve", json={"reason": "ok"}, headers=bob)
        assert refused.status_code == 409 and "does not hold" in refused.json()["detail"]
        assert client.get(f"/v1/models/{model}/versions/2", headers=bob).json()["state"] == "draft"
        anonymous = client.post(f"/v1/models/{model}/versions/3/approve", json={"reason": "ok"})
        assert anonymous.status_code == 401
    closed = ApiSettings(database_url=fresh_url, data_dir=tmp_path, store_hooks=False)
    with TestClient(create_app(closed, engine=fresh_engine)) as client:
        claimed = client.post(f"/v1/models/{model}/versions/3/approve", json={"reason": "ok"}, headers=bob)
        assert claimed.status_code == 200, claimed.text
        approval = claimed.json()["approvals"][0]
        assert approval["certificate"] == "not_reverified" and "EXITWISE_EVIDENCE_ROOTS" in approval[
            "certificate_detail"]
