"""Every figure (exitwise.policies.figures): reliability diagrams from metrics and the figures of a document."""

from __future__ import annotations

import copy
import struct
import sys
from typing import Any

import numpy as np
import pytest

from exitwise.calibration.exceptions import InputError, MissingDependency
from exitwise.calibration.metrics import exit_metrics
from exitwise.calibration.optional import require
from exitwise.policies import figures
from exitwise.policies.figures import reliability_figure, reliability_png, save_reliability_png
from exitwise.policies.mlflow import payload as registry


def _data(n, c, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * scale
    y = rng.integers(0, c, n)
    return z, y


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _reliability(m: int = 10, shift: float = 0.05) -> dict[str, Any]:
    count = [5 * (i + 1) for i in range(m)]
    conf = [(i + 0.5) / m for i in range(m)]
    return {"binning": "width", "edges": [i / m for i in range(m + 1)], "confidence": conf,
            "accuracy": [max(0.0, c - shift) for c in conf], "count": count}


def _doc(n_exits: int = 4, target: str = "labels") -> dict[str, Any]:
    """The fields of a policy document the figures read."""
    names = [f"e{i}" for i in range(n_exits)]
    return {
        "exits": [{"name": n, "cost": float(i + 1)} for i, n in enumerate(names)],
        "guarantee": {"risk": "disagreement", "eps": 0.02},
        "expected": {
            "risk": 0.012, "compute_fraction": 0.55, "exit_rate": [0.4, 0.2, 0.1, 0.3][:n_exits],
            "curve": [{"risk": r, "compute_fraction": 1 - 20 * r} for r in (0.002, 0.008, 0.012, 0.016)],
            "baselines": {"full_depth": {"compute_fraction": 1.0, "risk": 0.0},
                          "calm": {"compute_fraction": 0.7, "risk": 0.015}},
        },
        "calibration": {"target": target, "exits": [
            {"name": n, "reliability": {"before": _reliability(shift=0.1), "after": _reliability(shift=0.01)}}
            for n in names]},
    }


# ----------------------------------------------------------------------------- reliability from metrics


def test_reliability_png(tmp_path):
    z, y = _data(3000, 5, seed=4, scale=3.0)
    before = [exit_metrics(z * s, y) for s in (0.5, 1.0, 2.0)]
    after = [exit_metrics(z * s, y, {"type": "temperature", "temperature": 2.0}) for s in (0.5, 1.0, 2.0)]
    data = reliability_png(["a", "b", "c"], before, after, title="t")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    path = save_reliability_png(tmp_path / "sub" / "r.png", ["a", "b", "c"], before, after)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["r.png"]  # no temp file left behind
    fig = reliability_figure(["a", "b", "c"], [m.reliability for m in before], [m.reliability for m in after])
    assert sum(ax.get_visible() for ax in fig.axes) == 3
    with pytest.raises(InputError, match="one name"):
        reliability_png(["a"], before, after)


@pytest.mark.parametrize(("k", "cols"), [(1, None), (1, 2), (5, 2), (3, None)])
def test_reliability_legend_stays_inside_the_figure(k, cols):
    z, y = _data(2000, 5, seed=7, scale=3.0)
    ms = [exit_metrics(z, y)] * k
    fig = reliability_figure([f"e{i}" for i in range(k)], ms, ms, cols=cols)
    renderer = fig.canvas.get_renderer()
    box, frame = fig.legends[0].get_window_extent(renderer), fig.bbox
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0  # not cropped by the canvas
    for ax in fig.axes:
        if ax.get_visible():
            assert box.y1 <= ax.get_tightbbox(renderer).y0 + 1  # nor drawn over a panel's axis labels
    with pytest.raises(InputError, match="cols must be at least 1"):
        reliability_figure(["a"], ms[:1], ms[:1], cols=0)


# ----------------------------------------------------------------------------- figures of a document


def test_document_figures_and_when_there_is_nothing_to_draw():
    doc = _doc()
    svg = figures.curve_svg(doc)
    assert svg is not None and svg.startswith(b"<?xml") and b"<svg" in svg
    assert _png_size(figures.curve_png(doc) or b"")[0] > 600
    assert b"<svg" in (figures.exit_rate_svg(doc) or b"")
    bare = {"exits": doc["exits"], "guarantee": doc["guarantee"], "expected": {}}
    assert figures.curve_svg(bare) is None and figures.curve_png(bare) is None
    assert figures.exit_rate_svg({**doc, "expected": {"exit_rate": [1.0]}}) is None  # one rate for four exits
    point_only = {**doc, "expected": {"risk": 0.01, "compute_fraction": 0.5}}  # the chosen point, no solver curve
    assert figures.curve_svg(point_only) is not None


def test_drawing_is_deterministic():
    doc = _doc()
    figures._memo.cache_clear()
    first = figures.report_figures(doc)
    figures._memo.cache_clear()
    assert figures.report_figures(doc) == first
    assert figures.exit_rate_svg(doc) == first.exit_rate_svg


def test_exit_reliability_needs_both_sides():
    entry = _doc()["calibration"]["exits"][0]
    assert _png_size(figures.exit_reliability_png(entry) or b"")[0] > 200
    assert figures.exit_reliability_png({"name": "x", "reliability": {"after": _reliability()}}) is None
    with pytest.raises(ValueError, match="bins"):
        bad = copy.deepcopy(entry)
        bad["reliability"]["after"]["accuracy"] = [0.5]
        figures.exit_reliability_png(bad)


def test_report_figures_follow_every_field_they_read():
    """The memo key covers the calibration target: against the final exit, its diagram is left out."""
    labels, final = _doc(n_exits=5), _doc(n_exits=5, target="final")
    assert len(figures.report_figures(labels).reliability_pngs) == 2  # 5 exits: 4 + 1 panels
    assert len(figures.report_figures(final).reliability_pngs) == 1  # 4 exits
    moved = copy.deepcopy(labels)
    moved["guarantee"]["eps"] = 0.03
    assert figures.report_figures(moved).curve_svg != figures.report_figures(labels).curve_svg
    assert figures.report_figures(moved).exit_rate_svg == figures.report_figures(labels).exit_rate_svg


def test_the_mlflow_plots_are_drawn_here():
    doc = _doc()
    assert registry.curve_png(doc) == figures.curve_png(doc)
    pngs = registry.reliability_pngs(doc)
    assert list(pngs) == ["e0", "e1", "e2", "e3"]
    assert pngs["e0"] == figures.exit_reliability_png(doc["calibration"]["exits"][0])
    doc["calibration"]["exits"][1]["reliability"]["after"]["count"] = [1]  # malformed: skipped, never fatal
    assert list(registry.reliability_pngs(doc)) == ["e0", "e2", "e3"]


def test_without_matplotlib_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [reports] extra were not installed
    monkeypatch.delitem(sys.modules, "exitwise.policies.figures")
    with pytest.raises(MissingDependency, match=r"'matplotlib'.*pip install 'exitwise\[reports\]'"):
        require("exitwise.policies.figures", "reports", "figures")
    with pytest.raises(MissingDependency, match=r"pip install 'exitwise\[reports\]'"):
        registry.curve_png(_doc())
