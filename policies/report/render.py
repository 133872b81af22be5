"""HTML and PDF of an audit report from one template: Jinja renders the HTML, WeasyPrint prints it.

:func:`render_html` is a pure function of the context: the template, its CSS and every figure
(inlined as data URIs by :mod:`~exitwise.policies.report.view`) end up in one self-contained
HTML string. :func:`render_pdf` lays that HTML out on A4 pages, so both formats show the same.
This module needs the ``[reports]`` extra (jinja2, matplotlib, weasyprint); code outside it
reaches it through :func:`exitwise.calibration.optional.require`.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import jinja2
from markupsafe import Markup

from exitwise.calibration.optional import require
from exitwise.policies.report.context import ReportContext
from exitwise.policies.report.formats import check_format
from exitwise.policies.report.formatting import fmt_int, fmt_num, fmt_pct, fmt_risk, fmt_time, short_hash
from exitwise.policies.report.view import build_view

_PACKAGE = "exitwise.policies.report"
TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(_PACKAGE, "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=fmt_pct, risk=fmt_risk, num=fmt_num, int=fmt_int, time=fmt_time, short=short_hash)
    return env


@lru_cache(maxsize=1)
def _css() -> str:
    return resources.files(_PACKAGE).joinpath("templates", STYLESHEET).read_text(encoding="utf-8")


def render_html(context: ReportContext) -> str:
    """The complete, self-contained HTML report (CSS and figures inlined) for ``context``."""
    return _environment().get_template(TEMPLATE).render(css=Markup(_css()), **build_view(context))


def render_pdf(html: str) -> bytes:
    """PDF bytes of a rendered report (WeasyPrint; the print CSS lays out A4 pages)."""
    # imported on first use: weasyprint takes ~400 ms to import, which HTML reports (the default) never need
    weasyprint = require("weasyprint", "reports", "PDF reports")
    return weasyprint.HTML(string=html, base_url=None).write_pdf()


def render(context: ReportContext, format: str = "html") -> bytes:
    """The report of ``context`` as bytes in ``format`` (``html`` UTF-8 or ``pdf``)."""
    fmt = check_format(format)
    html = render_html(context)
    return html.encode("utf-8") if fmt == "html" else render_pdf(html)
