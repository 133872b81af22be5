"""Monitoring: addable shadow summaries, drift statistics and the verdict, on synthetic logs and a solved policy."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from exitwise.calibration.evaluate import evaluate
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.metrics import exit_metrics, expected_calibration_error
from exitwise.calibration.monitor import (
    RELIABILITY_BINS,
    DriftRules,
    ShadowSummary,
    assess,
    constrained_segments,
    homogeneity_p_value,
    population_stability_index,
    score_reference,
    start_bounds,
    summarise_shadow,
    update_bounds,
)
from exitwise.calibration.pipeline import SolveSpec, parse_budgets
from exitwise.calibration.rule import exit_scores
from exitwise.calibration.sequential import RiskBound
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies.authoring import solve_policy

SHAPE: dict[str, Any] = {"n_exits": 3, "n_classes": 4, "segments": {"region": 2}}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    """A policy solved on synthetic logs: ε 0.05 overall, 0.1 per region (three constrained segments)."""
    cal = synthetic_logs(4000, seed=1, **SHAPE)
    spec = SolveSpec(eps=0.05, segment_keys=("region",), segment_budgets=parse_budgets(["*=0.1"]))
    return solve_policy(cal, spec, baselines=()).document


@pytest.fixture(scope="module")
def fresh() -> ExitLogs:
    """New traffic from the calibration distribution."""
    return synthetic_logs(3000, seed=2, **SHAPE)


@pytest.fixture(scope="module")
def shifted() -> ExitLogs:
    """Traffic whose early exits are much less sure of themselves (a weaker signal at depth 0)."""
    return synthetic_logs(3000, seed=3, signal=(0.5, 5.5), **SHAPE)


def _same(a: ShadowSummary, b: ShadowSummary) -> None:
    """Counts equal exactly, float sums (cost, confidences) to rounding."""
    ja, jb = a.to_json(), b.to_json()
    assert {k: ja[k] for k in ("n", "risk", "segments", "exit_counts", "score_counts")} == \
           {k: jb[k] for k in ("n", "risk", "segments", "exit_counts", "score_counts")}
    assert ja["cost_sum"] == pytest.approx(jb["cost_sum"], rel=1e-12)
    if ja["reliability"] is None:
        assert jb["reliability"] is None
    else:
        assert np.allclose(ja["reliability"], jb["reliability"], rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------- summaries

@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 2999), min_size=2, max_size=2, unique=True))
def test_merge_is_associative_commutative_and_the_summary_of_all_rows(doc, fresh, cuts):
    i, j = sorted(cuts)
    a, b, c = (summarise_shadow(doc, fresh.take(np.arange(lo, hi))) for lo, hi in ((0, i), (i, j), (j, fresh.n)))
    whole = summarise_shadow(doc, fresh)
    _same(a.merge(b).merge(c), whole)
    _same(a.merge(b.merge(c)), whole)
    _same(c.merge(a).merge(b), whole)
    _same(a.merge(b), b.merge(a))


def test_summary_counts_what_the_policy_does(doc, fresh):
    s = summarise_shadow(doc, fresh)
    ev = evaluate(doc, fresh)
    regions = fresh.segments["region"].values()
    assert s.n == fresh.n and s.risk == "disagreement"
    assert s.segments["__all__"] == (fresh.n, int(ev.loss.sum()))
    for name in ("region_0", "region_1"):
        mask = regions == name
        assert s.segments[name] == (int(mask.sum()), int(ev.loss[mask].sum()))
    assert s.exit_counts == tuple(int(c) for c in np.bincount(ev.exit, minlength=3))
    assert s.compute_fraction == pytest.approx(ev.compute_fraction, rel=1e-12)
    assert s.exit_rate == pytest.approx(list(ev.exit_rate))
    assert s.score_counts is not None and all(sum(c) == fresh.n for c in s.score_counts)


def test_summary_json_round_trip(doc, fresh):
    s = summarise_shadow(doc, fresh)
    back = ShadowSummary.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s
    unmeasured = _induced_error_unlabelled(doc, fresh)
    assert ShadowSummary.from_json(json.loads(json.dumps(unmeasured.to_json()))) == unmeasured


def _induced_error_unlabelled(doc: dict[str, Any], logs: ExitLogs) -> ShadowSummary:
    d = {**doc, "guarantee": {**doc["guarantee"], "risk": "induced_error"}}
    return summarise_shadow(d, ExitLogs(logits=logs.logits, card=logs.card, segments=logs.segments))


def test_unmeasurable_losses_stay_unmeasured(doc, fresh):
    s = _induced_error_unlabelled(doc, fresh)
    assert all(losses is None for _, losses in s.segments.values())
    labelled = summarise_shadow({**doc, "guarantee": {**doc["guarantee"], "risk": "induced_error"}}, fresh)
    assert all(losses is not None for _, losses in labelled.segments.values())
    assert s.merge(labelled).segments["__all__"] == (2 * fresh.n, None)
    bounds = start_bounds(doc)
    assert update_bounds(bounds, s) == bounds  # nothing to add
    a = assess(doc, bounds, s, s)
    assert a.extra["unmeasured_segments"] == ["__all__", "region_0", "region_1"]


def test_merge_refuses_another_policy(doc, fresh):
    s = summarise_shadow(doc, fresh)
    other = summarise_shadow({**doc, "guarantee": {**doc["guarantee"], "risk": "induced_error"}}, fresh)
    with pytest.raises(InputError, match="different policies"):
        s.merge(other)


def test_document_without_reference_has_no_score_counts_and_no_psi(doc, shifted):
    plain = {**doc, "calibration": {k: v for k, v in doc["calibration"].items() if k != "reference"}}
    s = summarise_shadow(plain, shifted)
    assert s.score_counts is None and s.reliability is not None
    a = assess(plain, start_bounds(plain), s, s)
    assert [(r["psi"], r["p_value"]) for r in a.drift] == [(None, None)] * 3
    assert not any("input drift" in r for r in a.reasons)


# ---------------------------------------------------------------- drift statistics

@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=2, max_size=20), st.integers(1, 50))
def test_psi_is_zero_for_the_same_distribution(counts, scale):
    assert population_stability_index(counts, [scale * c for c in counts]) == pytest.approx(0.0, abs=1e-12)
    assert homogeneity_p_value(counts, [scale * c for c in counts]) == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(10, 10_000), min_size=2, max_size=20), st.integers(0, 19), st.data())
def test_psi_grows_with_a_shift(counts, target, data):
    """Moving mass towards one bin step by step: PSI >= 0, symmetric, and increasing."""
    p = np.asarray(counts, dtype=np.float64)
    p /= p.sum()
    spike = np.zeros_like(p)
    spike[target % p.size] = 1.0
    other = np.asarray(data.draw(st.lists(st.integers(1, 100), min_size=p.size, max_size=p.size)), dtype=float)
    assert population_stability_index(p, other) >= 0.0
    assert population_stability_index(p, other) == pytest.approx(population_stability_index(other, p))
    psi = [population_stability_index(p, (1 - t) * p + t * spike) for t in np.linspace(0.0, 0.9, 10)]
    assert psi[0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(psi) > 0)


def test_homogeneity_p_value_under_the_null_and_a_shift():
    rng = np.random.default_rng(5)
    probs = np.full(10, 0.1)
    pvals = [homogeneity_p_value(rng.multinomial(2000, probs), rng.multinomial(1500, probs)) for _ in range(400)]
    assert stats.kstest(pvals, "uniform").pvalue > 0.001  # uniform under the null
    shifted = np.r_[np.full(5, 0.06), np.full(5, 0.14)]
    assert homogeneity_p_value(rng.multinomial(2000, probs), rng.multinomial(1500, shifted)) < 1e-10
    assert homogeneity_p_value([0, 10, 0], [0, 7, 0]) == 1.0  # one non-empty bin: nothing to test
    assert homogeneity_p_value([5, 5], [0, 0]) == 1.0


def test_reference_bins_hold_equal_shares():
    rng = np.random.default_rng(0)
    scores = np.c_[rng.random(5000), np.round(rng.random(5000), 1)]  # the second exit has ties
    ref = score_reference(scores)
    assert ref["n"] == 5000 and len(ref["edges"]) == len(ref["counts"]) == 2
    assert sum(ref["counts"][0]) == sum(ref["counts"][1]) == 5000
    assert len(ref["counts"][0]) == 10 and max(ref["counts"][0]) - min(ref["counts"][0]) <= 2
    assert len(ref["counts"][1]) == len(ref["edges"][1]) + 1 <= 10
    with pytest.raises(InputError, match="score reference"):
        score_reference(np.zeros((0, 2)))


def test_shifted_traffic_has_a_large_psi_at_the_first_exit(doc, fresh, shifted):
    ref = doc["calibration"]["reference"]["counts"]
    same, moved = summarise_shadow(doc, fresh).score_counts, summarise_shadow(doc, shifted).score_counts
    assert population_stability_index(ref[0], same[0]) < 0.05
    assert population_stability_index(ref[0], moved[0]) > 1.0
    assert homogeneity_p_value(ref[0], moved[0]) < 1e-10


def test_ece_from_summed_bins_is_the_metric(doc, fresh):
    """The ECE of merged summaries equals expected_calibration_error on the rows, per exit."""
    parts = [summarise_shadow(doc, fresh.take(np.arange(lo, lo + 1000))) for lo in (0, 1000, 2000)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    calibrators = [e["calibrator"] for e in doc["exits"]]
    final = exit_scores(fresh.logits[:, -1, :], calibrators[-1], "max_prob")[1]
    for k, ece in enumerate(merged.ece() or []):
        conf, pred = exit_scores(fresh.logits[:, k, :], calibrators[k], "max_prob")
        assert ece == pytest.approx(expected_calibration_error(conf, pred == final, RELIABILITY_BINS), abs=1e-12)
    # against the labels when that is the calibration target
    labels_doc = {**doc, "calibration": {**doc["calibration"], "target": "labels"}}
    s = summarise_shadow(labels_doc, fresh)
    conf, pred = exit_scores(fresh.logits[:, 0, :], calibrators[0], "max_prob")
    assert (s.ece() or [])[0] == pytest.approx(expected_calibration_error(conf, pred == fresh.labels), abs=1e-12)
    unlabelled = ExitLogs(logits=fresh.logits, card=fresh.card, segments=fresh.segments)
    assert summarise_shadow(labels_doc, unlabelled).ece() is None


@pytest.mark.parametrize("calibrator", [None, {"type": "platt", "coef": [0.8, 0.5, 0.3], "intercept": -0.2}])
def test_ece_is_measured_as_at_certification(doc, fresh, calibrator):
    """Shadow ECE is the document's ``calibration.exits[k].after.ece`` measure (exit_metrics against
    the final exit's answer) on the same rows, for temperature and Platt calibrators alike."""
    exits = [dict(e) for e in doc["exits"]]
    if calibrator is not None:
        exits[0]["calibrator"] = calibrator
    d = {**doc, "exits": exits}
    final = np.argmax(fresh.logits[:, -1, :], axis=1)
    for k, ece in enumerate(summarise_shadow(d, fresh).ece() or []):
        expected = exit_metrics(fresh.logits[:, k, :], final, exits[k]["calibrator"], RELIABILITY_BINS).ece
        assert ece == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- segments, bounds and the verdict

