"""Authoring a policy from exit logs: solve and certify it, compare it, check a saved one on other logs.

The use cases behind ``exitwise solve`` and ``exitwise evaluate`` (the CLI only parses
options, calls one of these, prints and writes), also run by the benchmarks:

* :func:`solve_policy` — prepare, solve the path and certify it
  (:mod:`exitwise.calibration.pipeline`), choose the baselines of the registry
  (:data:`exitwise.calibration.baselines.NAMES`), measure everything on the certify split
  for the document's ``expected`` section, measure again on held-out test logs when given
  (recorded as ``expected.held_out``) and build the validated policy document;
* :func:`solve_policy_at_scale` — the same from logs streamed in batches (a Parquet dataset,
  on one machine or on Spark; :mod:`exitwise.calibration.scale`), without the baselines;
* :func:`evaluate_policy` — apply a saved policy document to other logs of the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exitwise.calibration.baselines import NAMES, HeldOut, baselines_json, choose_baselines, evaluate_held_out
from exitwise.calibration.evaluate import Evaluation, evaluate
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.pipeline import Solution, SolveSpec, prepare, solve_prepared
from exitwise.calibration.scale.dataset import Source
from exitwise.calibration.scale.engine import ScaleSettings, ScaleSolve, solve_at_scale
from exitwise.calibration.scale.runner import Runner, run_local
from exitwise.policies.document import build_document, calibration_section, data_section, held_out_section

__all__ = ["ScaleOutcome", "SolveOutcome", "check_same_model", "evaluate_policy", "solve_policy",
           "solve_policy_at_scale"]

ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True, eq=False)
class SolveOutcome:
    """A solved policy: its document, the solution behind it and how it compares on held-out rows.

    ``certify`` is measured on the certify split (what the document's ``expected`` section
    holds); ``held_out`` on the test logs, or the same as ``certify`` without them.
    """

    document: dict[str, Any]
    solution: Solution
    certify: HeldOut
    held_out: HeldOut

    @property
    def segment_column(self) -> str | None:
        """The composite segment column of the policy (``a|b`` for two keys), None without keys."""
        return _segment_column(self.solution.prepared.spec)


def _segment_column(spec: SolveSpec) -> str | None:
    return "|".join(spec.segment_keys) or None


def solve_policy(
    logs: ExitLogs,
    spec: SolveSpec,
    *,
    test_logs: ExitLogs | None = None,
    baselines: Sequence[str] = NAMES,
    shadow_rate: float = 0.01,
    progress: ProgressFn | None = None,
    evidence: Mapping[str, str] | None = None,
) -> SolveOutcome:
    """Solve and certify least-compute thresholds on ``logs``, document them, compare them.

    ``baselines`` are names from :data:`~exitwise.calibration.baselines.NAMES` (``()``: the
    solver alone); ``test_logs`` (same exits and classes) give the held-out comparison,
    otherwise it is the certify split. ``progress(message, fraction)`` follows the stages.
    ``evidence`` (where the logs and card are) is recorded for re-verification at approval.
    """
    report: ProgressFn = progress or (lambda message, fraction: None)
    if test_logs is not None and (test_logs.n_exits != logs.n_exits or test_logs.n_classes != logs.n_classes):
        raise InputError(f"{test_logs.source}: test logs have {test_logs.n_exits} exits and {test_logs.n_classes} "
                         f"classes, the calibration logs {logs.n_exits} and {logs.n_classes}")
    prepared = prepare(logs, spec, progress=lambda message, fraction: report(message, 0.05))
    solution = solve_prepared(prepared, progress=lambda message, fraction: report(message, 0.1 + 0.6 * fraction))
    chosen = choose_baselines(solution, names=baselines,
                              progress=lambda name: report(f"baseline: {name}", 0.75))
    certify = evaluate_held_out(solution, chosen, names=baselines,
                                progress=lambda name: report(f"baseline: {name}", 0.85))
    held_out = certify if test_logs is None else evaluate_held_out(solution, chosen, test_logs, names=baselines)
    report("writing policy", 0.95)
    column = _segment_column(spec)
    document = build_document(
        solution, expected=certify.solver, baselines=baselines_json(certify.baselines, column),
        calibration=calibration_section(logs, solution.prepared.calibrators, prepared.splits.certify,
                                        spec.calibration_target, score=spec.score),
        data=data_section(logs, prepared.splits, evidence), shadow_rate=shadow_rate,
        held_out=None if test_logs is None else held_out_section(
            test_logs, held_out.solver, baselines_json(held_out.baselines, column), column),
    )
    return SolveOutcome(document=document, solution=solution, certify=certify, held_out=held_out)


@dataclass(frozen=True, eq=False)
class ScaleOutcome:
    """A policy solved at scale: its document and the passes behind it (counts, timings)."""

    document: dict[str, Any]
    result: ScaleSolve


def solve_policy_at_scale(
    source: Source,
    spec: SolveSpec,
    *,
    settings: ScaleSettings | None = None,
    runner: Runner = run_local,
    shadow_rate: float = 0.01,
    progress: ProgressFn | None = None,
    evidence: Mapping[str, str] | None = None,
    where: str | None = None,
) -> ScaleOutcome:
    """Solve and certify ``spec`` on a streamed ``source`` and build the validated document.

    ``expected`` holds the certify-split figures from the counts (no per-batch compute: the
    engine keeps no row order); the calibration report is measured on the certify sample.
    """
    result = solve_at_scale(source, spec, settings, runner=runner, progress=progress, where=where)
    report = result.report
    calibration = calibration_section(report, result.solution.prepared.calibrators, np.arange(report.n),
                                      spec.calibration_target, score=spec.score)
    data = {**({"evidence": dict(evidence)} if evidence else {}), **result.data}
    document = build_document(result.solution, expected=result.expected, calibration=calibration, data=data,
                              shadow_rate=shadow_rate)
    return ScaleOutcome(document=document, result=result)


def evaluate_policy(document: Mapping[str, Any], logs: ExitLogs, *, risk: str | None = None) -> Evaluation:
    """Apply a saved policy document to ``logs`` of the same model: realised risk and compute.

    ``risk`` defaults to the one the policy was certified for; the logs' model (by name),
    classes and exits (names, in order) must be the policy's: thresholds solved for one model
    say nothing about another, and the realised figures would look valid.
    """
    check_same_model(document, logs)
    return evaluate(document, logs, risk=risk)


def check_same_model(document: Mapping[str, Any], logs: ExitLogs) -> None:
    """Refuse logs (and their card) of another model than ``document``'s: name, classes, exits."""
    where = f"{logs.source}"
    policy_model = (document.get("model") or {}).get("name")
    if policy_model != logs.card.model:
        raise InputError(f"{where}: the card names model {logs.card.model!r}, the policy is for {policy_model!r}")
    vocab = document.get("vocabulary")
    if vocab is not None or logs.card.token_level:
        size = None if vocab is None else vocab.get("size")
        if size != logs.card.vocab_size:
            what = "a classifier" if vocab is None else f"a vocabulary of {size} tokens"
            raise InputError(f"{where}: the policy is for {what}, the logs have "
                             f"{'no vocabulary' if logs.card.vocab_size is None else logs.card.vocab_size}")
        policy_classes = log_classes = []
    else:
        policy_classes = [str(c) for c in document.get("classes", [])]
        log_classes = [str(c) for c in logs.class_names]
    if policy_classes != log_classes:
        raise InputError(f"{where}: the logs' classes {_short(log_classes)} differ from the policy's "
                         f"{_short(policy_classes)}")
    policy_exits = [e["name"] for e in document["exits"]]
    card_exits = [e.name for e in logs.card.exits]
    if policy_exits != card_exits:
        raise InputError(f"{where}: the card's exits {card_exits} differ from the policy's {policy_exits}")


def _short(names: Sequence[str], limit: int = 8) -> str:
    """A list of names for an error message, cut after ``limit`` (with the count)."""
    shown = ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")
    return f"[{shown}]"
