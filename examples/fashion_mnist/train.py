"""Train a small multi-exit CNN on Fashion-MNIST and write real exit logs for exitwise.

What it produces (design contract, "Exit logs", wide Parquet form), in ``--out`` (default
``examples/data/fashion_mnist``):

- ``calibration.parquet`` -- 10,000 images held out from the Fashion-MNIST *train* set
  (never trained on), for fitting calibrators and solving/certifying thresholds;
- ``test.parquet`` -- the 10,000 images of the official Fashion-MNIST *test* set;
- ``card.json`` -- the model card: exits with cumulative MAC costs, class names, columns;
- ``metadata.json`` -- seed, epochs, per-exit accuracy (overall and per segment), MACs,
  torch version, training time. ``corrupt.py`` (beside this script) adds ``corrupted.parquet``
  and its ``"corrupted"`` entry from the saved model; rerun it after retraining.

Rows: ``request_id`` (str), ``label`` (int), ``capture`` ("studio" | "phone"),
``region`` ("eu" | "us" | "apac"), ``ts`` (UTC timestamp), ``exit_0`` .. ``exit_4`` (lists
of 10 float16 logits each).

Segments. ``capture="phone"`` images (30 % of each split, chosen deterministically) are
degraded as a phone photo of the garment would be: Gaussian blur, lower contrast, a
brightness shift, sensor noise and a small translation. The network sees such images for
only 15 % of its training set, so they are genuinely harder, above all at the shallow
exits. ``region`` is a market whose class mix differs (footwear is more common in "apac",
tops in "eu"): a label-shift segment, not an image-quality one.

Reproducibility: fixed seed, ``torch.use_deterministic_algorithms(True)``, CPU only,
``torch.set_num_threads(2)``. Needs Debian's ``dataset-fashion-mnist`` package (the idx
files in /usr/share/datasets/fashion-mnist) and the ``[bench]`` extra (torch==2.13.0)::

    python examples/fashion_mnist/train.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.ndimage import gaussian_filter, shift
from torch import nn
from torch.nn import functional as F

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "examples" / "data" / "fashion_mnist"

MODEL_NAME = "fashion-cnn"
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# Five backbone stages, each a list of 3x3 convs (out_channels, stride), every conv + BN + ReLU.
STAGES = (
    ((24, 1),),  # 28x28
    ((32, 2), (32, 1)),  # 14x14
    ((64, 2),),  # 7x7
    ((64, 1),),  # 7x7
    ((128, 1),),  # 7x7
)
HEAD_POOL = 4  # every exit head: adaptive average pool to 4x4, then one linear layer
EXIT_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)  # joint loss: weighted sum of the exits' cross-entropies

N_CALIBRATION = 10_000  # held out from the train set
PHONE_FRACTION_EVAL = 0.30
PHONE_FRACTION_TRAIN = 0.15
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixel statistics

# Market mix: P(region | class). Footwear (5, 7, 9) sells more in "apac", tops (0, 2, 6) in "eu".
REGIONS = ("eu", "us", "apac")
_REGION_BASE = np.array([0.40, 0.35, 0.25])
_REGION_BY_CLASS = {0: [0.55, 0.30, 0.15], 2: [0.55, 0.30, 0.15], 6: [0.55, 0.30, 0.15],
                    5: [0.20, 0.30, 0.50], 7: [0.20, 0.30, 0.50], 9: [0.20, 0.30, 0.50]}

# Synthetic traffic windows (UTC): calibration logged over two weeks, test the week after.
CAL_WINDOW = ("2026-03-02T00:00:00Z", "2026-03-16T00:00:00Z")
TEST_WINDOW = ("2026-03-16T00:00:00Z", "2026-03-23T00:00:00Z")


# ----------------------------------------------------------------------------- data


def load_idx(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) uint8 from the Debian package's idx files."""
    images_path = DATA_DIR / f"{kind}-images-idx3-ubyte.gz"
    labels_path = DATA_DIR / f"{kind}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.exists():
            sys.exit(f"error: {p} not found; install it with: apt-get install dataset-fashion-mnist")
    with gzip.open(labels_path, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    with gzip.open(images_path, "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(len(labels), 28, 28)
    return images, labels


def degrade_phone(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A phone capture of each image: blur, low contrast, brightness shift, noise, small shift.

    ``images`` are floats in [0, 1], shape (n, 28, 28); the result is clipped to [0, 1].
    All randomness comes from ``rng``, so the output is a pure function of the seed.
    """
    out = np.empty_like(images)
    for i, img in enumerate(images):
        sigma = rng.uniform(0.5, 1.0)
        contrast = rng.uniform(0.45, 0.8)
        brightness = rng.uniform(-0.05, 0.15)
        noise = rng.uniform(0.04, 0.10)
        dy, dx = rng.integers(-1, 2, size=2)
        x = gaussian_filter(img, sigma=sigma, mode="constant")
        x = shift(x, (dy, dx), order=0, mode="constant")
        x = x.mean() + contrast * (x - x.mean()) + brightness
        x = x + rng.normal(0.0, noise, size=x.shape)
        out[i] = np.clip(x, 0.0, 1.0)
    return out


@dataclass(frozen=True)
class Split:
    """Images ready for the network plus the per-row columns of the logs."""

    x: torch.Tensor  # (n, 1, 28, 28) float32, normalised
    y: np.ndarray  # (n,) int64
    capture: np.ndarray  # (n,) str
    source_index: np.ndarray  # (n,) index into the original idx file


def make_split(images: np.ndarray, labels: np.ndarray, index: np.ndarray, phone_fraction: float,
               rng: np.random.Generator) -> Split:
    """Select rows ``index``, degrade a fixed ``phone_fraction`` of them, normalise."""
    x = images[index].astype(np.float32) / 255.0
    n = len(index)
    phone = np.zeros(n, dtype=bool)
    phone[rng.permutation(n)[: round(phone_fraction * n)]] = True
    if phone.any():
        x[phone] = degrade_phone(x[phone], rng)
    x = (x - MEAN) / STD
    capture = np.where(phone, "phone", "studio")
    return Split(torch.from_numpy(x[:, None]).contiguous(), labels[index].astype(np.int64), capture, index)


# ----------------------------------------------------------------------------- model


class MultiExitCNN(nn.Module):
    """Five conv stages; after each, an exit head (adaptive avg pool to 2x2 + linear)."""

    def __init__(self, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        stages, heads, c_in = [], [], 1
        for convs in STAGES:
            layers: list[nn.Module] = []
            for c_out, stride in convs:
                layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            stages.append(nn.Sequential(*layers))
            heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(HEAD_POOL), nn.Flatten(),
                                       nn.Linear(c_in * HEAD_POOL * HEAD_POOL, n_classes)))
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, shallowest first (the logs need them all)."""
        outs = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            outs.append(head(x))
        return outs


def module_macs(model: MultiExitCNN, shape: tuple[int, ...] = (1, 1, 28, 28)) -> dict[str, int]:
    """Multiply-accumulates per single image of every Conv2d/Linear, keyed by module name.

    Conv2d: out_elements * (C_in / groups) * kH * kW; Linear: in * out. BatchNorm (folded
    into the conv at inference), ReLU and pooling are not multiply-accumulates and are not
    counted. Measured with forward hooks on one real forward pass.
    """
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                macs[name] = out[0].numel() * (mod.in_channels // mod.groups) * kh * kw
            else:
                macs[name] = mod.in_features * mod.out_features

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs


def exit_costs(model: MultiExitCNN) -> tuple[list[int], list[int], list[int]]:
    """(stage MACs, head MACs, cumulative exit costs): exit k = stages 0..k + heads 0..k."""
    macs = module_macs(model)
    k = len(model.stages)
    stage = [sum(v for n, v in macs.items() if n.startswith(f"stages.{i}.")) for i in range(k)]
    head = [sum(v for n, v in macs.items() if n.startswith(f"heads.{i}.")) for i in range(k)]
    cumulative = np.cumsum(np.array(stage) + np.array(head)).tolist()
    return stage, head, [int(c) for c in cumulative]


# ----------------------------------------------------------------------------- training


def train(model: MultiExitCNN, split: Split, *, epochs: int, batch_size: int, lr: float,
          generator: torch.Generator) -> list[dict[str, float]]:
    """Joint training: AdamW on the weighted sum of the exits' cross-entropies, one-cycle LR."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(split.y) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    weights = torch.tensor(EXIT_WEIGHTS)
    y_all = torch.from_numpy(split.y)
    history = []
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_all), generator=generator)
        totals = torch.zeros(len(STAGES))
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = split.x[idx], y_all[idx]
            # Light augmentation: random horizontal flip (garments are left-right symmetric).
            flip = torch.rand(len(idx), generator=generator) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            losses = torch.stack([F.cross_entropy(o, yb) for o in model(xb)])
            loss = (weights * losses).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            totals += losses.detach() * len(idx)
        per_exit = (totals / len(perm)).tolist()
        history.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - t0, 1),
                        "train_loss_per_exit": [round(v, 4) for v in per_exit]})
        print(f"epoch {epoch + 1}/{epochs}: loss per exit {[round(v, 3) for v in per_exit]} "
              f"({history[-1]['seconds']} s)", flush=True)
    return history


@torch.no_grad()
def all_exit_logits(model: MultiExitCNN, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Logits of every exit for every image at full depth: (n, K, C) float32."""
    model.eval()
    chunks = [torch.stack(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).numpy()


# ----------------------------------------------------------------------------- logs


def regions_for(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A market per row, drawn from P(region | class) (label shift between regions)."""
    probs = np.stack([_REGION_BY_CLASS.get(int(c), _REGION_BASE) for c in labels])
    u = rng.random(len(labels))[:, None]
    return np.asarray(REGIONS)[(u > np.cumsum(probs, axis=1)).sum(axis=1)]


def timestamps(n: int, window: tuple[str, str], rng: np.random.Generator) -> pd.DatetimeIndex:
    """n sorted request times in ``window`` with a diurnal pattern (busier in the evening)."""
    start, end = pd.Timestamp(window[0]), pd.Timestamp(window[1])
    span = (end - start).total_seconds()
    # Rejection-sample a day profile: intensity 0.3 at 04:00 UTC up to 1.0 at 16:00 UTC.
    out: list[np.ndarray] = []
    while sum(len(o) for o in out) < n:
        t = rng.uniform(0.0, span, size=2 * n)
        hour = (t / 3600.0) % 24.0
        intensity = 0.65 - 0.35 * np.cos(2 * np.pi * (hour - 4.0) / 24.0)
        out.append(t[rng.random(2 * n) < intensity])
    seconds = np.sort(np.concatenate(out)[:n])
    return start + pd.to_timedelta(np.round(seconds * 1e3).astype(np.int64), unit="ms")


def logs_table(prefix: str, split: Split, logits: np.ndarray, region: np.ndarray,
               ts: pd.DatetimeIndex) -> pa.Table:
    """The wide table, rows ordered by ``ts``: one row per image, one list column per exit."""
    n, k, c = logits.shape
    cols: dict[str, pa.Array] = {
        "request_id": pa.array([f"{prefix}-{i:05d}" for i in range(n)], pa.string()),
        "label": pa.array(split.y, pa.int64()),
        "capture": pa.array(split.capture.astype(str), pa.string()),
        "region": pa.array(region.astype(str), pa.string()),
        "ts": pa.array(ts.to_numpy(), pa.timestamp("ms", tz="UTC")),
    }
    half = logits.astype(np.float16)
    for j in range(k):
        flat = pa.array(half[:, j, :].ravel(), pa.float16())
        cols[f"exit_{j}"] = pa.FixedSizeListArray.from_arrays(flat, c).cast(pa.list_(pa.float16()))
    return pa.table(cols)


def write_atomic(path: Path, write) -> None:
    """Write through a temp file in the same directory, then os.replace (no half files)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def accuracy_report(logits: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray]) -> dict:
    """Per-exit accuracy overall and per value of every segment column."""
    correct = logits.argmax(axis=2) == y[:, None]
    rep = {"n": len(y), "accuracy": [round(float(v), 4) for v in correct.mean(axis=0)], "segments": {}}
    for col, values in groups.items():
        rep["segments"][col] = {
            str(v): {"n": int((values == v).sum()),
                     "accuracy": [round(float(a), 4) for a in correct[values == v].mean(axis=0)]}
            for v in sorted(set(values.tolist()))
        }
    return rep


def set_deterministic(seed: int, threads: int) -> None:
    """Seed torch, fix its CPU thread count and forbid nondeterministic kernels (same bits every run)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def make_splits(seed: int, train_size: int) -> tuple[Split, Split, Split, np.random.Generator]:
    """(train, calibration, test) splits of ``seed`` and the generator, in the state the logs continue from.

    Everything here is numpy, so ``corrupt.py`` replays the exact rows of the logs without training.
    """
    rng = np.random.default_rng(seed)
    train_images, train_labels = load_idx("train")
    test_images, test_labels = load_idx("t10k")
    order = rng.permutation(len(train_labels))
    cal_index, fit_index = np.sort(order[:N_CALIBRATION]), np.sort(order[N_CALIBRATION:])
    if not 0 < train_size <= len(fit_index):
        sys.exit(f"error: --train-size must be in 1..{len(fit_index)}")
    fit = make_split(train_images, train_labels, fit_index[:train_size], PHONE_FRACTION_TRAIN, rng)
    cal = make_split(train_images, train_labels, cal_index, PHONE_FRACTION_EVAL, rng)
    test = make_split(test_images, test_labels, np.arange(len(test_labels)), PHONE_FRACTION_EVAL, rng)
    return fit, cal, test, rng


def log_rows(split: Split, window: tuple[str, str],
             rng: np.random.Generator) -> tuple[np.ndarray, pd.DatetimeIndex, np.ndarray]:
    """(region per image, sorted timestamps, row order) of one split's logs, drawn from ``rng``.

    The logs list the images in the order ``perm`` and give them the timestamps in turn.
    """
    region = regions_for(split.y, rng)
    ts = timestamps(len(split.y), window, rng)
    perm = rng.permutation(len(split.y))
    return region, ts, perm


def reorder(split: Split, perm: np.ndarray) -> Split:
    """The split with its rows in the order ``perm``."""
    return Split(split.x[perm], split.y[perm], split.capture[perm], split.source_index[perm])


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=20260302, help="seed for everything (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs (default: %(default)s)")
    ap.add_argument("--train-size", type=int, default=50_000,
                    help="training images taken from the 50,000 non-held-out train images (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--save-model", type=Path, default=REPO / "examples" / "fashion_mnist" / "model.pt",
                    help="where to save the weights if they are under 1 MB (default: %(default)s)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    set_deterministic(args.seed, args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    fit, cal, test, rng = make_splits(args.seed, args.train_size)
    print(f"data: train {len(fit.y)}, calibration {len(cal.y)}, test {len(test.y)} "
          f"({time.perf_counter() - t_start:.1f} s)", flush=True)

    model = MultiExitCNN()
    stage_macs, head_macs, costs = exit_costs(model)
    print(f"cumulative MACs per exit: {costs}", flush=True)

    t_train, cpu_train = time.perf_counter(), time.process_time()
    history = train(model, fit, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, generator=gen)
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - cpu_train

    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    windows = {"calibration": CAL_WINDOW, "test": TEST_WINDOW}
    for name, split, prefix in (("calibration", cal, "fm-cal"), ("test", test, "fm-test")):
        logits = all_exit_logits(model, split.x)
        # Rows in time order: shuffle the samples, then give them the sorted timestamps.
        region, ts, perm = log_rows(split, windows[name], rng)
        split, logits, region = reorder(split, perm), logits[perm], region[perm]
        table = logs_table(prefix, split, logits, region, ts)
        write_atomic(args.out / f"{name}.parquet",
                     lambda p, t=table: pq.write_table(t, p, compression="zstd", compression_level=19))
        # Report accuracy on the float16 logits actually written.
        stored = logits.astype(np.float16).astype(np.float32)
        reports[name] = accuracy_report(stored, split.y, {"capture": split.capture, "region": region})
        print(f"{name}: accuracy per exit {reports[name]['accuracy']}", flush=True)
        for v, r in reports[name]["segments"]["capture"].items():
            print(f"  capture={v} (n={r['n']}): {r['accuracy']}", flush=True)

    card = {
        "model": MODEL_NAME,
        "version": "1",
        "exits": [{"name": f"stage{k + 1}", "cost": c} for k, c in enumerate(costs)],
        "classes": list(CLASSES),
        "label_column": "label",
        "id_column": "request_id",
        "segment_columns": ["capture", "region"],
    }
    write_atomic(args.out / "card.json", lambda p: Path(p).write_text(json.dumps(card, indent=2) + "\n"))

    weights_note = "not saved"
    if args.save_model:
        model.eval()
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "model.pt"
            torch.save(model.state_dict(), tmp)
            size = tmp.stat().st_size
            if size < 1_000_000:
                args.save_model.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(args.save_model, lambda p: torch.save(model.state_dict(), p))
                where = args.save_model.relative_to(REPO) if args.save_model.is_relative_to(REPO) else args.save_model
                weights_note = f"{where} ({size} bytes, state_dict of MultiExitCNN in train.py)"
            else:
                weights_note = f"not saved: {size} bytes >= 1 MB"

    metadata = {
        "model": MODEL_NAME,
        "script": "examples/fashion_mnist/train.py",
        # The options that decide the outputs (paths do not): rerunning this reproduces the files.
        "command": (f"python examples/fashion_mnist/train.py --seed {args.seed} --epochs {args.epochs} "
                    f"--train-size {args.train_size} --batch-size {args.batch_size} --lr {args.lr} "
                    f"--threads {args.threads}"),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "data": {
            "source": f"Debian package dataset-fashion-mnist ({DATA_DIR})",
            "train_images": len(fit.y),
            "calibration": f"{N_CALIBRATION} images held out from the train set (not trained on)",
            "test": "the 10000 images of the official test set",
            "phone_fraction": {"train": PHONE_FRACTION_TRAIN, "calibration": PHONE_FRACTION_EVAL,
                               "test": PHONE_FRACTION_EVAL},
            "time_windows": windows,
        },
        "architecture": {
            "stages": [[{"conv3x3_out": c, "stride": st} for c, st in convs] for convs in STAGES],
            "exit_head": f"adaptive avg pool {HEAD_POOL}x{HEAD_POOL} + linear",
            "exit_loss_weights": list(EXIT_WEIGHTS),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "macs": {"unit": "multiply-accumulates per image (Conv2d + Linear; BN, ReLU, pooling not counted)",
                 "stage": stage_macs, "head": head_macs, "cumulative_exit_cost": costs},
        "accuracy": reports,
        "train_history": history,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # wall time depends on the machine's other load
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "weights": weights_note,
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "pyarrow": pa.__version__,
                     "python": platform.python_version()},
    }
    write_atomic(args.out / "metadata.json", lambda p: Path(p).write_text(json.dumps(metadata, indent=2) + "\n"))
    print(f"trained in {train_seconds:.0f} s, total {metadata['total_seconds']:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
