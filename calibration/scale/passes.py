"""The three passes of the scale engine, as mergeable reducers over batches of rows.

Each pass is an object with ``update(chunk)`` (fold in one batch) and ``merge(other)`` (fold
in another reducer's state): a single machine updates one reducer batch by batch, Spark
updates one per partition and merges them on the driver. Every piece of state is exact and
order-free — integer counts, sums of fixed-point integers, bottom-k samples by hash, minima
and maxima — so the result is the same bit for bit whatever the file layout, the batch size
or the partitioning.

1. :class:`SamplePass` (every row): the split counts, the stratified choose sample, a
   sample of certify rows for the calibration report, the data fingerprint and summaries.
2. :class:`TemperaturePass` (choose rows): the gradient and curvature of each exit's NLL
   at the current temperature, the sufficient statistics of one Newton step.
3. :class:`CertifyPass` (certify rows): per candidate policy, rows, losses, answers and
   exits per segment value: the certification counts and the expected figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exitwise.calibration.evaluate import ScoredLogs, composite_segments, policy_rows
from exitwise.calibration.exceptions import LogFormatError
from exitwise.calibration.rule import CompiledPolicy, first_exits
from exitwise.calibration.scale.dataset import Chunk, row_keys
from exitwise.calibration.scale.grouped import GroupTable, KeySet
from exitwise.calibration.scale.hashing import (
    SALT_SAMPLE,
    SALT_SPLIT,
    hash_ids,
    mix,
    row_hashes,
    unit_interval,
    value_hashes,
)
from exitwise.calibration.scale.sample import Reservoir, Rows
from exitwise.calibration.tokens import TokenLogs

__all__ = ["ALL_COLUMN", "FIXED", "N_DIS", "N_EXITS", "N_IND", "N_RIGHT", "N_ROWS", "CertifyPass", "SamplePass",
           "SplitSelector", "TemperaturePass", "fixed_sum"]

ALL_COLUMN = ""  # the pseudo segment column of all rows (one level, "")
FIXED = float(1 << 32)  # fixed-point scale of the sums (temperature statistics, compute)


@dataclass(frozen=True)
class SplitSelector:
    """Selects the rows of one split by a hash of their request ids (picklable, for Spark)."""

    seed: int
    choose_fraction: float
    choose: bool  # True: the choose rows; False: the certify rows
    key: str | None = None  # what rows are split by: None the request id, else a group column

    def mask(self, keys: np.ndarray) -> np.ndarray:
        """True for the rows of the chosen split (``keys``: request ids, or group values)."""
        in_choose = unit_interval(hash_ids(keys, self.seed, SALT_SPLIT)) < self.choose_fraction
        return in_choose if self.choose else ~in_choose

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        return self.mask(keys)


def fixed_sum(values: np.ndarray) -> int:
    """The exact sum of ``values`` rounded to multiples of 2**-32, as an integer count of them.

    Each value is rounded on its own and the integers add exactly (split into 32-bit halves),
    so the sum does not depend on how the rows were batched or ordered.
    """
    q = np.rint(np.asarray(values, dtype=np.float64) * FIXED).astype(np.int64)
    hi, lo = q >> np.int64(32), q & np.int64(0xFFFFFFFF)
    return (int(hi.sum()) << 32) + int(lo.sum())


def _row_keys(chunk: Chunk) -> np.ndarray:
    """A 64-bit hash of every column of each row: what the fingerprint adds up and ties break on."""
    logs = chunk.logs
    with np.errstate(over="ignore"):
        if isinstance(logs, TokenLogs):
            h = row_hashes(logs.values) ^ (row_hashes(logs.indices.view(np.float32)) * np.uint64(7))
            h = mix(h ^ row_hashes(logs.lse[:, :, None]) * np.uint64(11))
            if logs.groups is not None and logs.group_levels is not None:
                h = mix(h ^ value_hashes(logs.group_levels[logs.groups]) * np.uint64(13))
            if logs.positions is not None:
                h = mix(h ^ value_hashes(logs.positions) * np.uint64(17))
        else:
            h = row_hashes(logs.logits)
        if logs.request_ids is not None:
            h = mix(h ^ value_hashes(logs.request_ids))
        if logs.labels is not None:
            h = mix(h ^ value_hashes(logs.labels) * np.uint64(3))
        for i, name in enumerate(sorted(logs.segments)):
            col = logs.segments[name]
            level_hash = value_hashes(np.asarray([f"{name}={v}" for v in col.levels], dtype=object))
            h = mix(h ^ level_hash[col.codes] * np.uint64(5 + 2 * i))
        if logs.ts is not None:
            h = mix(h ^ logs.ts.astype("datetime64[us]").astype(np.int64).view(np.uint64))
    return h


def _add_counts(into: dict[str, int], values: np.ndarray, counts: np.ndarray) -> None:
    for v, c in zip(values, counts, strict=True):
        if c:
            into[str(v)] = into.get(str(v), 0) + int(c)


@dataclass(eq=False)
class SamplePass:
    """Pass 1 over every row: split counts per stratum, the samples, the fingerprint and summaries.

    The choose sample is the ``sample_rows`` choose rows of smallest priority, topped up so
    that every stratum (a value of the segment keys) has its ``floor_rows`` smallest too.
    """

    seed: int
    choose_fraction: float
    strata_keys: tuple[str, ...]
    sample_rows: int
    floor_rows: int
    report_rows: int
    group_column: str | None = None  # split and sample whole groups (their value's hash) instead of rows
    rows: int = 0
    choose_counts: dict[str, int] = field(default_factory=dict)
    certify_counts: dict[str, int] = field(default_factory=dict)
    segment_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    fingerprint: int = 0  # sum of row keys mod 2**64
    ts_range: tuple[int, int] | None = None  # microseconds since the epoch
    shape: tuple[int, int, int] | None = None  # (K, C, top-k width: C for a classifier)
    labelled: bool | None = None
    shape_source: str = ""
    sample: Reservoir | None = None
    strata: dict[str, Reservoir] = field(default_factory=dict)
    report: Reservoir | None = None

    choose_groups: KeySet = field(default_factory=KeySet)
    certify_groups: dict[str, KeySet] = field(default_factory=dict)  # per stratum

    def __post_init__(self) -> None:
        grouped = self.group_column is not None
        self.sample = self.sample or Reservoir(self.sample_rows, grouped)
        self.report = self.report or Reservoir(self.report_rows, grouped)

    def _check_shape(self, chunk: Chunk) -> None:
        logs = chunk.logs
        shape = (logs.n_exits, logs.n_classes, logs.top_k if isinstance(logs, TokenLogs) else logs.n_classes)
        if self.shape is None:
            self.shape, self.labelled, self.shape_source = shape, logs.labels is not None, chunk.file
            return
        if shape != self.shape:
            raise LogFormatError(f"{chunk.file}: rows from {chunk.first_row} have {shape[1]} classes at "
                                 f"{shape[0]} exits, {self.shape_source} has {self.shape[1]} at {self.shape[0]}")
        if (logs.labels is not None) != self.labelled:
            have = "has" if logs.labels is not None else "has no"
            raise LogFormatError(f"{chunk.file}: {have} label column, unlike {self.shape_source}: label every "
                                 "file of the dataset or none")

    def update(self, chunk: Chunk) -> None:
        self._check_shape(chunk)
        logs = chunk.logs
        assert self.sample is not None and self.report is not None
        n = logs.n
        self.rows += n
        keys = row_keys(logs, self.group_column)
        choose = SplitSelector(self.seed, self.choose_fraction, True).mask(keys)
        priority = hash_ids(keys, self.seed, SALT_SAMPLE)
        row_keys_ = _row_keys(chunk)
        self.fingerprint = (self.fingerprint + int(row_keys_.sum(dtype=np.uint64))) % (1 << 64)
        codes, levels = composite_segments(logs.segments, self.strata_keys, n)
        for mask, counts in ((choose, self.choose_counts), (~choose, self.certify_counts)):
            _add_counts(counts, np.asarray(levels, dtype=object), np.bincount(codes[mask], minlength=len(levels)))
        for name, col in logs.segments.items():
            _add_counts(self.segment_counts.setdefault(name, {}), np.asarray(col.levels, dtype=object),
                        np.bincount(col.codes, minlength=len(col.levels)))
        if logs.ts is not None and n:
            us = logs.ts.astype("datetime64[us]").astype(np.int64)
            lo, hi = int(us.min()), int(us.max())
            self.ts_range = (lo, hi) if self.ts_range is None else (min(lo, self.ts_range[0]),
                                                                     max(hi, self.ts_range[1]))
        chosen = np.flatnonzero(choose)
        self.sample.offer(logs, chosen, priority, row_keys_)
        if self.floor_rows > 0 and chosen.size:
            level_of = codes[chosen]
            for code in np.unique(level_of):
                stratum = self.strata.setdefault(levels[int(code)],
                                                 Reservoir(self.floor_rows, self.group_column is not None))
                stratum.offer(logs, chosen[level_of == code], priority, row_keys_)
        self.report.offer(logs, np.flatnonzero(~choose), priority, row_keys_)
        if self.group_column is not None:
            group_hash = value_hashes(keys)
            self.choose_groups.add(group_hash[choose])
            for code in np.unique(codes[~choose]):
                mask = ~choose & (codes == code)
                self.certify_groups.setdefault(levels[int(code)], KeySet()).add(group_hash[mask])

    def merge(self, other: SamplePass) -> None:
        assert self.sample is not None and self.report is not None
        assert other.sample is not None and other.report is not None
        if other.shape is not None:
            if self.shape is not None and (other.shape != self.shape or other.labelled != self.labelled):
                raise LogFormatError(f"{other.shape_source}: {other.shape[1]} classes at {other.shape[0]} exits "
                                     f"(labelled: {other.labelled}), {self.shape_source}: {self.shape[1]} classes "
                                     f"at {self.shape[0]} exits (labelled: {self.labelled})")
            if self.shape is None:
                self.shape, self.labelled, self.shape_source = other.shape, other.labelled, other.shape_source
        self.rows += other.rows
        for mine, theirs in ((self.choose_counts, other.choose_counts), (self.certify_counts, other.certify_counts)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for name, counts in other.segment_counts.items():
            mine = self.segment_counts.setdefault(name, {})
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v
        self.fingerprint = (self.fingerprint + other.fingerprint) % (1 << 64)
        if other.ts_range is not None:
            self.ts_range = other.ts_range if self.ts_range is None else (
                min(self.ts_range[0], other.ts_range[0]), max(self.ts_range[1], other.ts_range[1]))
        self.sample.merge(other.sample)
        self.report.merge(other.report)
        for level, res in other.strata.items():
            self.strata.setdefault(level, Reservoir(self.floor_rows, self.group_column is not None)).merge(res)
        self.choose_groups.merge(other.choose_groups)
        for level, keyset in other.certify_groups.items():
            self.certify_groups.setdefault(level, KeySet()).merge(keyset)

    @property
    def n_choose(self) -> int:
        return sum(self.choose_counts.values())

    @property
    def n_certify(self) -> int:
        return sum(self.certify_counts.values())

    def certify_group_counts(self) -> dict[str, int]:
        """Distinct certify groups per stratum (a group whose rows span strata counts in each)."""
        return {level: len(keys) for level, keys in self.certify_groups.items()}

    def n_certify_groups(self) -> int:
        whole = KeySet()
        for keys in self.certify_groups.values():
            whole.merge(keys)
        return len(whole)

    def choose_sample(self) -> Rows | None:
        """The stratified choose sample: the global bottom-k plus each stratum's floor rows beyond it."""
        assert self.sample is not None
        rows = self.sample.rows()
        bound = self.sample.bound
        extra = []
        for level in sorted(self.strata):
            part = self.strata[level].rows()
            if part is None or bound is None:
                continue  # no bound: the global sample holds every choose row already
            beyond = self.sample.beyond(part.priority, part.row_hash)
            if beyond.any():
                extra.append(part.take(np.flatnonzero(beyond)))
        parts = ([rows] if rows is not None else []) + extra
        return Rows.concat(parts) if parts else None

    def report_sample(self) -> Rows | None:
        assert self.report is not None
        return self.report.rows()


