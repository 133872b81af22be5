"""The benchmark suite: real exit logs of several early-exit models (issue 11).

One data set hides what another shows, so the threshold solver is measured on every model
listed in ``benchmarks/suite.json`` (name, card, calibration and test logs, the script that
made them, a description and their stats). This runs ``exitwise solve`` on each and prints
its comparison table (solver vs baselines on the held-out test logs)::

    .venv/bin/python benchmarks/suite.py                          # eps 0.01, delta 0.05, all
    .venv/bin/python benchmarks/suite.py --only letters_boosting --eps 0.02
    .venv/bin/python benchmarks/suite.py --check                  # load and validate only

Every data set is first loaded and validated with the project's own loader.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from exitwise.calibration import load_card, load_logs

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suite.json"


def entries(only: list[str] | None = None) -> list[dict[str, Any]]:
    """The suite's data sets (all, or those named in ``only``, in the suite's order)."""
    suite = json.loads(SUITE.read_text())["datasets"]
    if only:
        unknown = sorted(set(only) - {d["name"] for d in suite})
        if unknown:
            sys.exit(f"error: unknown data set(s) {unknown}; the suite has {[d['name'] for d in suite]}")
        suite = [d for d in suite if d["name"] in only]
    return suite


def check(entry: dict[str, Any]) -> str:
    """Load card, calibration and test logs with the project's loader; one line of stats."""
    card = load_card(ROOT / entry["card"])
    cal = load_logs(ROOT / entry["calibration"], card)
    test = load_logs(ROOT / entry["test"], card)
    return (f"{entry['name']}: calibration {cal.n} rows, test {test.n} rows, "
            f"{cal.n_exits} exits, {cal.n_classes} classes")


def exitwise_command() -> list[str]:
    """The ``exitwise`` console script beside this interpreter, else the one on PATH."""
    here = Path(sys.executable).with_name("exitwise")
    found = str(here) if here.exists() else shutil.which("exitwise")
    if not found:
        sys.exit("error: the exitwise command is not installed (make install)")
    return [found]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="data sets to run (default: all)")
    ap.add_argument("--eps", type=float, default=0.01, help="risk budget (default: %(default)s)")
    ap.add_argument("--delta", type=float, default=0.05, help="1 - confidence (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="only load and validate every data set")
    args = ap.parse_args(argv)

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries(args.only):
            print(check(entry), flush=True)
            if args.check:
                continue
            cmd = [*exitwise_command(), "solve", str(ROOT / entry["calibration"]),
                   "--card", str(ROOT / entry["card"]), "--test", str(ROOT / entry["test"]),
                   "--eps", str(args.eps), "--delta", str(args.delta),
                   "--out", str(Path(tmp) / f"{entry['name']}.json")]
            done = subprocess.run(cmd, check=False)
            failed += done.returncode != 0
            print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
