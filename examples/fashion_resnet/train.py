"""Train a thin-deep residual multi-exit CNN on Fashion-MNIST and write its exit logs.

The suite's second image model (``benchmarks/suite.json``): same images as
``examples/fashion_mnist`` (no other image data set is available offline on this machine:
Debian ships only Fashion-MNIST), but a different network, split and segment, so the solver
meets a different cost profile:

- architecture: a 3x3 stride-2 stem, then six residual basic blocks (12, 24, 24, 48, 48, 48
  channels; two 3x3 convs + BN each, 1x1 projection shortcut where the shape changes), one
  exit after every block -> 6 exits; each exit head is an adaptive average pool to 3x3 and
  one linear layer. The FIRST exit is CHEAP: about 7.5 % of the full cost (the
  ``fashion_mnist`` CNN's first exit is 1.8 %, its second 34 %);
- training: 40,000 images, 12 epochs (vs 5), batches of 256, SGD with Nesterov momentum, cosine schedule,
  random flips and +-2 px shifts (one shift per batch), equal-weight deep supervision over the six exits;
- split: 10,000 calibration images held out from the Fashion-MNIST *train* set with this
  script's own seed (a different set of rows from ``fashion_mnist``'s), never trained on;
  test = the 10,000 images of the official test set;
- segment ``quality``: "clean" / "lowres" (block-averaged to 14x14 and blown up again, as a
  thumbnail would be) / "occluded" (a random 8-12 px square painted with background, as a
  tag or a hand would hide part of the garment). 15 % + 15 % of each evaluation split, but
  only 5 % + 5 % of the training images: the degraded rows are genuinely harder, above all
  at the shallow exits.

Rows: ``request_id``, ``label`` (0..9), ``quality``, ``ts`` (UTC), ``exit_0`` .. ``exit_5``
(10 float16 logits each). Costs are multiply-accumulates per image (Conv2d + Linear, counted
with forward hooks; BN folded, ReLU/pooling/adds not counted), cumulative over the backbone
and every head evaluated on the way.

Re-run (CPU, deterministic: fixed seed, ``torch.use_deterministic_algorithms``)::

    apt-get install dataset-fashion-mnist          # idx files in /usr/share/datasets/fashion-mnist
    .venv/bin/pip install -e '.[bench]'            # torch==2.13.0
    .venv/bin/python examples/fashion_resnet/train.py

ONE torch thread by default: on two cores shared with other work, two threads spend most
of their time spinning at the barriers of these thin convolutions (measured: 1.7 ms of wall
time per training image with one thread, 7.3 ms with two). 12 epochs of 40,000 images took
6 CPU-minutes (9 minutes of wall time). ``--max-cpu-seconds`` (default 1800) stops training
after the epoch that crosses that CPU budget; metadata.json then says how many epochs ran
(``epochs_run``), and the files are no longer a pure function of the seed.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import suite_io  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO / "examples" / "data" / "fashion_resnet"

MODEL_NAME = "fashion-resnet6"
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
STEM = 12  # 3x3 conv, stride 2: 28x28 -> 14x14
BLOCKS = ((12, 1), (24, 2), (24, 1), (48, 1), (48, 1), (48, 1))  # (out_channels, stride) per basic block
HEAD_POOL = 3
N_CALIBRATION = 10_000
QUALITY = ("clean", "lowres", "occluded")
QUALITY_TRAIN = (0.90, 0.05, 0.05)
QUALITY_EVAL = (0.70, 0.15, 0.15)
MEAN, STD = 0.2860, 0.3530
CAL_WINDOW = ("2026-04-06T00:00:00Z", "2026-04-20T00:00:00Z")
TEST_WINDOW = ("2026-04-20T00:00:00Z", "2026-04-27T00:00:00Z")


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


def degrade(images: np.ndarray, quality: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply each row's ``quality``: block-average to 14x14 ("lowres") or paint a square ("occluded")."""
    out = images.copy()
    low = quality == "lowres"
    if low.any():
        small = out[low].reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
        out[low] = small.repeat(2, axis=1).repeat(2, axis=2)
    for i in np.flatnonzero(quality == "occluded"):
        size = int(rng.integers(8, 13))
        y0, x0 = rng.integers(2, 28 - size - 1, size=2)
        out[i, y0 : y0 + size, x0 : x0 + size] = 0.0
    return out


@dataclass(frozen=True)
class Split:
    """Images ready for the network plus the per-row columns of the logs."""

    x: torch.Tensor  # (n, 1, 28, 28) float32, normalised
    y: np.ndarray  # (n,) int64
    quality: np.ndarray  # (n,) str


