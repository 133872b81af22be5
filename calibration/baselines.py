"""Baselines, in the solver's code path: each is a threshold set run by the same rule and evaluator.

* ``full_depth`` — never exit early (risk 0, compute 1).
* ``global_threshold`` — BranchyNet / DeeBERT style: one max-probability threshold tau for
  every exit and class, the smallest tau whose selection-split risk stays <= eps (scanning
  down from 1); chosen empirically, **not certified**.
* ``calm`` — the CALM rule (Schuster et al., 2022): one shared threshold over all exits,
  certified by Learn-then-Test along a grid of tau from high (safe) to low (aggressive).
* ``per_exit`` — one threshold per exit, no class or segment structure, solved by the same
  Lagrangian path and certified the same way as the solver.
* ``oracle`` — the in-sample oracle of the solver's own policy family: thresholds chosen
  directly on the evaluation data by the same Lagrangian path over their exact 0/1 losses
  (the best a threshold table of that shape could do there, its empirical risk within every
  budget); it fits the noise of the very rows it is scored on, so no deployable policy can
  match it.
* ``per_sample_oracle`` — each sample at its earliest exit whose answer incurs no loss
  (for ``disagreement``: agrees with the final answer); not a threshold policy.

Certified baselines use the solver's splits and constraints (segments too small to certify
are left out, as the solver forces them to full depth), so they are compared under the same
guarantee.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from exitwise.calibration.certify import ALL, Constraint
from exitwise.calibration.evaluate import Evaluation, ScoredLogs, composite_segments, evaluate_scored, summarise
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.families import FAMILIES, FIXED_GRID, pooled_problem, shared_threshold_curve
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.pipeline import Prepared, Solution, certify_candidates
from exitwise.calibration.rule import CompiledPolicy, score_all_exits
from exitwise.calibration.solver import Problem, compile_thresholds, solve_path
from exitwise.calibration.splits import Splits

# The registry of baselines, in the order comparison tables list them: the certified ones, the
# uncertified global threshold, full depth, then the two oracles (not deployable).
NAMES = ("calm", "per_exit", "global_threshold", "full_depth", "oracle", "per_sample_oracle")
LABELS = {
    "solver": "solver (certified)",
    "full_depth": "full depth",
    "global_threshold": "global max-prob threshold (uncertified)",
    "calm": "CALM (shared threshold, LTT)",
    "per_exit": "per-exit thresholds (LTT)",
    "oracle": "in-sample oracle (same family)",
    "per_sample_oracle": "per-sample oracle",
}


@dataclass(frozen=True, eq=False)
class BaselineResult:
    """A baseline's policy (None for the per-sample oracle) and its evaluation."""

    name: str
    evaluation: Evaluation
    policy: CompiledPolicy | None
    certified: bool | None
    note: str = ""

    def worst_segment(self, column: str | None) -> tuple[str | None, float | None]:
        segs = self.evaluation.segments.get(column or "", {})
        if not segs:
            return None, None
        name = max(segs, key=lambda v: segs[v].risk)
        return name, segs[name].risk

    def to_json(self, column: str | None = None) -> dict[str, Any]:
        ev = self.evaluation
        worst, worst_risk = self.worst_segment(column)
        out: dict[str, Any] = {
            "compute_fraction": ev.compute_fraction, "risk": ev.risk, "disagreement": ev.disagreement,
            "induced_error": ev.induced_error, "worst_segment": worst, "worst_segment_risk": worst_risk,
        }
        if self.certified is not None:
            out["certified"] = self.certified
        if self.note:
            out["note"] = self.note
        return out


def _uniform_policy(prepared: Prepared, tau: np.ndarray, score: str, calibrators: Any = None) -> CompiledPolicy:
    """Thresholds (K-1, C) for every sample: no segment structure, but the operator's
    constraints hold as for the solver (forbidden classes and segments, ``max_exit``).
    """
    forbidden = [prepared.seg_levels[s] for s in np.flatnonzero(prepared.forced_segments)]
    keys = prepared.spec.segment_keys if forbidden else ()
    thr = np.concatenate([tau[None], np.full((len(forbidden), *tau.shape), np.nan)], axis=0)
    return CompiledPolicy(
        thresholds=thr, segment_index={name: i + 1 for i, name in enumerate(forbidden)},
        forced_classes=prepared.forced_classes, forced_segments=np.r_[False, np.ones(len(forbidden), dtype=bool)],
        max_exit=tau.shape[0] if prepared.spec.max_exit is None else prepared.spec.max_exit,
        killed=False, calibrators=tuple(calibrators or prepared.calibrators), score=score, segment_keys=keys,
    )


def _shared(prepared: Prepared, t: float, score: str = "max_prob") -> CompiledPolicy:
    k1, c = prepared.scored.n_exits - 1, prepared.scored.n_classes
    return _uniform_policy(prepared, np.full((k1, c), float(t)), score)


