"""Anytime-valid bounds on a loss rate: a confidence sequence that may be checked after every batch.

Monitoring looks at the realised risk of a policy again and again as shadow traffic arrives. A
fixed-n interval (Clopper–Pearson) recomputed at every check is valid at each check on its own,
but the chance that it *ever* excludes the true risk grows with the number of checks, so an
alarm raised on it is a false alarm far more often than δ (``benchmarks/monitor.py`` measures how
often).

This module bounds the mean of 0/1 losses with a **confidence sequence**: intervals
``[L_t, U_t]`` such that, with probability at least 1 − δ, the true risk lies in *every* one of
them, at every t, however many times (and whenever) they are looked at. It is the conjugate
mixture of likelihood ratios (Robbins 1970; Howard, Ramdas, McAuliffe & Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist.), in betting
terms the wealth of a bettor who spreads a unit stake over alternatives q with a Beta(a, b) prior:

    M_t(p) = ∫ q^s (1-q)^(t-s) dBeta(q; a, b) / (p^s (1-p)^(t-s))
           = B(a+s, b+t-s) / B(a, b) / (p^s (1-p)^(t-s))

with s losses in t samples. Under the true p, M_t(p) is a non-negative martingale with
M_0 = 1, so by Ville's inequality P(∃t: M_t(p) ≥ 1/δ) ≤ δ, and

    C_t = {p : M_t(p) < 1/δ}

is a confidence sequence. C_t is an interval around s/t (log M_t is convex in p with its
minimum, at most 0, at p = s/t); its ends are found by bisection. The state is two integers
(t, s), so a bound is the same whatever the batch sizes and the order of the batches, and the
running intersection (max of the lower ends, min of the upper ends) is still valid.

The prior is fixed before any data from the policy's own ε (:func:`default_prior`): its mass
sits around the risks a breach would have (2ε), where the bound should be tightest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from exitwise.calibration.exceptions import InputError

__all__ = [
    "PRIOR_STRENGTH",
    "RiskBound",
    "confidence_sequence",
    "default_prior",
    "fixed_n_interval",
    "log_mixture_wealth",
]

PRIOR_STRENGTH = 20.0  # a + b of the Beta prior: chosen by benchmarks/monitor.py (docs/monitoring.md)
_BISECTIONS = 60


def _check(n: Any, losses: Any, delta: float) -> tuple[np.ndarray, np.ndarray]:
    n_arr = np.asarray(n, dtype=np.float64)
    s_arr = np.asarray(losses, dtype=np.float64)
    if np.any(n_arr < 0) or np.any(s_arr < 0) or np.any(s_arr > n_arr):
        raise InputError(f"losses must be counts with 0 <= losses <= n, got n={n!r}, losses={losses!r}")
    if not 0.0 < delta < 1.0:
        raise InputError(f"delta must be in (0, 1), got {delta!r}")
    return np.broadcast_arrays(n_arr, s_arr)  # type: ignore[return-value]


def default_prior(eps: float, strength: float = PRIOR_STRENGTH) -> tuple[float, float]:
    """Beta(a, b) with mean 2ε (capped at 1/2) and a + b = ``strength``: fixed by the budget alone."""
    if not 0.0 < eps < 1.0:
        raise InputError(f"eps must be in (0, 1), got {eps!r}")
    if not strength > 0.0:
        raise InputError(f"the prior strength a + b must be > 0, got {strength!r}")
    mean = min(2.0 * eps, 0.5)
    return mean * strength, (1.0 - mean) * strength


def log_mixture_wealth(n: Any, losses: Any, p: Any, prior: tuple[float, float]) -> np.ndarray:
    """log M_t(p) of the module docstring (vectorised); +inf where p is impossible given the losses."""
    a, b = prior
    n_arr, s_arr, p_arr = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(losses, dtype=np.float64),
                                              np.asarray(p, dtype=np.float64))
    mix = special.betaln(a + s_arr, b + n_arr - s_arr) - special.betaln(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = special.xlogy(s_arr, p_arr) + special.xlog1py(n_arr - s_arr, -p_arr)
    out = mix - ll
    return np.where(np.isnan(out), np.inf, out)


def _boundary(n: np.ndarray, s: np.ndarray, level: float, prior: tuple[float, float], lo: np.ndarray,
              hi: np.ndarray, rising: bool) -> np.ndarray:
    """Bisection for log M_t(p) = level on [lo, hi], where log M is monotone (rising or falling)."""
    lo, hi = lo.copy(), hi.copy()
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        over = log_mixture_wealth(n, s, mid, prior) >= level
        # on the lower side log M falls with p: over -> the boundary is above mid
        go_up = over != rising
        lo = np.where(go_up, mid, lo)
        hi = np.where(go_up, hi, mid)
    return hi if rising else lo  # the outside end: conservative


def confidence_sequence(n: Any, losses: Any, delta: float,
                        prior: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of the confidence sequence at (n samples, ``losses`` of them 1), vectorised.

    Valid simultaneously over all n at level 1 − δ (module docstring). With n = 0 it is [0, 1].
    The lower end is a conservative (smaller) value and the upper end a conservative (larger)
    one: bisection stops on the outside of the boundary.
    """
    n_arr, s_arr = _check(n, losses, delta)
    if not (prior[0] > 0.0 and prior[1] > 0.0):
        raise InputError(f"the Beta prior needs a > 0 and b > 0, got {tuple(prior)!r}")
    level = math.log(1.0 / delta)
    phat = np.divide(s_arr, n_arr, out=np.zeros_like(s_arr), where=n_arr > 0)
    zeros, ones = np.zeros_like(phat), np.ones_like(phat)
    lower = _boundary(n_arr, s_arr, level, prior, zeros, phat, rising=False)
    upper = _boundary(n_arr, s_arr, level, prior, phat, ones, rising=True)
    lower = np.where(s_arr == 0, 0.0, lower)
    upper = np.where(s_arr == n_arr, 1.0, upper)
    return lower, upper


