"""Authoring use cases: solve_policy (document, held-out comparison) and evaluate_policy (a saved policy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exitwise.calibration import baselines as bl
from exitwise.calibration.evaluate import evaluate_scored
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitSpec
from exitwise.calibration.pipeline import SolveSpec, solve
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies.authoring import evaluate_policy, solve_policy
from exitwise.policies.canonical import verify_content_hash
from exitwise.policies.schema import validate_document

SPEC = SolveSpec(eps=0.03, segment_keys=("region",))


@pytest.fixture(scope="module")
def cal():
    return synthetic_logs(6000, n_exits=3, n_classes=4, segments={"region": 3}, seed=1)


@pytest.fixture(scope="module")
def test_logs():
    return synthetic_logs(3000, n_exits=3, n_classes=4, segments={"region": 3}, seed=2)


@pytest.fixture(scope="module")
def outcome(cal, test_logs):
    return solve_policy(cal, SPEC, test_logs=test_logs)


def test_solve_policy_documents_the_certify_split_and_compares_on_the_test_logs(outcome, test_logs):
    doc = outcome.document
    validate_document(doc)
    assert verify_content_hash(doc) and doc["guarantee"]["certified"]
    assert set(doc["expected"]["baselines"]) == set(bl.NAMES)  # every baseline of the registry
    assert doc["expected"]["compute_fraction"] == pytest.approx(outcome.certify.solver.compute_fraction)
    assert outcome.certify.evaluated_on.startswith("certify split")
    assert outcome.held_out.evaluated_on == f"test logs {test_logs.source} ({test_logs.n} rows)"
    assert set(outcome.held_out.baselines) == set(bl.NAMES)
    assert outcome.segment_column == "region"


def test_solve_policy_gives_what_the_pipeline_and_the_baselines_give_on_their_own(cal, test_logs, outcome):
    """The use case assembles the same steps as calling them one by one (nothing changes the numbers)."""
    sol = solve(cal, SPEC)
    np.testing.assert_array_equal(sol.tau, outcome.solution.tau)
    held = evaluate_scored(sol.policy, bl.evaluation_data(sol, test_logs), SPEC.risk)
    assert held.to_json() == outcome.held_out.solver.to_json()
    runs = bl.run_baselines(sol, bl.evaluation_data(sol, test_logs), bl.choose_baselines(sol), test_logs=test_logs)
    assert {k: v.to_json("region") for k, v in runs.items()} == {
        k: v.to_json("region") for k, v in outcome.held_out.baselines.items()}


def test_without_test_logs_or_baselines(cal):
    out = solve_policy(cal, SPEC, baselines=())
    assert out.held_out is out.certify and out.held_out.baselines == {}
    assert out.document["expected"]["baselines"] == {}
    only = solve_policy(cal, SPEC, baselines=("full_depth", "per_sample_oracle"))
    assert set(only.held_out.baselines) == {"full_depth", "per_sample_oracle"}
    with pytest.raises(InputError, match="unknown baseline 'magic'; baselines are calm, per_exit"):
        solve_policy(cal, SPEC, baselines=("magic",))


def test_test_logs_of_another_shape_are_refused(cal):
    other = synthetic_logs(500, n_exits=4, n_classes=4, segments={"region": 3}, seed=3)
    with pytest.raises(InputError, match="test logs have 4 exits and 4 classes, the calibration logs 3 and 4"):
        solve_policy(cal, SPEC, test_logs=other)


def test_evaluate_policy_applies_a_saved_policy(outcome, test_logs):
    ev = evaluate_policy(outcome.document, test_logs)
    assert ev.risk_type == SPEC.risk
    assert ev.delta == SPEC.delta  # the intervals' confidence is the guarantee's
    assert ev.with_delta(None).to_json() == outcome.held_out.solver.to_json()
    renamed = dataclasses.replace(test_logs.card, exits=tuple(
        ExitSpec(f"other{k}", e.cost) for k, e in enumerate(test_logs.card.exits)))
    with pytest.raises(InputError, match=r"the card's exits .* differ from the policy's"):
        evaluate_policy(outcome.document, dataclasses.replace(test_logs, card=renamed))