def _blocked(prepared: Prepared, rows: np.ndarray) -> np.ndarray:
    """Rows in a forbidden segment (they never exit early, whatever the policy)."""
    return prepared.forced_segments[prepared.seg_codes[rows]]


def global_threshold(prepared: Prepared, max_prob: tuple[np.ndarray, np.ndarray]) -> tuple[float | None, bool]:
    """BranchyNet/DeeBERT: scan tau down from 1 on the select split; stop before risk > eps."""
    scores, preds = max_prob
    sel = prepared.splits.choose
    cand, risk = shared_threshold_curve(scores[sel], prepared.loss[sel], prepared.allowed_exits,
                                        prepared.forced_classes, preds[sel], _blocked(prepared, sel))
    bad = np.flatnonzero(risk > prepared.spec.eps)
    stop = bad[0] if bad.size else cand.size
    return (float(cand[stop - 1]) if stop > 0 else None), False


def _baseline_constraints(solution: Solution) -> list[Constraint]:
    return list(solution.constraints)


def calm(prepared: Prepared, solution: Solution) -> tuple[float | None, bool, Prepared]:
    """CALM as its authors run it: one shared threshold on the raw softmax score, a grid fixed
    before seeing data (:data:`~exitwise.calibration.families.FIXED_GRID`), Learn-then-Test on
    *every* calibration row (nothing else is fitted, so no row is spent on anything else).
    Returns (tau, certified, the raw-score preparation whose splits certify every row).
    """
    every = Splits(choose=np.zeros(0, dtype=np.int64), certify=np.arange(prepared.logs.n), seed=prepared.splits.seed)
    if prepared.spec.score == "max_prob":
        pre = replace(prepared.variant(False), splits=every, variants={})  # the solver may already have scored it
    else:
        raw = tuple({"type": "identity"} for _ in prepared.calibrators)
        scored = ScoredLogs.from_logs(prepared.logs, raw, "max_prob")
        pre = replace(prepared, splits=every, calibrators=raw, calibrator_objects=(), scored=scored,
                      loss=scored.loss_matrix(prepared.spec.risk), spec=replace(prepared.spec, score="max_prob"),
                      variants={})
    grid = np.sort(FIXED_GRID)[::-1]
    cert, _, _ = certify_candidates(pre, [_shared(pre, t) for t in grid], _all_rows_constraints(pre, solution))
    tau = None if cert.chosen is None else float(grid[cert.chosen])
    return tau, cert.chosen is not None, pre


def _all_rows_constraints(pre: Prepared, solution: Solution) -> list[Constraint]:
    """The solver's constraints (all traffic and each certified segment budget) over every row."""
    out = []
    for con in solution.constraints:
        if con.name == ALL:
            out.append(Constraint(name=ALL, eps=con.eps, index=np.arange(pre.logs.n)))
        else:
            code = pre.seg_levels.index(con.name)
            out.append(Constraint(name=con.name, eps=con.eps, index=np.flatnonzero(pre.seg_codes == code)))
    return out


def per_exit(prepared: Prepared, solution: Solution) -> tuple[np.ndarray | None, bool]:
    """One threshold per exit (all classes and segments pooled), Lagrangian path + LTT."""
    sel = prepared.splits.choose
    settings = FAMILIES["per_exit"].settings(prepared.spec.settings)
    problem = pooled_problem(prepared.problem(sel))  # segment 0: everyone; 1: forbidden segments (never exit)
    path = solve_path(problem, eps=prepared.spec.eps, settings=settings)
    policies = [_uniform_policy(prepared, p.tau[0], prepared.spec.score) for p in path.points]
    cert, _, _ = certify_candidates(prepared, policies, _baseline_constraints(solution))
    if cert.chosen is None:
        return None, False
    return path.points[cert.chosen].tau[0], True


