"""The ``exitwise`` command line (typer + rich).

Each command group lives in its own module with a ``register(app)`` function and imports
what it needs at its top. The root group loads a command's module only when that command
runs (or its own ``--help`` is asked for): ``exitwise --help`` lists every command from
:data:`COMMANDS` without importing the store, scipy or MLflow: 0.13 s, where importing every
command module takes 1.6 s (2-core development machine, best of 5).

Errors derived from :class:`~exitwise.calibration.exceptions.ExitwiseError` print one line on
stderr and exit with the error's ``exit_code``; usage errors (an unknown command, a bad option
value) print one line too and exit 2. Under ``--json`` the same errors are one JSON object on
stdout, ``{"error": {"type", "message", "exit_code"}}``, with the same exit codes. Nothing prints a
traceback unless ``EXITWISE_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from exitwise.api.cli import hooks
from exitwise.api.cli.output import print_error, stdout_console, wants_json
from exitwise.calibration.exceptions import ExitwiseError

__all__ = ["COMMANDS", "build_app", "load_command", "main", "stdout_console"]

HELP = "Calibrate, certify, govern and serve early-exit thresholds."

# command name -> (module under exitwise.api.cli, the one-line help shown by ``exitwise --help``);
# tests check each line against the loaded command's own help
COMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("calibrate", "Fit one calibrator per exit on a split of LOGS; report metrics before/after on the "
                               "other rows."),
    "solve": ("solve", "Solve least-compute thresholds under a certified risk budget and write the policy document."),
    "evaluate": ("solve", "Apply a saved policy to other logs: realised risk and compute, per segment and batch "
                          "size."),
    "serve": ("serve", "Serve the policy API (runtime read path, management, audit) with uvicorn."),
    "report": ("report", "Write the audit report of MODEL VERSION (from the policy store) to --out."),
    "db": ("db", "Create and migrate the policy database."),
    "principal": ("principal", "Manage principals (bearer tokens and roles)."),
    "policy": ("policy", "Policy versions and their lifecycle."),
    "audit": ("audit", "The tamper-evident audit trail."),
    "monitor": ("monitor", "Monitor the active policy from shadow traffic."),
    "mlflow": ("mlflow_cmd", "Mirror policies into MLflow (runs, registered versions, aliases per environment)."),
}


def load_command(name: str) -> TyperCommand | TyperGroup:
    """Import the module of command ``name`` and return its click command."""
    module, _ = COMMANDS[name]
    app = typer.Typer()
    importlib.import_module(f"exitwise.api.cli.{module}").register(app)
    built = typer.main.get_command(app)
    if isinstance(built, TyperGroup):
        command = built.get_command(typer.Context(built), name)
        if command is None:
            raise LookupError(f"exitwise.api.cli.{module} registers no command {name!r}")
        return command
    built.name = name
    return built


class LazyGroup(TyperGroup):
    """The root group: commands are listed from :data:`COMMANDS` and imported when used."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:  # the root help page needs names and one-line helps only
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])
        if cmd_name not in self.commands:
            self.commands[cmd_name] = load_command(cmd_name)
        return self.commands[cmd_name]

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def build_app() -> LazyGroup:
    """The root command group."""
    return LazyGroup(name="exitwise", help=HELP, no_args_is_help=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map errors to one line (JSON under --json) and an exit code."""
    app = build_app()
    hooks.want()
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(args)
    debug = os.environ.get("EXITWISE_DEBUG") == "1"
    try:
        code = app.main(args=args, prog_name="exitwise", standalone_mode=False)
    except typer.TyperException as exc:  # typer's click errors: bad option values, unknown commands
        if type(exc).__name__ != "NoArgsIsHelpError":  # (that one's help page is already printed)
            print_error(_usage_message(exc), kind=type(exc).__name__, exit_code=exc.exit_code, as_json=as_json)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print_error("aborted", kind="Abort", exit_code=1, as_json=as_json)
        sys.exit(1)
    except ExitwiseError as exc:
        if debug:
            raise
        print_error(str(exc), kind=type(exc).__name__, exit_code=exc.exit_code, as_json=as_json)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted", kind="KeyboardInterrupt", exit_code=130, as_json=as_json)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: never a traceback for users
        if debug:
            raise
        if isinstance(exc, OSError) and exc.filename is not None:  # a path the user named: read or write failed
            print_error(f"cannot use {exc.filename}: {exc.strerror or exc}", kind=type(exc).__name__,
                        exit_code=1, as_json=as_json)
        else:
            print_error(f"{type(exc).__name__}: {exc} (set EXITWISE_DEBUG=1 for a traceback)", kind="InternalError",
                        exit_code=1, as_json=as_json, label="internal error")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: typer.TyperException) -> str:
    """One line for a click error: the command, click's message, and where the options are explained."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see '{ctx.command_path} --help')"
