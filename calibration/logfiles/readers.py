"""Load exit logs from any file form (:func:`load_logs`); JSON Lines and NPZ are read here.

Parquet (wide or long) goes to :mod:`.tables`; every column is checked by :mod:`.columns`.
Token-level logs (a card with ``vocab_size``) go to :mod:`.tokens`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from exitwise.calibration.exceptions import CardError, LogFormatError
from exitwise.calibration.logfiles.columns import (
    Where,
    build_logs,
    check_finite,
    decode_ids,
    decode_labels,
    decode_segment,
    decode_timestamps,
    exit_namer,
    read_npz_arrays,
)
from exitwise.calibration.logfiles.forms import (
    EXIT_RE,
    FORMS,
    SEGMENT_PREFIX,
    TOKEN_FORMS,
    TS_COLUMN,
    detect_form,
)
from exitwise.calibration.logfiles.tables import open_parquet, read_long_table, read_wide_table
from exitwise.calibration.logfiles.tokens import read_token_npz, read_token_parquet
from exitwise.calibration.logs import ExitLogs, ModelCard
from exitwise.calibration.tokens import TokenLogs

__all__ = ["load_logs"]


def load_logs(path: str | os.PathLike[str], card: ModelCard, *, form: str | None = None) -> ExitLogs | TokenLogs:
    """Load exit logs in any form of the design contract.

    A classifier's card gives dense float32 (n, K, C) :class:`ExitLogs`; a card with
    ``vocab_size`` gives top-k :class:`TokenLogs` (forms "tokens" and "token_npz").
    ``form`` overrides detection from the extension/contents. Raises :class:`LogFormatError`
    naming the file, the row (index and request id, or group and position) or column, and the cause.
    """
    p = Path(path)
    if not p.exists():
        raise LogFormatError(f"{p}: file not found")
    if p.is_dir():
        raise LogFormatError(f"{p}: is a directory, expected an exit-log file")
    if p.stat().st_size == 0:
        raise LogFormatError(f"{p}: empty file (no rows)")
    if form is None:
        form = detect_form(p)
    if form not in FORMS + TOKEN_FORMS:
        raise LogFormatError(f"{p}: unknown log form {form!r}; expected one of {', '.join(FORMS + TOKEN_FORMS)}")
    src = str(p)
    if card.token_level:
        return _load_tokens(p, card, form, src)
    if form in TOKEN_FORMS:
        held = "columns exit_k_values, exit_k_indices, exit_k_lse" if form == "tokens" else "array 'topk_values'"
        raise CardError(
            f"{src}: the file holds token-level logs ({held}) but the model card has no 'vocab_size': "
            "token logs need a card with 'vocab_size' (the vocabulary size) instead of 'classes'"
        )
    if form == "npz":
        return _load_npz(p, card, src)
    if form == "jsonl":
        return _load_jsonl(p, card, src)
    table = open_parquet(p)
    if form == "long":
        return read_long_table(table, card, src)
    return read_wide_table(table, card, src)


def _load_tokens(p: Path, card: ModelCard, form: str, src: str) -> TokenLogs:
    """Token logs: Parquet -> the tokens form, NPZ -> the token NPZ form; anything else is refused."""
    if form in ("tokens", "wide", "long"):
        return read_token_parquet(open_parquet(p), card, src)  # wide/long: its "missing column" error says so
    if form in ("token_npz", "npz"):
        return read_token_npz(p, card, src)
    raise LogFormatError(
        f"{src}: the model card has 'vocab_size' (token-level logs), which are read from Parquet (form 'tokens') "
        f"or NPZ (form 'token_npz'), not {form!r}"
    )


def _load_jsonl(p: Path, card: ModelCard, src: str) -> ExitLogs:
    """JSON Lines, one wide row per line (blank lines are skipped; errors give the line number)."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        with p.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LogFormatError(
                        f"{src}: line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise LogFormatError(f"{src}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                records.append(obj)
                lines.append(lineno)
    except UnicodeDecodeError as exc:
        raise LogFormatError(f"{src}: not UTF-8 text (corrupt or not JSON Lines): {exc}") from None
    except OSError as exc:
        raise LogFormatError(f"{src}: cannot read: {exc}") from exc
    if not records:
        raise LogFormatError(f"{src}: empty file (no rows)")
    line_of = np.asarray(lines, dtype=np.int64)
    keys: dict[str, None] = {}
    for rec in records:
        keys.update(dict.fromkeys(rec))
    columns: dict[str, pa.Array] = {}
    for name in keys:
        values = [rec.get(name) for rec in records]
        if EXIT_RE.fullmatch(name):
            columns[name] = _json_list_column(values, name, src, line_of)
        else:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                kinds = [type(v).__name__ for v in values]
                row = next(i for i, t in enumerate(kinds) if t not in ("NoneType", kinds[0]))
                raise LogFormatError(
                    f"{src}: row {row} (line {lines[row]}): column {name!r} mixes types "
                    f"({kinds[0]} in row 0, {kinds[row]} here)"
                ) from None
    return read_wide_table(pa.table(columns), card, src, lines=line_of)


