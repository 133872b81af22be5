"""The audit report (issue 7): content, a real render in headless Chromium, and the PDF.

The rendered checks drive the real tools: Chromium (Debian ``chromium``) renders the HTML to
a screenshot and prints it to PDF, WeasyPrint renders our PDF, and poppler's ``pdftotext`` /
``pdftoppm`` read the text and rasterise the pages. Key numbers must appear in the text a
reader sees, not only in the HTML source. Without the tools the tests skip with the reason,
except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from policies import report as rp
from policies.canonical import with_content_hash
from policies.schema import validate_document

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
COSTS = [1.9e6, 5.2e6, 9.8e6, 14.6e6]
EXIT_RATE = [0.46, 0.22, 0.12, 0.20]


def _reliability(shift: float, seed: int) -> dict[str, list[float]]:
    """Ten equal-width bins of a plausible reliability diagram (over-confident by ``shift``)."""
    conf = [0.05 + 0.1 * i for i in range(10)]
    acc = [max(0.0, min(1.0, c - shift * math.sin(math.pi * c) + 0.01 * ((seed * 7 + i) % 3 - 1)))
           for i, c in enumerate(conf)]
    count = [0, 3, 12, 40, 95, 180, 320, 610, 1400, 7340][: len(conf)]
    return {"confidence": conf, "accuracy": acc, "count": count}


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
            for i, (name, acc, nll, ece) in enumerate([("stage1", 0.781, 0.642, 0.0712), ("stage2", 0.853, 0.431, 0.0515),
                                                       ("stage3", 0.897, 0.318, 0.0364), ("final", 0.921, 0.247, 0.0211)])
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
        approvals=(rp.Approval("bob", T0 + dt.timedelta(hours=3), "Bounds checked against the Q2 risk budget."),),
        environments=(rp.EnvironmentStatus("staging", "active", False, T0 + dt.timedelta(hours=4), 4),
                      rp.EnvironmentStatus("production", "active", False, T0 + dt.timedelta(days=1), 4)),
        audit_events=(
            rp.AuditEvent(T0, "alice", "create", "Re-solved on May traffic", None, None, doc["content_hash"], 38),
            rp.AuditEvent(T0 + dt.timedelta(hours=3), "bob", "approve", "Bounds checked against the Q2 risk budget.",
                          None, doc["content_hash"], doc["content_hash"], 39),
            rp.AuditEvent(T0 + dt.timedelta(hours=4), "carol", "activate", "Staging canary", "staging",
                          parent["content_hash"], doc["content_hash"], 40),
            rp.AuditEvent(T0 + dt.timedelta(days=1), "carol", "activate", "Canary clean for 24 h", "production",
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