@dataclass(eq=False)
class TemperaturePass:
    """Pass 2 over the choose rows: per exit, the NLL's gradient and curvature in beta = 1/T.

    With d_ij = z_ij - max_j z_ij and p = softmax(beta d_i), a row adds
    g_i = E_p[d_i] - d_{i,y_i} and h_i = Var_p[d_i] (float64, class by class, so a row's
    numbers do not depend on its batch), kept as exact fixed-point sums.
    """

    betas: tuple[float | None, ...]  # per exit (None: not refined, e.g. the identity of the final exit)
    target: str  # "labels" or "final"
    rows: int = 0
    grad: list[int] = field(default_factory=list)
    curv: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.grad = self.grad or [0] * len(self.betas)
        self.curv = self.curv or [0] * len(self.betas)

    def update(self, chunk: Chunk) -> None:
        logs = chunk.logs
        z = logs.logits
        n, _, c = z.shape
        if self.target == "labels":
            assert logs.labels is not None
            y = logs.labels
        else:
            y = np.argmax(z[:, -1, :], axis=1)
        rows = np.arange(n)
        self.rows += n
        for k, beta in enumerate(self.betas):
            if beta is None:
                continue
            zk = z[:, k, :].astype(np.float64)
            d = zk - zk.max(axis=1, keepdims=True)
            s0 = np.zeros(n)
            s1 = np.zeros(n)
            s2 = np.zeros(n)
            for j in range(c):
                dj = d[:, j]
                e = np.exp(beta * dj)
                s0 += e
                s1 += dj * e
                s2 += dj * dj * e
            m1 = s1 / s0
            self.grad[k] += fixed_sum(m1 - d[rows, y])
            self.curv[k] += fixed_sum(np.maximum(s2 / s0 - m1 * m1, 0.0))

    def merge(self, other: TemperaturePass) -> None:
        self.rows += other.rows
        self.grad = [a + b for a, b in zip(self.grad, other.grad, strict=True)]
        self.curv = [a + b for a, b in zip(self.curv, other.curv, strict=True)]

    def step(self, k: int) -> tuple[float, float]:
        """(mean gradient, mean curvature) of exit k's NLL in beta."""
        n = max(self.rows, 1)
        return self.grad[k] / FIXED / n, self.curv[k] / FIXED / n


