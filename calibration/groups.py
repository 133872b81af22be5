"""Groups of dependent rows (the tokens of one sequence): group codes, group splits, per-group losses.

The tokens of one sequence share a prompt, a topic and a difficulty: their losses are not
independent, and a test that counts tokens as i.i.d. rows (the exact binomial of
:mod:`exitwise.calibration.certify`) overstates its confidence. Certification is valid when the
unit of sampling is the group: groups are drawn i.i.d. from the traffic, the split never cuts a
group in two (:func:`split_groups`), and each group contributes one number
(:func:`group_losses`):

- ``disagreement`` / ``induced_error``: X_g = the mean of the group's token losses, in [0, 1];
  the mean over groups is certified with the Hoeffding-Bentkus p-value
  (:func:`exitwise.calibration.certify.hb_p_value`).
- ``sequence_disagreement``: Y_g = 1 if any token of the group has a loss; the share of groups
  with a loss is certified with the exact binomial over groups.

:class:`GroupIndex` numbers the groups in the sorted order of their *values*, so the split
depends on which groups there are, not on the order their rows come in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from exitwise.calibration.certify import METHOD, METHOD_GROUPS, METHOD_GROUPS_ANY
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.splits import split_rows

__all__ = ["GROUP_RISKS", "GroupIndex", "group_losses", "group_method", "split_groups"]

# risk -> how a group's token losses become the group's loss: "mean" (a float in [0, 1], certified
# with Hoeffding-Bentkus) or "any" (a bool, certified with the exact binomial over groups)
GROUP_RISKS: Mapping[str, str] = {
    "disagreement": "mean",
    "induced_error": "mean",
    "sequence_disagreement": "any",
}


def _sorted_order(levels: np.ndarray, what: str) -> np.ndarray:
    """Stable argsort of group values; InputError when they cannot be ordered (mixed types)."""
    try:
        return np.argsort(levels, kind="stable")
    except TypeError as exc:
        raise InputError(f"{what}: group values must all be numbers or all be strings, "
                         f"got a mix ({exc})") from None


@dataclass(frozen=True, eq=False)
class GroupIndex:
    """The group of every row: ``codes`` (n,) int64 in 0..G-1, numbered in the sorted order of
    the group values ``levels`` (G,); ``sizes`` (G,) int64 rows per group (every size >= 1).
    """

    codes: np.ndarray
    sizes: np.ndarray
    levels: np.ndarray

    @classmethod
    def from_values(cls, values: np.ndarray, what: str = "group column") -> GroupIndex:
        """Index rows by their group value (ints or strings); groups numbered by sorted value."""
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise InputError(f"{what}: group values must be one value per row, got shape {arr.shape}")
        if arr.dtype == object:
            return cls._from_objects(arr, what)
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise InputError(f"{what}: row {int(np.flatnonzero(~np.isfinite(arr))[0])} has no group value")
        levels, codes = np.unique(arr, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
        return cls(codes=codes, sizes=np.bincount(codes, minlength=levels.size).astype(np.int64), levels=levels)

    @classmethod
    def _from_objects(cls, arr: np.ndarray, what: str) -> GroupIndex:
        """Python strings or ints (dtype object): dictionary-encoded by pyarrow, 10x np.unique's speed."""
        try:
            col = pa.array(arr)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{what}: group values must all be numbers or all be strings ({exc})") from None
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{what}: row {row} has no group value")
        enc = col.dictionary_encode()
        dictionary = enc.dictionary.to_numpy(zero_copy_only=False)
        return cls.from_codes(enc.indices.to_numpy(zero_copy_only=False), dictionary, what)

    @classmethod
    def from_codes(cls, codes: np.ndarray, levels: np.ndarray, what: str = "group column") -> GroupIndex:
        """Index rows by codes into ``levels`` (as in :class:`~exitwise.calibration.tokens.TokenLogs`,
        whose subsets keep every level): only the groups present are kept, renumbered by sorted value.
        """
        codes = np.asarray(codes, dtype=np.int64)
        levels = np.asarray(levels)
        if codes.size and (codes.min() < 0 or codes.max() >= levels.size):
            raise InputError(f"{what}: group codes must lie in 0..{levels.size - 1}")
        present = np.flatnonzero(np.bincount(codes, minlength=levels.size))
        order = present[_sorted_order(levels[present], what)]
        new = np.full(levels.size, -1, dtype=np.int64)
        new[order] = np.arange(order.size)
        out = new[codes]
        return cls(codes=out, sizes=np.bincount(out, minlength=order.size).astype(np.int64), levels=levels[order])

    @property
    def n(self) -> int:
        """Rows."""
        return int(self.codes.size)

    @property
    def n_groups(self) -> int:
        return int(self.sizes.size)

    def take_groups(self, group_ids: np.ndarray) -> np.ndarray:
        """The rows (sorted) of the groups ``group_ids``."""
        keep = np.zeros(self.n_groups, dtype=bool)
        keep[np.asarray(group_ids, dtype=np.int64)] = True
        return np.flatnonzero(keep[self.codes])

    def take(self, rows: np.ndarray) -> GroupIndex:
        """The index of a subset of rows (e.g. a split): only the groups present, renumbered."""
        return GroupIndex.from_codes(self.codes[rows], self.levels)

    def _check(self, loss_rows: np.ndarray) -> np.ndarray:
        arr = np.asarray(loss_rows)
        if arr.ndim not in (1, 2) or arr.shape[0] != self.n:
            raise InputError(f"per-row losses must have {self.n} rows (one per row of the group index), "
                             f"got shape {arr.shape}")
        return arr

    def sum(self, loss_rows: np.ndarray) -> np.ndarray:
        """Per-group sum of ``loss_rows`` ((n,) -> (G,), (n, K) -> (G, K)), float64."""
        arr = self._check(loss_rows)
        if arr.ndim == 1:
            return np.bincount(self.codes, weights=arr.astype(np.float64, copy=False), minlength=self.n_groups)
        return np.stack([np.bincount(self.codes, weights=arr[:, j].astype(np.float64, copy=False),
                                     minlength=self.n_groups) for j in range(arr.shape[1])], axis=1)

    def mean(self, loss_rows: np.ndarray) -> np.ndarray:
        """Per-group mean of per-row losses in [0, 1] ((n,) -> (G,), (n, K) -> (G, K)), float64."""
        total = self.sum(loss_rows)
        return np.minimum(total / (self.sizes if total.ndim == 1 else self.sizes[:, None]), 1.0)

    def any(self, loss_rows: np.ndarray) -> np.ndarray:
        """Per-group "some row has a nonzero loss" ((n,) -> (G,), (n, K) -> (G, K)), bool."""
        arr = self._check(loss_rows)
        return self.sum(arr != 0) > 0

    def first(self, values: np.ndarray) -> np.ndarray:
        """``values`` (one per row) at each group's first row, one per group (no constancy check)."""
        return np.asarray(values)[np.unique(self.codes, return_index=True)[1]]

    def per_group(self, values: np.ndarray, what: str = "column") -> np.ndarray:
        """The value every row of a group shares (e.g. a segment), one per group.

        InputError naming the first group whose rows disagree: a per-group constraint needs the
        column to be constant within each group.
        """
        arr = np.asarray(values)
        if arr.shape[:1] != (self.n,):
            raise InputError(f"{what}: expected {self.n} rows, got shape {arr.shape}")
        first = np.unique(self.codes, return_index=True)[1]  # the first row of each group
        out = arr[first]
        bad = np.flatnonzero(arr != out[self.codes])
        if bad.size:
            row = int(bad[0])
            raise InputError(f"{what}: group {self.levels[self.codes[row]]!r} has rows with different values "
                             f"({out[self.codes[row]]!r} at row {int(first[self.codes[row]])}, {arr[row]!r} at row "
                             f"{row}); it must be constant within a group")
        return out


