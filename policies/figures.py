"""Every figure exitwise draws, in one place: matplotlib's object API on private Agg canvases.

No pyplot (no global figure registry, no display, no backend state), so drawing is safe in
servers, tests and threads. Figures come out as PNG or SVG bytes; callers write or embed them.

- Reliability diagrams from metrics, one panel per exit, before vs after calibration
  (``exitwise calibrate``): :func:`reliability_figure`, :func:`reliability_png`,
  :func:`save_reliability_png`.
- Figures of a policy document (the audit report and the MLflow mirror): the compute-vs-risk
  curve (:func:`curve_svg`, :func:`curve_png`), the share of traffic per exit
  (:func:`exit_rate_svg`) and the recorded reliability diagrams (:func:`reliability_images`
  for the report's pages, :func:`exit_reliability_png` for one exit).
- :func:`report_figures`: the report's set, memoised on exactly the document fields each reads.

matplotlib is part of the ``[reports]`` extra: code outside that extra reaches this module
through :func:`exitwise.calibration.optional.require`, which names the extra when it is missing.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from exitwise.calibration.atomic import atomic_write_bytes
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.metrics import ExitMetrics, ReliabilityDiagram

__all__ = [
    "BASELINE_LABELS",
    "ReportFigures",
    "baseline_label",
    "curve_png",
    "curve_svg",
    "diagram_from_dict",
    "exit_rate_svg",
    "exit_reliability_png",
    "reference_is_final",
    "reliability_figure",
    "reliability_images",
    "reliability_png",
    "report_figures",
    "save_reliability_png",
]

Diagram = ExitMetrics | ReliabilityDiagram

# ----------------------------------------------------------------------------- reliability from metrics

_BEFORE = "#d95f02"
_AFTER = "#1b9e77"
_LEGEND_ENTRIES = 4  # bars, uncalibrated, calibrated, perfect calibration (see _panel)


def _diagram(m: Diagram) -> ReliabilityDiagram:
    return m.reliability if isinstance(m, ExitMetrics) else m


def _ece(m: Diagram) -> float:
    return m.ece if isinstance(m, ExitMetrics) else m.ece()


def _panel(ax: Axes, name: str, before: Diagram, after: Diagram, label_after: str) -> None:
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
    before: Sequence[Diagram],
    after: Sequence[Diagram],
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
    before: Sequence[Diagram],
    after: Sequence[Diagram],
    *,
    title: str | None = None,
    label_after: str = "calibrated",
    max_cols: int = 4,
    cols: int | None = None,
) -> bytes:
    """The reliability figure rendered to PNG bytes (see :func:`reliability_figure`)."""
    fig = reliability_figure(names, before, after, title=title, label_after=label_after, max_cols=max_cols,
                             cols=cols)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "exitwise"})
    return buf.getvalue()


def save_reliability_png(
    path: str | os.PathLike[str],
    names: Sequence[str],
    before: Sequence[Diagram],
    after: Sequence[Diagram],
    **options: Any,
) -> Path:
    """Write the reliability figure to ``path`` atomically (temp file + ``os.replace``)."""
    target = Path(path)
    atomic_write_bytes(target, reliability_png(names, before, after, **options))
    return target


# ----------------------------------------------------------------------------- figures of a policy document

_RC = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e3e6ea", "grid.linewidth": 0.6, "svg.hashsalt": "exitwise-report",
    "font.family": "DejaVu Sans", "svg.fonttype": "path",
}
_BASELINE_MARKERS: Mapping[str, tuple[str, str]] = {
    "full_depth": ("s", "#6b7280"),
    "global_threshold": ("^", "#d97706"),
    "calm": ("D", "#7c3aed"),
    "per_exit": ("v", "#0891b2"),
    "oracle": ("X", "#059669"),
    "per_sample_oracle": ("p", "#10b981"),
}
BASELINE_LABELS: Mapping[str, str] = {
    "full_depth": "full depth",
    "global_threshold": "one global threshold",
    "calm": "CALM",
    "per_exit": "per-exit thresholds",
    "oracle": "oracle (fit on the evaluation data)",
    "per_sample_oracle": "per-sample oracle",
}


def baseline_label(name: str) -> str:
    """How a baseline of ``expected.baselines`` is called in figures and tables."""
    return BASELINE_LABELS.get(name, name.replace("_", " "))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _figure(width_in: float, height_in: float) -> Figure:
    """A figure on a private Agg canvas: no pyplot global state, safe in server threads."""
    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _svg(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def _png(fig: Figure, dpi: int = 160) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def _curve(doc: Mapping[str, Any]) -> Figure | None:
    """Compute fraction against held-out risk: the solver's curve, the chosen point, the baselines, ε."""
    exp = doc.get("expected") or {}
    curve = [p for p in exp.get("curve") or [] if _finite(p.get("risk")) and _finite(p.get("compute_fraction"))]
    chosen = (exp.get("risk"), exp.get("compute_fraction"))
    if not curve and not all(_finite(v) for v in chosen):
        return None
    eps = (doc.get("guarantee") or {}).get("eps")
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    if curve:
        pts = sorted(curve, key=lambda p: p["risk"])
        xs, ys = [100 * p["risk"] for p in pts], [100 * p["compute_fraction"] for p in pts]
        ax.plot(xs, ys, "-", color="#2563eb", lw=1.5, label="candidate policies (solver)")
        cert = [p.get("certified") is not False for p in pts]
        ax.plot([x for x, c in zip(xs, cert, strict=True) if c], [y for y, c in zip(ys, cert, strict=True) if c],
                "o", color="#2563eb", ms=3.5, ls="none")
        if not all(cert):
            ax.plot([x for x, c in zip(xs, cert, strict=True) if not c],
                    [y for y, c in zip(ys, cert, strict=True) if not c], "o", mfc="white", mec="#2563eb",
                    ms=3.5, ls="none", label="candidate failing certification")
    for name, base in (exp.get("baselines") or {}).items():
        if not isinstance(base, Mapping) or not _finite(base.get("compute_fraction")):
            continue
        marker, colour = _BASELINE_MARKERS.get(name, ("P", "#475569"))
        risk = base.get("risk") if _finite(base.get("risk")) else 0.0
        ax.plot([100 * risk], [100 * base["compute_fraction"]], marker, color=colour, ms=7,
                ls="none", label=baseline_label(name))
    if all(_finite(v) for v in chosen):
        ax.plot([100 * chosen[0]], [100 * chosen[1]], "*", color="#dc2626", ms=15, mec="white", mew=0.8,
                ls="none", label="this policy", zorder=5)
    if _finite(eps):
        ax.axvline(100 * eps, color="#dc2626", ls="--", lw=1, label=f"budget ε = {100.0 * eps:.2f}%")
    ax.set_xlabel(f"{(doc.get('guarantee') or {}).get('risk', 'risk').replace('_', ' ')} on held-out data (%)")
    ax.set_ylabel("compute fraction (% of full depth)")
    xmax = max([ax.get_xlim()[1], *([100 * eps * 1.1] if _finite(eps) else [])])
    ax.set_xlim(-0.03 * xmax, xmax)
    ax.set_ylim(0, 105)
    for artist in ax.lines:
        artist.set_clip_on(False)
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    return fig


