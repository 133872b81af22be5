"""The threshold solver: least expected compute under a risk budget, as a path of policies.

Problem (on the *select* split, m samples, K exits, C classes, S segment values). A policy is
a threshold tau[s, k, c] per segment value s, early exit k and predicted class c; sample i
exits at the first k with score_{ik} >= tau[s_i, k, yhat_{ik}] (the rule,
:mod:`exitwise.calibration.rule`). With normalised cumulative costs c_k = cost_k / cost_{K-1} and the
0/1 loss l_{ik} of exiting i at k (see :mod:`exitwise.calibration.evaluate`)::

    minimise  sum_i c_{e_i}   subject to   (1/m_g) sum_{i in g} l_{i, e_i} <= eps_g   for every constraint g

Method (Lagrangian relaxation, one multiplier lambda_s per segment)::

    minimise  sum_i  c_{e_i} + lambda_{s_i} l_{i, e_i}

* **Exact 1-D sweeps.** Fix every threshold but those of exit k and the set of samples that
  reach k (not exited earlier). A sample that exits at k is worth a_ik = c_k + lambda l_ik;
  one that goes on is worth V_i^{k+1}, its value under the deeper thresholds. Within a cell
  (s, k, c) sorted by decreasing score, exiting the top j samples changes the objective by
  the prefix sum of d_i = a_ik - V_i^{k+1}; the best cut is the prefix minimum (only between
  distinct scores; a positive minimum means "never exit here", null).
* **Coordinate passes, deep to shallow.** V^k = where(exit at k, a_k, V^{k+1}) is built
  backwards, so a backward pass updates every exit exactly given the others; reach sets come
  from the thresholds of the shallower exits. Passes repeat (warm started) and never
  increase the objective.
* **A loss model, not raw 0/1 losses.** l_ik in the sweeps is an estimate
  P(loss | score, cell): a logistic trend in logit(score) per (segment, exit) times a shrunk
  per-cell correction (``SegmentSolver._smoothed_loss``). Raw 0/1 losses would put each cut
  just above an observed error (the winner's curse) and the selection risk would badly
  underestimate the risk on fresh data; with the model it does not.
* **Shrinkage for sparse cells.** A (s, k, c) cell with fewer than ``min_cell`` samples
  does not get its own threshold: such cells of segment s at exit k share one pooled
  threshold (the segment-level, per-exit threshold), and a pool with fewer than
  ``min_pool`` samples never exits. Cells unseen at selection inherit the pool's threshold.
* **Path.** lambda runs from large (safe) to small (aggressive) on a geometric grid,
  refined where the selection risk jumps; segments with their own budget stop at a floor
  lambda where their selection risk reaches a level the certify split can still certify,
  and a tail of the path then raises those levels. Certification
  (:mod:`exitwise.calibration.certify`) walks this path in order.

Segments never share a threshold, so the problem separates by segment: each is solved on
its own samples, and the global policy for a multiplier lambda combines them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exitwise.calibration.rule import CompiledPolicy

ProgressFn = Callable[[str, float], None]
NEVER = math.inf  # lambda = inf: the segment never exits (full depth)


@dataclass(frozen=True)
class SolverSettings:
    """Knobs of the Lagrangian path solver (defaults suit 10^3..10^6 selection rows)."""

    min_cell: int = 100
    min_pool: int = 30
    passes: int = 2  # coordinate passes from a cold start ...
    warm_passes: int = 1  # ... and from the neighbouring multiplier's solution
    lambda_max: float = 1e4
    lambda_min: float = 1e-2
    grid: int = 16
    max_points: int = 56  # path points before the tail (grid + refinements) ...
    max_points_large: int = 36  # ... when the select split has more than large_rows rows
    large_rows: int = 200_000
    refine_gap: float = 1 / 6  # refine while the selection risk jumps by more than this * eps ...
    refine_gap_target: float = 1 / 32  # ... or by more than this * eps near the risk that will be certified
    floor_power: float = 0.9  # constrained segments aim at this chance of passing their test
    floor_bisections: int = 4
    tail: tuple[float, ...] = (1.25, 1.5, 1.75, 2.0)  # segment aims of the path's tail, x the first aim
    tail_bisections: int = 0
    thin: float = 0.02  # compute spacing of path points far on the safe side
    # loss estimates the sweeps optimise (see SegmentSolver._smoothed_loss):
    smoothing: str = "model"  # "model" (logistic, cell-corrected) | "window" (running means) | "raw" (0/1)
    cell_prior: float = 10.0  # pseudo-count of the cell correction (observed vs modelled losses)
    smooth_window: int = 50  # half-window of a per-cell running mean blended in (0: none)
    smooth_prior: float = 100.0  # pseudo-count of the parent estimate against that running mean
    parent_window: int = 100  # half-window of the parent running mean ("window" smoothing)


@dataclass(frozen=True, eq=False)
class Problem:
    """The selection data as the solver sees it (one row per sample).

    ``seg`` holds codes into S segment values; ``loss[i, k]`` is the loss of exiting i at k.
    ``allowed_exits`` (K-1,) marks early exits that may be used (``max_exit``);
    ``forced_classes`` (C,) and ``forced_segments`` (S,) never exit.
    """

    scores: np.ndarray
    preds: np.ndarray
    loss: np.ndarray
    seg: np.ndarray
    costs: np.ndarray
    n_classes: int
    n_segments: int
    allowed_exits: np.ndarray
    forced_classes: np.ndarray
    forced_segments: np.ndarray

    @property
    def m(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.scores.shape[1])


@dataclass(frozen=True, eq=False)
class _ExitIndex:
    """Eligible samples of one segment at one exit, sorted by (group, -score), and their groups."""

    rows_sorted: np.ndarray
    group_of: np.ndarray
    starts: np.ndarray
    penalty: np.ndarray
    sorted_scores: np.ndarray
    cell_group: np.ndarray  # (C,) group of each class's cell, -1 = never exit


def _exit_index(score: np.ndarray, pred: np.ndarray, n_classes: int, forced: np.ndarray,
                settings: SolverSettings) -> _ExitIndex:
    elig = ~forced[pred]
    counts = np.bincount(pred[elig], minlength=n_classes)
    big = counts >= settings.min_cell
    cell_group = np.full(n_classes, -1, dtype=np.int64)
    n_big = int(big.sum())
    cell_group[big] = np.arange(n_big)
    small = ~big & ~forced
    if counts[small].sum() >= max(settings.min_pool, 1):
        cell_group[small] = n_big
    rows = np.flatnonzero(cell_group[pred] >= 0)
    g = cell_group[pred[rows]]
    order = np.lexsort((-score[rows], g))
    rows_sorted = rows[order]
    g_sorted = g[order]
    s_sorted = score[rows_sorted]
    size = rows_sorted.size
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]]) if size else np.zeros(0, dtype=np.int64)
    penalty = np.zeros(size)
    if size > 1:
        tie = (g_sorted[1:] == g_sorted[:-1]) & (s_sorted[1:] == s_sorted[:-1])
        penalty[:-1][tie] = np.inf
    return _ExitIndex(rows_sorted=rows_sorted, group_of=g_sorted, starts=starts, penalty=penalty,
                      sorted_scores=s_sorted, cell_group=cell_group)


def _window_sum(values: np.ndarray, starts: np.ndarray, group_of: np.ndarray | None, half: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of ``values`` over positions j-half..j+half within each group (sorted order)."""
    size = values.size
    cs = np.concatenate(([0.0], np.cumsum(values)))
    pos = np.arange(size)
    ends = np.append(starts[1:], size)
    if group_of is None:
        g_lo, g_hi = np.zeros(size, dtype=np.int64), np.full(size, size)
    else:
        g_lo, g_hi = starts[group_of], ends[group_of]
    lo = np.maximum(pos - half, g_lo)
    hi = np.minimum(pos + half + 1, g_hi)
    return cs[hi] - cs[lo], (hi - lo).astype(np.float64)


