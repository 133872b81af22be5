"""Token-level exit logs from their two file forms into :class:`~exitwise.calibration.tokens.TokenLogs`.

* **tokens** (Parquet), one row per token: the card's group and position columns, optional
  label, ``request_id``, ``ts`` and segment columns, and per exit k ``exit_k_values``
  (list of k floats, non-increasing), ``exit_k_indices`` (list of k distinct int token ids)
  and ``exit_k_lse`` (float: the full-vocabulary log-sum-exp);
* **token_npz**: ``topk_values`` (n, K, k), ``topk_indices`` (n, K, k), ``lse`` (n, K), the
  group and position arrays (n,), optional ``labels``, ``seg_<name>``, ``request_id``, ``ts``.

Parquet is read a row group at a time; list columns are copied from their flattened values
with the widths taken from the list offsets (no Python loop per row). Every check is in
:mod:`.token_columns`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from exitwise.calibration.exceptions import InputError, LogFormatError
from exitwise.calibration.logfiles.columns import (
    column_array,
    decode_segment,
    decode_timestamps,
    exit_namer,
    first_null,
    is_list_type,
    read_npz_arrays,
)
from exitwise.calibration.logfiles.forms import (
    EXIT_RE,
    LOGITS_COLUMN,
    SEGMENT_PREFIX,
    TOKEN_ARRAYS,
    TOKEN_EXIT_RE,
    TS_COLUMN,
    token_column,
)
from exitwise.calibration.logfiles.tables import ParquetColumns
from exitwise.calibration.logfiles.token_columns import (
    TokenWhere,
    check_duplicate_tokens,
    check_id_range,
    check_topk,
    decode_groups,
    decode_positions,
    decode_request_ids,
    decode_token_labels,
)
from exitwise.calibration.logs import ModelCard, SegmentColumn
from exitwise.calibration.tokens import TokenLogs

__all__ = ["read_token_npz", "read_token_parquet"]

PARTS = ("values", "indices", "lse")
_SHOWN_NAMES = 24  # column names listed in a "missing column" message


def _shown(names: list[str]) -> str:
    return str(names if len(names) <= _SHOWN_NAMES else [*names[:_SHOWN_NAMES], f"... ({len(names)} in all)"])


def _parquet_label(k: int, part: str) -> str:
    return f"column {token_column(k, part)!r}"


def _npz_label(k: int, part: str) -> str:
    name = "lse" if part == "lse" else f"topk_{part}"
    return f"array {name!r} [:, {k}]"


def read_token_parquet(table: ParquetColumns, card: ModelCard, src: str) -> TokenLogs:
    """Token logs from a tokens-form Parquet file (one row per token)."""
    n = table.num_rows
    if n == 0:
        raise LogFormatError(f"{src}: empty file (no rows)")
    names = table.column_names
    k_card = card.n_exits
    vocab = int(card.vocab_size or 0)
    data_cols = [token_column(k, part) for k in range(k_card) for part in PARTS]
    required = [c for c in (card.group_column, card.position_column) if c is not None] + data_cols
    missing = [c for c in required if c not in names]
    if missing:
        hint = ""
        if LOGITS_COLUMN in names or any(EXIT_RE.fullmatch(c) for c in names):
            hint = " (this looks like classification logits: a card with 'vocab_size' reads token logs only)"
        raise LogFormatError(
            f"{src}: missing column{'s' if len(missing) > 1 else ''} {_shown(missing)}: token logs with this model "
            f"card need {card.group_column!r} (group), {card.position_column!r} (position) and "
            f"exit_k_values, exit_k_indices, exit_k_lse for k = 0..{k_card - 1}; the file has columns "
            f"{_shown(names)}{hint}"
        )
    extra = sorted({int(m.group(1)) for c in names if (m := TOKEN_EXIT_RE.fullmatch(c)) and int(m.group(1)) >= k_card})
    if extra:
        raise LogFormatError(
            f"{src}: column {token_column(extra[0], 'values')!r} has no exit in the model card: the file has exits up "
            f"to {extra[-1]}, the card lists {k_card} exits"
        )
    group_arr = column_array(table, card.group_column) if card.group_column is not None else None
    pos_arr = column_array(table, card.position_column)
    where = TokenWhere(group_arr, pos_arr, card.group_column, card.position_column)
    names_of = exit_namer(card)
    values: np.ndarray | None = None
    indices: np.ndarray | None = None
    lse = np.empty((n, k_card), dtype=np.float32)
    for offset, group, cols in table.blocks(data_cols):
        for name, col in zip(group, cols, strict=True):
            m = TOKEN_EXIT_RE.fullmatch(name)
            assert m is not None
            k, part = int(m.group(1)), m.group(2)
            if part == "lse":
                _fill_scalar(col, name, k, lse, offset, src, where, names_of)
                continue
            if values is None or indices is None:
                top = _first_width(col, name, src, where, vocab)
                values = np.empty((n, k_card, top), dtype=np.float32)
                indices = np.empty((n, k_card, top), dtype=np.int32)
            _fill_list(col, name, k, part, values if part == "values" else indices, offset, src, where, names_of,
                       vocab)
        del cols
    assert values is not None and indices is not None  # k_card >= 2 (ModelCard)

    def get(column: str) -> pa.Array | None:
        return column_array(table, column) if column in names else None

    return _finish(values, indices, lse, card, src, where, group_arr, pos_arr, get, _parquet_label, card.label_column,
                   card.id_column)


def _first_width(col: pa.ChunkedArray, name: str, src: str, where: TokenWhere, vocab: int) -> int:
    """k: the length of row 0's list in ``exit_0_values``."""
    first = next(arr for arr in col.chunks if len(arr))
    if not is_list_type(first.type):
        raise LogFormatError(f"{src}: column {name!r} must hold a list of k values per row, got type {first.type}")
    if not first.is_valid().to_numpy(zero_copy_only=False)[0]:
        raise LogFormatError(f"{src}: {where(0)}: column {name!r} is missing (null)")
    top = int(pc.list_value_length(first.slice(0, 1))[0].as_py())
    if top < 1:
        raise LogFormatError(f"{src}: {where(0)}: column {name!r} is an empty list; top-k logs need k >= 1 values")
    if top > vocab:
        raise LogFormatError(
            f"{src}: {where(0)}: column {name!r} holds {top} values, more than vocab_size ({vocab}) tokens"
        )
    return top


