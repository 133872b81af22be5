"""What changed between two policy documents: the one diff engine (pure: documents in, a frozen diff out).

Used by the store (``exitwise policy diff``, ``GET /v1/models/{model}/diff``) and by the audit
report (a version against its parent). ``before`` is the first document, ``after`` the second.

The semantics are chosen for a reviewer, who must never be told "unchanged" for a real change:

- **Values are compared exactly** (:func:`same`): numbers by value (``1 == 1.0``, NaN equals
  NaN), booleans only equal booleans, lists and objects element by element. There is no
  tolerance: documents are JSON, which round-trips floats exactly, so there is no noise to
  absorb, and a threshold moved by 1e-13 is a different policy (another content hash, another
  decision at that confidence). Rounding for display is the caller's business and must not
  hide a change.
- **Nothing that changed goes unnamed**: ``changed_fields`` lists every top-level content field
  that differs (governance fields and the hash excluded), whatever the reviewed fields cover.
- **Structural changes are field changes, not refusals**: exit names, their costs and
  calibrators, classes, segment keys, the segments with their own threshold table and the
  model version are reviewed fields (:attr:`PolicyDiff.fields`) like the guarantee, the
  expected compute, the decision settings and the evidence.
- **Threshold cells are paired by name** — (segment, exit name, class name) — over the early
  exits and classes both documents have, so a reordered or inserted exit never pairs one
  exit's thresholds with another's. A segment without its own table reads as that document's
  ``default`` table and a null table, row or cell means "never exit", as in the decision rule
  (:mod:`exitwise.calibration.rule`). Cells of exits or classes on one side only cannot be
  paired; :attr:`PolicyDiff.unpaired` names them (and the ``exits``/``classes`` fields show the change).
- **Large vocabularies** (``vocabulary`` in a document): the classes are token buckets, so the
  thresholds are compared per bucket; the vocabulary's size, top-k, bucketing method and tokens
  per bucket are reviewed fields, and the token-to-bucket map is compared by its ``sha256``:
  a changed map is one change (:attr:`PolicyDiff.bucket_map_change`), never one per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exitwise.policies.canonical import GOVERNANCE_FIELDS

__all__ = ["ALL_SEGMENTS", "BUCKET_MAP_FIELD", "DEFAULT_SEGMENT", "FieldChange", "PolicyDiff", "ThresholdChange",
           "Unpaired", "Weakening", "diff_documents", "same", "segment_rows", "weakenings"]

ALL_SEGMENTS = "__all__"  # the guarantee's entry for all traffic
DEFAULT_SEGMENT = "default"  # the threshold table of every segment without its own
HEADLINE_EXPECTED = ("compute_fraction", "risk", "disagreement", "induced_error")
BUCKET_MAP_FIELD = "vocabulary.bucket_of"  # reviewed by its sha256, not its data

Doc = Mapping[str, Any]


def same(a: Any, b: Any) -> bool:
    """Exact equality of two JSON values: numbers by value (NaN equals NaN), booleans only equal booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@dataclass(frozen=True)
class FieldChange:
    """One reviewed field (a dotted ``path`` into the document) in both documents, unformatted."""

    group: str  # structure, exits, guarantee, expected, decision, evidence
    path: str
    before: Any
    after: Any

    @property
    def changed(self) -> bool:
        """True when the values differ at all (:func:`same`)."""
        return not same(self.before, self.after)


@dataclass(frozen=True)
class ThresholdChange:
    """One threshold cell that differs; ``exit`` is the exit's index in the second document; None = never exit."""

    segment: str
    exit: int
    exit_name: str
    class_: str
    before: float | None
    after: float | None


@dataclass(frozen=True)
class Unpaired:
    """Early exits and classes present in one document only: their threshold cells are not paired."""

    exits_before: tuple[str, ...] = ()
    exits_after: tuple[str, ...] = ()
    classes_before: tuple[str, ...] = ()
    classes_after: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.exits_before or self.exits_after or self.classes_before or self.classes_after)


