"""Calibrators: properties (hypothesis), peer agreement, estimator contract, (de)serialisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from scipy.special import expit
from temperature_reference import T_RTOL, reference_temperature

from exitwise.calibration.calibrators import (
    IdentityCalibrator,
    PlattScaler,
    TemperatureScaler,
    calibrator_from_dict,
)
from exitwise.calibration.exceptions import CalibrationError, InputError, NotFittedError
from exitwise.calibration.metrics import exit_metrics
from exitwise.calibration.rule import calibrated_probs, platt_features, softmax

# Tolerances. The temperature search evaluates NLL' in float32 (accumulated in float64) and
# stops when the Newton step in log T is below 1e-6, so T is exact to ~1e-5 relative; we
# compare with 1e-4.


def _logits(n: int, c: int, scale: float, seed: int, margin: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Logits with the label boosted by ``margin`` (so T is informative), times ``scale``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.standard_normal((n, c))
    z[np.arange(n), y] += margin
    return (z * scale).astype(np.float32), y


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


# ----------------------------------------------------------------------------- properties

sizes = st.tuples(st.integers(20, 300), st.integers(2, 8))
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.01, 0.3, 1.0, 3.0, 20.0])


@settings(max_examples=40, deadline=None)
@given(sizes, seeds, scales, st.floats(-1e3, 1e3))
def test_temperature_invariant_to_per_row_logit_shifts(size, seed, scale, offset):
    n, c = size
    z, y = _logits(n, c, scale, seed)
    shift = np.random.default_rng(seed + 1).uniform(-1.0, 1.0, n) * offset
    t1 = TemperatureScaler().fit(z.astype(np.float64), y).temperature_
    t2 = TemperatureScaler().fit(z.astype(np.float64) + shift[:, None], y).temperature_
    assert t2 == pytest.approx(t1, rel=T_RTOL)


@settings(max_examples=30, deadline=None)
@given(sizes, seeds, scales)
def test_temperature_one_is_the_identity(size, seed, scale):
    z, _ = _logits(*size, scale, seed)
    t1 = TemperatureScaler.from_dict({"type": "temperature", "temperature": 1.0})
    ident = calibrator_from_dict({"type": "identity"})
    np.testing.assert_array_equal(t1.predict_proba(z), softmax(z))
    np.testing.assert_array_equal(t1.predict_proba(z), ident.predict_proba(z))


@settings(max_examples=40, deadline=None)
@given(sizes, seeds, scales, st.floats(0.05, 20.0), st.floats(1e-3, 5.0), st.data())
def test_calibrated_probs_monotone_in_logits(size, seed, scale, temperature, delta, data):
    """Raising one logit raises that class's probability and lowers every other."""
    n, c = size
    z, _ = _logits(n, c, scale, seed)
    j = data.draw(st.integers(0, c - 1))
    for cal in ({"type": "identity"}, {"type": "temperature", "temperature": temperature}):
        p0 = calibrated_probs(z.astype(np.float64), cal)[0]
        z2 = z.astype(np.float64)
        z2[:, j] += delta
        p1 = calibrated_probs(z2, cal)[0]
        others = np.delete(np.arange(c), j)
        assert np.all(p1[:, j] >= p0[:, j] - 1e-15)
        assert np.all(p1[:, others] <= p0[:, others] + 1e-15)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes, seeds, scales, st.floats(-2.0, 4.0))
def test_temperature_nll_never_worse_than_identity_on_fit_split(size, seed, scale, margin):
    n, c = size
    z, y = _logits(n, c, scale, seed, margin)
    cal = TemperatureScaler().fit(z, y)
    before = exit_metrics(z, y, None).nll
    after = exit_metrics(z, y, cal).nll
    assert after <= before + 1e-9 * max(1.0, before)


def test_temperature_recovered_on_perfectly_calibrated_data():
    """Labels drawn from softmax(z / 2): the fitted T is 2 up to sampling error."""
    rng = np.random.default_rng(5)
    n, c = 200_000, 6
    z = rng.standard_normal((n, c)) * 4.0
    p = softmax(z, 2.0)
    y = (p.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1)
    cal = TemperatureScaler().fit(z.astype(np.float32), y)
    assert cal.temperature_ == pytest.approx(2.0, rel=0.02)


# ----------------------------------------------------------------------------- peers


