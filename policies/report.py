"""Audit report of one policy version (issue 7): self-contained HTML and PDF from one template.

A reviewer reads it without knowing the code: what the policy does and risks (in numbers,
at the top), who wrote and approved it, what evidence it stands on, how the exits were
calibrated, the thresholds, the guarantee, the compute it saves, and what changed against
the version it replaces, with the version's audit events as a timeline.

Pieces, from pure to effectful:

- :class:`ReportContext` holds every fact the report shows (the document plus governance
  facts, audit events, the diff against the parent and the audit-chain check at render time).
- :func:`render_html` is a pure function of the context: the template, its CSS and every
  figure (matplotlib Agg, inlined as base64 SVG/PNG data URIs) end up in one HTML string.
- :func:`render_pdf` turns that HTML into PDF with WeasyPrint, so both formats share it.
- :func:`build_context` collects the facts from the store's services; :func:`report_bytes`,
  :func:`report_response` and :func:`write_report` are what the CLI, the REST API, MLflow and
  the approval hook call.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from markupsafe import Markup

from exitwise.calibration.atomic import atomic_write_bytes
from exitwise.calibration.exceptions import InputError

_log = logging.getLogger(__name__)

Format = Literal["html", "pdf"]
FORMATS: tuple[str, ...] = ("html", "pdf")
MEDIA_TYPES: Mapping[str, str] = {"html": "text/html; charset=utf-8", "pdf": "application/pdf"}
ALL_SEGMENTS = "__all__"
ACTION_LABELS: Mapping[str, str] = {
    "version.create": "created", "version.approve": "approved", "version.activate": "activated",
    "version.rollback": "re-activated by rollback", "version.retire": "retired",
    "killswitch.kill": "kill switch turned ON", "killswitch.unkill": "kill switch turned OFF",
}
EXITS_PER_TABLE = 6  # threshold tables wider than this are split by exit so they fit A4 portrait
MAX_LISTED_CHANGES = 40  # individual threshold changes listed in the diff; the rest are counted

# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Approval:
    """One approval of the version (four eyes: never the author)."""

    principal: str
    at: dt.datetime | str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class EnvironmentStatus:
    """Where the version stands in one environment, and that environment's kill switch."""

    environment: str
    state: str  # e.g. "active", "superseded", "retired", "not deployed"
    killed: bool = False
    since: dt.datetime | str | None = None
    active_version: int | None = None  # the version active there now (may be another one)


@dataclass(frozen=True)
class AuditEvent:
    """One audit-trail event of the version, as the store returns it."""

    at: dt.datetime | str | None
    actor: str
    action: str
    reason: str | None = None
    environment: str | None = None
    before_hash: str | None = None
    after_hash: str | None = None
    seq: int | None = None
    event_hash: str | None = None


@dataclass(frozen=True)
class ChainVerification:
    """The result of verifying the audit hash chain when the report was rendered."""

    ok: bool
    checked: int
    message: str = ""
    verified_at: dt.datetime | str | None = None


@dataclass(frozen=True)
class FieldChange:
    """One scalar that may differ between the parent version and this one."""

    group: str
    label: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class ThresholdChange:
    """One threshold cell (segment, exit, class) that differs from the parent version."""

    segment: str
    exit: str
    cls: str
    before: float | None  # None = never exit
    after: float | None


@dataclass(frozen=True)
class PolicyDiff:
    """What changed against the parent version: scalars, and threshold cells one by one."""

    parent_version: int | None
    parent_hash: str | None
    fields: tuple[FieldChange, ...]
    threshold_changes: tuple[ThresholdChange, ...]
    cells_compared: int
    comparable: bool = True  # False when exits or classes differ, so cells cannot be paired
    note: str = ""


@dataclass(frozen=True)
class ReportContext:
    """Every fact the report shows; :func:`render_html` is a pure function of it."""

    document: Mapping[str, Any]
    version: int | None = None
    state: str | None = None
    author: str | None = None
    created_at: dt.datetime | str | None = None
    approvals: tuple[Approval, ...] = ()
    environments: tuple[EnvironmentStatus, ...] = ()
    audit_events: tuple[AuditEvent, ...] = ()
    chain: ChainVerification | None = None
    diff: PolicyDiff | None = None
    generated_at: dt.datetime | str | None = None
    mlflow_run_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # more summary rows, shown as given

    @property
    def model(self) -> str:
        return str(self.document.get("model", {}).get("name", "?"))


# --------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt_pct(x: Any, digits: int = 1) -> str:
    """``0.4123 -> '41.2%'``; an em dash when the value is missing."""
    return f"{100.0 * x:.{digits}f}%" if _finite(x) else "—"


def fmt_risk(x: Any) -> str:
    """Risks, budgets and bounds as a percentage with two decimals (``0.00873 -> '0.87%'``)."""
    return fmt_pct(x, 2)


def fmt_num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "—"


def fmt_int(x: Any) -> str:
    return f"{int(x):,}" if _finite(x) else "—"


def fmt_cost(x: Any) -> str:
    """Costs in any unit with an SI prefix: ``1.9e6 -> '1.90 M'``."""
    if not _finite(x):
        return "—"
    for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def fmt_time(t: Any) -> str:
    """A datetime or ISO string as ``YYYY-MM-DD HH:MM UTC``."""
    if t is None or t == "":
        return "—"
    if isinstance(t, str):
        try:
            t = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            return t
    if isinstance(t, dt.datetime):
        if t.tzinfo is not None:
            t = t.astimezone(dt.UTC)
        return t.strftime("%Y-%m-%d %H:%M UTC")
    return str(t)


def short_hash(h: Any, n: int = 12) -> str:
    if not h:
        return "—"
    s = str(h)
    return s.split(":", 1)[1][:n] if s.startswith("sha256:") else s[:n]


def _fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt_value(x) for x in v) or "—"
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items()) or "—"
    return str(v)


# --------------------------------------------------------------------------- diff


def _cells(doc: Mapping[str, Any], segment: str) -> list[list[float | None]]:
    """The (K-1) x C threshold cells of ``segment`` (default when absent); None = never exit."""
    k, c = len(doc["exits"]), len(doc["classes"])
    table = doc.get("thresholds") or {}
    rows = table.get(segment, table.get("default")) if segment in table else table.get("default")
    out: list[list[float | None]] = [[None] * c for _ in range(k - 1)]
    if rows is None:
        return out
    for j, row in enumerate(rows[: k - 1]):
        if row is not None:
            out[j] = [None if v is None else float(v) for v in row[:c]]
    return out


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-12