def test_constrained_segments():
    budgets = {"guarantee": {"eps": 0.01, "segments": {"__all__": {"eps": 0.01}, "eu": {"eps": 0.03},
                                                         "us": {"eps": 0.02}, "apac": {"n": 10}}}}
    assert constrained_segments(budgets) == {"__all__": 0.01, "eu": 0.03, "us": 0.02}
    assert list(constrained_segments(budgets)) == ["__all__", "eu", "us"]
    assert constrained_segments({"guarantee": {"eps": 0.02}}) == {"__all__": 0.02}
    assert constrained_segments({"guarantee": {"eps": 0.02, "segments": {}}}) == {"__all__": 0.02}
    assert constrained_segments({}) == {}


def test_delta_is_split_over_the_constrained_segments(doc):
    bounds = start_bounds(doc)
    assert {k: b.eps for k, b in bounds.items()} == constrained_segments(doc) == \
           {"__all__": 0.05, "region_0": 0.1, "region_1": 0.1}
    assert all(b.delta == pytest.approx(0.05 / 3) for b in bounds.values())
    assert start_bounds({"guarantee": {"eps": 0.02, "delta": 0.1}})["__all__"].delta == 0.1


def _batch(segments: dict[str, tuple[int, int | None]], n: int) -> ShadowSummary:
    return ShadowSummary(n=n, risk="disagreement", segments=segments, exit_counts=(n, 0, 0), cost_sum=0.3 * n)


