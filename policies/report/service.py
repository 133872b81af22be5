"""The report's use cases: what the CLI, the REST API, MLflow and the approval hook call.

A stored version's report as bytes (:func:`report_bytes`), as an HTTP body and media type
(:func:`report_response`) or as a file (:func:`write_stored_report`, :func:`write_report`), and
the report of a policy document file that is not in the store (:func:`write_document_report`).
A server answers through :func:`serve_report`, which reads the facts in a thread and leaves the
rendering to a :class:`~exitwise.policies.report.pool.ReportRenderer` (cached, single-flight,
bounded, in a separate process).

Rendering needs the ``[reports]`` extra. This module imports without it (so the approval hook
installs and the CLI starts without it) and reaches the renderer through :func:`renderer`,
which raises :class:`~exitwise.calibration.exceptions.MissingDependency` naming the extra — before
any store work is done.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exitwise.calibration.atomic import atomic_write_bytes
from exitwise.calibration.exceptions import MissingDependency
from exitwise.calibration.optional import require
from exitwise.policies.db import unit_of_work
from exitwise.policies.document_files import read_json_object
from exitwise.policies.report.cache import report_key
from exitwise.policies.report.context import ReportContext, build_context, context_from_document
from exitwise.policies.report.formats import MEDIA_TYPES, check_format
from exitwise.policies.report.pool import Rendered, ReportRenderer


@dataclass(frozen=True)
class WrittenReport:
    """A report written to a file: where, in which format, how many bytes, of which version."""

    path: Path
    format: str
    size: int
    model: str
    version: int | None  # None: a document file, not a stored version
    content_hash: str | None


def renderer() -> ModuleType:
    """:mod:`exitwise.policies.report.render`, or MissingDependency naming the ``[reports]`` extra."""
    return require("exitwise.policies.report.render", "reports", "the audit report")


# what the renderer imports from the [reports] extra, per format
RENDER_DEPENDENCIES = {"html": ("jinja2", "matplotlib"), "pdf": ("jinja2", "matplotlib", "weasyprint")}


def check_renderer(format: str) -> None:
    """MissingDependency naming the ``[reports]`` extra if the renderer of ``format`` could not import.

    Looks the modules up without importing them: a server checks here and renders in a worker
    process, so its own process never loads matplotlib or WeasyPrint (about 1.5 s of import that
    would otherwise stall the event loop on the first report).
    """
    for module in RENDER_DEPENDENCIES[check_format(format)]:
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(f"the audit report needs {module!r}, part of the optional extra 'reports': "
                                    "pip install 'exitwise[reports]'")


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :mod:`exitwise.calibration.atomic`)."""
    return atomic_write_bytes(path, data)


def report_bytes(session: Session, model: str, version: int, format: str = "html") -> bytes:
    """The report of a stored version as bytes (for MLflow artifacts and the approval hook)."""
    fmt = check_format(format)
    render_module = renderer()
    return render_module.render(build_context(session, model, version), fmt)


def report_response(session: Session, model: str, version: int, format: str = "html") -> tuple[bytes, str]:
    """``(body, media_type)`` for ``GET /v1/models/{model}/versions/{n}/report?format=...``."""
    fmt = check_format(format)
    return report_bytes(session, model, version, fmt), MEDIA_TYPES[fmt]


def stored_facts(engine: Engine, model: str, version: int, format: str) -> tuple[ReportContext, str]:
    """The context of a stored version (one read-only unit of work) and its cache key for ``format``."""
    with unit_of_work(engine, readonly=True) as session:
        context = build_context(session, model, version)
    return context, report_key(context, format)


async def serve_report(engine: Engine, reports: ReportRenderer, model: str, version: int,
                       format: str = "html") -> Rendered:
    """The report of a stored version for a server: facts read in a thread, rendered by ``reports``.

    Raises MissingDependency (before any store work) without the ``[reports]`` extra, NotFound
    for an unknown version and :class:`~exitwise.policies.report.pool.RenderBusy` when the
    renderer is full. The read transaction has ended before the render starts.
    """
    fmt = check_format(format)
    check_renderer(fmt)
    context, key = await asyncio.to_thread(stored_facts, engine, model, version, fmt)
    return await reports.get(key, context, fmt)


def write_report(session: Session, model: str, version: int, format: str, out: str | os.PathLike[str]) -> Path:
    """Render the report of a stored version and write it atomically to ``out``."""
    return atomic_write(out, report_bytes(session, model, version, format))


def _written(path: Path, fmt: str, model: str, version: int | None, content_hash: object) -> WrittenReport:
    return WrittenReport(path=path, format=fmt, size=path.stat().st_size, model=model, version=version,
                         content_hash=None if content_hash is None else str(content_hash))


def write_stored_report(engine: Engine, model: str, version: int, format: str = "html",
                        out: str | os.PathLike[str] | None = None) -> WrittenReport:
    """Render a stored version's report and write it atomically to ``out`` (default ``MODEL-vN.FORMAT``).

    The facts are read in one read-only unit of work; rendering happens after it has ended.
    """
    fmt = check_format(format)
    render_module = renderer()
    with unit_of_work(engine, readonly=True) as session:
        ctx = build_context(session, model, version)
    path = atomic_write(out if out is not None else Path(f"{model}-v{version}.{fmt}"), render_module.render(ctx, fmt))
    return _written(path, fmt, model, version, ctx.document.get("content_hash"))


def write_document_report(document: str | os.PathLike[str], *, parent: str | os.PathLike[str] | None = None,
                          format: str = "html", out: str | os.PathLike[str] | None = None) -> WrittenReport:
    """Render the report of a policy document file (validated first; diffed against ``parent`` when given).

    Written atomically to ``out`` (default ``MODEL-report.FORMAT``); no governance facts, the state
    reads "unregistered".
    """
    fmt = check_format(format)
    render_module = renderer()
    doc = read_json_object(document, "policy document")
    parent_doc = read_json_object(parent, "parent policy document") if parent is not None else None
    ctx = context_from_document(doc, parent_document=parent_doc)
    name = str(doc.get("model", {}).get("name", Path(document).stem))
    path = atomic_write(out if out is not None else Path(f"{name}-report.{fmt}"), render_module.render(ctx, fmt))
    return _written(path, fmt, name, None, doc.get("content_hash"))
