"""Anytime-valid bounds on a loss rate: evidence that may be checked after every batch.

Monitoring looks at the realised risk of a policy again and again as shadow traffic arrives. A
fixed-n interval (Clopper–Pearson) recomputed at every check is valid at each check on its own,
but the chance that it *ever* excludes the true risk grows with the number of checks, so an
alarm raised on it is a false alarm far more often than δ (``benchmarks/monitor.py`` measures how
often).

This module measures the evidence with **e-processes** built from conjugate mixtures of
likelihood ratios (Robbins 1970; Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist.). In betting terms: a bettor
starts with one unit and, on every shadow sample, bets that its loss rate is above p, spreading
the stake over alternatives q > p with a Beta(a, b) prior truncated to (p, 1]. After t samples
with s losses the wealth is

    E⁺_t(p) = ∫_p^1 q^s (1-q)^(t-s) dπ(q) / (π((p, 1]) p^s (1-p)^(t-s))

For every q > p and a sample whose conditional loss probability is at most p, the factor a
sample multiplies the wealth by has expectation at most 1, so E⁺_t(p) is a non-negative
supermartingale under **any** sequence of loss rates that stay at or below p, constant or
not. By Ville's inequality P(∃t: E⁺_t(p) ≥ 1/δ) ≤ δ: an alarm raised when the wealth at p = ε
reaches 1/δ is a false alarm with probability at most δ however often it is checked, even when
the traffic drifts under the budget. The **lower bound** L_t = sup{p: E⁺_t(p) ≥ 1/δ} is the
largest loss rate the evidence rules out; ``L_t > ε`` is a breach. E⁻_t (prior on [0, p))
gives the **upper bound** U_t the same way (valid while the rate is constant or only falls).

The state is two integers (t, s), so a bound is the same whatever the batch sizes and the
order of the batches. The prior is fixed before any data by the policy's own ε
(:func:`default_prior`): mean 2ε, where a breach worth catching lies.
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
    "log_e_value",
    "lower_bound",
    "upper_bound",
]

PRIOR_STRENGTH = 20.0  # a + b of the Beta prior: chosen by benchmarks/monitor.py (docs/monitoring.md)
_TINY_MASS = 1e-290
_BISECTIONS = 42  # 2^-42 < 3e-13: far below any rate a shadow sample can resolve


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


def _log_likelihood(n: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return special.xlogy(s, p) + special.xlog1py(n - s, -p)


def _log_mass(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(x, 0.0))


def log_e_value(n: Any, losses: Any, p: Any, prior: tuple[float, float], side: str = "above") -> np.ndarray:
    """log E⁺_t(p) (``side="above"``: evidence the loss rate exceeds p) or log E⁻_t(p) (``"below"``).

    Vectorised over n, losses and p (module docstring); ``-inf`` where there is no evidence at all.
    """
    a, b = prior
    n_arr, s_arr, p_arr = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(losses, dtype=np.float64),
                                              np.asarray(p, dtype=np.float64))
    post_a, post_b = a + s_arr, b + n_arr - s_arr
    if side == "above":
        post, pri = special.betaincc(post_a, post_b, p_arr), special.betaincc(a, b, p_arr)
    elif side == "below":
        post, pri = special.betainc(post_a, post_b, p_arr), special.betainc(a, b, p_arr)
    else:
        raise ValueError(f"side must be 'above' or 'below', got {side!r}")
    with np.errstate(invalid="ignore"):  # inf - inf where p is 0 or 1: no evidence there, below
        out = (special.betaln(post_a, post_b) - special.betaln(a, b) + _log_mass(post) - _log_mass(pri)
               - _log_likelihood(n_arr, s_arr, p_arr))
    # a prior mass below the normal floats cannot be divided by: count it as no evidence at all, so
    # a bound is only ever wider (never a false breach, never a false "safe") where floats give out
    return np.where(np.isnan(out) | (pri < _TINY_MASS), -np.inf, out)


def _boundary(n: np.ndarray, s: np.ndarray, level: float, prior: tuple[float, float], lo: np.ndarray,
              hi: np.ndarray, side: str) -> np.ndarray:
    """Bisection for the edge of {p: log E(p) >= level}: below it (``above``) or above it (``below``).

    Stops on the conservative side: the lower bound never overstates, the upper never understates.
    """
    lo, hi = lo.copy(), hi.copy()
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        evident = log_e_value(n, s, mid, prior, side) >= level
        # "above": evidence at small p, none at large -> move lo up while evident
        go_up = evident if side == "above" else ~evident
        lo = np.where(go_up, mid, lo)
        hi = np.where(go_up, hi, mid)
    return lo if side == "above" else hi


def _check_prior(prior: tuple[float, float]) -> None:
    if not (prior[0] > 0.0 and prior[1] > 0.0):
        raise InputError(f"the Beta prior needs a > 0 and b > 0, got {tuple(prior)!r}")


def lower_bound(n: Any, losses: Any, delta: float, prior: tuple[float, float]) -> np.ndarray:
    """L_t: the largest loss rate that t samples with ``losses`` losses rule out at level δ (0 if none)."""
    n_arr, s_arr = _check(n, losses, delta)
    _check_prior(prior)
    phat = np.divide(s_arr, n_arr, out=np.zeros_like(s_arr), where=n_arr > 0)
    out = _boundary(n_arr, s_arr, math.log(1.0 / delta), prior, np.zeros_like(phat), phat, "above")
    return np.where(s_arr == 0, 0.0, out)


def upper_bound(n: Any, losses: Any, delta: float, prior: tuple[float, float]) -> np.ndarray:
    """U_t: the smallest loss rate above which t samples with ``losses`` losses rule out at level δ."""
    n_arr, s_arr = _check(n, losses, delta)
    _check_prior(prior)
    phat = np.divide(s_arr, n_arr, out=np.zeros_like(s_arr), where=n_arr > 0)
    out = _boundary(n_arr, s_arr, math.log(1.0 / delta), prior, phat, np.ones_like(phat), "below")
    return np.where((s_arr == n_arr) | (n_arr == 0), 1.0, out)


def confidence_sequence(n: Any, losses: Any, delta: float,
                        prior: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(L_t, U_t), each one-sided at level δ (so [L_t, U_t] covers a constant rate at 1 − 2δ for all t)."""
    return lower_bound(n, losses, delta, prior), upper_bound(n, losses, delta, prior)


