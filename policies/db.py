"""Engines, migrations, the unit of work and the per-change lock.

- :func:`make_engine` — SQLite gets ``foreign_keys=ON``, WAL, ``busy_timeout`` and
  transactions that start with ``BEGIN IMMEDIATE`` (writers serialise at BEGIN, so a
  transaction never has to upgrade a read lock); PostgreSQL gets ``pool_pre_ping``.
- :func:`upgrade` / :func:`downgrade` — Alembic, configured in code (the console script
  finds ``migrations/`` as package data); :func:`check_schema` refuses a database whose
  revision is not head.
- :func:`unit_of_work` — one transaction: commit on success, rollback on error, database
  errors translated into ``exitwise.policies.errors``.
- :func:`change` — what every mutating service function runs in: a SAVEPOINT (so a refused
  change leaves nothing behind even inside a larger transaction) whose first statement bumps
  ``store_state.generation`` — the write lock that serialises changes and audit appends.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    NoResultFound,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Session, sessionmaker

from exitwise.calibration.exceptions import InputError
from exitwise.policies import events
from exitwise.policies.errors import Conflict, ImmutableContent, PolicyError, SchemaOutOfDate, StoreUnavailable
from exitwise.policies.models import StoreState
from exitwise.policies.settings import StoreSettings, get_settings, normalise_url

log = logging.getLogger(__name__)

READONLY = "exitwise_readonly"
IN_CHANGE = "exitwise.in_change"
SQLITE_BUSY_TIMEOUT_MS = 30_000


# ---------------------------------------------------------------- engines

def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the store's per-backend settings."""
    url = normalise_url(str(url))
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (pysqlite recipe)
        cur = dbapi_conn.cursor()
        for pragma in ("foreign_keys=ON", "journal_mode=WAL", f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
                       "synchronous=NORMAL"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READONLY) else "BEGIN IMMEDIATE")

    return engine


