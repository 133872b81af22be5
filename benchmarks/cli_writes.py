"""Benchmark: wall time of the CLI's write commands, and how long MLflow takes to catch up (issue 15).

    .venv/bin/python benchmarks/cli_writes.py [--repeat 3] [--modes off,on,wait] [--json]

Runs the installed ``exitwise`` console script as an operator would: ``policy create``,
``policy approve`` (which also writes the approval report), ``policy activate``, ``policy kill``
and ``policy unkill`` of a solved policy (solved once from synthetic logs, not timed), one model
per round, once per ``EXITWISE_MLFLOW_SYNC`` mode, each mode in its own fresh data directory
(SQLite store, embedded MLflow store ``<data dir>/mlflow.db``): ``off`` (no mirror: the floor of
process start, imports and one transaction), ``on`` (the default: a detached child mirrors after
the commit) and ``wait`` (the mirror inline: the behaviour before issue 15). Modes take turns
within each round, so a shared machine's load falls on all of them. For each command: the wall
time of its process, start to exit, then how long until the store marks nothing pending for
MLflow (polled every 0.1 s in this process), then 2 s more for the mirror child to exit,
before the next command starts. Median and max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from exitwise.calibration.pipeline import SolveSpec
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies.authoring import solve_policy
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import make_engine, unit_of_work
from exitwise.policies.mlflow.config import mlflow_config
from exitwise.policies.mlflow.sync import pending_models

EXE = str(Path(sys.executable).with_name("exitwise"))
STEPS = ("create", "approve", "activate", "kill", "unkill")
SETTLE = 2.0  # seconds between a command (and its mirror) and the next command


def _run(env: dict[str, str], *args: str) -> tuple[float, str]:
    """Run ``exitwise ARGS``; (wall seconds, stdout); raises with stderr when it fails."""
    t0 = time.perf_counter()
    out = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"exitwise {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return elapsed, out.stdout


def _document(model: str, base: dict[str, Any]) -> dict[str, Any]:
    doc = {k: v for k, v in base.items() if k != "content_hash"}
    doc["model"] = {**doc["model"], "name": model}
    return with_content_hash(doc)


class Store:
    """One fresh data directory (SQLite store, embedded MLflow) with an author and an approver."""

    def __init__(self, root: Path, mode: str):
        self.mode, self.data = mode, root / mode
        self.env = {**os.environ, "EXITWISE_DATA_DIR": str(self.data), "EXITWISE_MLFLOW_SYNC": mode}
        for key in ("EXITWISE_DATABASE_URL", "EXITWISE_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            self.env.pop(key, None)
        _run(self.env, "db", "upgrade")
        admin = _run(self.env, "principal", "add", "admin", "--role", "admin", "--quiet")[1].strip()
        self.tok = {name: json.loads(_run(self.env, "principal", "add", name, "--role", role, "--token", admin,
                                          "--json")[1])["token"] for name, role in (("alice", "author"),
                                                                                    ("bob", "approver"))}
        self.engine = make_engine(f"sqlite:///{self.data / 'exitwise.db'}")
        self.config = mlflow_config(self.data)

    def caught_up(self, limit: float = 120.0) -> float | None:
        """Seconds until nothing is pending for MLflow, polled every 0.1 s (None: not within ``limit``)."""
        if self.mode == "off":
            return None
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit:
            with unit_of_work(self.engine, readonly=True) as s:
                if not pending_models(session=s, config=self.config):
                    return time.perf_counter() - t0
            time.sleep(0.1)
        return None

    def round(self, model: str, path: Path) -> dict[str, tuple[float, float | None]]:
        """The five writes of one model: {step: (wall seconds, MLflow lag seconds)}."""
        a, b = self.tok["alice"], self.tok["bob"]
        commands = {
            "create": ("policy", "create", str(path), "--token", a),
            "approve": ("policy", "approve", model, "1", "-r", "bench", "--token", b),
            "activate": ("policy", "activate", model, "1", "--env", "production", "-r", "bench", "--token", b),
            "kill": ("policy", "kill", model, "--env", "production", "-r", "bench", "--token", a),
            "unkill": ("policy", "unkill", model, "--env", "production", "-r", "bench", "--token", b),
        }
        out = {}
        for step, command in commands.items():
            wall = _run(self.env, *command)[0]
            out[step] = (wall, self.caught_up())
            time.sleep(SETTLE)  # the mirror child exits after recording its sync: let it go before the next
        return out


def _summary(values: list[float | None]) -> dict[str, float | None]:
    if not values or any(v is None for v in values):
        return {"median": None, "max": None}
    done = [float(v) for v in values if v is not None]
    return {"median": round(statistics.median(done), 2), "max": round(max(done), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="off,on,wait", help="EXITWISE_MLFLOW_SYNC values, run interleaved")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    modes = args.modes.split(",")
    base = solve_policy(synthetic_logs(6000, n_exits=3, n_classes=4, seed=1), SolveSpec(eps=0.03),
                        baselines=()).document
    times = {m: {s: [] for s in STEPS} for m in modes}
    lag: dict[str, dict[str, list[float | None]]] = {m: {s: [] for s in STEPS} for m in modes}
    with tempfile.TemporaryDirectory(prefix="exitwise-bench-") as tmp:
        stores = [Store(Path(tmp), m) for m in modes]
        for r in range(args.repeat):
            model = f"bench-{r}"
            path = Path(tmp) / f"{model}.json"
            path.write_text(json.dumps(_document(model, base)), encoding="utf-8")
            for store in stores[r % len(stores):] + stores[:r % len(stores)]:  # rotate: same conditions for all
                for step, (wall, late) in store.round(model, path).items():
                    times[store.mode][step].append(wall)
                    lag[store.mode][step].append(late)
        for store in stores:
            store.engine.dispose()
    result = {"repeat": args.repeat, "modes": {m: {"seconds": {s: _summary(list(times[m][s])) for s in STEPS},
                                                   "mlflow_caught_up_after": {s: _summary(lag[m][s]) for s in STEPS}}
                                               for m in modes}}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"{args.repeat} rounds; seconds, median / max; MLflow: until nothing is pending after the command returned")
    print(f"  {'command':<16}" + "".join(f"{'EXITWISE_MLFLOW_SYNC=' + m:>34}" for m in modes))
    for s in STEPS:
        cells = []
        for m in modes:
            w, late = result["modes"][m]["seconds"][s], result["modes"][m]["mlflow_caught_up_after"][s]
            mirror = "—" if late["median"] is None else f"{late['median']:.1f}/{late['max']:.1f}"
            cells.append(f"{w['median']:5.2f}/{w['max']:5.2f} s, MLflow {mirror:>9}")
        print(f"  policy {s:<9}" + "".join(f"{c:>34}" for c in cells))

if __name__ == "__main__":
    main()
