"""Benchmark: generate synthetic exit logs, write them as wide Parquet, load them back.

Prints wall time and peak memory of each step for n x K x C logits (default 10^6 x 12 x 10,
480 MB of float32). Peak memory is measured in a fresh child process per step
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``), so the numbers do not mix.

    .venv/bin/python benchmarks/load.py [--n 1000000] [--exits 12] [--classes 10]
    .venv/bin/python benchmarks/load.py --n 10000000 --generate-only   # 4.8 GB of logits
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_STEP = r"""
import json, resource, sys, time
import numpy as np
from exitwise.calibration.logfiles.cards import load_card, write_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.summaries import fingerprint
from exitwise.calibration.synthetic import synthetic_logs

step, n, k, c, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if step == "generate":
    t, t_cpu = time.perf_counter(), cpu()
    logs = synthetic_logs(n, k, c, seed=0)
    out["generate_s"], out["generate_cpu_s"] = time.perf_counter() - t, cpu() - t_cpu
    t, t_cpu = time.perf_counter(), cpu()
    if path != "-":
        write_logs(logs, path)
        write_card(logs.card, path + ".card.json")
    out["write_s"], out["write_cpu_s"] = time.perf_counter() - t, cpu() - t_cpu
else:
    card = load_card(path + ".card.json")
    t, t_cpu = time.perf_counter(), cpu()
    logs = load_logs(path, card)
    out["load_s"], out["load_cpu_s"] = time.perf_counter() - t, cpu() - t_cpu
    t, t_cpu = time.perf_counter(), cpu()
    out["fingerprint"] = fingerprint(logs)
    out["fingerprint_s"], out["fingerprint_cpu_s"] = time.perf_counter() - t, cpu() - t_cpu
out["logits_mb"] = logs.logits.nbytes / 1e6
out["baseline_rss_mb"] = base / 1e3
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
print(json.dumps(out))
"""


def _run(step: str, n: int, k: int, c: int, path: Path) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _STEP, step, str(n), str(k), str(c), str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(proc.stdout)
    result["process_wall_s"] = time.perf_counter() - t
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--exits", type=int, default=12)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--generate-only", action="store_true", help="only time the synthetic generator")
    args = parser.parse_args()
    shape = f"{args.n} x {args.exits} x {args.classes}"
    if args.generate_only:
        gen = _run("generate", args.n, args.exits, args.classes, Path("-"))
        extra = (gen["peak_rss_mb"] - gen["baseline_rss_mb"]) / gen["logits_mb"] - 1.0
        print(f"synthetic exit logs {shape} (float32 logits {gen['logits_mb']:.0f} MB)")
        print(f"generate     {gen['generate_s']:6.2f} s wall {gen['generate_cpu_s']:6.2f} s CPU   "
              f"peak RSS {gen['peak_rss_mb']:6.0f} MB "
              f"(extra beyond logits and imports: {extra * 100:.0f}% of the logits)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logs.parquet"
        gen = _run("generate", args.n, args.exits, args.classes, path)
        size_mb = path.stat().st_size / 1e6
        load = _run("load", args.n, args.exits, args.classes, path)
    print(f"exit logs {shape} (float32 logits {gen['logits_mb']:.0f} MB), wide Parquet {size_mb:.0f} MB")
    print(f"generate     {gen['generate_s']:6.2f} s wall {gen['generate_cpu_s']:6.2f} s CPU")
    print(
        f"write        {gen['write_s']:6.2f} s wall {gen['write_cpu_s']:6.2f} s CPU   "
        f"peak RSS {gen['peak_rss_mb']:6.0f} MB (generate + write)"
    )
    print(
        f"load         {load['load_s']:6.2f} s wall {load['load_cpu_s']:6.2f} s CPU   "
        f"peak RSS {load['peak_rss_mb']:6.0f} MB "
        f"(interpreter + imports {load['baseline_rss_mb']:.0f} MB; "
        f"peak minus imports = {(load['peak_rss_mb'] - load['baseline_rss_mb']) / load['logits_mb']:.2f}x the logits)"
    )
    print(
        f"fingerprint  {load['fingerprint_s']:6.2f} s wall {load['fingerprint_cpu_s']:6.2f} s CPU   "
        f"{load['fingerprint'][:23]}..."
    )
    print("(wall time on a shared machine; CPU time counts this process's own work)")


if __name__ == "__main__":
    main()
