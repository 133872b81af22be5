"""Is a policy still keeping its promise? Summaries of shadow traffic and the verdict they support.

Shadow requests run at full depth, so their exit logs show what the policy *would* have done:
the exit it takes, the loss it incurs, the compute it spends. This module turns a batch of such
logs into a :class:`ShadowSummary` — counts and sums only, so summaries of many batches add up
exactly, in any order — and a set of summaries into an :class:`Assessment`:

- **risk**, per constrained segment of the guarantee (``guarantee.segments``), as an anytime-valid
  confidence sequence (:mod:`exitwise.calibration.sequential`) at δ/m for m constrained segments,
  so the verdict's false-alarm rate over every segment and every check is at most δ;
- **compute**: the compute fraction and the exit rate per exit, against ``expected``;
- **calibration drift**: ECE now (equal-width, 15 bins, against the document's calibration
  target) against the ECE the document recorded at certification;
- **input drift**: each exit's score distribution against the reference the solver stored
  (``calibration.reference``: quantile bins of the certify split), as the population stability
  index and a chi-square two-sample test of homogeneity on the same bins.

Verdicts: ``breach`` when the lower end of the risk bound is over ε in any constrained segment;
``watch`` when there is drift (inputs or calibration) without a breach; ``ok`` otherwise. A
realised risk over ε that the bound does not confirm is not a verdict: at a true risk of exactly
ε it would flag half of all healthy policies; the segment's status says ``inconclusive``.
Pure numpy/scipy: the store and the API live in ``exitwise.policies.monitoring``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

from exitwise.calibration.certify import ALL
from exitwise.calibration.evaluate import evaluate
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.rule import exit_scores, score_all_exits
from exitwise.calibration.sequential import RiskBound

__all__ = [
    "RELIABILITY_BINS",
    "Assessment",
    "DriftRules",
    "ShadowSummary",
    "Verdict",
    "assess",
    "constrained_segments",
    "homogeneity_p_value",
    "population_stability_index",
    "score_reference",
    "start_bounds",
    "summarise_shadow",
    "update_bounds",
]

Verdict = Literal["ok", "watch", "breach"]
RELIABILITY_BINS = 15  # equal-width, as the document's calibration.exits[k].after.ece
REFERENCE_BINS = 10
_PSI_FLOOR = 1e-4


# ---------------------------------------------------------------- reference and drift statistics

def score_reference(scores: np.ndarray, bins: int = REFERENCE_BINS) -> dict[str, Any]:
    """``calibration.reference`` of a document: per exit, quantile bin edges of the score and counts.

    ``scores`` is (n, K) on the certify split. Edges are the interior quantiles (ties merged), so
    every bin of the reference holds about n/bins rows; counts are exact.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise InputError(f"score reference needs (n, K) scores with n > 0, got shape {scores.shape}")
    edges, counts = [], []
    for k in range(scores.shape[1]):
        col = scores[:, k]
        e = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)[1:-1]))
        edges.append([float(v) for v in e])
        counts.append([int(v) for v in bin_counts(col, e)])
    return {"bins": "quantiles of the certify split", "n": int(scores.shape[0]), "edges": edges, "counts": counts}


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in the bins (-inf, e0], (e0, e1], …, (e_last, inf)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1)


def population_stability_index(reference: Sequence[float], current: Sequence[float]) -> float:
    """PSI = Σ (q − p) ln(q / p) over bins, proportions floored at 1e-4 (0.1 moderate, 0.25 large shift)."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(current, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p = np.maximum(p / p.sum(), _PSI_FLOOR)
    q = np.maximum(q / q.sum(), _PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def homogeneity_p_value(reference: Sequence[float], current: Sequence[float]) -> float:
    """p-value of the chi-square test that both samples come from one distribution over the bins."""
    table = np.vstack([np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or np.any(table.sum(axis=1) == 0):
        return 1.0
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def _ece(bins: np.ndarray) -> float | None:
    """ECE from summed reliability bins (rows: count, Σ confidence, Σ correct)."""
    count, conf, ok = bins
    n = count.sum()
    if n == 0:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(np.where(count > 0, ok / count - conf / count, 0.0))
    return float(np.sum(count / n * gap))


# ---------------------------------------------------------------- the summary of a batch

def constrained_segments(document: Mapping[str, Any]) -> dict[str, float]:
    """{segment name: ε} of the guarantee (``__all__`` is every row), in the document's order."""
    guarantee = document.get("guarantee") or {}
    segs = guarantee.get("segments") or {}
    out = {name: float(v["eps"]) for name, v in segs.items() if isinstance(v, Mapping) and v.get("eps") is not None}
    if not out and guarantee.get("eps") is not None:
        out[ALL] = float(guarantee["eps"])
    return out


