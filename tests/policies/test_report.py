"""The audit report (issue 7): content, a real render in headless Chromium, and the PDF.

The rendered checks drive the real tools: Chromium (Debian ``chromium``) renders the HTML to
a screenshot and prints it to PDF, WeasyPrint renders our PDF, and poppler's ``pdftotext`` /
``pdftoppm`` read the text and rasterise the pages. Key numbers must appear in the text a
reader sees, not only in the HTML source. Without the tools the tests skip with the reason,
except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import datetime as dt
import html as htmllib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import uuid
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from exitwise.api.cli import main, solve
from exitwise.api.cli import report as report_cli
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.rule import CompiledPolicy
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies import events, figures, lifecycle, store
from exitwise.policies import report as rp
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.diff import diff_documents
from exitwise.policies.errors import NotFound
from exitwise.policies.report.cache import report_key
from exitwise.policies.report.changes import diff_rows
from exitwise.policies.report.formatting import fmt_pct, fmt_risk
from exitwise.policies.report.render import render, render_html, render_pdf
from exitwise.policies.report.view import EXITS_PER_TABLE, plain_summary
from exitwise.policies.schema import validate_document

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
COSTS = [1.9e6, 5.2e6, 9.8e6, 14.6e6]
EXIT_RATE = [0.46, 0.22, 0.12, 0.20]
CAL_METRICS = [("stage1", 0.781, 0.642, 0.0712), ("stage2", 0.853, 0.431, 0.0515),
               ("stage3", 0.897, 0.318, 0.0364), ("final", 0.921, 0.247, 0.0211)]


def _reliability(shift: float, seed: int) -> dict[str, Any]:
    """A plausible equal-width reliability diagram (``ReliabilityDiagram.to_dict`` shape), 15 bins."""
    m = 15
    count = [0, 0, 0, 2, 9, 21, 40, 66, 95, 140, 210, 330, 610, 1400, 7300]
    conf: list[float | None] = []
    acc: list[float | None] = []
    for i in range(m):
        c = (i + 0.5) / m
        if count[i] == 0:
            conf.append(None)
            acc.append(None)
        else:
            conf.append(round(c, 4))
            wobble = 0.01 * ((seed * 7 + i) % 3 - 1)
            acc.append(round(max(0.0, min(1.0, c - shift * math.sin(math.pi * c) + wobble)), 4))
    return {"binning": "width", "edges": [i / m for i in range(m + 1)], "confidence": conf, "accuracy": acc,
            "count": count}


def _thresholds(base: float, step: float) -> list[list[float | None]]:
    rows: list[list[float | None]] = []
    for k in range(3):
        row: list[float | None] = []
        for ci, name in enumerate(CLASSES):
            if name == "Shirt" or (k == 0 and name in ("Pullover", "Coat")):
                row.append(None)
            else:
                row.append(round(min(0.999, base - k * step + 0.004 * ((ci * 3) % 5)), 4))
        rows.append(row)
    return rows


def realistic_document(*, eps: float = 0.01, parent: int | None = 3, base: float = 0.93) -> dict[str, Any]:
    """A hand-made policy document shaped like the solver's output (CONTRACT.md), hash set."""
    last = COSTS[-1]
    compute = sum(r * c / last for r, c in zip(EXIT_RATE, COSTS, strict=True))
    curve = []
    for i in range(12):
        e = 0.001 + i * 0.0015
        curve.append({"eps": round(e, 4), "compute_fraction": round(0.92 - 0.5 * (1 - math.exp(-e / 0.006)), 4),
                      "risk": round(e * 0.72, 5)})
    doc = {
        "schema": "exitwise.policy/v1",
        "model": {"name": "fashion-cnn", "version": "1"},
        "exits": [
            {"name": "stage1", "cost": COSTS[0], "calibrator": {"type": "temperature", "temperature": 1.31}},
            {"name": "stage2", "cost": COSTS[1], "calibrator": {"type": "platt", "coef": [0.91, 1.42, 0.37],
                                                                  "intercept": -0.218}},
            {"name": "stage3", "cost": COSTS[2], "calibrator": {"type": "temperature", "temperature": 1.12}},
            {"name": "final", "cost": COSTS[3], "calibrator": {"type": "identity"}},
        ],
        "classes": CLASSES,
        "score": "max_prob",
        "segment_keys": ["capture"],
        "thresholds": {
            "default": _thresholds(base, 0.02),
            "mobile": _thresholds(base + 0.03, 0.015),
            "studio": _thresholds(base - 0.01, 0.02),
            "scan": None,
        },
        "forced_full_depth": {"classes": ["Shirt"], "segments": ["scan"]},
        "max_exit": None,
        "shadow_rate": 0.01,
        "guarantee": {
            "risk": "disagreement", "eps": eps, "delta": 0.05,
            "method": "learn-then-test (fixed-sequence, exact binomial)", "n": 20_000, "certified": True,
            "segments": {
                "__all__": {"eps": eps, "n": 20_000, "upper_bound": round(eps * 0.874, 6), "certified": True},
                "studio": {"eps": eps, "n": 11_800, "upper_bound": round(eps * 0.912, 6), "certified": True},
                "mobile": {"eps": eps, "n": 7_600, "upper_bound": round(eps * 0.963, 6), "certified": True},
                "scan": {"eps": eps, "n": 600, "upper_bound": None, "certified": False},
            },
            "uncertified_segments": ["scan"],
            "split": {"fit": 20_200, "select": 20_200, "certify": 20_000, "seed": 7},
        },
        "expected": {
            "compute_fraction": round(compute, 6), "exit_rate": EXIT_RATE, "risk": round(eps * 0.61, 6),
            "disagreement": round(eps * 0.61, 6), "induced_error": round(eps * 0.32, 6),
            "segments": {
                "studio": {"compute_fraction": 0.3712, "risk": round(eps * 0.55, 6), "n": 11_800},
                "mobile": {"compute_fraction": 0.4655, "risk": round(eps * 0.68, 6), "n": 7_600},
                "scan": {"compute_fraction": 1.0, "risk": 0.0, "n": 600},
            },
            "batch_compute_fraction": {"1": round(compute, 6), "8": 0.8312, "32": 0.9734},
            "baselines": {
                "full_depth": {"compute_fraction": 1.0, "risk": 0.0},
                "global_threshold": {"compute_fraction": 0.5127, "risk": round(eps * 0.79, 6), "certified": True},
                "calm": {"compute_fraction": 0.4791, "risk": round(eps * 0.84, 6), "certified": True},
                "per_exit": {"compute_fraction": 0.4512, "risk": round(eps * 0.71, 6), "certified": True},
            },
            "curve": curve,
        },
        "calibration": {"exits": [
            {"name": name, "before": {"accuracy": acc, "nll": nll, "brier": 0.1, "ece": ece, "ece_mass": ece * 0.9,
                                      "mce": ece * 3},
             "after": {"accuracy": acc, "nll": nll * 0.93, "brier": 0.095, "ece": ece / 4, "ece_mass": ece / 4.4,
                       "mce": ece},
             "reliability": {"before": _reliability(0.12, i), "after": _reliability(0.02, i + 5)}}
            for i, (name, acc, nll, ece) in enumerate(CAL_METRICS)
        ]},
        "data": {
            "fingerprint": "sha256:9f2c4e1b7a6d0c3e5f8a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607",
            "rows": {"total": 60_400, "labelled": 60_400, "skipped": 0},
            "time_window": ["2025-05-01T00:00:00Z", "2025-05-14T23:59:59Z"],
            "segment_counts": {"capture": {"studio": 35_400, "mobile": 22_800, "scan": 2_200}},
            "source": "fashion-traffic-2025-05.parquet",
        },
        "solver": {"grid": 200, "order": "safe to aggressive", "segments_constrained": True},
        "parent": parent,
    }
    return with_content_hash(doc)


