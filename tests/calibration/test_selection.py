"""Family choice: folds, pooling of out-of-fold curves, the walk to the target, the pick."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.selection import (
    CandidateScore,
    FoldCurve,
    fold_ids,
    operating_point,
    pick,
    pool,
    strict_knobs,
)


@st.composite
def fold_curves(draw, groups: int = 2):
    """Random out-of-fold curves: decreasing knobs, nondecreasing losses, decreasing cost."""
    folds = draw(st.integers(1, 4))
    out = []
    for _ in range(folds):
        n = draw(st.integers(5, 60))
        p = draw(st.integers(0, 8))
        knobs = np.sort(np.asarray(draw(st.lists(st.floats(0.01, 100.0), min_size=p, max_size=p, unique=True))))[::-1]
        rows = np.array([n] + [draw(st.integers(1, n)) for _ in range(groups - 1)], dtype=np.float64)
        steps = np.asarray(draw(st.lists(st.integers(0, 2), min_size=p * groups, max_size=p * groups)))
        losses = np.cumsum(steps.reshape(p, groups), axis=0).astype(np.float64) if p else np.zeros((0, groups))
        losses = np.minimum(losses, rows[None, :])
        cost = np.linspace(n * 0.9, n * 0.2, p) if p else np.zeros(0)
        out.append(FoldCurve(knobs=knobs, losses=losses, cost=cost, rows=rows, n=n))
    return out


@settings(max_examples=80, deadline=None)
@given(curves=fold_curves())
def test_pooling_sums_each_folds_last_point_at_least_as_safe(curves):
    knobs, losses, cost, rows, n = pool(curves)
    assert np.all(np.diff(knobs) < 0)
    assert n == sum(c.n for c in curves)
    np.testing.assert_array_equal(rows, np.sum([c.rows for c in curves], axis=0))
    for x, lx, cx in zip(knobs, losses, cost, strict=True):
        want_l, want_c = np.zeros_like(lx), 0.0
        for c in curves:
            taken = [j for j, k in enumerate(c.knobs) if k >= x]
            if taken:
                want_l += c.losses[taken[-1]]
                want_c += c.cost[taken[-1]]
            else:
                want_c += c.n  # nothing exits yet: full depth, no loss
        np.testing.assert_allclose(lx, want_l)
        assert cx == pytest.approx(want_c)


@settings(max_examples=80, deadline=None)
@given(curves=fold_curves(), t0=st.floats(0.0, 0.5), t1=st.floats(0.0, 0.5))
def test_the_walk_stops_before_the_first_point_above_a_target(curves, t0, t1):
    knobs, losses, cost, rows, n = pool(curves)
    targets = np.array([t0, t1])
    op = operating_point(knobs, losses, cost, rows, n, targets)
    risk = losses / np.maximum(rows, 1)[None, :]
    ok = np.all(risk <= targets[None, :], axis=1)
    assert ok[: op.index + 1].all()
    if op.index + 1 < knobs.size:
        assert not ok[op.index + 1]
    if op.index < 0:
        assert op.compute == 1.0 and op.knob is None
    else:
        assert op.compute == pytest.approx(cost[op.index] / n) and op.knob == knobs[op.index]
    # a looser target never stops earlier
    assert operating_point(knobs, losses, cost, rows, n, targets + 0.1).index >= op.index
    tighter = operating_point(knobs, losses, cost, rows, n, targets * 0.5)
    assert tighter.index <= op.index and tighter.compute >= op.compute - 1e-12


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), folds=st.integers(2, 10), seed=st.integers(0, 2**32 - 1))
def test_folds_are_balanced_and_seeded(n, folds, seed):
    ids = fold_ids(n, folds, seed)
    counts = np.bincount(ids, minlength=folds)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    np.testing.assert_array_equal(ids, fold_ids(n, folds, seed))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=20))
def test_strict_knobs_are_strictly_decreasing_and_keep_strict_steps(values):
    out = strict_knobs(values)
    assert np.all(np.diff(out) < 0)
    if values:
        assert out[0] == values[0]
    for j in range(1, len(values)):
        if values[j] < out[j - 1]:
            assert out[j] == values[j]


def test_pick_takes_the_lowest_score_and_ties_go_to_the_simpler_family():
    def cand(name, score):
        return CandidateScore(family=name, label=name, compute=score, risk=0.0, knob=None, points=1)

    table = [cand("shared", 0.40), cand("per_exit", 0.35), cand("per_class", 0.35)]
    assert pick(table).family == "per_exit"
    assert pick(table, tolerance=0.06).family == "shared"


def test_a_lead_within_the_noise_of_the_paired_folds_keeps_the_default():
    def cand(name, folds):
        return CandidateScore(family=name, label=name, compute=float(np.mean(folds)), risk=0.0, knob=None, points=1,
                              folds=tuple(folds))

    default = [0.50, 0.52, 0.48, 0.51, 0.49]
    steady = cand("shared", [x - 0.03 for x in default])  # 3 points better on every fold
    noisy = cand("shared", [0.40, 0.60, 0.38, 0.55, 0.42])  # 3 points better on average, by luck
    assert pick([cand("per_exit", default), steady]).family == "shared"
    assert pick([cand("per_exit", default), noisy]).family == "per_exit"
