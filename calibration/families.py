"""The policy families the solver chooses among; each gives a path of threshold tables, safe to aggressive.

* ``per_exit`` — one threshold per exit (the Lagrangian path, every class pooled): the default;
* ``shared_raw`` — one threshold on the raw softmax score for every exit and class: CALM's
  policy as its authors run it (identity calibrators);
* ``shared`` — one threshold on the calibrated score;
* ``per_class`` — one per (exit, predicted class), sparse cells pooled (``min_cell``) and each
  cell's loss estimate shrunk towards its exit's trend with pseudo-count ``prior``;
  ``per_class_shrunk`` shrinks ten times harder and pools more cells;
* ``per_exit_segment``, ``per_class_segment`` — the same with a table per segment value
  (only with segment keys); the other families share one table across segment values.

A path depends on the rows it is fitted on (the *choose* split) and on the calibrators; the
pipeline certifies the chosen family's path on rows neither touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.solver import NEVER, PathPoint, Problem, ProgressFn, SolverPath, SolverSettings, solve_path

__all__ = ["FAMILIES", "FIXED_GRID", "Family", "candidate_families", "family_path", "fixed_shared_path",
           "pooled_problem", "shared_path", "shared_threshold_curve"]


@dataclass(frozen=True)
class Family:
    """A shape of threshold table and how its thresholds are fitted."""

    name: str
    label: str
    shared: bool = False  # one threshold for every exit and class
    calibrated: bool = True  # scores under the fitted calibrators (False: the raw softmax)
    per_class: bool = False  # a cell per (exit, predicted class)
    per_segment: bool = False  # a table per segment value
    min_cell: int = 100
    prior: float = 10.0

    def settings(self, base: SolverSettings) -> SolverSettings:
        """The Lagrangian solver's settings for this family."""
        if self.per_class:
            return replace(base, min_cell=self.min_cell, cell_prior=self.prior)
        return replace(base, min_cell=np.iinfo(np.int64).max, min_pool=1)


FAMILIES: Mapping[str, Family] = {f.name: f for f in (
    Family("per_exit", "per exit"),
    Family("shared_raw", "shared threshold, raw softmax", shared=True, calibrated=False),
    Family("shared", "shared threshold, calibrated", shared=True),
    Family("per_class", "per exit x class", per_class=True),
    Family("per_class_shrunk", "per exit x class, strong shrinkage", per_class=True, min_cell=400, prior=100.0),
    Family("per_exit_segment", "per exit x segment", per_segment=True),
    Family("per_class_segment", "per exit x class x segment", per_class=True, per_segment=True),
)}


def candidate_families(*, segmented: bool, calibrated: bool, names: Sequence[str] | None = None) -> tuple[Family, ...]:
    """The families to choose among: ``per_exit`` (the default) first, then the others, simplest first.

    ``per_exit`` is the default because it contains both shared families (a threshold per exit
    on any per-exit monotone calibration of the score, tied across exits, is a shared one):
    it can lose to them only by estimation noise.

    ``segmented``: the policy has segment keys (else the per-segment families are the global
    ones and are left out); ``calibrated``: the calibrators are not the identity (else
    ``shared`` is ``shared_raw``). ``names`` restricts the choice (InputError for an unknown
    or inapplicable name).
    """
    if names:
        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            raise InputError(f"unknown policy family {unknown[0]!r}; families: {', '.join(FAMILIES)}")
        if not segmented and any(FAMILIES[n].per_segment for n in names):
            raise InputError(f"policy family {next(n for n in names if FAMILIES[n].per_segment)!r} "
                             "needs --segment-key")
        return tuple(FAMILIES[n] for n in FAMILIES if n in names)
    out = []
    for fam in FAMILIES.values():
        if fam.per_segment and not segmented:
            continue
        if fam.name == "shared" and not calibrated:
            continue
        out.append(fam)
    return tuple(out)


