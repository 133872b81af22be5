"""A staged gradient-boosting "early-exit" model on the UCI Letter Recognition data.

The suite's non-neural model (``benchmarks/suite.json``): boosting is additive, so stopping
after m of the M rounds is an early exit, and a serving system can stop evaluating trees
once the partial score is confident. Data: ``LetterRecognition`` (20,000 rows, 16 integer
features computed from black-and-white images of the 26 capital letters in 20 fonts,
randomly distorted; 26 classes) from the R package mlbench as Debian ships it
(``r-cran-mlbench``: ``/usr/lib/R/site-library/mlbench/data/LetterRecognition.rda``), read
with the pure-Python ``rdata`` package -- R itself is not needed. Either::

    apt-get install r-cran-mlbench                         # pulls in R
    # or, without R:
    apt-get download r-cran-mlbench && dpkg-deb -x r-cran-mlbench_*.deb /tmp/mlbench
    #   and pass --data-dir /tmp/mlbench/usr/lib/R/site-library/mlbench/data

Model: scikit-learn ``HistGradientBoostingClassifier`` (multinomial log-loss, 160 rounds of
26 trees each, up to 15 leaves per tree, learning rate 0.1, no early stopping); exits after
10, 20, 40, 80 and 160 rounds -> 5 exits, the logits being the staged raw scores
(``staged_decision_function``). Cost of an exit: tree-node comparisons per sample, i.e.
the sum over every tree evaluated so far of its expected root-to-leaf path length (leaf
depths weighted by the training samples that reached them); reading off the argmax of the
running scores costs nothing extra. The first exit is about 4.4 % of the last.

Split (random, stratified by class): 10,000 train, 5,000 calibration, 5,000 test rows.
Segment ``ink``: tertile of the ``onpix`` feature (total "on" pixels: light / medium / heavy
letters). Rows: ``request_id``, ``label`` (0..25 = A..Z), ``ink``, ``ts``, ``exit_0`` ..
``exit_4`` (26 float16 logits each).

Re-run (CPU, one OpenMP thread -- two spin on two shared busy cores --, deterministic; about 10
CPU-seconds)::

    .venv/bin/pip install -e '.[bench]'         # scikit-learn, rdata
    .venv/bin/python examples/letters_boosting/train.py
"""

from __future__ import annotations

import argparse
import string
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import rdata
import sklearn
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import suite_io  # noqa: E402

DATA_DIR = Path("/usr/lib/R/site-library/mlbench/data")
DEFAULT_OUT = REPO / "examples" / "data" / "letters_boosting"
MODEL_NAME = "letters-hgb160"
CLASSES = tuple(string.ascii_uppercase)
STAGES = (10, 20, 40, 80, 160)
MAX_LEAF_NODES = 15
CAL_WINDOW = ("2026-07-06T00:00:00Z", "2026-07-20T00:00:00Z")
TEST_WINDOW = ("2026-07-20T00:00:00Z", "2026-07-27T00:00:00Z")


