"""Ramps: candidates that fill the jumps of a solver path near the risk that will be certified.

The path solver's loss model is flat at the highest scores, so a whole cell can flip from
"never" to "exit" at one multiplier. At small targets (a sequence-level risk in token units)
the path can then jump from far below the target to far above it, and the certification
stops before the jump with compute left on the table. A ramp moves the thresholds of the
point after a jump towards 1, tau_t = 1 - t (1 - tau): the same shape, fewer exits. t is read
off the choose rows so that roughly a geometric sequence of shares (2 % .. 90 %) of the rows
that point lets out early still leave. Only ramp points riskier than the point before the
jump are kept, in order, so the path stays safe to aggressive. Everything is decided on the
choose rows, so the fixed-sequence test on the certify rows stays valid.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from exitwise.calibration.rule import first_exit
from exitwise.calibration.solver import PathPoint, SolverPath

__all__ = ["RAMP_POINTS", "ramp_in"]

RAMP_POINTS = 12
JUMP = 0.25  # a jump is a step in selection risk of more than this share of the target ...
REACH = 1.5  # ... up to a point at most this multiple of the target
MAX_RAMPS = 3


def ramp_in(prepared: Any, path: SolverPath, rows: np.ndarray, forced: np.ndarray, target: float) -> SolverPath:
    """``path`` with ramps before its jumps around ``target`` (see the module docstring)."""
    if rows.size == 0 or target <= 0 or not path.points:
        return path
    out: list[PathPoint] = []
    ramps = 0
    for point in path.points:
        before = out[-1].select_risk if out else 0.0
        if (ramps < MAX_RAMPS and point.select_risk - before > JUMP * target
                and before < target and point.select_risk <= REACH * target):
            out.extend(p for p in _ramp(prepared, point, path.knob, rows, forced) if p.select_risk > before)
            ramps += 1
        out.append(point)
    return replace(path, points=tuple(out))


def _ramp(prepared: Any, point: PathPoint, knob: str, rows: np.ndarray, forced: np.ndarray) -> list[PathPoint]:
    sc = prepared.scored
    scores, preds = np.asfortranarray(sc.scores[rows]), np.asfortranarray(sc.preds[rows])
    table_rows, loss_rows, at = prepared.policy_rows(rows), prepared.loss[rows], np.arange(rows.size)
    costs = sc.costs / sc.costs[-1]
    compiled = prepared.compile(point.tau, forced)
    routing = first_exit(compiled, scores, preds, table_rows)
    early = np.flatnonzero(routing.exit < sc.n_exits - 1)
    if early.size == 0:
        return []
    k_at = routing.exit[early]
    tau_at = compiled.thresholds[table_rows[early], k_at, compiled.columns(preds[early, k_at])]
    with np.errstate(divide="ignore", invalid="ignore"):
        slack = np.clip((routing.confidence[early] - tau_at) / (1.0 - tau_at), 0.0, 1.0)
    slack = np.where(np.isfinite(slack), slack, 1.0)
    shares = np.geomspace(0.02, 0.9, RAMP_POINTS)
    ts = np.unique(np.clip(1.0 - np.quantile(slack, 1.0 - shares), 1e-6, 1.0))
    seg = prepared.seg_codes[rows]
    n_seg = point.select_segment_risk.size
    seg_rows = np.maximum(np.bincount(seg, minlength=n_seg), 1)
    ramp: list[PathPoint] = []
    for t in ts[ts < 1.0]:
        tau = 1.0 - t * (1.0 - point.tau)
        exit_at = first_exit(prepared.compile(tau, forced), scores, preds, table_rows).exit
        loss = loss_rows[at, exit_at]
        value = point.lam / t if knob == "lambda" else 1.0 - t * (1.0 - point.lam)
        candidate = PathPoint(lam=float(value), segment_lams=point.segment_lams / t, tau=tau,
                              select_risk=float(loss.mean()), select_compute=float(costs[exit_at].mean()),
                              select_segment_risk=np.bincount(seg, weights=loss, minlength=n_seg) / seg_rows)
        if not ramp or candidate.select_risk > ramp[-1].select_risk:
            ramp.append(candidate)
    return ramp