T0 = dt.datetime(2025, 5, 20, 9, 30, tzinfo=dt.UTC)


def realistic_context(doc: dict[str, Any] | None = None, **over: Any) -> rp.ReportContext:
    doc = doc or realistic_document()
    parent = realistic_document(eps=0.015, parent=2, base=0.95)
    facts: dict[str, Any] = dict(
        version=4, state="active", author="alice", created_at=T0,
        approvals=(rp.Approval("bob", T0 + dt.timedelta(hours=3), "Bounds checked against the Q2 risk budget.",
                               "reverified", "2 constraint(s) recomputed on 20000 certify rows: all pass"),
                   rp.Approval("carol", T0 + dt.timedelta(hours=3), "Second pair of eyes.", "not_reverified",
                               "evidence file s3://lake/may.parquet is not reachable")),
        environments=(rp.EnvironmentStatus("staging", "active", False, T0 + dt.timedelta(hours=4), 4),
                      rp.EnvironmentStatus("production", "active", False, T0 + dt.timedelta(days=1), 4)),
        audit_events=(
            rp.AuditEvent(T0, "alice", "version.create", "Re-solved on May traffic", None, None,
                          doc["content_hash"], 38),
            rp.AuditEvent(T0 + dt.timedelta(hours=3), "bob", "version.approve",
                          "Bounds checked against the Q2 risk budget.", None, doc["content_hash"],
                          doc["content_hash"], 39),
            rp.AuditEvent(T0 + dt.timedelta(hours=4), "carol", "version.activate", "Staging canary", "staging",
                          parent["content_hash"], doc["content_hash"], 40),
            rp.AuditEvent(T0 + dt.timedelta(days=1), "carol", "version.activate", "Canary clean for 24 h", "production",
                          parent["content_hash"], doc["content_hash"], 41),
        ),
        chain=rp.ChainVerification(True, 41, "", T0 + dt.timedelta(days=2)),
        generated_at=T0 + dt.timedelta(days=2),
    )
    facts.update(over)
    return rp.make_context(doc, parent_document=parent, parent_version=3, **facts)


