"""The synthetic exit-log generator: deterministic, chunk-independent, and realistic enough to test on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import binomtest

from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.synthetic import CHUNK_ROWS, SyntheticSpec, synthetic_logs


@pytest.fixture(scope="module")
def logs() -> ExitLogs:
    return synthetic_logs(40_000, 4, 10, seed=11)


def _accuracy(logs: ExitLogs, mask: np.ndarray | None = None) -> np.ndarray:
    pred = logs.logits.argmax(axis=2)
    right = pred == logs.labels[:, None]
    return (right if mask is None else right[mask]).mean(axis=0)


def _fitted_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Reference NLL-optimal temperature (scipy, float64), independent of the calibrators module."""
    z = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def test_shapes_card_and_types(logs):
    assert logs.logits.shape == (40_000, 4, 10) and logs.logits.dtype == np.float32
    assert logs.labels.dtype == np.int64 and logs.labels.min() >= 0 and logs.labels.max() < 10
    assert np.isfinite(logs.logits).all()
    assert list(logs.segments) == ["region"]
    assert logs.segments["region"].levels == ("region_0", "region_1", "region_2", "region_3")
    assert logs.card.segment_columns == ("region",)
    assert np.all(np.diff(logs.card.costs) > 0)
    np.testing.assert_array_equal(logs.request_ids, np.arange(40_000))
    assert np.all(np.diff(logs.ts.astype(np.int64)) > 0)


def test_deterministic_and_seedable():
    a = synthetic_logs(500, 3, 5, seed=3)
    b = synthetic_logs(500, 3, 5, seed=3)
    c = synthetic_logs(500, 3, 5, seed=4)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.segments["region"].codes, b.segments["region"].codes)
    np.testing.assert_array_equal(a.ts, b.ts)
    assert not np.array_equal(a.logits, c.logits)
    assert (a.labels != c.labels).mean() > 0.5


def test_prefix_stable_across_chunks():
    """Rows do not depend on n: the first m rows of a larger sample are the sample of m rows."""
    small = synthetic_logs(CHUNK_ROWS + 10, 2, 3, seed=5)
    large = synthetic_logs(CHUNK_ROWS + 300, 2, 3, seed=5)
    m = small.n
    np.testing.assert_array_equal(small.logits, large.logits[:m])
    np.testing.assert_array_equal(small.labels, large.labels[:m])
    np.testing.assert_array_equal(small.segments["region"].codes, large.segments["region"].codes[:m])
    np.testing.assert_array_equal(small.ts, large.ts[:m])


def test_accuracy_increases_with_depth(logs):
    acc = _accuracy(logs)
    assert np.all(np.diff(acc) > 0.03), acc
    assert 0.4 < acc[0] < 0.7 and 0.83 < acc[-1] < 0.95, acc


def test_harder_segment_is_harder(logs):
    spec = SyntheticSpec()
    column, value = spec.hard_segment
    assert (column, value) == ("region", "region_3")
    seg = logs.segments[column]
    hard = seg.codes == seg.levels.index(value)
    acc_hard, acc_rest = _accuracy(logs, hard), _accuracy(logs, ~hard)
    assert np.all(acc_rest - acc_hard > 0.1), (acc_hard, acc_rest)
    conf = softmax(logs.logits[:, 0, :].astype(np.float64), axis=1).max(axis=1)
    assert conf[hard].mean() < conf[~hard].mean() - 0.05
    for level in range(3):  # the other levels differ only mildly
        acc_level = _accuracy(logs, seg.codes == level)[-1]
        assert abs(acc_level - acc_rest[-1]) < 0.05


def test_mix_of_easy_late_and_hopeless_samples(logs):
    pred = logs.logits.argmax(axis=2)
    right = pred == logs.labels[:, None]
    conf0 = softmax(logs.logits[:, 0, :].astype(np.float64), axis=1).max(axis=1)
    early_confident_right = (conf0 > 0.95) & right[:, 0]
    only_at_depth = ~right[:, 0] & right[:, -1]
    wrong_at_depth = ~right[:, -1]
    for share in (early_confident_right.mean(), only_at_depth.mean(), wrong_at_depth.mean()):
        assert 0.05 < share < 0.5


def test_early_exits_over_confident_and_temperature_recovers_truth(logs):
    spec = SyntheticSpec()
    fitted = [_fitted_temperature(logs.logits[:, k, :], logs.labels) for k in range(logs.n_exits)]
    np.testing.assert_allclose(fitted, spec.true_temperatures, rtol=0.08)
    assert fitted[0] > 1.5 and fitted[0] > fitted[-1]
    # over-confident: mean confidence above accuracy at exit 0 before scaling
    conf0 = softmax(logs.logits[:, 0, :].astype(np.float64), axis=1).max(axis=1)
    assert conf0.mean() > _accuracy(logs)[0] + 0.05


def test_label_and_segment_distributions_match_spec(logs):
    spec = SyntheticSpec()
    counts = np.bincount(logs.labels, minlength=10)
    # recorded labels = true class with a symmetric flip, so the uniform prior is preserved
    for j in range(10):
        assert binomtest(int(counts[j]), logs.n, spec.class_probabilities[j]).pvalue > 1e-4
    seg = logs.segments["region"]
    seg_counts = np.bincount(seg.codes, minlength=len(seg.levels))
    for level, p in spec.segment_probabilities("region").items():
        assert binomtest(int(seg_counts[seg.levels.index(level)]), logs.n, p).pvalue > 1e-4


def test_fresh_draws_share_the_distribution():
    a = synthetic_logs(20_000, 3, 6, seed=1)
    b = synthetic_logs(20_000, 3, 6, seed=2)
    np.testing.assert_allclose(_accuracy(a), _accuracy(b), atol=0.02)


def test_options():
    none = synthetic_logs(50, segments={})
    assert none.segments == {} and none.card.segment_columns == ()
    two = synthetic_logs(50, segments={"region": 2, "device": 3}, with_ts=False, overconfidence=(1.0, 1.0))
    assert sorted(two.segments) == ["device", "region"] and two.ts is None
    assert two.segment_values(["region", "device"])[0].count("|") == 1
    skewed = SyntheticSpec(n_classes=3, class_prior=(8.0, 1.0, 1.0), label_noise=0.0).sample(3000, seed=0)
    assert np.bincount(skewed.labels).argmax() == 0 and (skewed.labels == 0).mean() > 0.7


@pytest.mark.parametrize(
    "bad",
    [
        {"n_exits": 1},
        {"n_classes": 1},
        {"noise_corr": 1.0},
        {"label_noise": -0.1},
        {"overconfidence": (0.0, 1.0)},
        {"class_prior": (1.0, 2.0)},
        {"segments": (("region", 0),)},
    ],
)
def test_invalid_parameters(bad):
    with pytest.raises(ValueError):
        SyntheticSpec(**bad)
    with pytest.raises(ValueError, match="n must be >= 1"):
        SyntheticSpec().sample(0)


def test_prints_nothing(capsys):
    synthetic_logs(100, seed=9)
    assert capsys.readouterr() == ("", "")


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(2, 6),
    c=st.integers(2, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_valid_and_reproducible(n, k, c, seed):
    a = synthetic_logs(n, k, c, seed=seed)
    b = synthetic_logs(n, k, c, seed=seed)
    assert a.logits.shape == (n, k, c) and np.isfinite(a.logits).all()
    assert a.labels.min() >= 0 and a.labels.max() < c
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.labels, b.labels)
