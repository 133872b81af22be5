"""The four exit-log file forms: their names, the column layout they share, and telling a file's form."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from exitwise.calibration.exceptions import InputError, LogFormatError

__all__ = [
    "EXIT_COLUMN",
    "EXIT_RE",
    "FORMS",
    "JSONL_SUFFIXES",
    "LOGITS_COLUMN",
    "PARQUET_SUFFIXES",
    "SEGMENT_PREFIX",
    "TS_COLUMN",
    "detect_form",
    "form_from_suffix",
]

FORMS = ("wide", "long", "jsonl", "npz")
TS_COLUMN = "ts"  # the optional time column (every form)
EXIT_COLUMN = "exit"  # long form: the exit index of a row ...
LOGITS_COLUMN = "logits"  # ... and its C logits
SEGMENT_PREFIX = "seg_"  # NPZ: array seg_<name> holds segment column <name>
EXIT_RE = re.compile(r"exit_(\d+)")  # wide form and JSON Lines: exit_k holds exit k's C logits
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def detect_form(path: str | os.PathLike[str]) -> str:
    """The log form of ``path`` ("wide", "long", "jsonl" or "npz") from its extension or contents."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _parquet_form(p)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".npz":
        return "npz"
    try:
        with p.open("rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise LogFormatError(f"{p}: cannot read: {exc}") from exc
    if head.startswith(b"PAR1"):
        return _parquet_form(p)
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    raise LogFormatError(
        f"{p}: unknown log format (extension {suffix or 'none'!r}, contents not recognised); "
        "expected wide/long Parquet (.parquet), JSON Lines (.jsonl) or NPZ (.npz)"
    )


def _parquet_form(p: Path) -> str:
    try:
        names = pq.read_schema(p).names
    except (pa.ArrowException, OSError) as exc:
        raise LogFormatError(f"{p}: cannot read Parquet file (corrupt or not Parquet): {exc}") from None
    return "long" if EXIT_COLUMN in names and LOGITS_COLUMN in names else "wide"


def form_from_suffix(path: Path) -> str:
    """The form a file is written in, from its extension (.parquet -> wide, .jsonl, .npz)."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "wide"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".npz":
        return "npz"
    raise InputError(f"{path}: cannot tell the log form from extension {suffix!r}; pass form= one of {FORMS}")