@dataclass(frozen=True)
class ShadowSummary:
    """Counts and sums of shadow rows under one policy; :meth:`merge` adds two exactly.

    ``segments`` maps each constrained segment to [rows, losses] (losses ``None`` when the risk
    cannot be measured, e.g. ``induced_error`` on unlabelled logs); ``score_counts`` (per exit,
    over the reference bins) is ``None`` for documents without a reference; ``reliability`` holds
    per exit three rows of :data:`RELIABILITY_BINS` sums (count, Σ confidence, Σ correct), ``None``
    when the calibration target cannot be formed (labels target, unlabelled logs).
    """

    n: int
    risk: str
    segments: Mapping[str, tuple[int, int | None]]
    exit_counts: tuple[int, ...]
    cost_sum: float
    score_counts: tuple[tuple[int, ...], ...] | None = None
    reliability: tuple[tuple[tuple[float, ...], ...], ...] | None = None

    def merge(self, other: ShadowSummary) -> ShadowSummary:
        """The summary of both batches (same policy)."""
        if self.risk != other.risk or len(self.exit_counts) != len(other.exit_counts):
            raise InputError("shadow summaries of different policies cannot be added")
        segs: dict[str, tuple[int, int | None]] = {}
        for name in dict.fromkeys([*self.segments, *other.segments]):
            a = self.segments.get(name, (0, 0))
            b = other.segments.get(name, (0, 0))
            losses = None if a[1] is None or b[1] is None else a[1] + b[1]
            segs[name] = (a[0] + b[0], losses)
        return ShadowSummary(
            n=self.n + other.n, risk=self.risk, segments=segs,
            exit_counts=tuple(x + y for x, y in zip(self.exit_counts, other.exit_counts, strict=True)),
            cost_sum=self.cost_sum + other.cost_sum,
            score_counts=_add_nested(self.score_counts, other.score_counts),
            reliability=_add_nested(self.reliability, other.reliability),
        )

    @property
    def compute_fraction(self) -> float | None:
        return self.cost_sum / self.n if self.n else None

    @property
    def exit_rate(self) -> list[float] | None:
        return [c / self.n for c in self.exit_counts] if self.n else None

    def ece(self) -> list[float | None] | None:
        if self.reliability is None:
            return None
        return [_ece(np.asarray(r, dtype=np.float64)) for r in self.reliability]

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "risk": self.risk, "segments": {k: list(v) for k, v in self.segments.items()},
                "exit_counts": list(self.exit_counts), "cost_sum": self.cost_sum,
                "score_counts": None if self.score_counts is None else [list(c) for c in self.score_counts],
                "reliability": None if self.reliability is None else [[list(r) for r in e] for e in self.reliability]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShadowSummary:
        sc, rel = data.get("score_counts"), data.get("reliability")
        return cls(
            n=int(data["n"]), risk=str(data["risk"]),
            segments={k: (int(v[0]), None if v[1] is None else int(v[1])) for k, v in data["segments"].items()},
            exit_counts=tuple(int(c) for c in data["exit_counts"]), cost_sum=float(data["cost_sum"]),
            score_counts=None if sc is None else tuple(tuple(int(x) for x in c) for c in sc),
            reliability=None if rel is None else tuple(tuple(tuple(float(x) for x in r) for r in e) for e in rel),
        )


