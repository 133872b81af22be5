"""Per-exit calibrators: temperature scaling, Platt scaling and the identity.

Each calibrator follows the scikit-learn estimator contract: the constructor only stores
keyword-only parameters, ``fit(logits, targets)`` validates, fits and returns ``self``,
fitted state ends in ``_``, and ``predict_proba`` / ``transform`` raise
:class:`~calibration.exceptions.NotFittedError` before ``fit``.

A fitted calibrator serialises to exactly the calibrator object of the policy document
(``to_dict``), and ``predict_proba`` goes through :func:`exitwise.calibration.rule.calibrated_probs`,
so the probabilities a calibrator reports are bit for bit the ones the decision rule uses.

``targets`` are class indices: the true labels, or, for unlabelled logs, the final exit's
answers (*pseudo-labels*). For the ``disagreement`` risk the final exit's answer *is* the
truth the policy is measured against, so calibrating each exit's confidence in agreeing with
it is the right objective; see :func:`exitwise.calibration.calibrate.fit_exit_calibrators`, which
fits one calibrator per exit of a set of exit logs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from scipy import optimize

from exitwise.calibration.exceptions import CalibrationError, InputError, NotFittedError
from exitwise.calibration.rule import calibrated_probs, platt_features, softmax

__all__ = [
    "METHODS",
    "Calibrator",
    "IdentityCalibrator",
    "PlattScaler",
    "TemperatureScaler",
    "calibrator_from_dict",
    "make_calibrator",
]

METHODS = ("temperature", "platt", "identity")

# Rows per chunk for the streaming passes: keeps float32 temporaries of a (C, rows) block
# in the L2 cache (C = 10 -> 640 KB), which is what makes a full NLL pass over 10^6 rows cheap.
_CHUNK_ROWS = 1 << 14
# Rows of the strided subsample that warm-starts the temperature search (see _fit_log_beta).
_WARM_ROWS = 1 << 15


# ----------------------------------------------------------------------------- validation


def _check_logits(logits: Any, *, name: str = "logits") -> np.ndarray:
    """A 2-D float array (n, C) with n >= 1 and C >= 2; finiteness is checked while streaming."""
    arr = np.asarray(logits)
    if arr.ndim != 2:
        raise InputError(f"{name} must have shape (n_samples, n_classes), got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise InputError(f"{name} is empty: need at least one sample")
    if arr.shape[1] < 2:
        raise InputError(f"{name} must have at least 2 classes, got {arr.shape[1]}")
    if not np.issubdtype(arr.dtype, np.floating):
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    return arr


def _check_finite_chunk(chunk: np.ndarray, start: int, name: str) -> None:
    if not np.isfinite(chunk).all():
        bad = np.argwhere(~np.isfinite(chunk))[0]
        value = chunk[bad[0], bad[1]]
        raise InputError(f"{name} must be finite; found {value} at sample {start + int(bad[0])}, class {int(bad[1])}")


def _check_targets(targets: Any, n: int, n_classes: int, *, name: str = "targets") -> np.ndarray:
    y = np.asarray(targets)
    if y.shape != (n,):
        raise InputError(f"{name} must have shape ({n},) to match the logits, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise InputError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        i = int(np.flatnonzero((y < 0) | (y >= n_classes))[0])
        raise InputError(f"{name}[{i}] = {int(y[i])} is not a class index in [0, {n_classes})")
    return y.astype(np.intp, copy=False)


def _chunks(n: int, step: int = _CHUNK_ROWS):
    for start in range(0, n, step):
        yield start, min(n, start + step)


# ----------------------------------------------------------------------------- base class


class _Calibrator:
    """Shared estimator plumbing: params, fitted check, probabilities through the rule."""

    _type: ClassVar[str]

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters (scikit-learn contract)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> _Calibrator:
        """Set constructor parameters (scikit-learn contract); returns ``self``."""
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise InputError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {valid}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "n_classes_")

    def _check_is_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(logits, targets) first"
            )

    def fit(self, logits: Any, targets: Any) -> _Calibrator:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (n, C) float64, computed by :func:`exitwise.calibration.rule.calibrated_probs`."""
        self._check_is_fitted()
        z = _check_logits(logits)
        if self.n_classes_ is not None and z.shape[1] != self.n_classes_:
            raise InputError(f"logits have {z.shape[1]} classes but the calibrator was fitted on {self.n_classes_}")
        for start, stop in _chunks(z.shape[0], 1 << 18):
            _check_finite_chunk(z[start:stop], start, "logits")
        return calibrated_probs(z, self.to_dict())[0]

    def transform(self, logits: Any) -> np.ndarray:
        """Same as :meth:`predict_proba`: a calibrator maps logits to calibrated probabilities."""
        return self.predict_proba(logits)

    def predict(self, logits: Any) -> np.ndarray:
        """The answer (argmax of the logits); calibration never changes it."""
        self._check_is_fitted()
        return np.argmax(_check_logits(logits), axis=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _Calibrator:
        """A fitted calibrator from a policy document's calibrator object."""
        cal = calibrator_from_dict(d)
        if not isinstance(cal, cls):
            raise InputError(f"calibrator type {d.get('type')!r} is not a {cls._type!r} calibrator")
        return cal


# ----------------------------------------------------------------------------- identity


class IdentityCalibrator(_Calibrator):
    """The uncalibrated softmax: ``p = softmax(z)``. Fitting only records the class count."""

    _type = "identity"

    def __init__(self) -> None:
        pass

    def fit(self, logits: Any, targets: Any = None) -> IdentityCalibrator:
        z = _check_logits(logits)
        if targets is not None:
            _check_targets(targets, z.shape[0], z.shape[1])
        self.n_classes_ = int(z.shape[1])
        return self

    def to_dict(self) -> dict[str, Any]:
        self._check_is_fitted()
        return {"type": "identity"}


# ----------------------------------------------------------------------------- temperature


class TemperatureScaler(_Calibrator):
    """Temperature scaling (Guo et al., 2017): ``p = softmax(z / T)`` with one T > 0.

    ``fit`` minimises the negative log-likelihood

        NLL(beta) = 1/n sum_i [ log sum_j exp(beta d_ij) - beta d_{i,y_i} ],   beta = 1/T,
        d_ij = z_ij - max_j z_ij,

    which is convex in beta (its second derivative is the mean variance of d under p). The
    search runs in u = log beta, bounded by ``bounds`` on T, as a safeguarded Newton iteration
    on NLL'(beta) = mean_i(E_p[d_i] - d_{i,y_i}) with the exact second derivative; each step is
    one streaming float32 pass over the (C, n) transposed logits (accumulated in float64), warm
    started from a strided subsample, so large exits take a handful of passes. Very over-
    or under-confident exits only move u; if the optimum lies beyond a bound, T is that bound
    and ``at_bound_`` is True.

    Parameters
    ----------
    bounds : (float, float)
        Allowed range of T.
    tol : float
        Convergence tolerance on log T (the last Newton step).
    max_iter : int
        Maximum number of Newton/bisection steps per phase before raising CalibrationError.

    Attributes
    ----------
    temperature_ : float
    n_classes_ : int
    n_iter_ : int  (full-data passes)
    at_bound_ : bool
    """

    _type = "temperature"

    def __init__(self, *, bounds: tuple[float, float] = (1e-2, 1e2), tol: float = 1e-6, max_iter: int = 100) -> None:
        self.bounds = bounds
        self.tol = tol
        self.max_iter = max_iter

    def _validate_params(self) -> tuple[float, float]:
        lo, hi = (float(v) for v in self.bounds)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
            raise InputError(f"bounds must be 0 < low < high (finite), got {self.bounds!r}")
        if not (self.tol > 0):
            raise InputError(f"tol must be > 0, got {self.tol!r}")
        if int(self.max_iter) < 1:
            raise InputError(f"max_iter must be >= 1, got {self.max_iter!r}")
        return lo, hi

    def fit(self, logits: Any, targets: Any) -> TemperatureScaler:
        t_lo, t_hi = self._validate_params()
        z = _check_logits(logits)
        y = _check_targets(targets, z.shape[0], z.shape[1])
        d, mean_dy = _shifted_transposed(z, y)
        if mean_dy == 0.0:
            # Every target is an argmax: the NLL only falls as T -> 0 (or, when every row is
            # constant, does not depend on T at all). Float32 underflow would stall the search
            # in the flat tail, so settle it exactly.
            constant = not np.any(d)
            self.temperature_ = 1.0 if constant else t_lo
            self.at_bound_ = not constant
            self.n_iter_ = 0
            self.n_classes_ = int(z.shape[1])
            return self
        u_lo, u_hi = -np.log(t_hi), -np.log(t_lo)
        u0 = 0.0
        n = d.shape[1]
        if n > 2 * _WARM_ROWS:
            step = n // _WARM_ROWS
            sub = np.ascontiguousarray(d[:, ::step])
            sub_dy = float(np.mean(sub[y[::step], np.arange(sub.shape[1])], dtype=np.float64))
            u0, _, _ = _fit_log_beta(sub, sub_dy, u_lo, u_hi, 0.0, 1e-4, int(self.max_iter))
        u, n_iter, at_bound = _fit_log_beta(d, mean_dy, u_lo, u_hi, u0, float(self.tol), int(self.max_iter))
        self.temperature_ = float(np.clip(np.exp(-u), t_lo, t_hi))
        self.at_bound_ = bool(at_bound)
        self.n_iter_ = int(n_iter)
        self.n_classes_ = int(z.shape[1])
        return self

    def to_dict(self) -> dict[str, Any]:
        self._check_is_fitted()
        return {"type": "temperature", "temperature": float(self.temperature_)}


def _shifted_transposed(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """d = (z - max_j z).T as float32 (C, n), checked finite, and mean_i d_{i, y_i} (float64).

    Works in cache-sized row blocks, so a strided (n, C) view of an (n, K, C) array is read
    once and never copied whole. Float64 logits are shifted before the cast to float32, so
    logits of any magnitude keep their differences.
    """
    n, c = z.shape
    d = np.empty((c, n), dtype=np.float32)
    wide = z.dtype.itemsize > 4
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: caught just below
        _shift_blocks(z, d, wide)
    total = float(d[y, np.arange(n)].sum(dtype=np.float64))
    return d, total / n


def _shift_blocks(z: np.ndarray, d: np.ndarray, wide: bool) -> None:
    for start, stop in _chunks(z.shape[0]):
        block = d[:, start:stop]
        if wide:
            chunk = z[start:stop]
            np.copyto(block, (chunk - chunk.max(axis=1, keepdims=True)).T, casting="same_kind")
        else:
            np.copyto(block, z[start:stop].T, casting="same_kind")
            block -= block.max(axis=0)
        if not np.isfinite(block).all():  # NaN or +-inf anywhere in a row spoils its shift
            _check_finite_chunk(z[start:stop], start, "logits")


def _nll_derivatives(d: np.ndarray, beta: float, mean_dy: float) -> tuple[float, float]:
    """NLL'(beta) and NLL''(beta) over d (C, n), streaming in cache-sized float32 blocks.

    With p_ij = exp(beta d_ij) / s0_i, s_k = sum_j d_ij^k exp(beta d_ij):
    NLL' = mean(s1/s0) - mean(d_y),  NLL'' = mean(s2/s0 - (s1/s0)^2).
    """
    c, n = d.shape
    b = np.float32(beta)
    e = np.empty((c, min(n, _CHUNK_ROWS)), dtype=np.float32)
    de = np.empty_like(e)
    g = h = 0.0
    for start, stop in _chunks(n):
        m = stop - start
        dc = d[:, start:stop]
        ec, dec = e[:, :m], de[:, :m]
        np.multiply(dc, b, out=ec)
        np.exp(ec, out=ec)
        s0 = ec.sum(axis=0, dtype=np.float32)
        np.multiply(dc, ec, out=dec)
        r1 = dec.sum(axis=0, dtype=np.float32) / s0
        np.multiply(dc, dec, out=dec)
        r2 = dec.sum(axis=0, dtype=np.float32) / s0
        g += float(r1.sum(dtype=np.float64))
        r2 -= r1 * r1
        h += float(r2.sum(dtype=np.float64))
    return g / n - mean_dy, max(h / n, 0.0)


def _fit_log_beta(
    d: np.ndarray, mean_dy: float, u_lo: float, u_hi: float, u0: float, tol: float, max_iter: int
) -> tuple[float, int, bool]:
    """Root of r(u) = NLL'(e^u), increasing in u, by Newton steps safeguarded with bisection.

    The bracket [lo, hi] always holds the minimiser of the NLL over [u_lo, u_hi]: a point
    with r < 0 raises lo, r > 0 lowers hi. A Newton step that leaves the bracket first tries
    the bound itself (where the optimum lies for degenerate exits), then bisects.
    Returns (u, iterations, at_bound).
    """
    lo, hi = u_lo, u_hi
    lo_seen = hi_seen = False  # has r been evaluated at lo / hi?
    u = float(np.clip(u0, lo, hi))
    g_prev = np.inf
    for it in range(1, max_iter + 1):
        beta = float(np.exp(u))
        g, h = _nll_derivatives(d, beta, mean_dy)
        if not np.isfinite(g) or not np.isfinite(h):
            raise CalibrationError(
                f"temperature scaling failed: NLL derivative is not finite at T={1 / beta:.6g} "
                f"(gradient {g}, curvature {h})"
            )
        if g == 0.0:
            return u, it, False
        if g < 0:
            if u >= u_hi:
                return u_hi, it, True
            lo, lo_seen = u, True
        else:
            if u <= u_lo:
                return u_lo, it, True
            hi, hi_seen = u, True
        slope = beta * h  # dr/du
        new = u - g / slope if slope > 0 else (np.inf if g < 0 else -np.inf)
        if abs(g) > 0.5 * abs(g_prev) and np.sign(g) == np.sign(g_prev):
            # Newton is crawling (an exponentially flat NLL far from its optimum): leave it
            new = np.inf if g < 0 else -np.inf
        g_prev = g
        if not lo < new < hi:
            if new >= hi and not hi_seen:
                new = u_hi
            elif new <= lo and not lo_seen:
                new = u_lo
            else:
                new = 0.5 * (lo + hi)
        if abs(new - u) <= tol or hi - lo <= tol:
            return float(new), it, False
        u = float(new)
    raise CalibrationError(
        f"temperature scaling failed: no convergence in {max_iter} Newton steps "
        f"(T in [{np.exp(-hi):.6g}, {np.exp(-lo):.6g}], last T={np.exp(-u):.6g})"
    )


# ----------------------------------------------------------------------------- Platt


class PlattScaler(_Calibrator):
    """Platt scaling of the answer's probability: P(answer correct) = sigmoid(w . phi + b).

    phi = :func:`exitwise.calibration.rule.platt_features` of the uncalibrated softmax and the
    predicted class (logit of the top probability, top-2 margin, 1 - normalised entropy).
    Fitted by L-BFGS on the cross-entropy with Platt's (1999) smoothed targets
    t+ = (N+ + 1) / (N+ + 2), t- = 1 / (N- + 2), which keeps the weights finite when the
    answers are separable, plus an L2 penalty ``alpha`` on the standardised weights (not the
    intercept). The other classes share 1 - P in proportion to their softmax probabilities.

    Attributes
    ----------
    coef_ : ndarray (3,)
    intercept_ : float
    n_classes_ : int
    n_iter_ : int
    """

    _type = "platt"

    def __init__(self, *, alpha: float = 1e-6, tol: float = 1e-10, max_iter: int = 1000) -> None:
        self.alpha = alpha
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, logits: Any, targets: Any) -> PlattScaler:
        if not (float(self.alpha) >= 0):
            raise InputError(f"alpha must be >= 0, got {self.alpha!r}")
        z = _check_logits(logits)
        y = _check_targets(targets, z.shape[0], z.shape[1])
        n = z.shape[0]
        phi = np.empty((n, 3), dtype=np.float64)
        correct = np.empty(n, dtype=bool)
        for start, stop in _chunks(n, 1 << 16):
            chunk = z[start:stop]
            _check_finite_chunk(chunk, start, "logits")
            pred = np.argmax(chunk, axis=1)
            phi[start:stop] = platt_features(softmax(chunk), pred)
            correct[start:stop] = pred == y[start:stop]
        self.coef_, self.intercept_, self.n_iter_ = _fit_logistic(
            phi, correct, float(self.alpha), float(self.tol), int(self.max_iter)
        )
        self.n_classes_ = int(z.shape[1])
        return self

    def to_dict(self) -> dict[str, Any]:
        self._check_is_fitted()
        return {"type": "platt", "coef": [float(v) for v in self.coef_], "intercept": float(self.intercept_)}


def _fit_logistic(
    x: np.ndarray, positive: np.ndarray, alpha: float, tol: float, max_iter: int
) -> tuple[np.ndarray, float, int]:
    """Logistic regression with Platt's smoothed targets; returns (coef, intercept, n_iter)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    t = np.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd < 1e-12] = 1.0
    xs = (x - mu) / sd
    n = x.shape[0]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:3], theta[3]
        s = xs @ w + b
        # mean of log(1 + e^s) - t s, and its gradient
        value = float(np.mean(np.logaddexp(0.0, s) - t * s)) + 0.5 * alpha * float(w @ w)
        r = (0.5 * (1.0 + np.tanh(0.5 * s)) - t) / n
        grad = np.empty(4)
        grad[:3] = xs.T @ r + alpha * w
        grad[3] = r.sum()
        return value, grad

    t_mean = float(t.mean())
    theta0 = np.zeros(4)
    theta0[3] = np.log(t_mean) - np.log1p(-t_mean)
    res = optimize.minimize(
        loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-8}
    )
    if not res.success or not np.all(np.isfinite(res.x)):
        raise CalibrationError(f"Platt scaling failed: scipy.optimize.minimize (L-BFGS-B) says: {res.message}")
    w = res.x[:3] / sd
    b = float(res.x[3] - w @ mu)
    return w, b, int(res.nit)


# ----------------------------------------------------------------------------- dicts and helpers

Calibrator = TemperatureScaler | PlattScaler | IdentityCalibrator
_CLASSES: dict[str, type[_Calibrator]] = {
    "temperature": TemperatureScaler,
    "platt": PlattScaler,
    "identity": IdentityCalibrator,
}


def _finite_number(d: Mapping[str, Any], key: str) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"calibrator {d.get('type')!r}: {key!r} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise InputError(f"calibrator {d.get('type')!r}: {key!r} must be finite, got {value!r}")
    return value


def calibrator_from_dict(d: Mapping[str, Any], n_classes: int | None = None) -> Calibrator:
    """A fitted calibrator from a policy document's calibrator object (inverse of ``to_dict``).

    ``n_classes`` is recorded when given; otherwise the calibrator accepts any class count.
    """
    if not isinstance(d, Mapping):
        raise InputError(f"a calibrator must be an object, got {type(d).__name__}")
    kind = d.get("type")
    if kind == "identity":
        cal: _Calibrator = IdentityCalibrator()
    elif kind == "temperature":
        t = _finite_number(d, "temperature")
        if t <= 0:
            raise InputError(f"calibrator 'temperature': temperature must be > 0, got {t!r}")
        cal = TemperatureScaler()
        cal.temperature_ = t
        cal.at_bound_ = False
        cal.n_iter_ = 0
    elif kind == "platt":
        coef = d.get("coef")
        if not isinstance(coef, Sequence) or isinstance(coef, str) or len(coef) != 3:
            raise InputError(f"calibrator 'platt': 'coef' must be a list of 3 numbers, got {coef!r}")
        w = np.array([_finite_number({"type": "platt", "coef": v}, "coef") for v in coef])
        cal = PlattScaler()
        cal.coef_ = w
        cal.intercept_ = _finite_number(d, "intercept")
        cal.n_iter_ = 0
    else:
        raise InputError(f"unknown calibrator type {kind!r}; expected one of {METHODS}")
    cal.n_classes_ = None if n_classes is None else int(n_classes)
    return cal  # type: ignore[return-value]


def make_calibrator(method: str, **params: Any) -> Calibrator:
    """An unfitted calibrator for ``method`` ('temperature', 'platt' or 'identity')."""
    if not isinstance(method, str) or method not in _CLASSES:
        raise InputError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    return _CLASSES[method](**params)  # type: ignore[return-value]
