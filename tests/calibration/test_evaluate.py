"""The evaluator against a straightforward per-sample loop written from the design contract's wording."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitwise.calibration.evaluate import (
    ScoredLogs,
    batch_compute_fraction,
    composite_segments,
    evaluate,
)
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitLogs, ExitSpec, ModelCard, SegmentColumn
from exitwise.calibration.synthetic import synthetic_logs

REGIONS = ("north", "south", "west")


def _logs(rng: np.random.Generator, n: int, k: int, c: int, labels: bool = True) -> ExitLogs:
    card = ModelCard(model="m", exits=tuple(ExitSpec(f"e{i}", float(2 ** i)) for i in range(k)),
                     classes=tuple(f"c{j}" for j in range(c)))
    logits = rng.normal(0, 2.5, size=(n, k, c)).astype(np.float32)
    segs = {"region": SegmentColumn.from_values(rng.choice(REGIONS, size=n)),
            "device": SegmentColumn.from_values(rng.choice(["a", "b"], size=n))}
    y = rng.integers(0, c, size=n) if labels else None
    return ExitLogs(logits=logits, card=card, labels=y, segments=segs)


def _doc(rng: np.random.Generator, k: int, c: int, *, forced_classes=(), forced_segments=(), max_exit=None) -> dict:
    def rows():
        out = []
        for _ in range(k - 1):
            if rng.random() < 0.15:
                out.append(None)
            else:
                out.append([None if rng.random() < 0.2 else float(rng.uniform(0.2, 1.0)) for _ in range(c)])
        return out

    table = {"default": rows(), "north": rows(), "south": None}
    return {
        "exits": [{"name": f"e{i}", "cost": float(2 ** i),
                   "calibrator": {"type": "temperature", "temperature": float(rng.uniform(0.5, 2.0))}}
                  for i in range(k)],
        "classes": [f"c{j}" for j in range(c)],
        "score": "max_prob",
        "segment_keys": ["region"],
        "thresholds": table,
        "forced_full_depth": {"classes": list(forced_classes), "segments": list(forced_segments)},
        "max_exit": max_exit,
        "guarantee": {"risk": "disagreement"},
    }


def _reference(doc: dict, logs: ExitLogs) -> dict:
    """Per-sample loop: exit, answer, losses, compute; then the summaries by plain Python."""
    k_total = len(doc["exits"])
    costs = [e["cost"] for e in doc["exits"]]
    forced = doc["forced_full_depth"]
    regions = logs.segments["region"].values()
    exits, answers, dis, ind, cost = [], [], [], [], []
    for i in range(logs.n):
        seg = regions[i]
        table = doc["thresholds"].get(seg, doc["thresholds"]["default"])
        chosen = k_total - 1
        for k in range(k_total - 1):
            t = doc["exits"][k]["calibrator"]["temperature"]
            z = [float(v) / t for v in logs.logits[i, k]]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            c = int(np.argmax(logs.logits[i, k]))
            score = e[c] / sum(e)
            row = None if table is None else table[k]
            tau = None if row is None else row[c]
            if doc["max_exit"] is not None and k > doc["max_exit"]:
                continue
            if doc["classes"][c] in forced["classes"] or seg in forced["segments"]:
                continue
            if tau is not None and score >= tau:
                chosen = k
                break
        ans = int(np.argmax(logs.logits[i, chosen]))
        final = int(np.argmax(logs.logits[i, k_total - 1]))
        exits.append(chosen)
        answers.append(ans)
        dis.append(int(ans != final))
        y = int(logs.labels[i])
        ind.append(int(ans != y and final == y))
        cost.append(costs[chosen] / costs[-1])
    return {"exit": exits, "answer": answers, "dis": dis, "ind": ind, "cost": cost}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), k=st.integers(2, 4), c=st.integers(2, 5),
       forbid=st.booleans(), max_exit=st.sampled_from([None, 0, 1]))
def test_matches_per_sample_reference(seed, n, k, c, forbid, max_exit):
    rng = np.random.default_rng(seed)
    logs = _logs(rng, n, k, c)
    doc = _doc(rng, k, c, forced_classes=["c0"] if forbid else [], forced_segments=["west"] if forbid else [],
               max_exit=None if max_exit is None else min(max_exit, k - 1))
    ref = _reference(doc, logs)
    for risk, key in (("disagreement", "dis"), ("induced_error", "ind")):
        ev = evaluate(doc, logs, risk=risk)
        assert ev.exit.tolist() == ref["exit"]
        assert ev.answer.tolist() == ref["answer"]
        assert ev.loss.astype(int).tolist() == ref[key]
        assert ev.risk == pytest.approx(np.mean(ref[key]))
        assert ev.disagreement == pytest.approx(np.mean(ref["dis"]))
        assert ev.induced_error == pytest.approx(np.mean(ref["ind"]))
        assert ev.compute_fraction == pytest.approx(np.mean(ref["cost"]))
        assert list(ev.exit_rate) == pytest.approx([ref["exit"].count(j) / n for j in range(k)])
        for b in (1, 8, 32):
            batches = [ref["cost"][s:s + b] for s in range(0, n, b)]
            want = sum(len(x) * max(x) for x in batches) / n
            assert ev.batch_compute_fraction[b] == pytest.approx(want)
            assert ev.batch_compute_fraction[b] >= ev.compute_fraction - 1e-12
        regions = logs.segments["region"].values()
        for value, stats in ev.segments["region"].items():
            idx = [i for i in range(n) if regions[i] == value]
            assert stats.n == len(idx)
            assert stats.compute_fraction == pytest.approx(np.mean([ref["cost"][i] for i in idx]))
            assert stats.risk == pytest.approx(np.mean([ref[key][i] for i in idx]))
        assert set(ev.segments) == {"region", "device"}


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=200), batch=st.integers(1, 64))
def test_batch_compute_is_at_least_per_sample(costs, batch):
    x = np.asarray(costs)
    assert batch_compute_fraction(x, batch) >= x.mean() - 1e-12
    assert batch_compute_fraction(x, 1) == pytest.approx(x.mean())
    assert batch_compute_fraction(x, len(costs)) == pytest.approx(x.max())


def test_json_has_the_design_fields():
    logs = synthetic_logs(500, 3, 4, segments={"region": 3}, seed=3)
    doc = _doc(np.random.default_rng(0), 3, 4)
    ev = evaluate(doc, logs)
    out = ev.to_json()
    for key in ("compute_fraction", "risk", "disagreement", "induced_error", "segments", "batch_compute_fraction",
                "exit_rate"):
        assert key in out
    assert out["risk_type"] == "disagreement" and out["risk"] == out["disagreement"]
    assert set(out["batch_compute_fraction"]) == {"1", "8", "32"}
    seg = out["segments"]["region"]
    assert sum(v["n"] for v in seg.values()) == 500
    assert set(next(iter(seg.values()))) >= {"compute_fraction", "risk", "n"}


def test_induced_error_needs_labels_and_unknown_risk_is_refused():
    rng = np.random.default_rng(1)
    logs = _logs(rng, 20, 3, 3, labels=False)
    doc = _doc(rng, 3, 3)
    with pytest.raises(InputError, match="needs labels"):
        evaluate(doc, logs, risk="induced_error")
    with pytest.raises(InputError, match="unknown risk"):
        evaluate(doc, logs, risk="accuracy")
    ev = evaluate(doc, logs)
    assert ev.induced_error is None and ev.accuracy is None


def test_composite_segments_of_two_keys_are_sorted_names():
    rng = np.random.default_rng(2)
    logs = _logs(rng, 50, 2, 2)
    codes, levels = composite_segments(logs.segments, ("region", "device"), logs.n)
    want = logs.segment_values(["region", "device"])
    assert list(np.asarray(levels, dtype=object)[codes]) == list(want)
    assert list(levels) == sorted(levels)
    with pytest.raises(InputError, match="unknown segment column"):
        composite_segments(logs.segments, ("nope",), logs.n)


def test_scored_take_keeps_rows_in_order():
    logs = synthetic_logs(100, 3, 4, seed=4)
    scored = ScoredLogs.from_logs(logs, [{"type": "identity"}] * 3)
    idx = np.array([5, 1, 77])
    sub = scored.take(idx)
    assert np.array_equal(sub.scores, scored.scores[idx])
    assert np.array_equal(sub.labels, logs.labels[idx])
    assert sub.segments["region"].values().tolist() == logs.segments["region"].values()[idx].tolist()