def fixed_n_interval(n: Any, losses: Any, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper–Pearson interval at 1 − δ: valid at one pre-chosen n only (for comparison)."""
    n_arr, s_arr = _check(n, losses, delta)
    lower = np.where(s_arr > 0, stats.beta.ppf(delta / 2, s_arr, n_arr - s_arr + 1), 0.0)
    upper = np.where(s_arr < n_arr, stats.beta.ppf(1 - delta / 2, s_arr + 1, n_arr - s_arr), 1.0)
    return np.nan_to_num(lower, nan=0.0), np.nan_to_num(upper, nan=1.0)


@dataclass(frozen=True)
class RiskBound:
    """The sequential state of one constrained segment: counts and the running interval.

    ``lower``/``upper`` are the running intersection of every interval so far (still valid for
    a confidence sequence); :meth:`update` adds one batch.
    """

    eps: float
    delta: float
    prior: tuple[float, float]
    n: int = 0
    losses: int = 0
    lower: float = 0.0
    upper: float = 1.0

    @classmethod
    def start(cls, eps: float, delta: float, prior: tuple[float, float] | None = None) -> RiskBound:
        return cls(eps=float(eps), delta=float(delta), prior=prior or default_prior(eps))

    def update(self, n: int, losses: int) -> RiskBound:
        """The state after a batch of ``n`` samples with ``losses`` losses."""
        if n < 0 or losses < 0 or losses > n:
            raise InputError(f"a batch needs 0 <= losses <= n, got n={n}, losses={losses}")
        total, bad = self.n + int(n), self.losses + int(losses)
        lo, hi = confidence_sequence(total, bad, self.delta, self.prior)
        return RiskBound(self.eps, self.delta, self.prior, total, bad,
                         max(self.lower, float(lo)), min(self.upper, float(hi)))

    @property
    def risk(self) -> float | None:
        return self.losses / self.n if self.n else None

    @property
    def breached(self) -> bool:
        """The whole interval is above ε: with confidence 1 − δ the policy breaks its promise here."""
        return self.lower > self.eps

    @property
    def safe(self) -> bool:
        """The whole interval is at or under ε."""
        return self.upper <= self.eps

    def to_json(self) -> dict[str, Any]:
        return {"eps": self.eps, "delta": self.delta, "prior": list(self.prior), "n": self.n,
                "losses": self.losses, "risk": self.risk, "lower": self.lower, "upper": self.upper}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RiskBound:
        return cls(eps=float(data["eps"]), delta=float(data["delta"]), prior=tuple(data["prior"]),  # type: ignore[arg-type]
                   n=int(data["n"]), losses=int(data["losses"]), lower=float(data["lower"]),
                   upper=float(data["upper"]))
