"""exitwise numerical core: exit logs, calibrators, metrics, the decision rule, the solver.

Submodules are imported lazily so that ``exitwise.calibration.rule`` (used by the runtime client)
pulls in numpy only.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExitLogs": "exitwise.calibration.logs",
    "ModelCard": "exitwise.calibration.logs",
    "ExitSpec": "exitwise.calibration.logs",
    "SegmentColumn": "exitwise.calibration.logs",
    "CompiledPolicy": "exitwise.calibration.rule",
    "decide": "exitwise.calibration.rule",
    "route": "exitwise.calibration.rule",
    "load_card": "exitwise.calibration.logfiles.cards",
    "load_logs": "exitwise.calibration.logfiles.readers",
    "write_logs": "exitwise.calibration.logfiles.writers",
    "fingerprint": "exitwise.calibration.summaries",
    "synthetic_logs": "exitwise.calibration.synthetic",
    "ExitwiseError": "exitwise.calibration.exceptions",
    "InputError": "exitwise.calibration.exceptions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exitwise.calibration' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
