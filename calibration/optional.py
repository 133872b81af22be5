"""Optional extras: import a module of an extra, or say which extra to install.

The base install is the runtime client (numpy and httpx). The service, MLflow and reports are
extras (``exitwise[server]``, ``exitwise[mlflow]``, ``exitwise[reports]``); a feature that
needs one imports it through :func:`require`, so a missing extra is one clear line, never a
traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from exitwise.calibration.exceptions import MissingDependency


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (part of the extra ``extra``) for ``feature``, or raise :class:`MissingDependency`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise MissingDependency(
            f"{feature} needs {missing!r}, part of the optional extra {extra!r}: "
            f"pip install 'exitwise[{extra}]'") from exc
