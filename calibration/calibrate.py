"""Calibrating exit logs: one calibrator per exit (:func:`fit_exit_calibrators`), and the calibration job.

The job (:func:`calibrate_logs`, ``exitwise calibrate``) follows the design contract: "Calibration is
fitted on one split and reported on another." The split is a seeded random permutation
(:func:`exitwise.calibration.splits.split_rows`; no stratification: with thousands of rows per
exit the metrics do not need it); alternatively separate report logs can be given (e.g. a
test file). Work goes exit by exit on (n, C) slices, so memory stays a small multiple of one
exit's logits. The estimators themselves are in :mod:`exitwise.calibration.calibrators`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from exitwise.calibration.calibrators import METHODS, Calibrator, IdentityCalibrator, make_calibrator
from exitwise.calibration.exceptions import CalibrationError, InputError
from exitwise.calibration.groups import GroupIndex, split_groups
from exitwise.calibration.logs import ExitLogs, ModelCard
from exitwise.calibration.metrics import ExitMetrics, exit_metrics_multi
from exitwise.calibration.splits import split_rows
from exitwise.calibration.tokens import TokenLogs
from exitwise.calibration.topk_calibrate import fit_topk_calibrators, topk_exit_metrics, topk_targets

__all__ = [
    "TARGETS",
    "CalibrationResult",
    "TargetKind",
    "calibrate_logs",
    "fit_exit",
    "fit_exit_calibrators",
    "map_exits",
    "resolve_targets",
]

ProgressFn = Callable[[str, int], None]
TargetKind = Literal["auto", "labels", "final"]
TARGETS: tuple[str, ...] = get_args(TargetKind)
T = TypeVar("T")


def resolve_targets(
    data: ExitLogs | np.ndarray, targets: Any = None, target: TargetKind = "auto"
) -> tuple[np.ndarray, str]:
    """Per-sample targets (n,) or (n, K) and which kind they are ('labels', 'final' or 'given').

    ``target='auto'`` uses the labels when the logs have them and the final exit's answers
    otherwise; ``'final'`` always uses the final exit's answers (the disagreement risk).
    """
    if targets is not None:
        return np.asarray(targets), "given"
    if target not in ("auto", "labels", "final"):
        raise InputError(f"target must be 'auto', 'labels' or 'final', got {target!r}")
    labels = data.labels if isinstance(data, ExitLogs) else None
    logits = data.logits if isinstance(data, ExitLogs) else np.asarray(data)
    if target == "labels" and labels is None:
        where = data.source if isinstance(data, ExitLogs) else "logits"
        raise InputError(f"{where}: the logs have no labels; use target 'final' (agreement with the final exit)")
    if labels is not None and target != "final":
        return np.asarray(labels), "labels"
    if logits.ndim != 3:
        raise InputError(f"logits must have shape (n, K, C), got {logits.shape}")
    return np.argmax(logits[:, -1, :], axis=1), "final"


def fit_exit_calibrators(
    data: ExitLogs | np.ndarray,
    method: str = "temperature",
    *,
    targets: Any = None,
    target: TargetKind = "auto",
    index: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    **params: Any,
) -> list[Calibrator]:
    """One fitted calibrator per exit, fitted exit by exit on (n, C) slices.

    ``data`` is an :class:`ExitLogs` or an (n, K, C) logits array. ``targets`` are class
    indices, (n,) shared by every exit or (n, K) per exit; without them they come from
    ``target`` (see :func:`resolve_targets`): the labels, or the final exit's answers.
    With pseudo-labels the final exit is trivially always "right", so its NLL optimum is
    T -> 0; its calibrator stays the identity (the last exit always answers, so its
    calibrator never changes a decision). ``index`` restricts fitting to those rows (a split)
    without copying the logs. ``progress(k)`` is called after each exit. ``params`` go to
    the calibrator's constructor.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(
            f"unknown calibration method {method!r}; expected one of {METHODS} "
            "(pass targets by keyword: fit_exit_calibrators(logits, method, targets=...))"
        )
    logits = data.logits if isinstance(data, ExitLogs) else np.asarray(data)
    if logits.ndim != 3:
        raise InputError(f"logits must have shape (n, K, C), got {logits.shape}")
    n, k_total, _ = logits.shape
    y_all, kind = resolve_targets(data, targets, target)
    if y_all.shape not in ((n,), (n, k_total)):
        raise InputError(f"targets must have shape ({n},) or ({n}, {k_total}), got {y_all.shape}")
    if index is not None:
        index = np.asarray(index)
        y_all = y_all[index]
    out: list[Calibrator] = []
    for k in range(k_total):
        y = y_all if y_all.ndim == 1 else y_all[:, k]
        z = logits[:, k, :] if index is None else logits[index, k, :]
        out.append(fit_exit(z, y, method, k=k, pseudo_final=kind == "final" and k == k_total - 1, **params))
        if progress is not None:
            progress(k)
    return out


