"""Benchmark: fit every exit's temperature and compute every metric on large synthetic logs (issue 2).

    .venv/bin/python benchmarks/calibrate.py [--n 1000000] [--exits 12] [--classes 10] [--json]

Generates ``exitwise.calibration.synthetic.synthetic_logs(n, exits, classes)`` (not timed), then times
two workloads, each exit by exit:

* ``all rows``: per exit, fit a TemperatureScaler on all n rows, then compute every metric
  (accuracy, NLL, Brier, ECE equal-width and equal-mass, MCE, reliability data) before
  (identity) and after (temperature) on all n rows;
* ``job``: ``calibrate_logs(logs, "temperature", fit_fraction=0.5)``, what ``exitwise calibrate``
  runs (fit on one half, metrics before/after on the other half).

Wall time is measured without tracing. Peak extra memory is then measured in a second run of
the same workload under ``tracemalloc`` (numpy reports its buffers to it): the peak of traced
allocations made during the workload, i.e. memory beyond the already loaded logs. Targets
(issue 2): < 10 s and < 2x the logits array.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import tracemalloc
from collections.abc import Callable

from exitwise.calibration.calibrate import calibrate_logs, map_exits
from exitwise.calibration.calibrators import TemperatureScaler
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.metrics import exit_metrics_multi
from exitwise.calibration.synthetic import synthetic_logs


def all_rows(logs: ExitLogs, n_jobs: int | None) -> list[float]:
    """Fit each exit on all rows and measure before/after on all rows; returns the temperatures."""

    def one(k: int) -> float:
        z = logs.logits[:, k, :]
        cal = TemperatureScaler().fit(z, logs.labels)
        exit_metrics_multi(z, logs.labels, [None, cal])
        return cal.temperature_

    return map_exits(one, logs.n_exits, n_jobs)


def job(logs: ExitLogs, n_jobs: int | None) -> list[float]:
    result = calibrate_logs(logs, "temperature", fit_fraction=0.5, seed=0, n_jobs=n_jobs)
    return [c.temperature_ for c in result.calibrators]


def measure(fn: Callable[[ExitLogs, int | None], list[float]], logs: ExitLogs, n_jobs: int | None) -> dict:
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    temps = fn(logs, n_jobs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(logs, n_jobs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": wall, "cpu_seconds": cpu, "peak_extra_bytes": float(peak), "temperatures": temps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--exits", type=int, default=12)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=-1, help="threads over exits (-1: all CPUs, 1: serial)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    logs = synthetic_logs(args.n, n_exits=args.exits, n_classes=args.classes, segments={}, seed=args.seed)
    gen = time.perf_counter() - t0
    size = logs.logits.nbytes
    results = {"all rows": measure(all_rows, logs, args.jobs), "job": measure(job, logs, args.jobs)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = {
        "n": args.n, "exits": args.exits, "classes": args.classes, "logits_bytes": size,
        "generation_seconds": gen, "cpus": os.cpu_count(), "load_average_1m": load, "jobs": args.jobs,
        "workloads": {
            name: {
                "seconds": r["seconds"],
                "cpu_seconds": r["cpu_seconds"],
                "peak_extra_bytes": int(r["peak_extra_bytes"]),
                "peak_extra_vs_logits": r["peak_extra_bytes"] / size,
                "temperature_range": [min(r["temperatures"]), max(r["temperatures"])],
            }
            for name, r in results.items()
        },
    }
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"logs: n={args.n:,} K={args.exits} C={args.classes}, logits {size / 2**20:.0f} MiB float32 "
          f"(generated in {gen:.1f} s, not timed); {out['cpus']} CPUs, load average {load:.2f}, "
          f"--jobs {args.jobs}")
    print(f"{'workload':<10} {'wall [s]':>9} {'CPU [s]':>8} {'peak extra [MiB]':>17} {'x logits':>9}"
          "   target: < 10 s, < 2x")
    for name, r in out["workloads"].items():
        print(f"{name:<10} {r['seconds']:>9.2f} {r['cpu_seconds']:>8.2f} {r['peak_extra_bytes'] / 2**20:>17.1f} "
              f"{r['peak_extra_vs_logits']:>9.2f}")
    print("peak extra = tracemalloc peak of allocations during the workload (second, traced run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