def curve_svg(doc: Mapping[str, Any]) -> bytes | None:
    """The compute-vs-risk figure as SVG (the report); None when the document records nothing to draw."""
    with matplotlib.rc_context(_RC):
        fig = _curve(doc)
        return None if fig is None else _svg(fig)


def curve_png(doc: Mapping[str, Any]) -> bytes | None:
    """The compute-vs-risk figure as PNG (the MLflow run's plot); None when there is nothing to draw."""
    with matplotlib.rc_context(_RC):
        fig = _curve(doc)
        return None if fig is None else _png(fig)


def exit_rate_svg(doc: Mapping[str, Any]) -> bytes | None:
    """Bar chart of the share of traffic answered at each exit, as SVG; None without ``expected.exit_rate``."""
    rates = (doc.get("expected") or {}).get("exit_rate")
    exits = doc.get("exits") or []
    if not rates or len(rates) != len(exits):
        return None
    with matplotlib.rc_context(_RC):
        fig = _figure(7.0, 1.9)
        ax = fig.add_subplot()
        names = [str(e.get("name", i)) for i, e in enumerate(exits)]
        colours = ["#2563eb"] * (len(names) - 1) + ["#9ca3af"]
        bars = ax.bar(names, [100 * float(r) for r in rates], color=colours, width=0.6)
        for bar, r in zip(bars, rates, strict=True):
            label = f"{100.0 * r:.1f}%" if _finite(r) else "—"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_ylabel("share of traffic (%)")
        ax.set_ylim(0, max(100 * max(rates) * 1.18, 5))
        ax.grid(axis="x", visible=False)
        return _svg(fig)


