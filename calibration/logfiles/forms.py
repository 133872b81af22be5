"""The exit-log file forms: their names, the column layout they share, and telling a file's form.

Four forms hold dense classification logits (wide, long, JSON Lines, NPZ); two hold the top-k
token logs of a language model (``tokens``: Parquet, ``token_npz``: NPZ).
"""

from __future__ import annotations

import os
import re
import zipfile
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
    "TOKEN_ARRAYS",
    "TOKEN_EXIT_RE",
    "TOKEN_FORMS",
    "TS_COLUMN",
    "detect_form",
    "form_from_suffix",
    "token_column",
]

FORMS = ("wide", "long", "jsonl", "npz")
TOKEN_FORMS = ("tokens", "token_npz")  # top-k token logs: Parquet, NPZ
TS_COLUMN = "ts"  # the optional time column (every form)
EXIT_COLUMN = "exit"  # long form: the exit index of a row ...
LOGITS_COLUMN = "logits"  # ... and its C logits
SEGMENT_PREFIX = "seg_"  # NPZ: array seg_<name> holds segment column <name>
EXIT_RE = re.compile(r"exit_(\d+)")  # wide form and JSON Lines: exit_k holds exit k's C logits
TOKEN_EXIT_RE = re.compile(r"exit_(\d+)_(values|indices|lse)")  # tokens form: exit_k_values, ...
TOKEN_ARRAYS = ("topk_values", "topk_indices", "lse")  # token NPZ: (n, K, k), (n, K, k), (n, K)
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def token_column(exit_index: int, part: str) -> str:
    """The tokens-form column of exit ``exit_index``: ``part`` is "values", "indices" or "lse"."""
    return f"exit_{exit_index}_{part}"


def detect_form(path: str | os.PathLike[str]) -> str:
    """The log form of ``path`` from its extension or contents.

    "wide", "long", "jsonl" or "npz" (classification logits); "tokens" (Parquet with
    ``exit_0_values``) or "token_npz" (NPZ with ``topk_values``) for token logs.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _parquet_form(p)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".npz":
        return _npz_form(p)
    try:
        with p.open("rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise LogFormatError(f"{p}: cannot read: {exc}") from exc
    if head.startswith(b"PAR1"):
        return _parquet_form(p)
    if head.startswith(b"PK\x03\x04"):
        return _npz_form(p)
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
    if token_column(0, "values") in names:
        return "tokens"
    return "long" if EXIT_COLUMN in names and LOGITS_COLUMN in names else "wide"


def _npz_form(p: Path) -> str:
    """The NPZ form: "token_npz" when the archive holds ``topk_values``, else "npz" (corrupt: left to the reader)."""
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return "npz"
    return "token_npz" if f"{TOKEN_ARRAYS[0]}.npy" in names else "npz"


def form_from_suffix(path: Path, *, tokens: bool = False) -> str:
    """The form a file is written in, from its extension (.parquet -> wide, .jsonl, .npz).

    With ``tokens`` (top-k token logs): .parquet -> "tokens", .npz -> "token_npz".
    """
    suffix = path.suffix.lower()
    forms = TOKEN_FORMS if tokens else FORMS
    if suffix in PARQUET_SUFFIXES:
        return "tokens" if tokens else "wide"
    if suffix == ".npz":
        return "token_npz" if tokens else "npz"
    if suffix in JSONL_SUFFIXES and not tokens:
        return "jsonl"
    raise InputError(f"{path}: cannot tell the log form from extension {suffix!r}; pass form= one of {forms}")

