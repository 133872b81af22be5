"""Choosing the policy family by K-fold cross-validation on the choose split.

For each candidate family (:mod:`exitwise.calibration.families`) and each fold j, the family's
path is fitted on the other folds and every point of it is routed on fold j: a
:class:`FoldCurve` of out-of-fold loss counts (per constraint) and compute. The folds' curves
are pooled on one knob grid (the union of their knobs; at knob x each fold contributes its
most aggressive point that is at least as safe as x), and the pooled curve is walked from safe
to aggressive the way the certification walks the final path: it stops before the first point
whose out-of-fold risk exceeds a constraint's *target* (the risk the certify split is expected
to pass). The family's score is the out-of-fold compute where the walk stops. The lowest wins,
unless the default family, listed first, is within the noise of it (:func:`pick`).
Only the chosen family's path, refitted on the whole choose split, is certified — on rows none
of this touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TOLERANCE",
    "CandidateScore",
    "FoldCurve",
    "OperatingPoint",
    "Selection",
    "fold_computes",
    "fold_ids",
    "operating_point",
    "pick",
    "pool",
    "strict_knobs",
]


@dataclass(frozen=True, eq=False)
class FoldCurve:
    """One fold's out-of-fold view of a path fitted on the other folds.

    ``knobs`` (P,) strictly decreasing (safe first); ``losses`` (P, G) loss counts per
    constraint on the fold's rows; ``cost`` (P,) the sum of normalised costs on them;
    ``rows`` (G,) the fold's rows per constraint; ``n`` the fold's rows.
    """

    knobs: np.ndarray
    losses: np.ndarray
    cost: np.ndarray
    rows: np.ndarray
    n: int


@dataclass(frozen=True, eq=False)
class OperatingPoint:
    """Where the walk stopped on a pooled curve: the point index (-1: none passed, full depth),
    its knob, out-of-fold compute fraction and risk per constraint."""

    index: int
    knob: float | None
    compute: float
    risk: np.ndarray


def strict_knobs(knobs: Sequence[float]) -> np.ndarray:
    """Path knobs made strictly decreasing (a path's tail may repeat its last multiplier)."""
    out = np.asarray(knobs, dtype=np.float64).copy()
    for j in range(1, out.size):
        if out[j] >= out[j - 1]:
            out[j] = np.nextafter(out[j - 1], -np.inf) if out[j - 1] != 0 else -1e-300 * j
    return out


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of each of n rows: a seeded permutation dealt round-robin (sizes differ by <= 1)."""
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def pool(curves: Sequence[FoldCurve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The folds' curves on one knob grid: (knobs X desc, losses (X, G), cost (X,), rows (G,), n).

    At knob x a fold contributes its last point with knob >= x (none yet: no loss, full cost).
    """
    groups = curves[0].rows.size
    grid = np.unique(np.concatenate([c.knobs for c in curves]))[::-1]
    losses = np.zeros((grid.size, groups))
    cost = np.zeros(grid.size)
    for c in curves:
        # number of the fold's knobs >= x, for each x in the grid
        taken = c.knobs.size - np.searchsorted(c.knobs[::-1], grid, side="left")
        j = taken - 1
        have = j >= 0
        losses[have] += c.losses[j[have]]
        cost[have] += c.cost[j[have]]
        cost[~have] += c.n
    rows = np.sum([c.rows for c in curves], axis=0)
    return grid, losses, cost, rows, int(sum(c.n for c in curves))


def operating_point(knobs: np.ndarray, losses: np.ndarray, cost: np.ndarray, rows: np.ndarray, n: int,
                    targets: np.ndarray) -> OperatingPoint:
    """Walk safe to aggressive; stop before the first point with a constraint's risk above its target."""
    risk = losses / np.maximum(rows, 1)[None, :]
    bad = np.any(risk > targets[None, :], axis=1)
    stop = int(np.argmax(bad)) if bad.any() else knobs.size
    j = stop - 1
    if j < 0:
        return OperatingPoint(index=-1, knob=None, compute=1.0, risk=np.zeros(rows.size))
    return OperatingPoint(index=j, knob=float(knobs[j]), compute=float(cost[j] / max(n, 1)), risk=risk[j])


def fold_computes(curves: Sequence[FoldCurve], knob: float | None) -> np.ndarray:
    """Each fold's own compute fraction at the pooled operating knob (its last point at least as safe)."""
    out = np.ones(len(curves))
    if knob is None:
        return out
    for f, c in enumerate(curves):
        taken = int(np.count_nonzero(c.knobs >= knob))
        if taken:
            out[f] = c.cost[taken - 1] / max(c.n, 1)
    return out


@dataclass(frozen=True)
class CandidateScore:
    """One family's cross-validated score: out-of-fold compute and risk where the walk stopped."""

    family: str
    label: str
    compute: float
    risk: float
    knob: float | None
    points: float  # mean path length over folds
    folds: tuple[float, ...] = ()  # each fold's compute at the operating knob (paired across families)

    def to_json(self) -> dict[str, object]:
        return {"family": self.family, "label": self.label, "oof_compute_fraction": round(self.compute, 6),
                "oof_risk": round(self.risk, 6), "knob": None if self.knob is None else float(f"{self.knob:.6g}"),
                "mean_path_points": round(self.points, 1)}  # no timings: the document is deterministic


@dataclass(frozen=True)
class Selection:
    """The family choice: the cross-validation table and the winner."""

    chosen: str
    reason: str
    folds: int
    rows: int
    targets: dict[str, float]
    table: tuple[CandidateScore, ...]

    def to_json(self) -> dict[str, object]:
        return {"chosen": self.chosen, "reason": self.reason, "folds": self.folds, "rows": self.rows,
                "targets": {k: round(v, 6) for k, v in self.targets.items()},
                "candidates": [c.to_json() for c in self.table]}


TOLERANCE = 0.01


def pick(table: Sequence[CandidateScore], tolerance: float = TOLERANCE) -> CandidateScore:
    """The least out-of-fold compute, unless the first listed (the default family) is within the noise of it.

    The default is replaced only by a family whose out-of-fold compute is lower by more than
    ``tolerance`` (1 point) *and* by more than twice the standard error of the paired fold-by-fold
    difference: the same folds score every family, so their differences show how much of a lead
    is noise. At a few thousand choose rows a lead of 1-3 points often is.
    """
    default = table[0]
    best = min(table, key=lambda c: c.compute)
    if best is default:
        return default
    margin = tolerance
    if len(best.folds) == len(default.folds) > 1:
        diff = np.asarray(best.folds) - np.asarray(default.folds)
        margin = max(margin, 2.0 * float(np.std(diff, ddof=1)) / np.sqrt(diff.size))
    return best if best.compute < default.compute - margin else default
