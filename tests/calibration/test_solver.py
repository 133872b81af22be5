"""The threshold path solver: exact sweeps, monotone coordinate descent, shrinkage of sparse cells."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitwise.calibration.solver import SegmentSolver, SolverSettings, _exit_index, _sweep


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