def _json_list_column(values: list[Any], name: str, src: str, lines: np.ndarray) -> pa.Array:
    try:
        return pa.array(values, type=pa.list_(pa.float64()))
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    for row, value in enumerate(values):
        ok = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
        if value is not None and not ok:
            raise LogFormatError(
                f"{src}: row {row} (line {int(lines[row])}): column {name!r} must be a list of numbers, "
                f"got {json.dumps(value)[:60]}"
            )
    raise LogFormatError(f"{src}: column {name!r}: values cannot be read as lists of numbers")


def _load_npz(p: Path, card: ModelCard, src: str) -> ExitLogs:
    arrays = read_npz_arrays(p, src)
    if "logits" not in arrays:
        raise LogFormatError(f"{src}: missing array 'logits' of shape (n, K, C); found arrays {sorted(arrays)}")
    raw = arrays["logits"]
    if raw.ndim != 3:
        raise LogFormatError(f"{src}: array 'logits' must have shape (n, K, C), got {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise LogFormatError(f"{src}: array 'logits' has dtype {raw.dtype}; logits must be numbers")
    n, k, c = raw.shape
    if n == 0:
        raise LogFormatError(f"{src}: empty file (no rows): array 'logits' has 0 samples")
    if k != card.n_exits:
        raise LogFormatError(
            f"{src}: array 'logits' has {k} exits (axis 1) but the model card lists {card.n_exits}"
            + (" (missing exit)" if k < card.n_exits else "")
        )
    if card.classes is not None and c != len(card.classes):
        raise LogFormatError(
            f"{src}: array 'logits' has {c} classes (axis 2) but the model card lists {len(card.classes)}"
        )
    if c < 2:
        raise LogFormatError(f"{src}: logits need at least 2 classes, found {c}")
    logits = np.ascontiguousarray(raw, dtype=np.float32)
    del raw
    for name, arr in arrays.items():
        if name != "logits" and arr.shape != (n,):
            raise LogFormatError(f"{src}: array {name!r} has shape {arr.shape}, expected ({n},) (one per sample)")
    id_name = next((nm for nm in (card.id_column, "request_id", "request_ids") if nm in arrays), None)
    id_arr = None if id_name is None else _np_to_arrow(arrays[id_name], id_name, src)
    where = Where(id_arr, card.id_column)
    ids = None if id_arr is None else decode_ids(id_arr, id_name or card.id_column, src, where)
    check_finite(logits, src, lambda i, k: where(i), exit_namer(card))
    labels = None
    label_name = next((nm for nm in ("labels", card.label_column) if nm in arrays), None)
    if label_name is not None:
        labels = decode_labels(_np_to_arrow(arrays[label_name], label_name, src), label_name, card, c, src, where)
    segments = {}
    seg_names = list(card.segment_columns)
    seg_names += [nm[len(SEGMENT_PREFIX) :] for nm in arrays if nm.startswith(SEGMENT_PREFIX)]
    for column in dict.fromkeys(seg_names):
        key = SEGMENT_PREFIX + column
        if key not in arrays:
            raise LogFormatError(
                f"{src}: missing array {key!r} for segment column {column!r} (listed in the model card)"
            )
        segments[column] = decode_segment(_np_to_arrow(arrays[key], key, src), column, src, where)
    ts = None
    if TS_COLUMN in arrays:
        ts = decode_timestamps(_np_to_arrow(arrays[TS_COLUMN], TS_COLUMN, src), src, where)
    return build_logs(logits, card, labels, segments, ids, ts, src)


def _np_to_arrow(arr: np.ndarray, name: str, src: str) -> pa.Array:
    try:
        return pa.array(arr)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise LogFormatError(f"{src}: array {name!r} with dtype {arr.dtype} cannot be read: {exc}") from None

