"""Issue 12 (4c): exact binomial intervals of realised risks and the budget check of constrained segments.

The interval (:func:`exitwise.calibration.evaluate.risk_interval`) against scipy's own
Clopper-Pearson (``binomtest(...).proportion_ci(method="exact")``), its defining equations and
its coverage computed exactly for small n; then the evaluator's intervals and
:func:`exitwise.calibration.evaluate.check_budgets` against counts made by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binom, binomtest

from exitwise.calibration.certify import ALL, upper_bound
from exitwise.calibration.evaluate import BudgetCheck, check_budgets, evaluate, risk_interval
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitLogs, ExitSpec, ModelCard, SegmentColumn

DELTAS = st.floats(0.001, 0.5)


@st.composite
def counts(draw: st.DrawFn, max_n: int = 5000) -> tuple[int, int]:
    n = draw(st.integers(1, max_n))
    return draw(st.integers(0, n)), n


# ---------------------------------------------------------------- the interval

@settings(max_examples=300, deadline=None)
@given(kn=counts(), delta=DELTAS)
def test_interval_holds_the_estimate_within_0_1_and_is_scipys_clopper_pearson(kn, delta):
    k, n = kn
    lo, hi = risk_interval(k, n, delta)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo < hi
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - delta, method="exact")
    assert lo == pytest.approx(ref.low, rel=1e-6, abs=1e-12)
    assert hi == pytest.approx(ref.high, rel=1e-6, abs=1e-12)
    # the upper end is the certificate's one-sided bound at level 1 - delta/2
    assert hi == pytest.approx(upper_bound(k, n, delta / 2), rel=1e-12, abs=1e-15)


@settings(max_examples=300, deadline=None)
@given(kn=counts(), delta=DELTAS)
def test_interval_solves_its_defining_tail_equations(kn, delta):
    """hi: P(Bin(n, hi) <= k) = delta/2; lo: P(Bin(n, lo) >= k) = delta/2 (except at the ends)."""
    k, n = kn
    lo, hi = risk_interval(k, n, delta)
    if k < n:
        assert binom.cdf(k, n, hi) == pytest.approx(delta / 2, rel=1e-6)
    if k > 0:
        assert binom.sf(k - 1, n, lo) == pytest.approx(delta / 2, rel=1e-6)


@settings(max_examples=300, deadline=None)
@given(kn=counts(max_n=2000), scale=st.integers(2, 50), delta=DELTAS)
def test_interval_shrinks_with_n_at_the_same_rate(kn, scale, delta):
    k, n = kn
    lo, hi = risk_interval(k, n, delta)
    lo2, hi2 = risk_interval(k * scale, n * scale, delta)
    assert hi2 - lo2 < hi - lo


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), p=st.floats(0.0, 1.0), delta=st.sampled_from([0.01, 0.05, 0.1, 0.3]))
def test_coverage_is_at_least_1_minus_delta_computed_exactly(n, p, delta):
    """Brute force over every outcome k of Bin(n, p): the chance the interval holds p."""
    covered = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)
                  if (ci := risk_interval(k, n, delta))[0] <= p <= ci[1])
    assert covered >= 1 - delta - 1e-9


def test_no_rows_no_interval_and_a_known_value():
    assert risk_interval(0, 0, 0.05) is None
    lo, hi = risk_interval(0, 10, 0.05)  # the classic: 1 - 0.025 ** (1 / 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1)


# ---------------------------------------------------------------- the evaluator's intervals

REGIONS = ("north", "south", "west")


def _logs(rng: np.random.Generator, n: int, labels: bool = True) -> ExitLogs:
    card = ModelCard(model="m", exits=tuple(ExitSpec(f"e{i}", float(2 ** i)) for i in range(3)),
                     classes=("c0", "c1", "c2"))
    segs = {"region": SegmentColumn.from_values(rng.choice(REGIONS, size=n)),
            "device": SegmentColumn.from_values(rng.choice(["a", "b"], size=n))}
    return ExitLogs(logits=rng.normal(0, 2.5, size=(n, 3, 3)).astype(np.float32), card=card,
                    labels=rng.integers(0, 3, size=n) if labels else None, segments=segs)


def _doc(tau: float, *, keys=("region",), segments=None, risk="disagreement", eps=0.05) -> dict:
    return {
        "exits": [{"name": f"e{i}", "cost": float(2 ** i), "calibrator": {"type": "identity"}} for i in range(3)],
        "classes": ["c0", "c1", "c2"], "score": "max_prob", "segment_keys": list(keys),
        "thresholds": {"default": [[tau] * 3, [tau] * 3]},
        "forced_full_depth": {"classes": [], "segments": []}, "max_exit": None,
        "guarantee": {"risk": risk, "eps": eps, "delta": 0.05,
                      "segments": {ALL: {"eps": eps, "n": 1, "upper_bound": None, "certified": True},
                                   **(segments or {})}},
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), tau=st.floats(0.3, 1.0), delta=DELTAS)
def test_every_realised_risk_gets_the_interval_of_its_own_count(seed, n, tau, delta):
    rng = np.random.default_rng(seed)
    logs = _logs(rng, n)
    doc = _doc(tau)
    ev = evaluate(doc, logs, delta=delta)
    out = ev.to_json()
    assert out["delta"] == delta and out["losses"] == int(ev.loss.sum())
    assert out["risk_interval"] == list(risk_interval(int(ev.loss.sum()), n, delta))
    assert evaluate(doc, logs).delta == 0.05  # default: the guarantee's
    regions = logs.segments["region"].values()
    for value, seg in out["segments"]["region"].items():
        k = int(ev.loss[regions == value].sum())
        assert seg["losses"] == k and seg["risk_interval"] == list(risk_interval(k, seg["n"], delta))
        assert seg["risk_interval"][0] <= seg["risk"] <= seg["risk_interval"][1]
    induced = ev.overall.interval(delta, "induced_error")
    assert induced == risk_interval(round(ev.induced_error * n), n, delta)
    assert ev.with_delta(None).to_json()["risk_interval"] is None


# ---------------------------------------------------------------- the budget check

def _by_hand(ev, logs, doc):
    """name -> (n, losses) of each constrained segment, counted from the per-sample losses."""
    keys = doc["segment_keys"]
    values = logs.segment_values(keys) if keys else None
    out = {}
    for name in [ALL, *sorted(s for s in doc["guarantee"]["segments"] if s != ALL)]:
        mask = np.ones(logs.n, bool) if name == ALL else np.asarray(values == name)
        out[name] = (int(mask.sum()), int(ev.loss[mask].sum()))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 400), tau=st.floats(0.3, 1.0),
       eps=st.floats(0.001, 0.6), delta=DELTAS, composite=st.booleans())
def test_budget_status_is_realised_risk_over_eps_on_hand_counts(seed, n, tau, eps, delta, composite):
    rng = np.random.default_rng(seed)
    logs = _logs(rng, n)
    keys = ("region", "device") if composite else ("region",)
    names = ["north|a", "west|b", "east|a"] if composite else ["north", "west", "east"]  # east: never in the logs
    doc = _doc(tau, keys=keys, eps=eps,
               segments={v: {"eps": eps / 2, "n": 1, "upper_bound": None, "certified": True} for v in names})
    ev = evaluate(doc, logs)
    checks = check_budgets(ev, doc, delta)
    want = _by_hand(ev, logs, doc)
    assert [c.segment for c in checks] == list(want)
    for c in checks:
        rows, k = want[c.segment]
        assert (c.n, c.eps, c.delta) == (rows, eps if c.segment == ALL else eps / 2, delta)
        if rows == 0:
            assert c.status == "no rows" and c.risk is None and c.interval is None and not c.over
            continue
        assert c.losses == k and c.risk == k / rows
        assert c.status == ("over" if k / rows > c.eps else "under") and c.over == (k / rows > c.eps)
        lo, hi = c.interval
        assert (lo, hi) == risk_interval(k, rows, delta) and lo <= c.risk <= hi
        assert c.significantly_over == (lo > c.eps)
        assert not c.significantly_over or c.over
        assert c.to_json()["status"] == c.status and c.to_json()["risk_interval"] == [lo, hi]


def test_budgets_are_on_the_guaranteed_risk_whatever_risk_is_reported():
    rng = np.random.default_rng(7)
    logs = _logs(rng, 500)
    doc = _doc(0.4, risk="induced_error", eps=0.01)
    ev = evaluate(doc, logs, risk="disagreement")
    (overall,) = check_budgets(ev, doc)
    assert overall.risk_type == "induced_error" and overall.risk == ev.induced_error
    assert overall.risk != ev.risk and overall.delta == 0.05
    unlabelled = _logs(np.random.default_rng(7), 500, labels=False)
    (overall,) = check_budgets(evaluate(doc, unlabelled, risk="disagreement"), doc)
    assert overall.status == "unmeasured" and overall.losses is None and not overall.over
    assert overall.to_json()["risk_interval"] is None


def test_a_policy_at_full_depth_is_under_every_budget_and_bad_guarantees_are_refused():
    logs = _logs(np.random.default_rng(3), 200)
    doc = _doc(0.5, segments={"north": {"eps": 0.001, "n": 1, "upper_bound": None, "certified": False}})
    doc["thresholds"] = {"default": None}
    checks = check_budgets(evaluate(doc, logs), doc)
    assert [(c.segment, c.losses, c.status) for c in checks] == [(ALL, 0, "under"), ("north", 0, "under")]
    with pytest.raises(InputError, match="no guarantee"):
        check_budgets(evaluate(doc, logs), {**doc, "guarantee": {"risk": "disagreement"}})
    with pytest.raises(InputError, match="delta"):
        check_budgets(evaluate(doc, logs, delta=None).with_delta(None), {**doc, "guarantee": {
            "risk": "disagreement", "eps": 0.1}})


def test_over_by_a_hair_is_over_but_not_significantly():
    c = BudgetCheck(segment=ALL, eps=0.02, risk_type="disagreement", n=1000, losses=21, delta=0.05)
    assert c.over and not c.significantly_over and c.interval[0] < 0.02 < c.interval[1]
    c = BudgetCheck(segment=ALL, eps=0.02, risk_type="disagreement", n=100_000, losses=2410, delta=0.05)
    assert c.over and c.significantly_over  # the user's 2.41% against 2%, on enough rows
    c = BudgetCheck(segment=ALL, eps=0.02, risk_type="disagreement", n=1000, losses=20, delta=0.05)
    assert c.status == "under"  # exactly at the budget is not over it