def fit_exit(
    logits_k: Any, targets: Any, method: str, *, k: int | None = None, pseudo_final: bool = False, **params: Any
) -> Calibrator:
    """Fit one exit's calibrator; errors name exit ``k``. ``pseudo_final``: this is the final
    exit and its targets are its own answers, so it keeps the identity (see
    :func:`fit_exit_calibrators`)."""
    if pseudo_final:
        return IdentityCalibrator().fit(logits_k, targets)
    cal = make_calibrator(method, **params)
    where = "" if k is None else f"exit {k}: "
    try:
        return cal.fit(logits_k, targets)
    except InputError as exc:
        raise InputError(f"{where}{exc}") from exc
    except CalibrationError as exc:
        raise CalibrationError(f"{where}{exc}") from exc


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Per-exit fitted calibrators and metrics before/after on the report split.

    ``target`` says what "correct" meant: ``labels``, or ``final`` (agreement with the final
    exit's answer, for unlabelled logs). ``n_fit`` / ``n_report`` are the split sizes;
    ``fit_fraction`` is None when separate report logs were used.
    """

    method: str
    target: str
    exit_names: tuple[str, ...]
    calibrators: tuple[Calibrator, ...]
    before: tuple[ExitMetrics, ...]
    after: tuple[ExitMetrics, ...]
    n_fit: int
    n_report: int
    seed: int
    fit_fraction: float | None
    n_bins: int
    source: str
    report_source: str

    def calibrator_dicts(self) -> list[dict[str, Any]]:
        """The policy document's calibrator objects, one per exit."""
        return [c.to_dict() for c in self.calibrators]

    def policy_section(self) -> dict[str, Any]:
        """The policy document's ``calibration`` field: per exit name, before and after."""
        return {
            "exits": [
                {"name": name, "before": b.to_dict(), "after": a.to_dict()}
                for name, b, a in zip(self.exit_names, self.before, self.after, strict=True)
            ]
        }

    def calibrators_document(self, card: ModelCard) -> dict[str, Any]:
        """``calibrators.json`` of ``exitwise calibrate``: per exit of ``card``, its cost and calibrator object."""
        return {
            "schema": "exitwise.calibrators/v1",
            "model": card.model,
            "method": self.method,
            "target": self.target,
            "split": self.to_dict()["split"],
            "exits": [
                {"name": e.name, "cost": e.cost, "calibrator": c}
                for e, c in zip(card.exits, self.calibrator_dicts(), strict=True)
            ],
        }

    def metrics_document(self, card: ModelCard) -> dict[str, Any]:
        """``metrics.json`` of ``exitwise calibrate``: the summary with reliability-diagram data per exit."""
        return {"model": card.model, **self.to_dict(reliability=True)}

    def to_dict(self, *, reliability: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``reliability=True`` adds the reliability-diagram data per exit."""
        exits = []
        for name, cal, b, a in zip(self.exit_names, self.calibrators, self.before, self.after, strict=True):
            d = cal.to_dict()
            entry: dict[str, Any] = {"name": name, "calibrator": d}
            entry.update({k: v for k, v in d.items() if k != "type"})
            entry.update({"n": b.n, "before": b.to_dict(), "after": a.to_dict()})
            if reliability:
                entry["reliability"] = {
                    "before": {"width": b.reliability.to_dict(), "mass": b.reliability_mass.to_dict()},
                    "after": {"width": a.reliability.to_dict(), "mass": a.reliability_mass.to_dict()},
                }
            exits.append(entry)
        return {
            "method": self.method,
            "target": self.target,
            "split": {
                "fit": self.n_fit,
                "report": self.n_report,
                "seed": self.seed,
                "fit_fraction": self.fit_fraction,
                "fit_source": self.source,
                "report_source": self.report_source,
            },
            "n_bins": self.n_bins,
            "exits": exits,
        }


def map_exits(fn: Callable[[int], T], k_total: int, n_jobs: int | None) -> list[T]:
    """[fn(0), ..., fn(K-1)] on ``n_jobs`` threads (None: 1, -1: all CPUs), in exit order."""
    if n_jobs is None:
        workers = 1
    elif isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise InputError(f"n_jobs must be a positive integer, -1 (all CPUs) or None, got {n_jobs!r}")
    else:
        workers = (os.cpu_count() or 1) if n_jobs == -1 else n_jobs
    workers = max(1, min(workers, k_total))
    if workers == 1:
        return [fn(k) for k in range(k_total)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="exitwise-calibrate") as pool:
        return list(pool.map(fn, range(k_total)))


def _fit_size(n: int, fit_fraction: float) -> int:
    """Rows that fit the calibrators when ``fit_fraction`` of n are used; the report split keeps the rest."""
    if not (isinstance(fit_fraction, (int, float)) and 0.0 < float(fit_fraction) < 1.0):
        raise InputError(f"fit fraction must be strictly between 0 and 1, got {fit_fraction!r}")
    n_fit = round(float(fit_fraction) * n)
    if n_fit < 1 or n_fit > n - 1:
        raise InputError(
            f"cannot split {n} rows with fit fraction {fit_fraction}: both the fit and the report split need rows"
        )
    return n_fit


def _calibrate_tokens(logs: Any, method: str, fit_fraction: float, seed: int, *, report_logs: Any,
                      target: TargetKind, n_bins: int, progress: ProgressFn | None) -> CalibrationResult:
    """:func:`calibrate_logs` for token-level logs: the split is cut between sequences (groups),
    the calibrators and metrics work on the top-k (:mod:`exitwise.calibration.topk_calibrate`)."""
    if not isinstance(logs, TokenLogs) or (report_logs is not None and not isinstance(report_logs, TokenLogs)):
        raise InputError("calibrate: the fit and report logs must both be token-level logs, or neither")
    if report_logs is not None and (report_logs.n_exits, report_logs.vocab_size) != (logs.n_exits, logs.vocab_size):
        raise InputError(f"{report_logs.source}: report logs have {report_logs.n_exits} exits and vocabulary "
                         f"{report_logs.vocab_size}, the fit logs {logs.n_exits} and {logs.vocab_size}")
    kind = "labels" if target in ("auto", "labels") and logs.labels is not None else "final"
    if target == "labels" and logs.labels is None:
        raise InputError(f"{logs.source}: the logs have no labels; use target 'final' (agreement with the final exit)")
    if report_logs is None:
        groups = GroupIndex.from_values(logs.groups if logs.groups is not None else np.arange(logs.n))
        if groups.n_groups < 2:
            raise InputError(f"{logs.source}: need at least 2 sequences to fit on one split and report on another")
        fit_idx, rep_idx = split_groups(groups, _fit_size(groups.n_groups, fit_fraction), seed)
        rep = logs.take(rep_idx)
        fit_fraction_used: float | None = float(fit_fraction)
    else:
        fit_idx, rep = None, report_logs
        fit_fraction_used = None
    cals = fit_topk_calibrators(logs, method, target=kind, index=fit_idx, seed=seed,
                                progress=None if progress is None else (lambda k: progress("fit", k)))
    if kind == "labels" and rep.labels is None:
        raise InputError(f"{rep.source}: the report logs have no labels")
    y_rep = topk_targets(rep, kind)
    before, after = [], []
    for k in range(logs.n_exits):
        b, a = topk_exit_metrics(rep.values[:, k], rep.indices[:, k], rep.lse[:, k], rep.vocab_size, y_rep,
                                 [{"type": "identity"}, cals[k].to_dict()], n_bins)
        before.append(b)
        after.append(a)
        if progress is not None:
            progress("metrics", k)
    return CalibrationResult(
        method=method, target=kind, exit_names=tuple(e.name for e in logs.card.exits), calibrators=tuple(cals),
        before=tuple(before), after=tuple(after), n_fit=logs.n if fit_idx is None else int(fit_idx.size),
        n_report=rep.n, seed=int(seed), fit_fraction=fit_fraction_used, n_bins=int(n_bins), source=logs.source,
        report_source=rep.source)


def calibrate_logs(
    logs: ExitLogs,
    method: str = "temperature",
    fit_fraction: float = 0.5,
    seed: int = 0,
    *,
    report_logs: ExitLogs | None = None,
    target: TargetKind = "auto",
    n_bins: int = 15,
    progress: ProgressFn | None = None,
    n_jobs: int | None = None,
) -> CalibrationResult:
    """Fit per-exit calibrators on one split of ``logs`` and report metrics on the other.

    With ``report_logs`` every row of ``logs`` is used for fitting and the metrics are
    computed on ``report_logs`` (same card shape). ``progress(stage, k)`` is called after
    each exit is fitted (``"fit"``) and measured (``"metrics"``), possibly from worker threads.
    ``n_jobs`` threads work on different exits at once (numpy releases the GIL in its loops);
    None means 1 and -1 all CPUs, as in scikit-learn. Results do not depend on it.
    """
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"bins must be a positive integer, got {n_bins!r}")
    if isinstance(logs, TokenLogs) or isinstance(report_logs, TokenLogs):
        return _calibrate_tokens(logs, method, fit_fraction, seed, report_logs=report_logs, target=target,
                                 n_bins=n_bins, progress=progress)
    if report_logs is None and logs.n < 2:
        raise InputError(f"{logs.source}: need at least 2 rows to fit on one split and report on another")
    if report_logs is not None and report_logs.logits.shape[1:] != logs.logits.shape[1:]:
        raise InputError(
            f"{report_logs.source}: report logs have (exits, classes) = {report_logs.logits.shape[1:]}, "
            f"but the fit logs {logs.source} have {logs.logits.shape[1:]}"
        )
    if target == "labels" and report_logs is not None and report_logs.labels is None:
        raise InputError(f"{report_logs.source}: the report logs have no labels")
    if report_logs is not None and logs.labels is not None and report_logs.labels is None and target == "auto":
        target = "final"  # the report split can only measure agreement with the final exit
    y_fit_all, kind = resolve_targets(logs, None, target)
    if report_logs is None:
        fit_idx, rep_idx = split_rows(logs.n, [_fit_size(logs.n, fit_fraction)], seed)
        rep_logits, y_rep = logs.logits, y_fit_all[rep_idx]
        fit_fraction_used: float | None = float(fit_fraction)
    else:
        fit_idx, rep_idx = None, None
        rep_logits = report_logs.logits
        y_rep, _ = resolve_targets(report_logs, None, kind)  # type: ignore[arg-type]
        fit_fraction_used = None
    k_total = logs.n_exits
    names = tuple(e.name for e in logs.card.exits)
    y_fit = y_fit_all if fit_idx is None else y_fit_all[fit_idx]

    def one_exit(k: int) -> tuple[Calibrator, ExitMetrics, ExitMetrics]:
        z_fit = logs.logits[:, k, :] if fit_idx is None else logs.logits[fit_idx, k, :]
        cal = fit_exit(z_fit, y_fit, method, k=k, pseudo_final=kind == "final" and k == k_total - 1)
        del z_fit
        if progress is not None:
            progress("fit", k)
        z_rep = rep_logits[:, k, :] if rep_idx is None else rep_logits[rep_idx, k, :]
        before, after = exit_metrics_multi(z_rep, y_rep, [None, cal], n_bins)
        if progress is not None:
            progress("metrics", k)
        return cal, before, after

    per_exit = map_exits(one_exit, k_total, n_jobs)
    return CalibrationResult(
        method=method,
        target=kind,
        exit_names=names,
        calibrators=tuple(r[0] for r in per_exit),
        before=tuple(r[1] for r in per_exit),
        after=tuple(r[2] for r in per_exit),
        n_fit=logs.n if fit_idx is None else int(fit_idx.size),
        n_report=int(rep_logits.shape[0] if rep_idx is None else rep_idx.size),
        seed=int(seed),
        fit_fraction=fit_fraction_used,
        n_bins=int(n_bins),
        source=logs.source,
        report_source=logs.source if report_logs is None else report_logs.source,
    )
