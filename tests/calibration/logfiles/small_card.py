"""The small model card the log-file tests build on (3 exits, 4 named classes, one segment column)."""

from __future__ import annotations

from typing import Any

from exitwise.calibration.logs import ExitSpec, ModelCard

K = 3
CLASSES = ["cat", "dog", "emu", "fox"]


def small_card(**overrides: Any) -> ModelCard:
    """The card, with any field replaced by ``overrides``."""
    fields: dict[str, Any] = {
        "model": "m",
        "exits": tuple(ExitSpec(f"e{k}", float(k + 1)) for k in range(K)),
        "classes": tuple(CLASSES),
        "segment_columns": ("region",),
    }
    fields.update(overrides)
    return ModelCard(**fields)
