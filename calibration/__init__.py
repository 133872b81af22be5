"""exitwise numerical core: exit logs, calibrators, metrics, the decision rule, the solver.

Submodules are imported lazily so that ``calibration.rule`` (used by the runtime client)
pulls in numpy only.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExitLogs": "calibration.logs",
    "ModelCard": "calibration.logs",
    "ExitSpec": "calibration.logs",
    "SegmentColumn": "calibration.logs",
    "CompiledPolicy": "calibration.rule",
    "decide": "calibration.rule",
    "route": "calibration.rule",
    "load_card": "calibration.io",
    "load_logs": "calibration.io",
    "write_logs": "calibration.io",
    "fingerprint": "calibration.io",
    "synthetic_logs": "calibration.synthetic",
    "ExitwiseError": "calibration.exceptions",
    "InputError": "calibration.exceptions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'calibration' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
