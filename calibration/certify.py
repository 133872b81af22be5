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

Groups (the tokens of one sequence are dependent; :mod:`exitwise.calibration.groups`): the unit
is the group, and each certify group contributes one loss. A bool loss per group (some token
disagrees) keeps the exact binomial over groups. A float loss per group in [0, 1] (the mean of
its token losses) is a bounded i.i.d. variable: the Hoeffding-Bentkus p-value (Bates,
Angelopoulos, Lei, Malik, Jordan 2021, "Distribution-free, risk-controlling prediction sets")
of H0: E[X] > eps after a mean m of n groups is

    p_HB = min(exp(-n h1(min(m, eps), eps)), e * P(Binomial(n, eps) <= ceil(n m)), 1),
    h1(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)),

valid for any distribution on [0, 1]. :func:`check_constraints` chooses by the dtype of the
losses: bool (or integer) -> exact binomial, float -> Hoeffding-Bentkus. On 0/1 data p_HB is
never below the exact binomial p-value (the Chernoff bound and e * cdf both dominate the cdf):
the price of not assuming the losses are 0/1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import bdtr, rel_entr
from scipy.stats import beta, binom

from exitwise.calibration.exceptions import InputError

METHOD = "learn-then-test (fixed-sequence, exact binomial)"
# guarantee.method of policies certified over groups (sequences): the mean per-group risk
# (disagreement, induced_error) and the share of groups with any loss (sequence_disagreement)
METHOD_GROUPS = "learn-then-test over groups (fixed-sequence, Hoeffding-Bentkus)"
METHOD_GROUPS_ANY = "learn-then-test over groups (fixed-sequence, exact binomial)"
ALL = "__all__"
# ConstraintResult.bound: which p-value tested the constraint
BOUND_BINOMIAL = "exact-binomial"
BOUND_HB = "hoeffding-bentkus"
# n * mean within this (relative) of an integer k counts as k losses in the Bentkus term: the
# float sum of per-group means k_g / L_g is off an integer by rounding only
_COUNT_TOL = 1e-9
_BISECT_TOL = 1e-10


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


def _h1(a: float, b: float) -> float:
    """Bernoulli relative entropy KL(a || b), 0 log 0 = 0 (Hoeffding's h1 in Bates et al. 2021)."""
    return float(rel_entr(a, b) + rel_entr(1.0 - a, 1.0 - b))


def _check_hb(mean: float, n: int, eps: float) -> float:
    if not 0.0 < eps < 1.0:
        raise InputError(f"a risk budget must lie strictly between 0 and 1, got {eps}")
    if not (-1e-12 <= mean <= 1.0 + 1e-12):  # also catches NaN
        raise InputError(f"a mean loss must lie in [0, 1], got {mean}")
    return min(max(float(mean), 0.0), 1.0)


def _bentkus_count(mean: float, n: int) -> int:
    """ceil(n * mean), an integer sum counted as itself despite float rounding."""
    s = n * mean
    return min(max(math.ceil(s - _COUNT_TOL * max(1.0, s)), 0), n)


def hb_p_value(mean: float, n: int, eps: float) -> float:
    """Hoeffding-Bentkus p-value of H0: E[X] > eps after a mean loss ``mean`` of n i.i.d. X in [0, 1].

    min(exp(-n h1(min(mean, eps), eps)), e P(Binomial(n, eps) <= ceil(n mean)), 1); 1.0 when n = 0.
    Valid for any distribution of X on [0, 1] (Bates et al. 2021): the group-level test.
    """
    n = int(n)
    if n <= 0:
        return 1.0
    m = _check_hb(mean, n, eps)
    p_h = math.exp(-n * _h1(min(m, eps), eps))
    p_b = math.e * float(bdtr(_bentkus_count(m, n), n, eps))  # the binomial cdf, without scipy.stats' overhead
    return min(p_h, p_b, 1.0)


