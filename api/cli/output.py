"""Command output: consoles, ``--json`` (exactly one JSON object on stdout), errors and shared options.

Light on purpose (typer and rich only): the root command imports it for every invocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="EXITWISE_TOKEN", show_envvar=True, show_default=False,
    help="Bearer token of the acting principal (or set EXITWISE_TOKEN).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]

err_console = Console(stderr=True)


def stdout_console(**kwargs: Any) -> Console:
    """A console for tables on stdout: the terminal's width, or 160 columns when piped or
    captured (rich would otherwise wrap every table at 80 and truncate its cells)."""
    console = Console(**kwargs)
    if not console.is_terminal:
        console.width = 160
    return console


console = stdout_console(highlight=False)


def jsonable(obj: Any) -> Any:
    """Domain objects (frozen dataclasses) as plain JSON values; datetimes in ISO 8601."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "content"}
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one line of JSON (keys sorted) on stdout."""
    typer.echo(json.dumps(jsonable(obj), sort_keys=True, ensure_ascii=False))


def percent(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage with its sign (``0.4123`` -> ``41.2%``), ``—`` when missing.

    Human output shows every compute and risk figure this way; ``--json`` keeps fractions.
    """
    if value is None or isinstance(value, bool):
        return "—"
    x = float(value)
    return "—" if not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def wants_json(args: list[str]) -> bool:
    """True when the command line asks for ``--json`` (before any ``--``): its errors are JSON too."""
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def print_error(message: str, *, kind: str, exit_code: int, as_json: bool, label: str = "error") -> None:
    """Report a failed command: one line on stderr, or under ``--json`` one JSON object on stdout.

    ``{"error": {"type": kind, "message": message, "exit_code": exit_code}}`` — the exit code is the
    same either way, so scripts can rely on it and read the message from the object.
    """
    if as_json:
        typer.echo(json.dumps({"error": {"type": kind, "message": message, "exit_code": exit_code}},
                              sort_keys=True, ensure_ascii=False))
        return
    err_console.print(Text(f"{label}: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
