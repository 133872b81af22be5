"""The console script's after-commit hooks: the MLflow mirror and approval reports.

:func:`want` is called by the console script (``exitwise.api.cli.main``); :func:`install` by
the write commands, so reads and ``calibrate`` never import MLflow, and in-process test runners
that call a command's function directly stay hook-free.
"""

from __future__ import annotations

_state = {"wanted": False, "installed": False}


def want() -> None:
    """Write commands of this process run the store's after-commit mirrors."""
    _state["wanted"] = True


def install() -> None:
    """Install the hooks once, if :func:`want` was called (``EXITWISE_MLFLOW_SYNC=off`` turns the mirror off)."""
    if not _state["wanted"] or _state["installed"]:
        return
    # lazy: mlflow and the report renderer are only needed by write commands
    from exitwise.policies.mlflow.worker import install_hook
    from exitwise.policies.report import install_approval_hook

    install_hook()
    install_approval_hook()
    _state["installed"] = True
