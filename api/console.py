"""The ``exitwise`` console script: runs the command line, or says which extra to install.

Standard library only at import: with the base install (the runtime client alone: numpy and
httpx) the command line's own dependencies are absent, and ``exitwise`` must say so in one
line instead of a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``exitwise`` console script."""
    try:
        # lazy: the import itself is what may fail without the [server] extra
        from exitwise.api.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "exitwise":
            raise
        sys.stderr.write(
            f"error: the exitwise command line needs the service's dependencies (missing {exc.name!r}): "
            "pip install 'exitwise[server]'\n")
        raise SystemExit(1) from None
    cli_main()
