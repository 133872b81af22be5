"""``exitwise solve`` and ``exitwise evaluate``: solve a certified policy, apply one to logs."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exitwise.api.cli import stdout_console
from exitwise.calibration.exceptions import InputError

_err = Console(stderr=True)


def _pct(v: Any, digits: int = 1) -> str:
    return "—" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.{digits}f}%"


def _risk(v: Any) -> str:
    return "—" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.3f}%"


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr; yields ``update(message, fraction)``."""
    if not enabled:
        yield lambda msg, frac: None
        return
    with Progress(TextColumn("[bold]{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=_err, transient=True) as bar:
        task = bar.add_task("loading", total=1.0)

        def update(msg: str, frac: float) -> None:
            bar.update(task, description=msg, completed=max(0.0, min(1.0, frac)))

        yield update


def _load(logs_path: Path, card_path: Path) -> Any:
    from exitwise.calibration.logfiles.cards import load_card
    from exitwise.calibration.logfiles.readers import load_logs

    return load_logs(logs_path, load_card(card_path))


def _check_test_logs(logs: Any, test: Any) -> None:
    if test.n_exits != logs.n_exits or test.n_classes != logs.n_classes:
        raise InputError(f"{test.source}: test logs have {test.n_exits} exits and {test.n_classes} classes, "
                         f"the calibration logs {logs.n_exits} and {logs.n_classes}")


def register(app: typer.Typer) -> None:
    @app.command("solve")
    def solve_cmd(
        logs: Annotated[Path, typer.Argument(help="Calibration exit logs (Parquet, JSONL or NPZ).", dir_okay=False)],
        card: Annotated[Path, typer.Option("--card", help="Model card (JSON or YAML).", dir_okay=False)],
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the policy JSON.", dir_okay=False)],
        risk: Annotated[str, typer.Option(help="disagreement | induced_error (needs labels).")] = "disagreement",
        eps: Annotated[float, typer.Option(help="Risk budget, in (0, 1).")] = 0.01,
        delta: Annotated[float, typer.Option(help="1 - confidence of the guarantee, in (0, 1).")] = 0.05,
        score: Annotated[str, typer.Option(help="max_prob | margin | entropy.")] = "max_prob",
        calibrator: Annotated[str, typer.Option(help="temperature | platt | identity.")] = "temperature",
        segment_key: Annotated[list[str] | None, typer.Option(
            "--segment-key", help="Segment column(s) with their own thresholds (repeatable).")] = None,
        segment_budget: Annotated[list[str] | None, typer.Option(
            "--segment-budget", help="SEG=EPS: a segment value with its own certified budget ('*=EPS': all).")] = None,
        forbid_class: Annotated[list[str] | None, typer.Option(
            "--forbid-class", help="A class that always runs at full depth (repeatable).")] = None,
        forbid_segment: Annotated[list[str] | None, typer.Option(
            "--forbid-segment", help="A segment value that always runs at full depth (repeatable).")] = None,
        max_exit: Annotated[int | None, typer.Option("--max-exit", help="Deepest exit that may answer early.")] = None,
        shadow_rate: Annotated[float, typer.Option(help="Fraction of traffic also run at full depth and logged.")]
        = 0.01,
        seed: Annotated[int, typer.Option(help="Seed of the fit / select / certify split.")] = 0,
        fit_fraction: Annotated[float | None, typer.Option(
            help="Share of the rows that fit the calibrators (at most 50,000 rows). Default 0.1.",
            show_default=False)] = None,
        select_fraction: Annotated[float | None, typer.Option(
            help="Share of the rows that choose the thresholds (at most 250,000 rows); the rest certify. "
                 "Default 0.3.", show_default=False)] = None,
        test: Annotated[Path | None, typer.Option(
            "--test", help="Held-out test logs for the summary (default: the certify split).", dir_okay=False)] = None,
        no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the baselines (faster).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (nothing else on stdout).")]
        = False,
    ) -> None:
        """Solve least-compute thresholds under a certified risk budget and write the policy document."""
        from exitwise.calibration import baselines as bl
        from exitwise.calibration.evaluate import evaluate_scored
        from exitwise.calibration.solver import (
            SolveSpec,
            SplitSpec,
            check_budget,
            parse_budgets,
            prepare,
            solve_prepared,
        )
        from exitwise.policies.document import build_document, calibration_section, data_section, write_document

        t0 = time.perf_counter()
        check_budget(eps, "--eps")
        check_budget(delta, "--delta")
        if not 0.0 <= shadow_rate <= 1.0:
            raise InputError(f"--shadow-rate must be in [0, 1], got {shadow_rate}")
        spec = SolveSpec(
            risk=risk, eps=eps, delta=delta, score=score, calibrator=calibrator,
            segment_keys=tuple(segment_key or ()), segment_budgets=parse_budgets(segment_budget or ()),
            forbid_classes=tuple(forbid_class or ()), forbid_segments=tuple(forbid_segment or ()),
            max_exit=max_exit, seed=seed,
            split=SplitSpec(fit=SplitSpec.fit if fit_fraction is None else fit_fraction,
                            select=SplitSpec.select if select_fraction is None else select_fraction),
        )
        with _progress(not as_json) as update:
            update("loading logs", 0.0)
            data = _load(logs, card)
            test_logs = _load(test, card) if test is not None else None
            if test_logs is not None:
                _check_test_logs(data, test_logs)
            prepared = prepare(data, spec, progress=lambda m, f: update(m, 0.05))
            solution = solve_prepared(prepared, progress=lambda m, f: update(m, 0.1 + 0.6 * f))
            cert_scored = bl.evaluation_data(solution)
            expected = evaluate_scored(solution.policy, cert_scored, spec.risk)
            chosen: dict[str, Any] = {}
            base_cert: dict[str, Any] = {}
            if not no_baselines:
                chosen = bl.choose_baselines(solution, progress=lambda m: update(f"baseline: {m}", 0.75))
                base_cert = bl.run_baselines(solution, cert_scored, chosen,
                                             progress=lambda m: update(f"baseline: {m}", 0.85))
            update("writing policy", 0.95)
            seg_col = "|".join(spec.segment_keys) or None
            target = "labels" if spec.risk == "induced_error" else "final"
            doc = build_document(
                solution, expected=expected,
                baselines={k: v.to_json(seg_col) for k, v in base_cert.items() if k in ("full_depth",
                           "global_threshold", "calm", "per_exit", "oracle", "per_sample_oracle")},
                calibration=calibration_section(data, prepared.calibrators, prepared.splits.select, target),
                data=data_section(data, prepared.splits), shadow_rate=shadow_rate,
            )
            path = write_document(doc, out)
            if test_logs is not None:
                where = f"test logs {test_logs.source} ({test_logs.n} rows)"
                held = bl.evaluation_data(solution, test_logs)
                sol_eval = evaluate_scored(solution.policy, held, spec.risk)
                rows = bl.run_baselines(solution, held, chosen, test_logs=test_logs) if chosen else {}
            else:
                where = f"certify split ({expected.n} rows, not used to choose the path)"
                sol_eval, rows = expected, base_cert
        elapsed = time.perf_counter() - t0
        g = doc["guarantee"]
        overall = (g["segments"].get("__all__") or {}).get("upper_bound")
        summary = {
            "out": str(path), "content_hash": doc["content_hash"], "certified": g["certified"],
            "risk_type": spec.risk, "eps": spec.eps, "delta": spec.delta, "upper_bound": overall,
            "uncertified_segments": g["uncertified_segments"], "evaluated_on": where,
            "solution": _row_json(sol_eval, seg_col, g["certified"]),
            "baselines": {k: v.to_json(seg_col) for k, v in rows.items()},
            "split": g["split"], "seconds": round(elapsed, 3),
        }
        if as_json:
            typer.echo(json.dumps(summary, sort_keys=True, allow_nan=False, default=_json_default))
            return
        _print_summary(summary, doc, seg_col)

    @app.command("evaluate")
    def evaluate_cmd(
        policy: Annotated[Path, typer.Argument(help="Policy document (JSON).", dir_okay=False)],
        logs: Annotated[Path, typer.Argument(help="Exit logs to apply it to.", dir_okay=False)],
        card: Annotated[Path, typer.Option("--card", help="Model card of the logs.", dir_okay=False)],
        risk: Annotated[str | None, typer.Option(help="Risk to report (default: the policy's own).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (nothing else on stdout).")]
        = False,
    ) -> None:
        """Apply a saved policy to other logs: realised risk and compute, per segment and batch size."""
        from exitwise.calibration.evaluate import evaluate
        from exitwise.policies.document import read_document

        doc = read_document(policy)
        data = _load(logs, card)
        if [e["name"] for e in doc["exits"]] != [e.name for e in data.card.exits]:
            raise InputError(f"{logs}: the card's exits {[e.name for e in data.card.exits]} differ from the "
                             f"policy's {[e['name'] for e in doc['exits']]}")
        ev = evaluate(doc, data, risk=risk)
        out = {"policy": str(policy), "content_hash": doc["content_hash"], "logs": str(logs), **ev.to_json()}
        if as_json:
            typer.echo(json.dumps(out, sort_keys=True, allow_nan=False, default=_json_default))
            return
        console = stdout_console()
        table = Table(title=f"{policy.name} on {logs.name} ({ev.n} rows)")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("compute fraction", _pct(ev.compute_fraction))
        table.add_row(f"risk ({ev.risk_type})", _risk(ev.risk))
        table.add_row("disagreement", _risk(ev.disagreement))
        table.add_row("induced error", _risk(ev.induced_error))
        for b, v in ev.batch_compute_fraction.items():
            table.add_row(f"compute fraction, batch {b}", _pct(v))
        table.add_row("exit rate", " / ".join(_pct(r, 0) for r in ev.exit_rate))
        console.print(table)
        for col, vals in ev.segments.items():
            st = Table(title=f"segment column {col}")
            for h in ("value", "rows", "compute", "risk"):
                st.add_column(h, justify="right" if h != "value" else "left")
            for v, s in vals.items():
                st.add_row(v, f"{s.n:,}", _pct(s.compute_fraction), _risk(s.risk))
            console.print(st)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _row_json(ev: Any, seg_col: str | None, certified: bool) -> dict[str, Any]:
    segs = ev.segments.get(seg_col or "", {})
    worst = max(segs, key=lambda v: segs[v].risk) if segs else None
    return {"compute_fraction": ev.compute_fraction, "risk": ev.risk, "disagreement": ev.disagreement,
            "induced_error": ev.induced_error, "certified": certified,
            "worst_segment": worst, "worst_segment_risk": segs[worst].risk if worst else None,
            "batch_compute_fraction": {str(k): v for k, v in ev.batch_compute_fraction.items()}}


def _print_summary(summary: dict[str, Any], doc: dict[str, Any], seg_col: str | None) -> None:
    from exitwise.calibration.baselines import LABELS

    console = stdout_console()
    g = doc["guarantee"]
    status = "[green]certified[/]" if g["certified"] else "[red]NOT certified: runs at full depth[/]"
    console.print(f"wrote [bold]{summary['out']}[/] ({status}; content hash {summary['content_hash'][:12]})")
    console.print(f"{g['risk']} <= {g['eps']} with confidence {1 - g['delta']:.0%}; "
                  f"certified upper bound {_risk(summary['upper_bound'])} on {g['n']:,} certify rows; "
                  f"split fit/select/certify = {g['split']['fit']:,}/{g['split']['select']:,}/"
                  f"{g['split']['certify']:,} (seed {g['split']['seed']})")
    if g["uncertified_segments"]:
        console.print(f"[yellow]segments too small to certify (run at full depth): "
                      f"{', '.join(g['uncertified_segments'])}[/]")
    table = Table(title=f"held-out: {summary['evaluated_on']}")
    table.add_column("policy")
    table.add_column("compute", justify="right")
    table.add_column(f"risk ({g['risk']})", justify="right")
    if seg_col:
        table.add_column("worst segment risk", justify="right")
    table.add_column("certified", justify="center")
    rows = [("solver", summary["solution"]), *list(summary["baselines"].items())]
    for name, r in rows:
        cert = r.get("certified")
        cells = [LABELS.get(name, name), _pct(r["compute_fraction"]), _risk(r["risk"])]
        if seg_col:
            cells.append(f"{_risk(r.get('worst_segment_risk'))} ({r.get('worst_segment') or '—'})")
        cells.append("—" if cert is None else ("yes" if cert else "no"))
        table.add_row(*cells)
    console.print(table)
