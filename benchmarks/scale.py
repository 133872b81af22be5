"""Benchmark: solve + certify from a Parquet dataset larger than memory, on one machine and on Spark (issue 14).

    .venv/bin/python benchmarks/scale.py                        # 10^6 and 10^7 rows, stream and spark
    .venv/bin/python benchmarks/scale.py --rows 1000000 --engines stream   # a quick run

Builds (once; cached under ``--dir``) a synthetic dataset of N rows, K = 12 exits, C = 10
classes, 8 segment values, in hive partitions by day (``day=2026-11-01`` .. 10 days, two
files a day), float32 logits, rows of every segment on every day. Each measurement runs in
a fresh process, the whole of ``exitwise solve --engine E`` but argument parsing: the three
passes (sample; temperatures over the choose rows; certification counts of every path
candidate over the certify rows), the family choice and path on the sample, the document.
Reported: wall time, peak resident memory of the process and of its descendants (summed: the
Spark JVM and its Python workers), rows per second, the choose / certify rows and the policy.
Targets on the 2-core machine: 10^7 rows on one machine in under 2 minutes and 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

K, C, SEGMENTS, DAYS = 12, 10, 8, 10


def card() -> dict[str, Any]:
    return {"model": "scale-bench", "classes": [f"c{i}" for i in range(C)],
            "exits": [{"name": f"block{k}", "cost": float(k + 1)} for k in range(K)],
            "segment_columns": ["segment"]}


def build(root: Path, rows: int) -> Path:
    """The dataset of ``rows`` rows under ``root`` (kept when already complete)."""
    from exitwise.calibration.logfiles.writers import write_logs  # lazy: only the parent process builds
    from exitwise.calibration.synthetic import synthetic_logs  # lazy: as above

    data = root / f"rows={rows}"
    done = data / "_COMPLETE"
    if done.exists():
        return data
    per_day = rows // DAYS
    for d in range(DAYS):
        logs = synthetic_logs(per_day, K, C, segments={"segment": SEGMENTS}, seed=d)
        assert logs.request_ids is not None
        logs = replace(logs, request_ids=logs.request_ids + d * per_day)
        day = data / f"day=2026-11-{d + 1:02d}"
        day.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(logs.n), 2)):
            write_logs(logs.take(part), day / f"part-{i}.parquet")
        print(f"  built {day} ({per_day:,} rows)", file=sys.stderr)
    (root / "card.json").write_text(json.dumps(card()))
    done.write_text("")
    return data


def _descendants_peak_mb() -> int:
    """Sum of the peak resident memory (VmHWM) of this process's living descendants: the Spark JVM and
    its Python workers (they are not waited for, so RUSAGE_CHILDREN does not see them)."""
    parent: dict[int, int] = {}
    peak: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(status.parent.name)
        parent[pid] = int(fields.get("PPid", "0").strip())
        peak[pid] = int(fields.get("VmHWM", "0 kB").split()[0])
    me, total = os.getpid(), 0
    for pid in peak:
        p = parent.get(pid, 0)
        while p and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += peak[pid]
    return round(total / 1024)


def child(engine: str, data: Path, out: Path, master: str | None) -> None:
    """One measured run, in this (fresh) process; prints one JSON line."""
    from exitwise.api.cli.solve_scale import solve_scale  # lazy: measured in the child only
    from exitwise.calibration.logfiles.cards import load_card  # lazy: as above
    from exitwise.calibration.pipeline import SolveSpec  # lazy: as above
    from exitwise.policies.document_files import write_document  # lazy: as above

    card_path = data.parent / "card.json"
    spec = SolveSpec(risk="disagreement", eps=0.01, delta=0.05, segment_keys=("segment",))
    t0 = time.perf_counter()
    outcome = solve_scale(data, load_card(card_path), card_path, spec, engine=engine, where=None,
                          sample_rows=100_000, batch_rows=None, master=master, shadow_rate=0.01,
                          progress=lambda message, fraction: None)
    write_document(outcome.document, out)
    wall = time.perf_counter() - t0
    doc = outcome.document
    g = doc["guarantee"]
    res = outcome.result
    print(json.dumps({
        "engine": engine, "rows": res.data["rows"]["total"], "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "child_peak_rss_mb": max(round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                                 _descendants_peak_mb()),
        "passes": {k: {"rows": int(v["rows"]), "s": round(v["seconds"], 1)} for k, v in res.passes.items()},
        "choose": g["split"]["choose"], "certify": g["split"]["certify"], "sample": g["split"]["sample"],
        "path_points": doc["solver"]["path_length"], "family": doc["solver"]["family"],
        "certified": g["certified"], "upper_bound": g["segments"]["__all__"]["upper_bound"],
        "compute_fraction": round(res.expected.compute_fraction, 4), "content_hash": doc["content_hash"],
    }))


def measure(engine: str, data: Path, master: str | None) -> dict[str, Any]:
    out = data.parent / f"policy-{engine}-{data.name}.json"
    cmd = [sys.executable, __file__, "--child", engine, "--data", str(data), "--out", str(out)]
    if master:
        cmd += ["--master", master]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"engine": engine, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--engines", default="stream,spark")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "exitwise-scale")
    ap.add_argument("--master", default=None, help="Spark master (default local[2])")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.out, args.master)
        return
    results = []
    for rows in args.rows:
        t0 = time.perf_counter()
        data = build(args.dir, rows)
        size = sum(f.stat().st_size for f in data.rglob("*.parquet"))
        print(f"dataset {data}: {rows:,} rows, {size / 2**30:.2f} GiB on disk "
              f"(built or found in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for engine in args.engines.split(","):
            r = measure(engine, data, args.master)
            r["disk_gib"] = round(size / 2**30, 2)
            results.append(r)
            print(json.dumps(r), flush=True)
    by = {(r["engine"], r.get("rows")): r for r in results if "wall_s" in r}
    print("\n| rows | engine | wall | rows/s | peak RSS | descendants' peak RSS | policy compute | same policy |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        if "wall_s" not in r:
            print(f"| | {r['engine']} | failed: {r['error']} | | | | | |")
            continue
        ref = by.get(("stream", r["rows"]))
        same = "—" if ref is None or r is ref else ("yes" if ref["content_hash"] == r["content_hash"] else "NO")
        print(f"| {r['rows']:,} | {r['engine']} | {r['wall_s']:.1f} s | {r['rows'] / r['wall_s']:,.0f} | "
              f"{r['peak_rss_mb']:,} MB | {r['child_peak_rss_mb']:,} MB | {r['compute_fraction']:.1%} | {same} |")
    rows = sorted({r["rows"] for r in results if "wall_s" in r})
    for engine in args.engines.split(","):
        if len(rows) >= 2 and (engine, rows[0]) in by and (engine, rows[-1]) in by:
            a, b = by[(engine, rows[0])], by[(engine, rows[-1])]
            print(f"{engine}: {rows[-1] / rows[0]:.0f}x the rows cost {b['wall_s'] / a['wall_s']:.1f}x the time, "
                  f"{b['peak_rss_mb'] / a['peak_rss_mb']:.1f}x the peak memory")
    for r in rows:
        if ("spark", r) in by and ("stream", r) in by:
            print(f"{r:,} rows: spark local / stream time ratio "
                  f"{by[('spark', r)]['wall_s'] / by[('stream', r)]['wall_s']:.2f}")


if __name__ == "__main__":
    main()
