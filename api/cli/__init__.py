"""The ``exitwise`` command line (typer + rich).

Each command group lives in its own module with a ``register(app)`` function. Errors
derived from :class:`~calibration.exceptions.ExitwiseError` print one line on stderr and
exit with the error's ``exit_code``; nothing prints a traceback unless ``EXITWISE_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import typer
from rich.console import Console
from rich.text import Text

from exitwise.calibration.exceptions import ExitwiseError

COMMAND_MODULES = (
    "calibrate", "solve", "db", "principal", "policy", "audit", "serve", "mlflow_cmd", "report",
)

err_console = Console(stderr=True)


def stdout_console(**kwargs: object) -> Console:
    """A console for tables on stdout: the terminal's width, or 160 columns when piped or
    captured (rich would otherwise wrap every table at 80 and truncate its cells)."""
    console = Console(**kwargs)  # type: ignore[arg-type]
    if not console.is_terminal:
        console.width = 160
    return console


def build_app() -> typer.Typer:
    """The root typer app with every command group registered."""
    app = typer.Typer(
        name="exitwise",
        help="Calibrate, certify, govern and serve early-exit thresholds.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"exitwise.api.cli.{name}") is not None:
            importlib.import_module(f"exitwise.api.cli.{name}").register(app)
    return app


_hooks = {"wanted": False, "installed": False}


def install_store_hooks() -> None:
    """Install the console script's after-commit hooks: MLflow mirror and approval reports.

    Called by write commands only (so reads and ``calibrate`` don't pay for importing
    mlflow), and only under :func:`main` — in-process test runners stay hook-free.
    ``EXITWISE_MLFLOW_SYNC=off`` turns the MLflow mirror off.
    """
    if not _hooks["wanted"] or _hooks["installed"]:
        return
    from exitwise.policies.mlflow.worker import install_hook
    from exitwise.policies.report import install_approval_hook

    install_hook()
    install_approval_hook()
    _hooks["installed"] = True


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map errors to one line and an exit code."""
    app = build_app()
    _hooks["wanted"] = True
    try:
        app(args=argv, prog_name="exitwise")
    except ExitwiseError as exc:
        if os.environ.get("EXITWISE_DEBUG") == "1":
            raise
        err_console.print(Text("error: ", style="bold red") + Text(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # the last line of defence: never a traceback for users
        if os.environ.get("EXITWISE_DEBUG") == "1":
            raise
        if isinstance(exc, OSError) and exc.filename is not None:  # a path the user named: read or write failed
            message = Text("error: ", style="bold red") + Text(f"cannot use {exc.filename}: {exc.strerror or exc}")
        else:
            message = (Text("internal error: ", style="bold red")
                       + Text(f"{type(exc).__name__}: {exc} (set EXITWISE_DEBUG=1 for a traceback)"))
        err_console.print(message, highlight=False, soft_wrap=True)
        sys.exit(1)
