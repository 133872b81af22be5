"""Policy document files: write one atomically, read one back with errors that name the file.

Kept apart from :mod:`exitwise.policies.document` (which builds documents from a solution and
needs the numerical core): reading and writing need the standard library and the schema only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exitwise.calibration.atomic import atomic_write_text
from exitwise.calibration.exceptions import InputError
from exitwise.policies.schema import validate_document

__all__ = ["read_document", "read_json_object", "write_document"]


def write_document(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``doc`` as indented JSON atomically (temp file in the same folder, then replace)."""
    text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_json_object(path: str | os.PathLike[str], what: str = "policy document") -> dict[str, Any]:
    """Parse a JSON file that must hold one object; InputError naming ``what``, the file and the cause."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {p}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {p}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {p}: a policy document is a JSON object")
    return data


def read_document(path: str | os.PathLike[str], *, check_hash: bool = True) -> dict[str, Any]:
    """Load and validate a policy document file; InputError naming the file if it is not one."""
    doc = read_json_object(path, "policy")
    try:
        validate_document(doc, check_hash=check_hash)
    except InputError as exc:
        raise InputError(f"policy {Path(path)}: {exc}") from None
    return doc
