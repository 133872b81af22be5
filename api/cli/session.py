"""The policy store as a command sees it: one unit of work, with the acting principal for writes.

- :func:`reading` — a read-only unit of work on the configured store.
- :func:`acting` — a unit of work with the principal of ``--token`` / ``EXITWISE_TOKEN``
  authenticated in it (no write without a principal), committed on success.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from exitwise.api.cli import hooks
from exitwise.api.cli.mirror import DetachedSync, sync_mode
from exitwise.policies import events
from exitwise.policies.anchor import install_anchor_hook
from exitwise.policies.db import open_store, unit_of_work
from exitwise.policies.errors import AuthError
from exitwise.policies.mlflow.worker import install_hook
from exitwise.policies.principals import Principal, authenticate
from exitwise.policies.report import install_approval_hook
from exitwise.policies.settings import get_settings


def safe_url(url: str) -> str:
    """A database URL with its password hidden (for output and logs)."""
    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def store_engine(*, check: bool = True) -> Iterator[Engine]:
    """The configured store's engine (schema checked unless ``check=False``), disposed afterwards."""
    engine = open_store(get_settings(), check=check)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def reading() -> Iterator[Session]:
    """A read-only unit of work on the configured store."""
    with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
        yield session


@contextmanager
def acting(token: str | None, action: str) -> Iterator[tuple[Session, Principal]]:
    """A unit of work with the principal of ``token`` authenticated in it (committed on success)."""
    with store_engine() as engine, unit_of_work(engine) as session:
        yield session, acting_principal(token, session=session, action=action)


def acting_principal(token: str | None, *, session: Session, action: str) -> Principal:
    """Authenticate the bearer token of a write command (no write without a principal)."""
    install_mirrors()
    if not token:
        raise AuthError(f"{action} changes the policy store: pass --token or set EXITWISE_TOKEN")
    return authenticate(token, session=session)


def install_mirrors() -> None:
    """The console script's after-commit mirrors, once per process: signed audit checkpoints (when
    ``EXITWISE_ANCHOR_KEY`` is set), MLflow sync and approval reports.

    The MLflow mirror runs in a detached child process (:mod:`exitwise.api.cli.mirror`): no write
    waits for MLflow. ``EXITWISE_MLFLOW_SYNC=wait`` mirrors inline instead, ``off`` not at all.
    """
    if not hooks.wanted():
        return
    checkpoint = install_anchor_hook()
    if checkpoint is not None:
        hooks.installed(lambda: events.remove(checkpoint))
    mode = sync_mode()
    if mode == "wait":
        sync = install_hook()
        hooks.installed(sync.close)
    elif mode == "on":
        detached = DetachedSync()
        events.on_commit(detached)
        hooks.installed(lambda: events.remove(detached))
    approval = install_approval_hook()
    hooks.installed(lambda: events.remove(approval))
