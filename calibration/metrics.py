"""Per-exit calibration metrics: accuracy, NLL, Brier, ECE (equal-width and equal-mass), MCE.

Notation (Guo et al., 2017, "On Calibration of Modern Neural Networks", ICML): for n samples
with predicted class yhat_i = argmax_j z_ij, confidence conf_i = p_i[yhat_i] and correctness
1(yhat_i = y_i), partition the samples into bins B_1..B_M and write

    acc(B_m)  = 1/|B_m| sum_{i in B_m} 1(yhat_i = y_i)
    conf(B_m) = 1/|B_m| sum_{i in B_m} conf_i

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|        (empty bins contribute 0)
    MCE = max_{m : |B_m| > 0} |acc(B_m) - conf(B_m)|

* equal-width bins (Guo et al., 2017): B_m = {i : conf_i in ((m-1)/M, m/M]}, computed as
  m = ceil(M conf_i) in floating point (conf = 0, which a softmax never produces, goes to
  the first bin);
* equal-mass bins (adaptive binning, Nixon et al., 2019, "Measuring Calibration in Deep
  Learning", CVPR workshops): samples sorted by confidence, bin m holds sorted positions
  [floor((m-1) n / M), floor(m n / M)), so every bin has n/M samples up to one. Ties in
  confidence are ordered incorrect-before-correct (a convention; it matters only for
  discrete confidences that straddle a bin boundary).

NLL = -1/n sum_i log p_i[y_i] (p floored at the smallest normal float64, so NLL <= 708 per
sample); Brier = 1/n sum_i sum_j (p_ij - 1(j = y_i))^2, the original multiclass score
(Brier, 1950), in [0, 2].

Probabilities always come from :func:`exitwise.calibration.rule.calibrated_probs`, the decision rule's
own implementation; logits are processed in row blocks, so memory stays O(n) for any exit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.rule import calibrated_probs

__all__ = [
    "ExitMetrics",
    "ReliabilityDiagram",
    "exit_metrics",
    "exit_metrics_multi",
    "expected_calibration_error",
    "maximum_calibration_error",
    "metrics_from_probs",
    "reliability_diagram",
]

Binning = Literal["width", "mass"]
_CHUNK_ROWS = 1 << 14
_TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True, eq=False)
class ReliabilityDiagram:
    """Per-bin mean confidence, accuracy and count (the data of a reliability diagram).

    ``edges`` (M + 1,) are the bin boundaries: k/M for equal-width bins; for equal-mass bins
    0, the lowest confidence of bins 2..M, and 1. ``confidence`` and ``accuracy`` are NaN
    for empty bins.
    """

    binning: str
    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def gaps(self) -> np.ndarray:
        """|acc(B_m) - conf(B_m)| per bin, NaN for empty bins."""
        return np.abs(self.accuracy - self.confidence)

    def ece(self) -> float:
        """sum_m |B_m|/n |acc(B_m) - conf(B_m)|."""
        n = self.n
        if n == 0:
            return 0.0
        filled = self.count > 0
        return float(np.sum(self.count[filled] * self.gaps[filled]) / n)

    def mce(self) -> float:
        """max over non-empty bins of |acc(B_m) - conf(B_m)|."""
        filled = self.count > 0
        return float(self.gaps[filled].max()) if filled.any() else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready lists; empty bins give ``null`` confidence and accuracy."""

        def clean(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {
            "binning": self.binning,
            "edges": [float(v) for v in self.edges],
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
            "count": [int(v) for v in self.count],
        }


@dataclass(frozen=True, eq=False)
class ExitMetrics:
    """Calibration metrics of one exit on one set of samples (see the module docstring)."""

    n: int
    accuracy: float
    nll: float
    brier: float
    ece: float
    ece_mass: float
    mce: float
    reliability: ReliabilityDiagram
    reliability_mass: ReliabilityDiagram

    def to_dict(self) -> dict[str, float]:
        """The policy document's per-exit metrics: accuracy, nll, brier, ece, ece_mass, mce."""
        return {
            "accuracy": self.accuracy,
            "nll": self.nll,
            "brier": self.brier,
            "ece": self.ece,
            "ece_mass": self.ece_mass,
            "mce": self.mce,
        }


# ----------------------------------------------------------------------------- binning


def _check_conf_correct(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct)
    if conf.ndim != 1 or ok.shape != conf.shape:
        raise InputError(f"confidence and correct must be 1-D of equal length, got {conf.shape} and {ok.shape}")
    if conf.size and not (np.all(np.isfinite(conf)) and conf.min() >= 0.0 and conf.max() <= 1.0):
        raise InputError("confidence must be finite and in [0, 1]")
    if np.signbit(conf).any():
        conf = conf + 0.0  # -0.0 -> +0.0 (the equal-mass sort compares bit patterns)
    return conf, ok.astype(bool, copy=False)


def _check_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _per_bin(sums_conf: np.ndarray, sums_ok: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums_conf / count, sums_ok / count


def _width_diagram(conf: np.ndarray, ok: np.ndarray, n_bins: int) -> ReliabilityDiagram:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Guo's right-closed bins: bin m holds m < M conf <= m + 1, i.e. index ceil(M conf) - 1.
    scaled = conf * n_bins
    np.ceil(scaled, out=scaled)
    idx = scaled.astype(np.intp)
    idx -= 1
    np.clip(idx, 0, n_bins - 1, out=idx)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    s_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    s_ok = np.bincount(idx[ok], minlength=n_bins).astype(np.float64)
    mean_conf, acc = _per_bin(s_conf, s_ok, count)
    return ReliabilityDiagram("width", edges, mean_conf, acc, count)


def _mass_diagram(conf: np.ndarray, ok: np.ndarray, n_bins: int) -> ReliabilityDiagram:
    n = conf.shape[0]
    bounds = (np.arange(n_bins + 1, dtype=np.int64) * n) // n_bins
    count = np.diff(bounds)
    # Sort once with correctness packed into the lowest mantissa bit (a <= 1 ulp change of a
    # confidence in [0, 1]; positive floats sort like their bit patterns): one SIMD integer
    # sort instead of a stable argsort, and ties come out incorrect-before-correct.
    key = conf.view(np.uint64) & ~np.uint64(1)
    np.bitwise_or(key, ok, out=key, casting="unsafe")
    key.sort()
    s_conf = np.zeros(n_bins)
    s_ok = np.zeros(n_bins)
    filled = count > 0
    if n:
        # bins are consecutive runs of the sorted keys; empty bins have zero length
        starts = bounds[:-1][filled]
        s_conf[filled] = np.add.reduceat(key.view(np.float64), starts)
        s_ok[filled] = np.add.reduceat(key & np.uint64(1), starts)
    mean_conf, acc = _per_bin(s_conf, s_ok, count)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if n:
        edges[1:-1] = (key[np.minimum(bounds[1:-1], n - 1)] & ~np.uint64(1)).view(np.float64)
    return ReliabilityDiagram("mass", edges, mean_conf, acc, count.astype(np.int64))


def reliability_diagram(
    confidence: Any, correct: Any, n_bins: int = 15, binning: Binning = "width"
) -> ReliabilityDiagram:
    """Reliability-diagram data from per-sample confidences (n,) and correctness (n,)."""
    conf, ok = _check_conf_correct(confidence, correct)
    n_bins = _check_bins(n_bins)
    if binning == "width":
        return _width_diagram(conf, ok, n_bins)
    if binning == "mass":
        return _mass_diagram(conf, ok, n_bins)
    raise InputError(f"binning must be 'width' or 'mass', got {binning!r}")


def expected_calibration_error(
    confidence: Any, correct: Any, n_bins: int = 15, binning: Binning = "width"
) -> float:
    """ECE = sum_m |B_m|/n |acc(B_m) - conf(B_m)| (Guo et al., 2017; Nixon et al., 2019 for 'mass')."""
    return reliability_diagram(confidence, correct, n_bins, binning).ece()


def maximum_calibration_error(confidence: Any, correct: Any, n_bins: int = 15) -> float:
    """MCE = max_m |acc(B_m) - conf(B_m)| over non-empty equal-width bins (Guo et al., 2017)."""
    return reliability_diagram(confidence, correct, n_bins, "width").mce()


# ----------------------------------------------------------------------------- metrics


def _summarise(
    conf: np.ndarray, ok: np.ndarray, nll_sum: float, brier_sum: float, n_bins: int
) -> ExitMetrics:
    n = conf.shape[0]
    width = _width_diagram(conf, ok, n_bins)
    mass = _mass_diagram(conf, ok, n_bins)
    return ExitMetrics(
        n=n,
        accuracy=float(ok.mean()) if n else float("nan"),
        nll=nll_sum / n if n else float("nan"),
        brier=brier_sum / n if n else float("nan"),
        ece=width.ece(),
        ece_mass=mass.ece(),
        mce=width.mce(),
        reliability=width,
        reliability_mass=mass,
    )


def _probs_block(
    p: np.ndarray, pred: np.ndarray, y: np.ndarray, conf_out: np.ndarray, ok_out: np.ndarray,
    monotone: bool = False,
) -> tuple[float, float]:
    """Fill confidence/correctness for one block; return its NLL and Brier sums.

    ``monotone``: p is a monotone map of the logits (identity, temperature), so the answer's
    probability p[pred] is the row maximum, which is cheaper to take than a gather.
    """
    rows = np.arange(p.shape[0])
    if monotone:
        p.max(axis=1, out=conf_out)
    else:
        conf_out[:] = p[rows, pred]
    np.equal(pred, y, out=ok_out)
    py = p[rows, y]
    nll = -float(np.log(np.maximum(py, _TINY)).sum())
    brier = float(np.einsum("ij,ij->", p, p)) - 2.0 * float(py.sum()) + p.shape[0]
    return nll, brier


def _check_labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise InputError(f"labels must have shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        i = int(np.flatnonzero((y < 0) | (y >= n_classes))[0])
        raise InputError(f"labels[{i}] = {int(y[i])} is not a class index in [0, {n_classes})")
    return y.astype(np.intp, copy=False)


def _as_dict(calibrator: Mapping[str, Any] | Any | None) -> Mapping[str, Any]:
    if calibrator is None:
        return {"type": "identity"}
    if isinstance(calibrator, Mapping):
        return calibrator
    to_dict = getattr(calibrator, "to_dict", None)
    if to_dict is None:
        raise InputError(f"calibrator must be a calibrator dict or a fitted one, got {type(calibrator).__name__}")
    return to_dict()


def exit_metrics(
    logits_k: Any,
    labels: Any,
    calibrator: Mapping[str, Any] | Any | None = None,
    n_bins: int = 15,
) -> ExitMetrics:
    """Metrics of one exit: logits (n, C), labels (n,) class indices, a calibrator dict
    (or fitted calibrator; default identity) applied by :func:`exitwise.calibration.rule.calibrated_probs`.
    """
    return exit_metrics_multi(logits_k, labels, [calibrator], n_bins)[0]


def exit_metrics_multi(
    logits_k: Any,
    labels: Any,
    calibrators: Sequence[Mapping[str, Any] | Any | None],
    n_bins: int = 15,
) -> tuple[ExitMetrics, ...]:
    """:func:`exit_metrics` of one exit under several calibrators (e.g. identity and fitted:
    before and after) in one pass over the logits."""
    z = np.asarray(logits_k)
    if z.ndim != 2 or z.shape[1] < 1:
        raise InputError(f"logits must have shape (n, C), got {z.shape}")
    n, c = z.shape
    y = _check_labels(labels, n, c)
    n_bins = _check_bins(n_bins)
    cals = [_as_dict(cal) for cal in calibrators]
    conf = [np.empty(n, dtype=np.float64) for _ in cals]
    ok = np.empty(n, dtype=bool)
    nll = [0.0] * len(cals)
    brier = [0.0] * len(cals)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(n, start + _CHUNK_ROWS)
        # Column-major float64 blocks make the rule's row-wise max/sum over the C classes run
        # along contiguous columns (several times faster than along short rows).
        block = np.asfortranarray(z[start:stop], dtype=np.float64)
        if not np.isfinite(block).all():
            i, j = np.argwhere(~np.isfinite(block))[0]
            raise InputError(f"logits must be finite; found {block[i, j]} at sample {start + int(i)}, class {int(j)}")
        for m, cal in enumerate(cals):
            p, pred = calibrated_probs(block, cal)
            monotone = cal.get("type") in ("identity", "temperature")
            a, b = _probs_block(p, pred, y[start:stop], conf[m][start:stop], ok[start:stop], monotone)
            nll[m] += a
            brier[m] += b
    return tuple(_summarise(conf[m], ok, nll[m], brier[m], n_bins) for m in range(len(cals)))


def metrics_from_probs(probs: Any, labels: Any, n_bins: int = 15) -> ExitMetrics:
    """The same metrics for given probabilities (n, C) (rows summing to 1); answer = argmax."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise InputError(f"probs must have shape (n, C), got {p.shape}")
    if p.size and not (np.all(np.isfinite(p)) and p.min() >= 0.0):
        raise InputError("probs must be finite and non-negative")
    n, c = p.shape
    y = _check_labels(labels, n, c)
    conf = np.empty(n)
    ok = np.empty(n, dtype=bool)
    nll, brier = _probs_block(p, np.argmax(p, axis=1), y, conf, ok)
    return _summarise(conf, ok, nll, brier, _check_bins(n_bins))
