"""``exitwise db``: migrate and inspect the policy database."""

from __future__ import annotations

from typing import Annotated

import typer

from exitwise.api.cli.output import JsonOption, console, emit_json
from exitwise.api.cli.session import safe_url, store_engine
from exitwise.policies.db import check_schema, current_revision, head_revision, upgrade


def register(app: typer.Typer) -> None:
    db = typer.Typer(help="Create and migrate the policy database.", no_args_is_help=True)
    app.add_typer(db, name="db")

    @db.command("upgrade")
    def upgrade_cmd(
        revision: Annotated[str, typer.Option("--revision", help="Target revision.")] = "head",
        as_json: JsonOption = False,
    ) -> None:
        """Migrate the database (EXITWISE_DATABASE_URL, default SQLite in EXITWISE_DATA_DIR) to head."""
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
