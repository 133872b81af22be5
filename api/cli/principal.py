"""``exitwise principal``: API/CLI identities and their bearer tokens."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from exitwise.api.cli.output import JsonOption, TokenOption, console, emit_json
from exitwise.api.cli.session import acting, acting_principal, reading, store_engine
from exitwise.policies.db import unit_of_work
from exitwise.policies.principals import add_principal, disable_principal, list_principals


def register(app: typer.Typer) -> None:
    grp = typer.Typer(help="Manage principals (bearer tokens and roles).", no_args_is_help=True)
    app.add_typer(grp, name="principal")

    @grp.command("add")
    def add(
        name: Annotated[str, typer.Argument(help="Principal name (unique).")],
        role: Annotated[str, typer.Option("--role", help="reader | author | approver | admin.")],
        token: TokenOption = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the token (for scripts).")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Add a principal and print its token ONCE (the store keeps only its sha256).

        The very first principal (an admin) needs no token; afterwards an admin token is required.
        """
        with store_engine() as engine, unit_of_work(engine) as session:
            actor = acting_principal(token, session=session, action="principal add") if token else None
            new = add_principal(name, role, actor=actor, session=session)
        if quiet:
            typer.echo(new.token)
        elif as_json:
            emit_json({"name": new.principal.name, "role": new.principal.role, "token": new.token})
        else:
            console.print(f"added principal {new.principal.name} (role {new.principal.role})")
            console.print("token (shown once, store it now):")
            typer.echo(new.token)

    @grp.command("list")
    def list_(as_json: JsonOption = False) -> None:
        """List principals (never their tokens)."""
        with reading() as session:
            rows = list_principals(session=session)
        if as_json:
            emit_json({"principals": rows})
            return
        table = Table("name", "role", "created", "disabled")
        for p in rows:
            table.add_row(p.name, p.role, p.created_at.strftime("%Y-%m-%d %H:%M:%S"), "yes" if p.disabled else "")
        console.print(table)

    @grp.command("disable")
    def disable(
        name: Annotated[str, typer.Argument(help="Principal to disable.")],
        reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in the audit trail).")] = None,
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Disable a principal (admin): its token stops working at once."""
        with acting(token, "principal disable") as (session, actor):
            p = disable_principal(name, actor=actor, session=session, reason=reason)
        if as_json:
            emit_json(p)
        else:
            console.print(f"disabled principal {p.name}")
