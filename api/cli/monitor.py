"""``exitwise monitor``: shadow traffic in, the verdict of the active policy out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from exitwise.api.cli.output import JsonOption, TokenOption, console, emit_json, err_console, percent
from exitwise.api.cli.session import acting, acting_principal, reading, store_engine
from exitwise.calibration.exceptions import ExitwiseError, InputError
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.policies import monitoring
from exitwise.policies.db import unit_of_work
from exitwise.policies.settings import get_settings
from exitwise.policies.shadow_logs import encode_npz, media_type_of, read_shadow_logs

EnvOption = Annotated[str, typer.Option("--env", "-e", help="Environment the shadow requests were served in.")]
ModelArg = Annotated[str, typer.Argument(help="Model name.")]
VersionOption = Annotated[int | None, typer.Option(
    "--version", min=1, help="Version that served the requests (default: the active one).")]
FailOn = Annotated[str | None, typer.Option(
    "--fail-on", help="Exit with code 3 when the verdict is this bad or worse: watch or breach.")]

SEVERITY = {"unknown": 0, "ok": 0, "watch": 1, "breach": 2}


class VerdictFailure(ExitwiseError):
    """The verdict is as bad as ``--fail-on`` asked to fail on (exit code 3)."""

    exit_code = 3


def _check_fail_on(fail_on: str | None) -> None:
    if fail_on is not None and fail_on not in ("watch", "breach"):
        raise InputError(f"--fail-on must be 'watch' or 'breach', got {fail_on!r}")


def _maybe_fail(verdict: str, fail_on: str | None, what: str) -> None:
    if fail_on is not None and SEVERITY[verdict] >= SEVERITY[fail_on]:
        raise VerdictFailure(f"{what}: verdict {verdict} (--fail-on {fail_on})")


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return path.read_bytes()


def _batches(path: Path, model: str, env: str, version: int | None, batch_rows: int | None
             ) -> list[tuple[bytes, str]]:
    """The upload bodies: the file as it is, or re-encoded in batches of ``batch_rows`` rows (NPZ)."""
    body, media = _read(path), media_type_of(path)
    if batch_rows is None:
        return [(body, media)]
    with reading() as session:
        _number, document = monitoring.served_document(model, env, version, session=session)
    logs = read_shadow_logs(body, media, document, max_rows=10**9)  # a local file: split, not refused
    return [(encode_npz(logs.take(np.arange(i, min(i + batch_rows, logs.n)))), "application/x-npz")
            for i in range(0, logs.n, batch_rows)]


def _print_health(h: monitoring.Health) -> None:
    style = {"ok": "green", "watch": "yellow", "breach": "bold red"}.get(h.verdict, "")
    version = f"v{h.version}" if h.version is not None else "no active version"
    console.print(f"{h.model} in {h.environment} ({version}): [{style}]{h.verdict}[/]"
                  + (" — KILLED (serving full depth)" if h.killed else "")
                  + f" — {h.rows:,} shadow rows in {h.batches} batches; automatic kill switch "
                  + ("on" if h.auto_kill else "off"))
    a = h.assessment
    if not a:
        return
    for reason in a.get("reasons") or []:
        console.print(f"  • {reason}")
    if a.get("recommendation"):
        console.print(f"  recommendation: {a['recommendation']}")
    table = Table("segment", "rows", "risk", "bound (lower..upper)", "eps", "status", title="risk of the policy")
    for name, s in (a.get("segments") or {}).items():
        table.add_row(name, f"{s['n']:,}", percent(s.get("risk"), 2),
                      f"{percent(s['lower'], 2)}..{percent(s['upper'], 2)}", percent(s["eps"], 2), s["status"])
    console.print(table)
    drift = Table("exit", "exit rate", "expected", "PSI", "p-value", "ECE", "ECE certified", title="drift")
    for d in a.get("drift") or []:
        drift.add_row(d["exit"], percent(d.get("exit_rate")), percent(d.get("expected_exit_rate")),
                      _num(d.get("psi")), _num(d.get("p_value")), _num(d.get("ece")), _num(d.get("ece_certified")))
    console.print(drift)
    console.print(f"compute fraction {percent(a.get('compute_fraction'))} "
                  f"(expected {percent(a.get('expected_compute_fraction'))})")


def _num(x: Any) -> str:
    return "—" if x is None else f"{x:.3g}"


def register(app: typer.Typer) -> None:
    grp = typer.Typer(help="Monitor the active policy from shadow traffic.", no_args_is_help=True)
    app.add_typer(grp, name="monitor")

    @grp.command("ingest")
    def ingest(
        logs: Annotated[Path, typer.Argument(help="Full-depth exit logs of shadow requests (.parquet, .jsonl, "
                                                  ".json or .npz).", dir_okay=False)],
        model: Annotated[str, typer.Option("--model", "-m", help="Model name.")],
        env: EnvOption,
        version: VersionOption = None,
        batch_rows: Annotated[int | None, typer.Option(
            "--batch-rows", min=1, help="Upload in batches of this many rows (the verdict is updated after each), "
                                        "as a runtime would; default: the file is one batch.")] = None,
        fail_on: FailOn = None,
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Store shadow logs under the version that served them and update the verdict."""
        _check_fail_on(fail_on)
        settings = get_settings().monitor_settings()
        results = []
        for body, media in _batches(logs, model, env, version, batch_rows):
            with store_engine() as engine, unit_of_work(engine) as session:
                author = acting_principal(token, session=session, action="monitor ingest")
                results.append(monitoring.ingest(model, env, body, media, principal=author, session=session,
                                                 version=version, settings=settings))
        last = results[-1]
        if as_json:
            emit_json({"batches": [r.to_json() for r in results], "verdict": last.verdict})
        else:
            for r in results:
                note = " (duplicate: stored before)" if r.duplicate else ""
                kill = " — automatic kill switch TRIPPED" if r.auto_killed else ""
                console.print(f"batch {r.batch}: {r.rows:,} rows of v{r.version}{note} → {r.verdict}{kill}")
        _maybe_fail(last.verdict, fail_on, f"{model} in {env}")

    @grp.command("status")
    def status(model: ModelArg, env: EnvOption, fail_on: FailOn = None, as_json: JsonOption = False) -> None:
        """The verdict of the active policy in --env, with the numbers behind it."""
        _check_fail_on(fail_on)
        with reading() as session:
            h = monitoring.health(model, env, session=session)
        emit_json(h.to_json()) if as_json else _print_health(h)
        _maybe_fail(h.verdict, fail_on, f"{model} in {env}")

    @grp.command("configure")
    def configure(
        model: ModelArg, env: EnvOption,
        auto_kill: Annotated[bool, typer.Option("--auto-kill/--no-auto-kill",
                                                help="Trip the kill switch when the verdict becomes breach.")],
        reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit trail). Required.")] = "",
        token: TokenOption = None, as_json: JsonOption = False,
    ) -> None:
        """Turn the automatic kill switch on breach on or off (role approver; audited)."""
        with acting(token, "monitor configure") as (session, actor):
            h = monitoring.configure(model, env, auto_kill=auto_kill, actor=actor, reason=reason, session=session)
        emit_json(h.to_json()) if as_json else console.print(
            f"{model} in {env}: automatic kill switch on breach {'ON' if h.auto_kill else 'off'}")

    @grp.command("series")
    def series(model: ModelArg, env: EnvOption, version: VersionOption = None, as_json: JsonOption = False) -> None:
        """The risk bounds after every shadow batch, per constrained segment."""
        with reading() as session:
            points = monitoring.series(model, env, session=session, version=version)
        if as_json:
            emit_json({"points": [p.to_json() for p in points]})
            return
        table = Table("version", "segment", "batch", "time (UTC)", "rows", "risk", "lower", "upper", "eps")
        for p in points:
            d = p.to_json()
            table.add_row(f"v{p.version}", p.segment, str(p.batch), d["at"][:19].replace("T", " "), f"{p.n:,}",
                          percent(d["risk"], 2), percent(p.lower, 2), percent(p.upper, 2), percent(p.eps, 2))
        console.print(table if points else "no shadow batches yet")

    @grp.command("export")
    def export(
        model: ModelArg, env: EnvOption,
        out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the logs (.parquet, .jsonl or .npz).",
                                          dir_okay=False)],
        version: VersionOption = None, as_json: JsonOption = False,
    ) -> None:
        """Write the stored shadow logs of a version, to recalibrate on (exitwise solve OUT ...)."""
        with reading() as session:
            logs = monitoring.export(model, env, session=session, version=version)
        path = write_logs(logs, out)
        if as_json:
            emit_json({"out": str(path), "rows": logs.n})
        else:
            err_console.print(f"wrote {logs.n:,} shadow rows to {path}")