def _add_nested(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    if isinstance(a, tuple | list):
        return tuple(_add_nested(x, y) for x, y in zip(a, b, strict=True))
    return a + b


def _reliability(conf: np.ndarray, correct: np.ndarray) -> tuple[tuple[float, ...], ...]:
    idx = np.clip(np.ceil(conf * RELIABILITY_BINS).astype(np.int64) - 1, 0, RELIABILITY_BINS - 1)
    rows = (np.bincount(idx, minlength=RELIABILITY_BINS).astype(np.float64),
            np.bincount(idx, weights=conf, minlength=RELIABILITY_BINS),
            np.bincount(idx, weights=correct.astype(np.float64), minlength=RELIABILITY_BINS))
    return tuple(tuple(float(x) for x in r) for r in rows)


def summarise_shadow(document: Mapping[str, Any], logs: ExitLogs) -> ShadowSummary:
    """What ``document`` does to these full-depth shadow logs, as addable counts.

    The caller checks that the logs are of the document's model and shape.
    """
    risk = str((document.get("guarantee") or {}).get("risk") or "disagreement")
    measurable = risk != "induced_error" or logs.labels is not None
    ev = evaluate(document, logs, risk=risk if measurable else "disagreement", batch_sizes=(1,))
    keys = list(document.get("segment_keys") or [])
    values = logs.segment_values(keys) if keys else None
    segments: dict[str, tuple[int, int | None]] = {}
    for name in constrained_segments(document):
        mask = np.ones(logs.n, dtype=bool) if name == ALL or values is None else (values == name)
        rows = int(mask.sum())
        segments[name] = (rows, int(ev.loss[mask].sum()) if measurable else None)
    exits = document["exits"]
    calibrators = [e["calibrator"] for e in exits]
    score = str(document.get("score") or "max_prob")
    costs = np.asarray([float(e["cost"]) for e in exits])
    cost_sum = float((costs / costs[-1])[ev.exit].sum())
    k_total = len(exits)
    reference = (document.get("calibration") or {}).get("reference")
    score_counts = None
    if isinstance(reference, Mapping) and len(reference.get("edges") or []) == k_total:
        scores, _ = score_all_exits(logs.logits, calibrators, score)
        score_counts = tuple(tuple(int(c) for c in bin_counts(scores[:, k], reference["edges"][k]))
                             for k in range(k_total))
    target = (document.get("calibration") or {}).get("target", "final")
    reliability = None
    if target != "labels" or logs.labels is not None:
        conf_pred = [exit_scores(logs.logits[:, k, :], calibrators[k], "max_prob") for k in range(k_total)]
        y = logs.labels if target == "labels" else conf_pred[-1][1]
        reliability = tuple(_reliability(conf, pred == y) for conf, pred in conf_pred)
    return ShadowSummary(n=logs.n, risk=risk, segments=segments,
                         exit_counts=tuple(int(c) for c in np.bincount(ev.exit, minlength=k_total)),
                         cost_sum=cost_sum, score_counts=score_counts, reliability=reliability)


# ---------------------------------------------------------------- the verdict

@dataclass(frozen=True)
class DriftRules:
    """When drift puts a policy on ``watch`` (defaults: common practice, see docs/monitoring.md)."""

    psi: float = 0.2                # population stability index over the reference bins
    p_value: float = 0.001          # chi-square homogeneity test, Bonferroni-corrected over exits
    ece_increase: float = 0.05      # ECE now minus ECE at certification
    min_rows: int = 500             # no drift statistic before this many shadow rows


@dataclass(frozen=True)
class Assessment:
    """A verdict with the numbers that justify it (``to_json`` is what the API and the audit record)."""

    verdict: Verdict
    reasons: tuple[str, ...]
    recommendation: str | None
    segments: Mapping[str, RiskBound]
    drift: tuple[Mapping[str, Any], ...]
    n: int
    compute_fraction: float | None
    expected_compute_fraction: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "reasons": list(self.reasons), "recommendation": self.recommendation,
            "n": self.n, "compute_fraction": self.compute_fraction,
            "expected_compute_fraction": self.expected_compute_fraction,
            "segments": {k: {**b.to_json(), "status": _status(b)} for k, b in self.segments.items()},
            "drift": [dict(d) for d in self.drift], **dict(self.extra),
        }


def _status(b: RiskBound) -> str:
    if b.n == 0:
        return "no data"
    if b.breached:
        return "breach"
    return "safe" if b.safe else "inconclusive"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _drift_rows(document: Mapping[str, Any], window: ShadowSummary, rules: DriftRules) -> list[dict[str, Any]]:
    exits = document["exits"]
    k_total = len(exits)
    reference = (document.get("calibration") or {}).get("reference")
    ref_counts = reference.get("counts") if isinstance(reference, Mapping) else None
    cal_exits = (document.get("calibration") or {}).get("exits") or []
    expected_rate = (document.get("expected") or {}).get("exit_rate") or [None] * k_total
    ece_now = window.ece() or [None] * k_total
    rate_now = window.exit_rate or [None] * k_total
    rows = []
    for k in range(k_total):
        row: dict[str, Any] = {"exit": exits[k]["name"], "exit_rate": rate_now[k],
                               "expected_exit_rate": expected_rate[k] if k < len(expected_rate) else None,
                               "psi": None, "p_value": None, "ece": ece_now[k], "ece_certified": None}
        if k < len(cal_exits):
            row["ece_certified"] = ((cal_exits[k] or {}).get("after") or {}).get("ece")
        if ref_counts is not None and window.score_counts is not None and window.n >= rules.min_rows:
            row["psi"] = population_stability_index(ref_counts[k], window.score_counts[k])
            row["p_value"] = homogeneity_p_value(ref_counts[k], window.score_counts[k])
        rows.append(row)
    return rows


