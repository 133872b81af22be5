"""The path a solve certifies: the policy family chosen by cross-validation and its path, on the choose rows.

:func:`plan_path` is the half of :func:`exitwise.calibration.pipeline.solve_prepared` that never
looks at the certify rows: it takes the constraints by name, budget and size only (the targets
the path is refined around follow from them), so the in-memory solve and the scale engine
(:mod:`exitwise.calibration.scale.engine`, which counts its certify rows in a stream) share it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from exitwise.calibration.certify import Constraint, CountedConstraint, aim
from exitwise.calibration.evaluate import SEQUENCE_RISKS
from exitwise.calibration.families import FAMILIES, Family, candidate_families, family_path, fixed_shared_path
from exitwise.calibration.family_choice import choose_family
from exitwise.calibration.group_solve import choose_group_risk, token_aim
from exitwise.calibration.ramp import ramp_in
from exitwise.calibration.rule import CompiledPolicy, first_exit
from exitwise.calibration.selection import Selection
from exitwise.calibration.solver import ProgressFn, SolverPath, SolverSettings

__all__ = ["PathPlan", "plan_path"]


@dataclass(frozen=True)
class _PathRequest:
    """What every family's path is fitted for: the risk resolution, certification target and segment floors."""

    eps: float
    target: float
    aims: Mapping[int, float]
    segment_eps: Mapping[int, float]
    settings: SolverSettings | None = None  # None: the spec's
    scale: float = 1.0  # token risk per unit of group risk (groups: where the path is refined)

    def path(self, family: Family, prepared: Any, rows: np.ndarray, forced: np.ndarray,
             progress: ProgressFn | None = None) -> SolverPath:
        if rows.size == 0:
            return fixed_shared_path(prepared.problem(rows, forced_segments=forced))
        return family_path(family, prepared.problem(rows, forced_segments=forced), eps=self.eps, target=self.target,
                           segment_aims=self.aims, segment_eps=self.segment_eps,
                           settings=self.settings or prepared.spec.settings,
                           progress=progress)


@dataclass(frozen=True, eq=False)
class PathPlan:
    """The chosen family and its path fitted on the choose rows, compiled: the candidates to certify.

    ``prepared`` is the chosen family's variant (the raw-softmax one for ``shared_raw``);
    ``policies`` follow the path, safe to aggressive.
    """

    prepared: Any
    family: str
    selection: Selection | None
    path: SolverPath
    policies: tuple[CompiledPolicy, ...]
    seconds: Mapping[str, float]


def plan_path(prepared: Any, constraints: Sequence[Constraint | CountedConstraint], forced: np.ndarray,
              aims: Mapping[int, float], *, progress: ProgressFn | None = None) -> PathPlan:
    """Choose the family by cross-validation on the choose rows and fit its path there.

    ``constraints`` need only their names, budgets and sizes (certify rows or groups): the
    targets the path is refined around follow from them, the certify rows themselves are
    not looked at.
    """
    spec = prepared.spec
    t0 = time.perf_counter()
    n_units = int(constraints[0].n)  # certify rows, or certify groups
    request = _PathRequest(
        eps=min([spec.eps, *prepared.budgets.values()]),
        target=aim(n_units, spec.eps, spec.delta, spec.settings.floor_power),
        aims=aims, segment_eps={s_: e_ for s_, e_ in prepared.budgets.items() if s_ in aims})
    choose_rows = prepared.splits.choose
    if prepared.groups is not None and spec.risk in SEQUENCE_RISKS and choose_rows.size:
        request = _token_request(prepared, request, forced)  # the mean per-group risks are on the token scale
    selection: Selection | None = None
    if choose_rows.size == 0:
        family = FAMILIES["shared_raw"]  # nothing to choose from: the path fixed before seeing any row
    else:
        families = candidate_families(segmented=bool(spec.segment_keys), calibrated=prepared.calibrated,
                                      names=spec.families)
        if len(families) > 1:
            selection = choose_family(prepared, families, constraints, forced, request, progress=None if progress
                                      is None else (lambda m, f: progress(m, 0.5 * f)))
            family = FAMILIES[selection.chosen]
        else:
            family = families[0]
    chosen_prep = prepared.variant(family.calibrated)
    t1 = time.perf_counter()
    path = request.path(family, chosen_prep, choose_rows, forced,
                        progress=None if progress is None else (lambda m, f: progress(m, 0.5 + 0.5 * f)))
    if prepared.groups is not None:  # group targets sit far below the token path's resolution
        path = ramp_in(chosen_prep, path, choose_rows, forced, request.target)
    policies = tuple(chosen_prep.compile(p.tau, forced) for p in path.points)
    return PathPlan(prepared=chosen_prep, family=family.name, selection=selection, path=path, policies=policies,
                    seconds={"choose": t1 - t0, "path": time.perf_counter() - t1})


def _token_request(prepared: Any, request: _PathRequest, forced: np.ndarray) -> _PathRequest:
    """The path request in token units for a group risk (see :mod:`exitwise.calibration.group_solve`).

    A first path (the default family, on the choose rows) is walked safe to aggressive; the
    token risk of its last point whose choose-group risk is within the group aim becomes the
    risk the real path is refined around.
    """
    spec = prepared.spec
    rows = prepared.splits.choose
    family = candidate_families(segmented=bool(spec.segment_keys), calibrated=prepared.calibrated,
                                names=spec.families)[0]
    variant = prepared.variant(family.calibrated)
    probe = request.path(family, variant, rows, forced)
    if not probe.points:
        return request
    sc = variant.scored
    scores, preds = np.asfortranarray(sc.scores[rows]), np.asfortranarray(sc.preds[rows])
    table_rows, loss_rows, at = variant.policy_rows(rows), variant.loss[rows], np.arange(rows.size)
    choose_groups = prepared.groups.take(rows)

    def group_risk(j: int) -> float:
        exit_at = first_exit(variant.compile(probe.points[j].tau, forced), scores, preds, table_rows).exit
        return choose_group_risk(choose_groups, loss_rows[at, exit_at], spec.risk)

    token_risks = np.array([p.select_risk for p in probe.points])
    target = token_aim(group_risk, token_risks, request.target)
    if target <= 0:  # the probe jumps past the aim at once: a sequence of L tokens is lost ~L times as often
        mean_len = float(prepared.groups.sizes.mean())
        target = request.target / mean_len if spec.risk in SEQUENCE_RISKS else request.target
    scale = target / request.target if request.target > 0 else 1.0
    return replace(request, eps=max(request.eps * scale, 2.5 * target), target=target, scale=scale,
                   aims={s: a * scale for s, a in request.aims.items()},
                   segment_eps={s: e * scale for s, e in request.segment_eps.items()})
