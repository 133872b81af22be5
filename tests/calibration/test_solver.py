"""The threshold solver: exact sweeps, monotone coordinate descent, shrinkage, per-segment budgets, input checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitwise.calibration import baselines as bl
from exitwise.calibration.evaluate import evaluate_scored
from exitwise.calibration.exceptions import CardError, InputError
from exitwise.calibration.logs import ExitSpec, ModelCard
from exitwise.calibration.solver import (
    SegmentSolver,
    SolverSettings,
    SolveSpec,
    _exit_index,
    _sweep,
    make_splits,
    parse_budgets,
    prepare,
    solve,
)
from exitwise.calibration.synthetic import synthetic_logs


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 40), c=st.integers(1, 4), levels=st.integers(2, 6))
def test_sweep_finds_the_best_cut_of_every_cell(seed, m, c, levels):
    """Brute force over every threshold (between distinct scores) of every class cell."""
    rng = np.random.default_rng(seed)
    score = rng.integers(0, levels, size=m) / levels  # many ties
    pred = rng.integers(0, c, size=m)
    d = rng.normal(size=m)
    st_ = SolverSettings(min_cell=1, min_pool=1)
    ix = _exit_index(score, pred, c, np.zeros(c, dtype=bool), st_)
    tau = _sweep(ix, d)
    for cls in range(c):
        members = pred == cls
        if not members.any():
            assert ix.cell_group[cls] == -1 or np.isnan(tau[ix.cell_group[cls]])
            continue
        g = ix.cell_group[cls]
        candidates = [np.inf, *sorted(set(score[members].tolist()))]
        best = min(d[members & (score >= t)].sum() for t in candidates)
        got = tau[g]
        value = 0.0 if np.isnan(got) else d[members & (score >= got)].sum()
        assert value == pytest.approx(min(best, 0.0), abs=1e-9)
        if not np.isnan(got):
            assert value < 0


def _objective(sv: SegmentSolver, lam: float, tau: np.ndarray) -> float:
    first = sv._first_exit(sv._masks(tau))
    rows = np.arange(sv.m)
    return float(sv.costs[first].sum() + lam * sv.loss[np.minimum(first, sv.k_total - 2), rows][
        first < sv.k_total - 1].sum())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), lam=st.floats(0.05, 50.0), smooth=st.booleans())
def test_coordinate_passes_never_increase_the_objective(seed, lam, smooth):
    rng = np.random.default_rng(seed)
    m, k, c = 300, 4, 3
    scores = rng.uniform(0.3, 1.0, size=(m, k))
    preds = rng.integers(0, c, size=(m, k))
    loss = rng.random((m, k)) < (1.2 - scores) * 0.5
    loss[:, -1] = False
    costs = np.array([0.2, 0.45, 0.7, 1.0])
    st_ = SolverSettings(min_cell=20, min_pool=5, passes=1, smoothing="model" if smooth else "raw",
                         smooth_window=10 if smooth else 0)
    sv = SegmentSolver(scores, preds, loss, costs, c, np.ones(k - 1, dtype=bool), np.zeros(c, dtype=bool), st_)
    start = np.where(rng.random((k - 1, c)) < 0.3, np.nan, rng.uniform(0.3, 1.0, size=(k - 1, c)))
    before = _objective(sv, lam, start)
    tau1, _ = sv.descend(lam, start, 1)
    after1 = _objective(sv, lam, tau1)
    tau2, _ = sv.descend(lam, tau1, 1)
    after2 = _objective(sv, lam, tau2)
    assert after1 <= before + 1e-9
    assert after2 <= after1 + 1e-9


def test_sparse_cells_share_their_segment_pool_threshold():
    rng = np.random.default_rng(0)
    m, c = 2000, 6
    scores = rng.uniform(0.2, 1.0, size=(m, 2))
    # classes 0-2 are common, 3-5 rare (a handful of samples each)
    preds = np.where(rng.random((m, 2)) < 0.97, rng.integers(0, 3, size=(m, 2)), rng.integers(3, 6, size=(m, 2)))
    loss = rng.random((m, 2)) < (1.0 - scores) * 0.3
    loss[:, -1] = False
    st_ = SolverSettings(min_cell=100, min_pool=20)
    sv = SegmentSolver(scores, preds, loss, np.array([0.3, 1.0]), c, np.ones(1, dtype=bool), np.zeros(c, dtype=bool),
                       st_)
    ix = sv.index[0]
    assert len(set(ix.cell_group[:3].tolist())) == 3
    assert len(set(ix.cell_group[3:].tolist())) == 1 and ix.cell_group[3] not in ix.cell_group[:3]
    sol = sv.solve(2.0)
    rare = sol.tau[0, 3:]
    assert np.all(rare == rare[0]) or np.all(np.isnan(rare))
    # a pool smaller than min_pool never exits
    st2 = SolverSettings(min_cell=100, min_pool=10_000)
    sv2 = SegmentSolver(scores, preds, loss, np.array([0.3, 1.0]), c, np.ones(1, dtype=bool),
                        np.zeros(c, dtype=bool), st2)
    assert np.isnan(sv2.solve(2.0).tau[0, 3:]).all()


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


def test_splits_are_a_seeded_partition():
    sp = make_splits(1000, SolveSpec().split, 3)
    allrows = np.concatenate([sp.fit, sp.select, sp.certify])
    assert sorted(allrows.tolist()) == list(range(1000))
    assert sp.to_json() == {"fit": 100, "select": 300, "certify": 600, "seed": 3}
    again = make_splits(1000, SolveSpec().split, 3)
    assert np.array_equal(sp.certify, again.certify)
    assert not np.array_equal(sp.certify, make_splits(1000, SolveSpec().split, 4).certify)


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
