"""The solve pipeline end to end: per-segment budgets, operator constraints, uncertifiable segments, input checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exitwise.calibration import baselines as bl
from exitwise.calibration.evaluate import evaluate_scored
from exitwise.calibration.exceptions import CardError, InputError
from exitwise.calibration.logs import ExitSpec, ModelCard
from exitwise.calibration.pipeline import SolveSpec, parse_budgets, prepare, solve
from exitwise.calibration.synthetic import synthetic_logs


@pytest.fixture(scope="module")
def segmented():
    return synthetic_logs(30_000, 4, 6, segments={"region": 4}, seed=11)


@pytest.fixture(scope="module")
def fresh():
    return synthetic_logs(60_000, 4, 6, segments={"region": 4}, seed=12)


def test_per_segment_budgets_hold_where_a_global_threshold_breaks_the_hard_segment(segmented, fresh):
    eps = 0.01
    spec = SolveSpec(eps=0.02, delta=0.05, segment_keys=("region",), segment_budgets=parse_budgets([f"*={eps}"]))
    sol = solve(segmented, spec)
    assert sol.certified
    held = bl.evaluation_data(sol, fresh)
    ev = evaluate_scored(sol.policy, held, "disagreement")
    for value, stats in ev.segments["region"].items():
        assert stats.risk <= eps, (value, stats)
    # one global max-prob threshold at the same overall budget (1%) lets the hard segment exceed it
    glob_spec = SolveSpec(eps=eps, delta=0.05)
    glob = solve(segmented, glob_spec)
    chosen = bl.choose_baselines(glob, names=("global_threshold",))
    res = bl.run_baselines(glob, bl.evaluation_data(glob, fresh), chosen, test_logs=fresh,
                           names=("global_threshold",))
    seg = res["global_threshold"].evaluation.segments["region"]
    hard = max(seg, key=lambda v: seg[v].risk)
    assert hard == "region_3" and seg[hard].risk > eps
    assert res["global_threshold"].evaluation.risk <= 1.5 * eps


def test_forbidden_classes_and_segments_and_max_exit_are_respected(segmented):
    spec = SolveSpec(eps=0.05, segment_keys=("region",), forbid_classes=("class1",),
                     forbid_segments=("region_2",), max_exit=1)
    sol = solve(segmented, spec)
    assert sol.certified
    tau = sol.tau
    assert np.isnan(tau[:, :, 1]).all()
    assert np.isnan(tau[2]).all()
    assert np.isnan(tau[:, 2:, :]).all()
    held = bl.evaluation_data(sol)
    ev = evaluate_scored(sol.policy, held, "disagreement")
    assert ev.segments["region"]["region_2"].compute_fraction == pytest.approx(1.0)
    assert ev.exit_rate[2] == 0.0


def test_uncertifiable_segment_runs_at_full_depth_and_is_flagged(segmented):
    # 8 rows of region_3 would be needed... take a sample where region_3 is tiny
    small = segmented.take(np.flatnonzero((segmented.segments["region"].codes != 3) |
                                          (np.arange(segmented.n) % 50 == 0)))
    spec = SolveSpec(eps=0.02, segment_keys=("region",), segment_budgets=parse_budgets(["*=0.01"]))
    sol = solve(small, spec)
    assert "region_3" in sol.uncertified
    s3 = sol.prepared.seg_levels.index("region_3")
    assert sol.forced_segments[s3] and np.isnan(sol.tau[s3]).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eps": 0.0}, "eps must be in"),
        ({"eps": 1.0}, "eps must be in"),
        ({"delta": 1.5}, "delta must be in"),
        ({"segment_keys": ("nope",)}, "unknown segment column 'nope'"),
        ({"segment_keys": ("region",), "segment_budgets": (("atlantis", 0.01),)}, "no rows have segment value"),
        ({"segment_budgets": (("region_0", 0.01),)}, "needs --segment-key"),
        ({"forbid_classes": ("unicorn",)}, "not a class of the model"),
        ({"max_exit": 9}, "out of range"),
        ({"score": "vibes"}, "unknown score"),
        ({"risk": "accuracy"}, "unknown risk"),
    ],
)
def test_bad_input_is_refused_before_any_work(change, message):
    logs = synthetic_logs(500, 3, 4, seed=1)
    with pytest.raises(InputError, match=message):
        prepare(logs, dataclasses.replace(SolveSpec(), **change))


def test_induced_error_needs_labels_and_costs_must_increase():
    logs = synthetic_logs(500, 3, 4, seed=1)
    with pytest.raises(InputError, match="needs labels"):
        prepare(dataclasses.replace(logs, labels=None), SolveSpec(risk="induced_error"))
    with pytest.raises(InputError, match="SEGMENT=EPS"):
        parse_budgets(["0.01"])
    with pytest.raises(CardError, match="strictly increase"):
        ModelCard(model="m", exits=(ExitSpec("a", 2.0), ExitSpec("b", 1.0)))