# ----------------------------------------------------------------------------- content


def test_fixture_is_a_valid_policy_document() -> None:
    validate_document(realistic_document())


class _Text(HTMLParser):
    """Visible text of an HTML document (no <style>/<script>/<title>), whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("style", "script", "title", "head"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title", "head"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(html: str) -> str:
    p = _Text()
    p.feed(html)
    return _squash(" ".join(p.parts))


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u00ad", "")).strip()


def key_numbers(doc: dict[str, Any], version: int = 4) -> dict[str, str]:
    """The numbers a reviewer must find in the rendered report, formatted as the report shows them."""
    g = doc["guarantee"]
    return {
        "compute fraction": fmt_pct(doc["expected"]["compute_fraction"]),
        "eps": fmt_risk(g["eps"]),
        "certified bound": fmt_risk(g["segments"]["__all__"]["upper_bound"]),
        "version": f"version {version}",
        "content hash prefix": doc["content_hash"][:12],
    }


@pytest.fixture(scope="module")
def context() -> rp.ReportContext:
    return realistic_context()


@pytest.fixture(scope="module")
def html(context: rp.ReportContext) -> str:
    return render_html(context)


def test_html_is_self_contained(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert "<link" not in html and "<script" not in html and "@import" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 3  # reliability diagrams (4 exits, one 2x2 image), the exit-rate chart, the curve
    assert all(s.startswith(("data:image/png;base64,", "data:image/svg+xml;base64,")) for s in srcs)
    assert not re.search(r"(?:src|href)=\"(?:https?:|//|file:)", html)
    assert "@page" in html and "size: A4" in html


def test_every_section_and_key_number_is_in_the_visible_text(html: str, context: rp.ReportContext) -> None:
    text = visible_text(html)
    for title in ("Summary", "Evidence", "Calibration", "Decision", "Guarantee", "Cost", "Monitoring",
                  "Change and audit trail"):
        assert title in text
    for what, value in key_numbers(dict(context.document)).items():
        assert value in text, what
    doc = context.document
    assert context.document["content_hash"] in text
    assert "verified" in text and "41 events" in text  # chain check at render time
    assert doc["data"]["fingerprint"] in text
    assert "20,000" in text and "2,200" in text  # certification rows, rows of segment scan
    assert "T = 1.310" in text and "w = [0.910, 1.420, 0.370], b = -0.218" in text
    for name, acc, _nll, ece in CAL_METRICS:
        assert name in text and fmt_pct(acc) in text and f"{ece:.4f}" in text and f"{ece / 4:.4f}" in text
    assert "bob" in text and "Bounds checked against the Q2 risk budget." in text
    assert "certificate re-verified by the service" in text and "recomputed on 20000 certify rows" in text
    assert "certificate as claimed by the author, not re-verified" in text and "s3://lake/may.parquet" in text
    assert "83.1%" in text and "97.3%" in text  # batch 8 and 32
    assert "Canary clean for 24 h" in text  # the audit timeline


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_reliability_images_share_one_panel_size_and_skip_a_self_referencing_final_exit() -> None:
    doc = realistic_document()
    five = dict(doc["calibration"]["exits"][0], name="extra")
    doc["calibration"] = {"exits": [*doc["calibration"]["exits"], five], "target": "labels"}
    labelled = figures.reliability_images(doc)
    assert len(labelled) == 2  # 5 exits against labels -> 4 + 1 panels
    assert _png_size(labelled[0])[0] == _png_size(labelled[1])[0]  # the lone panel is not blown up
    doc["calibration"]["target"] = "final"
    final = figures.reliability_images(doc)
    assert len(final) == 1  # the final exit agrees with itself: no diagram
    html = render_html(realistic_context(doc))
    assert "Agreement with final exit" in html and "has no diagram" in html
    assert "Agreement with final exit" not in render_html(realistic_context())


def test_plain_summary_states_what_the_policy_does_and_risks(context: rp.ReportContext) -> None:
    text = _squash(re.sub(r"<[^>]+>", "", str(plain_summary(context))))
    doc = context.document
    early = 1 - doc["expected"]["exit_rate"][-1]
    assert f"for {fmt_pct(early)} of requests" in text
    assert f"uses {fmt_pct(doc['expected']['compute_fraction'])} of the full model's compute" in text
    assert "With 95% confidence" in text and "at most 0.87%" in text and "budget of 1.00%" in text
    assert "1 segment (scan) had too little data to certify and always runs at full depth" in text
    assert "Shirt always go to full depth" in text and "1.0% of traffic is also run at full depth" in text
    assert "active in staging, production" in text and "audit trail verified intact" in text


def test_never_exit_cells_and_forced_rows_are_marked(html: str, context: rp.ReportContext) -> None:
    doc = context.document
    # Tables shown: default, mobile and studio (scan is forced: a note instead of a table).
    shown = [doc["thresholds"][s] for s in ("default", "mobile", "studio")]
    nulls = sum(v is None for rows in shown for row in rows for v in row)
    assert html.count('class="n never"') == nulls
    assert html.count('class="forced-row"') == 3  # Shirt in each of the three tables
    assert "Segment “scan”" in html and "Forced to full depth: every request of this segment" in html


def test_wide_threshold_tables_are_split_by_exit() -> None:
    k, c = 15, 3
    doc = realistic_document()
    doc.update(exits=[{"name": f"block{i:02d}", "cost": float(i + 1)} for i in range(k)], classes=["a", "b", "c"],
               thresholds={"default": [[0.9] * c if i % 4 else None for i in range(k - 1)]},
               forced_full_depth={"classes": [], "segments": []}, segment_keys=[], max_exit=10,
               calibration={"exits": []})
    doc["expected"] = {**doc["expected"], "exit_rate": [1 / k] * k, "segments": {}}
    doc = with_content_hash(doc)
    validate_document(doc)
    html = render_html(rp.make_context(doc, version=1, state="draft"))
    parts = re.findall(r"exits (\d+)–(\d+) of 14", html)
    assert parts == [("1", "6"), ("7", "12"), ("13", "14")]
    for table in re.findall(r'<table class="grid thr">.*?</table>', html, flags=re.S):
        assert table.count("<th class=\"n\">") <= EXITS_PER_TABLE
    assert html.count("(disabled by max_exit)") == 3  # exits 11, 12, 13 (0-based) are beyond max_exit=10
    assert html.count('class="n never"') == 4 * c  # rows 0, 4, 8, 12 are null


def test_diff_matches_the_compiled_decision_rule(context: rp.ReportContext) -> None:
    """Changed cells counted by the report agree with the rule's own threshold arrays."""
    parent = realistic_document(eps=0.015, parent=2, base=0.95)
    doc = context.document
    diff = context.diff
    assert diff is not None and not diff.unpaired and context.parent_version == 3
    assert diff == diff_documents(parent, doc)
    a, b = CompiledPolicy.from_document(parent), CompiledPolicy.from_document(doc)
    expected = 0
    for seg in ["default", *sorted((set(parent["thresholds"]) | set(doc["thresholds"])) - {"default"})]:
        ta = a.thresholds[a.segment_index.get(seg, 0)]
        tb = b.thresholds[b.segment_index.get(seg, 0)]
        same = (np.isnan(ta) & np.isnan(tb)) | (ta == tb)  # exact, as the diff engine compares
        expected += int((~same).sum())
    assert len(diff.thresholds) == expected > 0
    assert diff.cells_compared == 4 * 3 * 10
    changed = {r.label: (r.before, r.after) for r in diff_rows(diff) if r.changed}
    assert changed["budget ε"] == ("1.50%", "1.00%")
    assert "compute fraction" not in changed
    assert rp.make_context(doc).diff is None
    assert diff_documents(doc, doc).thresholds == () and diff_documents(doc, doc).identical