def _reliability_data(exit_entry: Mapping[str, Any], which: str) -> Mapping[str, Any] | None:
    """The bin data (``confidence``, ``accuracy``, ``count``) recorded for ``before``/``after``."""
    rel = exit_entry.get("reliability")
    if isinstance(rel, Mapping):
        d = rel.get(which)
        if isinstance(d, Mapping):
            return d
    d = (exit_entry.get(which) or {}).get("reliability")
    return d if isinstance(d, Mapping) else None


def diagram_from_dict(data: Mapping[str, Any]) -> ReliabilityDiagram:
    """A :class:`~exitwise.calibration.metrics.ReliabilityDiagram` from its JSON form (``to_dict``)."""
    count = np.asarray(data.get("count") or [], dtype=np.int64)
    m = count.shape[0]

    def arr(key: str) -> np.ndarray:
        vals = list(data.get(key) or [])
        if len(vals) != m:
            raise ValueError(f"reliability data: {key!r} has {len(vals)} bins, count has {m}")
        return np.asarray([np.nan if v is None else float(v) for v in vals], dtype=np.float64)

    edges = data.get("edges")
    edges_arr = (np.asarray(edges, dtype=np.float64) if edges and len(edges) == m + 1
                 else np.linspace(0.0, 1.0, m + 1))
    return ReliabilityDiagram(binning=str(data.get("binning", "width")), edges=edges_arr,
                              confidence=arr("confidence"), accuracy=arr("accuracy"), count=count)


def reference_is_final(calibration: Mapping[str, Any]) -> bool:
    """True when calibration was measured against the final exit's answers (not labels)."""
    return calibration.get("target") == "final"


def reliability_images(doc: Mapping[str, Any], per_image: int = 4) -> list[bytes]:
    """PNGs of the reliability diagrams of every exit that records bin data (the report's pages).

    At most ``per_image`` exits per image, always two panel columns, so every image fits an A4
    page with panels of one size. When the calibration target is the final exit's answers, the
    final exit is left out: it agrees with itself by definition, so its diagram says nothing.
    """
    cal = doc.get("calibration") or {}
    exits = list(cal.get("exits") or [])
    if reference_is_final(cal) and exits:
        exits = exits[:-1]
    entries = [e for e in exits
               if _reliability_data(e, "before") is not None and _reliability_data(e, "after") is not None]
    images = []
    for start in range(0, len(entries), per_image):
        chunk = entries[start:start + per_image]
        images.append(reliability_png(
            [str(e.get("name", start + i)) for i, e in enumerate(chunk)],
            [diagram_from_dict(_reliability_data(e, "before") or {}) for e in chunk],
            [diagram_from_dict(_reliability_data(e, "after") or {}) for e in chunk],
            cols=2,
        ))
    return images


