"""Baselines: same rule, same evaluator, expressed as threshold sets (plus the two oracles)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration import baselines as bl
from exitwise.calibration.certify import ALL, Constraint, check_constraints
from exitwise.calibration.evaluate import evaluate_scored, route_scored
from exitwise.calibration.families import shared_threshold_curve
from exitwise.calibration.pipeline import SolveSpec, solve
from exitwise.calibration.rule import CompiledPolicy, first_exit, route
from exitwise.calibration.synthetic import synthetic_logs


def _shared_policy(k: int, c: int, tau: float) -> CompiledPolicy:
    return CompiledPolicy(thresholds=np.full((1, k - 1, c), tau), segment_index={}, forced_classes=np.zeros(c, bool),
                          forced_segments=np.zeros(1, bool), max_exit=k - 1, killed=False,
                          calibrators=({"type": "identity"},) * k, score="max_prob", segment_keys=())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 50), k=st.integers(2, 5))
def test_shared_threshold_curve_is_exact(seed, n, k):
    """The sorted-events risk curve equals routing every candidate threshold through the rule."""
    rng = np.random.default_rng(seed)
    c = 3
    scores = np.round(rng.uniform(0.3, 1.0, size=(n, k)), 2)
    preds = rng.integers(0, c, size=(n, k))
    loss = rng.random((n, k)) < 0.3
    loss[:, -1] = False
    cand, risk = shared_threshold_curve(scores, loss, np.ones(k - 1, dtype=bool))
    assert np.all(np.diff(cand) < 0)
    for t, r in zip(cand, risk, strict=True):
        ex = first_exit(_shared_policy(k, c, t), scores, preds, np.zeros(n, dtype=np.intp)).exit
        assert r == pytest.approx(loss[np.arange(n), ex].mean())


@pytest.fixture(scope="module")
def solved():
    logs = synthetic_logs(20_000, 4, 5, segments={"region": 3}, seed=8)
    sol = solve(logs, SolveSpec(eps=0.02, segment_keys=("region",)))
    chosen = bl.choose_baselines(sol)
    held = bl.evaluation_data(sol)
    return sol, chosen, held, bl.run_baselines(sol, held, chosen)


def test_every_baseline_is_reported(solved):
    _, chosen, _, res = solved
    assert set(chosen) == {"full_depth", "global_threshold", "calm", "per_exit"}
    assert set(res) == set(bl.NAMES)
    full = res["full_depth"].evaluation
    assert full.compute_fraction == 1.0 and full.risk == 0.0
    js = bl.baselines_json(res, "region")
    assert js["global_threshold"]["certified"] is False
    assert {"compute_fraction", "risk", "worst_segment_risk"} <= set(js["calm"])


def test_global_threshold_meets_eps_on_the_choose_split(solved):
    sol, chosen, _, _ = solved
    prep = sol.prepared
    sel = prep.scored.take(prep.splits.choose)
    ev = evaluate_scored(chosen["global_threshold"].policy, sel, "disagreement")
    assert ev.risk <= prep.spec.eps
    assert ev.compute_fraction < 1.0
    tau = chosen["global_threshold"].policy.thresholds
    assert np.unique(tau).size == 1  # one threshold for every exit and class


def test_certified_baselines_pass_their_tests(solved):
    """per-exit passes on the certify split; CALM, run as its authors run it, on every row with raw scores."""
    sol, chosen, held, _res = solved
    prep = sol.prepared
    base = chosen["per_exit"]
    assert base.certified
    exit_at = route_scored(base.policy, held)
    loss = prep.loss[prep.splits.certify][np.arange(held.n), exit_at]
    assert check_constraints(loss, sol.constraints, prep.spec.delta).passed
    calm = chosen["calm"]
    assert calm.certified and all(c == {"type": "identity"} for c in calm.policy.calibrators)
    logs = prep.logs
    every = route(calm.policy, logs.logits, logs.segments["region"].values()).exit
    final = np.argmax(logs.logits[:, -1, :], axis=1)
    answers = np.argmax(logs.logits[np.arange(logs.n), every, :], axis=1)
    every_loss = answers != final
    assert check_constraints(every_loss, [Constraint(ALL, prep.spec.eps, np.arange(logs.n))], prep.spec.delta).passed
    # one step more aggressive on the fixed grid fails: the test stopped where it had to
    assert np.unique(calm.policy.thresholds).size == 1
    per_exit = chosen["per_exit"].policy.thresholds[0]
    for k in range(per_exit.shape[0]):
        row = per_exit[k]
        assert np.all(np.isnan(row)) or np.unique(row).size == 1  # no class structure


def test_oracles(solved):
    sol, _, held, res = solved
    oracle = res["oracle"].evaluation
    assert oracle.risk <= sol.prepared.spec.eps
    ev = evaluate_scored(sol.policy, held, "disagreement")
    assert oracle.compute_fraction <= ev.compute_fraction + 0.02  # fitted on the very data it is scored on
    per_sample = res["per_sample_oracle"].evaluation
    assert per_sample.risk == 0.0
    loss = held.loss_matrix("disagreement")
    ex = per_sample.exit
    assert not loss[np.arange(held.n), ex].any()
    earlier = np.arange(held.n_exits)[None, :] < ex[:, None]
    assert loss[earlier].all()  # every earlier exit would have disagreed
    assert per_sample.compute_fraction < oracle.compute_fraction


def test_baselines_obey_forbidden_segments_classes_and_max_exit():
    logs = synthetic_logs(8_000, 4, 5, segments={"region": 3}, seed=10)
    sol = solve(logs, SolveSpec(eps=0.03, segment_keys=("region",), forbid_segments=("region_1",),
                                forbid_classes=("class2",), max_exit=1))
    held = bl.evaluation_data(sol)
    res = bl.run_baselines(sol, held, bl.choose_baselines(sol))
    seg = held.segments["region"].values() == "region_1"
    for name, r in res.items():
        ex = r.evaluation.exit
        assert (ex[seg] == held.n_exits - 1).all(), name
        assert (ex != 2).all(), name  # max_exit = 1: exit 2 never answers early
        early = ex < held.n_exits - 1
        assert not (held.preds[np.flatnonzero(early), ex[early]] == 2).any(), name