def _logistic_loss_model(score: np.ndarray, loss: np.ndarray, iters: int = 25) -> np.ndarray:
    """P(loss | score) = sigmoid(a + b logit(score)), fitted by Newton steps with a weak ridge.

    A smooth, never-zero parent estimate: the top of the score range, where the selection
    data happen to show no error, still gets the small loss rate the trend implies.
    """
    m = score.size
    if m == 0:
        return np.zeros(0)
    x = np.clip(score, 1e-9, 1 - 1e-9)
    x = np.log(x) - np.log1p(-x)
    mu, sd = float(x.mean()), float(x.std()) or 1.0
    z = (x - mu) / sd
    rate = (loss.sum() + 0.5) / (m + 1.0)
    theta = np.array([np.log(rate / (1 - rate)), 0.0])
    ridge = 1.0
    # one pseudo-observation of loss 1/2 at the mean score keeps a loss-free segment/exit
    # at a rate of about 1/(2m) instead of the MLE's 0
    for _ in range(iters):
        eta = np.clip(theta[0] + theta[1] * z, -40.0, 40.0)
        p = 1.0 / (1.0 + np.exp(-eta))
        w = p * (1 - p)
        p0 = 1.0 / (1.0 + np.exp(-np.clip(theta[0], -40.0, 40.0)))
        g = np.array([np.sum(p - loss) + (p0 - 0.5), np.sum((p - loss) * z) + ridge * theta[1]])
        h = np.array([[w.sum() + p0 * (1 - p0) + 1e-12, np.sum(w * z)], [np.sum(w * z), np.sum(w * z * z) + ridge]])
        step = np.linalg.solve(h, g)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return 1.0 / (1.0 + np.exp(-np.clip(theta[0] + theta[1] * z, -40.0, 40.0)))


