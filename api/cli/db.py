"""``exitwise db``: migrate and inspect the policy database; shared helpers of the store commands.

The helpers (``store_engine``, ``acting_principal``, ``emit_json``, ``jsonable``) are used by
``exitwise.api.cli.principal``, ``exitwise.api.cli.policy`` and ``exitwise.api.cli.audit``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import typer
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from exitwise.api.cli import stdout_console
from exitwise.policies.errors import AuthError

console = stdout_console(highlight=False)

TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="EXITWISE_TOKEN", show_envvar=True, show_default=False,
    help="Bearer token of the acting principal (or set EXITWISE_TOKEN).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def jsonable(obj: Any) -> Any:
    """Domain objects (frozen dataclasses) as plain JSON values; datetimes in ISO 8601."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "content"}
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(jsonable(obj), sort_keys=True, ensure_ascii=False))


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def store_engine(*, check: bool = True) -> Iterator[Engine]:
    """The configured store's engine (schema checked), disposed afterwards."""
    from exitwise.policies.db import open_store
    from exitwise.policies.settings import get_settings

    engine = open_store(get_settings(), check=check)
    try:
        yield engine
    finally:
        engine.dispose()


def acting_principal(token: str | None, *, session: Session, action: str):  # -> policies.principals.Principal
    """Authenticate the bearer token of a write command (no write without a principal)."""
    from exitwise.api.cli import install_store_hooks
    from exitwise.policies.principals import authenticate

    install_store_hooks()
    if not token:
        raise AuthError(f"{action} changes the policy store: pass --token or set EXITWISE_TOKEN")
    return authenticate(token, session=session)


def register(app: typer.Typer) -> None:
    db = typer.Typer(help="Create and migrate the policy database.", no_args_is_help=True)
    app.add_typer(db, name="db")

    @db.command("upgrade")
    def upgrade_cmd(
        revision: Annotated[str, typer.Option("--revision", help="Target revision.")] = "head",
        as_json: JsonOption = False,
    ) -> None:
        """Migrate the database (EXITWISE_DATABASE_URL, default SQLite in EXITWISE_DATA_DIR) to head."""
        from exitwise.policies.db import current_revision, head_revision, upgrade

        with store_engine(check=False) as engine:
            before = current_revision(engine)
            upgrade(engine, revision)
            after = current_revision(engine)
            url = safe_url(str(engine.url))
        info = {"url": url, "from": before, "to": after, "head": head_revision()}
        if as_json:
            emit_json(info)
        elif before == after:
            console.print(f"database {url} already at revision {after} (head)")
        else:
            console.print(f"database {url} upgraded from {before or 'empty'} to {after}")

    @db.command("current")
    def current_cmd(
        check: Annotated[bool, typer.Option("--check", help="Exit 1 unless the schema is at head.")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Show the database's schema revision and the head revision of this exitwise."""
        from exitwise.policies.db import check_schema, current_revision, head_revision

        with store_engine(check=False) as engine:
            current, head = current_revision(engine), head_revision()
            url = safe_url(str(engine.url))
            info = {"url": url, "current": current, "head": head, "up_to_date": current == head}
            if as_json:
                emit_json(info)
            else:
                state = "up to date" if current == head else "OUT OF DATE: run 'exitwise db upgrade'"
                console.print(f"{url}: revision {current or 'none'} (head {head}) — {state}")
            if check:
                check_schema(engine)