def test_update_bounds_adds_counts(doc):
    bounds = start_bounds(doc)
    for _ in range(2):
        bounds = update_bounds(bounds, _batch({"__all__": (1000, 30), "region_0": (600, 10)}, 1000))
    assert (bounds["__all__"].n, bounds["__all__"].losses) == (2000, 60)
    assert (bounds["region_0"].n, bounds["region_0"].losses) == (1200, 20)
    assert (bounds["region_1"].n, bounds["region_1"].losses) == (0, 0)  # no rows in it: unchanged


def test_ok_for_fresh_traffic(doc, fresh):
    s = summarise_shadow(doc, fresh)
    a = assess(doc, update_bounds(start_bounds(doc), s), s, s)
    assert a.verdict == "ok" and a.reasons == () and a.recommendation is None
    assert a.n == fresh.n and a.compute_fraction == s.compute_fraction
    assert a.expected_compute_fraction == doc["expected"]["compute_fraction"]
    out = a.to_json()
    assert {v["status"] for v in out["segments"].values()} <= {"safe", "inconclusive"}
    json.dumps(out)


def test_watch_on_drift_alone(doc, fresh, shifted):
    """Risk well under ε everywhere, but the window's scores have moved: watch, naming exit and PSI."""
    bounds = update_bounds(start_bounds(doc), summarise_shadow(doc, fresh))
    window = summarise_shadow(doc, shifted)
    a = assess(doc, bounds, window, window)
    assert a.verdict == "watch" and not any(b.breached for b in a.segments.values())
    first = doc["exits"][0]["name"]
    row = next(r for r in a.drift if r["exit"] == first)
    assert f"input drift at exit {first}: score PSI {row['psi']:.3f} >= 0.2" in a.reasons[0]
    assert any(f"calibration drift at exit {first}" in r for r in a.reasons)
    assert a.recommendation is not None and a.reasons[0] in a.recommendation
    # too few rows in the window for drift statistics: no verdict from drift
    quiet = assess(doc, bounds, window, window, DriftRules(min_rows=window.n + 1))
    assert quiet.verdict == "ok" and all(r["psi"] is None for r in quiet.drift)