def shared_threshold_curve(scores: np.ndarray, loss: np.ndarray, allowed: np.ndarray,
                           forced: np.ndarray | None = None, preds: np.ndarray | None = None,
                           blocked: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact risk of a shared threshold tau at every candidate tau (the distinct scores).

    With M_ik = max_{j <= k} s_ij over allowed exits, a sample exits at k exactly for
    tau in (M_{i,k-1}, M_ik]; so risk(tau) = (1/n) sum_{i,k} l_ik [M_{i,k-1} < tau <= M_ik],
    a difference of two weighted counts, evaluated at all candidates with one sort.
    ``forced`` classes (by ``preds``) and ``blocked`` rows never exit early.
    Returns (candidates descending, risk at each).
    """
    n = scores.shape[0]
    s = np.where(allowed[None, :], scores[:, :-1], -np.inf)
    if forced is not None and preds is not None:
        s = np.where(forced[preds[:, :-1]], -np.inf, s)
    if blocked is not None:
        s[blocked] = -np.inf
    run = np.maximum.accumulate(s, axis=1)
    prev = np.concatenate([np.full((n, 1), -np.inf), run[:, :-1]], axis=1)
    opens = run > prev
    w = loss[:, :-1].astype(np.float64) * opens
    hi, lo = run[opens], prev[opens]
    w = w[opens]
    cand = np.unique(hi[np.isfinite(hi)])[::-1]
    if cand.size == 0:
        return cand, np.zeros(0)

    def mass_at_least(edges: np.ndarray, weights: np.ndarray) -> np.ndarray:
        order = np.argsort(edges)
        e, cw = edges[order], np.concatenate([[0.0], np.cumsum(weights[order])])
        idx = np.searchsorted(e, cand, side="left")
        return cw[-1] - cw[idx]

    risk = (mass_at_least(hi, w) - mass_at_least(lo, w)) / max(n, 1)
    return cand, risk


def _shared_table(problem: Problem, tau: float) -> np.ndarray:
    """(S, K-1, C) thresholds: ``tau`` wherever exiting is allowed, NaN (never) elsewhere."""
    k1, c, s_total = problem.n_exits - 1, problem.n_classes, problem.n_segments
    table = np.full((s_total, k1, c), float(tau))
    table[:, ~problem.allowed_exits, :] = np.nan
    table[:, :, problem.forced_classes] = np.nan
    table[problem.forced_segments] = np.nan
    return table


def shared_path(problem: Problem, *, eps: float, levels: int = 64, reach: float = 1.0) -> SolverPath:
    """Shared thresholds from safe to aggressive: the lowest tau whose running-maximum risk on
    ``problem``'s rows stays within each of ``levels`` evenly spaced risk levels up to
    ``reach * eps`` (exact risks from :func:`shared_threshold_curve`). Points those rows put
    above the budget are left out: the certification would pass whichever its rows flatter."""
    blocked = problem.forced_segments[problem.seg]
    cand, risk = shared_threshold_curve(problem.scores, problem.loss, problem.allowed_exits,
                                        problem.forced_classes, problem.preds, blocked)
    s_total = problem.n_segments
    floors = np.where(problem.forced_segments, NEVER, 0.0)
    if cand.size == 0:
        return SolverPath(points=(), floors=floors, knob="threshold")
    run = np.maximum.accumulate(risk)
    marks = np.linspace(0.0, reach * eps, levels + 1)
    idx = np.unique(np.searchsorted(run, marks, side="right") - 1)
    idx = idx[idx >= 0]
    points = tuple(
        PathPoint(lam=float(cand[j]), segment_lams=np.full(s_total, float(cand[j])),
                  tau=_shared_table(problem, cand[j]), select_risk=float(risk[j]), select_compute=float("nan"),
                  select_segment_risk=np.full(s_total, float("nan")))
        for j in idx
    )
    return SolverPath(points=points, floors=floors, knob="threshold")


def _within(path: SolverPath, eps: float) -> SolverPath:
    """The path up to its last point whose risk on the rows it was fitted on is at most ``eps``:
    points those rows already place above the budget are not offered to the certification, which
    would otherwise pass whichever of them its own rows happen to flatter."""
    keep = len(path.points)
    while keep and path.points[keep - 1].select_risk > eps:
        keep -= 1
    return replace(path, points=path.points[:keep])


def pooled_problem(problem: Problem) -> Problem:
    """The problem with every (non-forbidden) segment value in one segment 0; forbidden ones in 1."""
    blocked = problem.forced_segments[problem.seg]
    return replace(problem, seg=blocked.astype(np.int64), n_segments=2,
                   forced_segments=np.array([False, True]))


def family_path(
    family: Family,
    problem: Problem,
    *,
    eps: float,
    target: float | None = None,
    segment_aims: Mapping[int, float] | None = None,
    segment_eps: Mapping[int, float] | None = None,
    settings: SolverSettings | None = None,
    progress: ProgressFn | None = None,
) -> SolverPath:
    """``family``'s path on ``problem``'s rows (thresholds (S, K-1, C) per point, safe first).

    Segment floors (``segment_aims``/``segment_eps``, see :func:`~exitwise.calibration.solver.solve_path`)
    apply to the per-segment families only; the others share one table across segment values
    and leave per-segment budgets to the certification.
    """
    settings = settings or SolverSettings()
    if family.shared:
        return shared_path(problem, eps=eps)
    fam_settings = family.settings(settings)
    if family.per_segment or problem.n_segments == 1:
        return _within(solve_path(
            problem, eps=eps, target=target, segment_aims=segment_aims if family.per_segment else None,
            segment_eps=segment_eps if family.per_segment else None, settings=fam_settings, progress=progress), eps)
    pooled = _within(solve_path(pooled_problem(problem), eps=eps, target=target, settings=fam_settings,
                                progress=progress), eps)
    pick = problem.forced_segments.astype(np.intp)  # segment s takes row 0 of the pooled table, forbidden ones row 1
    points = tuple(
        PathPoint(lam=p.lam, segment_lams=p.segment_lams[pick], tau=p.tau[pick], select_risk=p.select_risk,
                  select_compute=p.select_compute, select_segment_risk=np.full(problem.n_segments, float("nan")))
        for p in pooled.points
    )
    return SolverPath(points=points, floors=np.where(problem.forced_segments, NEVER, 0.0), solves=pooled.solves)


# A shared-threshold grid fixed before seeing any row (every score lies in [0, 1]): dense near
# 1, where confident exits are decided. Used when there are no rows to choose from, and by the
# CALM baseline run as its authors run it.
FIXED_GRID = 1.0 - np.geomspace(1e-6, 1.0, 256)


def fixed_shared_path(problem: Problem, grid: np.ndarray = FIXED_GRID) -> SolverPath:
    """Shared thresholds on ``grid`` (descending), whatever the data: a path that depends on no row."""
    s_total = problem.n_segments
    points = tuple(
        PathPoint(lam=float(t), segment_lams=np.full(s_total, float(t)), tau=_shared_table(problem, t),
                  select_risk=float("nan"), select_compute=float("nan"),
                  select_segment_risk=np.full(s_total, float("nan")))
        for t in np.sort(np.asarray(grid, dtype=np.float64))[::-1]
    )
    return SolverPath(points=points, floors=np.where(problem.forced_segments, NEVER, 0.0), knob="threshold")