def _fill_list(
    col: pa.ChunkedArray, name: str, k: int, part: str, out: np.ndarray, offset: int, src: str, where: TokenWhere,
    exit_names: Callable[[int], str], vocab: int,
) -> None:
    """Copy list column ``exit_k_values``/``exit_k_indices`` into ``out[:, k, :]`` chunk by chunk."""
    typ = col.type
    what = "top-k values" if part == "values" else "token ids"
    if not is_list_type(typ):
        raise LogFormatError(f"{src}: column {name!r} must hold a list of k {what} per row, got type {typ}")
    vtype = typ.value_type
    if part == "indices" and not pa.types.is_integer(vtype):
        raise LogFormatError(f"{src}: column {name!r} holds lists of {vtype}; token ids must be integers")
    if part == "values" and not (pa.types.is_floating(vtype) or pa.types.is_integer(vtype)):
        raise LogFormatError(f"{src}: column {name!r} holds lists of {vtype}; top-k values must be numbers")
    top = out.shape[2]
    row = offset
    for arr in col.chunks:
        m = len(arr)
        if m == 0:
            continue
        if arr.null_count:
            raise LogFormatError(
                f"{src}: {where(row + first_null(arr))}: exit {k} ({exit_names(k)}): column {name!r} is missing "
                "(null); every exit must be logged for every token"
            )
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != top)
        if bad.size:
            raise LogFormatError(
                f"{src}: {where(row + int(bad[0]))}: exit {k} ({exit_names(k)}): ragged top-k: column {name!r} has "
                f"{int(lengths[bad[0]])} entries, expected {top} (row 0 of {token_column(0, 'values')!r} has "
                "that many); every row and exit must log the same k"
            )
        flat = pc.list_flatten(arr)
        if flat.null_count:
            r, j = divmod(first_null(flat), top)
            raise LogFormatError(
                f"{src}: {where(row + r)}: exit {k} ({exit_names(k)}): column {name!r} has a null at slot {j}"
            )
        block = flat.to_numpy(zero_copy_only=False).reshape(m, top)
        if part == "indices":
            check_id_range(block[:, None, :], vocab, src, where, exit_names, _parquet_label, first_row=row,
                           first_exit=k)
        out[row : row + m, k, :] = block
        row += m