def hb_upper_bound(mean: float, n: int, delta: float) -> float | None:
    """Hoeffding-Bentkus upper confidence bound at level 1 - delta (None when n = 0).

    The smallest eps with hb_p_value(mean, n, eps) <= delta, by bisection (the p-value falls as
    eps grows) to 1e-10, rounded up: p <= delta exactly when eps >= the bound, up to that
    tolerance. 1.0 when no eps < 1 passes.
    """
    n = int(n)
    if n <= 0:
        return None
    if not 0.0 < delta < 1.0:
        raise InputError(f"the confidence level delta must lie strictly between 0 and 1, got {delta}")
    m = _check_hb(mean, n, 0.5)
    lo, hi = m, 1.0 - 1e-12
    if hb_p_value(m, n, hi) > delta:
        return 1.0
    if m > 0.0 and hb_p_value(m, n, lo) <= delta:  # cannot happen (p = 1 at eps = mean); kept safe
        return lo
    while hi - lo > _BISECT_TOL:
        mid = 0.5 * (lo + hi)
        if hb_p_value(m, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def min_groups(eps: float, delta: float) -> int:
    """Fewest groups that can certify anything with Hoeffding-Bentkus: hb_p_value(0, n, eps) <= delta.

    With zero loss the Hoeffding term is exactly (1 - eps)^n, so this equals :func:`min_rows`.
    """
    n = min_rows(eps, delta)
    while hb_p_value(0.0, n, eps) > delta:
        n += 1
    while n > 1 and hb_p_value(0.0, n - 1, eps) <= delta:
        n -= 1
    return n


def hb_critical_mean(n: int, eps: float, delta: float) -> float | None:
    """Largest mean loss of n groups that still passes (hb_p_value <= delta), to 1e-10; None if
    none does (n < :func:`min_groups`). The group analogue of :func:`critical_count`.
    """
    n = int(n)
    if n <= 0 or hb_p_value(0.0, n, eps) > delta:
        return None
    lo, hi = 0.0, eps  # the p-value rises with the mean and is 1 at mean = eps
    while hi - lo > _BISECT_TOL:
        mid = 0.5 * (lo + hi)
        if hb_p_value(mid, n, eps) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


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
class CountedConstraint:
    """A constraint known by its size alone: the scale engine counts its losses in a stream."""

    name: str
    eps: float
    n: int


@dataclass(frozen=True)
class ConstraintResult:
    """One constraint's test. ``n`` rows (or groups); ``losses`` how many of them have a nonzero
    loss; ``risk`` the mean loss, the tested statistic (= losses / n for 0/1 losses); ``bound``
    the p-value used (:data:`BOUND_BINOMIAL` or :data:`BOUND_HB`).
    """

    name: str
    eps: float
    n: int
    losses: int
    risk: float
    p_value: float
    upper_bound: float | None
    passed: bool
    bound: str = BOUND_BINOMIAL

    def to_json(self) -> dict[str, object]:
        """The constraint's entry in ``guarantee.segments``; ``"bound"`` only when not the exact binomial."""
        out: dict[str, object] = {"eps": self.eps, "n": self.n, "upper_bound": self.upper_bound,
                                  "certified": self.passed}
        if self.bound != BOUND_BINOMIAL:
            out["bound"] = self.bound
        return out


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


def _check_unit(loss: np.ndarray) -> None:
    bad = np.flatnonzero(~((loss >= 0.0) & (loss <= 1.0)))  # NaN fails both
    if bad.size:
        raise InputError(f"per-group losses must lie in [0, 1]; group {int(bad[0])} has {loss[bad[0]]!r}")


def check_constraints(loss: np.ndarray, constraints: Sequence[Constraint], delta: float,
                     index: int = 0) -> StepResult:
    """Test one candidate's per-sample losses (certify split) against every constraint.

    Bool (or integer 0/1) losses: the exact binomial. Float losses in [0, 1] (one per group, the
    mean of its token losses): Hoeffding-Bentkus; ``losses`` then counts the groups with a
    nonzero loss and ``risk`` is the mean loss.
    """
    loss = np.asarray(loss)
    if loss.dtype.kind == "f":
        _check_unit(loss)
        return StepResult(index=index, results=tuple(_check_mean(loss, con, delta) for con in constraints))
    counts = [int(np.count_nonzero(loss[con.index])) if con.index.size else 0 for con in constraints]
    return check_counts(counts, constraints, delta, index)


def check_counts(losses: Sequence[int], constraints: Sequence[Constraint | CountedConstraint], delta: float,
                 index: int = 0) -> StepResult:
    """Test one candidate from its loss count per constraint (0/1 losses): the exact binomial."""
    results = []
    for con, k in zip(constraints, losses, strict=True):
        k = int(k)
        if not 0 <= k <= con.n:
            raise InputError(f"constraint {con.name}: {k} losses out of {con.n} rows")
        p = binomial_p_value(k, con.n, con.eps)
        results.append(ConstraintResult(
            name=con.name, eps=con.eps, n=con.n, losses=k, risk=k / con.n if con.n else 0.0, p_value=p,
            upper_bound=upper_bound(k, con.n, delta), passed=con.n > 0 and p <= delta,
        ))
    return StepResult(index=index, results=tuple(results))


def _check_mean(loss: np.ndarray, con: Constraint, delta: float) -> ConstraintResult:
    """Hoeffding-Bentkus test of one constraint on float per-group losses."""
    sub = loss[con.index] if con.index.size else loss[:0]
    mean = float(sub.mean()) if con.n else 0.0
    p = hb_p_value(mean, con.n, con.eps)
    return ConstraintResult(
        name=con.name, eps=con.eps, n=con.n, losses=int(np.count_nonzero(sub)), risk=mean, p_value=p,
        upper_bound=hb_upper_bound(mean, con.n, delta), passed=con.n > 0 and p <= delta, bound=BOUND_HB,
    )


def fixed_sequence(
    losses: Callable[[int], np.ndarray],
    n_candidates: int,
    constraints: Sequence[Constraint],
    delta: float,
    *,
    progress: Callable[[int], None] | None = None,
) -> Certification:
    """Test candidates 0, 1, ... (safe to aggressive) until the first failure.

    ``losses(j)`` returns candidate j's per-sample 0/1 losses on the certify split (or, over
    groups, its per-group losses: float means or bool "any"; see :func:`check_constraints`); it
    is only called for candidates that are actually tested.
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


def fixed_sequence_counts(
    counts: Callable[[int], Sequence[int]],
    n_candidates: int,
    constraints: Sequence[Constraint | CountedConstraint],
    delta: float,
) -> Certification:
    """:func:`fixed_sequence` from loss counts: ``counts(j)`` is candidate j's losses per constraint."""
    steps: list[StepResult] = []
    chosen = None
    for j in range(n_candidates):
        step = check_counts(counts(j), constraints, delta, j)
        steps.append(step)
        if not step.passed:
            break
        chosen = j
    return Certification(chosen=chosen, steps=tuple(steps), delta=delta,
                         constraints=tuple(c.name for c in constraints))


def guarantee_segments(cert: Certification, constraints: Sequence[Constraint | CountedConstraint],
                       uncertified: Mapping[str, tuple[float, int]], *,
                       bound: str = BOUND_BINOMIAL) -> dict[str, dict[str, object]]:
    """``guarantee.segments`` of the policy document: the chosen candidate's bound per constraint.

    ``uncertified`` maps segment values that run at full depth because they cannot be
    certified to (eps, certify rows). ``bound`` (the test the constraints use) labels the
    entries without a result the way :meth:`ConstraintResult.to_json` labels the others.
    """
    def empty(eps: float, n: int) -> dict[str, object]:
        out: dict[str, object] = {"eps": eps, "n": n, "upper_bound": None, "certified": False}
        if bound != BOUND_BINOMIAL:
            out["bound"] = bound
        return out

    out: dict[str, dict[str, object]] = {}
    step = cert.chosen_step
    for con in constraints:
        res = None if step is None else step.result(con.name)
        out[con.name] = empty(con.eps, con.n) if res is None else res.to_json()
    for name, (eps, n) in uncertified.items():
        out[name] = empty(eps, n)
    return out