def in_sample_oracle(prepared: Prepared, solution: Solution, scored: ScoredLogs) -> CompiledPolicy:
    """The solver's family fitted on the evaluation data itself, best point within every budget there."""
    spec = prepared.spec
    codes, levels = composite_segments(scored.segments, spec.segment_keys, scored.n)
    budgets = {levels.index(prepared.seg_levels[s]): e for s, e in prepared.budgets.items()
               if prepared.seg_levels[s] in levels}
    forced = np.zeros(len(levels), dtype=bool)
    for s in np.flatnonzero(solution.forced_segments):
        if prepared.seg_levels[s] in levels:
            forced[levels.index(prepared.seg_levels[s])] = True
    loss = scored.loss_matrix(spec.risk)
    problem = Problem(
        scores=scored.scores, preds=scored.preds, loss=loss, seg=codes, costs=scored.costs / scored.costs[-1],
        n_classes=scored.n_classes, n_segments=len(levels), allowed_exits=prepared.allowed_exits,
        forced_classes=prepared.forced_classes, forced_segments=forced,
    )
    # exact 0/1 losses of the evaluation rows themselves: the best that policy shape could do there
    settings = replace(spec.settings, smoothing="raw", smooth_window=0, refine_gap=1 / 24, refine_gap_target=1 / 48,
                       max_points=80, max_points_large=80)
    aims = {s: e for s, e in budgets.items() if not forced[s]}
    path = solve_path(problem, eps=spec.eps, target=spec.eps, segment_aims=aims, settings=settings)
    best = None
    counts = np.bincount(codes, minlength=len(levels))
    for p in path.points:
        ok = p.select_risk <= spec.eps and all(
            p.select_segment_risk[s] <= e or counts[s] == 0 for s, e in budgets.items())
        if ok and (best is None or p.select_compute < best.select_compute):
            best = p
    tau = best.tau if best is not None else np.full((len(levels), scored.n_exits - 1, scored.n_classes), np.nan)
    return compile_thresholds(tau, segment_levels=levels, segment_keys=spec.segment_keys,
                              calibrators=prepared.calibrators, score=spec.score,
                              forced_classes=prepared.forced_classes, forced_segments=forced,
                              max_exit=spec.max_exit)


def per_sample_oracle_exits(scored: ScoredLogs, risk: str, allowed: np.ndarray,
                            forced_classes: np.ndarray | None = None, blocked: np.ndarray | None = None) -> np.ndarray:
    """Earliest allowed exit whose loss is 0 (the last exit otherwise), under the operator's
    constraints: ``max_exit`` (``allowed``), forbidden classes and ``blocked`` rows.
    """
    ok = ~scored.loss_matrix(risk)
    ok[:, :-1] &= allowed[None, :]
    if forced_classes is not None:
        ok[:, :-1] &= ~forced_classes[scored.preds[:, :-1]]
    if blocked is not None:
        ok[blocked, :-1] = False
    ok[:, -1] = True
    return np.argmax(ok, axis=1)


def evaluation_data(solution: Solution, test_logs: ExitLogs | None = None, score: str | None = None,
                    calibrators: Sequence[Mapping[str, Any]] | None = None) -> ScoredLogs:
    """The held-out data scored with the solver's calibrators (or ``calibrators``): ``test_logs``,
    else the certify split."""
    prepared = solution.prepared
    score = score or prepared.spec.score
    cals = tuple(prepared.calibrators if calibrators is None else calibrators)
    if test_logs is None:
        if score == prepared.spec.score and cals == tuple(prepared.calibrators):
            return prepared.scored.take(prepared.splits.certify)
        rows = prepared.splits.certify
        s, p = score_all_exits(prepared.logs.logits[rows], cals, score)
        return replace(prepared.scored.take(rows), scores=s, preds=p, score=score, calibrators=cals)
    return ScoredLogs.from_logs(test_logs, cals, score)