def _fill_scalar(
    col: pa.ChunkedArray, name: str, k: int, out: np.ndarray, offset: int, src: str, where: TokenWhere,
    exit_names: Callable[[int], str],
) -> None:
    """Copy column ``exit_k_lse`` (one number per row) into ``out[:, k]``."""
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise LogFormatError(f"{src}: column {name!r} has type {col.type}; lse must be a number per row")
    row = offset
    for arr in col.chunks:
        if arr.null_count:
            raise LogFormatError(
                f"{src}: {where(row + first_null(arr))}: exit {k} ({exit_names(k)}): column {name!r} is missing "
                "(null); every exit must be logged for every token"
            )
        out[row : row + len(arr), k] = arr.to_numpy(zero_copy_only=False)
        row += len(arr)


def _finish(
    values: np.ndarray,
    indices: np.ndarray,
    lse: np.ndarray,
    card: ModelCard,
    src: str,
    where: TokenWhere,
    group_arr: pa.Array | None,
    pos_arr: pa.Array,
    get: Callable[[str], pa.Array | None],
    label: Callable[[int, str], str],
    label_name: str,
    id_name: str,
    segment_key: Callable[[str], str] = str,
) -> TokenLogs:
    """Decode the per-token columns, check the top-k data, build the :class:`TokenLogs`."""
    vocab = int(card.vocab_size or 0)
    codes = levels = None
    if group_arr is not None and card.group_column is not None:
        codes, levels = decode_groups(group_arr, card.group_column, src, where)
    positions = decode_positions(pos_arr, card.position_column, src, where)
    check_topk(values, indices, lse, src, where, exit_namer(card), label)
    check_duplicate_tokens(codes, positions, card.group_column, card.position_column, src, where)
    labels = None
    label_arr = get(label_name)
    if label_arr is not None:
        labels = decode_token_labels(label_arr, label_name, vocab, src, where)
    segments: dict[str, SegmentColumn] = {}
    for column in card.segment_columns:
        arr = get(segment_key(column))
        if arr is None:
            raise LogFormatError(
                f"{src}: missing segment column {segment_key(column)!r} (listed in the model card's segment_columns)"
            )
        segments[column] = decode_segment(arr, column, src, where)
    id_arr = get(id_name)
    ids = None if id_arr is None else decode_request_ids(id_arr, id_name, src, where)
    ts_arr = get(TS_COLUMN)
    ts = None if ts_arr is None else decode_timestamps(ts_arr, src, where)
    try:
        return TokenLogs(
            values=values, indices=indices, lse=lse, card=card, groups=codes, group_levels=levels,
            positions=positions, labels=labels, segments=segments, request_ids=ids, ts=ts, source=src,
        )
    except InputError as exc:
        raise LogFormatError(str(exc)) from None


def _to_arrow(arr: np.ndarray, name: str, src: str) -> pa.Array:
    try:
        return pa.array(arr)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise LogFormatError(f"{src}: array {name!r} with dtype {arr.dtype} cannot be read: {exc}") from None