def load_letters(data_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (20000, 16) float32, labels 0..25 and the feature names from the .rda file."""
    path = data_dir / "LetterRecognition.rda"
    if not path.exists():
        sys.exit(f"error: {path} not found; install r-cran-mlbench (see this script's docstring)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rdata: "Unknown encoding. Assumed ASCII." (it is ASCII)
        frame = rdata.read_rda(str(path))["LetterRecognition"]
    features = [c for c in frame.columns if c != "lettr"]
    y = np.array([CLASSES.index(str(v)) for v in frame["lettr"]], dtype=np.int64)
    return frame[features].to_numpy(np.float32), y, features


def tree_path_lengths(model: HistGradientBoostingClassifier) -> np.ndarray:
    """(rounds, classes) expected root-to-leaf comparisons of every tree (training-sample weighted)."""
    out = np.empty((len(model._predictors), len(model._predictors[0])))
    for i, round_trees in enumerate(model._predictors):
        for j, tree in enumerate(round_trees):
            leaves = tree.nodes[tree.nodes["is_leaf"].astype(bool)]
            out[i, j] = float((leaves["depth"] * leaves["count"]).sum() / leaves["count"].sum())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="mlbench data folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=20260706, help="seed for everything (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=0.1, help="boosting learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads (default: %(default)s; see above)")
    args = ap.parse_args(argv)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(args.seed)
    x, y, features = load_letters(args.data_dir)
    rest, test_idx = train_test_split(np.arange(len(y)), test_size=5000, stratify=y, random_state=args.seed)
    fit_idx, cal_idx = train_test_split(rest, test_size=5000, stratify=y[rest], random_state=args.seed + 1)
    print(f"data: train {len(fit_idx)}, calibration {len(cal_idx)}, test {len(test_idx)}", flush=True)

    model = HistGradientBoostingClassifier(max_iter=STAGES[-1], learning_rate=args.lr,
                                           max_leaf_nodes=MAX_LEAF_NODES, early_stopping=False,
                                           random_state=args.seed)
    t_fit = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        model.fit(x[fit_idx], y[fit_idx])
        fit_seconds = time.perf_counter() - t_fit
        wanted = {s - 1: k for k, s in enumerate(STAGES)}
        logits = np.empty((len(y), len(STAGES), len(CLASSES)), dtype=np.float32)
        for i, scores in enumerate(model.staged_decision_function(x)):
            if i in wanted:
                logits[:, wanted[i]] = scores
    print(f"fitted {model.n_iter_} rounds in {fit_seconds:.0f} s", flush=True)

    per_tree = tree_path_lengths(model)
    per_round = per_tree.sum(axis=1)
    costs = [round(float(per_round[:s].sum()), 1) for s in STAGES]
    print(f"cumulative comparisons per exit: {costs} (first exit {costs[0] / costs[-1]:.1%} of the last)", flush=True)

    onpix = x[:, features.index("onpix")]
    cuts = np.quantile(onpix[fit_idx], [1 / 3, 2 / 3])
    ink = np.array(["light", "medium", "heavy"])[np.searchsorted(cuts, onpix, side="right")]
    reports = {"train": suite_io.accuracy_report(suite_io.stored(logits[fit_idx]), y[fit_idx], {})}
    windows = {"calibration": CAL_WINDOW, "test": TEST_WINDOW}
    for name, idx, prefix in (("calibration", cal_idx, "lb-cal"), ("test", test_idx, "lb-test")):
        idx = idx[rng.permutation(len(idx))]
        ts = suite_io.timestamps(len(idx), windows[name], rng)
        suite_io.write_logs(args.out / f"{name}.parquet", prefix=prefix, labels=y[idx], logits=logits[idx],
                            segments={"ink": ink[idx]}, ts=ts)
        reports[name] = suite_io.accuracy_report(suite_io.stored(logits[idx]), y[idx], {"ink": ink[idx]})
        print(f"{name}: accuracy per exit {reports[name]['accuracy']}", flush=True)
        for v, r in reports[name]["segments"]["ink"].items():
            print(f"  ink={v} (n={r['n']}): {r['accuracy']}", flush=True)

    suite_io.write_json(args.out / "card.json", suite_io.card(
        MODEL_NAME, [f"round{s}" for s in STAGES], costs, list(CLASSES), ["ink"],
        "Staged gradient boosting (26 trees per round) on UCI Letter Recognition, exits after 10-160 rounds "
        "(examples/letters_boosting/train.py)"))
    suite_io.write_json(args.out / "metadata.json", {
        "model": MODEL_NAME,
        "script": "examples/letters_boosting/train.py",
        "command": (f"python examples/letters_boosting/train.py --seed {args.seed} --lr {args.lr} "
                    f"--threads {args.threads}"),
        "seed": args.seed,
        "epochs": None,
        "threads": args.threads,
        "data": {
            "source": f"Debian package r-cran-mlbench ({args.data_dir / 'LetterRecognition.rda'}), read with rdata",
            "rows": {"train": len(fit_idx), "calibration": len(cal_idx), "test": len(test_idx)},
            "features": features,
            "ink_onpix_cuts": [float(c) for c in cuts],
            "time_windows": windows,
        },
        "architecture": {
            "model": "sklearn HistGradientBoostingClassifier",
            "rounds": STAGES[-1], "trees_per_round": len(CLASSES), "max_leaf_nodes": MAX_LEAF_NODES,
            "learning_rate": args.lr, "exit_after_rounds": list(STAGES),
        },
        "macs": {"unit": "tree-node comparisons per sample (expected root-to-leaf path length, summed over trees)",
                 "per_round": [round(float(v), 2) for v in per_round], "cumulative_exit_cost": costs,
                 "first_exit_fraction": round(costs[0] / costs[-1], 4)},
        "accuracy": reports,
        "fit_seconds": round(fit_seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "versions": suite_io.versions(sklearn=sklearn.__version__, rdata=rdata.__version__),
    })
    print(f"done in {time.perf_counter() - t_start:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
