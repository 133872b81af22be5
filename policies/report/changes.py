"""The diff against the parent version as the report shows it: reviewed fields as rows, threshold changes.

The diff itself comes from the one engine, :mod:`exitwise.policies.diff` (exact comparison);
this module only labels and formats it. Where rounding would print a changed value as its old
one, both are printed exactly, so a reviewer never reads "unchanged" for a change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exitwise.policies.diff import ALL_SEGMENTS, BUCKET_MAP_FIELD, PolicyDiff, ThresholdChange
from exitwise.policies.report.formatting import (
    MISSING,
    fmt_calibrator,
    fmt_cost,
    fmt_delta,
    fmt_exact,
    fmt_int,
    fmt_num,
    fmt_pct,
    fmt_risk,
    fmt_time,
    fmt_value,
    short_hash,
)

MAX_LISTED_CHANGES = 40  # individual threshold changes listed in the diff; the rest are counted


@dataclass(frozen=True)
class DiffRow:
    """One reviewed field of the diff, formatted; ``changed`` comes from the diff engine (exact)."""

    group: str
    label: str
    before: str
    after: str
    changed: bool


def _text(v: Any) -> str:
    return MISSING if v is None else str(v)


def _time_window(v: Any) -> str:
    return " → ".join(fmt_time(t) for t in v) if isinstance(v, list | tuple) else fmt_value(v)


def _rates(v: Any) -> str:
    return ", ".join(fmt_pct(x) for x in v) if isinstance(v, list | tuple) else fmt_value(v)


def _counts(v: Any) -> str:
    return ", ".join(fmt_int(x) for x in v) if isinstance(v, list | tuple) else fmt_value(v)


Formatter = Callable[[Any], str]
# the rows always shown (changed or not); every other reviewed field is shown when it changed
_SHOWN: Mapping[str, tuple[str, Formatter]] = {
    "guarantee.risk": ("risk", _text),
    "guarantee.eps": ("budget ε", fmt_risk),
    "guarantee.delta": ("δ (1 − confidence)", lambda v: fmt_num(v, 3)),
    "guarantee.method": ("method", _text),
    "guarantee.n": ("certification rows", fmt_int),
    "guarantee.certified": ("certified", fmt_value),
    f"guarantee.segments.{ALL_SEGMENTS}.upper_bound": ("certified upper bound (all traffic)", fmt_risk),
    "guarantee.uncertified_segments": ("uncertified segments", fmt_value),
    "expected.compute_fraction": ("compute fraction", fmt_pct),
    "expected.risk": ("held-out risk", fmt_risk),
    "score": ("score", _text),
    "max_exit": ("max_exit", fmt_value),
    "shadow_rate": ("shadow rate", lambda v: fmt_pct(v, 2)),
    "forced_full_depth.classes": ("forced full-depth classes", fmt_value),
    "forced_full_depth.segments": ("forced full-depth segments", fmt_value),
    "data.fingerprint": ("data fingerprint", lambda v: short_hash(v, 16)),
}
_WHEN_CHANGED: Mapping[str, tuple[str, Formatter]] = {
    "model.version": ("model version", _text),
    "exits": ("exits", fmt_value),
    "classes": ("classes", fmt_value),
    "segment_keys": ("segment keys", fmt_value),
    "thresholds.segments": ("segments with their own threshold table", fmt_value),
    "guarantee.split": ("data split", fmt_value),
    "expected.disagreement": ("held-out disagreement", fmt_risk),
    "expected.induced_error": ("held-out induced error", fmt_risk),
    "expected.exit_rate": ("exit rates", _rates),
    "data.rows": ("data rows", fmt_value),
    "data.time_window": ("data time window", _time_window),
    "vocabulary.size": ("vocabulary size (tokens)", fmt_int),
    "vocabulary.top_k": ("top-k of the scores", fmt_int),
    "vocabulary.buckets.method": ("token bucket method", _text),
    "vocabulary.buckets.tokens": ("tokens per bucket", _counts),
    BUCKET_MAP_FIELD: ("token-to-bucket map (sha256)", lambda v: short_hash(v, 16)),
}
_SEGMENT_FIELDS: Mapping[str, tuple[str, Formatter]] = {
    "eps": ("budget ε", fmt_risk), "upper_bound": ("certified upper bound", fmt_risk),
    "certified": ("certified", fmt_value),
}


def _calibrator_words(cal: Any) -> str:
    return " ".join(fmt_calibrator(cal)) if isinstance(cal, Mapping) else fmt_value(cal)


def _describe(path: str) -> tuple[str, Formatter, bool]:
    """(label, formatter, always shown) of a reviewed field; unknown fields read as their path."""
    if path in _SHOWN:
        return (*_SHOWN[path], True)
    if path in _WHEN_CHANGED:
        return (*_WHEN_CHANGED[path], False)
    batch = "expected.batch_compute_fraction."
    if path.startswith(batch):
        return f"compute fraction, batch {path[len(batch):]}", fmt_pct, True
    if path.startswith("exits.") and path.endswith(".cost"):
        return f"cost of {path[len('exits.'):-len('.cost')]}", fmt_cost, False
    if path.startswith("exits.") and path.endswith(".calibrator"):
        return f"calibrator of {path[len('exits.'):-len('.calibrator')]}", _calibrator_words, False
    seg = "guarantee.segments."
    if path.startswith(seg) and path.rsplit(".", 1)[1] in _SEGMENT_FIELDS:
        name, key = path[len(seg):].rsplit(".", 1)
        label, fmt = _SEGMENT_FIELDS[key]
        return f"{label}, segment {name}", fmt, False
    return path, fmt_value, False


def diff_rows(diff: PolicyDiff) -> list[DiffRow]:
    """The diff's reviewed fields as table rows: the usual ones always, every other one when it changed.

    When rounding would print a changed value as its old one, both are printed exactly.
    """
    rows = []
    for f in diff.fields:
        label, fmt, always = _describe(f.path)
        if not (always or f.changed):
            continue
        before, after = fmt(f.before), fmt(f.after)
        if f.changed and before == after:
            before, after = fmt_exact(f.before), fmt_exact(f.after)
        rows.append(DiffRow(f.group, label, before, after, f.changed))
    return rows


def _threshold_texts(c: ThresholdChange) -> tuple[str, str, str]:
    """(before, after, change) of one threshold cell; printed exactly when three decimals would hide it."""
    before = "never" if c.before is None else fmt_num(c.before)
    after = "never" if c.after is None else fmt_num(c.after)
    if c.before is not None and c.after is not None:
        if before == after:
            before, after = fmt_exact(c.before), fmt_exact(c.after)
        return before, after, fmt_delta(c.after - c.before)
    return before, after, "now exits" if c.before is None else "now never"


def _change_group(segment: str, exit_name: str, changes: Sequence[ThresholdChange]) -> dict[str, Any]:
    """Summary of the threshold changes of one (segment, exit): count, mean and largest move."""
    deltas = [c.after - c.before for c in changes if c.before is not None and c.after is not None]
    return {
        "segment": segment, "exit": exit_name, "n": len(changes),
        "mean": fmt_delta(sum(deltas) / len(deltas)) if deltas else MISSING,
        "largest": fmt_delta(max(deltas, key=abs)) if deltas else MISSING,
        "now_never": sum(c.after is None for c in changes), "now_exits": sum(c.before is None for c in changes),
    }


def _field_groups(rows: Sequence[DiffRow]) -> list[tuple[str, list[DiffRow]]]:
    groups: dict[str, list[DiffRow]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    return list(groups.items())


def _unpaired_note(diff: PolicyDiff, parent_version: int | None) -> str:
    """Which exits and classes exist on one side only (their threshold cells are not paired), in words."""
    u = diff.unpaired
    if not u:
        return ""
    parent = f"version {parent_version}" if parent_version is not None else "the parent version"
    parts = []
    for kind, names, where in (("exit", u.exits_before, parent), ("exit", u.exits_after, "this version"),
                               ("class", u.classes_before, parent), ("class", u.classes_after, "this version")):
        if names:
            plural = {"exit": "exits", "class": "classes"}[kind] if len(names) > 1 else kind
            parts.append(f"{plural} {', '.join(names)} ({where})")
    return ("Threshold cells are compared by exit and class name. Not paired, present on one side only: "
            + "; ".join(parts) + "; see the exits and classes rows above.")


def diff_view(diff: PolicyDiff, parent_version: int | None) -> dict[str, Any]:
    """The template's ``diff`` variable: counts, the reviewed fields by group, the threshold changes."""
    listed = diff.thresholds[:MAX_LISTED_CHANGES]
    by_group: dict[tuple[str, str], list[ThresholdChange]] = {}
    for ch in diff.thresholds:
        by_group.setdefault((ch.segment, ch.exit_name), []).append(ch)
    rows = diff_rows(diff)
    changes = []
    for c in listed:
        before, after, delta = _threshold_texts(c)
        changes.append({"segment": c.segment, "exit": c.exit_name, "cls": c.class_, "before": before, "after": after,
                        "delta": delta})
    return {
        "parent_version": parent_version, "parent_hash": short_hash(diff.before_hash),
        "n_changed": len(diff.thresholds), "compared": diff.cells_compared,
        "fields_changed": sum(r.changed for r in rows),
        "changed_fields": ", ".join(diff.changed_fields),
        "changes": changes, "more": len(diff.thresholds) - len(listed),
        "groups": [_change_group(s, x, chs) for (s, x), chs in by_group.items()],
        "field_groups": _field_groups(rows),
        "note": _unpaired_note(diff, parent_version),
        "bucket_note": _bucket_note(diff),
    }


def _bucket_note(diff: PolicyDiff) -> str:
    """A changed token-to-bucket map, in words: one change, and what it means for the paired thresholds."""
    f = next((f for f in diff.fields if f.path == BUCKET_MAP_FIELD), None)
    if f is None or not f.changed:
        return ""
    return (f"Vocabulary bucket map changed: sha256 {short_hash(f.before, 16)} → {short_hash(f.after, 16)}. "
            "Thresholds are compared by bucket name; a bucket may now hold other tokens.")
