"""Whether this process's write commands run the store's after-commit mirrors.

The console script (``exitwise.api.cli.main``) asks for them with :func:`want`; in-process
runners that call a command without it stay hook-free. The mirrors themselves (MLflow sync,
approval reports) are installed by :func:`exitwise.api.cli.session.acting_principal`, the one
place write commands pass through, so reads and ``calibrate`` never load them. Standard
library only: the root command imports this module on every start.
"""

from __future__ import annotations

from collections.abc import Callable

_state: dict[str, bool] = {"wanted": False}
_removers: list[Callable[[], None]] = []


def want() -> None:
    """Write commands of this process run the store's after-commit mirrors."""
    _state["wanted"] = True


def wanted() -> bool:
    """True when the mirrors are wanted and not installed yet."""
    return _state["wanted"] and not _removers


def installed(remove: Callable[[], None]) -> None:
    """Record how to remove one installed mirror (for :func:`uninstall`)."""
    _removers.append(remove)


def uninstall() -> None:
    """Remove every installed mirror and forget :func:`want` (a long-lived process or a test)."""
    while _removers:
        _removers.pop()()
    _state["wanted"] = False
