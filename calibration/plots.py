"""Reliability diagrams as PNG: one panel per exit, before vs after calibration.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend
state), so it is safe in servers, tests and threads. :func:`reliability_png` returns bytes
for the report and the MLflow mirror; :func:`save_reliability_png` writes a file atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from exitwise.calibration.atomic import atomic_write_bytes
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.metrics import ExitMetrics, ReliabilityDiagram

__all__ = ["reliability_figure", "reliability_png", "save_reliability_png"]

_BEFORE = "#d95f02"
_AFTER = "#1b9e77"
_LEGEND_ENTRIES = 4  # bars, uncalibrated, calibrated, perfect calibration (see _panel)


def _diagram(m: ExitMetrics | ReliabilityDiagram) -> ReliabilityDiagram:
    return m.reliability if isinstance(m, ExitMetrics) else m


def _ece(m: ExitMetrics | ReliabilityDiagram) -> float:
    return m.ece if isinstance(m, ExitMetrics) else m.ece()


def _panel(ax, name: str, before: ExitMetrics | ReliabilityDiagram, after: ExitMetrics | ReliabilityDiagram,
           label_after: str) -> None:
    rb, ra = _diagram(before), _diagram(after)
    edges = ra.edges
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    filled = ra.count > 0
    ax.bar(centers[filled], ra.accuracy[filled], width=width[filled] * 0.9, color=_AFTER, alpha=0.55,
           edgecolor=_AFTER, linewidth=0.8, label=f"{label_after} (accuracy per bin)")
    fb = rb.count > 0
    ax.plot(rb.confidence[fb], rb.accuracy[fb], "o-", color=_BEFORE, markersize=3.5, linewidth=1.4,
            label="uncalibrated")
    ax.plot(ra.confidence[filled], ra.accuracy[filled], "s-", color=_AFTER, markersize=3.5, linewidth=1.4,
            label=label_after)
    ax.plot([0, 1], [0, 1], "--", color="0.35", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.set_title(f"{name}\nECE {_ece(before):.3f} \u2192 {_ece(after):.3f}", fontsize=10)
    ax.tick_params(labelsize=8)


def reliability_figure(
    names: Sequence[str],
    before: Sequence[ExitMetrics | ReliabilityDiagram],
    after: Sequence[ExitMetrics | ReliabilityDiagram],
    *,
    title: str | None = None,
    label_after: str = "calibrated",
    max_cols: int = 4,
    cols: int | None = None,
) -> Figure:
    """A figure with one reliability panel per exit (equal-width bins), before vs after.

    ``cols`` fixes the number of panel columns (empty slots stay blank), so figures drawn in
    chunks share one panel size and one legend width; by default rows are balanced under
    ``max_cols``.
    """
    if not (len(names) == len(before) == len(after)) or not names:
        raise InputError(
            f"need one name, one 'before' and one 'after' per exit; got {len(names)}, {len(before)}, {len(after)}"
        )
    k = len(names)
    if cols is None:
        rows = math.ceil(k / max(1, max_cols))
        cols = math.ceil(k / rows)  # balanced rows: 5 exits -> 3 + 2, not 4 + 1
    elif cols < 1:
        raise InputError(f"cols must be at least 1, got {cols}")
    else:
        rows = math.ceil(k / cols)
    # Fixed margins (in inches) instead of constrained layout, which draws the figure twice.
    legend_cols = min(_LEGEND_ENTRIES, 2 * cols)  # at most two legend entries per panel column
    legend_rows = math.ceil(_LEGEND_ENTRIES / legend_cols)
    extra = 0.22 * (legend_rows - 1)
    width, height = 3.1 * cols + 0.8, 3.2 * rows + 1.3 + extra
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    top = 0.95 if title else 0.6
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.3 / width, bottom=(0.95 + extra) / height, top=1 - top / height,
                        wspace=0.25, hspace=0.45)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.set_visible(False)
            continue
        _panel(ax, names[i], before[i], after[i], label_after)
        if i % cols == 0:
            ax.set_ylabel("accuracy", fontsize=9)
        if i // cols == rows - 1 or i + cols >= k:
            ax.set_xlabel("confidence", fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(legend_cols, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    return fig


def reliability_png(
    names: Sequence[str],
    before: Sequence[ExitMetrics | ReliabilityDiagram],
    after: Sequence[ExitMetrics | ReliabilityDiagram],
    **kwargs: object,
) -> bytes:
    """The reliability figure rendered to PNG bytes (see :func:`reliability_figure`)."""
    fig = reliability_figure(names, before, after, **kwargs)  # type: ignore[arg-type]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "exitwise"})
    return buf.getvalue()


def save_reliability_png(
    path: str | os.PathLike[str],
    names: Sequence[str],
    before: Sequence[ExitMetrics | ReliabilityDiagram],
    after: Sequence[ExitMetrics | ReliabilityDiagram],
    **kwargs: object,
) -> Path:
    """Write the reliability figure to ``path`` atomically (temp file + ``os.replace``)."""
    data = reliability_png(names, before, after, **kwargs)
    target = Path(path)
    atomic_write_bytes(target, data)
    return target
