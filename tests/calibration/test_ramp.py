"""Ramps fill the jumps of a solver path: safer copies of the point after a jump, in risk order."""

from __future__ import annotations

import itertools

import numpy as np

from exitwise.calibration.families import FAMILIES, family_path
from exitwise.calibration.pipeline import SolveSpec, prepare
from exitwise.calibration.ramp import JUMP, ramp_in
from exitwise.calibration.solver import PathPoint, SolverPath
from exitwise.calibration.synthetic_tokens import synthetic_token_logs


def test_a_ramp_fills_the_jump_from_full_depth_with_safer_copies() -> None:
    logs = synthetic_token_logs(1200, 30, n_exits=6, vocab_size=4000, top_k=8, seed=11)
    prep = prepare(logs, SolveSpec(risk="sequence_disagreement", eps=0.1, families=("per_exit",)))
    rows = prep.splits.choose
    problem = prep.problem(rows)
    path = family_path(FAMILIES["per_exit"], problem, eps=0.05, target=0.04)
    # a path that jumps from full depth straight to its most aggressive point
    last = path.points[-1]
    jumpy = SolverPath(points=(last,), floors=path.floors, knob=path.knob)
    target = last.select_risk
    ramped = ramp_in(prep, jumpy, rows, prep.forced_segments, target)
    risks = [p.select_risk for p in ramped.points]
    assert len(risks) > 4 and ramped.points[-1] is last
    assert all(a < b for a, b in itertools.pairwise(risks))  # safe to aggressive
    assert risks[0] < JUMP * target  # the first step is small
    for p in ramped.points[:-1]:  # same shape, thresholds moved towards 1 (never below the base point's)
        assert np.array_equal(np.isnan(p.tau), np.isnan(last.tau))
        ok = ~np.isnan(last.tau)
        assert (p.tau[ok] >= last.tau[ok]).all() and (p.tau[ok] <= 1.0).all()


def test_a_path_without_jumps_is_left_alone() -> None:
    logs = synthetic_token_logs(600, 20, n_exits=4, vocab_size=2000, top_k=8, seed=2)
    prep = prepare(logs, SolveSpec(risk="disagreement", eps=0.05))
    tau = np.full((1, 3, prep.n_columns), np.nan)
    points = tuple(PathPoint(lam=10.0 / (i + 1), segment_lams=np.ones(1), tau=tau, select_risk=0.01 * i,
                             select_compute=1.0 - 0.01 * i, select_segment_risk=np.zeros(1)) for i in range(1, 8))
    path = SolverPath(points=points, floors=np.zeros(1))
    assert ramp_in(prep, path, prep.splits.choose, prep.forced_segments, target=0.05).points == points
