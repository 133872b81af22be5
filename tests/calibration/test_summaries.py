"""Summaries of exit logs: the fingerprint is deterministic and sees every change; segment counts."""

from __future__ import annotations

import numpy as np
import pytest

from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.summaries import fingerprint, segment_counts
from exitwise.calibration.synthetic import synthetic_logs


@pytest.fixture(scope="module")
def synth() -> ExitLogs:
    return synthetic_logs(300, 4, 5, segments={"region": 3, "device": 2}, seed=7)


def test_segment_counts(synth):
    counts = segment_counts(synth)
    assert set(counts) == {"region", "device"}
    assert sum(counts["region"].values()) == synth.n


def test_fingerprint_sensitive_and_deterministic(synth):
    fp = fingerprint(synth)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint(synth.take(np.arange(synth.n))) == fp
    changed = synth.logits.copy()
    changed[123, 2, 1] = np.nextafter(changed[123, 2, 1], np.float32(np.inf))
    variants = [
        ExitLogs(logits=changed, card=synth.card, labels=synth.labels, segments=synth.segments,
                 request_ids=synth.request_ids, ts=synth.ts),
        ExitLogs(logits=synth.logits, card=synth.card, labels=(synth.labels + 1) % synth.n_classes,
                 segments=synth.segments, request_ids=synth.request_ids, ts=synth.ts),
        ExitLogs(logits=synth.logits, card=synth.card, labels=synth.labels, segments={},
                 request_ids=synth.request_ids, ts=synth.ts),
        ExitLogs(logits=synth.logits, card=synth.card, labels=synth.labels, segments=synth.segments,
                 request_ids=synth.request_ids.astype(str).astype(object), ts=synth.ts),
        ExitLogs(logits=synth.logits, card=synth.card, labels=synth.labels, segments=synth.segments,
                 request_ids=synth.request_ids, ts=None),
        synth.take(np.arange(synth.n - 1)),
    ]
    prints = {fingerprint(v) for v in variants}
    assert fp not in prints and len(prints) == len(variants)
