"""Groups at scale: rows of one group (a sequence, a user) can sit in any batch, file or partition.

Groups are keyed by a 64-bit hash of their value (:func:`~exitwise.calibration.scale.hashing.value_hashes`).
:class:`KeySet` counts distinct groups; :class:`GroupTable` adds up, per group, its rows and, per
candidate policy, its losses and its compute. Both keep partial arrays and consolidate them
(sort by key, add up equal keys) when they grow, so memory stays proportional to the number of
groups, and both merge exactly: the result does not depend on how rows were batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exitwise.calibration.exceptions import InputError

__all__ = ["GroupTable", "KeySet"]


@dataclass(eq=False)
class KeySet:
    """Distinct uint64 keys."""

    parts: list[np.ndarray] = field(default_factory=list)
    held: int = 0
    done: int = 0  # size of the consolidated first part

    def add(self, keys: np.ndarray) -> None:
        if keys.size:
            self.parts.append(np.unique(keys))
            self.held += int(self.parts[-1].size)
            if self.held > 2 * self.done + 65_536:
                self.consolidate()

    def consolidate(self) -> np.ndarray:
        merged = np.unique(np.concatenate(self.parts)) if self.parts else np.zeros(0, dtype=np.uint64)
        self.parts = [merged]
        self.held = self.done = int(merged.size)
        return merged

    def merge(self, other: KeySet) -> None:
        for part in other.parts:
            self.add(part)

    def __len__(self) -> int:
        return int(self.consolidate().size)


@dataclass(eq=False)
class GroupTable:
    """Per group (sorted by key): rows, and per candidate the losses and the fixed-point compute.

    ``dis`` and ``ind`` (G, P) count rows disagreeing with the full model and rows with an
    induced error; ``cost`` (G, P) sums each row's compute fraction in units of 2**-32;
    ``stratum_lo`` / ``stratum_hi`` are the smallest and largest hash of the segment value
    of the group's rows (equal when the group has one segment value).
    """

    n_candidates: int
    labelled: bool
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    held: int = 0
    done: int = 0

    def add(self, keys: np.ndarray, stratum: np.ndarray, dis: np.ndarray, ind: np.ndarray | None,
            cost: np.ndarray) -> None:
        """Fold in a batch: per row its group key and stratum hash, per (row, candidate) the loss
        flags and the fixed-point compute."""
        uniq, inv = np.unique(keys, return_inverse=True)
        g, p = uniq.size, self.n_candidates
        cell = (inv[:, None] * p + np.arange(p)[None, :]).ravel()
        part = {"key": uniq, "rows": np.bincount(inv, minlength=g).astype(np.int64),
                "dis": np.bincount(cell, weights=dis.ravel(), minlength=g * p).astype(np.int64).reshape(g, p),
                "cost": np.bincount(cell, weights=cost.ravel(), minlength=g * p).astype(np.int64).reshape(g, p)}
        if self.labelled and ind is not None:
            part["ind"] = np.bincount(cell, weights=ind.ravel(), minlength=g * p).astype(np.int64).reshape(g, p)
        lo = np.full(g, np.iinfo(np.uint64).max, dtype=np.uint64)
        hi = np.zeros(g, dtype=np.uint64)
        np.minimum.at(lo, inv, stratum)
        np.maximum.at(hi, inv, stratum)
        part["lo"], part["hi"] = lo, hi
        self.parts.append(part)
        self.held += g
        if self.held > 2 * self.done + 65_536:
            self.consolidate()

    def consolidate(self) -> dict[str, np.ndarray]:
        if not self.parts:
            p = self.n_candidates
            empty = {"key": np.zeros(0, dtype=np.uint64), "rows": np.zeros(0, dtype=np.int64),
                     "dis": np.zeros((0, p), dtype=np.int64), "cost": np.zeros((0, p), dtype=np.int64),
                     "lo": np.zeros(0, dtype=np.uint64), "hi": np.zeros(0, dtype=np.uint64)}
            if self.labelled:
                empty["ind"] = np.zeros((0, p), dtype=np.int64)
            return empty
        if len(self.parts) > 1:
            cat = {k: np.concatenate([part[k] for part in self.parts]) for k in self.parts[0]}
            order = np.argsort(cat["key"], kind="stable")
            keys = cat["key"][order]
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            merged = {"key": keys[starts]}
            for name in ("rows", "dis", "ind", "cost"):
                if name in cat:
                    merged[name] = np.add.reduceat(cat[name][order], starts, axis=0)
            merged["lo"] = np.minimum.reduceat(cat["lo"][order], starts)
            merged["hi"] = np.maximum.reduceat(cat["hi"][order], starts)
            self.parts = [merged]
        self.held = self.done = int(self.parts[0]["key"].size)
        return self.parts[0]

    def merge(self, other: GroupTable) -> None:
        for part in other.parts:
            self.parts.append(part)
            self.held += int(part["key"].size)
        self.consolidate()

    def strata(self, levels: dict[int, str], where: str) -> np.ndarray:
        """The segment value of each group (object array); InputError naming a group with two."""
        table = self.consolidate()
        mixed = np.flatnonzero(table["lo"] != table["hi"])
        if mixed.size:
            i = int(mixed[0])
            raise InputError(f"{where}: a group spans segment values {levels.get(int(table['lo'][i]))!r} and "
                             f"{levels.get(int(table['hi'][i]))!r}; per-segment budgets over groups need one "
                             "segment value per group")
        return np.asarray([levels[int(h)] for h in table["lo"]], dtype=object)
