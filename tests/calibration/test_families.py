"""Policy families: each gives a path of threshold tables, safe to aggressive, of its own shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.families import (
    FAMILIES,
    FIXED_GRID,
    candidate_families,
    family_path,
    fixed_shared_path,
    shared_path,
)
from exitwise.calibration.solver import Problem, SolverSettings

FAST = SolverSettings(grid=8, max_points=12)


def _problem(seed: int, m: int = 600, k: int = 4, c: int = 3, s: int = 3, forced_segment: int | None = None) -> Problem:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.3, 1.0, size=(m, k))
    preds = rng.integers(0, c, size=(m, k))
    loss = rng.random((m, k)) < (1.0 - scores) * 0.3
    loss[:, -1] = False
    forced = np.zeros(s, dtype=bool)
    if forced_segment is not None:
        forced[forced_segment] = True
    return Problem(scores=scores, preds=preds, loss=loss, seg=rng.integers(0, s, size=m),
                   costs=np.linspace(0.25, 1.0, k), n_classes=c, n_segments=s, allowed_exits=np.ones(k - 1, dtype=bool),
                   forced_classes=np.zeros(c, dtype=bool), forced_segments=forced)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), eps=st.floats(0.01, 0.1))
def test_shared_path_descends_and_stays_within_eps_on_its_rows(seed, eps):
    problem = _problem(seed)
    path = shared_path(problem, eps=eps)
    taus = [p.lam for p in path.points]
    assert np.all(np.diff(taus) < 0)
    for p in path.points:
        assert p.select_risk <= eps + 1e-12
        assert np.all(p.tau == p.lam)  # one threshold everywhere


def test_fixed_path_depends_on_no_row():
    a, b = fixed_shared_path(_problem(1)), fixed_shared_path(_problem(2))
    assert len(a.points) == FIXED_GRID.size
    for pa, pb in zip(a.points, b.points, strict=True):
        np.testing.assert_array_equal(pa.tau, pb.tau)


@pytest.mark.parametrize("name", ["per_exit", "per_class", "per_exit_segment", "per_class_segment"])
def test_lagrangian_families_have_their_shape(name):
    family = FAMILIES[name]
    problem = _problem(3, m=3000, forced_segment=2)
    path = family_path(family, problem, eps=0.05, target=0.04, settings=FAST)
    assert path.points, name
    assert all(p.select_risk <= 0.05 for p in path.points)  # nothing the fitting rows already put above eps
    for p in path.points:
        assert np.all(np.isnan(p.tau[2]))  # the forbidden segment never exits
        if not family.per_class:
            for row in p.tau.reshape(-1, problem.n_classes):
                assert np.all(np.isnan(row)) or np.unique(row).size == 1, name
        if not family.per_segment:
            np.testing.assert_array_equal(p.tau[0], p.tau[1])  # one table shared by the segment values


def test_candidates_depend_on_segments_and_calibration_and_names_are_checked():
    plain = [f.name for f in candidate_families(segmented=False, calibrated=True)]
    assert plain == ["per_exit", "shared_raw", "shared", "per_class", "per_class_shrunk"]  # the default first
    assert "shared" not in [f.name for f in candidate_families(segmented=False, calibrated=False)]
    assert "per_class_segment" in [f.name for f in candidate_families(segmented=True, calibrated=True)]
    assert [f.name for f in candidate_families(segmented=False, calibrated=True, names=["per_exit", "shared"])] \
        == ["per_exit", "shared"]
    with pytest.raises(InputError, match="unknown policy family 'nope'"):
        candidate_families(segmented=False, calibrated=True, names=["nope"])
    with pytest.raises(InputError, match="needs --segment-key"):
        candidate_families(segmented=False, calibrated=True, names=["per_exit_segment"])
