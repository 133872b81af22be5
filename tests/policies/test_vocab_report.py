"""The audit report of a 150k-vocabulary policy: token buckets, never a row per token; small; drawn by Chromium.

The rendered check reuses the report tests' real tools (``test_report``: headless Chromium,
poppler's ``pdftotext``); without them it skips with the reason, except under CI.
"""

from __future__ import annotations

import copy
import html as htmllib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_report import OVERFLOW_PROBE, chromium, pdf_text, visible_text
from vocab_policy_docs import QWEN_VOCAB, vocabulary_doc

from exitwise.policies import report as rp
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.report.render import render_html
from exitwise.policies.report.vocabulary import TAIL_MODEL

MAX_REPORT_BYTES = 300 * 1024
MAX_THRESHOLD_ROWS = 36  # "a few dozen": buckets x tables, never tokens


@pytest.fixture(scope="module")
def doc(make_doc: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return vocabulary_doc(make_doc())


@pytest.fixture(scope="module")
def parent(make_doc: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(vocabulary_doc(make_doc(), seed=1))
    out["thresholds"]["default"][0][0] = 0.97
    return with_content_hash({k: v for k, v in out.items() if k != "content_hash"})


@pytest.fixture(scope="module")
def html(doc: dict[str, Any], parent: dict[str, Any]) -> str:
    return render_html(rp.make_context(doc, parent_document=parent, parent_version=1, version=2, state="draft"))


def _section(html: str, name: str, following: str) -> str:
    return html[html.index(f'<section id="{name}">'):html.index(f'<section id="{following}">')]


def test_the_report_of_a_150k_policy_is_small_and_shows_buckets(html: str, doc: dict[str, Any]) -> None:
    assert len(html.encode("utf-8")) < MAX_REPORT_BYTES
    decision = _section(html, "decision", "guarantee")
    tables = re.findall(r'<table class="grid thr">.*?</table>', decision, flags=re.S)
    rows = sum(t.count("<tr") - 1 for t in tables)  # body rows (one header row each)
    # default and studio, 11 early exits split into 2 tables each, 4 buckets per table; phone is forced
    assert len(tables) == 4 and rows == 4 * 4 <= MAX_THRESHOLD_ROWS
    assert html.count("<tr") < 150  # the whole report: nowhere a row per token
    for t in tables:
        assert "Token bucket of the predicted token" in t
        assert [htmllib.unescape(n).strip() for n in re.findall(r"<tr[^>]*><td>([^<]+)", t)] == doc["classes"]


def test_the_vocabulary_facts_and_each_bucket_are_in_the_visible_text(html: str, doc: dict[str, Any]) -> None:
    text = visible_text(html)
    vocab = doc["vocabulary"]
    assert f"Vocabulary {QWEN_VOCAB:,} tokens, 4 token buckets" in text
    assert "Top-k 32 largest logits per exit" in text
    assert f"Tail model {TAIL_MODEL}" in text
    assert "Bucket method frequency" in text and vocab["bucket_of"]["sha256"] in text
    shares = vocab["buckets"]["share"]
    for name, n, share in zip(doc["classes"], vocab["buckets"]["tokens"], shares, strict=True):
        assert f"{name} {n:,} {100 * share:.1f}%" in text  # the token buckets table
        assert f"{n:,} token{'' if n == 1 else 's'} · {100 * share:.1f}% of traffic" in text  # threshold row detail
    assert "Tokens whose early answer falls in bucket rest always go to full depth" in text
    assert f"Decisions are per token of a {QWEN_VOCAB:,}-token vocabulary" in text


def test_a_changed_bucket_map_is_one_line_of_the_change_section(html: str, doc: dict[str, Any],
                                                               parent: dict[str, Any]) -> None:
    change = visible_text(html[html.index('<section id="change">'):])
    before, after = (d["vocabulary"]["bucket_of"]["sha256"][:16] for d in (parent, doc))
    assert change.count("Vocabulary bucket map changed") == 1
    assert f"Vocabulary bucket map changed: sha256 {before} → {after}." in change
    assert f"token-to-bucket map (sha256) changed {before} {after}" in change
    assert "1 of 132 threshold cells changed" in change  # 3 segments x 11 early exits x 4 buckets


def test_without_traffic_shares_the_report_says_so(make_doc: Callable[..., dict[str, Any]]) -> None:
    bare = vocabulary_doc(make_doc(), vocab_size=5000, with_share=False)
    text = visible_text(render_html(rp.context_from_document(bare, version=1)))
    assert "The document records no share of traffic per bucket." in text
    assert re.search(r"tokens? · [0-9.]+% of traffic", text) is None
    for name, n in zip(bare["classes"], bare["vocabulary"]["buckets"]["tokens"], strict=True):
        assert f"{name} {n:,} —" in text  # the share column of the token buckets table


def test_chromium_renders_the_vocabulary_report(html: str, doc: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    printed = tmp_path / "print.pdf"
    chromium([f"--print-to-pdf={printed}", "--no-pdf-header-footer", page.as_uri()], tmp_path)
    text = pdf_text(printed)
    assert TAIL_MODEL in text and f"{QWEN_VOCAB:,} tokens" in text
    for name in doc["classes"]:
        assert name in text
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", OVERFLOW_PROBE + "</body>"), encoding="utf-8")
    res = chromium(["--window-size=794,1123", "--virtual-time-budget=2000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'data-overflow="([^"]*)"', res.stdout.decode())
    assert found and htmllib.unescape(found.group(1)) == "[]"