@pytest.mark.parametrize("scale", [0.02, 0.3, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("c", [2, 10])
def test_temperature_matches_scipy_reference(scale, c):
    z, y = _logits(5000, c, scale, seed=int(scale * 100) + c)
    ours = TemperatureScaler().fit(z, y).temperature_
    assert ours == pytest.approx(reference_temperature(z, y), rel=T_RTOL)


def test_temperature_matches_scikit_learn_calibratedclassifiercv():
    """scikit-learn >= 1.8 fits temperature scaling itself (CalibratedClassifierCV(method='temperature'))."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    if (major, minor) < (1, 8):
        pytest.skip(f"scikit-learn {sklearn.__version__} has no temperature scaling")

    class Logits(ClassifierMixin, BaseEstimator):
        """A 'classifier' whose decision function is its input: the exit's logits."""

        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            return self

        def decision_function(self, x):
            return np.asarray(x, dtype=np.float64)

        def predict(self, x):
            return np.argmax(x, axis=1)

    for scale, seed in [(0.3, 1), (8.0, 3)]:
        z, y = _logits(2000, 5, scale, seed)
        z64 = z.astype(np.float64)
        peer = CalibratedClassifierCV(FrozenEstimator(Logits().fit(z64, y)), method="temperature").fit(z64, y)
        beta = float(peer.calibrated_classifiers_[0].calibrators[0].beta_)
        ours = TemperatureScaler().fit(z, y)
        assert ours.temperature_ == pytest.approx(1.0 / beta, rel=T_RTOL)
        np.testing.assert_allclose(ours.predict_proba(z64), peer.predict_proba(z64), atol=1e-4)


def test_platt_matches_independent_logistic_fit():
    """Same objective written independently: smoothed-target logistic loss on raw features, BFGS."""
    z, y = _logits(6000, 5, 1.0, seed=11, margin=1.0)
    z64 = z.astype(np.float64)
    pred = z64.argmax(axis=1)
    phi = platt_features(softmax(z64), pred)
    pos = pred == y
    t = np.where(pos, (pos.sum() + 1) / (pos.sum() + 2), 1 / ((~pos).sum() + 2))
    x = np.column_stack([phi, np.ones(len(y))])

    def loss(theta):
        s = x @ theta
        return np.mean(np.logaddexp(0, s) - t * s), x.T @ (expit(s) - t) / len(y)

    ref = minimize(loss, np.zeros(4), jac=True, method="BFGS", options={"gtol": 1e-10})
    ours = PlattScaler(alpha=0.0).fit(z, y)
    conf_ref = expit(x @ ref.x)
    conf_ours = ours.predict_proba(z64)[np.arange(len(y)), pred]
    np.testing.assert_allclose(conf_ours, conf_ref, atol=1e-4)


def test_platt_probabilities_are_a_distribution_and_keep_the_answer_probability():
    z, y = _logits(2000, 4, 1.0, seed=3)
    cal = PlattScaler().fit(z, y)
    p = cal.predict_proba(z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert cal.coef_.shape == (3,) and np.isfinite(cal.intercept_)
    d = cal.to_dict()
    assert d["type"] == "platt" and len(d["coef"]) == 3
    # the answer's probability is the fitted P(correct)
    phi = platt_features(softmax(z), z.argmax(axis=1))
    np.testing.assert_allclose(p[np.arange(len(y)), z.argmax(axis=1)], expit(phi @ cal.coef_ + cal.intercept_))


# ----------------------------------------------------------------------------- stability


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_temperature_stable_for_extreme_confidence(scale):
    """Very under-confident (tiny logits) and very over-confident (huge logits) exits."""
    z, y = _logits(3000, 10, scale, seed=7)
    cal = TemperatureScaler(bounds=(1e-5, 1e5)).fit(z, y)
    assert np.isfinite(cal.temperature_)
    assert cal.temperature_ == pytest.approx(reference_temperature(z, y, (1e-5, 1e5)), rel=T_RTOL)
    assert not cal.at_bound_


def test_temperature_at_bounds():
    z, y = _logits(3000, 10, 1000.0, seed=7)  # needs T ~ 700 > upper bound 100
    cal = TemperatureScaler().fit(z, y)
    assert cal.temperature_ == 100.0 and cal.at_bound_
    # every answer right: the NLL keeps falling as T -> 0, so T is the lower bound
    z2 = np.eye(5)[np.arange(100) % 5] * 3.0
    cal2 = TemperatureScaler().fit(z2, np.arange(100) % 5)
    assert cal2.temperature_ == 0.01 and cal2.at_bound_
    # constant rows carry no information about T
    assert TemperatureScaler().fit(np.zeros((10, 3)), np.zeros(10, int)).temperature_ == 1.0


def test_temperature_float64_logits_with_a_huge_offset():
    z, y = _logits(2000, 6, 2.0, seed=9)
    t = TemperatureScaler().fit(z, y).temperature_
    assert TemperatureScaler().fit(z.astype(np.float64) + 1e7, y).temperature_ == pytest.approx(t, rel=T_RTOL)


def test_temperature_large_n_uses_few_passes():
    z, y = _logits(70_000, 10, 3.0, seed=4)  # > 2 x 32768 rows: warm start on a subsample
    cal = TemperatureScaler().fit(z, y)
    assert cal.n_iter_ <= 4
    assert cal.temperature_ == pytest.approx(reference_temperature(z, y), rel=T_RTOL)


def test_temperature_failure_quotes_the_optimiser():
    z, y = _logits(500, 4, 1.0, seed=1)
    with pytest.raises(CalibrationError, match="no convergence in 1 Newton steps"):
        TemperatureScaler(max_iter=1).fit(z, y)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("cls", [TemperatureScaler, PlattScaler, IdentityCalibrator])
def test_estimator_contract(cls):
    z, y = _logits(300, 4, 1.0, seed=2)
    est = cls()
    assert not any(k.endswith("_") for k in vars(est))  # constructor stores parameters only
    with pytest.raises(NotFittedError, match="not fitted"):
        est.predict_proba(z)
    with pytest.raises(NotFittedError):
        est.to_dict()
    assert est.fit(z, y) is est
    assert est.n_classes_ == 4
    params = est.get_params()
    assert est.set_params(**params) is est
    # delegation: the probabilities are the rule's, bit for bit
    np.testing.assert_array_equal(est.predict_proba(z), calibrated_probs(z, est.to_dict())[0])
    np.testing.assert_array_equal(est.transform(z), est.predict_proba(z))
    np.testing.assert_array_equal(est.predict(z), z.argmax(axis=1))
    back = calibrator_from_dict(est.to_dict(), n_classes=4)
    assert type(back) is cls and back.to_dict() == est.to_dict()
    with pytest.raises(InputError, match="3 classes"):
        est.predict_proba(z[:, :3])
    with pytest.raises(InputError, match="invalid parameter"):
        est.set_params(nope=1)


def test_constructor_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        TemperatureScaler((0.1, 10.0))  # type: ignore[misc]
    assert TemperatureScaler(bounds=(0.1, 10.0)).get_params() == {"bounds": (0.1, 10.0), "tol": 1e-6, "max_iter": 100}


@pytest.mark.parametrize(
    "logits, targets, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), [0, 1], r"finite; found nan at sample 0, class 1"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]]), [0, 1], r"finite; found inf at sample 1, class 0"),
        (np.zeros((2, 3)), [0, 3], r"targets\[1\] = 3 is not a class index"),
        (np.zeros((2, 3)), [0], r"targets must have shape \(2,\)"),
        (np.zeros((2, 3)), [0.5, 1.0], "integer class indices"),
        (np.zeros(3), [0], r"shape \(n_samples, n_classes\)"),
        (np.zeros((0, 3)), [], "empty"),
        (np.zeros((2, 1)), [0, 0], "at least 2 classes"),
    ],
)
@pytest.mark.parametrize("cls", [TemperatureScaler, PlattScaler])
def test_bad_input_is_named(cls, logits, targets, match):
    with pytest.raises(InputError, match=match):
        cls().fit(logits, np.asarray(targets))


@pytest.mark.parametrize(
    "params, match",
    [({"bounds": (0.0, 1.0)}, "bounds"), ({"bounds": (2.0, 1.0)}, "bounds"), ({"tol": 0.0}, "tol"),
     ({"max_iter": 0}, "max_iter")],
)
def test_bad_parameters_raise_at_fit(params, match):
    est = TemperatureScaler(**params)  # stored as given, validated by fit
    with pytest.raises(InputError, match=match):
        est.fit(np.zeros((2, 2)), np.array([0, 1]))


@pytest.mark.parametrize(
    "d, match",
    [
        ({"type": "temperature", "temperature": 0.0}, "> 0"),
        ({"type": "temperature", "temperature": float("nan")}, "finite"),
        ({"type": "temperature"}, "must be a number"),
        ({"type": "platt", "coef": [1.0, 2.0], "intercept": 0.0}, "3 numbers"),
        ({"type": "platt", "coef": [1.0, 2.0, "x"], "intercept": 0.0}, "must be a number"),
        ({"type": "isotonic"}, "unknown calibrator type"),
        ([1, 2], "must be an object"),
    ],
)
def test_calibrator_from_dict_rejects_bad_objects(d, match):
    with pytest.raises(InputError, match=match):
        calibrator_from_dict(d)


def test_from_dict_checks_the_class():
    with pytest.raises(InputError, match="is not a 'platt'"):
        PlattScaler.from_dict({"type": "temperature", "temperature": 2.0})