def test_a_renamed_class_is_a_field_change_and_the_other_cells_are_still_compared() -> None:
    doc = realistic_document()
    parent = dict(doc, classes=[*CLASSES[:-1], "Boot"])
    diff = diff_documents(parent, doc)
    assert (diff.unpaired.classes_before, diff.unpaired.classes_after) == (("Boot",), ("Ankle boot",))
    assert diff.cells_compared == 4 * 3 * 9 and diff.thresholds == ()
    assert [f.path for f in diff.changed] == ["classes"] and diff.changed_fields == ("classes",)
    text = visible_text(render_html(rp.make_context(doc, parent_document=parent)))
    assert "Content that differs from version 3: classes." in text
    assert "classes Ankle boot" not in text  # one class on each side: singular
    assert "class Boot (version 3); class Ankle boot (this version)" in text
    assert "No paired threshold changed." in text


def test_a_change_that_rounding_hides_is_still_shown() -> None:
    doc = realistic_document()
    parent = realistic_document()
    parent["guarantee"]["eps"] += 1e-9
    parent["thresholds"]["default"][0][0] += 1e-13
    parent = with_content_hash(parent)
    diff = diff_documents(parent, doc)
    assert [(c.segment, c.exit_name, c.class_) for c in diff.thresholds] == [("default", "stage1", "T-shirt/top")]
    rows = {r.label: r for r in diff_rows(diff)}
    assert rows["budget ε"].changed and rows["budget ε"].before != rows["budget ε"].after
    assert rows["budget ε"].after == repr(doc["guarantee"]["eps"])  # printed exactly, not as two equal "1.00%"
    text = visible_text(render_html(rp.make_context(doc, parent_document=parent)))
    assert "1 setting and 1 of 120 threshold cells changed" in text
    assert f"{parent['thresholds']['default'][0][0]!r} {doc['thresholds']['default'][0][0]!r} -1.0e-13" in text