def _overall_bound(doc: Mapping[str, Any]) -> Any:
    seg = (doc.get("guarantee") or {}).get("segments") or {}
    return (seg.get(ALL_SEGMENTS) or {}).get("upper_bound")


def diff_policies(parent: Mapping[str, Any] | None, doc: Mapping[str, Any], *,
                  parent_version: int | None = None) -> PolicyDiff | None:
    """Differences between ``parent`` and ``doc``: guarantee, expected compute and thresholds.

    Threshold cells are compared per (segment, exit, class) over the union of both
    documents' segments (a segment missing on one side reads as that side's default, as the
    decision rule does). When exits or classes differ the cells are not paired.
    """
    if parent is None:
        return None
    pg, g = parent.get("guarantee") or {}, doc.get("guarantee") or {}
    pe, e = parent.get("expected") or {}, doc.get("expected") or {}
    pf, f = parent.get("forced_full_depth") or {}, doc.get("forced_full_depth") or {}
    pb, b = pe.get("batch_compute_fraction") or {}, e.get("batch_compute_fraction") or {}
    fields = [
        FieldChange("guarantee", "risk", str(pg.get("risk", "—")), str(g.get("risk", "—"))),
        FieldChange("guarantee", "budget ε", fmt_risk(pg.get("eps")), fmt_risk(g.get("eps"))),
        FieldChange("guarantee", "δ (1 − confidence)", fmt_num(pg.get("delta"), 3), fmt_num(g.get("delta"), 3)),
        FieldChange("guarantee", "method", str(pg.get("method", "—")), str(g.get("method", "—"))),
        FieldChange("guarantee", "certification rows", fmt_int(pg.get("n")), fmt_int(g.get("n"))),
        FieldChange("guarantee", "certified", _fmt_value(pg.get("certified")), _fmt_value(g.get("certified"))),
        FieldChange("guarantee", "certified upper bound (all traffic)", fmt_risk(_overall_bound(parent)),
                    fmt_risk(_overall_bound(doc))),
        FieldChange("guarantee", "uncertified segments", _fmt_value(sorted(pg.get("uncertified_segments") or [])),
                    _fmt_value(sorted(g.get("uncertified_segments") or []))),
        FieldChange("expected", "compute fraction", fmt_pct(pe.get("compute_fraction")),
                    fmt_pct(e.get("compute_fraction"))),
        *[FieldChange("expected", f"compute fraction, batch {bs}", fmt_pct(pb.get(bs)), fmt_pct(b.get(bs)))
          for bs in sorted(set(pb) | set(b), key=lambda s: (len(s), s))],
        FieldChange("expected", "held-out risk", fmt_risk(pe.get("risk")), fmt_risk(e.get("risk"))),
        FieldChange("decision", "score", str(parent.get("score", "—")), str(doc.get("score", "—"))),
        FieldChange("decision", "max_exit", _fmt_value(parent.get("max_exit")), _fmt_value(doc.get("max_exit"))),
        FieldChange("decision", "shadow rate", fmt_pct(parent.get("shadow_rate"), 2),
                    fmt_pct(doc.get("shadow_rate"), 2)),
        FieldChange("decision", "forced full-depth classes", _fmt_value(sorted(pf.get("classes") or [])),
                    _fmt_value(sorted(f.get("classes") or []))),
        FieldChange("decision", "forced full-depth segments", _fmt_value(sorted(pf.get("segments") or [])),
                    _fmt_value(sorted(f.get("segments") or []))),
        FieldChange("evidence", "data fingerprint", short_hash((parent.get("data") or {}).get("fingerprint"), 16),
                    short_hash((doc.get("data") or {}).get("fingerprint"), 16)),
    ]
    p_exits = [x.get("name") for x in parent.get("exits") or []]
    exits = [x.get("name") for x in doc.get("exits") or []]
    if p_exits != exits or list(parent.get("classes") or []) != list(doc.get("classes") or []):
        return PolicyDiff(parent_version, parent.get("content_hash"), tuple(fields), (), 0, comparable=False,
                          note="The exits or classes differ from the parent version, so thresholds are not compared "
                               "cell by cell.")
    named = (set(parent.get("thresholds") or {}) | set(doc.get("thresholds") or {})) - {"default"}
    segments = ["default", *sorted(named)]
    changes: list[ThresholdChange] = []
    compared = 0
    for seg in segments:
        before, after = _cells(parent, seg), _cells(doc, seg)
        for j, name in enumerate(exits[:-1]):
            for ci, cls in enumerate(doc["classes"]):
                compared += 1
                if not _same(before[j][ci], after[j][ci]):
                    changes.append(ThresholdChange(seg, str(name), str(cls), before[j][ci], after[j][ci]))
    return PolicyDiff(parent_version, parent.get("content_hash"), tuple(fields), tuple(changes), compared)