def _window_mean(values: np.ndarray, starts: np.ndarray, half: int) -> np.ndarray:
    win, cnt = _window_sum(values, starts, None, half)
    return win / np.maximum(cnt, 1.0)


def _sweep(ix: _ExitIndex, d: np.ndarray) -> np.ndarray:
    """Best threshold per group given per-sample gains ``d`` (exit value - continue value).

    Within a group sorted by decreasing score, exiting the top j samples changes the
    objective by D_j = sum_{i <= j} d_i; the best cut j* = argmin_j D_j (first one), taken
    only if D_{j*} < 0 and only between distinct scores. tau = midpoint of the scores at j*
    and j*+1 (or the score at j* for the group's last sample); NaN = never exit.
    """
    n_groups = ix.starts.size
    tau = np.full(n_groups, np.nan)
    size = ix.rows_sorted.size
    if size == 0:
        return tau
    cs = np.cumsum(d[ix.rows_sorted])
    base = np.concatenate(([0.0], cs))[ix.starts]
    val = cs - base[ix.group_of]
    val += ix.penalty
    gmin = np.minimum.reduceat(val, ix.starts)
    good = gmin < -1e-9
    if not good.any():
        return tau
    pos = np.flatnonzero(val == gmin[ix.group_of])
    grp = ix.group_of[pos]
    first = np.r_[True, grp[1:] != grp[:-1]]
    pos, grp = pos[first], grp[first]
    keep = good[grp]
    pos, grp = pos[keep], grp[keep]
    s_j = ix.sorted_scores[pos]
    nxt = np.minimum(pos + 1, size - 1)
    has_next = (pos + 1 < size) & (ix.group_of[nxt] == grp)
    s_n = ix.sorted_scores[nxt]
    mid = 0.5 * (s_j + s_n)
    mid = np.where(has_next & (mid > s_n), mid, s_j)
    tau[grp] = mid
    return tau


@dataclass(frozen=True)
class SegmentSolution:
    """One segment's thresholds at one multiplier, with its selection loss and compute."""

    lam: float
    tau: np.ndarray  # (K-1, C), NaN = never exit
    loss: int
    cost: float  # sum of normalised costs
    m: int
    smoothed: float = 0.0  # sum of the smoothed loss estimates at the exits taken

    @property
    def risk(self) -> float:
        return self.loss / self.m if self.m else 0.0

    @property
    def compute_fraction(self) -> float:
        return self.cost / self.m if self.m else 1.0


