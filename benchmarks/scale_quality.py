"""Benchmark: what the scale engine's hash split and sample cost in policy quality (issue 14).

    .venv/bin/python benchmarks/scale_quality.py suite              # real models: memory vs stream engine
    .venv/bin/python benchmarks/scale_quality.py sample             # sample size sweep on 10^6 synthetic rows

``suite``: on every data set of the benchmark suite (real exit logs, ``benchmarks/suite.json``),
for several seeds, the in-memory solver (seeded permutation split) and the scale engine (hash
split, path on the sample) solve the same request on the calibration logs; both policies are
then applied to the held-out test logs. Reported: mean and standard deviation over the seeds
of the test compute fraction and risk, and how often each was certified.

``sample``: on the 10^6-row synthetic dataset of ``benchmarks/scale.py`` (built there),
``--sample-rows`` from 12,500 to 200,000 for several seeds: the certified compute fraction on
the certify rows and the wall time. The default sample size is read off this table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import build  # noqa: E402  (the dataset of benchmarks/scale.py)
from suite import entries  # noqa: E402  (the suite's data sets)

from exitwise.calibration import load_card, load_logs  # noqa: E402
from exitwise.calibration.evaluate import evaluate  # noqa: E402
from exitwise.calibration.pipeline import SolveSpec  # noqa: E402
from exitwise.calibration.scale.dataset import ArraySource, ParquetDataset  # noqa: E402
from exitwise.calibration.scale.engine import ScaleSettings  # noqa: E402
from exitwise.policies.authoring import solve_policy, solve_policy_at_scale  # noqa: E402


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} ± {sd:.1%}"


def suite(seeds: list[int], eps: float) -> None:
    print(f"| data set | engine | test compute (mean ± sd, {len(seeds)} seeds) | test risk | certified |")
    print("|---|---|---:|---:|---:|")
    for entry in entries():
        card = load_card(ROOT / entry["card"])
        cal = load_logs(ROOT / entry["calibration"], card)
        test = load_logs(ROOT / entry["test"], card)
        results: dict[str, list[dict[str, Any]]] = {"memory": [], "stream": []}
        for seed in seeds:
            spec = SolveSpec(eps=eps, delta=0.05, seed=seed)
            docs = {"memory": solve_policy(cal, spec, baselines=()).document,
                    "stream": solve_policy_at_scale(ArraySource(cal), spec).document}
            for engine, doc in docs.items():
                ev = evaluate(doc, test)
                results[engine].append({"compute": ev.compute_fraction, "risk": ev.risk,
                                        "certified": doc["guarantee"]["certified"]})
        for engine, runs in results.items():
            print(f"| {entry['name']} | {engine} | {_mean_sd([r['compute'] for r in runs])} | "
                  f"{_mean_sd([r['risk'] for r in runs])} | {sum(r['certified'] for r in runs)}/{len(runs)} |",
                  flush=True)


def sample(seeds: list[int], sizes: list[int], data_dir: Path) -> None:
    data = build(data_dir, 1_000_000)
    card = load_card(data_dir / "card.json")
    print(f"| sample rows | certified compute (mean ± sd, {len(seeds)} seeds) | wall (mean) |")
    print("|---:|---:|---:|")
    for size in sizes:
        computes, walls = [], []
        for seed in seeds:
            spec = SolveSpec(eps=0.01, delta=0.05, segment_keys=("segment",), seed=seed)
            t0 = time.perf_counter()
            out = solve_policy_at_scale(ParquetDataset(data, card), spec,
                                        settings=ScaleSettings(sample_rows=size, report_rows=20_000))
            walls.append(time.perf_counter() - t0)
            computes.append(out.result.expected.compute_fraction)
        print(f"| {size:,} | {_mean_sd(computes)} | {statistics.mean(walls):.1f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("suite", "sample"))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--sizes", default="12500,25000,50000,100000,200000")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/exitwise-scale"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.what == "suite":
        suite(seeds, args.eps)
    else:
        sample(seeds, [int(s) for s in args.sizes.split(",")], args.dir)


if __name__ == "__main__":
    main()