@dataclass(frozen=True)
class PolicyDiff:
    """Two policy documents compared (see the module docstring for the semantics)."""

    before_hash: str
    after_hash: str
    changed_fields: tuple[str, ...]  # top-level content fields that differ, sorted
    fields: tuple[FieldChange, ...]  # the reviewed fields, changed or not, in reading order
    guarantee: Mapping[str, tuple[Any, Any]]  # every guarantee entry side by side
    expected: Mapping[str, tuple[Any, Any]]  # the headline expectations side by side
    thresholds: tuple[ThresholdChange, ...]  # paired cells that differ
    cells_compared: int  # paired cells, changed or not
    unpaired: Unpaired = Unpaired()
    weakened: tuple[Weakening, ...] = ()  # promises the second document no longer makes

    @property
    def identical(self) -> bool:
        """True when no content field differs (governance fields aside)."""
        return not self.changed_fields

    @property
    def changed(self) -> tuple[FieldChange, ...]:
        """The reviewed fields that differ."""
        return tuple(f for f in self.fields if f.changed)

    @property
    def bucket_map_change(self) -> str | None:
        """``"vocabulary bucket map changed: sha256 a -> b"`` when the token-to-bucket map differs, else None."""
        f = next((f for f in self.fields if f.path == BUCKET_MAP_FIELD), None)
        if f is None or not f.changed:
            return None
        return f"vocabulary bucket map changed: sha256 {f.before or 'none'} -> {f.after or 'none'}"


def diff_documents(before: Doc, after: Doc) -> PolicyDiff:
    """Compare two policy documents: reviewed fields, every changed top-level field and the thresholds."""
    changed = tuple(sorted(k for k in set(before) | set(after)
                           if k not in GOVERNANCE_FIELDS and not same(before.get(k), after.get(k))))
    gb, ga = _section(before, "guarantee"), _section(after, "guarantee")
    eb, ea = _section(before, "expected"), _section(after, "expected")
    thresholds, compared, unpaired = _threshold_changes(before, after)
    return PolicyDiff(
        before_hash=str(before.get("content_hash") or ""),
        after_hash=str(after.get("content_hash") or ""),
        changed_fields=changed,
        fields=tuple(_reviewed_fields(before, after)),
        guarantee={k: (gb.get(k), ga.get(k)) for k in sorted(set(gb) | set(ga))},
        expected={k: (eb.get(k), ea.get(k)) for k in HEADLINE_EXPECTED if k in eb or k in ea},
        thresholds=tuple(thresholds),
        cells_compared=compared,
        unpaired=unpaired,
        weakened=weakenings(before, after),
    )


# ---------------------------------------------------------------- weaker promises


@dataclass(frozen=True)
class Weakening:
    """One promise of ``before`` that ``after`` drops or loosens (``what`` names it)."""

    what: str
    before: Any
    after: Any
    message: str


