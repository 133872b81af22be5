"""Columns of token-level logs to validated numpy arrays, and the checks of the top-k data.

Both token forms (:mod:`.tokens`) hand their arrays here. Every check is vectorised over
chunks of rows (no Python loop per row) and raises
:class:`~exitwise.calibration.exceptions.LogFormatError` at the first bad value, naming the
file, the row (index, group id and position), the exit and the column.

What a valid row holds, per exit: ``k`` finite values sorted non-increasing, ``k`` distinct
token ids in ``[0, V)``, and a finite ``lse`` (the full-vocabulary log-sum-exp) at least the
top value and with ``sum(exp(values - lse)) <= 1 + TAIL_TOLERANCE``: the tail mass
``1 - sum(exp(values - lse))`` the V - k other tokens share is then non-negative up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from exitwise.calibration.exceptions import LogFormatError
from exitwise.calibration.logfiles.columns import first_null

__all__ = [
    "TAIL_TOLERANCE",
    "TokenWhere",
    "check_duplicate_tokens",
    "check_id_range",
    "check_topk",
    "decode_groups",
    "decode_positions",
    "decode_request_ids",
    "decode_token_labels",
]

TAIL_TOLERANCE = 1e-3  # top-k probabilities may sum to 1 + this (rounding of logits and lse)
_LOG_TOLERANCE = float(np.log1p(TAIL_TOLERANCE))
_CHECK_ROWS = 1 << 14  # rows per vectorised check: bounds the temporaries (16k x 12 x 32 x 4 B = 25 MB)

ColumnLabel = Callable[[int, str], str]  # (exit, "values" | "indices" | "lse") -> "column 'exit_2_values'"


def _value(arr: pa.Array | np.ndarray, row: int) -> object:
    value = arr[row]
    if isinstance(value, pa.Scalar):
        return value.as_py()
    return value.item() if isinstance(value, np.generic) else value


class TokenWhere:
    """Formats 'row i (sequence_id 's3', position 17)' lazily: values are decoded for the message only."""

    def __init__(
        self,
        groups: pa.Array | np.ndarray | None,
        positions: pa.Array | np.ndarray | None,
        group_column: str | None,
        position_column: str,
    ):
        self.groups = groups
        self.positions = positions
        self.group_column = group_column
        self.position_column = position_column

    def __call__(self, row: int) -> str:
        parts = []
        if self.groups is not None and self.group_column is not None:
            parts.append(f"{self.group_column} {_value(self.groups, row)!r}")
        if self.positions is not None:
            parts.append(f"{self.position_column} {_value(self.positions, row)!r}")
        return f"row {row}" + (f" ({', '.join(parts)})" if parts else "")


def _what(value: float) -> str:
    return "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def check_id_range(
    ids: np.ndarray,
    vocab_size: int,
    src: str,
    where: Callable[[int], str],
    exit_names: Callable[[int], str],
    column: ColumnLabel,
    *,
    first_row: int = 0,
    first_exit: int = 0,
) -> None:
    """Token ids (m, E, k) of any integer dtype must lie in [0, vocab_size); checked before any cast."""
    for start in range(0, ids.shape[0], _CHECK_ROWS):
        chunk = ids[start : start + _CHECK_ROWS]
        bad = (chunk < 0) | (chunk >= vocab_size)
        if not bad.any():
            continue
        i, e, j = (int(v) for v in np.argwhere(bad)[0])
        k = first_exit + e
        raise LogFormatError(
            f"{src}: {where(first_row + start + i)}: exit {k} ({exit_names(k)}): {column(k, 'indices')} slot {j} "
            f"holds token id {int(chunk[i, e, j])}, out of range: ids are 0..{vocab_size - 1} (vocab_size {vocab_size})"
        )


def _failer(
    src: str, where: Callable[[int], str], exit_names: Callable[[int], str], start: int
) -> Callable[[int, int, str], LogFormatError]:
    """The error for row ``start + i`` of a chunk at exit ``k``."""
    def fail(i: int, k: int, text: str) -> LogFormatError:
        return LogFormatError(f"{src}: {where(start + i)}: exit {k} ({exit_names(k)}): {text}")
    return fail


def check_topk(
    values: np.ndarray,
    indices: np.ndarray,
    lse: np.ndarray,
    src: str,
    where: Callable[[int], str],
    exit_names: Callable[[int], str],
    column: ColumnLabel,
) -> None:
    """Finite values and lse, values non-increasing, distinct ids, lse >= top value, tail mass >= -tolerance.

    ``values`` (n, K, k) float32, ``indices`` (n, K, k) int32 (range already checked), ``lse`` (n, K).
    """
    n = values.shape[0]
    for start in range(0, n, _CHECK_ROWS):
        v = values[start : start + _CHECK_ROWS]
        ids = indices[start : start + _CHECK_ROWS]
        s = lse[start : start + _CHECK_ROWS]
        fail = _failer(src, where, exit_names, start)
        finite = np.isfinite(v)
        if not finite.all():
            i, k, j = (int(x) for x in np.argwhere(~finite)[0])
            raise fail(i, k, f"{column(k, 'values')} slot {j} is {_what(float(v[i, k, j]))}; values must be finite")
        finite_lse = np.isfinite(s)
        if not finite_lse.all():
            i, k = (int(x) for x in np.argwhere(~finite_lse)[0])
            raise fail(i, k, f"{column(k, 'lse')} is {_what(float(s[i, k]))}; lse must be finite")
        if v.shape[2] > 1:
            rising = v[:, :, 1:] > v[:, :, :-1]
            if rising.any():
                i, k, j = (int(x) for x in np.argwhere(rising)[0])
                raise fail(
                    i, k,
                    f"{column(k, 'values')} is not sorted: slot {j + 1} ({float(v[i, k, j + 1])!r}) > slot {j} "
                    f"({float(v[i, k, j])!r}); top-k values must be non-increasing",
                )
            ordered = np.sort(ids, axis=-1)
            repeat = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=-1)
            if repeat.any():
                i, k = (int(x) for x in np.argwhere(repeat)[0])
                row = ordered[i, k]
                token = int(row[1:][row[1:] == row[:-1]][0])
                slots = np.flatnonzero(ids[i, k] == token)[:2].tolist()
                raise fail(
                    i, k,
                    f"{column(k, 'indices')} repeats token id {token} (slots {slots[0]} and {slots[1]}); "
                    "the top-k ids of a row must be distinct",
                )
        top = v[:, :, 0].astype(np.float64)
        below = s.astype(np.float64) < top - _LOG_TOLERANCE
        if below.any():
            i, k = (int(x) for x in np.argwhere(below)[0])
            raise fail(
                i, k,
                f"{column(k, 'lse')} {float(s[i, k])!r} is below the top value {float(v[i, k, 0])!r}; lse is the "
                "log-sum-exp of the full vocabulary, at least its largest logit",
            )
        mass = np.exp(v - s[:, :, None], dtype=np.float32).sum(axis=-1, dtype=np.float64)
        over = mass > 1.0 + TAIL_TOLERANCE
        if over.any():
            i, k = (int(x) for x in np.argwhere(over)[0])
            raise fail(
                i, k,
                f"the top-k probabilities sum to {float(mass[i, k]):.6f} > 1 + {TAIL_TOLERANCE:g}: "
                f"{column(k, 'lse')} {float(s[i, k])!r} is too small for {column(k, 'values')} "
                "(the tail mass would be negative)",
            )


def decode_groups(arr: pa.Array, column: str, src: str, where: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """Group column -> (int64 codes, sorted unique levels): int64 levels for integers, str (object) for strings."""
    if arr.null_count:
        raise LogFormatError(f"{src}: {where(first_null(arr))}: group column {column!r} is null")
    typ = arr.type
    if pa.types.is_integer(typ):
        levels, codes = np.unique(arr.to_numpy(zero_copy_only=False).astype(np.int64), return_inverse=True)
        return codes.astype(np.int64).ravel(), levels.astype(np.int64)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        encoded = pc.dictionary_encode(arr)
        order = pc.array_sort_indices(encoded.dictionary).to_numpy(zero_copy_only=False)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order), dtype=np.int64)
        codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
        levels = np.asarray(encoded.dictionary.take(pa.array(order)).to_pylist(), dtype=object)
        return codes, levels
    raise LogFormatError(f"{src}: group column {column!r} has type {typ}; expected integers or strings")


def decode_positions(arr: pa.Array, column: str, src: str, where: Callable[[int], str]) -> np.ndarray:
    """Token positions: integers >= 0, int64."""
    if arr.null_count:
        raise LogFormatError(f"{src}: {where(first_null(arr))}: position column {column!r} is null")
    if not pa.types.is_integer(arr.type):
        raise LogFormatError(f"{src}: position column {column!r} has type {arr.type}; expected integers >= 0")
    positions = arr.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero(positions < 0)
    if bad.size:
        raise LogFormatError(
            f"{src}: {where(int(bad[0]))}: position {int(positions[bad[0]])} in column {column!r} is negative"
        )
    return positions


def check_duplicate_tokens(
    codes: np.ndarray | None, positions: np.ndarray, group_column: str | None, position_column: str,
    src: str, where: Callable[[int], str],
) -> None:
    """Each (group, position) pair once: two rows for one token would count it twice."""
    if codes is None:
        return
    order = np.lexsort((positions, codes))
    same = (codes[order][1:] == codes[order][:-1]) & (positions[order][1:] == positions[order][:-1])
    if same.any():
        j = int(np.flatnonzero(same)[0])
        r1, r2 = sorted((int(order[j]), int(order[j + 1])))
        raise LogFormatError(
            f"{src}: {where(r1)} and row {r2} are the same token (same {group_column} and {position_column}); "
            "each (group, position) pair must appear once"
        )


def decode_token_labels(
    arr: pa.Array, column: str, vocab_size: int, src: str, where: Callable[[int], str]
) -> np.ndarray:
    """Labels: the true next token ids, integers in [0, vocab_size), int64."""
    if arr.null_count:
        raise LogFormatError(
            f"{src}: {where(first_null(arr))}: label column {column!r} is null; label every row or leave the column out"
        )
    if not pa.types.is_integer(arr.type):
        raise LogFormatError(f"{src}: label column {column!r} has type {arr.type}; expected token ids (integers)")
    labels = arr.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= vocab_size))
    if bad.size:
        row = int(bad[0])
        raise LogFormatError(
            f"{src}: {where(row)}: label {int(labels[row])} in column {column!r} is out of range: token ids are "
            f"0..{vocab_size - 1} (vocab_size {vocab_size})"
        )
    return labels


def decode_request_ids(arr: pa.Array, column: str, src: str, where: Callable[[int], str]) -> np.ndarray:
    """Request ids of token rows (the tokens of one request share it): int64 or str (object); no nulls."""
    if arr.null_count:
        raise LogFormatError(f"{src}: {where(first_null(arr))}: request id column {column!r} is null")
    if pa.types.is_integer(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(object)
    raise LogFormatError(f"{src}: request id column {column!r} has type {arr.type}; expected strings or integers")