def test_failures_are_visible(context: rp.ReportContext) -> None:
    doc = realistic_document()
    doc["guarantee"]["certified"] = False
    doc["guarantee"]["segments"]["mobile"]["certified"] = False
    doc = with_content_hash(doc)
    ctx = realistic_context(
        doc, chain=rp.ChainVerification(False, 17, "event 18: previous-hash mismatch", T0),
        environments=(rp.EnvironmentStatus("production", "active", True, T0, 4),), state="active")
    text = visible_text(render_html(ctx))
    assert "The policy is not certified" in text and "not certified" in text
    assert "FAILED event 18: previous-hash mismatch" in text
    assert "kill switch ON in production" in text and "ON — never exit" in text
    assert text.count("fail") >= 2  # mobile and scan rows


def test_untrusted_strings_are_escaped() -> None:
    doc = realistic_document()
    doc["classes"] = [*CLASSES[:-1], "<script>alert(1)</script>"]
    doc = with_content_hash(doc)
    html = render_html(realistic_context(doc, author="<img src=x onerror=alert(1)>"))
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_render_is_a_pure_function_of_the_context(context: rp.ReportContext, html: str) -> None:
    figures._memo.cache_clear()  # draw every figure again: the bytes must not change
    assert render_html(context) == html


def test_first_version_without_governance_facts_renders() -> None:
    doc = realistic_document(parent=None)
    text = visible_text(render_html(rp.make_context(doc)))
    assert "This is the first version" in text and "No approvals yet" in text and "not checked" in text


def test_format_and_atomic_write(tmp_path: Path, context: rp.ReportContext) -> None:
    with pytest.raises(InputError, match="report format must be one of html, pdf"):
        render(context, "docx")
    out = tmp_path / "sub" / "r.html"
    rp.atomic_write(out, b"first")
    assert out.read_bytes() == b"first"

    with pytest.raises(TypeError):
        rp.atomic_write(out, 42)  # type: ignore[arg-type]
    assert out.read_bytes() == b"first"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temp file left behind
    assert rp.report_path(tmp_path, "fashion-cnn", 4) == tmp_path / "reports" / "fashion-cnn" / "v4.html"


# ----------------------------------------------------------------------------- rendered by real tools

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-extensions", "--mute-audio"]
A4_PT = (595.28, 841.89)


def _need(tool: str, *alternatives: str) -> str:
    """Path of ``tool``; skip with the reason when missing, fail under CI."""
    for name in (tool, *alternatives):
        path = shutil.which(name)
        if path:
            return path
    reason = f"{tool} is not installed (make system-deps installs it: apt-get install chromium poppler-utils)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _run(cmd: list[str], timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    """Run a tool in its own process group; kill the whole group on timeout (Chromium forks)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[bytes]:
    exe = _need("chromium", "chromium-browser")
    profile = tmp / f"chromium-profile-{uuid.uuid4().hex[:8]}"
    res = _run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args])
    shutil.rmtree(profile, ignore_errors=True)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    return res


def pdf_text(pdf: Path) -> str:
    res = _run([_need("pdftotext"), "-layout", str(pdf), "-"])
    assert res.returncode == 0, res.stderr
    return _squash(res.stdout.decode())


def pdf_pages(pdf: Path, prefix: Path, dpi: int = 40) -> list[Path]:
    res = _run([_need("pdftoppm"), "-r", str(dpi), "-png", str(pdf), str(prefix)])
    assert res.returncode == 0, res.stderr
    return sorted(prefix.parent.glob(prefix.name + "-*.png"))


def _margin_ink(png: Path, margin_mm: float) -> float:
    """Fraction of non-white pixels in the outer left/right ``margin_mm`` strips of a page image."""
    with Image.open(png) as im:
        img = np.asarray(im.convert("L"), dtype=np.int16)
    w = img.shape[1]
    px = max(1, round(w * margin_mm / 210.0))
    strips = np.concatenate([img[:, :px], img[:, w - px:]], axis=1)
    return float((strips < 235).mean())


def _assert_pages_fit(pages: list[Path]) -> None:
    assert pages
    for page in pages:
        with Image.open(page) as im:
            w, h = im.size
        assert abs(h / w - A4_PT[1] / A4_PT[0]) < 0.01, f"{page.name} is not A4 portrait ({w}x{h})"
        # The print margins are 15 mm; nothing may reach into the outer 11 mm of either side.
        assert _margin_ink(page, 11.0) == 0.0, f"{page.name}: content overflows into the page margin"