def open_store(settings: StoreSettings | None = None, *, check: bool = True) -> Engine:
    """The engine for the configured store; checks (and for a new SQLite file creates) the schema.

    An empty SQLite database is brought to head with the migrations; any other database
    must be migrated explicitly (``exitwise db upgrade``) and is refused when not at head.
    """
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url())
    if check:
        try:
            if engine.dialect.name == "sqlite" and _is_empty(engine):
                upgrade(engine)
            check_schema(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def _is_empty(engine: Engine) -> bool:
    with translate_errors(), engine.connect().execution_options(**{READONLY: True}) as conn:
        return not inspect(conn).get_table_names()


# ---------------------------------------------------------------- migrations

def migrations_dir() -> Path:
    """The directory of the Alembic scripts, found as package data of ``exitwise.migrations``.

    Looked up as a resource, not imported: the migrations depend on the models, never the
    other way round.
    """
    path = Path(str(resources.files("exitwise.migrations")))
    if not (path / "env.py").is_file():
        raise RuntimeError(f"the exitwise migrations (env.py) were not found in {path}")
    return path.resolve()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` built in code: ``script_location`` is the installed ``migrations`` package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


@functools.lru_cache(maxsize=1)
def _script_revisions() -> tuple[str, frozenset[str]]:
    """(head, every known revision) of the installed migrations (read once per process)."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head, frozenset(s.revision for s in script.walk_revisions())


def head_revision() -> str:
    return _script_revisions()[0]


def _engine(engine_or_url: Engine | str) -> tuple[Engine, bool]:
    if isinstance(engine_or_url, Engine):
        return engine_or_url, False
    return make_engine(engine_or_url), True


def _run(engine_or_url: Engine | str, fn: Any, revision: str, *, stamp: bool = False) -> None:
    engine, owned = _engine(engine_or_url)
    try:
        with translate_errors(), engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            fn(cfg, revision)
            if stamp and MigrationContext.configure(conn).get_current_revision() == head_revision():
                conn.execute(update(StoreState).where(StoreState.id == 1).values(store_id=str(uuid.uuid4())))
    finally:
        if owned:
            engine.dispose()


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (the only way the schema is created).

    At head it also stamps a new store identity (``store_state.store_id``): running
    ``exitwise db upgrade`` after a restore or a failover makes every replica drop its cache.
    """
    _run(engine_or_url, command.upgrade, revision, stamp=True)


def downgrade(engine_or_url: Engine | str, revision: str = "base") -> None:
    """Migrate the database down to ``revision`` (``base`` = empty)."""
    _run(engine_or_url, command.downgrade, revision)


def current_revision(engine: Engine) -> str | None:
    with translate_errors(), engine.connect().execution_options(**{READONLY: True}) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the migrations' head."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if current is not None and current not in _script_revisions()[1]:
        raise SchemaOutOfDate(
            f"database schema version {current!r} is unknown to this exitwise (head is {head!r}); "
            "it was migrated by a newer release — upgrade exitwise")
    raise SchemaOutOfDate(
        f"Detected out-of-date database schema (found version {current or 'none'}, but head is {head}). "
        "Take a backup of your database, then run 'exitwise db upgrade' to migrate it to the latest schema.")


# ---------------------------------------------------------------- errors and transactions

def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Translate SQLAlchemy errors into the domain's errors (``raise ... from exc``)."""
    try:
        yield
    except PolicyError:
        raise
    except DBAPIError as exc:
        msg = _first_line(exc)
        low = msg.lower()
        if "append-only" in low or "immutable" in low:
            raise ImmutableContent(f"refused by the database: {msg}") from exc
        if isinstance(exc, IntegrityError):
            if "uq_activations_active" in msg or "activations.model_id, activations.environment" in msg:
                raise Conflict("another version is already active for this model and environment "
                               f"(refused by the database: {msg})") from exc
            raise Conflict(f"refused by the database: {msg}") from exc
        if isinstance(exc, DataError):  # a value the database cannot hold: NUL in text, a number out of range
            raise InputError(f"a value cannot be stored: {msg}") from exc
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            raise StoreUnavailable(f"policy database unavailable: {msg}") from exc
        raise StoreUnavailable(f"policy database error: {msg}") from exc
    except StatementError as exc:
        if isinstance(exc.orig, OverflowError | ValueError):  # raised while binding a parameter (SQLite)
            raise InputError(f"a value cannot be stored: {exc.orig}") from exc
        raise StoreUnavailable(f"policy database error: {exc}") from exc
    except NoResultFound as exc:
        raise StoreUnavailable("store_state row missing: the database was not created by "
                               "'exitwise db upgrade'") from exc
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"policy database error: {exc}") from exc


class StoreSession(Session):
    """The store's own sessions: the only ones whose commits run the after-commit hooks."""


events.listen(StoreSession)


def new_session(engine: Engine) -> StoreSession:
    """A session on ``engine`` (objects stay readable after commit: domain objects are built from them)."""
    return sessionmaker(bind=engine, class_=StoreSession, expire_on_commit=False)()


@contextmanager
def unit_of_work(engine: Engine, *, readonly: bool = False) -> Iterator[Session]:
    """``with unit_of_work(engine) as session:`` — commit on success, rollback on any error.

    ``readonly=True`` starts a plain (deferred) transaction on SQLite instead of
    ``BEGIN IMMEDIATE``, for read paths that must not queue behind writers.
    """
    session = new_session(engine)
    try:
        with translate_errors():
            if readonly:
                session.connection(execution_options={READONLY: True})
            yield session
            session.commit()
    except BaseException:
        try:
            session.rollback()
        except Exception:  # the connection may be gone; nothing was committed anyway
            log.debug("rollback after a failed unit of work failed", exc_info=True)
        raise
    finally:
        session.close()


@contextmanager
def change(session: Session) -> Iterator[int]:
    """Run one state change atomically; yields the new generation.

    Opens a SAVEPOINT, bumps ``store_state.generation`` first (the lock), runs the body,
    flushes. On any error the savepoint is rolled back (so a refused change leaves the
    database exactly as it was) and its queued after-commit events are dropped.
    """
    pending = events.pending(session)
    mark = len(pending)
    session.info[IN_CHANGE] = session.info.get(IN_CHANGE, 0) + 1
    try:
        with translate_errors(), session.begin_nested():
            generation = session.execute(
                update(StoreState).where(StoreState.id == 1)
                .values(generation=StoreState.generation + 1).returning(StoreState.generation)
            ).scalar_one()
            yield generation
            session.flush()
    except BaseException:
        del pending[mark:]
        raise
    finally:
        session.info[IN_CHANGE] -= 1


def in_change(session: Session) -> bool:
    return session.info.get(IN_CHANGE, 0) > 0


class StoreStamp(NamedTuple):
    """What replicas compare to know whether their caches still describe the store.

    Any difference, in either direction, means "drop everything": the generation can go back
    (restore, failover to a replica that was behind) and the audit head and identity tell two
    stores with an equal counter apart.
    """

    store_id: str
    generation: int
    audit_hash: str


def current_stamp(session: Session) -> StoreStamp:
    """The store's :class:`StoreStamp`, in one primary-key read."""
    with translate_errors():
        row = session.execute(select(StoreState.store_id, StoreState.generation, StoreState.audit_hash)
                              .where(StoreState.id == 1)).one()
    return StoreStamp(row[0], row[1], row[2])


def current_generation(session: Session) -> int:
    """The number of committed changes; replicas drop their caches when it moves."""
    with translate_errors():
        return session.execute(select(StoreState.generation).where(StoreState.id == 1)).scalar_one()
