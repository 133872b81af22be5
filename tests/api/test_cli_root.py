"""The root command: lists every command without importing them, and loads each on use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from exitwise.api import cli


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_listed_help_is_the_commands_own(name: str) -> None:
    """The one-line help ``exitwise --help`` shows (without importing) is the command's own."""
    command = cli.load_command(name)
    assert command.name == name
    assert _first_paragraph(command.help or "") == cli.COMMANDS[name][1]


def test_root_help_imports_no_command_module() -> None:
    probe = textwrap.dedent("""
        import sys
        from exitwise.api.cli import main
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = sorted(m for m in ("sqlalchemy", "scipy", "pandas", "pyarrow", "mlflow", "fastapi", "uvicorn",
                                   "matplotlib", "weasyprint") if m in sys.modules)
        loaded = sorted(m for m in sys.modules if m.startswith("exitwise.api.cli.") and
                        m not in ("exitwise.api.cli.output", "exitwise.api.cli.hooks"))
        print(heavy, loaded)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().endswith("[] []"), out.stdout + out.stderr
    assert "policy" in out.stdout and "mlflow" in out.stdout  # every command is listed


def test_unknown_command_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-c", "from exitwise.api.cli import main; main(['no-such-command'])"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "No such command" in proc.stderr and "Traceback" not in proc.stderr