def _drift_reasons(rows: Sequence[Mapping[str, Any]], n: int, rules: DriftRules) -> list[str]:
    if n < rules.min_rows:
        return []
    reasons = []
    alpha = rules.p_value / max(len(rows), 1)
    for r in rows:
        if r["psi"] is not None and r["psi"] >= rules.psi and r["p_value"] is not None and r["p_value"] < alpha:
            reasons.append(f"input drift at exit {r['exit']}: score PSI {r['psi']:.3f} >= {rules.psi} "
                           f"(chi-square p = {r['p_value']:.2g})")
        if r["ece"] is not None and r["ece_certified"] is not None \
                and r["ece"] - r["ece_certified"] > rules.ece_increase:
            reasons.append(f"calibration drift at exit {r['exit']}: ECE {r['ece']:.3f} vs "
                           f"{r['ece_certified']:.3f} at certification")
    return reasons


def assess(document: Mapping[str, Any], bounds: Mapping[str, RiskBound], window: ShadowSummary | None,
           total: ShadowSummary | None, rules: DriftRules = DriftRules()) -> Assessment:
    """The verdict from the running risk bounds (every row since activation) and a recent window.

    ``bounds`` are the confidence sequences of the constrained segments; ``window`` the summary
    of the most recent shadow rows (drift), ``total`` of every row since activation (compute).
    """
    breaches = [(name, b) for name, b in bounds.items() if b.breached]
    reasons: list[str] = []
    for name, b in breaches:
        reasons.append(f"risk over budget in segment {name}: {b.losses}/{b.n} = {_pct(b.risk or 0.0)}, "
                       f"lower bound {_pct(b.lower)} > eps {_pct(b.eps)} "
                       f"(e-value {b.e_value:.3g} >= 1/delta = {1 / b.delta:.3g})")
    drift = _drift_rows(document, window, rules) if window is not None else []
    watch = _drift_reasons(drift, window.n if window is not None else 0, rules)
    unmeasured = [] if total is None else [name for name, (rows, losses) in total.segments.items()
                                           if rows > 0 and losses is None]
    verdict: Verdict = "breach" if breaches else ("watch" if watch else "ok")
    reasons += watch
    recommendation = None
    if verdict == "breach":
        recommendation = ("recalibrate on the new logs: the policy breaks its guarantee on current traffic "
                          f"({breaches[0][0]}: at least {_pct(breaches[0][1].lower)} against eps "
                          f"{_pct(breaches[0][1].eps)}); export the shadow logs (`exitwise monitor export`) and "
                          "solve again, or kill the policy until a new one is approved")
    elif verdict == "watch":
        recommendation = ("recalibrate on recent shadow logs before the risk bound crosses eps: the traffic no "
                          "longer looks like the calibration data (" + reasons[0] + ")")
    return Assessment(
        verdict=verdict, reasons=tuple(reasons), recommendation=recommendation, segments=dict(bounds),
        drift=tuple(drift), n=total.n if total is not None else 0,
        compute_fraction=None if total is None else total.compute_fraction,
        expected_compute_fraction=(document.get("expected") or {}).get("compute_fraction"),
        extra={"unmeasured_segments": unmeasured} if unmeasured else {},
    )


def start_bounds(document: Mapping[str, Any]) -> dict[str, RiskBound]:
    """Fresh confidence sequences for the constrained segments, δ split evenly across them."""
    segs = constrained_segments(document)
    delta = float((document.get("guarantee") or {}).get("delta") or 0.05)
    per = delta / max(len(segs), 1)
    return {name: RiskBound.start(eps, per) for name, eps in segs.items()}


def update_bounds(bounds: Mapping[str, RiskBound], batch: ShadowSummary) -> dict[str, RiskBound]:
    """The bounds after one more batch (segments without measurable losses are left as they are)."""
    out = {}
    for name, b in bounds.items():
        rows, losses = batch.segments.get(name, (0, 0))
        out[name] = b.update(rows, losses) if losses is not None else b
    return out
