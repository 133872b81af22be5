"""Certification: Learn-then-Test with fixed-sequence testing and exact binomial p-values.

Angelopoulos, Bates, Candès, Jordan, Lei (2021), "Learn then Test". For a candidate policy
and a constraint g (all traffic, or one segment value with its own budget eps_g), the
certify split gives k_g losses out of n_g rows. Under H0: R_g > eps_g the count is
stochastically at least Binomial(n_g, eps_g), so

    p_g = P(Binomial(n_g, eps_g) <= k_g) = binom.cdf(k_g, n_g, eps_g)

is a valid p-value. A candidate passes when p_g <= delta for *every* constraint
(intersection-union test: the union of nulls is rejected only if each is). Candidates are
tested in the path's fixed order, safe to aggressive, each at level delta, stopping at the
first failure; the last one that passed is returned. Because the order was fixed on other
data, the family-wise error is at most delta: with probability >= 1 - delta the returned
policy's risk is <= eps_g in every constraint.

The reported bound per constraint is the one-sided Clopper-Pearson upper limit at level
1 - delta, u = Beta^{-1}(1 - delta; k + 1, n - k) (1 when k = n); p_g <= delta iff u <= eps_g.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, binom

METHOD = "learn-then-test (fixed-sequence, exact binomial)"
ALL = "__all__"


def binomial_p_value(k: int, n: int, eps: float) -> float:
    """p-value of H0: risk > eps after k losses in n rows (1.0 when n = 0)."""
    if n <= 0:
        return 1.0
    return float(binom.cdf(int(k), int(n), float(eps)))


def upper_bound(k: int, n: int, delta: float) -> float | None:
    """One-sided Clopper-Pearson upper bound at level 1 - delta (None when n = 0)."""
    if n <= 0:
        return None
    if k >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, k + 1, n - k))


def min_rows(eps: float, delta: float) -> int:
    """Fewest rows that can certify anything: (1 - eps)^n <= delta with zero losses."""
    return math.ceil(math.log(delta) / math.log1p(-eps) - 1e-9)


def critical_count(n: int, eps: float, delta: float) -> int:
    """Largest loss count k that still passes (binom.cdf(k; n, eps) <= delta); -1 if none."""
    if n < min_rows(eps, delta):
        return -1
    k = int(binom.ppf(delta, n, eps))
    while k >= 0 and binom.cdf(k, n, eps) > delta:
        k -= 1
    while binom.cdf(k + 1, n, eps) <= delta:
        k += 1
    return k


def aim(n: int, eps: float, delta: float, power: float = 0.9) -> float:
    """The largest true risk r with P(Binomial(n, r) <= k_crit) >= power: where to aim a policy
    so that a certify split of n rows passes it with the given chance (0 if nothing can pass).
    """
    k = critical_count(n, eps, delta)
    if k < 0:
        return 0.0
    lo, hi = 0.0, eps
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if binom.cdf(k, n, mid) >= power:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Constraint:
    """A risk constraint: rows ``index`` of the certify split must have risk <= ``eps``."""

    name: str
    eps: float
    index: np.ndarray

    @property
    def n(self) -> int:
        return int(self.index.size)


@dataclass(frozen=True)
class ConstraintResult:
    name: str
    eps: float
    n: int
    losses: int
    risk: float
    p_value: float
    upper_bound: float | None
    passed: bool

    def to_json(self) -> dict[str, object]:
        return {"eps": self.eps, "n": self.n, "upper_bound": self.upper_bound, "certified": self.passed}


@dataclass(frozen=True)
class StepResult:
    """One tested candidate: every constraint's outcome."""

    index: int
    results: tuple[ConstraintResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def result(self, name: str) -> ConstraintResult | None:
        return next((r for r in self.results if r.name == name), None)


@dataclass(frozen=True)
class Certification:
    """Outcome of fixed-sequence testing along a path.

    ``chosen`` is the index of the last candidate that passed (None: none did, run at full
    depth); ``steps`` are all tested candidates in order (the last one failed unless the
    path was exhausted).
    """

    chosen: int | None
    steps: tuple[StepResult, ...]
    delta: float
    constraints: tuple[str, ...]

    @property
    def certified(self) -> bool:
        return self.chosen is not None

    @property
    def chosen_step(self) -> StepResult | None:
        return None if self.chosen is None else self.steps[self.chosen]


def check_constraints(loss: np.ndarray, constraints: Sequence[Constraint], delta: float,
                     index: int = 0) -> StepResult:
    """Test one candidate's per-sample losses (certify split) against every constraint."""
    results = []
    for con in constraints:
        k = int(np.count_nonzero(loss[con.index])) if con.index.size else 0
        p = binomial_p_value(k, con.n, con.eps)
        results.append(ConstraintResult(
            name=con.name, eps=con.eps, n=con.n, losses=k, risk=k / con.n if con.n else 0.0, p_value=p,
            upper_bound=upper_bound(k, con.n, delta), passed=con.n > 0 and p <= delta,
        ))
    return StepResult(index=index, results=tuple(results))


def fixed_sequence(
    losses: Callable[[int], np.ndarray],
    n_candidates: int,
    constraints: Sequence[Constraint],
    delta: float,
    *,
    progress: Callable[[int], None] | None = None,
) -> Certification:
    """Test candidates 0, 1, ... (safe to aggressive) until the first failure.

    ``losses(j)`` returns candidate j's per-sample 0/1 losses on the certify split; it is
    only called for candidates that are actually tested.
    """
    steps: list[StepResult] = []
    chosen = None
    for j in range(n_candidates):
        step = check_constraints(losses(j), constraints, delta, j)
        steps.append(step)
        if progress is not None:
            progress(j)
        if not step.passed:
            break
        chosen = j
    return Certification(chosen=chosen, steps=tuple(steps), delta=delta,
                         constraints=tuple(c.name for c in constraints))


def guarantee_segments(cert: Certification, constraints: Sequence[Constraint],
                       uncertified: Mapping[str, tuple[float, int]]) -> dict[str, dict[str, object]]:
    """``guarantee.segments`` of the policy document: the chosen candidate's bound per constraint.

    ``uncertified`` maps segment values that run at full depth because they cannot be
    certified to (eps, certify rows).
    """
    out: dict[str, dict[str, object]] = {}
    step = cert.chosen_step
    for con in constraints:
        res = None if step is None else step.result(con.name)
        if res is None:
            out[con.name] = {"eps": con.eps, "n": con.n, "upper_bound": None, "certified": False}
        else:
            out[con.name] = res.to_json()
    for name, (eps, n) in uncertified.items():
        out[name] = {"eps": eps, "n": n, "upper_bound": None, "certified": False}
    return out
