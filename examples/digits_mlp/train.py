"""A widening multi-exit MLP on scikit-learn's bundled digits, with cross-fitted exit logs.

The suite's small-data model (``benchmarks/suite.json``). Data: ``sklearn.datasets.load_digits``
(1,797 8x8 grey images of the digits 0-9, shipped inside scikit-learn: nothing downloads).

Model: four hidden layers of 6, 32, 128 and 256 units (Linear + ReLU); each sees the previous
layer's output AND the 64 pixels (an input skip, so the narrow first layer is no bottleneck
for the later ones); an exit after every hidden layer (one linear layer to the 10 classes)
-> 4 exits. The first exit is tiny and weak, the net widens, so the late layers dominate the
cost: the first exit costs under 1 % of the full net. Training:
AdamW, mini-batches of 64, 60 epochs, equal-weight sum of the exits' cross-entropies, input
noise (Gaussian, sd 0.1 of the standardised pixels) as the only augmentation.

Every row is used and none is scored by a model that saw it: 5-fold stratified
cross-fitting -- five models, each trained on four folds, log the exits of the fifth -- so
each of the 1,797 rows has out-of-fold logits, as a fresh request would. The rows are then
split at random, stratified by class, into ``calibration.parquet`` (898 rows) and
``test.parquet`` (899 rows); the data set is small, so both are far below the suite's
usual 2,000+ rows. Segment ``ink``: total pixel intensity tertile (light / medium / heavy).
Costs: multiply-accumulates per image (Linear layers), cumulative over the backbone and
every head evaluated on the way.

Re-run (CPU, ONE thread -- two threads spin on this tiny net, ten times slower --, deterministic;
about 15 CPU-seconds)::

    .venv/bin/pip install -e '.[bench]'      # torch==2.13.0, scikit-learn
    .venv/bin/python examples/digits_mlp/train.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import suite_io  # noqa: E402

DEFAULT_OUT = REPO / "examples" / "data" / "digits_mlp"
MODEL_NAME = "digits-mlp4"
CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WIDTHS = (6, 32, 128, 256)
FOLDS = 5
NOISE = 0.1
CAL_WINDOW = ("2026-06-01T00:00:00Z", "2026-06-15T00:00:00Z")
TEST_WINDOW = ("2026-06-15T00:00:00Z", "2026-06-22T00:00:00Z")


class MultiExitMLP(nn.Module):
    """Hidden layers of WIDTHS (Linear + ReLU) on [previous layer, pixels]; a linear exit head after each."""

    def __init__(self, n_in: int = 64, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        layers, heads, width = [], [], 0
        for w in WIDTHS:
            layers.append(nn.Linear(width + n_in, w))
            heads.append(nn.Linear(w, n_classes))
            width = w
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, shallowest first."""
        outs, h = [], x[:, :0]
        for layer, head in zip(self.layers, self.heads, strict=True):
            h = F.relu(layer(torch.cat([h, x], dim=1)))
            outs.append(head(h))
        return outs


def exit_costs(model: MultiExitMLP) -> tuple[list[int], list[int], list[int]]:
    """(layer MACs, head MACs, cumulative exit costs): Linear in x out multiply-accumulates each."""
    layer = [m.in_features * m.out_features for m in model.layers]
    head = [m.in_features * m.out_features for m in model.heads]
    return layer, head, [int(c) for c in np.cumsum(np.array(layer) + np.array(head))]


