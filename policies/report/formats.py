"""The report's output formats: HTML (self-contained) and PDF, and their media types."""

from __future__ import annotations

from collections.abc import Mapping

from exitwise.calibration.exceptions import InputError

FORMATS: tuple[str, ...] = ("html", "pdf")
MEDIA_TYPES: Mapping[str, str] = {"html": "text/html; charset=utf-8", "pdf": "application/pdf"}


def check_format(format: str) -> str:
    """``format`` in lower case; InputError naming the formats when it is not one of them."""
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise InputError(f"report format must be one of {', '.join(FORMATS)}, got {format!r}")
    return fmt