def exit_reliability_png(exit_entry: Mapping[str, Any]) -> bytes | None:
    """PNG of one exit's reliability diagram (a ``calibration.exits`` entry); None unless it records both sides."""
    before, after = _reliability_data(exit_entry, "before"), _reliability_data(exit_entry, "after")
    if before is None or after is None:
        return None
    return reliability_png([str(exit_entry.get("name", ""))], [diagram_from_dict(before)], [diagram_from_dict(after)])


# ----------------------------------------------------------------------------- the report's set, memoised


@dataclass(frozen=True)
class ReportFigures:
    """Every figure of an audit report; a function of the policy document alone."""

    curve_svg: bytes | None
    exit_rate_svg: bytes | None
    reliability_pngs: tuple[bytes, ...]


def report_figures(doc: Mapping[str, Any]) -> ReportFigures:
    """The report's figures for ``doc``, each memoised on exactly the fields it draws.

    Drawing them is most of the cost of an HTML report, and the same version's report is
    asked for again and again (API, MLflow, approval hook). Each key is the JSON of every
    field the figure reads, so a changed document never gets a stale figure.
    """
    g, exp = doc.get("guarantee") or {}, doc.get("expected") or {}
    cal = doc.get("calibration") or {}
    curve_part = {"expected": {k: exp.get(k) for k in ("curve", "baselines", "risk", "compute_fraction")},
                  "guarantee": {"eps": g.get("eps"), "risk": g.get("risk")}}
    rate_part = {"expected": {"exit_rate": exp.get("exit_rate")}, "exits": doc.get("exits")}
    rel_part = {"calibration": {"exits": cal.get("exits"), "target": cal.get("target")}}
    return ReportFigures(_memo(curve_svg, _key(curve_part)), _memo(exit_rate_svg, _key(rate_part)),
                         tuple(_memo(reliability_images, _key(rel_part))))


def _key(part: Mapping[str, Any]) -> str:
    return json.dumps(part, sort_keys=True, default=str, allow_nan=True)


@lru_cache(maxsize=64)
def _memo(draw: Callable[[Mapping[str, Any]], Any], key: str) -> Any:
    out = draw(json.loads(key))
    return tuple(out) if isinstance(out, list) else out


def monitor_svg(points: Sequence[Mapping[str, Any]], max_panels: int = 4) -> bytes | None:
    """The anytime-valid risk bounds after every shadow batch against ε, one panel per segment (SVG).

    ``points`` are :meth:`exitwise.policies.monitoring.Point.to_json` dicts of one version in one
    environment; None when there are none.
    """
    by_segment: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        by_segment.setdefault(str(p["segment"]), []).append(p)
    if not by_segment:
        return None
    names = list(by_segment)[:max_panels]
    with matplotlib.rc_context(_RC):
        fig = _figure(3.4 * len(names), 3.0)
        axes = fig.subplots(1, len(names), squeeze=False)[0]
        for ax, name in zip(axes, names, strict=True):
            pts = by_segment[name]
            n = [p["n"] for p in pts]
            eps = float(pts[-1]["eps"])
            ax.fill_between(n, [100 * p["lower"] for p in pts], [100 * p["upper"] for p in pts], color="#bfdbfe",
                            step="post", label="bound (lower..upper)")
            ax.step(n, [100 * p["lower"] for p in pts], where="post", color="#2563eb", lw=1.5, label="lower bound")
            risk = [(x, 100 * p["risk"]) for x, p in zip(n, pts, strict=True) if _finite(p.get("risk"))]
            if risk:
                ax.plot(*zip(*risk, strict=True), "o", color="#0f172a", ms=2.5, label="realised risk")
            ax.axhline(100 * eps, color="#dc2626", ls="--", lw=1, label="budget ε")
            ax.set_title(f"{name} (ε = {100 * eps:.2f}%)", fontsize=9)
            ax.set_xlabel("shadow rows")
            seen = [100 * p["lower"] for p in pts] + [r for _, r in risk]
            ax.set_ylim(0, min(100.0, max(3 * 100 * eps, 1.25 * max(seen))))
        axes[0].set_ylabel("risk (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
        return _svg(fig)
