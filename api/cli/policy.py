"""``exitwise policy``: store, review, approve, activate, roll back and kill policy versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from exitwise.api.cli.db import JsonOption, TokenOption, acting_principal, console, emit_json, store_engine

EnvOption = Annotated[str, typer.Option("--env", "-e", help="Environment, e.g. staging or production.")]


def _reason(required: bool = True) -> Any:
    return typer.Option("--reason", "-r", help="Why (kept in the audit trail)." + (" Required." if required else ""))


def _load(path: Path) -> dict[str, Any]:
    from exitwise.policies.document import read_json_object

    return read_json_object(path)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _value(x: Any) -> str:
    """A diffed value in full (floats exactly as stored, lists and objects as JSON): no change is rounded away."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, dict | list):
        return json.dumps(x, sort_keys=True)
    return _fmt(x)


def _version_summary(v: Any) -> str:
    where = f", active in {', '.join(v.active_in)}" if v.active_in else ""
    return f"{v.model} v{v.number} ({v.state}{where}) content_hash {v.content_hash[:12]}"


def _rules() -> Any:
    from exitwise.policies.settings import get_settings

    return get_settings().rules()


def register(app: typer.Typer) -> None:
    grp = typer.Typer(help="Policy versions and their lifecycle.", no_args_is_help=True)
    app.add_typer(grp, name="policy")

    @grp.command("create")
    def create(
        path: Annotated[Path, typer.Argument(help="Policy document (JSON).", dir_okay=False)],
        exist_ok: Annotated[bool, typer.Option(
            "--exist-ok", help="When the same content is already stored, report that version instead of failing."
        )] = False,
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Store POLICY.json as the next draft version of its model (role author)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.errors import DuplicateContent
        from exitwise.policies.lifecycle import create_version
        from exitwise.policies.store import get_version

        doc = _load(path)
        created = True
        with store_engine() as engine:
            try:
                with unit_of_work(engine) as session:
                    author = acting_principal(token, session=session, action="policy create")
                    v = create_version(doc, author=author, session=session)
            except DuplicateContent as exc:
                if not exist_ok:
                    raise
                created = False
                with unit_of_work(engine, readonly=True) as session:
                    v = get_version(exc.model, exc.existing, session=session)
        if as_json:
            emit_json({**_info(v), "created": created})
        else:
            console.print(("created " if created else "already stored: ") + _version_summary(v))

    @grp.command("list")
    def list_(
        model: Annotated[str | None, typer.Argument(help="Only this model.", show_default=False)] = None,
        as_json: JsonOption = False,
    ) -> None:
        """List policy versions (all models, or one)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.store import list_versions

        with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
            versions = list_versions(model, session=session)
        if as_json:
            emit_json({"versions": [_info(v) for v in versions]})
            return
        table = Table("model", "v", "state", "active in", "author", "approved by", "created", "compute", "risk",
                      "eps", "cert.", "hash")
        for v in versions:
            table.add_row(v.model, str(v.number), v.state, ", ".join(v.active_in), v.author,
                          ", ".join(a.approver for a in v.approvals), v.created_at.strftime("%Y-%m-%d %H:%M"),
                          _fmt(v.compute_fraction), _fmt(v.risk), _fmt(v.eps), _fmt(v.certified),
                          v.content_hash[:12])
        console.print(table if versions else "no policy versions stored")

    @grp.command("show")
    def show(
        model: Annotated[str, typer.Argument(help="Model name.")],
        version: Annotated[int, typer.Argument(help="Version number.", min=1)],
        as_json: JsonOption = False,
    ) -> None:
        """Show one version; --json prints the served document (content + governance fields)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.store import get_version

        with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
            v = get_version(model, version, session=session)
        if as_json:
            emit_json(v.served_document())
            return
        doc = v.document
        table = Table(show_header=False, title=f"{v.model} v{v.number}")
        table.add_column("field", style="bold")
        table.add_column("value")
        g = doc.get("guarantee", {})
        rows = [
            ("state", v.state), ("active in", ", ".join(v.active_in) or "—"), ("content_hash", v.content_hash),
            ("parent", _fmt(v.parent)), ("author", v.author), ("created", v.created_at.isoformat()),
            ("approvals", "; ".join(f"{a.approver} ({a.reason})" for a in v.approvals) or "—"),
            ("exits", ", ".join(e.get("name", "?") for e in doc.get("exits", []))),
            ("classes", str(len(doc.get("classes", [])))), ("score", str(doc.get("score"))),
            ("segments", ", ".join(k for k in doc.get("thresholds", {}) if k != "default") or "—"),
            ("guarantee", f"{g.get('risk')} <= {g.get('eps')} with confidence {1 - g.get('delta', 0):.3g}, "
                          f"certified {_fmt(g.get('certified'))} (n={g.get('n')})"),
            ("compute fraction", _fmt(v.compute_fraction)), ("risk (held out)", _fmt(v.risk)),
            ("data", _fmt(v.data_fingerprint)),
        ]
        for k, val in rows:
            table.add_row(k, val)
        console.print(table)

    @grp.command("diff")
    def diff(
        model: Annotated[str, typer.Argument(help="Model name.")],
        a: Annotated[int, typer.Argument(help="First version.", min=1)],
        b: Annotated[int, typer.Argument(help="Second version.", min=1)],
        as_json: JsonOption = False,
    ) -> None:
        """Thresholds and guarantee of two versions side by side."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.store import diff_versions

        with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
            d = diff_versions(model, a, b, session=session)
        x = d.diff
        if as_json:
            emit_json({"model": d.model, "a": d.a, "b": d.b, "a_hash": x.before_hash, "b_hash": x.after_hash,
                       "identical": x.identical, "changed_fields": x.changed_fields,
                       "thresholds": [{"segment": t.segment, "exit": t.exit, "exit_name": t.exit_name,
                                       "class": t.class_, "a": t.before, "b": t.after} for t in x.thresholds],
                       "guarantee": {k: {"a": v, "b": w} for k, (v, w) in x.guarantee.items()},
                       "expected": {k: {"a": v, "b": w} for k, (v, w) in x.expected.items()}})
            return
        if x.identical:
            console.print(f"{model} v{a} and v{b} have identical content ({x.before_hash[:12]})")
            return
        console.print(f"{model} v{a} ({x.before_hash[:12]}) vs v{b} ({x.after_hash[:12]}); "
                      f"changed: {', '.join(x.changed_fields)}")
        g = Table("field", f"v{a}", f"v{b}", title=f"changed fields ({len(x.changed)} of {len(x.fields)} reviewed)")
        for f in x.changed:
            g.add_row(f.path, _value(f.before), _value(f.after))
        console.print(g if x.changed else "reviewed fields: no change")
        u = x.unpaired
        one_side = [f"{what} {', '.join(names)} only in v{v}" for what, names, v in (
            ("exits", u.exits_before, a), ("exits", u.exits_after, b),
            ("classes", u.classes_before, a), ("classes", u.classes_after, b)) if names]
        if one_side:
            console.print("thresholds not paired: " + "; ".join(one_side))
        t = Table("segment", "exit", "class", f"v{a}", f"v{b}",
                  title=f"thresholds ({len(x.thresholds)} of {x.cells_compared} paired cells changed)")
        for c in x.thresholds:
            t.add_row(c.segment, f"{c.exit} {c.exit_name}", _fmt(c.class_), _value(c.before), _value(c.after))
        console.print(t if x.thresholds else "thresholds: no change")

    @grp.command("approve")
    def approve(
        model: Annotated[str, typer.Argument(help="Model name.")],
        version: Annotated[int, typer.Argument(help="Version number.", min=1)],
        reason: Annotated[str, _reason()] = "",
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Approve a draft (role approver; not its author)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.lifecycle import approve as approve_

        with store_engine() as engine, unit_of_work(engine) as session:
            actor = acting_principal(token, session=session, action="policy approve")
            v = approve_(model, version, approver=actor, reason=reason, session=session)
        emit_json(_info(v)) if as_json else console.print(f"approved {_version_summary(v)} by {actor.name}")

    @grp.command("activate")
    def activate(
        model: Annotated[str, typer.Argument(help="Model name.")],
        version: Annotated[int, typer.Argument(help="Version number.", min=1)],
        env: EnvOption,
        reason: Annotated[str, _reason()] = "",
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Make an approved version the active one in --env (the previous one is superseded)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.lifecycle import activate as activate_

        with store_engine() as engine, unit_of_work(engine) as session:
            actor = acting_principal(token, session=session, action="policy activate")
            active = activate_(model, version, env, actor=actor, reason=reason, session=session, rules=_rules())
        _print_active(active, as_json, "activated")

    @grp.command("rollback")
    def rollback(
        model: Annotated[str, typer.Argument(help="Model name.")],
        env: EnvOption,
        to: Annotated[int | None, typer.Option("--to", help="Version to re-activate (default: the previous).",
                                               min=1)] = None,
        reason: Annotated[str | None, _reason(False)] = None,
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Re-activate an earlier approved version in --env."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.lifecycle import rollback as rollback_

        with store_engine() as engine, unit_of_work(engine) as session:
            actor = acting_principal(token, session=session, action="policy rollback")
            active = rollback_(model, env, actor=actor, to=to, reason=reason, session=session, rules=_rules())
        _print_active(active, as_json, "rolled back to")

    @grp.command("retire")
    def retire(
        model: Annotated[str, typer.Argument(help="Model name.")],
        version: Annotated[int, typer.Argument(help="Version number.", min=1)],
        reason: Annotated[str | None, _reason(False)] = None,
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Retire a version that is not active anywhere (it can never be activated again)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.lifecycle import retire as retire_

        with store_engine() as engine, unit_of_work(engine) as session:
            actor = acting_principal(token, session=session, action="policy retire")
            v = retire_(model, version, actor=actor, reason=reason, session=session)
        emit_json(_info(v)) if as_json else console.print(f"retired {_version_summary(v)}")

    def _kill(model: str, env: str, reason: str, token: str | None, as_json: bool, on: bool) -> None:
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.lifecycle import kill as kill_
        from exitwise.policies.lifecycle import unkill as unkill_

        with store_engine() as engine, unit_of_work(engine) as session:
            actor = acting_principal(token, session=session, action="policy kill" if on else "policy unkill")
            ks = (kill_ if on else unkill_)(model, env, actor=actor, reason=reason, session=session)
        if as_json:
            emit_json(ks)
        else:
            console.print(f"{model} in {env}: kill switch {'ON — serving full depth' if ks.killed else 'off'}")

    @grp.command("kill")
    def kill(model: Annotated[str, typer.Argument(help="Model name.")], env: EnvOption,
             reason: Annotated[str, _reason()] = "", token: TokenOption = None, as_json: JsonOption = False) -> None:
        """Kill switch on: the served policy for (model, env) never exits early, at once."""
        _kill(model, env, reason, token, as_json, True)

    @grp.command("unkill")
    def unkill(model: Annotated[str, typer.Argument(help="Model name.")], env: EnvOption,
               reason: Annotated[str, _reason()] = "", token: TokenOption = None,
               as_json: JsonOption = False) -> None:
        """Kill switch off (role approver)."""
        _kill(model, env, reason, token, as_json, False)

    @grp.command("active")
    def active(model: Annotated[str, typer.Argument(help="Model name.")], env: EnvOption,
               as_json: JsonOption = False) -> None:
        """Show the version active in --env (what runtimes are served)."""
        from exitwise.policies.db import unit_of_work
        from exitwise.policies.store import get_active

        with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
            a = get_active(model, env, session=session)
        _print_active(a, as_json, "active:")


def _info(v: Any) -> dict[str, Any]:
    from exitwise.api.cli.db import jsonable

    return jsonable(v)


def _print_active(a: Any, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(a)
    else:
        console.print(f"{verb} {a.model} v{a.version} in {a.environment} (content_hash {a.content_hash[:12]}"
                      f"{', KILLED' if a.killed else ''})")
