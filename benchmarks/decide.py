"""Benchmark: the runtime decision on a batch against one exit-head matmul (issue 5, (a)).

    .venv/bin/python benchmarks/decide.py [--n 1024] [--classes 10] [--hidden 768] [--repeat 2000]

Times ``RuntimePolicy.decide`` (the client's entry point, i.e. ``exitwise.calibration.rule.decide``)
on an (n, C) float32 logits batch for every score and calibrator type, and the reference
cost of computing those logits: one (n, hidden) @ (hidden, C) float32 matmul, the exit head.
Target: the decision costs less than the matmul. Prints a table and, with ``--json``, one
JSON object. Each figure is the median of ``--repeat`` single calls (robust to the spikes of a
machine shared with other work), with the 10th percentile beside it. BLAS threads follow the
environment; ``OPENBLAS_NUM_THREADS=1`` gives the single-core reference, which is the fair one
when a server runs one request per core.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np

from exitwise.calibration.rule import CompiledPolicy
from exitwise.policies.runtime import RuntimePolicy


def _policy(k: int, c: int, score: str, calibrator: dict, segments: int) -> RuntimePolicy:
    rng = np.random.default_rng(1)
    rows = lambda: [[float(v) for v in rng.uniform(0.5, 0.95, size=c)] for _ in range(k - 1)]  # noqa: E731
    table = {"default": rows()} | {f"seg{i}": rows() for i in range(segments)}
    doc = {
        "exits": [{"name": f"e{i}", "cost": float(i + 1), "calibrator": calibrator} for i in range(k)],
        "classes": [f"c{i}" for i in range(c)],
        "score": score,
        "segment_keys": ["region"] if segments else [],
        "thresholds": table,
        "forced_full_depth": {"classes": ["c3"], "segments": []},
    }
    compiled = CompiledPolicy.from_document(doc)
    return RuntimePolicy(compiled=compiled, document=doc, source="server")


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, 10th percentile) of ``repeat`` single-call times, in seconds, after a warm-up."""
    for _ in range(min(50, repeat)):
        fn()
    singles = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        singles[i] = time.perf_counter() - t0
    return float(np.median(singles)), float(np.percentile(singles, 10))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--exits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    n, c, h = args.n, args.classes, args.hidden
    x = rng.standard_normal((n, h), dtype=np.float32)
    w = (rng.standard_normal((h, c), dtype=np.float32) / np.sqrt(h)).astype(np.float32)
    b = np.zeros(c, dtype=np.float32)
    logits = (x @ w + b) * 4.0
    out = np.empty((n, c), dtype=np.float32)

    def head() -> None:
        np.matmul(x, w, out=out)

    matmul_med, matmul_p10 = _time(head, args.repeat)
    segs = rng.choice([f"seg{i}" for i in range(8)] + ["unknown"], size=n).astype(object)
    cases = [
        ("max_prob", {"type": "temperature", "temperature": 1.3}, None),
        ("max_prob", {"type": "identity"}, None),
        ("margin", {"type": "temperature", "temperature": 1.3}, None),
        ("entropy", {"type": "temperature", "temperature": 1.3}, None),
        ("max_prob", {"type": "platt", "coef": [0.8, 1.1, 0.5], "intercept": -0.2}, None),
        ("max_prob", {"type": "temperature", "temperature": 1.3}, segs),
    ]
    results = []
    for score, cal, seg in cases:
        policy = _policy(args.exits, c, score, cal, 8 if seg is not None else 0)
        med, p10 = _time(lambda p=policy, s=seg: p.decide(0, logits, s), args.repeat)
        results.append({
            "score": score, "calibrator": cal["type"], "segments": seg is not None,
            "us_per_call": med * 1e6, "us_per_call_p10": p10 * 1e6, "ns_per_sample": med * 1e9 / n,
            "ratio_to_matmul": med / matmul_med, "below_matmul": med < matmul_med,
        })
    report = {
        "batch": n, "classes": c, "hidden": h, "numpy": np.__version__, "cpus": os.cpu_count(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"), "load_average": os.getloadavg(),
        "matmul_us_per_call": matmul_med * 1e6, "matmul_us_per_call_p10": matmul_p10 * 1e6,
        "matmul_ns_per_sample": matmul_med * 1e9 / n, "decide": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"batch {n} x {c} classes (float32), numpy {np.__version__}, {os.cpu_count()} cpus, BLAS threads "
          f"{report['blas_threads']}, load average {os.getloadavg()[0]:.1f}; median (p10) of {args.repeat} calls")
    print(f"reference: exit head {n}x{h} @ {h}x{c} matmul  {matmul_med * 1e6:8.1f} us/call "
          f"({matmul_p10 * 1e6:.1f})  {matmul_med * 1e9 / n:6.1f} ns/sample")
    print(f"{'score':9} {'calibrator':11} {'segments':8} {'us/call':>9} {'(p10)':>9} "
          f"{'ns/sample':>10} {'x matmul':>9}")
    for r in results:
        print(f"{r['score']:9} {r['calibrator']:11} {r['segments']!s:8} {r['us_per_call']:9.1f} "
              f"{r['us_per_call_p10']:9.1f} {r['ns_per_sample']:10.1f} {r['ratio_to_matmul']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
