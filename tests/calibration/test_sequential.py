"""The anytime-valid risk bound: the e-process bounds, the running state, Clopper–Pearson, and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, binomtest

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.sequential import (
    PRIOR_STRENGTH,
    RiskBound,
    confidence_sequence,
    default_prior,
    fixed_n_interval,
    log_e_value,
)


@st.composite
def counts(draw: st.DrawFn, max_n: int = 1_000_000) -> tuple[int, int]:
    """(n, losses) with a fair share of the edges: no losses, all losses, few samples."""
    n = draw(st.one_of(st.integers(0, 30), st.integers(0, max_n)))
    kind = draw(st.sampled_from(["any", "zero", "all", "small"]))
    if kind == "zero":
        return n, 0
    if kind == "all":
        return n, n
    if kind == "small":
        return n, draw(st.integers(0, min(n, 5)))
    return n, draw(st.integers(0, n))


priors = st.builds(default_prior, st.floats(0.001, 0.45), st.floats(0.5, 500.0))
deltas = st.floats(0.001, 0.5)


# ---------------------------------------------------------------- the interval at one n

@settings(max_examples=200, deadline=None)
@given(counts(), deltas, priors)
def test_interval_holds_the_observed_rate_inside_zero_one(ns, delta, prior):
    n, s = ns
    lower, upper = (float(v) for v in confidence_sequence(n, s, delta, prior))
    assert 0.0 <= lower <= upper <= 1.0
    if n == 0:
        assert (lower, upper) == (0.0, 1.0)
    else:
        assert lower <= s / n <= upper


@settings(max_examples=200, deadline=None)
@given(counts().filter(lambda ns: ns[0] > 0), deltas, priors)
def test_bounds_are_where_the_wealth_reaches_one_over_delta(ns, delta, prior):
    """Outside ends: log E >= log(1/δ) at each end (unless it is 0 or 1), tight to 1e-6; log E(s/n) <= 0."""
    n, s = ns
    level = math.log(1.0 / delta)
    lower, upper = (float(v) for v in confidence_sequence(n, s, delta, prior))
    phat = s / n
    # the observed rate is never ruled out: E <= 1 there in exact arithmetic; a prior far from the data
    # leaves both masses deep in the incomplete beta's tail, where it is only good to a few digits
    assert log_e_value(n, s, phat, prior, "above") < 0.05 and log_e_value(n, s, phat, prior, "below") < 0.05
    if s > 0:
        assert log_e_value(n, s, lower, prior, "above") >= level
        inside = lower + 1e-6
        if inside < phat:
            assert log_e_value(n, s, inside, prior, "above") < level
    else:
        assert lower == 0.0
    if s < n:
        assert log_e_value(n, s, upper, prior, "below") >= level
        inside = upper - 1e-6
        if inside > phat:
            assert log_e_value(n, s, inside, prior, "below") < level
    else:
        assert upper == 1.0


@settings(max_examples=100, deadline=None)
@given(counts(max_n=2000).filter(lambda ns: ns[0] > 0), st.integers(1, 50), st.integers(1, 50), deltas, priors)
def test_interval_shrinks_as_n_grows_at_a_fixed_rate(ns, k1, k2, delta, prior):
    n, s = ns
    small, big = sorted((k1, k2))
    lo1, hi1 = confidence_sequence(n * small, s * small, delta, prior)
    lo2, hi2 = confidence_sequence(n * big, s * big, delta, prior)
    assert lo2 >= lo1 - 1e-12 and hi2 <= hi1 + 1e-12


def test_vectorised_equals_one_at_a_time():
    n = np.array([[0, 10, 500], [1, 1000, 40000]])
    s = np.array([[0, 3, 0], [1, 25, 850]])
    prior = default_prior(0.02)
    lower, upper = confidence_sequence(n, s, 0.05, prior)
    assert lower.shape == upper.shape == n.shape
    for i in np.ndindex(n.shape):
        assert (lower[i], upper[i]) == tuple(float(v) for v in confidence_sequence(int(n[i]), int(s[i]), 0.05, prior))


def test_smaller_delta_gives_a_wider_interval():
    prior = default_prior(0.02)
    lo_05, hi_05 = confidence_sequence(5000, 150, 0.05, prior)
    lo_01, hi_01 = confidence_sequence(5000, 150, 0.01, prior)
    assert lo_01 < lo_05 < 0.03 < hi_05 < hi_01


# ---------------------------------------------------------------- Clopper–Pearson

@settings(max_examples=200, deadline=None)
@given(counts(max_n=5000).filter(lambda ns: ns[0] > 0), deltas)
def test_fixed_n_interval_is_scipys_exact_interval(ns, delta):
    n, s = ns
    lower, upper = fixed_n_interval(n, s, delta)
    ci = binomtest(s, n).proportion_ci(confidence_level=1 - delta, method="exact")
    assert float(lower) == pytest.approx(ci.low, abs=1e-9)
    assert float(upper) == pytest.approx(ci.high, abs=1e-9)


# ---------------------------------------------------------------- the running state

batches = st.lists(st.tuples(st.integers(0, 400), st.floats(0.0, 1.0)).map(lambda t: (t[0], round(t[0] * t[1]))),
                   min_size=1, max_size=3)


def _run(bound: RiskBound, seq: list[tuple[int, int]]) -> list[RiskBound]:
    out = []
    for n, s in seq:
        bound = bound.update(n, s)
        out.append(bound)
    return out


@settings(max_examples=20, deadline=None)  # RiskBound.update is scalar (~10 ms)
@given(batches, st.randoms(use_true_random=False), st.floats(0.005, 0.2))
def test_risk_bound_counts_do_not_depend_on_order_or_split(seq, rnd, eps):
    start = RiskBound.start(eps, 0.05)
    states = _run(start, seq)
    final = states[-1]
    assert (final.n, final.losses) == (sum(n for n, _ in seq), sum(s for _, s in seq))
    # the lower bound is a running maximum (a breach stays a breach); the upper bound is today's
    for before, after in zip([start, *states], states, strict=False):
        assert after.lower >= before.lower
        lo, hi = confidence_sequence(after.n, after.losses, after.delta, after.prior)
        assert after.lower >= float(lo) and after.upper == float(hi)
    shuffled = list(seq)
    rnd.shuffle(shuffled)
    other = _run(start, shuffled)[-1]
    assert (other.n, other.losses) == (final.n, final.losses)
    # every batch split in two: the same totals, and checks at a superset of the cut points
    split = []
    for n, s in seq:
        m = rnd.randint(0, n)
        sm = rnd.randint(max(0, s - (n - m)), min(s, m))
        split += [(m, sm), (n - m, s - sm)]
    fine = _run(start, split)[-1]
    assert (fine.n, fine.losses) == (final.n, final.losses)
    assert fine.lower >= final.lower and fine.upper == final.upper


def test_risk_bound_status_and_json():
    b = RiskBound.start(0.02, 0.05)
    assert b.prior == default_prior(0.02) and sum(b.prior) == pytest.approx(PRIOR_STRENGTH)
    assert b.risk is None and not b.breached and not b.safe
    high = b.update(2000, 200)
    assert high.breached and not high.safe and high.risk == 0.1
    low = b.update(20000, 20)
    assert low.safe and not low.breached
    assert RiskBound.from_json(high.to_json()) == high
    assert high.to_json()["risk"] == 0.1 and high.to_json()["prior"] == list(high.prior)


def test_default_prior():
    a, b = default_prior(0.02)
    assert a / (a + b) == pytest.approx(0.04) and a + b == pytest.approx(PRIOR_STRENGTH)
    a, b = default_prior(0.4, 10.0)
    assert (a, b) == (5.0, 5.0)  # the mean is capped at 1/2


@pytest.mark.parametrize("call", [
    lambda: confidence_sequence(10, 11, 0.05, (1.0, 1.0)),
    lambda: confidence_sequence(-1, 0, 0.05, (1.0, 1.0)),
    lambda: confidence_sequence(10, 1, 1.0, (1.0, 1.0)),
    lambda: fixed_n_interval(10, -1, 0.05),
    lambda: fixed_n_interval(10, 1, 0.0),
    lambda: default_prior(0.0),
    lambda: default_prior(0.02, 0.0),
    lambda: confidence_sequence(1000, 30, 0.05, (-0.4, -19.6)),  # was the point interval [0.03, 0.03]
    lambda: RiskBound.from_json({**RiskBound.start(0.02, 0.05).to_json(), "prior": [0.0, 20.0]}).update(10, 1),
    lambda: RiskBound.start(0.02, 0.05).update(5, 6),
    lambda: RiskBound.start(0.02, 0.05).update(-1, 0),
])
def test_bad_input_is_refused(call):
    with pytest.raises(InputError):
        call()


# ---------------------------------------------------------------- time-uniform coverage, simulated

RUNS, CHECKS, BATCH, DELTA = 400, 50, 100, 0.05


@pytest.mark.parametrize("risk, prior", [
    (0.05, default_prior(0.05)),         # the default prior of a policy at ε = risk
    (0.05, (30.0, 70.0)),                # a strong prior far from the truth: still valid (Ville)
    (0.01, default_prior(0.01)),
])
def test_miscoverage_over_every_check_is_at_most_delta_and_clopper_pearson_is_not(risk, prior):
    """400 seeded runs checked after each of 50 batches of 100: each one-sided bound misses the true
    risk at some check in at most δ of them (plus binomial noise: the 99.9% quantile); Clopper–Pearson
    recomputed at every check misses it in far more (about 25% here, far beyond that allowance)."""
    rng = np.random.default_rng(12)
    losses = np.cumsum(rng.binomial(BATCH, risk, size=(RUNS, CHECKS)), axis=1)
    n = np.arange(1, CHECKS + 1) * BATCH
    allowance = binom.ppf(0.999, RUNS, DELTA) / RUNS

    lower, upper = confidence_sequence(n, losses, DELTA, prior)
    assert (lower > risk).any(axis=1).mean() <= allowance
    assert (upper < risk).any(axis=1).mean() <= allowance

    cp_lower, cp_upper = fixed_n_interval(n, losses, DELTA)
    cp_missed = ((cp_lower > risk) | (cp_upper < risk)).any(axis=1).mean()
    assert cp_missed > allowance
    # each check on its own is still valid for Clopper–Pearson: the last one misses about δ
    assert ((cp_lower[:, -1] > risk) | (cp_upper[:, -1] < risk)).mean() <= allowance


def test_false_alarms_stay_under_delta_when_the_risk_drifts_under_the_budget():
    """The breach test holds for any sequence of loss rates at or under ε, not only a constant one:
    here the rate moves between ε/4 and ε batch by batch (an e-process for the composite null)."""
    eps = 0.02
    rng = np.random.default_rng(3)
    rates = eps * rng.choice([0.25, 0.6, 1.0], size=(RUNS, CHECKS))
    losses = np.cumsum(rng.binomial(BATCH, rates), axis=1)
    n = np.arange(1, CHECKS + 1) * BATCH
    lower, _ = confidence_sequence(n, losses, DELTA, default_prior(eps))
    assert (lower > eps).any(axis=1).mean() <= binom.ppf(0.999, RUNS, DELTA) / RUNS