@dataclass(frozen=True, eq=False)
class ChosenBaseline:
    """A deployable baseline policy, chosen on the calibration splits."""

    name: str
    policy: CompiledPolicy
    certified: bool | None
    note: str = ""


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple; InputError naming the first one that is not in :data:`NAMES`."""
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise InputError(f"unknown baseline {unknown[0]!r}; baselines are {', '.join(NAMES)}")
    return tuple(names)


def choose_baselines(
    solution: Solution, *, names: Sequence[str] = NAMES, progress: Callable[[str], None] | None = None
) -> dict[str, ChosenBaseline]:
    """Fit the threshold baselines among ``names`` (full depth, global threshold, CALM, per-exit)
    on the calibration splits; the oracles are fitted on the evaluation data by :func:`run_baselines`."""
    names = check_names(names)
    prepared = solution.prepared
    spec = prepared.spec
    k1, c = prepared.scored.n_exits - 1, prepared.scored.n_classes
    out: dict[str, ChosenBaseline] = {}
    mp_all: tuple[np.ndarray, np.ndarray] | None = None

    def max_prob() -> tuple[np.ndarray, np.ndarray]:
        nonlocal mp_all
        if mp_all is None:
            if spec.score == "max_prob":
                mp_all = (prepared.scored.scores, prepared.scored.preds)
            else:
                mp_all = score_all_exits(prepared.logs.logits, prepared.calibrators, "max_prob")
        return mp_all

    def note(name: str) -> None:
        if progress is not None:
            progress(name)

    if "full_depth" in names:
        out["full_depth"] = ChosenBaseline("full_depth", _uniform_policy(prepared, np.full((k1, c), np.nan),
                                                                         spec.score), None)
    if "global_threshold" in names:
        note("global_threshold")
        t, _ = global_threshold(prepared, max_prob())
        out["global_threshold"] = ChosenBaseline("global_threshold", _shared(prepared, np.nan if t is None else t),
                                                 False, "tau chosen on the select split, uncertified")
    if "calm" in names:
        note("calm")
        t, ok, raw = calm(prepared, solution)
        out["calm"] = ChosenBaseline("calm", _shared(raw, np.nan if t is None else t), ok,
                                     "raw softmax, fixed grid, certified on every calibration row")
    if "per_exit" in names:
        note("per_exit")
        tau, ok = per_exit(prepared, solution)
        out["per_exit"] = ChosenBaseline(
            "per_exit", _uniform_policy(prepared, np.full((k1, c), np.nan) if tau is None else tau, spec.score), ok)
    return out


def run_baselines(
    solution: Solution,
    scored: ScoredLogs,
    chosen: Mapping[str, ChosenBaseline],
    *,
    test_logs: ExitLogs | None = None,
    names: Sequence[str] = NAMES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, BaselineResult]:
    """Evaluate the chosen baselines and the two oracles on held-out data ``scored``.

    ``scored`` is :func:`evaluation_data` for ``test_logs`` (None: the certify split); the
    shared-threshold baselines are rescored with max-prob when the solver used another score.
    """
    names = check_names(names)
    prepared = solution.prepared
    spec = prepared.spec
    risk = spec.risk
    out: dict[str, BaselineResult] = {}
    rescored: dict[str, ScoredLogs] = {}

    def scored_for(policy: CompiledPolicy) -> ScoredLogs:
        """The held-out rows under the policy's own calibrators and score."""
        if tuple(policy.calibrators) == tuple(scored.calibrators) and policy.score == scored.score:
            return scored
        key = json.dumps([list(policy.calibrators), policy.score], sort_keys=True)
        if key not in rescored:
            rescored[key] = evaluation_data(solution, test_logs, policy.score, policy.calibrators)
        return rescored[key]

    for name, base in chosen.items():
        out[name] = BaselineResult(name, evaluate_scored(base.policy, scored_for(base.policy), risk), base.policy,
                                   base.certified, base.note)
    if "oracle" in names:
        if progress is not None:
            progress("oracle")
        pol = in_sample_oracle(prepared, solution, scored)
        out["oracle"] = BaselineResult("oracle", evaluate_scored(pol, scored, risk), pol, None,
                                       "thresholds fitted on the evaluation data itself")
    if "per_sample_oracle" in names:
        blocked = None
        if prepared.forced_segments.any():
            codes, levels = composite_segments(scored.segments, spec.segment_keys, scored.n)
            forbidden = set(spec.forbid_segments)
            blocked = np.array([v in forbidden for v in levels], dtype=bool)[codes]
        ex = per_sample_oracle_exits(scored, risk, prepared.allowed_exits, prepared.forced_classes, blocked)
        out["per_sample_oracle"] = BaselineResult("per_sample_oracle", summarise(ex, scored, risk), None, None,
                                                  "each sample at its earliest loss-free exit")
    return out


def baselines_json(results: Mapping[str, BaselineResult], column: str | None = None) -> dict[str, dict[str, Any]]:
    """Each result's :meth:`BaselineResult.to_json` (worst segment of ``column``), by baseline name."""
    return {k: v.to_json(column) for k, v in results.items()}


@dataclass(frozen=True, eq=False)
class HeldOut:
    """The solver's policy and the baselines, measured on the same held-out rows."""

    evaluated_on: str  # which rows: the test logs, or the certify split
    solver: Evaluation
    baselines: Mapping[str, BaselineResult]


def evaluate_held_out(
    solution: Solution,
    chosen: Mapping[str, ChosenBaseline],
    test_logs: ExitLogs | None = None,
    *,
    names: Sequence[str] = NAMES,
    progress: Callable[[str], None] | None = None,
) -> HeldOut:
    """The solver's policy, the ``chosen`` baselines and the oracles among ``names`` on ``test_logs``.

    Without test logs the rows are the certify split, which the path never saw (the
    certification did). ``names=()`` measures the solver alone.
    """
    scored = evaluation_data(solution, test_logs)
    evaluation = evaluate_scored(solution.policy, scored, solution.prepared.spec.risk)
    results = run_baselines(solution, scored, chosen, test_logs=test_logs, names=names, progress=progress)
    if test_logs is None:
        where = f"certify split ({evaluation.n} rows, not used to choose the path)"
    else:
        where = f"test logs {test_logs.source} ({test_logs.n} rows)"
    return HeldOut(evaluated_on=where, solver=evaluation, baselines=results)


__all__ = ["ALL", "LABELS", "NAMES", "BaselineResult", "ChosenBaseline", "HeldOut", "baselines_json", "check_names",
           "choose_baselines", "evaluate_held_out", "evaluation_data", "run_baselines"]