# --------------------------------------------------------------------------- figures


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure(width_in: float, height_in: float):  # -> matplotlib.figure.Figure
    """A figure on a private Agg canvas: no pyplot global state, safe in server threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_RC = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e3e6ea", "grid.linewidth": 0.6, "svg.hashsalt": "exitwise-report",
    "font.family": "DejaVu Sans", "svg.fonttype": "path",
}


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight", pad_inches=0.05)
    return _data_uri(buf.getvalue(), "image/svg+xml")


def _png(fig, dpi: int = 160) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.05)
    return _data_uri(buf.getvalue(), "image/png")


_BASELINE_STYLE = {
    "full_depth": ("s", "#6b7280", "full depth"),
    "global_threshold": ("^", "#d97706", "one global threshold"),
    "calm": ("D", "#7c3aed", "CALM"),
    "per_exit": ("v", "#0891b2", "per-exit thresholds"),
    "oracle": ("X", "#059669", "oracle (fit on the evaluation data)"),
    "per_sample_oracle": ("p", "#10b981", "per-sample oracle"),
}


def curve_figure(doc: Mapping[str, Any]) -> str | None:
    """Compute fraction against held-out risk: the solver's curve, the chosen point, the baselines, ε."""
    import matplotlib

    exp = doc.get("expected") or {}
    curve = [p for p in exp.get("curve") or [] if _finite(p.get("risk")) and _finite(p.get("compute_fraction"))]
    chosen = (exp.get("risk"), exp.get("compute_fraction"))
    if not curve and not all(_finite(v) for v in chosen):
        return None
    eps = (doc.get("guarantee") or {}).get("eps")
    with matplotlib.rc_context(_RC):
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
            marker, colour, label = _BASELINE_STYLE.get(name, ("P", "#475569", name.replace("_", " ")))
            risk = base.get("risk") if _finite(base.get("risk")) else 0.0
            ax.plot([100 * risk], [100 * base["compute_fraction"]], marker, color=colour, ms=7,
                    ls="none", label=label)
        if all(_finite(v) for v in chosen):
            ax.plot([100 * chosen[0]], [100 * chosen[1]], "*", color="#dc2626", ms=15, mec="white", mew=0.8,
                    ls="none", label="this policy", zorder=5)
        if _finite(eps):
            ax.axvline(100 * eps, color="#dc2626", ls="--", lw=1, label=f"budget ε = {fmt_risk(eps)}")
        ax.set_xlabel(f"{(doc.get('guarantee') or {}).get('risk', 'risk').replace('_', ' ')} on held-out data (%)")
        ax.set_ylabel("compute fraction (% of full depth)")
        xmax = max([ax.get_xlim()[1], *([100 * eps * 1.1] if _finite(eps) else [])])
        ax.set_xlim(-0.03 * xmax, xmax)
        ax.set_ylim(0, 105)
        for artist in ax.lines:
            artist.set_clip_on(False)
        fig.legend(loc="outside lower center", ncol=2, frameon=False)
        return _svg(fig)


