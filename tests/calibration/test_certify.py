"""Certification: exact binomial tests, Clopper-Pearson bounds, fixed-sequence testing, THE guarantee."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from exitwise.calibration.certify import (
    ALL,
    Constraint,
    aim,
    binomial_p_value,
    check_constraints,
    critical_count,
    fixed_sequence,
    min_rows,
    upper_bound,
)
from exitwise.calibration.evaluate import ScoredLogs, evaluate_scored, route_scored
from exitwise.calibration.pipeline import SolveSpec, parse_budgets, solve, solve_prepared
from exitwise.calibration.rule import first_exit
from exitwise.calibration.solver import SolverSettings
from exitwise.calibration.synthetic import synthetic_logs


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), frac=st.floats(0, 1), eps=st.floats(0.001, 0.5), delta=st.floats(0.001, 0.5))
def test_p_value_and_upper_bound_agree(n, frac, eps, delta):
    k = int(frac * n)
    p = binomial_p_value(k, n, eps)
    assert p == pytest.approx(binom.cdf(k, n, eps))
    ub = upper_bound(k, n, delta)
    assert 0.0 <= ub <= 1.0 and ub >= k / n - 1e-12
    # the test rejects H0: risk > eps exactly when the (1 - delta) upper bound is below eps
    if abs(ub - eps) > 1e-7:
        assert (p <= delta) == (ub <= eps)
    kc = critical_count(n, eps, delta)
    assert (k <= kc) == (p <= delta)


def test_minimum_rows_to_certify_anything():
    n = min_rows(0.01, 0.05)
    assert n == 299
    assert binomial_p_value(0, n, 0.01) <= 0.05 < binomial_p_value(0, n - 1, 0.01)
    assert critical_count(n - 1, 0.01, 0.05) == -1 and critical_count(n, 0.01, 0.05) == 0
    assert aim(n - 1, 0.01, 0.05) == 0.0
    a = aim(20_000, 0.01, 0.05, power=0.9)
    assert 0.007 < a < 0.0095
    assert binom.cdf(critical_count(20_000, 0.01, 0.05), 20_000, a) >= 0.9


def test_fixed_sequence_stops_at_the_first_failure_and_needs_every_constraint():
    n = 2000
    seg = np.arange(n) < 500
    cons = [Constraint(ALL, 0.05, np.arange(n)), Constraint("small", 0.1, np.flatnonzero(seg))]
    rates = [0.0, 0.01, 0.025, 0.01]  # the 3rd fails; the 4th would pass but is never tested
    calls = []

    def losses(j):
        calls.append(j)
        out = np.zeros(n, dtype=bool)
        out[: int(rates[j] * n)] = True  # losses fall in the small segment first
        return out

    cert = fixed_sequence(losses, len(rates), cons, 0.05)
    assert calls == [0, 1, 2]
    assert cert.chosen == 1  # step 2: 50 losses all in "small" (10%) fails there although overall is 2.5%
    step2 = cert.steps[2]
    assert step2.result(ALL).passed and not step2.result("small").passed and not step2.passed
    empty = fixed_sequence(lambda j: np.ones(n, dtype=bool), 3, cons, 0.05)
    assert empty.chosen is None and not empty.certified and len(empty.steps) == 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), eps=st.sampled_from([0.01, 0.02, 0.05]),
       budget=st.sampled_from([None, "*", "region_0"]), risk=st.sampled_from(["disagreement", "induced_error"]))
def test_certified_thresholds_meet_their_constraints_on_the_certify_split(seed, eps, budget, risk):
    """Every returned threshold set meets its constraint on the data it was certified on."""
    logs = synthetic_logs(6_000, 3, 4, segments={"region": 3}, seed=seed)
    budgets = () if budget is None else parse_budgets([f"{budget}={min(2 * eps, 0.1)}"])
    spec = SolveSpec(risk=risk, eps=eps, segment_keys=("region",), segment_budgets=budgets, seed=seed)
    sol = solve(logs, spec)
    prep = sol.prepared
    held = prep.scored.take(prep.splits.certify)
    exit_at = route_scored(sol.policy, held)
    loss = prep.loss[prep.splits.certify][np.arange(held.n), exit_at]
    redo = check_constraints(loss, sol.constraints, spec.delta)
    step = sol.certification.chosen_step
    if not sol.certified:
        assert step is None and not loss.any()  # full depth
        return
    for con, res in zip(sol.constraints, redo.results, strict=True):
        assert res.passed and res.upper_bound <= con.eps
        assert res.losses == step.result(con.name).losses
    assert evaluate_scored(sol.policy, held, spec.risk).risk <= eps


def test_the_path_is_ordered_safe_to_aggressive_and_chosen_without_the_certify_split():
    logs = synthetic_logs(10_000, 4, 5, segments={}, seed=6)
    a = solve(logs, SolveSpec(eps=0.02, seed=1))
    pts = a.path.points
    assert pts[0].select_risk <= pts[-1].select_risk and pts[0].select_compute >= pts[-1].select_compute
    assert np.all(np.diff([p.lam for p in pts]) < 0)
    # perturbing the certify split's losses cannot change the path (it never saw them)
    prep = a.prepared
    flipped = prep.loss.copy()
    flipped[prep.splits.certify] = ~flipped[prep.splits.certify]
    flipped[:, -1] = False
    b = solve_prepared(replace(prep, loss=flipped))
    assert len(b.path.points) == len(pts)
    assert all(np.array_equal(p.tau, q.tau, equal_nan=True) for p, q in zip(pts, b.path.points, strict=True))
    assert not b.certified  # and the certification did see them


def _repeated_guarantee(n_cal: int, repeats: int, spec: SolveSpec, naive_tau) -> tuple[int, int, list[float]]:
    """Violations of eps on 300k fresh rows by the certified policy and by a naive one, over
    ``repeats`` disjoint calibration samples of ``n_cal`` rows from one synthetic distribution.

    Identity calibrators keep the fresh scores fixed. ``naive_tau(sol, logs)`` gives the naive
    thresholds (S, K-1, C) of a repeat, or None.
    """
    kw = dict(n_exits=3, n_classes=4, segments={}, label_noise=0.0)
    pool = synthetic_logs(n_cal * repeats, seed=21, **kw)
    fresh = synthetic_logs(300_000, seed=22, **kw)
    fresh_scored = ScoredLogs.from_logs(fresh, [{"type": "identity"}] * 3)
    violations = naive_violations = 0
    realised = []
    for r in range(repeats):
        logs = pool.take(np.arange(r * n_cal, (r + 1) * n_cal))
        sol = solve(logs, replace(spec, seed=r))
        risk = evaluate_scored(sol.policy, fresh_scored, "disagreement").risk
        realised.append(risk)
        violations += risk > spec.eps
        tau = naive_tau(sol, logs)
        if tau is not None:
            naive = sol.prepared.compile(tau, sol.forced_segments)
            naive_violations += evaluate_scored(naive, fresh_scored, "disagreement").risk > spec.eps
    return violations, naive_violations, realised


def test_guarantee_holds_over_many_calibration_samples():
    """THE guarantee: realised risk on large fresh data exceeds eps in at most ~delta of repeats.

    1,500 rows are too few to choose from data: the raw shared-threshold path, fixed before any
    row is seen, is certified on every row. The count of violations must be within a binomial
    tolerance of delta * repeats; the same repeats taking the most aggressive point of that path
    whose calibration-sample risk meets eps (no certification) must violate far more often, so
    the test can fail.
    """
    eps, delta, repeats = 0.05, 0.1, 150

    def naive(sol, logs):
        scored = ScoredLogs.from_logs(logs, [{"type": "identity"}] * 3)
        loss = scored.loss_matrix("disagreement")
        for p in reversed(sol.path.points):
            if loss[np.arange(logs.n), first_exit(sol.prepared.compile(p.tau, sol.forced_segments), scored.scores,
                                                  scored.preds, np.zeros(logs.n, dtype=np.intp)).exit].mean() <= eps:
                return p.tau
        return None

    spec = SolveSpec(eps=eps, delta=delta, calibrator="identity")
    violations, naive_violations, realised = _repeated_guarantee(1500, repeats, spec, naive)
    tolerance = int(binom.ppf(0.999, repeats, delta))
    assert violations <= tolerance, (violations, tolerance, sorted(realised)[-10:])
    assert naive_violations > tolerance, naive_violations
    assert np.median(realised) > 0.5 * eps  # certified, yet not trivially conservative


def test_guarantee_holds_with_the_family_chosen_by_cross_validation():
    """The selection step keeps the guarantee: the family is chosen by 3-fold cross-validation
    on the choose rows, its path fitted there, and certified on rows none of that touched.

    The naive counterpart takes the chosen path's most aggressive point whose risk on the choose
    rows meets eps: it must violate far more often, so the test can fail.
    """
    eps, delta, repeats = 0.05, 0.1, 100
    spec = SolveSpec(eps=eps, delta=delta, calibrator="identity", families=("shared", "per_exit", "per_class"),
                     folds=3, settings=SolverSettings(grid=12, max_points=24))

    def naive(sol, logs):
        assert sol.selection is not None and sol.family in {"shared", "per_exit", "per_class"}
        ok = [p for p in sol.path.points if p.select_risk <= eps]
        return ok[-1].tau if ok else None

    violations, naive_violations, realised = _repeated_guarantee(2500, repeats, spec, naive)
    tolerance = int(binom.ppf(0.999, repeats, delta))
    assert violations <= tolerance, (violations, tolerance, sorted(realised)[-10:])
    assert naive_violations > tolerance, naive_violations
    assert np.median(realised) > 0.5 * eps