N_ROWS, N_DIS, N_IND, N_RIGHT, N_EXITS = 0, 1, 2, 3, 4  # layout of a count vector; exits from N_EXITS on


@dataclass(eq=False)
class CertifyPass:
    """Pass 3 over the certify rows: what every candidate policy does, per segment value.

    ``counts[column][value]`` is a (P, 4 + K) int64 array: per candidate, [rows, disagreements,
    induced errors, right answers, rows exiting at 0 .. K-1] (column ``""``: all rows; with
    several segment keys also their composite column). ``full_right`` counts right answers
    at full depth. The candidates run through the rule together
    (:func:`~exitwise.calibration.rule.first_exits`).
    """

    policies: tuple[CompiledPolicy, ...]
    calibrators: tuple[Mapping[str, Any], ...]
    score: str
    strata_keys: tuple[str, ...]
    group_column: str | None = None  # also add up losses and compute per group (:class:`GroupTable`)
    labelled: bool = False
    rows: int = 0
    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    full_right: dict[str, dict[str, int]] = field(default_factory=dict)
    groups: GroupTable | None = None
    stratum_levels: dict[int, str] = field(default_factory=dict)  # stratum hash -> value

    def __post_init__(self) -> None:
        if self.group_column is not None and self.groups is None:
            self.groups = GroupTable(len(self.policies), self.labelled)

    @property
    def strata_column(self) -> str:
        return "|".join(self.strata_keys)

    def _columns(self, logs: Any, n: int) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        cols: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {ALL_COLUMN: (np.zeros(n, dtype=np.int64), ("",))}
        for name, col in logs.segments.items():
            cols[name] = (col.codes.astype(np.int64), col.levels)
        if len(self.strata_keys) > 1:
            cols[self.strata_column] = composite_segments(logs.segments, self.strata_keys, n)
        return cols

    def update(self, chunk: Chunk) -> None:
        logs = chunk.logs
        n = logs.n
        self.rows += n
        scored = ScoredLogs.from_logs(logs, self.calibrators, self.score)
        scores, preds = np.asfortranarray(scored.scores), np.asfortranarray(scored.preds)
        k_total = scores.shape[1]
        n_pol = len(self.policies)
        final = scored.final
        y = logs.labels
        cols = self._columns(logs, n)
        exit_at = first_exits(self.policies, scores, preds, policy_rows(self.policies[0], logs.segments, n))
        answer = np.take_along_axis(preds, exit_at, axis=1)  # (n, P)
        flags = {N_DIS: answer != final[:, None]}
        if y is not None:
            right_final = final == y
            flags[N_IND] = (answer != y[:, None]) & right_final[:, None]
            flags[N_RIGHT] = answer == y[:, None]
            for name, (codes, levels) in cols.items():
                _add_counts(self.full_right.setdefault(name, {}), np.asarray(levels, dtype=object),
                            np.bincount(codes[right_final], minlength=len(levels)))
        if self.groups is not None:
            self._add_groups(logs, exit_at, flags, scored.costs)
        cand = np.arange(n_pol)[None, :]
        for name, (codes, levels) in cols.items():
            m = len(levels)
            vec = np.zeros((m, n_pol, N_EXITS + k_total), dtype=np.int64)
            vec[:, :, N_ROWS] = np.bincount(codes, minlength=m)[:, None]
            cell = codes[:, None] * n_pol + cand  # (n, P): (level, candidate)
            for slot, flag in flags.items():
                vec[:, :, slot] = np.bincount(cell[flag], minlength=m * n_pol).reshape(m, n_pol)
            vec[:, :, N_EXITS:] = np.bincount((cell * k_total + exit_at).ravel(),
                                             minlength=m * n_pol * k_total).reshape(m, n_pol, k_total)
            table = self.counts.setdefault(name, {})
            for level, block in zip(levels, vec, strict=True):
                if block[0, N_ROWS]:
                    have = table.get(level)
                    table[level] = block if have is None else have + block

    def _add_groups(self, logs: Any, exit_at: np.ndarray, flags: Mapping[int, np.ndarray], costs: np.ndarray) -> None:
        assert self.groups is not None
        n = logs.n
        codes, levels = composite_segments(logs.segments, self.strata_keys, n)
        level_hash = value_hashes(np.asarray(levels, dtype=object))
        for h, level in zip(level_hash, levels, strict=True):
            self.stratum_levels[int(h)] = level
        cost_fp = np.rint(np.asarray(costs, dtype=np.float64) / float(costs[-1]) * FIXED)
        self.groups.add(value_hashes(row_keys(logs, self.group_column)), level_hash[codes], flags[N_DIS],
                        flags.get(N_IND), cost_fp[exit_at])

    def merge(self, other: CertifyPass) -> None:
        self.rows += other.rows
        if self.groups is not None and other.groups is not None:
            self.groups.merge(other.groups)
        self.stratum_levels.update(other.stratum_levels)
        for name, table in other.counts.items():
            into = self.counts.setdefault(name, {})
            for level, block in table.items():
                have = into.get(level)
                into[level] = block.copy() if have is None else have + block
        for name, right in other.full_right.items():
            into_right = self.full_right.setdefault(name, {})
            for level, v in right.items():
                into_right[level] = into_right.get(level, 0) + v

    def row(self, j: int, column: str, level: str) -> np.ndarray | None:
        """Candidate j's count vector in one segment value (None: no certify rows there)."""
        block = self.counts.get(column, {}).get(level)
        return None if block is None else block[j]

    def losses(self, j: int, column: str, level: str, risk: str) -> tuple[int, int]:
        """(losses, rows) of candidate j in one segment value (column ``""``: all rows)."""
        row = self.row(j, column, level)
        if row is None:
            return 0, 0
        return int(row[N_IND if risk == "induced_error" else N_DIS]), int(row[N_ROWS])


def merge_all(reducers: Sequence[Any]) -> Any:
    """Fold reducers left to right into the first (the engine's merge of partial passes)."""
    first = reducers[0]
    for other in reducers[1:]:
        first.merge(other)
    return first
