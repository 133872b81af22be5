"""The report of a large-vocabulary policy: token buckets, never a row per token.

A language model's policy (``vocabulary`` in the document) has one threshold column per token
bucket (its ``classes``), not per token: the report shows the buckets (name, tokens, share of
the traffic when the document records it) and the vocabulary's facts, including how the
scores treat the tokens outside the top-k (:mod:`exitwise.calibration.topk`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exitwise.policies.report.formatting import MISSING, finite, fmt_int, fmt_pct, short_hash

TAIL_MODEL = "scores computed from the top-k and the full log-sum-exp; tail shared equally"
METHODS: Mapping[str, str] = {
    "frequency": "by token frequency: the most frequent tokens first, cut at shares of the traffic",
    "mapping": "from a mapping given by the author",
}


@dataclass(frozen=True)
class Bucket:
    """One token bucket as the report shows it."""

    name: str
    tokens: str  # formatted count, or MISSING
    share: str  # formatted share of the traffic, or MISSING
    forced: bool

    @property
    def detail(self) -> str:
        """``"7 tokens · 50.1% of traffic"`` (the parts the document records)."""
        parts = []
        if self.tokens != MISSING:
            parts.append(f"{self.tokens} token{'' if self.tokens == '1' else 's'}")
        if self.share != MISSING:
            parts.append(f"{self.share} of traffic")
        return " · ".join(parts)


def _entry(values: Any, i: int) -> Any:
    return values[i] if isinstance(values, Sequence) and not isinstance(values, str) and i < len(values) else None


def buckets(doc: Mapping[str, Any]) -> list[Bucket]:
    """The document's token buckets (its ``classes``) with their token counts and traffic shares."""
    vocab = doc.get("vocabulary") if isinstance(doc.get("vocabulary"), Mapping) else {}
    info = vocab.get("buckets") if isinstance(vocab.get("buckets"), Mapping) else {}
    forced = set((doc.get("forced_full_depth") or {}).get("classes") or [])
    out = []
    for i, name in enumerate(doc.get("classes") or []):
        n, share = _entry(info.get("tokens"), i), _entry(info.get("share"), i)
        out.append(Bucket(str(name), fmt_int(n) if finite(n) else MISSING,
                          fmt_pct(share) if finite(share) else MISSING, str(name) in forced))
    return out


def vocabulary_view(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The template's ``vocabulary`` variable (None for a classifier's policy)."""
    vocab = doc.get("vocabulary")
    if not isinstance(vocab, Mapping):
        return None
    info = vocab.get("buckets") if isinstance(vocab.get("buckets"), Mapping) else {}
    bucket_map = vocab.get("bucket_of") if isinstance(vocab.get("bucket_of"), Mapping) else {}
    rows = buckets(doc)
    method = str(info.get("method") or "")
    size, top_k = vocab.get("size"), vocab.get("top_k")
    return {
        "size": fmt_int(size) if finite(size) else MISSING,
        "top_k": fmt_int(top_k) if finite(top_k) else MISSING,
        "n_buckets": len(rows),
        "method": method or MISSING,
        "method_words": METHODS.get(method, ""),
        "tail_model": TAIL_MODEL,
        "map_sha256": str(bucket_map.get("sha256") or MISSING),
        "map_short": short_hash(bucket_map.get("sha256"), 16),
        "buckets": rows,
        "has_share": any(b.share != MISSING for b in rows),
        "summary": f"{fmt_int(size) if finite(size) else MISSING} tokens in {len(rows)} "
                   f"bucket{'' if len(rows) == 1 else 's'}" + (f" ({method})" if method else ""),
    }