OVERFLOW_PROBE = """<script>
addEventListener('load', () => {
  const box = document.querySelector('main.report').getBoundingClientRect();
  const bad = [];
  for (const el of document.querySelectorAll('main.report *')) {
    const r = el.getBoundingClientRect();
    if (r.width && (r.right > box.right + 0.5 || r.left < box.left - 0.5)) bad.push(el.tagName + '.' + el.className);
  }
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth) bad.push('page scrolls sideways: ' + doc.scrollWidth);
  document.body.setAttribute('data-overflow', JSON.stringify(bad));
});
</script>"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, html: str) -> Path:
    out = tmp_path_factory.mktemp("report")
    (out / "report.html").write_text(html, encoding="utf-8")
    return out


def test_chromium_renders_the_report_with_the_key_numbers(rendered: Path, context: rp.ReportContext) -> None:
    url = (rendered / "report.html").as_uri()
    shot = rendered / "chromium.png"
    chromium([f"--screenshot={shot}", "--window-size=1000,2600", url], rendered)
    with Image.open(shot) as im:
        assert im.size == (1000, 2600)
        grey = np.asarray(im.convert("L"))
    assert grey.std() > 20  # something was drawn, not a blank page

    # The text a reader sees: Chromium lays the page out and prints it; pdftotext reads it back.
    printed = rendered / "chromium-print.pdf"
    chromium([f"--print-to-pdf={printed}", "--no-pdf-header-footer", url], rendered)
    text = pdf_text(printed)
    for what, value in key_numbers(dict(context.document)).items():
        assert value in text, f"{what} {value!r} not in Chromium's rendered text"
    _assert_pages_fit(pdf_pages(printed, rendered / "chromium-page"))


def test_nothing_overflows_at_a4_width_in_chromium(rendered: Path, html: str) -> None:
    probe = rendered / "probe.html"
    probe.write_text(html.replace("</body>", OVERFLOW_PROBE + "</body>"), encoding="utf-8")
    # 794 CSS px = 210 mm: the report's own width on screen and in print.
    res = chromium(["--window-size=794,1123", "--virtual-time-budget=2000", "--dump-dom", probe.as_uri()], rendered)
    dom = res.stdout.decode()
    found = re.search(r'data-overflow="([^"]*)"', dom)
    assert found, "the overflow probe did not run"
    assert htmllib.unescape(found.group(1)) == "[]"


def test_weasyprint_pdf_pages_and_text(rendered: Path, html: str, context: rp.ReportContext,
                                       caplog: pytest.LogCaptureFixture) -> None:
    pdf = rendered / "report.pdf"
    with caplog.at_level("WARNING", logger="weasyprint"):
        pdf.write_bytes(render_pdf(html))
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("weasyprint")]  # no ignored CSS
    assert pdf.read_bytes().startswith(b"%PDF-")
    text = pdf_text(pdf)
    for what, value in key_numbers(dict(context.document)).items():
        assert value in text, f"{what} {value!r} not in the PDF text"
    for heading in ("1 Summary", "2 Evidence", "3 Calibration", "4 Decision", "5 Guarantee", "6 Cost"):
        assert heading in text
    assert "page 1 of" in text  # the running footer
    pages = pdf_pages(pdf, rendered / "page")
    assert 7 <= len(pages) <= 16  # one run of pages per section
    _assert_pages_fit(pages)


# ----------------------------------------------------------------------------- from the policy store


def _populate(session: Any, actors: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """v1 (parent) and v2 of fashion-cnn through the real lifecycle: approve, activate, kill."""
    v1 = realistic_document(eps=0.015, parent=None, base=0.95)
    v2 = realistic_document(parent=1)
    lifecycle.create_version(v1, author=actors.author, session=session)
    lifecycle.approve("fashion-cnn", 1, approver=actors.approver, reason="first policy", session=session)
    lifecycle.activate("fashion-cnn", 1, "staging", actor=actors.approver, reason="canary", session=session)
    lifecycle.activate("fashion-cnn", 1, "production", actor=actors.approver, reason="go", session=session)
    lifecycle.create_version(v2, author=actors.author, session=session)
    lifecycle.approve("fashion-cnn", 2, approver=actors.approver2, reason="Bounds checked against the Q2 budget",
                      session=session)
    lifecycle.activate("fashion-cnn", 2, "staging", actor=actors.approver, reason="Staging canary", session=session)
    lifecycle.kill("fashion-cnn", "staging", actor=actors.author, reason="latency spike", session=session)
    return v1, v2


def test_build_context_collects_the_stored_facts(session: Any, actors: Any) -> None:
    _v1, v2 = _populate(session, actors)
    ctx = rp.build_context(session, "fashion-cnn", 2)
    assert ctx.version == 2 and ctx.state == "active" and ctx.author == actors.author.name
    assert ctx.document["content_hash"] == v2["content_hash"]
    assert [(a.principal, a.comment) for a in ctx.approvals] == [(actors.approver2.name,
                                                                  "Bounds checked against the Q2 budget")]
    envs = {e.environment: e for e in ctx.environments}
    assert envs["staging"].state == "active" and envs["staging"].killed and envs["staging"].active_version == 2
    assert envs["production"].state == "not deployed" and envs["production"].active_version == 1
    assert [e.action for e in ctx.audit_events] == ["version.create", "version.approve", "version.activate",
                                                    "killswitch.kill"]
    assert ctx.chain is not None and ctx.chain.ok and ctx.chain.checked >= 10
    # The diff agrees with the store's own diff of the two versions.
    assert ctx.diff is not None and ctx.parent_version == 1
    theirs = store.diff_versions("fashion-cnn", 1, 2, session=session)
    assert ctx.diff == theirs.diff and ctx.diff.thresholds  # one diff engine

    text = visible_text(render_html(ctx))
    for what, value in key_numbers(v2, version=2).items():
        assert value in text, what
    assert "kill switch ON in staging" in text and "“latency spike”" in text  # the kill is in the timeline
    assert "Against version 1" in text and f"approved by {actors.approver2.name}" in text

    parent_ctx = rp.build_context(session, "fashion-cnn", 1)
    assert {e.environment: e.state for e in parent_ctx.environments}["staging"].startswith("was active until")
    body, media = rp.report_response(session, "fashion-cnn", 1, "html")
    assert media == "text/html; charset=utf-8" and body.startswith(b"<!DOCTYPE html>")
    assert "This is the first version" in visible_text(body.decode())


def test_unknown_version_is_not_found(session: Any, actors: Any) -> None:
    _populate(session, actors)
    with pytest.raises(NotFound):
        rp.build_context(session, "fashion-cnn", 9)
    with pytest.raises(NotFound):
        rp.report_response(session, "no-such-model", 1, "html")


def _cli_app() -> Any:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """exitwise (test root: keeps ``report`` a sub-command)."""

    report_cli.register(app)
    return app


def test_cli_and_approval_hook_on_a_committed_store(store_env: str, fresh_engine: Any, make_actors: Any,
                                                    tmp_path: Path) -> None:
    hook = rp.install_approval_hook(fresh_engine, data_dir=tmp_path / "data")
    try:
        with unit_of_work(fresh_engine) as s:
            actors = make_actors(s)
            _populate(s, actors)
        with unit_of_work(fresh_engine) as s:
            lifecycle.create_version(realistic_document(parent=2, base=0.91), author=actors.author, session=s)
        with unit_of_work(fresh_engine) as s:
            lifecycle.approve("fashion-cnn", 3, approver=actors.approver, reason="ok", session=s)
    finally:
        events.remove(hook)
    written = sorted((tmp_path / "data" / "reports" / "fashion-cnn").iterdir())
    assert [p.name for p in written] == ["v1.html", "v2.html", "v3.html"]  # one per approval, after commit
    assert "version 3" in visible_text(written[-1].read_text(encoding="utf-8"))

    runner = CliRunner()
    out = tmp_path / "v2.html"
    res = runner.invoke(_cli_app(), ["report", "fashion-cnn", "2", "--format", "html", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["path"] == str(out) and info["version"] == 2 and info["bytes"] == out.stat().st_size
    assert key_numbers(realistic_document(parent=1), 2)["compute fraction"] in visible_text(out.read_text())
    res = runner.invoke(_cli_app(), ["report", "fashion-cnn", "7", "--out", str(tmp_path / "x.html")])
    assert res.exit_code != 0 and not (tmp_path / "x.html").exists()


def test_cli_renders_a_document_file(tmp_path: Path) -> None:
    doc_path, parent_path = tmp_path / "policy.json", tmp_path / "parent.json"
    doc_path.write_text(json.dumps(realistic_document()), encoding="utf-8")
    parent_path.write_text(json.dumps(realistic_document(eps=0.015, parent=2, base=0.95)), encoding="utf-8")
    out = tmp_path / "draft.html"
    res = CliRunner().invoke(_cli_app(), ["report", "--document", str(doc_path), "--parent", str(parent_path),
                                          "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = visible_text(out.read_text(encoding="utf-8"))
    assert "unregistered" in text.lower() and "Against version" in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "exitwise.policy/v1"}', encoding="utf-8")
    res = CliRunner().invoke(_cli_app(), ["report", "--document", str(bad), "--out", str(tmp_path / "b.html")])
    assert res.exit_code != 0 and not (tmp_path / "b.html").exists()
    assert isinstance(res.exception, InputError) and "invalid policy document" in str(res.exception)


def _without_the_reports_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import jinja2`` fail, as when the ``[reports]`` extra is not installed (restored afterwards)."""
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.delitem(sys.modules, "exitwise.policies.report.render", raising=False)


