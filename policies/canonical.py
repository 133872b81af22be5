"""Canonical JSON and the content hash of a policy document (standard library only).

Canonical form (design contract): UTF-8, sorted keys, no insignificant whitespace. The content
hash is the sha256 of the canonical form of the document without its governance fields,
so approving, activating or numbering a policy never changes its hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

SCHEMA = "exitwise.policy/v1"
GOVERNANCE_FIELDS = frozenset(
    {"content_hash", "version", "state", "approvals", "created_at", "updated_at", "activated_at",
     "killed", "environment", "environments"}
)


def _check_finite(value: Any, path: str = "$") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"policy document: non-finite number at {path}; use null for 'never exit'")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_finite(v, f"{path}[{i}]")


def canonical_json(doc: Any) -> bytes:
    """UTF-8 bytes of ``doc`` with sorted keys and no insignificant whitespace."""
    _check_finite(doc)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def content_hash(doc: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical form of ``doc`` minus its governance fields."""
    body = {k: v for k, v in doc.items() if k not in GOVERNANCE_FIELDS}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def with_content_hash(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with its ``content_hash`` field set."""
    out = dict(doc)
    out["content_hash"] = content_hash(out)
    return out


def verify_content_hash(doc: Mapping[str, Any]) -> bool:
    """True when ``doc['content_hash']`` matches its content."""
    return doc.get("content_hash") == content_hash(doc)