def make_split(images: np.ndarray, labels: np.ndarray, index: np.ndarray, mix: tuple[float, ...],
               rng: np.random.Generator) -> Split:
    """Select rows ``index``, give exact fractions ``mix`` of them each quality, normalise."""
    n = len(index)
    counts = [round(f * n) for f in mix[1:]]
    quality = np.full(n, QUALITY[0], dtype=object)
    perm = rng.permutation(n)
    start = 0
    for q, c in zip(QUALITY[1:], counts, strict=True):
        quality[perm[start : start + c]] = q
        start += c
    x = degrade(images[index].astype(np.float32) / 255.0, quality, rng)
    x = (x - MEAN) / STD
    return Split(torch.from_numpy(x[:, None]).contiguous(), labels[index].astype(np.int64), quality.astype(str))


# ----------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN where the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MultiExitResNet(nn.Module):
    """Stem + six basic blocks; after each block an exit head (avg pool 3x3 + linear)."""

    def __init__(self, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, STEM, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(STEM), nn.ReLU(inplace=True))
        blocks, heads, c_in = [], [], STEM
        for c_out, stride in BLOCKS:
            blocks.append(BasicBlock(c_in, c_out, stride))
            heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(HEAD_POOL), nn.Flatten(),
                                       nn.Linear(c_out * HEAD_POOL * HEAD_POOL, n_classes)))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, shallowest first."""
        x = self.stem(x)
        outs = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            outs.append(head(x))
        return outs


def module_macs(model: nn.Module, shape: tuple[int, ...] = (1, 1, 28, 28)) -> dict[str, int]:
    """Multiply-accumulates per image of every Conv2d/Linear (forward hooks on one real pass)."""
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


def exit_costs(model: MultiExitResNet) -> tuple[list[int], list[int], list[int]]:
    """(block MACs with the stem in block 0, head MACs, cumulative exit costs)."""
    macs = module_macs(model)
    k = len(model.blocks)
    block = [sum(v for n, v in macs.items() if n.startswith(f"blocks.{i}.")) for i in range(k)]
    block[0] += sum(v for n, v in macs.items() if n.startswith("stem."))
    head = [sum(v for n, v in macs.items() if n.startswith(f"heads.{i}.")) for i in range(k)]
    return block, head, [int(c) for c in np.cumsum(np.array(block) + np.array(head))]


# ----------------------------------------------------------------------------- training


def augment(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per image and one random shift of up to 2 px per batch (padded crop)."""
    flip = torch.rand(len(xb), generator=generator) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    pad = F.pad(xb, (2, 2, 2, 2), value=-MEAN / STD)
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    return pad[:, :, dy : dy + 28, dx : dx + 28]


