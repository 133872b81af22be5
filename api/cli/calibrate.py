"""``exitwise calibrate``: fit per-exit calibrators and report calibration metrics (issue 2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from exitwise.api.cli.output import stdout_console
from exitwise.api.cli.solve_scale import check_engine_options, open_dataset, scale_runner, scale_settings
from exitwise.calibration.atomic import atomic_write_bytes
from exitwise.calibration.calibrate import TARGETS, calibrate_logs
from exitwise.calibration.calibrators import METHODS
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.optional import require
from exitwise.calibration.scale.calibrate import calibrate_at_scale

FILES = ("calibrators.json", "metrics.json", "reliability.png")


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    """Rich progress bars on stderr (stdout stays clean for --json); transient."""
    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled or not console.is_terminal,
    )
    with progress:
        yield progress


def _check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} {path}: no such file")
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory, expected a file")
    return path


def _params(cal: dict[str, Any]) -> str:
    if cal["type"] == "temperature":
        return f"T={cal['temperature']:.4g}"
    if cal["type"] == "platt":
        w = ", ".join(f"{v:.3g}" for v in cal["coef"])
        return f"w=[{w}] b={cal['intercept']:.3g}"
    return "identity"


def _table(result: Any) -> Table:
    split = f"fit {result.n_fit:,} rows, report {result.n_report:,} rows"
    if result.fit_fraction is not None:
        split += f" (fit fraction {result.fit_fraction:g}, seed {result.seed})"
    else:
        split += f" ({Path(result.report_source).name})"
    table = Table(
        title=f"{result.method} calibration, target {result.target}: {split}",
        caption="before \u2192 after, on the report rows (lower is better)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("exit", style="bold", no_wrap=True)
    table.add_column("calibrator", no_wrap=True)
    table.add_column("accuracy", justify="right", no_wrap=True)
    for col in ("NLL", "ECE", "ECE-mass", "MCE"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, cal, b, a in zip(result.exit_names, result.calibrators, result.before, result.after, strict=True):
        pairs = [(b.nll, a.nll), (b.ece, a.ece), (b.ece_mass, a.ece_mass), (b.mce, a.mce)]
        cells = []
        for before, after in pairs:
            style = "green" if after < before - 5e-4 else ("red" if after > before + 5e-4 else "")
            text = f"{before:.3f} \u2192 {after:.3f}"
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(name, _params(cal.to_dict()), f"{a.accuracy:.4f}", *cells)
    return table


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        logs: Annotated[Path, typer.Argument(
            help="Exit logs: wide/long Parquet, JSON Lines or NPZ (see docs/formats.md).", show_default=False)],
        card: Annotated[Path, typer.Option(
            "--card", help="Model card (JSON or YAML): exit names, cumulative costs, classes, columns.",
            show_default=False)],
        out: Annotated[Path, typer.Option(
            "--out", help="Output directory for calibrators.json, metrics.json and reliability.png "
            "(created; files are replaced atomically).", show_default=False)],
        method: Annotated[str, typer.Option(
            "--method", help="Calibrator per exit: temperature (one T > 0 minimising NLL), platt (logistic map "
            "from confidence features to P(answer correct)) or identity.")] = "temperature",
        fit_fraction: Annotated[float, typer.Option(
            "--fit-fraction", help="Share of the rows (random, seeded) used to fit; metrics are reported on "
            "the rest. Ignored with --report-logs.")] = 0.5,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the fit/report split.")] = 0,
        bins: Annotated[int, typer.Option(
            "--bins", help="Number of bins for ECE, MCE and the reliability diagrams.")] = 15,
        target: Annotated[str, typer.Option(
            "--target", help="What 'correct' means: labels, final (agreement with the final exit, for "
            "unlabelled logs) or auto (labels when present).")] = "auto",
        report_logs: Annotated[Path | None, typer.Option(
            "--report-logs", help="Report metrics on these logs (same card) and fit on all of LOGS, "
            "e.g. fit on a calibration file and report on a test file.", show_default=False)] = None,
        jobs: Annotated[int, typer.Option(
            "--jobs", help="Threads working on different exits at once (-1: all CPUs). Results do not "
            "depend on it.")] = -1,
        engine: Annotated[str, typer.Option(
            help="memory: load the logs whole | stream: a Parquet dataset read in batches, split by a hash of "
                 "the request id (logs larger than memory) | spark: the same passes on Apache Spark.")] = "memory",
        where: Annotated[str | None, typer.Option(
            help="--engine stream|spark: keep the partitions that match, e.g. \"date >= '2026-11-01'\".")] = None,
        sample_rows: Annotated[int, typer.Option(
            help="--engine stream|spark: rows of the fit sample (pilot fit) and of the report sample.")] = 100_000,
        batch_rows: Annotated[int | None, typer.Option(
            help="--engine stream|spark: rows per batch (default 65,536).", show_default=False)] = None,
        master: Annotated[str | None, typer.Option(
            help="--engine spark: the Spark master URL (default local[2]).", show_default=False)] = None,
        as_json: Annotated[bool, typer.Option(
            "--json", help="Print one JSON object (method, per-exit parameters and metrics before/after, "
            "output directory) on stdout instead of the table.")] = False,
    ) -> None:
        """Fit one calibrator per exit on a split of LOGS; report metrics before/after on the other rows.

        Writes OUT/calibrators.json (the policy document's calibrator object per exit).

        Writes OUT/metrics.json (per exit, before and after: accuracy, NLL, Brier, ECE with equal-width
        and equal-mass bins, MCE, reliability-diagram data).

        Writes OUT/reliability.png (one reliability panel per exit, before vs after).
        """
        if method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        if target not in TARGETS:
            raise InputError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
        if not 0.0 < fit_fraction < 1.0:
            raise InputError(f"--fit-fraction must be strictly between 0 and 1, got {fit_fraction}")
        if bins < 1:
            raise InputError(f"--bins must be a positive integer, got {bins}")
        if jobs == 0 or jobs < -1:
            raise InputError(f"--jobs must be a positive integer or -1 (all CPUs), got {jobs}")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a directory")
        check_engine_options(engine, where=where, test=None, spark_only=master is not None)
        _check_file(card, "model card")
        if engine == "memory":
            _check_file(logs, "exit logs")
        elif report_logs is not None:
            raise InputError(f"--report-logs is not available with --engine {engine}: the report rows are the "
                             "hash split's (--fit-fraction)")
        if report_logs is not None:
            _check_file(report_logs, "report logs")
        figures = require("exitwise.policies.figures", "reports", "the reliability diagram of exitwise calibrate")
        passes: dict[str, Any] = {}

        with _progress(True) as progress:
            model_card = load_card(card)
            if engine != "memory":
                task = progress.add_task("reading the dataset", total=1.0)
                result, passes = calibrate_at_scale(
                    open_dataset(logs, model_card, where, batch_rows), method, fit_fraction, seed,
                    target=target, n_bins=bins, settings=scale_settings(sample_rows),  # type: ignore[arg-type]
                    runner=scale_runner(engine, master),
                    progress=lambda message, frac: progress.update(task, description=message, completed=frac))
            else:
                task = progress.add_task("loading logs", total=None)
                fit_logs = load_logs(logs, model_card)
                rep_logs = load_logs(report_logs, model_card) if report_logs is not None else None
                progress.update(task, total=1, completed=1)
                k_total = fit_logs.n_exits
                task = progress.add_task(f"calibrating {k_total} exits", total=2 * k_total)
                result = calibrate_logs(
                    fit_logs, method, fit_fraction, seed, report_logs=rep_logs, target=target,  # type: ignore[arg-type]
                    n_bins=bins, progress=lambda stage, k: progress.advance(task), n_jobs=jobs,
                )
            task = progress.add_task("rendering reliability diagram", total=1)
            png = figures.reliability_png(
                result.exit_names, result.before, result.after,
                title=f"{model_card.model}: reliability before vs after {method} scaling (report split)",
                label_after=f"{method}" if method != "identity" else "identity",
            )
            progress.advance(task)

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "calibrators.json", _dumps(result.calibrators_document(model_card)).encode())
        atomic_write_bytes(out / "metrics.json", _dumps(result.metrics_document(model_card)).encode())
        atomic_write_bytes(out / "reliability.png", png)

        if as_json:
            payload = {**result.to_dict(), "model": model_card.model, "out": str(out),
                       "files": {name: str(out / name) for name in FILES}}
            if passes:
                payload["passes"] = {k: {"rows": int(v["rows"]), "seconds": round(v["seconds"], 3)}
                                     for k, v in passes.items()}
            typer.echo(json.dumps(payload, sort_keys=True, allow_nan=False))
            return
        console = stdout_console()
        console.print(_table(result))
        console.print(f"wrote {', '.join(str(out / name) for name in FILES)}", highlight=False)
