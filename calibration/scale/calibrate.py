"""``exitwise calibrate --engine stream|spark``: per-exit calibrators from logs larger than memory.

The fit / report split is the scale engine's hash split (a request id's fit share is
``fit_fraction``). Pass 1 samples both sides by hash; the pilot calibrators are fitted on the
fit sample; temperatures are then refined by Newton steps on exact sums over every fit row
(:func:`~exitwise.calibration.scale.engine.refine_temperatures`). Platt scaling is fitted on
the fit sample only (its parameters are a small logistic regression: the sample decides
them to well within their noise). The before / after metrics are measured on the report
sample (up to ``report_rows`` rows of the report split, chosen by hash), which the result
says.
"""

from __future__ import annotations

from typing import Literal

from exitwise.calibration.calibrate import CalibrationResult, fit_exit_calibrators, resolve_targets
from exitwise.calibration.calibrators import METHODS
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.metrics import exit_metrics_multi
from exitwise.calibration.scale.dataset import Source
from exitwise.calibration.scale.engine import (
    ScaleSettings,
    make_spill,
    refine_temperatures,
    sample_pass,
    source_batch,
)
from exitwise.calibration.scale.passes import SplitSelector
from exitwise.calibration.scale.runner import ProgressFn, Runner, run_local

__all__ = ["calibrate_at_scale"]


def calibrate_at_scale(
    source: Source,
    method: str = "temperature",
    fit_fraction: float = 0.5,
    seed: int = 0,
    *,
    target: Literal["auto", "labels", "final"] = "auto",
    n_bins: int = 15,
    settings: ScaleSettings | None = None,
    runner: Runner = run_local,
    progress: ProgressFn | None = None,
) -> tuple[CalibrationResult, dict[str, dict[str, float]]]:
    """Fit one calibrator per exit on the fit split of ``source`` and measure it on the report sample.

    Returns the result (the same kind :func:`~exitwise.calibration.calibrate.calibrate_logs`
    gives) and the passes that were run (rows, seconds).
    """
    settings = (settings or ScaleSettings()).check()
    if source.card.token_level:
        raise InputError("calibrate --engine reads classifier logs; token-level logs are calibrated in memory "
                         "(or by solve --engine, on the sample)")
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 < fit_fraction < 1.0:
        raise InputError(f"--fit-fraction must be strictly between 0 and 1, got {fit_fraction}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise InputError(f"bins must be a positive integer, got {n_bins!r}")
    split = SplitSelector(seed, fit_fraction, True)
    spill = make_spill(source, runner, settings, split, method == "temperature")
    passes: dict[str, dict[str, float]] = {}
    try:
        p1 = sample_pass(source, runner, settings, seed, fit_fraction, (), progress, spill, passes)
        fit, report = p1.choose_sample(), p1.report_sample()
        if fit is None or report is None:
            raise InputError(f"{source.name}: {p1.rows} rows leave the fit or the report split empty")
        if target == "labels" and not p1.labelled:
            raise InputError(f"{source.name}: the logs have no labels; use --target final")
        kind = "labels" if target != "final" and p1.labelled else "final"
        card = source.card
        fit_logs = fit.to_logs(card, source.name)
        if progress is not None:
            progress("fitting pilot calibrators on the sample", 0.35)
        cals = fit_exit_calibrators(fit_logs, method, target=kind)
        if method == "temperature" and p1.n_choose > fit_logs.n:
            cals = refine_temperatures(source, runner, cals, kind, settings, progress, split, passes,
                                       None if spill is None else spill.source(source_batch(source)))
    finally:
        if spill is not None:
            spill.remove()
    rep_logs = report.to_logs(card, source.name)
    y_rep, _ = resolve_targets(rep_logs, None, kind)
    before, after = [], []
    for k in range(rep_logs.n_exits):
        b, a = exit_metrics_multi(rep_logs.logits[:, k, :], y_rep, [None, cals[k]], n_bins)
        before.append(b)
        after.append(a)
    if progress is not None:
        progress("done", 1.0)
    result = CalibrationResult(
        method=method, target=kind, exit_names=tuple(e.name for e in card.exits), calibrators=tuple(cals),
        before=tuple(before), after=tuple(after), n_fit=p1.n_choose, n_report=rep_logs.n, seed=int(seed),
        fit_fraction=float(fit_fraction), n_bins=int(n_bins), source=source.name,
        report_source=f"{source.name} (a sample by hash of {p1.n_certify:,} report rows)",
    )
    return result, passes
