"""``exitwise report``: the audit report of a policy version as HTML or PDF (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from exitwise.calibration.exceptions import InputError


def _load_json(path: Path, what: str) -> dict[str, Any]:
    from exitwise.policies.document import read_json_object

    return read_json_object(path, what)


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
        from exitwise.policies import report as rp

        fmt = str(format).lower()
        if fmt not in rp.FORMATS:
            raise InputError(f"--format must be one of {', '.join(rp.FORMATS)}, got {format!r}")
        if document is not None:
            if model is not None or version is not None:
                raise InputError("give either MODEL VERSION or --document, not both")
            doc = _load_json(document, "policy document")
            parent_doc = _load_json(parent, "parent policy document") if parent is not None else None
            ctx = rp.context_from_document(doc, parent_document=parent_doc)
            name = str(doc.get("model", {}).get("name", document.stem))
            target = out or Path(f"{name}-report.{fmt}")
            data = rp.render(ctx, fmt)
            path = rp.atomic_write(target, data)
            info = {"model": name, "version": None, "content_hash": doc.get("content_hash")}
        else:
            if model is None or version is None:
                raise InputError("give MODEL and VERSION (or --document FILE)")
            if parent is not None:
                raise InputError("--parent only applies with --document (a stored version knows its parent)")
            target = out or Path(f"{model}-v{version}.{fmt}")
            path, info = _from_store(model, version, fmt, target)
        size = path.stat().st_size
        if as_json:
            typer.echo(json.dumps({**info, "format": fmt, "path": str(path), "bytes": size}, sort_keys=True))
        else:
            typer.echo(f"wrote {path} ({size:,} bytes, {fmt})")


def _from_store(model: str, version: int, fmt: str, target: Path) -> tuple[Path, dict[str, Any]]:
    """Render a stored version inside one read-only unit of work and write it atomically."""
    from exitwise.api.cli.db import store_engine
    from exitwise.policies import report as rp
    from exitwise.policies.db import unit_of_work

    with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
        ctx = rp.build_context(session, model, version)
    data = rp.render(ctx, fmt)
    path = rp.atomic_write(target, data)
    return path, {"model": model, "version": version, "content_hash": ctx.document.get("content_hash")}