def fit_fold(x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
             generator: torch.Generator) -> tuple[MultiExitMLP, list[float]]:
    """Train one model on (x, y); returns it and its final per-exit training loss."""
    model = MultiExitMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    totals = torch.zeros(len(WIDTHS))
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator)
        totals = torch.zeros(len(WIDTHS))
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            xb = x[idx] + NOISE * torch.randn(len(idx), x.shape[1], generator=generator)
            losses = torch.stack([F.cross_entropy(o, y[idx]) for o in model(xb)])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            sched.step()
            totals += losses.detach() * len(idx)
    return model, [round(v, 4) for v in (totals / len(y)).tolist()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=20260601, help="seed for everything (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=60, help="(default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=0.01, help="peak AdamW learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s; see above)")
    args = ap.parse_args(argv)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    digits = load_digits()
    pixels, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    logits = np.empty((len(y), len(WIDTHS), len(CLASSES)), dtype=np.float32)
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=args.seed % 2**32)
    fold_losses = []
    for k, (fit, held) in enumerate(folds.split(pixels, y)):
        mean, std = pixels[fit].mean(axis=0), pixels[fit].std(axis=0) + 1.0  # +1: constant border pixels
        x = torch.from_numpy((pixels - mean) / std)
        model, losses = fit_fold(x[fit], torch.from_numpy(y[fit]), epochs=args.epochs, lr=args.lr,
                                 batch_size=args.batch_size, generator=gen)
        model.eval()
        with torch.no_grad():
            logits[held] = torch.stack(model(x[held]), dim=1).numpy()
        fold_losses.append(losses)
        acc = (logits[held].argmax(axis=2) == y[held, None]).mean(axis=0)
        print(f"fold {k + 1}/{FOLDS}: train loss per exit {losses}, held-out accuracy {acc.round(3).tolist()}",
              flush=True)
    layer_macs, head_macs, costs = exit_costs(MultiExitMLP())

    ink = pixels.sum(axis=1)
    cuts = np.quantile(ink, [1 / 3, 2 / 3])
    ink_level = np.array(["light", "medium", "heavy"])[np.searchsorted(cuts, ink, side="right")]
    cal_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y,
                                         random_state=args.seed % 2**32)
    reports = {"all_rows": suite_io.accuracy_report(suite_io.stored(logits), y, {"ink": ink_level})}
    windows = {"calibration": CAL_WINDOW, "test": TEST_WINDOW}
    for name, idx, prefix in (("calibration", cal_idx, "dg-cal"), ("test", test_idx, "dg-test")):
        idx = idx[rng.permutation(len(idx))]
        ts = suite_io.timestamps(len(idx), windows[name], rng)
        suite_io.write_logs(args.out / f"{name}.parquet", prefix=prefix, labels=y[idx], logits=logits[idx],
                            segments={"ink": ink_level[idx]}, ts=ts)
        reports[name] = suite_io.accuracy_report(suite_io.stored(logits[idx]), y[idx], {"ink": ink_level[idx]})
        print(f"{name} ({len(idx)} rows): accuracy per exit {reports[name]['accuracy']}", flush=True)
        for v, r in reports[name]["segments"]["ink"].items():
            print(f"  ink={v} (n={r['n']}): {r['accuracy']}", flush=True)

    suite_io.write_json(args.out / "card.json", suite_io.card(
        MODEL_NAME, [f"hidden{w}" for w in WIDTHS], costs, list(CLASSES), ["ink"],
        "Widening 4-exit MLP on scikit-learn digits, 5-fold cross-fitted logits (examples/digits_mlp/train.py)"))
    suite_io.write_json(args.out / "metadata.json", {
        "model": MODEL_NAME,
        "script": "examples/digits_mlp/train.py",
        "command": (f"python examples/digits_mlp/train.py --seed {args.seed} --epochs {args.epochs} "
                    f"--batch-size {args.batch_size} --lr {args.lr} --threads {args.threads}"),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "data": {
            "source": "sklearn.datasets.load_digits (bundled with scikit-learn)",
            "rows": len(y),
            "cross_fitting": f"{FOLDS}-fold stratified: every row's logits come from the model not trained on it",
            "calibration": len(cal_idx),
            "test": len(test_idx),
            "ink_tertile_cuts": [round(float(c), 1) for c in cuts],
            "time_windows": windows,
        },
        "architecture": {
            "hidden_widths": list(WIDTHS),
            "input_skip": "every hidden layer sees [previous hidden layer, 64 pixels]",
            "exit_head": "linear",
            "input_noise_sd": NOISE,
            "parameters": sum(p.numel() for p in MultiExitMLP().parameters()),
        },
        "macs": {"unit": "multiply-accumulates per image (Linear layers)", "layer": layer_macs, "head": head_macs,
                 "cumulative_exit_cost": costs, "first_exit_fraction": round(costs[0] / costs[-1], 4)},
        "accuracy": reports,
        "fold_train_loss_per_exit": fold_losses,
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "versions": suite_io.versions(torch=torch.__version__, sklearn=sklearn.__version__),
    })
    print(f"done in {time.perf_counter() - t_start:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
