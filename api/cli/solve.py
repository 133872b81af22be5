"""``exitwise solve`` and ``exitwise evaluate``: solve a certified policy, apply one to logs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exitwise.api.cli.output import percent, stdout_console
from exitwise.api.cli.solve_scale import check_engine_options, scale_summary, solve_scale
from exitwise.calibration.baselines import LABELS, NAMES, baselines_json
from exitwise.calibration.certify import ALL
from exitwise.calibration.evaluate import BudgetCheck, Evaluation, check_budgets
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.families import FAMILIES
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.pipeline import SolveSpec, check_budget, parse_budgets
from exitwise.calibration.splits import SplitSpec
from exitwise.policies.authoring import evaluate_policy, solve_policy
from exitwise.policies.document_files import read_document, write_document

_err = Console(stderr=True)
OVER_BUDGET_EXIT = 3  # evaluate --fail-over-budget: a constrained segment's realised risk is over its budget


def _pct(v: Any, digits: int = 1) -> str:
    return percent(v, digits)


def _risk(v: Any) -> str:
    return percent(v, 3)


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
    """The exit logs at ``logs_path`` described by the model card at ``card_path``."""
    return load_logs(logs_path, load_card(card_path))


_MAX_BUCKET_MAP_BYTES = 64 << 20


def _bucket_map(path: Path | None) -> dict[str, Any] | None:
    """The ``--bucket-map`` JSON object, read with a size limit; InputError naming the file."""
    if path is None:
        return None
    try:
        if path.stat().st_size > _MAX_BUCKET_MAP_BYTES:
            raise InputError(f"{path}: bucket map larger than {_MAX_BUCKET_MAP_BYTES >> 20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the bucket map ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: the bucket map is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the bucket map must be a JSON object {{bucket: [token ids]}}")
    return data


def register(app: typer.Typer) -> None:
    @app.command("solve")
    def solve_cmd(
        logs: Annotated[Path, typer.Argument(
            help="Calibration exit logs (Parquet, JSONL or NPZ); with --engine stream|spark a Parquet file or "
                 "dataset directory (hive partitions such as date=.../model=...).")],
        card: Annotated[Path, typer.Option("--card", help="Model card (JSON or YAML).", dir_okay=False)],
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the policy JSON.", dir_okay=False)],
        risk: Annotated[str, typer.Option(
            help="disagreement | induced_error (needs labels) | sequence_disagreement (share of groups with any "
                 "disagreeing row; needs groups).")] = "disagreement",
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
        seed: Annotated[int, typer.Option(help="Seed of the choose / certify split and the folds.")] = 0,
        choose_fraction: Annotated[float | None, typer.Option(
            help="Share of the rows that fit the calibrators, choose the family and solve its path (at most "
                 "100,000 rows); the rest certify. Default: 0.3 up to 30,000 rows, less above.",
            show_default=False)] = None,
        family: Annotated[list[str] | None, typer.Option(
            "--family", help="Restrict the policy families to choose among (repeatable; default: all; "
                             "one: no cross-validation). " + ", ".join(FAMILIES) + ".")] = None,
        group_column: Annotated[str | None, typer.Option(
            "--group-column", help="Rows sharing this column's value are dependent (a sequence, a user): split and "
                                   "certify by group. Token-level logs: the card's group column by default.")] = None,
        bucket_share: Annotated[list[float] | None, typer.Option(
            "--bucket-share", help="Token-level logs: cumulative traffic shares that cut the token-frequency "
                                   "buckets (repeatable; default 0.5 0.8 0.95: four buckets).")] = None,
        bucket_map: Annotated[Path | None, typer.Option(
            "--bucket-map", help="Token-level logs: a JSON object {bucket: [token ids or 'a-b' ranges]} instead "
                                 "of frequency buckets.", dir_okay=False)] = None,
        test: Annotated[Path | None, typer.Option(
            "--test", help="Held-out test logs for the summary (default: the certify split).", dir_okay=False)] = None,
        no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the baselines (faster).")] = False,
        engine: Annotated[str, typer.Option(
            help="memory: load the logs whole | stream: read a Parquet dataset in batches (logs larger than "
                 "memory; split by a hash of the request id) | spark: the same passes on Apache Spark "
                 "(the [spark] extra).")] = "memory",
        where: Annotated[str | None, typer.Option(
            help="--engine stream|spark: keep the partitions that match, e.g. \"date >= '2026-11-01' and "
                 "model = 'a'\".")] = None,
        sample_rows: Annotated[int, typer.Option(
            help="--engine stream|spark: choose rows the path is chosen on (a stratified sample by hash).")]
        = 100_000,
        batch_rows: Annotated[int | None, typer.Option(
            help="--engine stream|spark: rows per batch (bounds memory; default 65,536).", show_default=False)]
        = None,
        master: Annotated[str | None, typer.Option(
            help="--engine spark: the Spark master URL (default: local[2], or what spark-submit set).",
            show_default=False)] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (nothing else on stdout).")]
        = False,
    ) -> None:
        """Solve least-compute thresholds under a certified risk budget and write the policy document."""
        t0 = time.perf_counter()
        check_engine_options(engine, where=where, test=test, spark_only=master is not None)
        check_budget(eps, "--eps")
        check_budget(delta, "--delta")
        if not 0.0 <= shadow_rate <= 1.0:
            raise InputError(f"--shadow-rate must be in [0, 1], got {shadow_rate}")
        spec = SolveSpec(
            risk=risk, eps=eps, delta=delta, score=score, calibrator=calibrator,
            segment_keys=tuple(segment_key or ()), segment_budgets=parse_budgets(segment_budget or ()),
            forbid_classes=tuple(forbid_class or ()), forbid_segments=tuple(forbid_segment or ()),
            max_exit=max_exit, seed=seed, split=SplitSpec(choose=choose_fraction), families=tuple(family or ()),
            group_column=group_column, bucket_mapping=_bucket_map(bucket_map),
            **({"bucket_shares": tuple(bucket_share)} if bucket_share else {}),
        )
        if engine != "memory":
            with _progress(not as_json) as update:
                scaled = solve_scale(logs, load_card(card), card, spec, engine=engine, where=where,
                                     sample_rows=sample_rows, batch_rows=batch_rows, master=master,
                                     shadow_rate=shadow_rate, progress=update)
                path = write_document(scaled.document, out)
            _report_scale(scaled, path, spec, time.perf_counter() - t0, as_json)
            return
        if logs.is_dir():
            raise InputError(f"{logs}: is a directory; a dataset of Parquet files is read with --engine stream")
        with _progress(not as_json) as update:
            update("loading logs", 0.0)
            data = _load(logs, card)
            test_logs = _load(test, card) if test is not None else None
            outcome = solve_policy(data, spec, test_logs=test_logs, baselines=() if no_baselines else NAMES,
                                   shadow_rate=shadow_rate, progress=update,
                                   evidence={"logs": str(logs.resolve()), "card": str(card.resolve())})
            path = write_document(outcome.document, out)
        elapsed = time.perf_counter() - t0
        doc, held, seg_col = outcome.document, outcome.held_out, outcome.segment_column
        g = doc["guarantee"]
        overall = (g["segments"].get("__all__") or {}).get("upper_bound")
        summary = {
            "out": str(path), "content_hash": doc["content_hash"], "certified": g["certified"],
            "risk_type": spec.risk, "eps": spec.eps, "delta": spec.delta, "upper_bound": overall,
            "uncertified_segments": g["uncertified_segments"], "evaluated_on": held.evaluated_on,
            "figures_from": _source(test_logs, outcome.certify.solver.n),
            "certify_split": {"rows": outcome.certify.solver.n,
                              **_row_json(outcome.certify.solver, seg_col, g["certified"])},
            "solution": _row_json(held.solver, seg_col, g["certified"]),
            "baselines": baselines_json(held.baselines, seg_col),
            "split": g["split"], "family": doc["solver"]["family"], "selection": doc["solver"]["selection"],
            "seconds": round(elapsed, 3),
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
        delta: Annotated[float | None, typer.Option(
            help="The risk intervals are at confidence 1 - DELTA, in (0, 1) (default: the policy's guarantee.delta).",
            show_default=False)] = None,
        fail_over_budget: Annotated[bool, typer.Option(
            "--fail-over-budget", help=f"Exit with code {OVER_BUDGET_EXIT} when a constrained segment's realised risk "
                                       "is over its budget (one line per such segment on stderr).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (nothing else on stdout).")]
        = False,
    ) -> None:
        """Apply a saved policy to other logs: realised risk and compute, per segment and batch size.

        Every realised risk comes with its exact (Clopper-Pearson) interval, and every constrained
        segment of the policy (guarantee.segments; __all__ is all traffic) with its budget and
        whether the realised risk is over it. Exit codes: 0, or 3 with --fail-over-budget when a
        segment is over its budget; 2 bad input; 1 other failures.
        """
        if delta is not None:
            check_budget(delta, "--delta")
        doc = read_document(policy)
        ev = evaluate_policy(doc, _load(logs, card), risk=risk)
        if delta is not None:
            ev = ev.with_delta(delta)
        checks = check_budgets(ev, doc)
        if fail_over_budget and any(c.status == "unmeasured" for c in checks):
            raise InputError(f"{logs}: --fail-over-budget checks the policy's {checks[0].risk_type} budgets, which "
                             f"need labels; the logs have none")
        over = [c for c in checks if c.over]
        out = {"policy": str(policy), "content_hash": doc["content_hash"], "logs": str(logs), **ev.to_json(),
               "budget_risk": checks[0].risk_type, "budgets": {c.segment: c.to_json() for c in checks},
               "over_budget": [c.segment for c in over]}
        if as_json:
            typer.echo(json.dumps(out, sort_keys=True, allow_nan=False, default=_json_default))
        else:
            _print_evaluation(ev, checks, policy, logs)
        if fail_over_budget and over:
            for c in over:
                typer.echo(_over_line(c), err=True)
            raise typer.Exit(OVER_BUDGET_EXIT)


def _report_scale(scaled: Any, path: Path, spec: SolveSpec, elapsed: float, as_json: bool) -> None:
    """The summary of a solve at scale: the one of ``solve``, with the passes and no baselines."""
    doc = scaled.document
    g = doc["guarantee"]
    seg_col = "|".join(spec.segment_keys) or None
    ev = scaled.result.expected
    summary = {
        "out": str(path), "content_hash": doc["content_hash"], "certified": g["certified"],
        "risk_type": spec.risk, "eps": spec.eps, "delta": spec.delta,
        "upper_bound": (g["segments"].get("__all__") or {}).get("upper_bound"),
        "uncertified_segments": g["uncertified_segments"], "evaluated_on": f"certify split ({ev.n} rows)",
        "figures_from": _source(None, ev.n),
        "certify_split": {"rows": ev.n, **_row_json(ev, seg_col, g["certified"])},
        "solution": _row_json(ev, seg_col, g["certified"]), "baselines": {},
        "split": g["split"], "family": doc["solver"]["family"], "selection": doc["solver"]["selection"],
        "passes": scale_summary(scaled), "seconds": round(elapsed, 3),
    }
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True, allow_nan=False, default=_json_default))
        return
    _print_summary(summary, doc, seg_col)
    console = stdout_console()
    for name, p in summary["passes"].items():
        rate = p["rows"] / p["seconds"] if p["seconds"] > 0 else 0.0
        console.print(f"pass {name}: {p['rows']:,} rows in {p['seconds']:.1f} s ({rate:,.0f} rows/s)")


def _confidence(delta: float) -> str:
    """``0.05`` -> ``95%``; ``0.001`` -> ``99.9%``."""
    return f"{100 * (1 - delta):.10g}%"


def _interval(ci: tuple[float, float] | None) -> str:
    return "—" if ci is None else f"{_risk(ci[0])} – {_risk(ci[1])}"


def _segment_name(name: str) -> str:
    return f"{ALL} (all traffic)" if name == ALL else name


def _over_line(c: BudgetCheck) -> str:
    """The stderr line of a segment over its budget (``--fail-over-budget``)."""
    ci = c.interval
    sig = "; the whole interval is above the budget" if c.significantly_over else ""
    return (f"over budget: {_segment_name(c.segment)}: realised {c.risk_type} {_risk(c.risk)} on {c.n:,} rows "
            f"({_confidence(c.delta)} interval {_interval(ci)}) > budget {_risk(c.eps)}{sig}")


_STATUS = {"under": "[green]under[/]", "no rows": "[dim]no rows[/]", "unmeasured": "[yellow]unmeasured (no labels)[/]"}


def _print_evaluation(ev: Evaluation, checks: tuple[BudgetCheck, ...], policy: Path, logs: Path) -> None:
    """The human output of ``evaluate``: summary, segment tables with intervals, then the budgets."""
    console = stdout_console()
    delta = checks[0].delta
    conf = _confidence(delta)
    table = Table(title=f"{policy.name} on {logs.name} ({ev.n:,} rows)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("compute fraction", _pct(ev.compute_fraction))
    table.add_row(f"risk ({ev.risk_type})", _risk(ev.risk))
    table.add_row(f"risk, {conf} interval", _interval(ev.overall.interval(delta)))
    table.add_row("disagreement", _risk(ev.disagreement))
    table.add_row("induced error", _risk(ev.induced_error))
    for b, v in ev.batch_compute_fraction.items():
        table.add_row(f"compute fraction, batch {b}", _pct(v))
    table.add_row("exit rate", " / ".join(_pct(r, 0) for r in ev.exit_rate))
    console.print(table)
    if ev.groups is not None:
        g = ev.groups
        gt = Table(title=f"per group ({g['n']:,} groups: sequences)")
        gt.add_column("")
        gt.add_column("value", justify="right")
        gt.add_row("mean per-group disagreement", _risk(g["mean_disagreement"]))
        gt.add_row("sequence disagreement (any token)", _risk(g["sequence_disagreement"]))
        ci = g.get("sequence_disagreement_interval")
        gt.add_row(f"sequence disagreement, {conf} interval", _interval(tuple(ci) if ci else None))
        gt.add_row("identical to full depth", _pct(1.0 - g["sequence_disagreement"]))
        gt.add_row("mean per-group compute fraction", _pct(g["compute_fraction"]))
        console.print(gt)
    for col, vals in ev.segments.items():
        st = Table(title=f"segment column {col}")
        for h in ("value", "rows", "compute", "risk", f"{conf} interval"):
            st.add_column(h, justify="right" if h != "value" else "left")
        for v, s in vals.items():
            st.add_row(escape(v), f"{s.n:,}", _pct(s.compute_fraction), _risk(s.risk), _interval(s.interval(delta)))
        console.print(st)
    bt = Table(title=f"risk budgets of the policy ({checks[0].risk_type}; exact {conf} intervals)")
    for h in ("constrained segment", "rows", "budget", "realised", f"{conf} interval", "status"):
        bt.add_column(h, justify="left" if h in ("constrained segment", "status") else "right")
    for c in checks:
        if c.significantly_over:
            status = "[bold red]▲ OVER (whole interval above budget)[/]"
        elif c.over:
            status = "[red]▲ OVER[/]"
        else:
            status = _STATUS[c.status]
        bt.add_row(escape(_segment_name(c.segment)), f"{c.n:,}", _risk(c.eps), _risk(c.risk), _interval(c.interval),
                   status)
    console.print(bt)
    over = [c.segment for c in checks if c.over]
    if over:
        console.print(f"[red]over budget: {escape(', '.join(_segment_name(o) for o in over))}[/] "
                      f"(--fail-over-budget exits with code {OVER_BUDGET_EXIT})")
    else:
        console.print("every constrained segment is within its budget")


def _source(test_logs: Any, certify_rows: int) -> dict[str, Any]:
    """Where the summary's ``solution`` and ``baselines`` figures were measured: a file, or the certify split."""
    if test_logs is None:
        return {"split": "certify", "source": None, "rows": certify_rows}
    return {"split": "test", "source": Path(str(test_logs.source)).name, "rows": int(test_logs.n)}


