"""Everything the report template reads, built from a :class:`~exitwise.policies.report.context.ReportContext`.

:func:`build_view` turns the facts into the template's variables: every number already
formatted (:mod:`~exitwise.policies.report.formatting`), the plain-language summary at the top
(:func:`plain_summary`), readable threshold tables, the diff against the parent
(:mod:`~exitwise.policies.report.changes`) and the figures (:mod:`exitwise.policies.figures`)
as data URIs, so the template only lays things out.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from exitwise.policies.canonical import verify_content_hash
from exitwise.policies.diff import ALL_SEGMENTS, DEFAULT_SEGMENT, segment_rows
from exitwise.policies.figures import baseline_label, monitor_svg, reference_is_final, report_figures
from exitwise.policies.report.changes import diff_view
from exitwise.policies.report.context import Monitoring, ReportContext
from exitwise.policies.report.formatting import (
    MISSING,
    finite,
    fmt_calibrator,
    fmt_cost,
    fmt_int,
    fmt_num,
    fmt_pct,
    fmt_risk,
    fmt_time,
    fmt_value,
    short_hash,
)
from exitwise.policies.report.vocabulary import buckets, vocabulary_view
from exitwise.policies.reverify import LABELS

ACTION_LABELS: Mapping[str, str] = {
    "version.create": "created", "version.approve": "approved", "version.activate": "activated",
    "version.rollback": "re-activated by rollback", "version.retire": "retired",
    "killswitch.kill": "kill switch turned ON", "killswitch.unkill": "kill switch turned OFF",
}
EXITS_PER_TABLE = 6  # threshold tables wider than this are split by exit so they fit A4 portrait
_SPLIT_ORDER = ("fit", "select", "choose", "certify")  # fit / select: documents before the two-way split


def _selection_view(sel: Any) -> dict[str, Any] | None:
    """The family choice of the policy document (``solver.selection``) as report rows."""
    if not isinstance(sel, Mapping):
        return None
    targets = sel.get("targets") or {}
    return {
        "chosen": str(sel.get("chosen", MISSING)), "folds": fmt_value(sel.get("folds")),
        "rows": fmt_int(sel.get("rows")) if finite(sel.get("rows")) else MISSING,
        "target": fmt_risk(targets.get("__all__")), "reason": str(sel.get("reason") or ""),
        "rows_table": [
            {"family": str(c.get("family")), "label": str(c.get("label") or ""), "chosen": c.get("family") == sel.get(
                "chosen"), "compute": fmt_pct(c.get("oof_compute_fraction")), "risk": fmt_risk(c.get("oof_risk"))}
            for c in sel.get("candidates") or [] if isinstance(c, Mapping)
        ],
    }


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# --------------------------------------------------------------------------- threshold tables


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
    rows: tuple[tuple[str, bool, tuple[Cell, ...], str], ...]  # (class or token bucket, forced, cells, detail)
    part: str = ""
    row_header: str = "Predicted class"


def _cells(doc: Mapping[str, Any], segment: str) -> list[list[float | None]]:
    """The (K-1) x C threshold cells that apply to ``segment``; None = never exit."""
    k, c = len(doc["exits"]), len(doc["classes"])
    out: list[list[float | None]] = [[None] * c for _ in range(k - 1)]
    for j, row in enumerate((segment_rows(doc, segment) or [])[: k - 1]):
        if row is not None:
            out[j] = [None if v is None else float(v) for v in row[:c]]
    return out


def _threshold_tables(doc: Mapping[str, Any]) -> list[ThresholdTable]:
    """Readable threshold tables: one per segment, classes down, exits across, split by exit.

    For a large-vocabulary policy the rows are its token buckets (with their token counts and
    traffic shares), never its tokens.
    """
    exits = [str(e.get("name", i)) for i, e in enumerate(doc["exits"])]
    classes = [str(c) for c in doc["classes"]]
    is_vocab = isinstance(doc.get("vocabulary"), Mapping)
    details = [b.detail for b in buckets(doc)] if is_vocab else [""] * len(classes)
    row_header = "Token bucket of the predicted token" if is_vocab else "Predicted class"
    forced = doc.get("forced_full_depth") or {}
    forced_classes = set(forced.get("classes") or [])
    forced_segments = set(forced.get("segments") or [])
    max_exit = doc.get("max_exit")
    table = doc.get("thresholds") or {}
    default_cells = _cells(doc, DEFAULT_SEGMENT)
    tables: list[ThresholdTable] = []
    segment_order = [DEFAULT_SEGMENT, *sorted(set(table) - {DEFAULT_SEGMENT})]
    segment_order += sorted(s for s in forced_segments if s not in table)
    for seg in segment_order:
        heading = "Default (every segment without its own table)" if seg == DEFAULT_SEGMENT else f"Segment “{seg}”"
        if seg in forced_segments:
            tables.append(ThresholdTable(seg, heading, "Forced to full depth: every request of this segment "
                                         "runs all exits; its thresholds are not used.", (), ()))
            continue
        cells = _cells(doc, seg)
        if seg != DEFAULT_SEGMENT and table.get(seg) is not None and cells == default_cells:
            tables.append(ThresholdTable(seg, heading, "Same thresholds as the default table.", (), ()))
            continue
        if all(v is None for row in cells for v in row):
            note = ("Never exits early: a segment value without its own table (not seen in the evidence) runs at "
                    "full depth." if seg == DEFAULT_SEGMENT and len(table) > 1 else
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
                rows.append((cls, is_forced, tuple(row_cells), details[ci] if ci < len(details) else ""))
            part = f"exits {idx[0] + 1}–{idx[-1] + 1} of {n_early}" if len(chunks) > 1 else ""
            tables.append(ThresholdTable(seg, heading, "", headers, tuple(rows), part, row_header))
    return tables


# --------------------------------------------------------------------------- the plain-language summary


def _risk_words(risk: str) -> tuple[str, str]:
    """(noun phrase, description) for a risk type, in a reviewer's words."""
    if risk == "induced_error":
        return ("induced error", "answers that are wrong where the full model would have been right")
    return ("disagreement", "answers that differ from what the full model would have answered")


