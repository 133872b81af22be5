"""``exitwise audit``: read, verify and export the hash-chained audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from exitwise.api.cli.output import JsonOption, console, emit_json
from exitwise.api.cli.session import reading
from exitwise.calibration.exceptions import InputError
from exitwise.policies.audit import export, log, verify, verify_export
from exitwise.policies.errors import AuditChainBroken


def register(app: typer.Typer) -> None:
    grp = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
    app.add_typer(grp, name="audit")

    @grp.command("log")
    def log_(
        model: Annotated[str | None, typer.Option("--model", "-m", help="Only events of this model.")] = None,
        limit: Annotated[int, typer.Option("--limit", "-n", help="Newest N events.", min=1)] = 50,
        as_json: JsonOption = False,
    ) -> None:
        """Show the newest audit events."""
        with reading() as session:
            events = log(session=session, model=model, limit=limit)
        if as_json:
            emit_json({"events": events})
            return
        table = Table("seq", "time (UTC)", "actor", "action", "target", "reason", "hash")
        for e in events:
            target = " ".join(x for x in (e.model, f"v{e.version}" if e.version else None, e.environment) if x)
            if e.action.startswith("principal."):
                target = str(e.details.get("principal", ""))
            table.add_row(str(e.seq), e.ts[:19].replace("T", " "), e.actor, e.action, target, e.reason or "",
                          e.hash[:12])
        console.print(table if events else "no audit events")

    @grp.command("verify")
    def verify_(
        file: Annotated[Path | None, typer.Option(
            "--file", help="Verify an exported trail (jsonl or csv) instead of the database.", dir_okay=False)] = None,
        head: Annotated[str | None, typer.Option(
            "--head", help="With --file: the head hash the store published (detects a cut-off tail).")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Walk the chain; exit 1 naming the first broken row."""
        if head is not None and file is None:
            raise InputError("--head only applies with --file")
        if file is not None:
            if not file.is_file():
                raise InputError(f"audit export {file}: no such file")
            report = verify_export(file, head_hash=head)
        else:
            with reading() as session:
                report = verify(session=session)
        if as_json:
            emit_json(report)
            if not report.ok:
                raise typer.Exit(AuditChainBroken.exit_code)
            return
        if not report.ok:
            raise AuditChainBroken(report.message)
        console.print(f"audit chain verifies: {report.events} events, head seq={report.head_seq} "
                      f"hash={report.head_hash}")

    @grp.command("export")
    def export_(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output file.", dir_okay=False)],
        fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl or csv.")] = "jsonl",
        as_json: JsonOption = False,
    ) -> None:
        """Export the whole chain (with hashes) for an external auditor; written atomically."""
        fmt = fmt.lower()
        if fmt not in ("jsonl", "csv"):
            raise InputError(f"--format must be jsonl or csv, got {fmt!r}")
        with reading() as session:
            result = export(out, fmt, session=session)  # type: ignore[arg-type]
        if as_json:
            emit_json(result)
        else:
            console.print(f"exported {result.events} events to {result.path} "
                          f"(head seq={result.head_seq} hash={result.head_hash})")
