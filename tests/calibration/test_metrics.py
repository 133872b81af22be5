"""Calibration metrics against straightforward per-sample loops; properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.metrics import (
    exit_metrics,
    exit_metrics_multi,
    expected_calibration_error,
    maximum_calibration_error,
    metrics_from_probs,
    reliability_diagram,
)
from exitwise.calibration.rule import softmax

# ----------------------------------------------------------------------------- references


def _loop_bins_width(conf, n_bins):
    """Guo et al. (2017): bin m (0-based) holds conf in (m/M, (m+1)/M]; conf = 0 goes to bin 0."""
    bins = [[] for _ in range(n_bins)]
    for i, c in enumerate(conf):
        m = max(0, math.ceil(c * n_bins) - 1)
        bins[min(m, n_bins - 1)].append(i)
    return bins


def _loop_bins_mass(conf, correct, n_bins):
    """Nixon et al. (2019): sort by confidence (ties: incorrect first), cut into n_bins equal counts."""
    order = sorted(range(len(conf)), key=lambda i: (conf[i], bool(correct[i])))
    n = len(conf)
    return [order[m * n // n_bins:(m + 1) * n // n_bins] for m in range(n_bins)]


def _loop_ece_mce(conf, correct, bins):
    n = len(conf)
    ece, mce = 0.0, 0.0
    for b in bins:
        if not b:
            continue
        acc = sum(bool(correct[i]) for i in b) / len(b)
        avg = sum(conf[i] for i in b) / len(b)
        ece += len(b) / n * abs(acc - avg)
        mce = max(mce, abs(acc - avg))
    return ece, mce


def _loop_metrics(p, y):
    n, c = len(p), len(p[0])
    acc = nll = brier = 0.0
    for i in range(n):
        pred = max(range(c), key=lambda j: (p[i][j], -j))
        acc += pred == y[i]
        nll -= math.log(p[i][y[i]])
        brier += sum((p[i][j] - (j == y[i])) ** 2 for j in range(c))
    return acc / n, nll / n, brier / n


def _data(n, c, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * scale
    y = rng.integers(0, c, n)
    return z, y


# ----------------------------------------------------------------------------- peers


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
def test_ece_mce_match_a_plain_loop(n_bins):
    rng = np.random.default_rng(n_bins)
    conf = rng.uniform(0.05, 1.0, 3000)
    conf[:10] = np.linspace(0, 1, 10)  # include exact edges and 0
    correct = rng.random(3000) < conf ** 1.5
    ece_ref, mce_ref = _loop_ece_mce(conf, correct, _loop_bins_width(conf, n_bins))
    assert expected_calibration_error(conf, correct, n_bins) == pytest.approx(ece_ref, abs=1e-12)
    assert maximum_calibration_error(conf, correct, n_bins) == pytest.approx(mce_ref, abs=1e-12)
    mass_ref, _ = _loop_ece_mce(conf, correct, _loop_bins_mass(conf, correct, n_bins))
    assert expected_calibration_error(conf, correct, n_bins, "mass") == pytest.approx(mass_ref, abs=1e-12)


def test_mass_bins_with_ties_follow_the_documented_order():
    conf = np.array([0.5] * 6 + [0.9] * 4)
    correct = np.array([1, 0, 1, 0, 1, 0, 1, 1, 0, 1], dtype=bool)
    ref, _ = _loop_ece_mce(conf, correct, _loop_bins_mass(conf, correct, 4))
    assert expected_calibration_error(conf, correct, 4, "mass") == pytest.approx(ref, abs=1e-15)


def test_reliability_data_matches_the_loop():
    rng = np.random.default_rng(1)
    conf = rng.random(500)
    correct = rng.random(500) < conf
    d = reliability_diagram(conf, correct, 10)
    bins = _loop_bins_width(conf, 10)
    np.testing.assert_array_equal(d.count, [len(b) for b in bins])
    np.testing.assert_array_equal(d.edges, np.linspace(0, 1, 11))
    for m, b in enumerate(bins):
        if b:
            assert d.confidence[m] == pytest.approx(np.mean(conf[b]), abs=1e-12)
            assert d.accuracy[m] == pytest.approx(np.mean(correct[b]), abs=1e-12)
        else:
            assert np.isnan(d.confidence[m]) and np.isnan(d.accuracy[m])
    mass = reliability_diagram(conf, correct, 10, "mass")
    assert list(mass.count) == [50] * 10
    assert mass.edges[0] == 0.0 and mass.edges[-1] == 1.0 and np.all(np.diff(mass.edges) >= 0)
    js = d.to_dict()
    assert js["binning"] == "width" and len(js["count"]) == 10 and sum(js["count"]) == 500


@pytest.mark.parametrize("cal", [{"type": "identity"}, {"type": "temperature", "temperature": 1.7},
                                 {"type": "platt", "coef": [0.8, 0.5, 1.0], "intercept": -0.3}])
def test_exit_metrics_match_a_plain_loop(cal):
    z, y = _data(400, 4, seed=2)
    m = exit_metrics(z, y, cal, n_bins=10)
    from exitwise.calibration.rule import calibrated_probs

    p = calibrated_probs(z, cal)[0]
    acc, nll, brier = _loop_metrics(p.tolist(), y.tolist())
    assert m.n == 400
    assert m.accuracy == pytest.approx(acc, abs=1e-12)
    assert m.nll == pytest.approx(nll, rel=1e-12)
    assert m.brier == pytest.approx(brier, rel=1e-12)
    pred = z.argmax(axis=1)
    conf = p[np.arange(400), pred]
    ece, mce = _loop_ece_mce(conf, pred == y, _loop_bins_width(conf, 10))
    assert (m.ece, m.mce) == (pytest.approx(ece, abs=1e-12), pytest.approx(mce, abs=1e-12))


def test_exit_metrics_equal_metrics_from_probs_and_multi():
    z, y = _data(50_000, 10, seed=3)  # several row blocks
    cal = {"type": "temperature", "temperature": 2.5}
    a = exit_metrics(z.astype(np.float32), y, cal)
    b = metrics_from_probs(softmax(z.astype(np.float32), 2.5), y)
    for key, value in a.to_dict().items():
        assert value == pytest.approx(b.to_dict()[key], rel=1e-9, abs=1e-12), key
    before, after = exit_metrics_multi(z.astype(np.float32), y, [None, cal])
    assert after.to_dict() == a.to_dict()
    assert before.to_dict() == exit_metrics(z.astype(np.float32), y).to_dict()


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 200), elements=st.floats(0.0, 1.0)),
    st.integers(0, 2**31 - 1),
    st.integers(1, 30),
    st.sampled_from(["width", "mass"]),
)
def test_ece_and_mce_stay_in_unit_interval(conf, seed, n_bins, binning):
    correct = np.random.default_rng(seed).random(conf.shape[0]) < 0.5
    d = reliability_diagram(conf, correct, n_bins, binning)
    assert 0.0 <= d.ece() <= d.mce() + 1e-12
    assert d.mce() <= 1.0 + 1e-12  # a bin mean may round one ulp above 1
    assert d.count.sum() == conf.shape[0]
    if binning == "mass":
        assert d.count.max() - d.count.min() <= 1


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 5, 10]), st.floats(0.5, 4.0))
def test_ece_of_perfectly_calibrated_data_is_near_zero(seed, c, scale):
    """Labels drawn from the predicted distribution: only sampling noise remains.

    With n = 40000 and 15 bins the noise is about sum_m w_m sqrt(acc_m (1 - acc_m) / n_m)
    <= sqrt(15 / n) / 2 ~ 0.01; we allow 0.02 (equal-width and equal-mass).
    """
    rng = np.random.default_rng(seed)
    n = 40_000
    z = rng.standard_normal((n, c)) * scale
    p = softmax(z)
    y = np.minimum((p.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1), c - 1)
    m = exit_metrics(z, y)
    assert m.ece < 0.02 and m.ece_mass < 0.02


def test_miscalibrated_data_has_large_ece():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20_000, 5)) * 3
    y = np.minimum((softmax(z, 3.0).cumsum(axis=1) < rng.random(20_000)[:, None]).sum(axis=1), 4)
    assert exit_metrics(z, y).ece > 0.1  # true T = 3: softmax(z) is over-confident
    assert exit_metrics(z, y, {"type": "temperature", "temperature": 3.0}).ece < 0.02


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: exit_metrics(np.array([[0.0, np.nan]]), [0]), "finite; found nan at sample 0, class 1"),
        (lambda: exit_metrics(np.zeros((2, 3)), [0, 5]), r"labels\[1\] = 5"),
        (lambda: exit_metrics(np.zeros((2, 3)), [0]), "shape"),
        (lambda: exit_metrics(np.zeros((2, 3)), [0, 1], n_bins=0), "n_bins"),
        (lambda: exit_metrics(np.zeros((2, 3)), [0, 1], calibrator=3), "calibrator"),
        (lambda: reliability_diagram([0.5, 1.5], [True, False]), r"in \[0, 1\]"),
        (lambda: reliability_diagram([0.5], [True, False]), "equal length"),
        (lambda: reliability_diagram([0.5], [True], binning="quantile"), "binning"),
        (lambda: metrics_from_probs(np.array([[-0.1, 1.1]]), [0]), "non-negative"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(InputError, match=match):
        call()
