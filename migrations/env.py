"""Alembic environment: uses the connection handed in by ``exitwise.policies.db`` or builds one.

``exitwise.policies.db.upgrade`` passes ``config.attributes["connection"]`` (so SQLite pragmas and
the caller's transaction apply). Run by hand, the URL comes from ``-x url=...``,
``sqlalchemy.url`` or the store settings (``EXITWISE_DATABASE_URL`` / ``EXITWISE_DATA_DIR``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from exitwise.policies.db import make_engine
from exitwise.policies.models import Base  # every table is declared there (autogenerate sees them all)
from exitwise.policies.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    return get_settings().resolved_database_url()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
