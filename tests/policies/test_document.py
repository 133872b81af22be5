"""The policy document built from a solved policy: schema, hash, determinism, thresholds, atomic files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from exitwise.calibration import baselines as bl
from exitwise.calibration.evaluate import evaluate, evaluate_scored
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.pipeline import SolveSpec, parse_budgets, solve
from exitwise.calibration.rule import CompiledPolicy, route
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies.canonical import canonical_json, verify_content_hash
from exitwise.policies.document import build_document, calibration_section, data_section
from exitwise.policies.document_files import read_document, write_document
from exitwise.policies.schema import validate_document


@pytest.fixture(scope="module")
def logs():
    return synthetic_logs(8000, 3, 4, segments={"region": 3}, seed=9)


def _build(logs, spec):
    sol = solve(logs, spec)
    held = bl.evaluation_data(sol)
    expected = evaluate_scored(sol.policy, held, spec.risk)
    res = bl.run_baselines(sol, held, bl.choose_baselines(sol))
    doc = build_document(sol, expected=expected, baselines=bl.baselines_json(res, "region"),
                         calibration=calibration_section(logs, sol.prepared.calibrators, sol.prepared.splits.certify,
                                                         "final"),
                         data=data_section(logs, sol.prepared.splits))
    return sol, expected, doc


@pytest.fixture(scope="module")
def built(logs):
    spec = SolveSpec(eps=0.03, segment_keys=("region",), segment_budgets=parse_budgets(["region_2=0.04"]),
                     forbid_classes=("class3",), seed=4)
    return _build(logs, spec)


def test_document_is_valid_hashed_and_complete(built):
    sol, expected, doc = built
    validate_document(doc)
    assert verify_content_hash(doc)
    g = doc["guarantee"]
    assert g["certified"] and g["risk"] == "disagreement" and g["eps"] == 0.03 and g["delta"] == 0.05
    assert g["method"].startswith("learn-then-test")
    assert g["n"] == g["split"]["certify"] == int(sol.prepared.splits.certify.size)
    assert g["segments"]["__all__"]["upper_bound"] <= 0.03 and g["segments"]["region_2"]["eps"] == 0.04
    assert doc["forced_full_depth"]["classes"] == ["class3"]
    e = doc["expected"]
    assert e["compute_fraction"] == pytest.approx(expected.compute_fraction)
    assert len(e["exit_rate"]) == 3 and set(e["batch_compute_fraction"]) == {"1", "8", "32"}
    assert set(e["segments"]) == {"region_0", "region_1", "region_2"}
    assert {"full_depth", "global_threshold", "calm", "per_exit"} <= set(e["baselines"])
    assert all({"compute_fraction", "risk", "eps"} <= set(p) for p in e["curve"])
    assert [x["name"] for x in doc["calibration"]["exits"]] == ["stage1", "stage2", "stage3"]
    assert doc["data"]["rows"]["total"] == 8000 and doc["data"]["fingerprint"].startswith("sha256:")
    assert doc["exits"][0]["calibrator"]["type"] == "temperature"


def test_thresholds_round_trip_through_json_exactly(built, logs):
    sol, _, doc = built
    reparsed = json.loads(json.dumps(doc))
    pol = CompiledPolicy.from_document(reparsed)
    seg = logs.segment_values(["region"])
    assert np.array_equal(route(pol, logs.logits, seg).exit, route(sol.policy, logs.logits, seg).exit)
    for _value, rows in doc["thresholds"].items():
        if rows is None:
            continue
        for row in rows:
            assert row is None or all(v is None or isinstance(v, float) for v in row)
            if row is not None:
                assert row[3] is None  # the forbidden class never has a threshold
    assert evaluate(reparsed, logs).compute_fraction <= 1.0


def test_building_twice_gives_the_same_bytes(logs, built):
    _, _, doc = built
    spec = SolveSpec(eps=0.03, segment_keys=("region",), segment_budgets=parse_budgets(["region_2=0.04"]),
                     forbid_classes=("class3",), seed=4)
    _, _, again = _build(logs, spec)
    assert canonical_json(again) == canonical_json(doc)


def test_uncertified_segments_and_full_depth_fallback(logs):
    keep = np.flatnonzero((logs.segments["region"].codes != 2) | (np.arange(logs.n) % 40 == 0))
    small = logs.take(keep)
    spec = SolveSpec(eps=0.03, segment_keys=("region",), segment_budgets=parse_budgets(["*=0.02"]))
    _sol, _, doc = _build(small, spec)
    assert doc["guarantee"]["uncertified_segments"] == ["region_2"]
    assert doc["thresholds"]["region_2"] is None and "region_2" in doc["forced_full_depth"]["segments"]
    assert doc["guarantee"]["segments"]["region_2"]["certified"] is False
    assert doc["expected"]["segments"]["region_2"]["compute_fraction"] == 1.0
    # a budget nothing can meet: no candidate passes, the policy runs at full depth, flagged
    hard = SolveSpec(eps=0.0005, delta=0.05)
    _, _, none = _build(logs, hard)
    assert none["guarantee"]["certified"] is False
    assert none["thresholds"]["default"] is None and none["expected"]["compute_fraction"] == 1.0
    validate_document(none)


def test_write_is_atomic_and_read_validates(built, tmp_path):
    _, _, doc = built
    path = write_document(doc, tmp_path / "sub" / "policy.json")
    assert os.listdir(tmp_path / "sub") == ["policy.json"]
    assert read_document(path) == doc
    tampered = dict(doc, shadow_rate=0.5)
    (tmp_path / "bad.json").write_text(json.dumps(tampered))
    with pytest.raises(InputError, match="content_hash"):
        read_document(tmp_path / "bad.json")
    with pytest.raises(InputError, match="no such file"):
        read_document(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        write_document({"x": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "sub"]