def _where(source: dict[str, Any]) -> str:
    """The human label of :func:`_source`: ``test file test.parquet (3,000 rows)`` or ``certify split (…)``."""
    if source["split"] == "certify":
        return f"certify split ({source['rows']:,} rows)"
    return f"test file {source['source']} ({source['rows']:,} rows)"


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


def _print_selection(console: Any, solver: dict[str, Any]) -> None:
    """The family choice: which family, and the cross-validation table behind it."""
    sel = solver.get("selection")
    if sel is None:
        console.print(f"policy family: [bold]{solver['family']}[/] (no choice made from data)")
        return
    table = Table(title=f"policy family: {sel['chosen']} ({sel['folds']}-fold cross-validation on {sel['rows']:,} "
                        f"choose rows; target risk {_risk(sel['targets'].get('__all__'))})")
    for h in ("family", "out-of-fold compute", "out-of-fold risk", "path points"):
        table.add_column(h, justify="left" if h == "family" else "right")
    for c in sel["candidates"]:
        name = f"[bold]{c['family']}[/]" if c["family"] == sel["chosen"] else c["family"]
        table.add_row(name, _pct(c["oof_compute_fraction"]), _risk(c["oof_risk"]), f"{c['mean_path_points']:g}")
    console.print(table)


def _print_summary(summary: dict[str, Any], doc: dict[str, Any], seg_col: str | None) -> None:
    console = stdout_console()
    g = doc["guarantee"]
    status = "[green]certified[/]" if g["certified"] else "[red]NOT certified: runs at full depth[/]"
    console.print(f"wrote [bold]{summary['out']}[/] ({status}; content hash {summary['content_hash'][:12]})")
    console.print(f"{g['risk']} <= {g['eps']} with confidence {1 - g['delta']:.0%}; "
                  f"certified upper bound {_risk(summary['upper_bound'])} on {g['n']:,} certify rows; "
                  f"split choose/certify = {g['split']['choose']:,}/{g['split']['certify']:,} "
                  f"(seed {g['split']['seed']})")
    _print_selection(console, doc["solver"])
    if g["uncertified_segments"]:
        console.print(f"[yellow]segments too small to certify (run at full depth): "
                      f"{', '.join(g['uncertified_segments'])}[/]")
    where = _where(summary["figures_from"])
    if summary["figures_from"]["split"] != "certify":  # the document's expected section holds both
        c = summary["certify_split"]
        console.print(f"on the certify split ({c['rows']:,} rows): compute {_pct(c['compute_fraction'])}, "
                      f"{g['risk']} {_risk(c['risk'])} (what 'policy list' shows under 'certify split')")
    table = Table(title=f"held out: {where}")
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