def test_a_realised_risk_over_eps_that_the_bound_does_not_confirm_is_ok_and_inconclusive(doc):
    bounds = update_bounds(start_bounds(doc), _batch({"__all__": (1000, 30), "region_1": (600, 66)}, 1000))
    b = bounds["region_1"]
    assert b.risk == pytest.approx(0.11) and not b.breached
    a = assess(doc, bounds, None, None)
    assert a.verdict == "ok" and a.reasons == () and a.drift == () and a.n == 0
    assert a.to_json()["segments"]["region_1"]["status"] == "inconclusive"


def test_breach_when_the_lower_bound_is_over_eps(doc, shifted):
    bounds = update_bounds(start_bounds(doc), _batch({"__all__": (4000, 150), "region_0": (2000, 400)}, 4000))
    b = bounds["region_0"]
    assert b.lower > 0.1 and not bounds["__all__"].breached
    window = summarise_shadow(doc, shifted)  # drift as well: the breach comes first
    a = assess(doc, bounds, window, window)
    assert a.verdict == "breach"
    assert a.reasons[0] == (f"risk over budget in segment region_0: 400/2000 = 20.00%, lower bound "
                            f"{100 * b.lower:.2f}% > eps 10.00% (e-value {b.e_value:.3g} >= 1/delta = 60)")
    assert any("input drift" in r for r in a.reasons[1:])
    assert "region_0" in (a.recommendation or "") and f"{100 * b.lower:.2f}%" in (a.recommendation or "")
    statuses = {k: v["status"] for k, v in a.to_json()["segments"].items()}
    assert statuses == {"__all__": "safe" if bounds["__all__"].safe else "inconclusive", "region_0": "breach",
                        "region_1": "no data"}


def test_breach_needs_the_whole_interval_over_eps():
    """Just over ε with few rows is no breach; the same rate with many rows is."""
    b = RiskBound.start(0.05, 0.05)
    doc = {"exits": [{"name": "e0"}], "guarantee": {"eps": 0.05}}
    assert assess(doc, {"__all__": b.update(200, 14)}, None, None).verdict == "ok"  # under min_rows
    assert assess(doc, {"__all__": b.update(600, 42)}, None, None).verdict == "ok"  # 7% but inconclusive
    big = b.update(60_000, 4200)
    assert big.breached and assess(doc, {"__all__": big}, None, None).verdict == "breach"
    assert math.isclose(big.risk or 0.0, 0.07)