def exit_rate_figure(doc: Mapping[str, Any]) -> str | None:
    """Bar chart: the share of traffic answered at each exit."""
    import matplotlib

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
            ax.annotate(fmt_pct(r), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
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


def _diagram(data: Mapping[str, Any]):  # -> calibration.metrics.ReliabilityDiagram
    """A ``exitwise.calibration.metrics.ReliabilityDiagram`` from its JSON form (``to_dict``)."""
    import numpy as np

    from exitwise.calibration.metrics import ReliabilityDiagram

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


def reliability_images(doc: Mapping[str, Any], per_image: int = 4) -> list[str]:
    """Reliability diagrams of every exit that records bin data, as PNG data URIs.

    Drawn by ``exitwise.calibration.plots`` (one panel per exit, before vs after), at most
    ``per_image`` exits per image, always two panel columns, so every image fits an A4 page
    with panels of one size; falls back to one small figure per exit drawn here when that
    module is missing. When the calibration target is the final exit's answers, the final
    exit is left out: it agrees with itself by definition, so its diagram says nothing.
    """
    cal = doc.get("calibration") or {}
    exits = list(cal.get("exits") or [])
    if _reference_is_final(cal) and exits:
        exits = exits[:-1]
    entries = [e for e in exits
               if _reliability_data(e, "before") is not None and _reliability_data(e, "after") is not None]
    if not entries:
        return []
    try:
        from exitwise.calibration import plots
    except ImportError:
        plots = None  # type: ignore[assignment]
    if plots is None:
        return [uri for uri in (reliability_figure(e) for e in entries) if uri]
    images = []
    for start in range(0, len(entries), per_image):
        chunk = entries[start:start + per_image]
        png = plots.reliability_png(
            [str(e.get("name", start + i)) for i, e in enumerate(chunk)],
            [_diagram(_reliability_data(e, "before") or {}) for e in chunk],
            [_diagram(_reliability_data(e, "after") or {}) for e in chunk],
            cols=2,
        )
        images.append(_data_uri(png, "image/png"))
    return images


def _reference_is_final(cal: Mapping[str, Any]) -> bool:
    """True when calibration was measured against the final exit's answers (not labels)."""
    return cal.get("target") == "final"


def reliability_figure(exit_entry: Mapping[str, Any]) -> str | None:
    """Reliability diagram of one exit (before and after calibration) as a PNG data URI.

    Uses ``exitwise.calibration.plots`` when present, else draws it here; None when the exit's entry
    records no reliability data. (The MLflow mirror attaches these per exit.)
    """
    before, after = _reliability_data(exit_entry, "before"), _reliability_data(exit_entry, "after")
    if before is None and after is None:
        return None
    name = str(exit_entry.get("name", ""))
    if before is not None and after is not None:
        try:
            from exitwise.calibration import plots
        except ImportError:
            pass
        else:
            return _data_uri(plots.reliability_png([name], [_diagram(before)], [_diagram(after)]), "image/png")
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _figure(3.0, 2.8)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], ls=":", color="#9ca3af", lw=1, label="perfect calibration")
        for data, colour, label in ((before, "#9ca3af", "before"), (after, "#2563eb", "after")):
            if data is None:
                continue
            conf, acc = _bins(data)
            if conf:
                ax.plot(conf, acc, "-o", color=colour, ms=3.5, lw=1.4, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend(loc="upper left", frameon=False)
        return _png(fig)


def _bins(data: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """(confidence, accuracy) of the non-empty bins of a reliability-diagram record."""
    conf = data.get("confidence") or []
    acc = data.get("accuracy") or []
    count = data.get("count") or [1] * len(conf)
    pts = [(float(c), float(a)) for c, a, n in zip(conf, acc, count, strict=False)
           if _finite(c) and _finite(a) and n]
    return [p[0] for p in pts], [p[1] for p in pts]


@dataclass(frozen=True)
class Figures:
    """Every figure of a report as a data URI; a function of the document alone."""

    curve: str | None
    exit_rate: str | None
    reliability: tuple[str, ...]


def figures(doc: Mapping[str, Any]) -> Figures:
    """The report's figures for ``doc``, each memoised on exactly the fields it draws.

    Drawing them is most of the cost of an HTML report, and the same version's report is
    asked for again and again (API, MLflow, approval hook). Each key is the JSON of every
    field the figure reads, so a changed document never gets a stale figure.
    """
    g, exp = doc.get("guarantee") or {}, doc.get("expected") or {}
    curve_part = {"expected": {k: exp.get(k) for k in ("curve", "baselines", "risk", "compute_fraction")},
                  "guarantee": {"eps": g.get("eps"), "risk": g.get("risk")}}
    rate_part = {"expected": {"exit_rate": exp.get("exit_rate")}, "exits": doc.get("exits")}
    rel_part = {"calibration": {"exits": (doc.get("calibration") or {}).get("exits")}}
    return Figures(_memo(curve_figure, _key(curve_part)), _memo(exit_rate_figure, _key(rate_part)),
                   tuple(_memo(reliability_images, _key(rel_part)) or ()))


def _key(part: Mapping[str, Any]) -> str:
    return json.dumps(part, sort_keys=True, default=str, allow_nan=True)


@lru_cache(maxsize=64)
def _memo(fn: Any, key: str) -> Any:
    out = fn(json.loads(key))
    return tuple(out) if isinstance(out, list) else out


# --------------------------------------------------------------------------- view model


@dataclass(frozen=True)
class Cell:
    text: str
    css: str = ""
    title: str = ""


@dataclass(frozen=True)
class ThresholdTable:
    segment: str
    heading: str
    note: str
    exit_headers: tuple[str, ...]
    rows: tuple[tuple[str, bool, tuple[Cell, ...]], ...]  # (class, forced, cells)
    part: str = ""


def _threshold_tables(doc: Mapping[str, Any]) -> list[ThresholdTable]:
    """Readable threshold tables: one per segment, classes down, exits across, split by exit."""
    exits = [str(e.get("name", i)) for i, e in enumerate(doc["exits"])]
    classes = [str(c) for c in doc["classes"]]
    forced = doc.get("forced_full_depth") or {}
    forced_classes = set(forced.get("classes") or [])
    forced_segments = set(forced.get("segments") or [])
    max_exit = doc.get("max_exit")
    table = doc.get("thresholds") or {}
    default_cells = _cells(doc, "default")
    tables: list[ThresholdTable] = []
    segment_order = ["default", *sorted(set(table) - {"default"})]
    segment_order += sorted(s for s in forced_segments if s not in table)
    for seg in segment_order:
        heading = "Default (every segment without its own table)" if seg == "default" else f"Segment “{seg}”"
        if seg in forced_segments:
            tables.append(ThresholdTable(seg, heading, "Forced to full depth: every request of this segment "
                                         "runs all exits; its thresholds are not used.", (), ()))
            continue
        cells = _cells(doc, seg)
        if seg != "default" and table.get(seg) is not None and cells == default_cells:
            tables.append(ThresholdTable(seg, heading, "Same thresholds as the default table.", (), ()))
            continue
        if all(v is None for row in cells for v in row):
            note = ("Never exits early: a segment value without its own table (not seen in the evidence) runs at "
                    "full depth." if seg == "default" and len(table) > 1 else
                    "Never exits early: every request of this segment runs at full depth.")
            tables.append(ThresholdTable(seg, heading, note, (), ()))
            continue
        n_early = len(exits) - 1
        chunks = [list(range(s, min(n_early, s + EXITS_PER_TABLE))) for s in range(0, n_early, EXITS_PER_TABLE)]
        for idx in chunks:
            headers = tuple(exits[j] + (" (disabled by max_exit)" if max_exit is not None and j > max_exit else "")
                            for j in idx)
            rows = []
            for ci, cls in enumerate(classes):
                is_forced = cls in forced_classes
                row_cells = []
                for j in idx:
                    v = cells[j][ci]
                    off = max_exit is not None and j > max_exit
                    if v is None:
                        row_cells.append(Cell("never", "never", "null threshold: never exits here"))
                    elif is_forced or off:
                        row_cells.append(Cell(fmt_num(v), "inactive", "not used: forced to full depth"
                                              if is_forced else "not used: beyond max_exit"))
                    else:
                        row_cells.append(Cell(fmt_num(v)))
                rows.append((cls, is_forced, tuple(row_cells)))
            part = f"exits {idx[0] + 1}–{idx[-1] + 1} of {n_early}" if len(chunks) > 1 else ""
            tables.append(ThresholdTable(seg, heading, "", headers, tuple(rows), part))
    return tables


def _segment_counts(data: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Rows (key, value, count) from ``data.segment_counts`` (flat or nested by segment key)."""
    out: list[tuple[str, str, str]] = []
    for key, val in (data.get("segment_counts") or {}).items():
        if isinstance(val, Mapping):
            out.extend((str(key), str(v), fmt_int(n)) for v, n in val.items())
        else:
            out.append(("", str(key), fmt_int(val)))
    return out


def _calibrator_text(cal: Mapping[str, Any] | None) -> tuple[str, str]:
    cal = cal or {"type": "identity"}
    kind = str(cal.get("type", "identity"))
    if kind == "temperature":
        return "temperature", f"T = {fmt_num(cal.get('temperature'))}"
    if kind == "platt":
        coef = ", ".join(fmt_num(c) for c in cal.get("coef") or [])
        return "Platt", f"w = [{coef}], b = {fmt_num(cal.get('intercept'))}"
    if kind == "identity":
        return "identity", "—"
    params = {k: v for k, v in cal.items() if k != "type"}
    return kind, _fmt_value(params)


def _risk_words(risk: str) -> tuple[str, str]:
    """(noun phrase, description) for a risk type, in a reviewer's words."""
    if risk == "induced_error":
        return ("induced error", "answers that are wrong where the full model would have been right")
    return ("disagreement", "answers that differ from what the full model would have answered")


def plain_summary(ctx: ReportContext) -> Markup:
    """The plain-language paragraph at the top: what the policy does and risks, in numbers."""
    doc = ctx.document
    exp, g = doc.get("expected") or {}, doc.get("guarantee") or {}
    exits = doc.get("exits") or []
    rates = exp.get("exit_rate") or []
    cf = exp.get("compute_fraction")
    early = 1.0 - float(rates[-1]) if rates and _finite(rates[-1]) else None
    version = f"version {ctx.version}" if ctx.version is not None else "this policy"
    parts: list[Markup] = []
    parts.append(Markup("This is {v} of the early-exit policy for <strong>{m}</strong>. ").format(
        v=version, m=ctx.model))
    if _finite(early):
        parts.append(Markup("It lets the model answer at an earlier exit for <strong>{e}</strong> of requests "
                            "instead of running all {k} exits, ").format(e=fmt_pct(early), k=len(exits)))
    if _finite(cf):
        parts.append(Markup("so on average a request uses <strong>{cf}</strong> of the full model's compute "
                            "(a saving of {s}). ").format(cf=fmt_pct(cf), s=fmt_pct(1.0 - cf)))
    noun, words = _risk_words(str(g.get("risk", "disagreement")))
    eps, delta = g.get("eps"), g.get("delta")
    bound = _overall_bound(doc)
    conf = fmt_pct(1.0 - delta, 0) if _finite(delta) else "—"
    parts.append(Markup("The risk it takes is {noun}: {words}. ").format(noun=noun, words=words))
    if _finite(exp.get("risk")):
        parts.append(Markup("On {n} held-out requests this happened for {r} of them. ").format(
            n=fmt_int(g.get("n")), r=fmt_risk(exp.get("risk"))))
    if g.get("certified"):
        parts.append(Markup("With <strong>{c} confidence</strong>, the rate on new traffic like the evidence "
                            "is at most <strong>{b}</strong>, within the budget of <strong>{eps}</strong>. ").format(
            c=conf, b=fmt_risk(bound) if _finite(bound) else fmt_risk(eps), eps=fmt_risk(eps)))
    else:
        parts.append(Markup("<strong>The policy is not certified</strong>: the evidence does not show, at {c} "
                            "confidence, that the rate stays within the budget of {eps}. ").format(c=conf,
                                                                                                 eps=fmt_risk(eps)))
    unc = list(g.get("uncertified_segments") or [])
    constrained = {k: v for k, v in (g.get("segments") or {}).items()
                   if k != ALL_SEGMENTS and isinstance(v, Mapping) and k not in unc}
    if constrained:
        failed = sorted(k for k, v in constrained.items() if not v.get("certified"))
        if failed:
            parts.append(Markup("<strong>{n} of {m} constrained segments failed</strong> their budget: {names}. ")
                         .format(n=len(failed), m=len(constrained), names=", ".join(failed)))
        else:
            worst = max(constrained, key=lambda k: constrained[k].get("upper_bound") or 0.0)
            w = constrained[worst]
            parts.append(Markup("Each of the {m} constrained segments is certified within its own budget (highest "
                                "bound: {b} for {name}, budget {e}). ").format(
                m=len(constrained), b=fmt_risk(w.get("upper_bound")), name=worst, e=fmt_risk(w.get("eps"))))
    forced = doc.get("forced_full_depth") or {}
    if unc:
        parts.append(Markup("{n} segment{s} ({names}) had too little data to certify and always run{v} at full "
                            "depth. ").format(n=len(unc), s="" if len(unc) == 1 else "s", names=", ".join(unc),
                                              v="s" if len(unc) == 1 else ""))
    fseg = [s for s in forced.get("segments") or [] if s not in unc]
    if fseg:
        parts.append(Markup("Segment{s} {names} always run{v} at full depth. ").format(
            s="" if len(fseg) == 1 else "s", names=", ".join(fseg), v="s" if len(fseg) == 1 else ""))
    fcls = list(forced.get("classes") or [])
    if fcls:
        parts.append(Markup("Requests whose early answer is {names} always go to full depth. ").format(
            names=", ".join(fcls)))
    if _finite(doc.get("shadow_rate")) and doc["shadow_rate"] > 0:
        parts.append(Markup("{r} of traffic is also run at full depth and logged, to monitor the risk in "
                            "production. ").format(r=fmt_pct(doc["shadow_rate"], 1)))
    active = [e.environment for e in ctx.environments if e.state == "active"]
    killed = [e.environment for e in ctx.environments if e.killed]
    status = Markup("Status at render time: <strong>{s}</strong>").format(s=ctx.state or "unknown")
    if active:
        status += Markup(", active in {e}").format(e=", ".join(active))
    if killed:
        status += Markup("; <strong>kill switch ON</strong> in {e} (served as never-exit)").format(e=", ".join(killed))
    if ctx.chain is not None:
        status += Markup("; audit trail {v}").format(v="verified intact" if ctx.chain.ok else "FAILED verification")
    parts.append(status + Markup("."))
    return Markup("").join(parts)


def _build_view(ctx: ReportContext) -> dict[str, Any]:
    doc = ctx.document
    exits = list(doc.get("exits") or [])
    exp, g, data = doc.get("expected") or {}, doc.get("guarantee") or {}, doc.get("data") or {}
    last_cost = float(exits[-1]["cost"]) if exits and _finite(exits[-1].get("cost")) else None
    rates = exp.get("exit_rate") or []
    exit_rows = []
    for i, e in enumerate(exits):
        cal_name, cal_params = _calibrator_text(e.get("calibrator"))
        exit_rows.append({
            "index": i, "name": str(e.get("name", i)), "cost": fmt_cost(e.get("cost")),
            "cost_fraction": fmt_pct(float(e["cost"]) / last_cost) if last_cost and _finite(e.get("cost")) else "—",
            "exit_rate": fmt_pct(rates[i]) if i < len(rates) else "—",
            "calibrator": cal_name, "params": cal_params,
        })
    cal_exits = []
    cal_by_name = {str(c.get("name")): c for c in (doc.get("calibration") or {}).get("exits") or []}
    for i, e in enumerate(exits):
        entry = cal_by_name.get(str(e.get("name")), {}) or {}
        before, after = entry.get("before") or {}, entry.get("after") or {}
        cal_exits.append({
            **exit_rows[i],
            "metrics": [(m, fmt_num(before.get(m), 4), fmt_num(after.get(m), 4))
                        for m in ("accuracy", "ece", "nll", "brier", "ece_mass", "mce")],
            "acc": (fmt_pct(before.get("accuracy")), fmt_pct(after.get("accuracy"))),
            "ece": (fmt_num(before.get("ece"), 4), fmt_num(after.get("ece"), 4)),
            "ece_better": _finite(before.get("ece")) and _finite(after.get("ece")) and after["ece"] <= before["ece"],
            "nll": (fmt_num(before.get("nll"), 4), fmt_num(after.get("nll"), 4)),
        })
    segs = g.get("segments") or {}
    seg_rows = []
    for name in [ALL_SEGMENTS, *sorted(k for k in segs if k != ALL_SEGMENTS)]:
        s = segs.get(name)
        if s is None:
            continue
        ub, eps = s.get("upper_bound"), s.get("eps", g.get("eps"))
        seg_rows.append({
            "name": "all traffic" if name == ALL_SEGMENTS else name, "n": fmt_int(s.get("n")),
            "eps": fmt_risk(eps), "bound": fmt_risk(ub), "certified": bool(s.get("certified")),
            "margin": fmt_risk(eps - ub) if _finite(eps) and _finite(ub) else "—",
        })
    unc = list(g.get("uncertified_segments") or [])
    expsegs = exp.get("segments") or {}
    cost_segments = [{"name": k, "compute": fmt_pct(v.get("compute_fraction")), "risk": fmt_risk(v.get("risk")),
                      "n": fmt_int(v.get("n")), "fallback": k in unc}
                     for k, v in sorted(expsegs.items()) if isinstance(v, Mapping)]
    batches = exp.get("batch_compute_fraction") or {}
    batch_rows = [(str(b), fmt_pct(v), fmt_pct(1.0 - v) if _finite(v) else "—")
                  for b, v in sorted(batches.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)]
    baselines = []
    for name, b in (exp.get("baselines") or {}).items():
        if isinstance(b, Mapping):
            label = _BASELINE_STYLE.get(name, ("", "", name.replace("_", " ")))[2]
            baselines.append({"name": label, "compute": fmt_pct(b.get("compute_fraction")),
                              "risk": fmt_risk(b.get("risk")),
                              "certified": _fmt_value(b.get("certified")) if "certified" in b else "—",
                              "note": str(b.get("note") or "")})
    split = g.get("split") or {}
    rows = data.get("rows") or {}
    diff = ctx.diff
    diff_view = None
    if diff is not None:
        listed = diff.threshold_changes[:MAX_LISTED_CHANGES]
        by_group: dict[tuple[str, str], list[ThresholdChange]] = {}
        for ch in diff.threshold_changes:
            by_group.setdefault((ch.segment, ch.exit), []).append(ch)
        diff_view = {
            "parent_version": diff.parent_version, "parent_hash": short_hash(diff.parent_hash),
            "fields": diff.fields, "n_changed": len(diff.threshold_changes), "compared": diff.cells_compared,
            "fields_changed": sum(f.changed for f in diff.fields),
            "changes": [{"segment": c.segment, "exit": c.exit, "cls": c.cls,
                         "before": "never" if c.before is None else fmt_num(c.before),
                         "after": "never" if c.after is None else fmt_num(c.after),
                         "delta": f"{c.after - c.before:+.3f}" if c.before is not None and c.after is not None
                         else ("now exits" if c.before is None else "now never"),
                         } for c in listed],
            "more": len(diff.threshold_changes) - len(listed),
            "groups": [_change_group(s, x, chs) for (s, x), chs in by_group.items()],
            "field_groups": _field_groups(diff.fields),
            "comparable": diff.comparable, "note": diff.note,
        }
    parent = doc.get("parent")
    figs = figures(doc)
    vtext = str(ctx.version) if ctx.version is not None else "?"
    return {
        "ctx": ctx, "doc": doc, "model": ctx.model,
        "version": ctx.version if ctx.version is not None else (doc.get("model") or {}).get("version", "—"),
        "title": f"Policy report — {ctx.model} v{vtext}",
        "page_header": _css_string(f"exitwise policy report · {ctx.model} v{vtext} · "
                                   f"{short_hash(doc.get('content_hash'))}"),
        "summary": plain_summary(ctx),
        "content_hash": str(doc.get("content_hash", "—")),
        "hash_ok": _hash_ok(doc),
        "exits": exit_rows, "cal_exits": cal_exits,
        "reliability_images": list(figs.reliability),
        "cal_meta": _calibration_meta(doc.get("calibration") or {}),
        "cal_reference": (str(exits[-1].get("name", len(exits) - 1))
                          if exits and _reference_is_final(doc.get("calibration") or {}) else None),
        "classes": [str(c) for c in doc.get("classes") or []],
        "thresholds": _threshold_tables(doc),
        "forced": doc.get("forced_full_depth") or {},
        "max_exit": doc.get("max_exit"),
        "max_exit_name": (str(exits[doc["max_exit"]].get("name")) if _finite(doc.get("max_exit"))
                          and 0 <= doc["max_exit"] < len(exits) else None),
        "shadow_rate": fmt_pct(doc.get("shadow_rate"), 2),
        "score": doc.get("score", "max_prob"),
        "segment_keys": list(doc.get("segment_keys") or []),
        "g": g, "risk_words": _risk_words(str(g.get("risk", "disagreement"))),
        "eps": fmt_risk(g.get("eps")), "delta": fmt_num(g.get("delta"), 3),
        "confidence": fmt_pct(1.0 - g["delta"], 0) if _finite(g.get("delta")) else "—",
        "overall_bound": fmt_risk(_overall_bound(doc)),
        "seg_rows": seg_rows, "uncertified": unc,
        "split": [(k, fmt_int(split[k]) if k != "seed" else str(split[k])) for k in _ordered(split, _SPLIT_ORDER)],
        "exp": exp, "compute": fmt_pct(exp.get("compute_fraction")),
        "saving": fmt_pct(1.0 - exp["compute_fraction"]) if _finite(exp.get("compute_fraction")) else "—",
        "held_out_risk": fmt_risk(exp.get("risk")),
        "evaluated_on": str(exp.get("evaluated_on") or ""),
        "accuracy": fmt_pct(exp.get("accuracy")), "full_depth_accuracy": fmt_pct(exp.get("full_depth_accuracy")),
        "disagreement": fmt_risk(exp.get("disagreement")), "induced_error": fmt_risk(exp.get("induced_error")),
        "cost_segments": cost_segments, "batch_rows": batch_rows, "baselines": baselines,
        "curve_figure": figs.curve, "exit_rate_figure": figs.exit_rate,
        "data": data, "fingerprint": str(data.get("fingerprint", "—")),
        "data_rows": [(k, fmt_int(rows[k]) if _finite(rows[k]) else _fmt_value(rows[k]))
                      for k in _ordered(rows, ("total", "labelled", "skipped")) if not (k in split and k != "seed")]
        if isinstance(rows, Mapping) else [("total", fmt_int(rows))],
        "time_window": [fmt_time(t) for t in data.get("time_window") or []],
        "segment_counts": _segment_counts(data),
        "data_extra": [(k, _fmt_value(v)) for k, v in data.items()
                       if k not in {"fingerprint", "rows", "time_window", "segment_counts"}],
        "solver": [(k, _fmt_value(v)) for k, v in (doc.get("solver") or {}).items()],
        "parent": parent, "diff": diff_view,
        "approvals": [{"principal": a.principal, "at": fmt_time(a.at), "comment": a.comment or ""}
                      for a in ctx.approvals],
        "environments": [{"name": e.environment, "state": e.state, "killed": e.killed, "since": fmt_time(e.since),
                          "active_version": e.active_version} for e in ctx.environments],
        "events": [{"at": fmt_time(e.at), "actor": e.actor, "action": e.action,
                    "label": ACTION_LABELS.get(e.action, e.action), "reason": e.reason or "",
                    "environment": e.environment or "", "before": short_hash(e.before_hash),
                    "after": short_hash(e.after_hash), "seq": e.seq, "hash": short_hash(e.event_hash)}
                   for e in ctx.audit_events],
        "chain": ctx.chain, "chain_at": fmt_time(ctx.chain.verified_at) if ctx.chain else "—",
        "created_at": fmt_time(ctx.created_at), "generated_at": fmt_time(ctx.generated_at),
        "author": ctx.author or "—", "state": ctx.state or "—",
        "mlflow_run_id": ctx.mlflow_run_id, "extra": list(ctx.extra.items()),
    }


_SPLIT_ORDER = ("fit", "select", "certify")


def _ordered(mapping: Mapping[str, Any], first: Sequence[str]) -> list[str]:
    """Keys of ``mapping``: those named in ``first`` in that order, then the rest (``seed`` last)."""
    head = [k for k in first if k in mapping]
    rest = sorted(k for k in mapping if k not in first and k != "seed")
    return head + rest + (["seed"] if "seed" in mapping else [])


def _calibration_meta(cal: Mapping[str, Any]) -> str:
    """Where the calibration metrics were measured, in words (from the document's calibration block)."""
    bits = []
    if _finite(cal.get("rows")):
        bits.append(f"{fmt_int(cal['rows'])} rows")
    if cal.get("split"):
        bits.append(f"of the {cal['split']} split")
    target = cal.get("target")
    if target:
        bits.append("against the labels" if target == "labels" else "against the final exit's answers")
    return ("Measured on " + " ".join(bits) + ".") if bits else ""


def _change_group(segment: str, exit_name: str, changes: Sequence[ThresholdChange]) -> dict[str, Any]:
    """Summary of the threshold changes of one (segment, exit): count, mean and largest move."""
    deltas = [c.after - c.before for c in changes if c.before is not None and c.after is not None]
    return {
        "segment": segment, "exit": exit_name, "n": len(changes),
        "mean": f"{sum(deltas) / len(deltas):+.3f}" if deltas else "—",
        "largest": f"{max(deltas, key=abs):+.3f}" if deltas else "—",
        "now_never": sum(c.after is None for c in changes), "now_exits": sum(c.before is None for c in changes),
    }


def _field_groups(fields: Sequence[FieldChange]) -> list[tuple[str, list[FieldChange]]]:
    groups: dict[str, list[FieldChange]] = {}
    for f in fields:
        groups.setdefault(f.group, []).append(f)
    return list(groups.items())


def _css_string(text: str) -> Markup:
    """``text`` made safe inside a double-quoted CSS string in a <style> element."""
    return Markup("".join(ch if ch.isalnum() or ch in " ._-·:/()" else "?" for ch in text))


def _hash_ok(doc: Mapping[str, Any]) -> bool | None:
    from exitwise.policies.canonical import verify_content_hash

    try:
        return verify_content_hash(doc) if doc.get("content_hash") else None
    except ValueError:
        return False


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("exitwise.policies", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=fmt_pct, risk=fmt_risk, num=fmt_num, int=fmt_int, time=fmt_time, short=short_hash)
    return env


@lru_cache(maxsize=1)
def _css() -> str:
    return resources.files("exitwise.policies").joinpath("templates", "report.css").read_text(encoding="utf-8")


def render_html(context: ReportContext) -> str:
    """The complete, self-contained HTML report (CSS and figures inlined) for ``context``."""
    view = _build_view(context)
    return _environment().get_template("report.html.j2").render(css=Markup(_css()), **view)


def render_pdf(html: str) -> bytes:
    """PDF bytes of a rendered report (WeasyPrint; the print CSS lays out A4 pages)."""
    import weasyprint

    return weasyprint.HTML(string=html, base_url=None).write_pdf()


def render(context: ReportContext, format: str = "html") -> bytes:
    """The report of ``context`` as bytes in ``format`` (``html`` UTF-8 or ``pdf``)."""
    fmt = _check_format(format)
    html = render_html(context)
    return html.encode("utf-8") if fmt == "html" else render_pdf(html)


def _check_format(format: str) -> str:
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise InputError(f"report format must be one of {', '.join(FORMATS)}, got {format!r}")
    return fmt


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :mod:`exitwise.calibration.atomic`)."""
    return atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- store integration


def make_context(
    document: Mapping[str, Any], *, parent_document: Mapping[str, Any] | None = None,
    parent_version: int | None = None, generated_at: dt.datetime | str | None = None, **facts: Any,
) -> ReportContext:
    """A :class:`ReportContext` with the diff against ``parent_document`` computed here."""
    diff = diff_policies(parent_document, document,
                         parent_version=parent_version if parent_version is not None else document.get("parent"))
    return ReportContext(document=document, diff=diff,
                         generated_at=generated_at or dt.datetime.now(dt.UTC).replace(microsecond=0), **facts)


def context_from_document(document: Mapping[str, Any], *, parent_document: Mapping[str, Any] | None = None,
                          **facts: Any) -> ReportContext:
    """A context for a policy document that is not (yet) in the store: no governance facts.

    Validates the document first, so a report is never drawn from a malformed or tampered file.
    """
    from exitwise.policies.schema import validate_document

    validate_document(dict(document))
    facts.setdefault("state", "unregistered")
    return make_context(document, parent_document=parent_document, **facts)


def build_context(session: Any, model: str, version: int) -> ReportContext:
    """Collect the facts of (``model``, ``version``) from the store's services into a context.

    Reads only (``session`` may be read-only): the version and its parent's document, the
    approvals, where the version stands in every environment the model was ever deployed to
    (or has a kill switch in), the version's audit events (oldest first) and a verification of
    the whole audit chain done now. Raises ``NotFound`` for an unknown model or version.
    """
    from exitwise.policies import audit, store
    from exitwise.policies.errors import NotFound

    number = int(version)
    v = store.get_version(model, number, session=session)
    doc = v.document
    parent_doc = None
    if v.parent is not None:
        try:
            parent_doc = store.get_version(model, v.parent, session=session).document
        except NotFound:
            parent_doc = None
    activations = store.list_activations(model, session=session)  # newest first
    killed_envs = next((m.killed for m in store.list_models(session=session) if m.name == model), ())
    environments = []
    for env in sorted({a.environment for a in activations} | set(killed_envs)):
        current = next((a for a in activations if a.environment == env and a.active), None)
        mine = next((a for a in activations if a.environment == env and a.version == number), None)
        if mine is None:
            state, since = "not deployed", None
        elif mine.active:
            state, since = "active", mine.activated_at
        else:
            state, since = f"was active until {fmt_time(mine.deactivated_at)}", mine.activated_at
        ks = store.get_kill_switch(model, env, session=session)
        environments.append(EnvironmentStatus(env, state, bool(ks.killed), since,
                                              current.version if current is not None else None))
    events = [e for e in audit.log(session=session, model=model, limit=None) if e.version == number]
    events.sort(key=lambda e: e.seq)
    chain = audit.verify(session=session)
    return make_context(
        doc,
        parent_document=parent_doc,
        parent_version=v.parent,
        version=number,
        state=v.state,
        author=v.author,
        created_at=v.created_at,
        approvals=tuple(Approval(a.approver, a.created_at, a.reason) for a in v.approvals),
        environments=tuple(environments),
        audit_events=tuple(
            AuditEvent(at=e.timestamp, actor=e.actor, action=e.action, reason=e.reason, environment=e.environment,
                       before_hash=e.before_hash, after_hash=e.after_hash, seq=e.seq, event_hash=e.hash)
            for e in events),
        chain=ChainVerification(ok=chain.ok, checked=chain.events, message=chain.message,
                                verified_at=dt.datetime.now(dt.UTC).replace(microsecond=0)),
    )


def report_bytes(session: Any, model: str, version: int, format: str = "html") -> bytes:
    """The report of a stored version as bytes (for MLflow artifacts and the approval hook)."""
    fmt = _check_format(format)
    return render(build_context(session, model, version), fmt)


def report_response(session: Any, model: str, version: int, format: str = "html") -> tuple[bytes, str]:
    """``(body, media_type)`` for ``GET /v1/models/{model}/versions/{n}/report?format=...``."""
    fmt = _check_format(format)
    return report_bytes(session, model, version, fmt), MEDIA_TYPES[fmt]


def write_report(session: Any, model: str, version: int, format: str, out: str | os.PathLike[str]) -> Path:
    """Render the report of a stored version and write it atomically to ``out``."""
    return atomic_write(out, report_bytes(session, model, version, format))


def report_path(data_dir: str | os.PathLike[str], model: str, version: int, format: str = "html") -> Path:
    """Where the approval hook keeps a version's report: ``<data dir>/reports/<model>/v<n>.<fmt>``."""
    return Path(data_dir) / "reports" / model / f"v{int(version)}.{_check_format(format)}"


def on_version_approved(session: Any, model: str, version: int, *,
                        data_dir: str | os.PathLike[str] | None = None,
                        formats: Iterable[str] = ("html",)) -> list[Path]:
    """Render a version's report into ``<data dir>/reports/<model>/v<n>.<fmt>``; returns the files."""
    if data_dir is None:
        from exitwise.policies.settings import get_settings

        data_dir = get_settings().data_dir
    ctx = build_context(session, model, version)
    html = render_html(ctx)
    written = []
    for fmt in formats:
        data = html.encode("utf-8") if _check_format(fmt) == "html" else render_pdf(html)
        written.append(atomic_write(report_path(data_dir, model, version, fmt), data))
    return written


def install_approval_hook(engine: Any = None, *, data_dir: str | os.PathLike[str] | None = None,
                          formats: Sequence[str] = ("html",), background: bool = False) -> Any:
    """Write the report of every approved version to ``reports/<model>/v<n>.<fmt>`` after the commit.

    Registers a ``exitwise.policies.events.on_commit`` callback (returned, for ``events.remove``) that
    reacts to ``version.approve`` events: it reads the committed version in its own read-only
    unit of work on ``engine`` (None: the configured store, opened per event — the CLI) and
    writes the report under ``data_dir`` (default: the settings' data dir). ``background=True``
    (the API) renders in a daemon thread so the approving request does not wait for it. A
    failure is logged and never undoes the approval; ``exitwise report`` can always redo it.
    """
    import threading

    from exitwise.policies import events

    target = Path(data_dir) if data_dir is not None else None

    def _write(model: str, number: int) -> None:
        from exitwise.policies.db import open_store, unit_of_work

        eng = engine if engine is not None else open_store()
        try:
            with unit_of_work(eng, readonly=True) as session:
                on_version_approved(session, model, number, data_dir=target, formats=formats)
        finally:
            if engine is None:
                eng.dispose()

    def _background(model: str, number: int) -> None:
        try:
            _write(model, number)
        except Exception:  # logged, like the synchronous hook's failures
            _log.exception("audit report of %s v%s not written", model, number)

    def _hook(event: Any) -> None:
        if event.action != "version.approve" or not event.model or event.version is None:
            return
        if background:
            threading.Thread(target=_background, args=(event.model, event.version), daemon=True,
                             name=f"exitwise-report-{event.model}-v{event.version}").start()
        else:
            _write(event.model, event.version)

    events.on_commit(_hook)
    return _hook


__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "Approval",
    "AuditEvent",
    "ChainVerification",
    "EnvironmentStatus",
    "FieldChange",
    "PolicyDiff",
    "ReportContext",
    "ThresholdChange",
    "atomic_write",
    "build_context",
    "context_from_document",
    "diff_policies",
    "figures",
    "fmt_pct",
    "fmt_risk",
    "install_approval_hook",
    "make_context",
    "on_version_approved",
    "plain_summary",
    "reliability_figure",
    "reliability_images",
    "render",
    "render_html",
    "render_pdf",
    "report_bytes",
    "report_path",
    "report_response",
    "write_report",
]
