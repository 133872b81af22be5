"""How the report writes numbers, times and hashes: every value a reviewer reads goes through here.

Each formatter takes whatever the document holds (possibly missing or not a number) and
returns text; a missing value is an em dash, never ``None`` or ``nan``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any

MISSING = "—"


def finite(x: Any) -> bool:
    """True for a finite int or float (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt_pct(x: Any, digits: int = 1) -> str:
    """``0.4123 -> '41.2%'``; an em dash when the value is missing."""
    return f"{100.0 * x:.{digits}f}%" if finite(x) else MISSING


def fmt_risk(x: Any) -> str:
    """Risks, budgets and bounds as a percentage with two decimals (``0.00873 -> '0.87%'``)."""
    return fmt_pct(x, 2)


def fmt_num(x: Any, digits: int = 3) -> str:
    """A plain number with ``digits`` decimals."""
    return f"{x:.{digits}f}" if finite(x) else MISSING


def fmt_int(x: Any) -> str:
    """A count with thousands separators."""
    return f"{int(x):,}" if finite(x) else MISSING


def fmt_cost(x: Any) -> str:
    """Costs in any unit with an SI prefix: ``1.9e6 -> '1.90 M'``."""
    if not finite(x):
        return MISSING
    for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def fmt_time(t: Any) -> str:
    """A datetime or ISO string as ``YYYY-MM-DD HH:MM UTC``."""
    if t is None or t == "":
        return MISSING
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
    """The first ``n`` hex digits of a hash (``sha256:`` prefix dropped)."""
    if not h:
        return MISSING
    s = str(h)
    return s.split(":", 1)[1][:n] if s.startswith("sha256:") else s[:n]


def fmt_value(v: Any) -> str:
    """Any JSON value in words: yes/no, 4 significant digits, lists and objects joined."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list | tuple):
        return ", ".join(fmt_value(x) for x in v) or MISSING
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) or MISSING
    return str(v)


def fmt_exact(v: Any) -> str:
    """A value exactly as stored (floats in full, lists and objects as JSON): for changes that rounding would hide."""
    if v is None:
        return MISSING
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v, sort_keys=True, ensure_ascii=False, default=str) if isinstance(v, list | tuple | Mapping) \
        else str(v)


def fmt_delta(d: float) -> str:
    """A signed change of a threshold: three decimals, or scientific when that would read as zero."""
    return f"{d:+.3f}" if d == 0 or abs(d) >= 0.0005 else f"{d:+.1e}"


def fmt_calibrator(cal: Mapping[str, Any] | None) -> tuple[str, str]:
    """(kind, parameters) of an exit's calibrator in words: ``("temperature", "T = 1.310")``."""
    cal = cal or {"type": "identity"}
    kind = str(cal.get("type", "identity"))
    if kind == "temperature":
        return "temperature", f"T = {fmt_num(cal.get('temperature'))}"
    if kind == "platt":
        coef = ", ".join(fmt_num(c) for c in cal.get("coef") or [])
        return "Platt", f"w = [{coef}], b = {fmt_num(cal.get('intercept'))}"
    if kind == "identity":
        return "identity", MISSING
    params = {k: v for k, v in cal.items() if k != "type"}
    return kind, fmt_value(params)