def train(model: MultiExitResNet, split: Split, *, epochs: int, batch_size: int, lr: float,
          generator: torch.Generator, max_cpu_seconds: float) -> list[dict[str, float]]:
    """SGD (Nesterov, cosine LR per step) on the equal-weight sum of the exits' cross-entropies."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(split.y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15,
                                                anneal_strategy="cos")
    y_all = torch.from_numpy(split.y)
    history: list[dict[str, float]] = []
    cpu0 = time.process_time()
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_all), generator=generator)
        totals = torch.zeros(len(BLOCKS))
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = augment(split.x[idx], generator), y_all[idx]
            losses = torch.stack([F.cross_entropy(o, yb) for o in model(xb)])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            sched.step()
            totals += losses.detach() * len(idx)
        per_exit = (totals / len(perm)).tolist()
        history.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - t0, 1),
                        "train_loss_per_exit": [round(v, 4) for v in per_exit]})
        print(f"epoch {epoch + 1}/{epochs}: loss per exit {[round(v, 3) for v in per_exit]} "
              f"({history[-1]['seconds']} s, cpu {time.process_time() - cpu0:.0f} s)", flush=True)
        if time.process_time() - cpu0 > max_cpu_seconds and epoch + 1 < epochs:
            print(f"stopping early: CPU budget {max_cpu_seconds:.0f} s spent", flush=True)
            break
    return history


@torch.no_grad()
def all_exit_logits(model: MultiExitResNet, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Logits of every exit for every image at full depth: (n, K, C) float32."""
    model.eval()
    chunks = [torch.stack(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).numpy()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=20260406, help="seed for everything (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=12, help="(default: %(default)s)")
    ap.add_argument("--train-size", type=int, default=40_000,
                    help="training images from the 50,000 non-held-out train images (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s; see above)")
    ap.add_argument("--max-cpu-seconds", type=float, default=1800.0,
                    help="stop training after the epoch that crosses this CPU time (default: %(default)s)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train_images, train_labels = load_idx("train")
    test_images, test_labels = load_idx("t10k")
    order = rng.permutation(len(train_labels))
    cal_index, fit_index = np.sort(order[:N_CALIBRATION]), np.sort(order[N_CALIBRATION:])
    if not 0 < args.train_size <= len(fit_index):
        sys.exit(f"error: --train-size must be in 1..{len(fit_index)}")
    fit_index = fit_index[: args.train_size]
    fit = make_split(train_images, train_labels, fit_index, QUALITY_TRAIN, rng)
    cal = make_split(train_images, train_labels, cal_index, QUALITY_EVAL, rng)
    test = make_split(test_images, test_labels, np.arange(len(test_labels)), QUALITY_EVAL, rng)
    print(f"data: train {len(fit.y)}, calibration {len(cal.y)}, test {len(test.y)}", flush=True)

    model = MultiExitResNet()
    block_macs, head_macs, costs = exit_costs(model)
    print(f"cumulative MACs per exit: {costs} (first exit {costs[0] / costs[-1]:.1%} of the last)", flush=True)

    t_train, cpu_train = time.perf_counter(), time.process_time()
    history = train(model, fit, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, generator=gen,
                    max_cpu_seconds=args.max_cpu_seconds)
    train_seconds, train_cpu = time.perf_counter() - t_train, time.process_time() - cpu_train

    reports = {}
    windows = {"calibration": CAL_WINDOW, "test": TEST_WINDOW}
    for name, split, prefix in (("calibration", cal, "fr-cal"), ("test", test, "fr-test")):
        logits = all_exit_logits(model, split.x)
        ts = suite_io.timestamps(len(split.y), windows[name], rng)
        perm = rng.permutation(len(split.y))  # rows in time order: shuffle, then give sorted timestamps
        y, quality, logits = split.y[perm], split.quality[perm], logits[perm]
        suite_io.write_logs(args.out / f"{name}.parquet", prefix=prefix, labels=y, logits=logits,
                            segments={"quality": quality}, ts=ts)
        reports[name] = suite_io.accuracy_report(suite_io.stored(logits), y, {"quality": quality})
        print(f"{name}: accuracy per exit {reports[name]['accuracy']}", flush=True)
        for v, r in reports[name]["segments"]["quality"].items():
            print(f"  quality={v} (n={r['n']}): {r['accuracy']}", flush=True)

    names = [f"block{k + 1}" for k in range(len(BLOCKS))]
    suite_io.write_json(args.out / "card.json", suite_io.card(
        MODEL_NAME, names, costs, list(CLASSES), ["quality"],
        "Thin-deep residual CNN on Fashion-MNIST, 6 exits, cheap first exit (examples/fashion_resnet/train.py)"))
    suite_io.write_json(args.out / "metadata.json", {
        "model": MODEL_NAME,
        "script": "examples/fashion_resnet/train.py",
        "command": (f"python examples/fashion_resnet/train.py --seed {args.seed} --epochs {args.epochs} "
                    f"--train-size {args.train_size} --batch-size {args.batch_size} --lr {args.lr} "
                    f"--threads {args.threads} --max-cpu-seconds {args.max_cpu_seconds:g}"),
        "seed": args.seed,
        "epochs": args.epochs,
        "epochs_run": len(history),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "data": {
            "source": f"Debian package dataset-fashion-mnist ({DATA_DIR})",
            "train_images": len(fit.y),
            "calibration": f"{N_CALIBRATION} images held out from the train set with seed {args.seed} "
                           "(not trained on)",
            "test": "the 10000 images of the official test set",
            "quality_mix": {"train": dict(zip(QUALITY, QUALITY_TRAIN, strict=True)),
                            "calibration": dict(zip(QUALITY, QUALITY_EVAL, strict=True)),
                            "test": dict(zip(QUALITY, QUALITY_EVAL, strict=True))},
            "time_windows": windows,
        },
        "architecture": {
            "stem": {"conv3x3_out": STEM, "stride": 2},
            "blocks": [{"basic_block_out": c, "stride": s} for c, s in BLOCKS],
            "exit_head": f"adaptive avg pool {HEAD_POOL}x{HEAD_POOL} + linear",
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "macs": {"unit": "multiply-accumulates per image (Conv2d + Linear; BN, ReLU, pooling, adds not counted)",
                 "block": block_macs, "head": head_macs, "cumulative_exit_cost": costs,
                 "first_exit_fraction": round(costs[0] / costs[-1], 4)},
        "accuracy": reports,
        "train_history": history,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "weights": "not saved",
        "versions": suite_io.versions(torch=torch.__version__),
    })
    print(f"trained in {train_seconds:.0f} s (cpu {train_cpu:.0f} s); wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
