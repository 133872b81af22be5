"""Audit report of one policy version (issue 7): self-contained HTML and PDF from one template.

A reviewer reads it without knowing the code: what the policy does and risks (in numbers,
at the top), who wrote and approved it, what evidence it stands on, how the exits were
calibrated, the thresholds, the guarantee, the compute it saves, and what changed against
the version it replaces, with the version's audit events as a timeline.

The package, from pure to effectful:

- :mod:`~exitwise.policies.report.context`: :class:`ReportContext`, every fact the report shows
  (the document, governance facts, audit events, the diff against the parent from
  :mod:`exitwise.policies.diff`, the audit-chain check), and :func:`build_context`, which
  collects them from the store's services;
- :mod:`~exitwise.policies.report.formatting`: how numbers, times and hashes are written;
- :mod:`~exitwise.policies.report.view`: everything the template reads (plain-language summary,
  threshold tables, figures from :mod:`exitwise.policies.figures` as data URIs), with
  :mod:`~exitwise.policies.report.changes` for the diff's rows;
- :mod:`~exitwise.policies.report.render`: Jinja renders the HTML (:func:`~.render.render_html`, a
  pure function of the context), WeasyPrint prints it to PDF (:func:`~.render.render_pdf`);
- :mod:`~exitwise.policies.report.formats`: the output formats and their media types;
- :mod:`~exitwise.policies.report.service`: the use cases the CLI, the REST API and MLflow call;
- :mod:`~exitwise.policies.report.cache`: the cache key (what the report shows), a byte-bounded
  memory LRU and digest-checked files under the data directory;
- :mod:`~exitwise.policies.report.pool`: the server's renderer: cached, single-flight, bounded,
  in a separate process (503 with ``Retry-After`` when full);
- :mod:`~exitwise.policies.report.hook`: the approval hook that writes each approved version's report.

Importing this package does not need the ``[reports]`` extra; rendering does, and without it
raises :class:`~exitwise.calibration.exceptions.MissingDependency` naming the pip command.
"""

from exitwise.policies.report.context import (
    Approval,
    AuditEvent,
    ChainVerification,
    EnvironmentStatus,
    ReportContext,
    build_context,
    context_from_document,
    make_context,
)
from exitwise.policies.report.formats import FORMATS, MEDIA_TYPES
from exitwise.policies.report.hook import install_approval_hook, on_version_approved, report_path
from exitwise.policies.report.service import (
    WrittenReport,
    atomic_write,
    report_bytes,
    report_response,
    write_document_report,
    write_report,
    write_stored_report,
)

__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "Approval",
    "AuditEvent",
    "ChainVerification",
    "EnvironmentStatus",
    "ReportContext",
    "WrittenReport",
    "atomic_write",
    "build_context",
    "context_from_document",
    "install_approval_hook",
    "make_context",
    "on_version_approved",
    "report_bytes",
    "report_path",
    "report_response",
    "write_document_report",
    "write_report",
    "write_stored_report",
]