def read_token_npz(p: Path, card: ModelCard, src: str) -> TokenLogs:
    """Token logs from a token NPZ file (``topk_values``, ``topk_indices``, ``lse`` and per-token arrays)."""
    arrays = read_npz_arrays(p, src)
    required = [*TOKEN_ARRAYS, *(c for c in (card.group_column, card.position_column) if c is not None)]
    missing = [a for a in required if a not in arrays]
    if missing:
        hint = " (classification logits: a card with 'vocab_size' reads token logs only)" if "logits" in arrays else ""
        raise LogFormatError(
            f"{src}: missing array{'s' if len(missing) > 1 else ''} {missing}: token NPZ logs need topk_values "
            f"(n, K, k), topk_indices (n, K, k), lse (n, K), {card.group_column!r} and {card.position_column!r} "
            f"(n,); found arrays {_shown(sorted(arrays))}{hint}"
        )
    raw_values, raw_ids, raw_lse = (arrays.pop(a) for a in TOKEN_ARRAYS)
    if raw_values.ndim != 3 or raw_ids.shape != raw_values.shape:
        raise LogFormatError(
            f"{src}: arrays 'topk_values' and 'topk_indices' must both have shape (n, K, k), got {raw_values.shape} "
            f"and {raw_ids.shape}"
        )
    n, k_exits, top = raw_values.shape
    if n == 0:
        raise LogFormatError(f"{src}: empty file (no rows): array 'topk_values' has 0 tokens")
    if k_exits != card.n_exits:
        raise LogFormatError(
            f"{src}: array 'topk_values' has {k_exits} exits (axis 1) but the model card lists {card.n_exits}"
        )
    vocab = int(card.vocab_size or 0)
    if not 1 <= top <= vocab:
        raise LogFormatError(f"{src}: array 'topk_values' has top-k width {top} (axis 2); it must be in 1..{vocab}")
    if raw_lse.shape != (n, k_exits):
        raise LogFormatError(f"{src}: array 'lse' has shape {raw_lse.shape}, expected ({n}, {k_exits})")
    for name, arr, kinds in (("topk_values", raw_values, "fiu"), ("topk_indices", raw_ids, "iu"),
                             ("lse", raw_lse, "fiu")):
        if arr.dtype.kind not in kinds:
            need = "integer token ids" if kinds == "iu" else "numbers"
            raise LogFormatError(f"{src}: array {name!r} has dtype {arr.dtype}; expected {need}")
    for name, arr in arrays.items():
        if arr.shape != (n,):
            raise LogFormatError(f"{src}: array {name!r} has shape {arr.shape}, expected ({n},) (one per token)")
    group_np = arrays.get(card.group_column) if card.group_column is not None else None
    pos_np = arrays[card.position_column]
    where = TokenWhere(group_np, pos_np, card.group_column, card.position_column)
    check_id_range(raw_ids, vocab, src, where, exit_namer(card), _npz_label)
    values = np.ascontiguousarray(raw_values, dtype=np.float32)
    indices = np.ascontiguousarray(raw_ids, dtype=np.int32)
    lse = np.ascontiguousarray(raw_lse, dtype=np.float32)
    del raw_values, raw_ids, raw_lse
    label_name = next((nm for nm in ("labels", card.label_column) if nm in arrays), "labels")
    id_name = next((nm for nm in (card.id_column, "request_id") if nm in arrays), card.id_column)

    def get(key: str) -> pa.Array | None:
        return _to_arrow(arrays[key], key, src) if key in arrays else None

    group_arr = None if group_np is None else _to_arrow(group_np, str(card.group_column), src)
    pos_arr = _to_arrow(pos_np, card.position_column, src)
    return _finish(values, indices, lse, card, src, where, group_arr, pos_arr, get, _npz_label, label_name, id_name,
                   segment_key=lambda column: SEGMENT_PREFIX + column)