class SegmentSolver:
    """Exact coordinate descent for one segment's cells (see the module docstring).

    Arrays are stored exit-major, (K, m) and contiguous, so each exit's column is one
    cache-friendly vector.
    """

    def __init__(self, scores: np.ndarray, preds: np.ndarray, loss: np.ndarray, costs: np.ndarray,
                 n_classes: int, allowed: np.ndarray, forced_classes: np.ndarray, settings: SolverSettings):
        self.m, self.k_total = scores.shape
        self.s = np.ascontiguousarray(scores.T)
        self.p = np.ascontiguousarray(preds.T.astype(np.intp))
        self.raw = np.ascontiguousarray(loss.T)
        self.costs = costs
        self.n_classes = n_classes
        self.settings = settings
        self.index = [
            _exit_index(self.s[k], self.p[k], n_classes, forced_classes, settings) if allowed[k] else None
            for k in range(self.k_total - 1)
        ]
        self.loss = self._smoothed_loss()
        self.cache: dict[float, SegmentSolution] = {}

    def _smoothed_loss(self) -> np.ndarray:
        """Loss estimates p_ik that do not reward cuts placed just above one unlucky error.

        An exact sweep over 0/1 losses puts each cell's cut just above its first observed
        error, and fresh data then show about one error per cell at the "safe" end (the
        winner's curse); selection risk badly underestimates the risk. Instead (default
        ``"model"``), per segment and exit: q_i = sigmoid(a + b logit(score_i)) fitted to the
        losses (a smooth trend that is never exactly 0), times a per-cell correction
        (O_c + alpha) / (E_c + alpha) of observed over modelled losses in the cell (alpha =
        ``cell_prior``: sparse cells stay near the trend). Optionally a running mean of the
        cell's losses over 2 h + 1 neighbours in score order is blended in with pseudo-count
        ``smooth_prior`` (``smooth_window`` = h). ``"window"`` uses a running mean over the
        segment's exit as the trend instead; ``"raw"`` the 0/1 losses.
        """
        st = self.settings
        out = np.zeros(self.raw.shape, dtype=np.float64)
        for k in range(self.k_total - 1):
            lk = self.raw[k].astype(np.float64)
            ix = self.index[k]
            if st.smoothing == "raw":
                out[k] = lk
                continue
            if st.smoothing == "model":
                q = _logistic_loss_model(self.s[k], lk)
                if ix is not None and ix.rows_sorted.size:
                    rs = ix.rows_sorted
                    obs = np.add.reduceat(lk[rs], ix.starts)
                    exp = np.add.reduceat(q[rs], ix.starts)
                    ratio = (obs + st.cell_prior) / (exp + st.cell_prior)
                    q[rs] *= ratio[ix.group_of]
            elif st.smoothing == "window":
                order = np.argsort(-self.s[k], kind="stable")
                q = np.empty(self.m)
                q[order] = _window_mean(lk[order], np.zeros(1, dtype=np.int64), st.parent_window)
            else:
                raise ValueError(f"unknown smoothing {st.smoothing!r}; expected 'model', 'window' or 'raw'")
            out[k] = q
            if ix is None or ix.rows_sorted.size == 0 or st.smooth_window <= 0:
                continue
            rs = ix.rows_sorted
            win, cnt = _window_sum(lk[rs], ix.starts, ix.group_of, st.smooth_window)
            out[k, rs] = (win + st.smooth_prior * q[rs]) / (cnt + st.smooth_prior)
        return out

    def never(self) -> np.ndarray:
        return np.full((self.k_total - 1, self.n_classes), np.nan)

    def _would_exit(self, k: int, tau_k: np.ndarray) -> np.ndarray:
        """score >= tau[pred] (NaN: never), for every sample of the segment at exit k."""
        t = np.where(np.isnan(tau_k), np.inf, tau_k)
        return self.s[k] >= t[self.p[k]]

    def _first_exit(self, masks: list[np.ndarray | None]) -> np.ndarray:
        first = np.full(self.m, self.k_total - 1, dtype=np.intp)
        for k in reversed(range(self.k_total - 1)):
            if masks[k] is not None:
                first[masks[k]] = k
        return first

    def _masks(self, tau: np.ndarray) -> list[np.ndarray | None]:
        return [None if self.index[k] is None else self._would_exit(k, tau[k]) for k in range(self.k_total - 1)]

    def descend(self, lam: float, tau: np.ndarray, passes: int = 1) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Coordinate passes (deep to shallow) from ``tau``; improved thresholds and their exit masks."""
        tau = tau.copy()
        if not np.isfinite(lam):
            tau = self.never()
            return tau, self._masks(tau)
        masks = self._masks(tau)
        for _ in range(max(1, passes)):
            first = self._first_exit(masks)
            value = np.full(self.m, self.costs[-1])
            for k in reversed(range(self.k_total - 1)):
                ix = self.index[k]
                if ix is None:
                    continue
                a = self.loss[k] * lam
                a += self.costs[k]
                d = a - value
                d[first < k] = 0.0
                group_tau = _sweep(ix, d)
                tau[k] = np.where(ix.cell_group >= 0, group_tau[np.maximum(ix.cell_group, 0)], np.nan) \
                    if group_tau.size else np.nan
                w = self._would_exit(k, tau[k])
                masks[k] = w
                np.copyto(value, a, where=w)
        return tau, masks

    def solve(self, lam: float, warm: np.ndarray | None = None) -> SegmentSolution:
        if lam in self.cache:
            return self.cache[lam]
        st = self.settings
        if warm is None:
            tau, masks = self.descend(lam, self.never(), st.passes)
        else:
            tau, masks = self.descend(lam, warm, st.warm_passes)
        first = self._first_exit(masks)
        rows = np.arange(self.m)
        loss = int(np.count_nonzero(self.raw[first, rows])) if self.m else 0
        smooth = float(self.loss[np.minimum(first, self.k_total - 2), rows][first < self.k_total - 1].sum())
        cost = float(self.costs[first].sum())
        sol = SegmentSolution(lam=lam, tau=tau, loss=loss, cost=cost, m=self.m, smoothed=smooth)
        self.cache[lam] = sol
        return sol

    def nearest_above(self, lam: float) -> SegmentSolution | None:
        """The cached solution with the smallest multiplier above ``lam`` (a warm start)."""
        above = [x for x in self.cache if x > lam]
        return self.cache[min(above)] if above else None


@dataclass(frozen=True, eq=False)
class PathPoint:
    """One candidate policy on the path: thresholds (S, K-1, C) and its selection statistics."""

    lam: float
    segment_lams: np.ndarray  # (S,)
    tau: np.ndarray  # (S, K-1, C)
    select_risk: float
    select_compute: float
    select_segment_risk: np.ndarray  # (S,)


@dataclass(frozen=True, eq=False)
class SolverPath:
    """Candidate policies ordered from safe (first) to aggressive (last), chosen on selection data."""

    points: tuple[PathPoint, ...]
    floors: np.ndarray  # (S,) lambda floor per segment (0 = none, inf = never exits)
    aims: Mapping[int, float] = field(default_factory=dict)
    solves: int = 0
    knob: str = "lambda"  # what ``PathPoint.lam`` holds: the multiplier, or a shared threshold


def _geometric(lo: float, hi: float, num: int) -> list[float]:
    return [float(x) for x in np.geomspace(hi, lo, num)]


def solve_path(
    problem: Problem,
    *,
    eps: float,
    target: float | None = None,
    segment_aims: Mapping[int, float] | None = None,
    segment_eps: Mapping[int, float] | None = None,
    settings: SolverSettings | None = None,
    progress: ProgressFn | None = None,
) -> SolverPath:
    """The path of Lagrangian policies from safe to aggressive on the selection data.

    ``segment_aims`` maps a constrained segment code to the largest selection risk its
    multiplier may reach (its floor) on the main path; the path's tail raises these aims
    (``settings.tail``) up to the segment's budget in ``segment_eps``. ``eps`` sets the
    resolution of the path, finest for selection risks between 0.4 ``target`` and 1.25
    ``eps`` (``target``: the risk the certification is expected to stop at).
    """
    settings = settings or SolverSettings()
    aims = dict(segment_aims or {})
    s_total = problem.n_segments
    k_total, c = problem.n_exits, problem.n_classes
    order = np.argsort(problem.seg, kind="stable")
    bounds = np.searchsorted(problem.seg[order], np.arange(s_total + 1))
    solvers: dict[int, SegmentSolver] = {}
    sizes = np.zeros(s_total, dtype=np.int64)
    for s in range(s_total):
        idx = order[bounds[s]:bounds[s + 1]]
        sizes[s] = idx.size
        if idx.size == 0 or problem.forced_segments[s]:
            continue
        solvers[s] = SegmentSolver(problem.scores[idx], problem.preds[idx], problem.loss[idx], problem.costs,
                                   c, problem.allowed_exits, problem.forced_classes, settings)
    m = max(problem.m, 1)
    solves = 0

    def segment_at(s: int, lam: float) -> SegmentSolution:
        nonlocal solves
        sv = solvers[s]
        if lam not in sv.cache:
            near = sv.nearest_above(lam)
            sv.solve(lam, None if near is None else near.tau)
            solves += 1
        return sv.cache[lam]

    grid = _geometric(settings.lambda_min, settings.lambda_max, settings.grid)
    floors = np.zeros(s_total)
    for s in range(s_total):
        if problem.forced_segments[s] or s not in solvers:
            floors[s] = NEVER
    max_points = settings.max_points_large if problem.m > settings.large_rows else settings.max_points
    total_steps = len(grid) + max_points
    done = 0

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(msg, min(done / total_steps, 0.99))

    # 1. every segment along the coarse grid
    for lam in grid:
        for s in solvers:
            segment_at(s, lam)
        tick("solving thresholds")

    # 2. floors for segments with their own budget: the smallest lambda whose selection risk,
    #    and that of every larger lambda, stays within the aim; bisected towards the next one
    def floor_for(s: int, aim: float, bisections: int) -> float:
        sv = solvers[s]
        floor = NEVER
        for lam in sorted(sv.cache, reverse=True):
            if sv.cache[lam].risk > aim:
                break
            floor = lam
        lower = [lam for lam in sv.cache if lam < floor]
        if np.isfinite(floor) and lower:
            hi, lo = floor, max(lower)
            for _ in range(bisections):
                mid = math.sqrt(lo * hi)
                if segment_at(s, mid).risk <= aim:
                    hi = mid
                else:
                    lo = mid
            floor = hi
        return floor

    for s, a in aims.items():
        if s in solvers:
            floors[s] = floor_for(s, a, settings.floor_bisections)

    def point(lam: float, floor_vec: np.ndarray) -> PathPoint:
        seg_lams = np.maximum(lam, floor_vec)
        tau = np.full((s_total, k_total - 1, c), np.nan)
        loss = cost = 0.0
        seg_risk = np.zeros(s_total)
        for s in range(s_total):
            if s not in solvers or not np.isfinite(seg_lams[s]):
                cost += sizes[s] * problem.costs[-1]
                continue
            sol = segment_at(s, float(seg_lams[s]))
            tau[s] = sol.tau
            loss += sol.loss
            cost += sol.cost
            seg_risk[s] = sol.risk
        return PathPoint(lam=lam, segment_lams=seg_lams, tau=tau, select_risk=loss / m,
                         select_compute=cost / m, select_segment_risk=seg_risk)

    points = {lam: point(lam, floors) for lam in grid}

    # 3. refine the global path where the selection risk (overall, or of a segment with its
    #    own budget) jumps, finest in the region where certification will stop
    low = min([target, *aims.values()]) if target is not None else 0.0
    roi = (0.4 * low, 1.25 * eps)
    seg_eps = dict(segment_eps or {})
    while len(points) < max_points:
        lams = sorted(points, reverse=True)
        best, best_gap = None, 1.0
        for hi, lo in itertools.pairwise(lams):
            p_hi, p_lo = points[hi], points[lo]
            r_hi, r_lo = p_hi.select_risk, p_lo.select_risk
            if r_hi > 2.0 * eps or hi / lo < 1.0005:
                continue
            fine = r_lo >= roi[0] and r_hi <= roi[1]
            jump = (r_lo - r_hi) / (eps * (settings.refine_gap_target if fine else settings.refine_gap))
            for s_, e_ in seg_eps.items():
                if p_hi.select_segment_risk[s_] <= e_:
                    jump = max(jump, (p_lo.select_segment_risk[s_] - p_hi.select_segment_risk[s_])
                               / (e_ * settings.refine_gap))
            if jump > best_gap:
                best, best_gap = (hi, lo), jump
        if best is None:
            break
        mid = math.sqrt(best[0] * best[1])
        points[mid] = point(mid, floors)
        tick("refining path")

    ordered = [points[lam] for lam in sorted(points, reverse=True)]
    # 4. a tail past the floors: segments with their own budget aim progressively higher
    #    (the floors were set for a high chance to pass; the test may well allow more)
    if aims:
        lam_end = min(points)
        for mult in settings.tail:
            tail_floors = floors.copy()
            for s, a in aims.items():
                if s in solvers:
                    cap = seg_eps.get(s, 2 * a)
                    tail_floors[s] = floor_for(s, min(a * mult, cap), settings.tail_bisections)
            if np.array_equal(tail_floors, floors):
                continue
            floors_prev, floors = floors, np.minimum(floors, tail_floors)
            if not np.array_equal(floors, floors_prev):
                ordered.append(point(lam_end, floors))
    never = PathPoint(lam=NEVER, segment_lams=np.full(s_total, NEVER), tau=np.full((s_total, k_total - 1, c), np.nan),
                      select_risk=0.0, select_compute=float(problem.costs[-1]),
                      select_segment_risk=np.zeros(s_total))
    # keep only points that do something new and are not obviously out of reach
    # and, at the safe end (far below the risk that will be certified), only every
    # ``thin``-th of compute: testing those costs time and cannot change the outcome much
    path: list[PathPoint] = []
    last = never
    safe_end = 0.5 * target if target is not None else -1.0
    for p in ordered:
        if np.array_equal(p.tau, last.tau, equal_nan=True):
            continue
        if p.select_compute >= problem.costs[-1] - 1e-12 and p.select_risk == 0.0:
            continue
        if path and p.select_risk < safe_end and last.select_compute - p.select_compute < settings.thin:
            continue
        path.append(p)
        last = p
    return SolverPath(points=tuple(path), floors=floors, aims=aims, solves=solves)


def compile_thresholds(
    tau: np.ndarray,
    *,
    segment_levels: Sequence[str],
    segment_keys: Sequence[str],
    calibrators: Sequence[Mapping[str, Any]],
    score: str,
    forced_classes: np.ndarray,
    forced_segments: np.ndarray,
    max_exit: int | None,
    class_bucket: np.ndarray | None = None,
    top_k: int | None = None,
) -> CompiledPolicy:
    """A :class:`CompiledPolicy` from solver thresholds (S, K-1, C); for a vocabulary the C
    columns are token buckets (``class_bucket`` maps a token id to its column).

    Without segment keys the single segment is the ``default`` row. With segment keys row 0
    (``default``, unseen segment values) never exits and segment s is row s + 1.
    """
    _s_total, k1, c = tau.shape
    if segment_keys:
        thr = np.concatenate([np.full((1, k1, c), np.nan), tau], axis=0)
        index = {str(v): i + 1 for i, v in enumerate(segment_levels)}
        fs = np.concatenate([[False], forced_segments])
    else:
        thr = tau[:1].copy()
        index = {}
        fs = np.zeros(1, dtype=bool)
    return CompiledPolicy(
        thresholds=thr, segment_index=index, forced_classes=np.asarray(forced_classes, dtype=bool),
        forced_segments=np.asarray(fs, dtype=bool), max_exit=k1 if max_exit is None else int(max_exit),
        killed=False, calibrators=tuple(calibrators), score=score, segment_keys=tuple(segment_keys),
        class_bucket=class_bucket, top_k=top_k,
    )
