"""Choosing the policy family: K-fold cross-validation of candidate families on the choose rows.

Each fold's path is fitted on the other folds and every point is routed by the rule on the
held-out fold (:func:`exitwise.calibration.rule.first_exit`); the pooled out-of-fold curves are
compared at the risk the certify split is expected to pass (:mod:`exitwise.calibration.selection`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from exitwise.calibration.certify import ALL, Constraint, aim
from exitwise.calibration.families import Family
from exitwise.calibration.rule import first_exit
from exitwise.calibration.selection import (
    TOLERANCE,
    CandidateScore,
    FoldCurve,
    Selection,
    fold_computes,
    fold_ids,
    operating_point,
    pick,
    pool,
    strict_knobs,
)
from exitwise.calibration.solver import ProgressFn, SolverPath

__all__ = ["choose_family"]


def _group_masks(prepared: Any, rows: np.ndarray, constraints: Sequence[Constraint]) -> np.ndarray:
    """(G, len(rows)) membership of ``rows`` in each constraint (all traffic, or one segment value)."""
    seg = prepared.seg_codes[rows]
    masks = np.ones((len(constraints), rows.size), dtype=bool)
    for g, con in enumerate(constraints):
        if con.name != ALL:
            masks[g] = seg == prepared.seg_levels.index(con.name)
    return masks


def _fold_curve(prepared: Any, path: SolverPath, rows: np.ndarray, forced: np.ndarray,
                masks: np.ndarray) -> FoldCurve:
    """Route ``rows`` (a held-out fold) through every point of ``path`` with the rule."""
    sc = prepared.scored
    scores, preds = np.asfortranarray(sc.scores[rows]), np.asfortranarray(sc.preds[rows])
    table_rows = prepared.policy_rows(rows)
    loss_rows = prepared.loss[rows]
    costs = sc.costs / sc.costs[-1]
    at = np.arange(rows.size)
    weights = masks.astype(np.float64)
    p_total = len(path.points)
    losses = np.zeros((p_total, masks.shape[0]))
    cost = np.zeros(p_total)
    for j, point in enumerate(path.points):
        exit_at = first_exit(prepared.compile(point.tau, forced), scores, preds, table_rows).exit
        loss = loss_rows[at, exit_at]
        losses[j] = weights @ loss
        cost[j] = costs[exit_at].sum()
    return FoldCurve(knobs=strict_knobs([p.lam for p in path.points]), losses=losses, cost=cost,
                     rows=masks.sum(axis=1), n=int(rows.size))


def choose_family(
    prepared: Any,
    families: Sequence[Family],
    constraints: Sequence[Constraint],
    forced: np.ndarray,
    request: Any,
    *,
    progress: ProgressFn | None = None,
) -> Selection:
    """K-fold cross-validation of ``families`` on the choose rows (see :mod:`exitwise.calibration.selection`).

    Each fold's path is fitted on the other folds and scored on the fold; targets are the risks
    the certify split is expected to pass (:func:`~exitwise.calibration.certify.aim`). At most
    ``spec.cv_rows`` choose rows take part (a seeded subsample), in 3 folds above ``spec.cv_large``.
    """
    spec = prepared.spec
    rows = prepared.splits.choose
    if rows.size > spec.cv_rows:
        rows = np.sort(np.random.default_rng(spec.seed + 1).choice(rows, spec.cv_rows, replace=False))
    sample = prepared.take(rows)  # raw-softmax scores, if a family needs them, for these rows only
    rows = np.arange(rows.size)
    folds = spec.folds if rows.size <= spec.cv_large else min(spec.folds, 3)
    ids = fold_ids(rows.size, folds, spec.seed)
    masks = _group_masks(sample, rows, constraints)
    targets = request.scale * np.array([aim(c.n, c.eps, spec.delta, spec.settings.floor_power) for c in constraints])
    # a coarser lambda path per fold: the pooled curve only has to rank the families
    fold_request = replace(request, settings=replace(spec.settings, grid=12, max_points=28, max_points_large=28))
    table: list[CandidateScore] = []
    for f_idx, family in enumerate(families):
        variant = sample.variant(family.calibrated)
        curves = []
        for j in range(folds):
            train, held = rows[ids != j], rows[ids == j]
            path = fold_request.path(family, variant, train, forced)
            curves.append(_fold_curve(variant, path, held, forced, masks[:, ids == j]))
            if progress is not None:
                progress(f"cross-validating {family.name}", (f_idx * folds + j + 1) / (len(families) * folds))
        op = operating_point(*pool(curves), targets)
        per_fold = tuple(float(x) for x in fold_computes(curves, op.knob))
        table.append(CandidateScore(
            family=family.name, label=family.label, compute=op.compute, risk=float(op.risk[0]),
            knob=op.knob,
            points=float(np.mean([c.knobs.size for c in curves])), folds=per_fold))
    best = pick(table)
    return Selection(
        chosen=best.family,
        reason=f"least out-of-fold compute at the target risk; the default {table[0].family} stays unless another "
               f"is lower by more than {100 * TOLERANCE:g} point(s) of compute and twice the standard error of the "
               "paired fold differences",
        folds=folds, rows=int(rows.size), targets={c.name: float(t) for c, t in zip(constraints, targets, strict=True)},
        table=tuple(table))
