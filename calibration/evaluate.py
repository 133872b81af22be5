"""The one evaluator: what a policy does to a set of exit logs.

Given logs (or their per-exit scores, :class:`ScoredLogs`) and a compiled policy, the rule
(:func:`exitwise.calibration.rule.first_exit`) routes every sample; this module turns the routing
into the numbers the design contract defines, vectorised over all samples:

* per-sample 0/1 losses, measured at the exit taken (e = exit, K-1 = last exit)::

      disagreement_i  = [yhat_{i,e} != yhat_{i,K-1}]
      induced_error_i = [yhat_{i,e} != y_i] * [yhat_{i,K-1} == y_i]        (labels needed)

* the compute fraction  CF = (1/n) sum_i cost_{e_i} / cost_{K-1}  (costs are cumulative),
  overall, per segment value, and for synchronised batches of B consecutive samples (in
  log order; the last batch may be partial), where a batch runs until its deepest member
  exits:  CF_B = sum_b |b| max_{i in b} cost_{e_i} / (n cost_{K-1});
* the exit rate per exit;
* with a confidence level 1 - delta, the two-sided Clopper-Pearson interval of every realised
  risk (:func:`risk_interval`), and per constrained segment of a
  policy (``guarantee.segments``) whether the realised risk is over its budget
  (:func:`check_budgets`).

The solver, the certifier, the baselines and ``exitwise evaluate`` all come through here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from exitwise.calibration.certify import ALL
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GroupIndex
from exitwise.calibration.logs import ExitLogs, SegmentColumn
from exitwise.calibration.rule import SEGMENT_SEPARATOR, CompiledPolicy, first_exit, score_all_exits
from exitwise.calibration.sequential import fixed_n_interval
from exitwise.calibration.tokens import TokenLogs
from exitwise.calibration.topk import topk_exit_scores

SEQUENCE_RISKS = ("sequence_disagreement",)  # defined per group: any token of the group disagrees
RISKS = ("disagreement", "induced_error", *SEQUENCE_RISKS)
BATCH_SIZES = (1, 8, 32)


def risk_interval(losses: int, n: int, delta: float) -> tuple[float, float] | None:
    """Two-sided exact binomial (Clopper-Pearson) interval at confidence 1 - delta of the rate of
    ``losses`` in ``n`` rows: [Beta^-1(delta/2; k, n-k+1), Beta^-1(1-delta/2; k+1, n-k)], 0 at
    k = 0 and 1 at k = n (:func:`~exitwise.calibration.sequential.fixed_n_interval`); None when n = 0.
    """
    if n <= 0:
        return None
    lo, hi = fixed_n_interval(n, losses, delta)
    return float(lo), float(hi)


def check_risk(risk: str, has_labels: bool, where: str = "logs") -> None:
    """Raise :class:`InputError` for an unknown risk or ``induced_error`` without labels."""
    if risk not in RISKS:
        raise InputError(f"unknown risk {risk!r}; expected one of {', '.join(RISKS)}")
    if risk == "induced_error" and not has_labels:
        raise InputError(f"{where}: risk 'induced_error' needs labels, but the logs have no label column")


@dataclass(frozen=True, eq=False)
class ScoredLogs:
    """Per-exit scores and answers of every sample under fixed calibrators (computed once).

    ``scores`` (n, K) float64 and ``preds`` (n, K) int64 come from
    :func:`exitwise.calibration.rule.score_all_exits`; ``costs`` are the card's cumulative costs.
    """

    scores: np.ndarray
    preds: np.ndarray
    costs: np.ndarray
    labels: np.ndarray | None = None
    segments: Mapping[str, SegmentColumn] = field(default_factory=dict)
    n_classes: int = 0
    score: str = "max_prob"
    calibrators: tuple[Mapping[str, Any], ...] = ()
    groups: np.ndarray | None = None  # (n,) group code of each row (dependent rows: a sequence)

    @classmethod
    def from_logs(
        cls, logs: ExitLogs | TokenLogs, calibrators: Sequence[Mapping[str, Any]], score: str = "max_prob"
    ) -> ScoredLogs:
        groups = None
        if isinstance(logs, TokenLogs):
            scores, preds = score_token_exits(logs, calibrators, score)
            groups = logs.groups
        else:
            scores, preds = score_all_exits(logs.logits, calibrators, score)
        return cls(scores=scores, preds=preds, costs=logs.card.costs, labels=logs.labels,
                   segments=dict(logs.segments), n_classes=logs.n_classes, score=score,
                   calibrators=tuple(calibrators), groups=groups)

    @property
    def n(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.scores.shape[1])

    @property
    def final(self) -> np.ndarray:
        """The last exit's answer per sample."""
        return self.preds[:, -1]

    def take(self, index: np.ndarray) -> ScoredLogs:
        """A subset of rows (a split), keeping everything else."""
        return ScoredLogs(
            scores=self.scores[index], preds=self.preds[index], costs=self.costs,
            labels=None if self.labels is None else self.labels[index],
            segments={k: v.take(index) for k, v in self.segments.items()},
            n_classes=self.n_classes, score=self.score, calibrators=self.calibrators,
            groups=None if self.groups is None else self.groups[index],
        )

    def loss_matrix(self, risk: str) -> np.ndarray:
        """(n, K) bool: the loss a sample would incur if it exited at exit k."""
        check_risk(risk, self.labels is not None)
        wrong_vs_final = self.preds != self.final[:, None]
        if risk in ("disagreement", *SEQUENCE_RISKS):  # a sequence's risk is built from its tokens' losses
            return wrong_vs_final
        y = self.labels
        return (self.preds != y[:, None]) & (self.final == y)[:, None]

    def segment_codes(self, keys: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
        """Composite segment code per sample and the composite levels (sorted) for ``keys``."""
        return composite_segments(self.segments, keys, self.n)


def score_token_exits(logs: TokenLogs, calibrators: Sequence[Mapping[str, Any]], score: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Scores and answers (n, K) of token-level logs: the rule's top-k scores, the top token."""
    scores = np.empty((logs.n, logs.n_exits), dtype=np.float64)
    for k in range(logs.n_exits):
        scores[:, k] = topk_exit_scores(logs.values[:, k], logs.lse[:, k], logs.vocab_size, calibrators[k], score)
    return scores, logs.indices[:, :, 0].astype(np.int64)


def composite_segments(
    segments: Mapping[str, SegmentColumn], keys: Sequence[str], n: int
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Codes (n,) int64 into the sorted composite values ``"a|b"`` of ``keys`` that occur.

    Works on the integer codes, so it stays fast for 10^7 rows. With no keys every sample
    is in the one level ``""``.
    """
    for key in keys:
        if key not in segments:
            raise InputError(f"unknown segment column {key!r}; available: {sorted(segments) or 'none'}")
    if not keys:
        return np.zeros(n, dtype=np.int64), ("",)
    combined = np.zeros(n, dtype=np.int64)
    for key in keys:
        col = segments[key]
        combined = combined * len(col.levels) + col.codes
    uniq, codes = np.unique(combined, return_inverse=True)
    names = []
    for value in uniq:
        parts = []
        rem = int(value)
        for key in reversed(keys):
            levels = segments[key].levels
            parts.append(levels[rem % len(levels)])
            rem //= len(levels)
        names.append(SEGMENT_SEPARATOR.join(reversed(parts)))
    order = np.argsort(np.asarray(names, dtype=object).astype(str), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[codes.ravel()].astype(np.int64), tuple(names[i] for i in order)


def policy_rows(policy: CompiledPolicy, segments: Mapping[str, SegmentColumn], n: int) -> np.ndarray:
    """Row of ``policy.thresholds`` per sample: the rule's segment lookup (unknown -> default)."""
    keys = policy.segment_keys
    if not keys or not policy.segment_index:
        return np.zeros(n, dtype=np.intp)
    missing = [k for k in keys if k not in segments]
    if missing:
        raise InputError(f"the policy segments on {list(keys)}, but the logs have no column {missing[0]!r}")
    codes, levels = composite_segments(segments, keys, n)
    lookup = np.array([policy.segment_index.get(v, 0) for v in levels], dtype=np.intp)
    return lookup[codes]


@dataclass(frozen=True)
class SegmentStats:
    """Compute and risk of one segment value (or of all rows: :attr:`Evaluation.overall`).

    ``losses`` counts the rows with each loss the logs can measure (``induced_error`` only with
    labels); ``risk`` is ``losses[risk_type] / n``.
    """

    n: int
    compute_fraction: float
    risk: float
    disagreement: float
    induced_error: float | None
    risk_type: str
    losses: Mapping[str, int]

    def interval(self, delta: float, risk: str | None = None) -> tuple[float, float] | None:
        """Clopper-Pearson interval at confidence 1 - delta of ``risk`` (default: the evaluated one).

        None when the logs cannot measure that risk (no labels) or there are no rows.
        """
        k = self.losses.get(risk or self.risk_type)
        return None if k is None else risk_interval(k, self.n, delta)

    def to_json(self, delta: float | None = None) -> dict[str, Any]:
        """Plain JSON; ``risk_interval`` is ``[lo, hi]`` at confidence 1 - ``delta`` (None without one)."""
        ci = None if delta is None else self.interval(delta)
        return {"n": self.n, "compute_fraction": self.compute_fraction, "risk": self.risk,
                "disagreement": self.disagreement, "induced_error": self.induced_error,
                "losses": self.losses.get(self.risk_type), "risk_interval": None if ci is None else list(ci)}


@dataclass(frozen=True, eq=False)
class Evaluation:
    """What a policy does to a set of logs: per-sample arrays and their summaries."""

    risk_type: str
    n: int
    compute_fraction: float
    risk: float
    disagreement: float
    induced_error: float | None
    exit_rate: tuple[float, ...]
    batch_compute_fraction: Mapping[int, float]
    segments: Mapping[str, Mapping[str, SegmentStats]]
    accuracy: float | None
    full_depth_accuracy: float | None
    exit: np.ndarray
    answer: np.ndarray
    loss: np.ndarray
    losses: Mapping[str, int]
    delta: float | None = None
    groups: Mapping[str, Any] | None = None  # group-level figures (dependent rows), see group_summary

    @property
    def overall(self) -> SegmentStats:
        """All rows as one segment (what the ``__all__`` budget is checked on)."""
        return SegmentStats(n=self.n, compute_fraction=self.compute_fraction, risk=self.risk,
                            disagreement=self.disagreement, induced_error=self.induced_error,
                            risk_type=self.risk_type, losses=self.losses)

    def with_delta(self, delta: float | None) -> Evaluation:
        """The same evaluation with its intervals at confidence 1 - ``delta``."""
        return replace(self, delta=delta)

    def to_json(self) -> dict[str, Any]:
        """The ``evaluate --json`` object (design contract): plain JSON types only.

        ``risk_interval`` (overall and per segment value) is the two-sided Clopper-Pearson
        interval at confidence 1 - ``delta`` (None when the evaluation has no ``delta``).
        """
        overall = self.overall.to_json(self.delta)
        return {
            "n": self.n,
            "risk_type": self.risk_type,
            "compute_fraction": self.compute_fraction,
            "risk": self.risk,
            "losses": overall["losses"],
            "delta": self.delta,
            "risk_interval": overall["risk_interval"],
            "disagreement": self.disagreement,
            "induced_error": self.induced_error,
            "accuracy": self.accuracy,
            "full_depth_accuracy": self.full_depth_accuracy,
            "exit_rate": list(self.exit_rate),
            "batch_compute_fraction": {str(b): v for b, v in self.batch_compute_fraction.items()},
            "segments": {col: {v: s.to_json(self.delta) for v, s in vals.items()}
                         for col, vals in self.segments.items()},
            **({"groups": dict(self.groups)} if self.groups is not None else {}),
        }

    def segment_summary(self, column: str) -> dict[str, dict[str, Any]]:
        """``{value: {compute_fraction, risk, n}}`` of one column, for the policy document."""
        return {v: {"compute_fraction": s.compute_fraction, "risk": s.risk, "n": s.n}
                for v, s in self.segments.get(column, {}).items()}


def batch_compute_fraction(exit_cost: np.ndarray, batch: int) -> float:
    """CF_B: consecutive batches of ``batch`` samples, each costing its deepest member."""
    n = exit_cost.shape[0]
    if n == 0:
        return float("nan")
    if batch <= 1:
        return float(exit_cost.mean())
    starts = np.arange(0, n, batch)
    sizes = np.diff(np.append(starts, n))
    return float((np.maximum.reduceat(exit_cost, starts) * sizes).sum() / n)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def summarise(
    exit_at: np.ndarray,
    scored: ScoredLogs,
    risk: str,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    extra_segments: Mapping[str, tuple[np.ndarray, tuple[str, ...]]] | None = None,
    delta: float | None = None,
) -> Evaluation:
    """Evaluate given exit indices (n,): any routing, including non-threshold oracles.

    ``delta``: the intervals of :meth:`Evaluation.to_json` are at confidence 1 - delta.
    """
    check_risk(risk, scored.labels is not None)
    n, k_total = scored.scores.shape
    exit_at = np.asarray(exit_at, dtype=np.int64)
    rows = np.arange(n)
    answer = scored.preds[rows, exit_at]
    final = scored.final
    disagree = answer != final
    induced = None
    acc = full_acc = None
    if scored.labels is not None:
        y = scored.labels
        right_final = final == y
        induced = (answer != y) & right_final
        acc, full_acc = _mean(answer == y), _mean(right_final)
    loss = induced if risk == "induced_error" else disagree
    row_risk = "disagreement" if risk in SEQUENCE_RISKS else risk  # a sequence risk's rows: token disagreement
    cost = (scored.costs / scored.costs[-1])[exit_at]
    exit_rate = np.bincount(exit_at, minlength=k_total) / max(n, 1)
    columns: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {
        name: (col.codes, col.levels) for name, col in scored.segments.items()
    }
    columns.update(extra_segments or {})
    measured = {"disagreement": disagree} if induced is None else {"disagreement": disagree, "induced_error": induced}
    segments: dict[str, dict[str, SegmentStats]] = {}
    for name, (codes, levels) in columns.items():
        m = len(levels)
        counts = np.bincount(codes, minlength=m)
        cost_sum = np.bincount(codes, weights=cost, minlength=m)
        lost = {key: np.bincount(codes, weights=arr, minlength=m).round().astype(np.int64)
                for key, arr in measured.items()}
        out: dict[str, SegmentStats] = {}
        for j, level in enumerate(levels):
            cnt = int(counts[j])
            if cnt == 0:
                continue
            k = {key: int(v[j]) for key, v in lost.items()}
            out[level] = SegmentStats(
                n=cnt, compute_fraction=float(cost_sum[j] / cnt), risk=k[row_risk] / cnt,
                disagreement=k["disagreement"] / cnt,
                induced_error=None if induced is None else k["induced_error"] / cnt,
                risk_type=risk, losses=k,
            )
        segments[name] = out
    return Evaluation(
        risk_type=risk, n=n, compute_fraction=_mean(cost), risk=_mean(loss), disagreement=_mean(disagree),
        induced_error=None if induced is None else _mean(induced),
        exit_rate=tuple(float(r) for r in exit_rate),
        batch_compute_fraction={int(b): batch_compute_fraction(cost, int(b)) for b in batch_sizes},
        segments=segments, accuracy=acc, full_depth_accuracy=full_acc,
        exit=exit_at, answer=answer, loss=loss,
        losses={key: int(np.count_nonzero(arr)) for key, arr in measured.items()}, delta=delta,
        groups=None if scored.groups is None else group_summary(scored.groups, disagree, induced, cost, delta),
    )


def group_summary(groups: np.ndarray, disagree: np.ndarray, induced: np.ndarray | None, cost: np.ndarray,
                  delta: float | None) -> dict[str, Any]:
    """Figures per group (a sequence): how many, the mean over groups of their token disagreement
    (and induced error) rate, the share of groups with any disagreeing token
    (``sequence_disagreement``; 1 - it is the share answered exactly as at full depth) with its
    Clopper-Pearson interval at 1 - delta, and the mean per-group compute fraction."""
    index = GroupIndex.from_values(groups)
    g = index.n_groups
    any_dis = index.any(disagree)
    out: dict[str, Any] = {
        "n": int(g),
        "mean_disagreement": float(index.mean(disagree).mean()) if g else None,
        "sequence_disagreement": float(any_dis.mean()) if g else None,
        "sequences_with_disagreement": int(any_dis.sum()),
        "compute_fraction": float(index.mean(cost).mean()) if g else None,
        "sequence_disagreement_interval": (None if delta is None or not g
                                           else list(risk_interval(int(any_dis.sum()), g, delta) or ())),
    }
    if induced is not None:
        out["mean_induced_error"] = float(index.mean(induced).mean())
    return out


def route_scored(policy: CompiledPolicy, scored: ScoredLogs) -> np.ndarray:
    """Exit index per sample under ``policy`` (the rule on precomputed scores)."""
    if policy.n_exits != scored.n_exits or policy.n_outputs != scored.n_classes:
        raise InputError(
            f"the policy has {policy.n_exits} exits and {policy.n_outputs} classes, "
            f"the logs {scored.n_exits} and {scored.n_classes}"
        )
    rows = policy_rows(policy, scored.segments, scored.n)
    return first_exit(policy, scored.scores, scored.preds, rows).exit


def evaluate_scored(
    policy: CompiledPolicy, scored: ScoredLogs, risk: str, *, batch_sizes: Sequence[int] = BATCH_SIZES,
    delta: float | None = None,
) -> Evaluation:
    """Evaluate ``policy`` on logs already scored with the policy's calibrators and score."""
    extra = None
    if len(policy.segment_keys) > 1:
        extra = {SEGMENT_SEPARATOR.join(policy.segment_keys): scored.segment_codes(policy.segment_keys)}
    return summarise(route_scored(policy, scored), scored, risk, batch_sizes=batch_sizes, extra_segments=extra,
                     delta=delta)


def evaluate(
    policy: CompiledPolicy | Mapping[str, Any],
    logs: ExitLogs,
    *,
    risk: str | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    delta: float | None = None,
) -> Evaluation:
    """Apply a policy (document or compiled) to full-depth logs and measure compute and risk.

    ``risk`` and ``delta`` (the intervals' confidence is 1 - delta) default to the document's
    ``guarantee.risk`` and ``guarantee.delta``; ``risk`` must be given for a compiled policy.
    """
    if isinstance(policy, Mapping):
        if risk is None:
            risk = (policy.get("guarantee") or {}).get("risk")
        if delta is None:
            delta = (policy.get("guarantee") or {}).get("delta")
        doc_classes = policy.get("classes")
        if policy.get("vocabulary") is not None:
            if int(policy["vocabulary"].get("size", -1)) != logs.n_classes:
                raise InputError(f"{logs.source}: the policy's vocabulary has {policy['vocabulary'].get('size')} "
                                 f"tokens, the logs {logs.n_classes}")
        elif doc_classes is not None and len(doc_classes) != logs.n_classes:
            raise InputError(f"{logs.source}: the policy has {len(doc_classes)} classes, the logs {logs.n_classes}")
        try:
            policy = CompiledPolicy.from_document(policy)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"policy cannot be compiled: {exc}") from None
    if risk is None:
        raise InputError("evaluate: the risk to measure must be given for a compiled policy")
    check_risk(risk, logs.labels is not None, logs.source)
    if policy.n_exits != logs.n_exits:
        raise InputError(f"{logs.source}: the policy has {policy.n_exits} exits, the logs {logs.n_exits}")
    scored = ScoredLogs.from_logs(logs, policy.calibrators, policy.score)
    return evaluate_scored(policy, scored, risk, batch_sizes=batch_sizes, delta=delta)


@dataclass(frozen=True)
class BudgetCheck:
    """One constrained segment of a policy against its risk budget on a set of logs.

    ``segment`` is ``__all__`` (all traffic, budget ``guarantee.eps``) or a segment value of
    the policy's ``segment_keys`` (composite values joined with ``|``) with its own ``eps``.
    ``losses`` is None when the logs cannot measure ``risk_type`` (``induced_error`` without
    labels). ``status``: ``over`` (realised risk > eps), ``under``, ``no rows`` (the logs have
    none of the segment) or ``unmeasured``; ``significantly_over``: even the interval's lower
    bound is above eps (a one-sided exact test at level delta/2 rejects risk <= eps).
    """

    segment: str
    eps: float
    risk_type: str
    n: int
    losses: int | None
    delta: float

    @property
    def risk(self) -> float | None:
        return None if self.losses is None or self.n == 0 else self.losses / self.n

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.losses is None else risk_interval(self.losses, self.n, self.delta)

    @property
    def status(self) -> str:
        risk = self.risk
        if risk is None:
            return "no rows" if self.n == 0 else "unmeasured"
        return "over" if risk > self.eps else "under"

    @property
    def over(self) -> bool:
        return self.status == "over"

    @property
    def significantly_over(self) -> bool:
        ci = self.interval
        return ci is not None and ci[0] > self.eps

    def to_json(self) -> dict[str, Any]:
        ci = self.interval
        return {"eps": self.eps, "n": self.n, "losses": self.losses, "risk": self.risk,
                "risk_interval": None if ci is None else list(ci), "status": self.status,
                "significantly_over": self.significantly_over}


def check_budgets(ev: Evaluation, document: Mapping[str, Any], delta: float | None = None) -> tuple[BudgetCheck, ...]:
    """Every constrained segment of ``document`` (``__all__`` first) against its budget on ``ev``.

    The budgets are on the document's ``guarantee.risk``, whatever risk ``ev`` reports (both
    are counted); the intervals are at confidence 1 - ``delta`` (default: ``ev.delta``, then
    ``guarantee.delta``). ``ev`` must come from :func:`evaluate` of this document.
    """
    g = document.get("guarantee") or {}
    if "risk" not in g or "eps" not in g:
        raise InputError("the policy has no guarantee (risk and eps) to check budgets against")
    risk = g["risk"]
    check_risk(risk, True)
    delta = next((d for d in (delta, ev.delta, g.get("delta")) if d is not None), None)
    if delta is None:
        raise InputError("a confidence level (delta) is needed for the budget intervals")
    keys = list(document.get("segment_keys") or ())
    values = ev.segments.get(SEGMENT_SEPARATOR.join(keys), {}) if keys else {}
    segments = g.get("segments") or {}
    budgets = {ALL: float((segments.get(ALL) or {}).get("eps", g["eps"]))}
    budgets.update({name: float(s["eps"]) for name, s in sorted(segments.items()) if name != ALL})
    out = []
    for name, eps in budgets.items():
        stats = ev.overall if name == ALL else values.get(name)
        n = 0 if stats is None else stats.n
        losses = None if stats is None else stats.losses.get(risk)
        out.append(BudgetCheck(segment=name, eps=eps, risk_type=risk, n=n, losses=losses, delta=float(delta)))
    return tuple(out)