def _budgets(guarantee: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    segments = guarantee.get("segments") or {}
    return {str(k): v for k, v in segments.items() if k != ALL_SEGMENTS and isinstance(v, Mapping)}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def weakenings(before: Doc, after: Doc) -> tuple[Weakening, ...]:
    """Every promise of ``before`` that ``after`` drops or loosens.

    A higher eps or delta, another risk, a certificate lost, a per-segment budget dropped,
    loosened or no longer certified, a class or segment no longer forced to full depth.
    Approving such a version needs an explicit, audited acceptance
    (:func:`exitwise.policies.lifecycle.approve`).
    """
    gb, ga = _section(before, "guarantee"), _section(after, "guarantee")
    out: list[Weakening] = []
    for key, word in (("eps", "ε"), ("delta", "δ")):
        b, a = _number(gb.get(key)), _number(ga.get(key))
        if b is not None and (a is None or a > b):
            shown = "none" if a is None else f"{a:g}"
            out.append(Weakening(f"guarantee.{key}", b, a, f"{word} raised from {b:g} to {shown}"))
    if gb.get("risk") is not None and ga.get("risk") != gb.get("risk"):
        out.append(Weakening("guarantee.risk", gb.get("risk"), ga.get("risk"),
                             f"risk changed from {gb.get('risk')} to {ga.get('risk')}: the budgets bound another loss"))
    if gb.get("certified") is True and ga.get("certified") is not True:
        out.append(Weakening("guarantee.certified", True, ga.get("certified"), "the policy is no longer certified"))
    bb, ba = _budgets(gb), _budgets(ga)
    for name, budget in sorted(bb.items()):
        new = ba.get(name)
        eps_b = _number(budget.get("eps"))
        if new is None:
            out.append(Weakening(f"guarantee.segments.{name}", eps_b, None,
                                 f"the per-segment budget of {name!r} (ε {eps_b:g}) was dropped"
                                 if eps_b is not None else f"the per-segment budget of {name!r} was dropped"))
            continue
        eps_a = _number(new.get("eps"))
        if eps_b is not None and (eps_a is None or eps_a > eps_b):
            out.append(Weakening(f"guarantee.segments.{name}.eps", eps_b, eps_a,
                                 f"the budget of segment {name!r} loosened from ε {eps_b:g} to {eps_a}"))
        elif budget.get("certified") is True and new.get("certified") is not True:
            out.append(Weakening(f"guarantee.segments.{name}.certified", True, new.get("certified"),
                                 f"segment {name!r} is no longer certified"))
    for key, noun in (("classes", "token bucket" if "vocabulary" in after else "class"), ("segments", "segment")):
        fb = set(_get(before, "forced_full_depth", key) or [])
        fa = set(_get(after, "forced_full_depth", key) or [])
        for name in sorted(fb - fa):
            out.append(Weakening(f"forced_full_depth.{key}", name, None,
                                 f"{noun} {name!r} is no longer forced to full depth"))
    return tuple(out)


# ---------------------------------------------------------------- reviewed fields


def _section(doc: Doc, key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _get(doc: Doc, *path: str) -> Any:
    """``doc[path[0]][path[1]]...``; None where any step is missing."""
    value: Any = doc
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _sorted(value: Any) -> Any:
    """A list of names in sorted order (order carries no meaning there); other values as they are."""
    return sorted(value, key=str) if isinstance(value, list | tuple) else value


def _names(items: Any) -> list[str]:
    return [str(x.get("name", i)) if isinstance(x, Mapping) else str(x) for i, x in enumerate(items or [])]


def _named_tables(doc: Doc) -> list[str]:
    return sorted(k for k in _section(doc, "thresholds") if k != DEFAULT_SEGMENT)


def _keyed(names: Sequence[str]) -> list[tuple[str, int]]:
    """(name, occurrence) per name, so that a repeated name pairs with its own repeat, never another."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        keys.append((name, seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    return keys


_STATIC: tuple[tuple[str, str, Callable[[Doc], Any]], ...] = (
    ("structure", "model.version", lambda d: _get(d, "model", "version")),
    ("structure", "exits", lambda d: _names(d.get("exits"))),
    ("structure", "classes", lambda d: list(d.get("classes") or [])),
    ("structure", "segment_keys", lambda d: list(d.get("segment_keys") or [])),
    ("structure", "thresholds.segments", _named_tables),
)
_VOCABULARY: tuple[tuple[str, Callable[[Doc], Any]], ...] = (
    ("vocabulary.size", lambda d: _get(d, "vocabulary", "size")),
    ("vocabulary.top_k", lambda d: _get(d, "vocabulary", "top_k")),
    ("vocabulary.buckets.method", lambda d: _get(d, "vocabulary", "buckets", "method")),
    ("vocabulary.buckets.tokens", lambda d: _get(d, "vocabulary", "buckets", "tokens")),
    (BUCKET_MAP_FIELD, lambda d: _get(d, "vocabulary", "bucket_of", "sha256")),
)
_GUARANTEE = ("risk", "eps", "delta", "method", "n", "certified")
_DECISION: tuple[tuple[str, Callable[[Doc], Any]], ...] = (
    ("score", lambda d: d.get("score")),
    ("max_exit", lambda d: d.get("max_exit")),
    ("shadow_rate", lambda d: d.get("shadow_rate")),
    ("forced_full_depth.classes", lambda d: _sorted(_get(d, "forced_full_depth", "classes") or [])),
    ("forced_full_depth.segments", lambda d: _sorted(_get(d, "forced_full_depth", "segments") or [])),
)


def _reviewed_fields(a: Doc, b: Doc) -> list[FieldChange]:
    """The fields a reviewer reads, in reading order: structure, exits, guarantee, expected, decision, evidence."""

    def at(group: str, *path: str) -> FieldChange:
        return FieldChange(group, ".".join(path), _get(a, *path), _get(b, *path))

    out = [FieldChange(group, path, get(a), get(b)) for group, path, get in _STATIC]
    if "vocabulary" in a or "vocabulary" in b:
        out += [FieldChange("structure", path, get(a), get(b)) for path, get in _VOCABULARY]
    exits_a = dict(zip(_keyed(_names(a.get("exits"))), a.get("exits") or [], strict=True))
    exits_b = dict(zip(_keyed(_names(b.get("exits"))), b.get("exits") or [], strict=True))
    for key in (k for k in exits_b if k in exits_a):
        for item in ("cost", "calibrator"):
            out.append(FieldChange("exits", f"exits.{key[0]}.{item}", _get(exits_a[key], item),
                                   _get(exits_b[key], item)))

    out += [at("guarantee", "guarantee", k) for k in _GUARANTEE]
    out.append(at("guarantee", "guarantee", "segments", ALL_SEGMENTS, "upper_bound"))
    out.append(FieldChange("guarantee", "guarantee.uncertified_segments",
                           _sorted(_get(a, "guarantee", "uncertified_segments") or []),
                           _sorted(_get(b, "guarantee", "uncertified_segments") or [])))
    segments = set(_section(_section(a, "guarantee"), "segments")) | set(_section(_section(b, "guarantee"), "segments"))
    out += [at("guarantee", "guarantee", "segments", seg, k)
            for seg in sorted(segments - {ALL_SEGMENTS}) for k in ("eps", "upper_bound", "certified")]
    out.append(at("guarantee", "guarantee", "split"))

    out.append(at("expected", "expected", "compute_fraction"))
    batches = set(_section(_section(a, "expected"), "batch_compute_fraction")) | \
        set(_section(_section(b, "expected"), "batch_compute_fraction"))
    out += [at("expected", "expected", "batch_compute_fraction", bs)
            for bs in sorted(batches, key=lambda s: (len(str(s)), str(s)))]
    out += [at("expected", "expected", k) for k in ("risk", "disagreement", "induced_error", "exit_rate")]

    out += [FieldChange("decision", path, get(a), get(b)) for path, get in _DECISION]
    out += [at("evidence", "data", k) for k in ("fingerprint", "rows", "time_window")]
    return out


# ---------------------------------------------------------------- thresholds


def segment_rows(doc: Doc, segment: str) -> Sequence[Any] | None:
    """The threshold rows that apply to ``segment``: its own table, else ``default`` (None = never exit)."""
    table = _section(doc, "thresholds")
    rows = table[segment] if segment in table else table.get(DEFAULT_SEGMENT)
    return rows if isinstance(rows, Sequence) else None


def _cell(doc: Doc, segment: str, exit_index: int, class_index: int) -> float | None:
    """The threshold of one cell (see :func:`segment_rows`); None = never exit."""
    rows = segment_rows(doc, segment)
    if rows is None or exit_index >= len(rows):
        return None
    row = rows[exit_index]
    if not isinstance(row, Sequence) or class_index >= len(row):
        return None
    return row[class_index]


def _threshold_changes(a: Doc, b: Doc) -> tuple[list[ThresholdChange], int, Unpaired]:
    early_a, early_b = _names(a.get("exits"))[:-1], _names(b.get("exits"))[:-1]
    classes_a, classes_b = [str(c) for c in a.get("classes") or []], [str(c) for c in b.get("classes") or []]
    exit_a = {key: i for i, key in enumerate(_keyed(early_a))}
    class_a = {key: i for i, key in enumerate(_keyed(classes_a))}
    exits = [(key, ia, ib) for ib, key in enumerate(_keyed(early_b)) if (ia := exit_a.get(key)) is not None]
    classes = [(key, ia, ib) for ib, key in enumerate(_keyed(classes_b)) if (ia := class_a.get(key)) is not None]
    segments = [DEFAULT_SEGMENT, *sorted(set(_named_tables(a)) | set(_named_tables(b)))]
    changes = []
    for seg in segments:
        for (exit_name, _), ja, jb in exits:
            for (cls, _), ca, cb in classes:
                before, after = _cell(a, seg, ja, ca), _cell(b, seg, jb, cb)
                if not same(before, after):
                    changes.append(ThresholdChange(seg, jb, exit_name, cls, before, after))
    paired_exits = {key for key, _, _ in exits}
    paired_classes = {key for key, _, _ in classes}
    unpaired = Unpaired(
        exits_before=tuple(n for n, key in zip(early_a, _keyed(early_a), strict=True) if key not in paired_exits),
        exits_after=tuple(n for n, key in zip(early_b, _keyed(early_b), strict=True) if key not in paired_exits),
        classes_before=tuple(n for n, key in zip(classes_a, _keyed(classes_a), strict=True)
                             if key not in paired_classes),
        classes_after=tuple(n for n, key in zip(classes_b, _keyed(classes_b), strict=True)
                            if key not in paired_classes),
    )
    return changes, len(segments) * len(exits) * len(classes), unpaired