def _overall_bound(doc: Mapping[str, Any]) -> Any:
    seg = (doc.get("guarantee") or {}).get("segments") or {}
    return (seg.get(ALL_SEGMENTS) or {}).get("upper_bound")


def plain_summary(ctx: ReportContext) -> Markup:
    """The plain-language paragraph at the top: what the policy does and risks, in numbers."""
    doc = ctx.document
    exp, g = doc.get("expected") or {}, doc.get("guarantee") or {}
    exits = doc.get("exits") or []
    rates = exp.get("exit_rate") or []
    cf = exp.get("compute_fraction")
    early = 1.0 - float(rates[-1]) if rates and finite(rates[-1]) else None
    version = f"version {ctx.version}" if ctx.version is not None else "this policy"
    parts: list[Markup] = []
    parts.append(Markup("This is {v} of the early-exit policy for <strong>{m}</strong>. ").format(
        v=version, m=ctx.model))
    if finite(early):
        parts.append(Markup("It lets the model answer at an earlier exit for <strong>{e}</strong> of requests "
                            "instead of running all {k} exits, ").format(e=fmt_pct(early), k=len(exits)))
    if finite(cf):
        parts.append(Markup("so on average a request uses <strong>{cf}</strong> of the full model's compute "
                            "(a saving of {s}). ").format(cf=fmt_pct(cf), s=fmt_pct(1.0 - cf)))
    noun, words = _risk_words(str(g.get("risk", "disagreement")))
    eps, delta = g.get("eps"), g.get("delta")
    bound = _overall_bound(doc)
    conf = fmt_pct(1.0 - delta, 0) if finite(delta) else MISSING
    parts.append(Markup("The risk it takes is {noun}: {words}. ").format(noun=noun, words=words))
    if finite(exp.get("risk")):
        parts.append(Markup("On {n} held-out requests this happened for {r} of them. ").format(
            n=fmt_int(g.get("n")), r=fmt_risk(exp.get("risk"))))
    if g.get("certified"):
        parts.append(Markup("With <strong>{c} confidence</strong>, the rate on new traffic like the evidence "
                            "is at most <strong>{b}</strong>, within the budget of <strong>{eps}</strong>. ").format(
            c=conf, b=fmt_risk(bound) if finite(bound) else fmt_risk(eps), eps=fmt_risk(eps)))
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
    vocab = vocabulary_view(doc)
    if vocab is not None:
        parts.append(Markup("Decisions are per token of a {size}-token vocabulary; the thresholds are per token "
                            "bucket ({n} buckets), not per token. ").format(size=vocab["size"], n=vocab["n_buckets"]))
    if fcls and vocab is not None:
        parts.append(Markup("Tokens whose early answer falls in bucket{s} {names} always go to full depth. ").format(
            s="" if len(fcls) == 1 else "s", names=", ".join(fcls)))
    elif fcls:
        parts.append(Markup("Requests whose early answer is {names} always go to full depth. ").format(
            names=", ".join(fcls)))
    if finite(doc.get("shadow_rate")) and doc["shadow_rate"] > 0:
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


