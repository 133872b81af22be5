"""Exit logs of the bundled Fashion-MNIST model on a corrupted copy of the official test images.

A monitoring scenario: a policy certified on clean data meets later traffic whose images are
worse. This script does not train; it loads ``model.pt`` (made by ``train.py``), replays
``train.py``'s seeded data preparation to get the very images and rows of ``test.parquet``
(the ``phone`` rows already degraded as there), corrupts every image and writes, in ``--data``
(default ``examples/data/fashion_mnist``):

- ``corrupted.parquet`` -- the same columns, request ids, labels, ``capture`` and ``region`` as
  ``test.parquet``, row for row; timestamps are drawn in the week after the test window, and
  the logits are the model's on the corrupted images;
- a ``"corrupted"`` entry in ``metadata.json``: the command, seed, severity and the accuracy
  per exit, clean and corrupted.

The corruption, in pixel space ([0, 1]) before normalisation: contrast loss -- each image is
blended toward its own mean pixel, ``(1 - a) * x + a * mean(x)`` with ``a = --contrast-loss``
-- then additive Gaussian noise of standard deviation ``--noise`` per pixel, clipped to [0, 1].
The noise comes from ``--seed`` alone and torch runs deterministically on ``--threads`` CPU
threads, so the same command writes the same bytes::

    python examples/fashion_mnist/corrupt.py --seed 20260323 --noise 0.02 --contrast-loss 0.73 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import train as fm  # train.py beside this script: model, data replay and log writing

DEFAULT_MODEL = fm.REPO / "examples" / "fashion_mnist" / "model.pt"
# The week after the test window of train.py.
CORRUPT_WINDOW = ("2026-03-23T00:00:00Z", "2026-03-30T00:00:00Z")
ROW_COLUMNS = ("request_id", "label", "capture", "region")  # must equal test.parquet's, row for row
LOGIT_TOLERANCE = 0.05  # replayed clean logits vs test.parquet's float16 ones (bit-equal on the reference machine)


def corrupt_images(x: torch.Tensor, *, noise: float, contrast_loss: float, rng: np.random.Generator) -> torch.Tensor:
    """Contrast loss toward each image's mean pixel, then Gaussian pixel noise, clipped to [0, 1].

    ``x`` is normalised as the network sees it, shape (n, 1, 28, 28); so is the result. The
    corruption acts on pixels in [0, 1]; all randomness comes from ``rng``.
    """
    pixels = x.numpy().astype(np.float64) * fm.STD + fm.MEAN
    mean = pixels.mean(axis=(-2, -1), keepdims=True)
    out = (1.0 - contrast_loss) * pixels + contrast_loss * mean
    out = np.clip(out + rng.normal(0.0, noise, size=out.shape), 0.0, 1.0)
    return torch.from_numpy(((out - fm.MEAN) / fm.STD).astype(np.float32)).contiguous()


def check_rows(table: pa.Table, clean_logits: np.ndarray, test_path: Path) -> None:
    """Exit unless the replayed rows and clean logits are those of ``test_path`` (a different model or seed)."""
    if not test_path.exists():
        sys.exit(f"error: {test_path} not found; the corrupted logs are a copy of it (run train.py first)")
    ref = pq.read_table(test_path)
    for col in ROW_COLUMNS:
        if col not in ref.column_names or not ref.column(col).equals(table.column(col)):
            sys.exit(f"error: column {col!r} of the replayed test rows differs from {test_path}; "
                     "metadata.json's seed or train size does not match the file")
    k = clean_logits.shape[1]
    stored = np.stack([np.asarray(ref.column(f"exit_{j}").to_pylist(), np.float32) for j in range(k)], axis=1)
    diff = float(np.abs(stored - clean_logits.astype(np.float16).astype(np.float32)).max())
    if diff > LOGIT_TOLERANCE:
        sys.exit(f"error: model logits on the clean test images differ from {test_path} by up to {diff:.3g} "
                 f"(> {LOGIT_TOLERANCE}); is --model the model that wrote it?")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=fm.DEFAULT_OUT,
                    help="directory with test.parquet and metadata.json; corrupted.parquet goes here "
                         "(default: %(default)s)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="weights from train.py (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=20260323,
                    help="seed of the noise and the timestamps (default: %(default)s)")
    ap.add_argument("--noise", type=float, default=0.02,
                    help="standard deviation of the Gaussian pixel noise, pixels in [0, 1] (default: %(default)s)")
    ap.add_argument("--contrast-loss", type=float, default=0.73,
                    help="blend toward each image's mean pixel: 0 keeps the contrast, 1 leaves a flat image "
                         "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.noise >= 0.0:
        sys.exit(f"error: --noise must be >= 0, got {args.noise}")
    if not 0.0 <= args.contrast_loss <= 1.0:
        sys.exit(f"error: --contrast-loss must be in [0, 1], got {args.contrast_loss}")
    if args.threads < 1:
        sys.exit(f"error: --threads must be >= 1, got {args.threads}")

    t_start = time.perf_counter()
    meta_path = args.data / "metadata.json"
    try:
        metadata = json.loads(meta_path.read_text())
        train_seed, train_size = int(metadata["seed"]), int(metadata["data"]["train_images"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: {meta_path}: cannot read train.py's seed and train size ({exc})")
    if not args.model.exists():
        sys.exit(f"error: {args.model} not found; train.py writes it")

    fm.set_deterministic(args.seed, args.threads)
    # Replay train.py's random stream: the splits, then the calibration rows, then the test rows.
    _, cal, test, rng = fm.make_splits(train_seed, train_size)
    fm.log_rows(cal, fm.CAL_WINDOW, rng)
    region, test_ts, perm = fm.log_rows(test, fm.TEST_WINDOW, rng)

    model = fm.MultiExitCNN()
    model.load_state_dict(torch.load(args.model, weights_only=True))
    clean = fm.all_exit_logits(model, test.x)[perm]  # as train.py: logits first, then the row order
    rows, region = fm.reorder(test, perm), region[perm]
    check_rows(fm.logs_table("fm-test", rows, clean, region, test_ts), clean, args.data / "test.parquet")

    noise_rng = np.random.default_rng(args.seed)
    x = corrupt_images(rows.x, noise=args.noise, contrast_loss=args.contrast_loss, rng=noise_rng)
    logits = fm.all_exit_logits(model, x)
    ts = fm.timestamps(len(rows.y), CORRUPT_WINDOW, noise_rng)
    table = fm.logs_table("fm-test", rows, logits, region, ts)
    out = args.data / "corrupted.parquet"
    fm.write_atomic(out, lambda p: pq.write_table(table, p, compression="zstd", compression_level=19))

    groups = {"capture": rows.capture, "region": region}
    # Accuracy of the float16 logits actually written, as train.py reports it.
    reports = {name: fm.accuracy_report(lg.astype(np.float16).astype(np.float32), rows.y, groups)
               for name, lg in (("clean", clean), ("corrupted", logits))}
    for name, rep in reports.items():
        print(f"{name}: accuracy per exit {rep['accuracy']}", flush=True)
    metadata["corrupted"] = {
        "script": "examples/fashion_mnist/corrupt.py",
        "command": (f"python examples/fashion_mnist/corrupt.py --seed {args.seed} --noise {args.noise} "
                    f"--contrast-loss {args.contrast_loss} --threads {args.threads}"),
        "file": "corrupted.parquet",
        "seed": args.seed,
        "noise": args.noise,
        "contrast_loss": args.contrast_loss,
        "threads": args.threads,
        "corruption": "pixels in [0, 1]: x <- (1 - contrast_loss) * x + contrast_loss * mean(x) per image, "
                      "then + N(0, noise^2) per pixel, clipped to [0, 1]",
        "rows": "the rows of test.parquet (request ids, labels, capture, region), the official test images "
                "(phone rows degraded as there) corrupted",
        "time_window": list(CORRUPT_WINDOW),
        "accuracy": reports,
        "accuracy_drop": [round(c - k, 4) for c, k in zip(reports["clean"]["accuracy"],
                                                          reports["corrupted"]["accuracy"], strict=True)],
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "pyarrow": pa.__version__},
    }
    fm.write_atomic(meta_path, lambda p: Path(p).write_text(json.dumps(metadata, indent=2) + "\n"))
    print(f"wrote {out} and {meta_path} in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