def split_groups(index: GroupIndex, n_choose_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose rows and certify rows (both sorted) from one seeded permutation of the *groups*.

    :func:`~exitwise.calibration.splits.split_rows` over the G groups (numbered by sorted value)
    gives ``n_choose_groups`` choose groups and the rest certify; every group's rows go whole to
    one side. The same group values, sizes and seed give the same split, whatever the row order.
    """
    choose_g, certify_g = split_rows(index.n_groups, [int(n_choose_groups)], seed)
    return index.take_groups(choose_g), index.take_groups(certify_g)


def group_losses(index: GroupIndex, loss_rows: np.ndarray, risk: str) -> np.ndarray:
    """Each group's loss under a group risk (see :data:`GROUP_RISKS`): the mean of its rows'
    losses (float64) for ``disagreement`` / ``induced_error``, "any row has a loss" (bool) for
    ``sequence_disagreement``. ``loss_rows`` is (n,) or (n, K) (e.g. one column per exit).
    """
    kind = GROUP_RISKS.get(risk)
    if kind is None:
        raise InputError(f"unknown group risk {risk!r}; expected one of {', '.join(GROUP_RISKS)}")
    arr = np.asarray(loss_rows)
    if arr.dtype != bool:
        finite = np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, dtype=bool)
        bad = np.flatnonzero(~(finite & (arr >= 0) & (arr <= 1)).reshape(arr.shape[0], -1).all(axis=1))
        if bad.size:
            raise InputError(f"per-row losses must lie in [0, 1]; row {int(bad[0])} has {arr[int(bad[0])]!r}")
    return index.mean(arr) if kind == "mean" else index.any(arr)


def group_method(risk: str | None) -> str:
    """``guarantee.method`` of a policy certified over groups under ``risk`` (None: rows, i.i.d.)."""
    if risk is None:
        return METHOD
    kind = GROUP_RISKS.get(risk)
    if kind is None:
        raise InputError(f"unknown group risk {risk!r}; expected one of {', '.join(GROUP_RISKS)}")
    return METHOD_GROUPS if kind == "mean" else METHOD_GROUPS_ANY
