"""Shared writing helpers for the example models' exit logs (the benchmark suite).

Every ``examples/<name>/train.py`` of the suite writes the same files in the same form as
``examples/fashion_mnist/train.py`` (README "Formats: exit logs and model cards"): wide
Parquet with ``request_id``, ``label``, segment columns, ``ts`` and ``exit_0`` ..
``exit_{K-1}`` as lists of float16 logits, plus ``card.json`` and ``metadata.json``. This
module holds the parts they share so each script keeps only its data and its model.
Dependencies: numpy, pandas, pyarrow (the ``[server]`` extra); no torch.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temp file in the same directory, then os.replace (no half files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON with a trailing newline, written atomically."""
    write_atomic(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def timestamps(n: int, window: tuple[str, str], rng: np.random.Generator) -> pd.DatetimeIndex:
    """n sorted request times in ``window`` with a diurnal pattern (busier in the evening)."""
    start, end = pd.Timestamp(window[0]), pd.Timestamp(window[1])
    span = (end - start).total_seconds()
    out: list[np.ndarray] = []
    while sum(len(o) for o in out) < n:
        t = rng.uniform(0.0, span, size=2 * n)
        hour = (t / 3600.0) % 24.0
        intensity = 0.65 - 0.35 * np.cos(2 * np.pi * (hour - 4.0) / 24.0)
        out.append(t[rng.random(2 * n) < intensity])
    seconds = np.sort(np.concatenate(out)[:n])
    return start + pd.to_timedelta(np.round(seconds * 1e3).astype(np.int64), unit="ms")


def write_logs(path: Path, *, prefix: str, labels: np.ndarray, logits: np.ndarray,
               segments: Mapping[str, np.ndarray], ts: pd.DatetimeIndex | None) -> None:
    """Write the wide exit-log table: one row per sample, one float16 list column per exit.

    ``logits`` is (n, K, C); rows are written in the given order with ids ``prefix-00000``...
    """
    n, k, c = logits.shape
    if len(labels) != n or any(len(v) != n for v in segments.values()):
        raise ValueError(f"{path}: labels/segments must have {n} rows like the logits")
    if not np.isfinite(logits).all():
        raise ValueError(f"{path}: logits must be finite")
    cols: dict[str, pa.Array] = {
        "request_id": pa.array([f"{prefix}-{i:05d}" for i in range(n)], pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64), pa.int64()),
    }
    for name, values in segments.items():
        cols[name] = pa.array(np.asarray(values).astype(str), pa.string())
    if ts is not None:
        cols["ts"] = pa.array(ts.to_numpy(), pa.timestamp("ms", tz="UTC"))
    half = logits.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"{path}: logits overflow float16")
    for j in range(k):
        flat = pa.array(half[:, j, :].ravel(), pa.float16())
        cols[f"exit_{j}"] = pa.FixedSizeListArray.from_arrays(flat, c).cast(pa.list_(pa.float16()))
    table = pa.table(cols)
    write_atomic(path, lambda p: pq.write_table(table, p, compression="zstd", compression_level=19))


def stored(logits: np.ndarray) -> np.ndarray:
    """The logits as they are read back from the files (float16 rounding)."""
    return logits.astype(np.float16).astype(np.float32)


def accuracy_report(logits: np.ndarray, y: np.ndarray, groups: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-exit accuracy overall and per value of every segment column."""
    correct = logits.argmax(axis=2) == y[:, None]
    rep: dict[str, Any] = {"n": len(y), "accuracy": [round(float(v), 4) for v in correct.mean(axis=0)],
                           "segments": {}}
    for col, values in groups.items():
        values = np.asarray(values).astype(str)
        rep["segments"][col] = {
            str(v): {"n": int((values == v).sum()),
                     "accuracy": [round(float(a), 4) for a in correct[values == v].mean(axis=0)]}
            for v in sorted(set(values.tolist()))
        }
    return rep


def card(model: str, exit_names: list[str], costs: list[float | int], classes: list[str],
         segment_columns: list[str], description: str) -> dict[str, Any]:
    """A model card dict; refuses costs that do not strictly increase (they are cumulative)."""
    if len(exit_names) != len(costs):
        raise ValueError("one cost per exit")
    for a, b in itertools.pairwise(costs):
        if not b > a:
            raise ValueError(f"cumulative costs must strictly increase: {costs}")
    return {
        "model": model,
        "version": "1",
        "description": description,
        "exits": [{"name": n, "cost": c} for n, c in zip(exit_names, costs, strict=True)],
        "classes": list(classes),
        "label_column": "label",
        "id_column": "request_id",
        "segment_columns": list(segment_columns),
    }


def versions(**extra: str) -> dict[str, str]:
    """Library versions that decide the outputs."""
    return {"numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version(), **extra}
