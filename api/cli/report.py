"""``exitwise report``: the audit report of a policy version as HTML or PDF (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from exitwise.api.cli.session import store_engine
from exitwise.calibration.exceptions import InputError
from exitwise.policies import report as rp


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        model: Annotated[str | None, typer.Argument(help="Model name (as stored).", show_default=False)] = None,
        version: Annotated[int | None, typer.Argument(help="Version number.", show_default=False, min=1)] = None,
        format: Annotated[str, typer.Option("--format", "-f", help="html (self-contained) or pdf.")] = "html",
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="Output file (default: MODEL-vN.FORMAT in the current directory).",
            dir_okay=False)] = None,
        document: Annotated[Path | None, typer.Option(
            "--document", help="Render a policy JSON file instead of a stored version (no governance facts).",
            exists=False, dir_okay=False)] = None,
        parent: Annotated[Path | None, typer.Option(
            "--parent", help="With --document: the parent policy JSON to diff against.", dir_okay=False)] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object describing the file.")] = False,
    ) -> None:
        """Write the audit report of MODEL VERSION (from the policy store) to --out."""
        if document is not None:
            if model is not None or version is not None:
                raise InputError("give either MODEL VERSION or --document, not both")
            written = rp.write_document_report(document, parent=parent, format=format, out=out)
        else:
            if model is None or version is None:
                raise InputError("give MODEL and VERSION (or --document FILE)")
            if parent is not None:
                raise InputError("--parent only applies with --document (a stored version knows its parent)")
            with store_engine() as engine:
                written = rp.write_stored_report(engine, model, version, format, out)
        if as_json:
            typer.echo(json.dumps({"model": written.model, "version": written.version,
                                   "content_hash": written.content_hash, "format": written.format,
                                   "path": str(written.path), "bytes": written.size}, sort_keys=True))
        else:
            typer.echo(f"wrote {written.path} ({written.size:,} bytes, {written.format})")