def fixed_n_interval(n: Any, losses: Any, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper–Pearson interval at 1 − δ: valid at one pre-chosen n only (for comparison)."""
    n_arr, s_arr = _check(n, losses, delta)
    lower = np.where(s_arr > 0, stats.beta.ppf(delta / 2, s_arr, n_arr - s_arr + 1), 0.0)
    upper = np.where(s_arr < n_arr, stats.beta.ppf(1 - delta / 2, s_arr + 1, n_arr - s_arr), 1.0)
    return np.nan_to_num(lower, nan=0.0), np.nan_to_num(upper, nan=1.0)


@dataclass(frozen=True)
class RiskBound:
    """The sequential state of one constrained segment: counts and the bounds after them.

    ``lower`` is the running maximum of L_t (once the evidence at ε reaches 1/δ it stays a
    breach for this policy); ``upper`` is U_t now. :meth:`update` adds one batch.
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
        return RiskBound(self.eps, self.delta, self.prior, total, bad, max(self.lower, float(lo)), float(hi))

    @property
    def risk(self) -> float | None:
        return self.losses / self.n if self.n else None

    @property
    def e_value(self) -> float:
        """E⁺ at ε: the evidence that the loss rate is over budget (a breach once it reaches 1/δ)."""
        return float(np.exp(min(float(log_e_value(self.n, self.losses, self.eps, self.prior)), 700.0)))

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
                "losses": self.losses, "risk": self.risk, "lower": self.lower, "upper": self.upper,
                "e_value": self.e_value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RiskBound:
        return cls(eps=float(data["eps"]), delta=float(data["delta"]), prior=tuple(data["prior"]),  # type: ignore[arg-type]
                   n=int(data["n"]), losses=int(data["losses"]), lower=float(data["lower"]),
                   upper=float(data["upper"]))
