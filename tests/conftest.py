"""Root fixtures: policy-store databases on SQLite and PostgreSQL, principals, policy documents.

Databases (every schema is created by the Alembic migrations, never by ``create_all``):

- ``backend`` (session, parametrised ``sqlite`` | ``postgresql``): tests that use any fixture
  below run once per backend. PostgreSQL is ``EXITWISE_TEST_POSTGRES_URL`` or
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``; every test session creates its own
  uniquely named databases (``exitwise_t_<hex>_*``) and drops them at the end. Unreachable
  PostgreSQL skips with the reason, except under ``CI=true`` where it fails.
- ``engine`` (session): one migrated database for the whole session.
- ``session`` (function): a ``Session`` joined into an outer transaction on ``engine`` that is
  rolled back at teardown (SQLAlchemy's "join a Session into an external transaction",
  ``join_transaction_mode="create_savepoint"``) — for service-level tests; the services'
  own savepoints and ``session.commit()`` work inside it, nothing survives the test.
- ``fresh_url`` / ``fresh_engine`` (function): a brand-new migrated database for one test with
  real commits (a copy of a migrated template: ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL,
  a file copy on SQLite) — for concurrency, fault, tamper, CLI and API tests.
- ``empty_url`` (function): a new database without any schema (migration tests).
- ``databases`` (session): the factory behind these; ``databases.new(template=databases.snapshot(url))``
  copies a prepared database (prepare once per module, copy per test).
- ``store_env`` (function): ``EXITWISE_DATA_DIR`` = tmp dir and ``EXITWISE_DATABASE_URL`` =
  ``fresh_url`` in the environment (CLI and app-factory tests); returns the URL.

Principals and documents:

- ``actors`` (function): an ``Actors`` namespace created in ``session``: ``admin``, ``author``,
  ``approver``, ``approver2``, ``reader`` (``exitwise.policies.principals.Principal``) and ``tokens``
  (name -> plaintext bearer token). ``make_actors(session)`` does the same for any session
  (e.g. inside ``unit_of_work(fresh_engine)``).
- ``policy_doc``: a valid policy document (3 exits, 4 classes, one segment key) with its
  ``content_hash``; ``make_doc(model="fashion-cnn", variant=0, parent=None, **top_level)``
  builds distinct valid documents (``variant`` shifts the thresholds, so the hash differs).
- ``table_dump(engine)``: every row of every store table, to compare before/after.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from exitwise.api import cli as cli_pkg
from exitwise.api.cli import hooks, main
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import StoreSession, make_engine, unit_of_work, upgrade
from exitwise.policies.models import Base
from exitwise.policies.principals import Principal, add_principal

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RUN_ID = uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- PostgreSQL server

def pg_admin_url() -> str:
    """URL of the maintenance database on the test server (databases are created through it)."""
    from exitwise.policies.settings import normalise_url

    return normalise_url(os.environ.get("EXITWISE_TEST_POSTGRES_URL", PG_DEFAULT))


_pg_status: dict[str, str | None] = {}


def require_postgres() -> str:
    """The admin URL, or skip (fail under CI=true) when the server is unreachable."""
    url = pg_admin_url()
    if "error" not in _pg_status:
        try:
            eng = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
            with eng.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            eng.dispose()
            _pg_status["error"] = None
        except Exception as exc:
            _pg_status["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    error = _pg_status["error"]
    if error is not None:
        reason = f"PostgreSQL unreachable at {make_url(url).render_as_string(hide_password=True)}: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: PostgreSQL is required)", pytrace=False)
        pytest.skip(reason)
    return url


def _pg_execute(sql: str) -> None:
    eng = create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql(sql)
    finally:
        eng.dispose()


def _pg_db_url(name: str) -> str:
    return make_url(pg_admin_url()).set(database=name).render_as_string(hide_password=False)


# ---------------------------------------------------------------- databases

class DatabaseFactory:
    """Creates migrated databases of one backend by copying a migrated template."""

    def __init__(self, backend: str, tmp: Path):
        self.backend, self.tmp, self.count = backend, tmp, 0
        self.created: list[str] = []
        if backend == "postgresql":
            self.template = f"exitwise_t_{RUN_ID}_tpl"
            _pg_execute(f"DROP DATABASE IF EXISTS {self.template}")
            _pg_execute(f"CREATE DATABASE {self.template}")
            self.created.append(self.template)
            self.template_url = _pg_db_url(self.template)
        else:
            self.template_url = f"sqlite:///{tmp / 'template.db'}"
        eng = make_engine(self.template_url)
        try:
            upgrade(eng)
        finally:
            eng.dispose()  # SQLite: closing the last connection checkpoints the WAL into the file
        if backend == "sqlite" and Path(str(tmp / "template.db-wal")).exists():
            raise RuntimeError("SQLite template still has a WAL file after dispose; cannot copy it safely")

    def new(self, *, migrated: bool = True, template: str | None = None) -> str:
        """URL of a new database: a copy of ``template`` (see :meth:`snapshot`), migrated to head, or empty."""
        self.count += 1
        if self.backend == "postgresql":
            name = f"exitwise_t_{RUN_ID}_{self.count}"
            source = template or (self.template if migrated else None)
            _pg_execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {source} STRATEGY = FILE_COPY" if source else ""))
            self.created.append(name)
            return _pg_db_url(name)
        path = self.tmp / f"db{self.count}.db"
        if migrated or template:
            shutil.copyfile(template or self.tmp / "template.db", path)
        return f"sqlite:///{path}"

    def snapshot(self, url: str) -> str:
        """Freeze the database at ``url`` (no open connections!) as a template for :meth:`new`."""
        if self.backend == "postgresql":
            self.count += 1
            name = f"exitwise_t_{RUN_ID}_{self.count}_tpl"
            _pg_execute(f"CREATE DATABASE {name} TEMPLATE {make_url(url).database} STRATEGY = FILE_COPY")
            self.created.append(name)
            return name
        return str(make_url(url).database)

    def drop(self, url: str) -> None:
        if self.backend == "postgresql":
            name = make_url(url).database
            _pg_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            if name in self.created:
                self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            _pg_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.created.clear()


@pytest.fixture(autouse=True)
def _no_leftover_store_mirrors() -> Iterator[None]:
    """A test that runs the console script's write commands in-process installs its after-commit
    mirrors (MLflow sync, approval reports); remove them so no later test's commits reach them."""
    yield
    hooks.uninstall()


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql`` (skips/fails as documented when PostgreSQL is down)."""
    if request.param == "postgresql":
        require_postgres()
    return request.param


@pytest.fixture(scope="session")
def databases(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(backend, tmp_path_factory.mktemp(f"db-{backend}"))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def engine(databases: DatabaseFactory) -> Iterator[Engine]:
    """One migrated database for the test session (use with ``session``)."""
    url = databases.new()
    eng = make_engine(url)
    yield eng
    eng.dispose()
    databases.drop(url)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session whose work is rolled back after the test (external-transaction recipe)."""
    conn = engine.connect()
    outer = conn.begin()
    sess = StoreSession(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield sess
    finally:
        sess.close()
        if outer.is_active:
            outer.rollback()
        conn.close()


@pytest.fixture
def fresh_url(databases: DatabaseFactory) -> Iterator[str]:
    """URL of a new migrated database for this test only (dropped afterwards)."""
    url = databases.new()
    yield url
    databases.drop(url)


@pytest.fixture
def empty_url(databases: DatabaseFactory) -> Iterator[str]:
    """URL of a new database with no schema at all (migration tests)."""
    url = databases.new(migrated=False)
    yield url
    databases.drop(url)


@pytest.fixture
def fresh_engine(fresh_url: str) -> Iterator[Engine]:
    """An engine on ``fresh_url``: real commits, nothing shared with other tests."""
    eng = make_engine(fresh_url)
    yield eng
    eng.dispose()


@pytest.fixture
def store_env(fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point EXITWISE_DATABASE_URL at ``fresh_url`` and EXITWISE_DATA_DIR at a tmp dir."""
    monkeypatch.setenv("EXITWISE_DATA_DIR", str(tmp_path / "exitwise-data"))
    monkeypatch.setenv("EXITWISE_DATABASE_URL", fresh_url)
    monkeypatch.delenv("EXITWISE_TOKEN", raising=False)
    monkeypatch.delenv("EXITWISE_REQUIRE_STAGING_BEFORE_PRODUCTION", raising=False)
    return fresh_url


# ---------------------------------------------------------------- principals

@dataclass(frozen=True)
class Actors:
    """Principals of every role; ``tokens[name]`` is the plaintext bearer token."""

    admin: Principal
    author: Principal
    approver: Principal
    approver2: Principal
    reader: Principal
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, who: Principal) -> str:
        return self.tokens[who.name]


def _make_actors(session: Session) -> Actors:
    created = {}
    boot = add_principal("admin", "admin", actor=None, session=session)
    created["admin"] = boot
    for name, role in (("alice", "author"), ("bob", "approver"), ("carol", "approver"), ("rita", "reader")):
        created[name] = add_principal(name, role, actor=boot.principal, session=session)
    return Actors(admin=boot.principal, author=created["alice"].principal, approver=created["bob"].principal,
                  approver2=created["carol"].principal, reader=created["rita"].principal,
                  tokens={n: c.token for n, c in created.items()})


@pytest.fixture(scope="session")
def make_actors() -> Callable[[Session], Actors]:
    """``make_actors(session) -> Actors`` (the bootstrap admin is ``admin``; needs an empty store)."""
    return _make_actors


@pytest.fixture
def actors(session: Session) -> Actors:
    """Principals admin/alice(author)/bob(approver)/carol(approver)/rita(reader) in ``session``."""
    return _make_actors(session)


@pytest.fixture
def committed_actors(fresh_engine: Engine) -> Actors:
    """Same principals, committed in ``fresh_engine``."""
    with unit_of_work(fresh_engine) as s:
        return _make_actors(s)


# ---------------------------------------------------------------- documents

def _doc(model: str = "fashion-cnn", variant: int = 0, parent: int | None = None, **top: Any) -> dict[str, Any]:
    shift = round(0.001 * variant, 6)
    classes = ["T-shirt", "Trouser", "Pullover", "Dress"]

    def rows(base: float) -> list[list[float | None] | None]:
        return [[round(base + shift + 0.01 * c, 6) for c in range(4)],
                [round(base - 0.05 + shift, 6), None, round(base - 0.04 + shift, 6), round(base - 0.03 + shift, 6)]]

    doc: dict[str, Any] = {
        "schema": "exitwise.policy/v1",
        "model": {"name": model, "version": "1"},
        "exits": [{"name": "stage1", "cost": 1.9e6, "calibrator": {"type": "temperature", "temperature": 1.31}},
                  {"name": "stage2", "cost": 5.2e6,
                   "calibrator": {"type": "platt", "coef": [2.1, 0.4, -0.2], "intercept": -0.7}},
                  {"name": "final", "cost": 9.0e6, "calibrator": {"type": "identity"}}],
        "classes": classes,
        "score": "max_prob",
        "segment_keys": ["capture"],
        "thresholds": {"default": rows(0.9), "studio": rows(0.85), "phone": None},
        "forced_full_depth": {"classes": ["Dress"], "segments": ["phone"]},
        "max_exit": None,
        "shadow_rate": 0.01,
        "guarantee": {"risk": "disagreement", "eps": 0.02, "delta": 0.05,
                      "method": "learn-then-test (fixed-sequence, exact binomial)", "n": 4000, "certified": True,
                      "segments": {"__all__": {"eps": 0.02, "n": 4000, "upper_bound": 0.0183, "certified": True},
                                   "studio": {"eps": 0.02, "n": 2500, "upper_bound": 0.0191, "certified": True}},
                      "uncertified_segments": ["phone"],
                      "split": {"choose": 8000, "certify": 4000, "seed": 0}},
        "expected": {"compute_fraction": round(0.61 + shift, 6), "exit_rate": [0.55, 0.2, 0.25], "risk": 0.012,
                     "disagreement": 0.012, "induced_error": None,
                     "segments": {"studio": {"compute_fraction": 0.58, "risk": 0.011, "n": 2500}}},
        "calibration": {"exits": []},
        "data": {"fingerprint": "sha256:" + "ab" * 32, "rows": {"total": 12000}, "time_window": None,
                 "segment_counts": {"studio": 7500, "phone": 4500}, "source": "fixture"},
        "solver": {"seed": 0},
        "parent": parent,
    }
    doc.update(top)
    return with_content_hash(doc)


@pytest.fixture(scope="session")
def make_doc() -> Callable[..., dict[str, Any]]:
    """``make_doc(model="fashion-cnn", variant=0, parent=None, **top_level_overrides)``."""
    return _doc


@pytest.fixture
def policy_doc() -> dict[str, Any]:
    """A valid policy document for model ``fashion-cnn`` (passes ``exitwise.policies.schema.validate_document``)."""
    return _doc()


# ---------------------------------------------------------------- inspection

def _dump(bind: Engine | Session) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table in Base.metadata.sorted_tables:
        stmt = select(table).order_by(*table.primary_key.columns)
        rows = bind.execute(stmt).all() if isinstance(bind, Session) else None
        if rows is None:
            with bind.connect() as conn:
                rows = conn.execute(stmt).all()
        out[table.name] = [tuple(r) for r in rows]
    return out


@pytest.fixture(scope="session")
def table_dump() -> Callable[[Engine | Session], dict[str, list[tuple[Any, ...]]]]:
    """``table_dump(engine_or_session)`` -> {table: sorted rows} of every store table."""
    return _dump



# ---------------------------------------------------------------- the console script, in-process

@dataclass
class CliResult:
    """What one ``exitwise`` invocation did; unpacks as ``code, out, err``."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.code, self.out, self.err))

    def __getitem__(self, index: int) -> Any:
        return (self.code, self.out, self.err)[index]


@pytest.fixture(scope="module")
def built_app() -> Any:
    """The root command group, built once per module (its commands are loaded on first use)."""
    return cli_pkg.build_app()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, built_app: Any) -> Any:
    """``cli(*args) -> CliResult``: the real ``exitwise.api.cli.main`` (error mapping included), in-process.

    The MLflow mirror is off (it would start a detached child per test; its own tests are in
    tests/api/test_cli_guardrails.py and tests/policies/test_registry.py)."""
    monkeypatch.setenv("COLUMNS", "220")
    monkeypatch.setenv("EXITWISE_MLFLOW_SYNC", "off")
    monkeypatch.delenv("EXITWISE_DEBUG", raising=False)
    monkeypatch.setattr(cli_pkg, "build_app", lambda: built_app)

    def run(*args: Any) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        code = exc.value.code
        return CliResult(code if isinstance(code, int) else (0 if code is None else 1), out, err)

    return run
