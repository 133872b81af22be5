"""The approval hook: the report of every approved version is written after the approval commits.

:func:`install_approval_hook` registers an :func:`exitwise.policies.events.on_commit` callback;
the CLI installs it for write commands and the API at start-up (rendering in a thread). The
reports land in ``<data dir>/reports/<model>/v<n>.<fmt>`` (:func:`report_path`). A failure,
a missing ``[reports]`` extra included, is logged and never undoes the approval:
``exitwise report`` can always redo it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exitwise.calibration.exceptions import MissingDependency
from exitwise.policies import events
from exitwise.policies.db import open_store, unit_of_work
from exitwise.policies.report.context import build_context
from exitwise.policies.report.formats import check_format
from exitwise.policies.report.service import atomic_write, renderer
from exitwise.policies.settings import get_settings

_log = logging.getLogger(__name__)


def report_path(data_dir: str | os.PathLike[str], model: str, version: int, format: str = "html") -> Path:
    """Where the approval hook keeps a version's report: ``<data dir>/reports/<model>/v<n>.<fmt>``."""
    return Path(data_dir) / "reports" / model / f"v{int(version)}.{check_format(format)}"


def on_version_approved(session: Session, model: str, version: int, *,
                        data_dir: str | os.PathLike[str] | None = None,
                        formats: Iterable[str] = ("html",)) -> list[Path]:
    """Render a version's report into ``<data dir>/reports/<model>/v<n>.<fmt>``; returns the files."""
    fmts = [check_format(f) for f in formats]
    render_module = renderer()
    target = Path(data_dir) if data_dir is not None else get_settings().data_dir
    html = render_module.render_html(build_context(session, model, version))
    return [atomic_write(report_path(target, model, version, fmt),
                         html.encode("utf-8") if fmt == "html" else render_module.render_pdf(html))
            for fmt in fmts]


def install_approval_hook(engine: Engine | None = None, *, data_dir: str | os.PathLike[str] | None = None,
                          formats: Sequence[str] = ("html",), background: bool = False) -> Callable[[Any], None]:
    """Write the report of every approved version to ``reports/<model>/v<n>.<fmt>`` after the commit.

    Registers a ``exitwise.policies.events.on_commit`` callback (returned, for ``events.remove``) that
    reacts to ``version.approve`` events: it reads the committed version in its own read-only
    unit of work on ``engine`` (None: the configured store, opened per event — the CLI) and
    writes the report under ``data_dir`` (default: the settings' data dir). ``background=True``
    (the API) renders in a daemon thread so the approving request does not wait for it. A
    failure is logged and never undoes the approval; ``exitwise report`` can always redo it.
    """
    target = Path(data_dir) if data_dir is not None else None

    def _write(model: str, number: int) -> None:
        eng = engine if engine is not None else open_store()
        try:
            with unit_of_work(eng, readonly=True) as session:
                on_version_approved(session, model, number, data_dir=target, formats=formats)
        except MissingDependency as exc:  # the [reports] extra is not installed: one line, not a traceback
            _log.warning("audit report of %s v%s not written: %s", model, number, exc)
        finally:
            if engine is None:
                eng.dispose()

    def _background(model: str, number: int) -> None:
        try:
            _write(model, number)
        except Exception:  # logged, like the synchronous hook's failures (by exitwise.policies.events)
            _log.exception("audit report of %s v%s not written", model, number)

    def _hook(event: Any) -> None:
        if event.action != "version.approve" or not event.model or event.version is None:
            return
        if background:
            threading.Thread(target=_background, args=(event.model, event.version), daemon=True,
                             name=f"exitwise-report-{event.model}-v{event.version}").start()
        else:
            _write(event.model, event.version)

    events.on_commit(_hook)
    return _hook