def test_cli_without_the_reports_extra_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    doc_path, out = tmp_path / "policy.json", tmp_path / "draft.html"
    doc_path.write_text(json.dumps(realistic_document()), encoding="utf-8")
    monkeypatch.delenv("EXITWISE_DEBUG", raising=False)
    _without_the_reports_extra(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--document", str(doc_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and not out.exists()
    assert err.startswith("error: ") and "'jinja2'" in err and "pip install 'exitwise[reports]'" in err
    assert "Traceback" not in err


def test_approval_hook_without_the_reports_extra_keeps_the_approval(fresh_engine: Any, make_actors: Any,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    _without_the_reports_extra(monkeypatch)
    hook = rp.install_approval_hook(fresh_engine, data_dir=tmp_path)  # installs without the extra
    try:
        with unit_of_work(fresh_engine) as s:
            actors = make_actors(s)
            lifecycle.create_version(realistic_document(parent=None), author=actors.author, session=s)
        with caplog.at_level("WARNING", logger="exitwise.policies.report.hook"), unit_of_work(fresh_engine) as s:
            lifecycle.approve("fashion-cnn", 1, approver=actors.approver, reason="ok", session=s)
    finally:
        events.remove(hook)
    with unit_of_work(fresh_engine, readonly=True) as s:
        assert store.get_version("fashion-cnn", 1, session=s).state == "approved"
    assert not (tmp_path / "reports").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "exitwise.policies.report.hook"]
    assert warnings and all("fashion-cnn v1 not written" in w and "exitwise[reports]" in w for w in warnings)


# ----------------------------------------------------------------------------- a real solved policy


@pytest.fixture(scope="module")
def solved_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A policy solved by ``exitwise solve`` (policies/document.py) on small synthetic logs."""
    d = tmp_path_factory.mktemp("solved")
    logs = synthetic_logs(5000, 4, 10, segments={"region": 3}, seed=1)
    write_logs(logs, d / "logs.npz", form="npz")
    write_card(logs.card, d / "card.json")
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """exitwise (test root)."""

    solve.register(app)
    res = CliRunner().invoke(app, ["solve", str(d / "logs.npz"), "--card", str(d / "card.json"), "--out",
                                   str(d / "policy.json"), "--eps", "0.03", "--segment-key", "region",
                                   "--segment-budget", "*=0.05", "--forbid-class", "class3", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads((d / "policy.json").read_text(encoding="utf-8"))


def test_a_solved_policy_renders_and_fits(solved_doc: dict[str, Any], tmp_path: Path) -> None:
    ctx = rp.context_from_document(solved_doc, version=1)
    html = render_html(ctx)
    text = visible_text(html)
    for what, value in key_numbers(solved_doc, version=1).items():
        assert value in text, what
    g = solved_doc["guarantee"]
    for seg, s in g["segments"].items():
        if seg != "__all__" and s.get("upper_bound") is not None:
            assert f"{seg} {s['n']:,} {fmt_risk(s['eps'])} {fmt_risk(s['upper_bound'])}" in text
    for b in solved_doc["expected"]["baselines"].values():
        assert fmt_pct(b["compute_fraction"]) in text
    for bs, v in solved_doc["expected"]["batch_compute_fraction"].items():
        assert f"{bs} {fmt_pct(v)}" in text
    assert html.count('<figure class="rel">') == 1  # 4 exits -> one 2x2 image of reliability diagrams
    assert "class3 full depth" in text  # the forbidden class is marked in every threshold table
    sel = solved_doc["solver"]["selection"]  # the family choice and its cross-validation table
    assert f"Chosen: {sel['chosen']}" in text
    assert f"by {sel['folds']}-fold cross-validation on {sel['rows']:,} rows" in text
    for c in sel["candidates"]:
        assert f"{c['family']} {c['label']} {fmt_pct(c['oof_compute_fraction'])} {fmt_risk(c['oof_risk'])}" in text
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", OVERFLOW_PROBE + "</body>"), encoding="utf-8")
    res = chromium(["--window-size=794,1123", "--virtual-time-budget=2000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'data-overflow="([^"]*)"', res.stdout.decode())
    assert found and htmllib.unescape(found.group(1)) == "[]"


# ---------------------------------------------------------------- the cache of rendered reports (issue 15)

def test_the_cache_key_changes_with_what_the_report_shows_and_only_with_that(context: rp.ReportContext) -> None:
    key = report_key(context, "pdf")
    later = replace(context, generated_at=T0 + dt.timedelta(days=9),
                    chain=replace(context.chain, verified_at=T0 + dt.timedelta(days=9)))
    assert report_key(later, "pdf") == key  # rendering again later shows the same facts
    killed = tuple(replace(e, killed=True) if e.environment == "production" else e for e in context.environments)
    changed = [
        replace(context, state="retired"),
        replace(context, approvals=(*context.approvals, rp.Approval("carol", T0, "second look"))),
        replace(context, environments=killed),
        replace(context, audit_events=context.audit_events[:-1]),
        replace(context, chain=replace(context.chain, ok=False, message="link 12 broken")),
        replace(context, document={**context.document, "shadow_rate": 0.5}),
    ]
    keys = {report_key(c, "pdf") for c in changed} | {key, report_key(context, "html")}
    assert len(keys) == len(changed) + 2
