"""Benchmark: wall time and peak memory of solve + certify (issue 3).

    .venv/bin/python benchmarks/solve.py                  # both cases below
    .venv/bin/python benchmarks/solve.py --n 1000000 --exits 12 --classes 10 --segments 8
    .venv/bin/python benchmarks/solve.py --n 100000 --exits 12 --classes 1000 --segments 8

Synthetic logs (``exitwise.calibration.synthetic``) are generated first (not timed). Timed: the whole
of ``exitwise solve`` but reading files and writing the document — split, calibrator fits,
scoring every exit, the family choice by cross-validation and the chosen family's path on the
choose split, fixed-sequence certification on the certify split and the compute-vs-risk curve.
Peak memory is measured with ``tracemalloc`` (numpy reports its buffers to it) over a second,
identical call (it slows the call it watches, so the timed one runs without it), on top of the
logs already in memory, and compared with the size of the logits array. Targets: n = 10^6,
K = 12, C = 10 under 30 s and under 3x the logits; n = 10^5, C = 1000 under 60 s.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from exitwise.calibration.pipeline import SolveSpec, parse_budgets, solve
from exitwise.calibration.synthetic import synthetic_logs

CASES = (
    {"n": 1_000_000, "exits": 12, "classes": 10, "segments": 8, "target_s": 30.0},
    {"n": 100_000, "exits": 12, "classes": 1000, "segments": 8, "target_s": 60.0},
)


def run(n: int, exits: int, classes: int, segments: int, *, eps: float = 0.01, budgets: bool = True,
        seed: int = 0) -> dict[str, float]:
    logs = synthetic_logs(n, exits, classes, segments={"region": segments}, seed=seed)
    spec = SolveSpec(risk="disagreement", eps=eps, delta=0.05, segment_keys=("region",),
                     segment_budgets=parse_budgets(["*=0.02"]) if budgets else ())
    t0, c0 = time.perf_counter(), time.process_time()
    sol = solve(logs, spec)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # peak memory in a second run: tracemalloc slows numpy's many small allocations, so it
    # would inflate the wall time of the first
    tracemalloc.start()
    solve(logs, spec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    logits = logs.logits.nbytes
    return {
        "n": n, "exits": exits, "classes": classes, "segments": segments,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "choose_s": round(sol.timings["choose"], 2),
        "family": sol.family, "path_s": round(sol.timings["path"], 2),
        "certify_s": round(sol.timings["certify"], 2), "curve_s": round(sol.timings["curve"], 2),
        "logits_mb": round(logits / 2**20, 1), "peak_extra_mb": round(peak / 2**20, 1),
        "peak_total_over_logits": round((logits + peak) / logits, 2),
        "path_points": len(sol.path.points), "tested": len(sol.certification.steps),
        "certified": sol.certified,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int)
    ap.add_argument("--exits", type=int, default=12)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--no-budgets", action="store_true", help="only the global constraint (no per-segment budgets)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = [dict(n=args.n, exits=args.exits, classes=args.classes, segments=args.segments, target_s=None)] \
        if args.n else [dict(c) for c in CASES]
    results = []
    for case in cases:
        target = case.pop("target_s")
        res = run(**case, eps=args.eps, budgets=not args.no_budgets)
        res["target_s"] = target
        results.append(res)
        if not args.json:
            print(f"n={res['n']:>9,} K={res['exits']} C={res['classes']:>4} S={res['segments']}: "
                  f"solve+certify {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU "
                  f"(family {res['family']} chosen in {res['choose_s']:.1f}, path {res['path_s']:.1f}, "
                  f"certify {res['certify_s']:.1f}, "
                  f"curve {res['curve_s']:.1f}) | peak {res['peak_extra_mb']:.0f} MB on top of "
                  f"{res['logits_mb']:.0f} MB logits = {res['peak_total_over_logits']:.2f}x logits | "
                  f"{res['path_points']} path points, {res['tested']} tested, certified={res['certified']}"
                  + (f" | target < {target:.0f} s" if target else ""), flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