# --------------------------------------------------------------------------- the template's variables


def _segment_counts(data: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Rows (key, value, count) from ``data.segment_counts`` (flat or nested by segment key)."""
    out: list[tuple[str, str, str]] = []
    for key, val in (data.get("segment_counts") or {}).items():
        if isinstance(val, Mapping):
            out.extend((str(key), str(v), fmt_int(n)) for v, n in val.items())
        else:
            out.append(("", str(key), fmt_int(val)))
    return out


def _ordered(mapping: Mapping[str, Any], first: Sequence[str]) -> list[str]:
    """Keys of ``mapping``: those named in ``first`` in that order, then the rest (``seed`` last)."""
    head = [k for k in first if k in mapping]
    rest = sorted(k for k in mapping if k not in first and k != "seed")
    return head + rest + (["seed"] if "seed" in mapping else [])


def _calibration_meta(cal: Mapping[str, Any]) -> str:
    """Where the calibration metrics were measured, in words (from the document's calibration block)."""
    bits = []
    if finite(cal.get("rows")):
        bits.append(f"{fmt_int(cal['rows'])} rows")
    if cal.get("split"):
        bits.append(f"of the {cal['split']} split")
    target = cal.get("target")
    if target:
        bits.append("against the labels" if target == "labels" else "against the final exit's answers")
    return ("Measured on " + " ".join(bits) + ".") if bits else ""


def _css_string(text: str) -> Markup:
    """``text`` made safe inside a double-quoted CSS string in a <style> element."""
    return Markup("".join(ch if ch.isalnum() or ch in " ._-·:/()" else "?" for ch in text))


def _hash_ok(doc: Mapping[str, Any]) -> bool | None:
    try:
        return verify_content_hash(doc) if doc.get("content_hash") else None
    except ValueError:
        return False


def _exit_rows(exits: Sequence[Mapping[str, Any]], rates: Sequence[Any]) -> list[dict[str, Any]]:
    last_cost = float(exits[-1]["cost"]) if exits and finite(exits[-1].get("cost")) else None
    rows = []
    for i, e in enumerate(exits):
        cal_name, cal_params = fmt_calibrator(e.get("calibrator"))
        rows.append({
            "index": i, "name": str(e.get("name", i)), "cost": fmt_cost(e.get("cost")),
            "cost_fraction": fmt_pct(float(e["cost"]) / last_cost) if last_cost and finite(e.get("cost")) else MISSING,
            "exit_rate": fmt_pct(rates[i]) if i < len(rates) else MISSING,
            "calibrator": cal_name, "params": cal_params,
        })
    return rows


def _calibration_rows(doc: Mapping[str, Any], exit_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    cal_by_name = {str(c.get("name")): c for c in (doc.get("calibration") or {}).get("exits") or []}
    rows = []
    for i, e in enumerate(doc.get("exits") or []):
        entry = cal_by_name.get(str(e.get("name")), {}) or {}
        before, after = entry.get("before") or {}, entry.get("after") or {}
        rows.append({
            **exit_rows[i],
            "metrics": [(m, fmt_num(before.get(m), 4), fmt_num(after.get(m), 4))
                        for m in ("accuracy", "ece", "nll", "brier", "ece_mass", "mce")],
            "acc": (fmt_pct(before.get("accuracy")), fmt_pct(after.get("accuracy"))),
            "ece": (fmt_num(before.get("ece"), 4), fmt_num(after.get("ece"), 4)),
            "ece_better": finite(before.get("ece")) and finite(after.get("ece")) and after["ece"] <= before["ece"],
            "nll": (fmt_num(before.get("nll"), 4), fmt_num(after.get("nll"), 4)),
        })
    return rows


def _guarantee_rows(g: Mapping[str, Any]) -> list[dict[str, Any]]:
    segs = g.get("segments") or {}
    rows = []
    for name in [ALL_SEGMENTS, *sorted(k for k in segs if k != ALL_SEGMENTS)]:
        s = segs.get(name)
        if s is None:
            continue
        ub, eps = s.get("upper_bound"), s.get("eps", g.get("eps"))
        rows.append({
            "name": "all traffic" if name == ALL_SEGMENTS else name, "n": fmt_int(s.get("n")),
            "eps": fmt_risk(eps), "bound": fmt_risk(ub), "certified": bool(s.get("certified")),
            "margin": fmt_risk(eps - ub) if finite(eps) and finite(ub) else MISSING,
        })
    return rows


def _baseline_rows(exp: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"name": baseline_label(name), "compute": fmt_pct(b.get("compute_fraction")),
             "risk": fmt_risk(b.get("risk")),
             "certified": fmt_value(b.get("certified")) if "certified" in b else MISSING,
             "note": str(b.get("note") or "")}
            for name, b in (exp.get("baselines") or {}).items() if isinstance(b, Mapping)]


def build_view(ctx: ReportContext) -> dict[str, Any]:
    """The template's variables for ``ctx`` (numbers formatted, figures as data URIs)."""
    doc = ctx.document
    exits = list(doc.get("exits") or [])
    exp, g, data = doc.get("expected") or {}, doc.get("guarantee") or {}, doc.get("data") or {}
    exit_rows = _exit_rows(exits, exp.get("exit_rate") or [])
    unc = list(g.get("uncertified_segments") or [])
    cost_segments = [{"name": k, "compute": fmt_pct(v.get("compute_fraction")), "risk": fmt_risk(v.get("risk")),
                      "n": fmt_int(v.get("n")), "fallback": k in unc}
                     for k, v in sorted((exp.get("segments") or {}).items()) if isinstance(v, Mapping)]
    batches = exp.get("batch_compute_fraction") or {}
    batch_rows = [(str(b), fmt_pct(v), fmt_pct(1.0 - v) if finite(v) else MISSING)
                  for b, v in sorted(batches.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)]
    split = g.get("split") or {}
    rows = data.get("rows") or {}
    cal = doc.get("calibration") or {}
    figs = report_figures(doc)
    vtext = str(ctx.version) if ctx.version is not None else "?"
    return {
        "ctx": ctx, "doc": doc, "model": ctx.model,
        "version": ctx.version if ctx.version is not None else (doc.get("model") or {}).get("version", MISSING),
        "title": f"Policy report — {ctx.model} v{vtext}",
        "page_header": _css_string(f"exitwise policy report · {ctx.model} v{vtext} · "
                                   f"{short_hash(doc.get('content_hash'))}"),
        "summary": plain_summary(ctx),
        "content_hash": str(doc.get("content_hash", MISSING)),
        "hash_ok": _hash_ok(doc),
        "exits": exit_rows, "cal_exits": _calibration_rows(doc, exit_rows),
        "reliability_images": [_data_uri(png, "image/png") for png in figs.reliability_pngs],
        "cal_meta": _calibration_meta(cal),
        "cal_reference": str(exits[-1].get("name", len(exits) - 1)) if exits and reference_is_final(cal) else None,
        "classes": [str(c) for c in doc.get("classes") or []],
        "thresholds": _threshold_tables(doc),
        "vocabulary": vocabulary_view(doc),
        "forced": doc.get("forced_full_depth") or {},
        "max_exit": doc.get("max_exit"),
        "max_exit_name": (str(exits[doc["max_exit"]].get("name")) if finite(doc.get("max_exit"))
                          and 0 <= doc["max_exit"] < len(exits) else None),
        "shadow_rate": fmt_pct(doc.get("shadow_rate"), 2),
        "score": doc.get("score", "max_prob"),
        "segment_keys": list(doc.get("segment_keys") or []),
        "g": g, "risk_words": _risk_words(str(g.get("risk", "disagreement"))),
        "eps": fmt_risk(g.get("eps")), "delta": fmt_num(g.get("delta"), 3),
        "confidence": fmt_pct(1.0 - g["delta"], 0) if finite(g.get("delta")) else MISSING,
        "overall_bound": fmt_risk(_overall_bound(doc)),
        "seg_rows": _guarantee_rows(g), "uncertified": unc,
        "split": [(k, fmt_int(split[k]) if k != "seed" else str(split[k])) for k in _ordered(split, _SPLIT_ORDER)],
        "exp": exp, "compute": fmt_pct(exp.get("compute_fraction")),
        "saving": fmt_pct(1.0 - exp["compute_fraction"]) if finite(exp.get("compute_fraction")) else MISSING,
        "held_out_risk": fmt_risk(exp.get("risk")),
        "evaluated_on": str(exp.get("evaluated_on") or ""),
        "accuracy": fmt_pct(exp.get("accuracy")), "full_depth_accuracy": fmt_pct(exp.get("full_depth_accuracy")),
        "disagreement": fmt_risk(exp.get("disagreement")), "induced_error": fmt_risk(exp.get("induced_error")),
        "cost_segments": cost_segments, "batch_rows": batch_rows, "baselines": _baseline_rows(exp),
        "curve_figure": _data_uri(figs.curve_svg, "image/svg+xml") if figs.curve_svg is not None else None,
        "exit_rate_figure": _data_uri(figs.exit_rate_svg, "image/svg+xml") if figs.exit_rate_svg is not None else None,
        "data": data, "fingerprint": str(data.get("fingerprint", MISSING)),
        "data_rows": [(k, fmt_int(rows[k]) if finite(rows[k]) else fmt_value(rows[k]))
                      for k in _ordered(rows, ("total", "labelled", "skipped")) if not (k in split and k != "seed")]
        if isinstance(rows, Mapping) else [("total", fmt_int(rows))],
        "time_window": [fmt_time(t) for t in data.get("time_window") or []],
        "segment_counts": _segment_counts(data),
        "data_extra": [(k, fmt_value(v)) for k, v in data.items()
                       if k not in {"fingerprint", "rows", "time_window", "segment_counts"}],
        "solver": [(k, fmt_value(v)) for k, v in (doc.get("solver") or {}).items() if k != "selection"],
        "selection": _selection_view((doc.get("solver") or {}).get("selection")),
        "parent": ctx.parent_version if ctx.parent_version is not None else doc.get("parent"),
        "diff": diff_view(ctx.diff, ctx.parent_version) if ctx.diff is not None else None,
        "approvals": [{"principal": a.principal, "at": fmt_time(a.at), "comment": a.comment or "",
                       "certificate": LABELS.get(a.certificate or "", "not recorded (approved before re-verification "
                                                                        "existed)"),
                       "certificate_detail": a.certificate_detail or ""}
                      for a in ctx.approvals],
        "environments": [{"name": e.environment, "state": e.state, "killed": e.killed, "since": fmt_time(e.since),
                          "active_version": e.active_version} for e in ctx.environments],
        "events": [{"at": fmt_time(e.at), "actor": e.actor, "action": e.action,
                    "label": ACTION_LABELS.get(e.action, e.action), "reason": e.reason or "",
                    "environment": e.environment or "", "before": short_hash(e.before_hash),
                    "after": short_hash(e.after_hash), "seq": e.seq, "hash": short_hash(e.event_hash)}
                   for e in ctx.audit_events],
        "chain": ctx.chain, "chain_at": fmt_time(ctx.chain.verified_at) if ctx.chain else MISSING,
        "created_at": fmt_time(ctx.created_at), "generated_at": fmt_time(ctx.generated_at),
        "author": ctx.author or MISSING, "state": ctx.state or MISSING,
        "mlflow_run_id": ctx.mlflow_run_id, "extra": list(ctx.extra.items()),
        "monitoring": [_monitoring_view(m) for m in ctx.monitoring],
    }


def _monitoring_view(m: Monitoring) -> dict[str, Any]:
    """One environment's monitoring: the verdict, the last bound per segment and the figure."""
    last: dict[str, Mapping[str, Any]] = {}
    for p in m.points:
        last[str(p["segment"])] = p
    rows = [{"segment": name, "n": fmt_int(p["n"]), "risk": fmt_risk(p.get("risk")), "lower": fmt_risk(p["lower"]),
             "upper": fmt_risk(p["upper"]), "eps": fmt_risk(p["eps"]),
             "breach": finite(p["lower"]) and finite(p["eps"]) and p["lower"] > p["eps"]}
            for name, p in last.items()]
    figure = monitor_svg(m.points)
    return {"environment": m.environment, "verdict": m.verdict or "not active there now", "rows": fmt_int(m.rows),
            "reasons": list(m.reasons), "recommendation": m.recommendation, "segments": rows,
            "figure": _data_uri(figure, "image/svg+xml") if figure is not None else None}

