"""``exitwise policy``: store, review, approve, activate, roll back and kill policy versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from exitwise.api.cli.output import JsonOption, TokenOption, console, emit_json, jsonable, percent
from exitwise.api.cli.session import acting, acting_principal, reading, store_engine
from exitwise.policies import lifecycle, store
from exitwise.policies.db import unit_of_work
from exitwise.policies.document_files import read_json_object
from exitwise.policies.principals import require
from exitwise.policies.reverify import reverify_version
from exitwise.policies.settings import get_settings

EnvOption = Annotated[str, typer.Option("--env", "-e", help="Environment, e.g. staging or production.")]


def _reason(required: bool = True) -> Any:
    return typer.Option("--reason", "-r", help="Why (kept in the audit trail)." + (" Required." if required else ""))


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


def _held_out(doc: dict[str, Any]) -> dict[str, Any] | None:
    """``expected.held_out`` of a document (``solve --test FILE``): source, rows, fingerprint, figures."""
    h = (doc.get("expected") or {}).get("held_out")
    if not isinstance(h, dict):
        return None
    return {k: h.get(k) for k in ("source", "rows", "fingerprint", "compute_fraction", "risk")}


def _held_out_cell(h: dict[str, Any] | None) -> str:
    """``41.2% / 0.812% on test.parquet (3,000 rows)``, or ``—`` when the policy was not tested on a file."""
    if h is None:
        return "—"
    rows = f", {h['rows']:,} rows" if isinstance(h.get("rows"), int) else ""
    return f"{percent(h.get('compute_fraction'))} / {percent(h.get('risk'), 3)} ({h.get('source')}{rows})"


def _version_summary(v: Any) -> str:
    where = f", active in {', '.join(v.active_in)}" if v.active_in else ""
    return f"{v.model} v{v.number} ({v.state}{where}) content_hash {v.content_hash[:12]}"


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
        doc = read_json_object(path)
        with acting(token, "policy create") as (session, author):
            if exist_ok:
                stored = lifecycle.store_document(doc, author=author, session=session)
            else:
                stored = lifecycle.Stored(lifecycle.create_version(doc, author=author, session=session), created=True)
        v = stored.version
        if as_json:
            emit_json({**jsonable(v), "created": stored.created})
        else:
            console.print(("created " if stored.created else "already stored: ") + _version_summary(v))

    @grp.command("list")
    def list_(
        model: Annotated[str | None, typer.Argument(help="Only this model.", show_default=False)] = None,
        as_json: JsonOption = False,
    ) -> None:
        """List policy versions (all models, or one)."""
        with reading() as session:
            versions = store.list_versions(model, session=session)
            held = {key: _held_out(doc) for key, doc in store.documents(model, session=session).items()}
        if as_json:  # fractions; compute_fraction and risk are the certify split's, held_out the test file's
            emit_json({"versions": [{**jsonable(v), "figures_from": "certify split",
                                     "held_out": held[(v.model, v.number)]} for v in versions]})
            return
        tested = any(h is not None for h in held.values())  # the held-out column only when there is one
        table = Table("model", "v", caption="certify: on the certify split of the calibration logs; "
                      + ("held out: on the test file given to 'solve --test'; " if tested else "")
                      + "compute: share of full-depth cost; risk: the guarantee's risk type; all in %")
        table.add_column("state", no_wrap=True)
        for name in ("active in", "author", "approved by"):
            table.add_column(name)
        table.add_column("created", no_wrap=True)
        for name in ("certify compute", "certify risk", "eps"):
            table.add_column(name, justify="right")
        table.add_column("cert.")
        table.add_column("hash", no_wrap=True)
        if tested:
            table.add_column("held-out compute / risk (file)", no_wrap=True)
        for v in versions:
            cells = [v.model, str(v.number), v.state, ", ".join(v.active_in), v.author,
                     ", ".join(a.approver for a in v.approvals), v.created_at.strftime("%Y-%m-%d %H:%M"),
                     percent(v.compute_fraction), percent(v.risk, 3), percent(v.eps, 3), _fmt(v.certified),
                     v.content_hash[:12]]
            table.add_row(*cells, *([_held_out_cell(held[(v.model, v.number)])] if tested else []))
        console.print(table if versions else "no policy versions stored")

    @grp.command("show")
    def show(
        model: Annotated[str, typer.Argument(help="Model name.")],
        version: Annotated[int, typer.Argument(help="Version number.", min=1)],
        as_json: JsonOption = False,
    ) -> None:
        """Show one version; --json prints the served document (content + governance fields)."""
        with reading() as session:
            v = store.get_version(model, version, session=session)
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
            ("guarantee", f"{g.get('risk')} <= {percent(g.get('eps'), 3)} with confidence "
                          f"{percent(1 - g.get('delta', 0))}, certified {_fmt(g.get('certified'))} "
                          f"(n={g.get('n')})"),
            (f"compute (certify split, {g.get('n')} rows)", percent(v.compute_fraction)),
            (f"risk (certify split, {g.get('n')} rows)", percent(v.risk, 3)),
        ]
        h = _held_out(doc)
        if h is not None:
            where = f"held-out file {h['source']}, {h['rows']} rows"
            rows += [(f"compute ({where})", percent(h["compute_fraction"])),
                     (f"risk ({where})", percent(h["risk"], 3)), ("held-out data", _fmt(h["fingerprint"]))]
        rows.append(("data", _fmt(v.data_fingerprint)))
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
        with reading() as session:
            d = store.diff_versions(model, a, b, session=session)
        x = d.diff
        if as_json:
            emit_json({"model": d.model, "a": d.a, "b": d.b, "a_hash": x.before_hash, "b_hash": x.after_hash,
                       "identical": x.identical, "changed_fields": x.changed_fields,
                       "thresholds": [{"segment": t.segment, "exit": t.exit, "exit_name": t.exit_name,
                                       "class": t.class_, "a": t.before, "b": t.after} for t in x.thresholds],
                       "guarantee": {k: {"a": v, "b": w} for k, (v, w) in x.guarantee.items()},
                       "expected": {k: {"a": v, "b": w} for k, (v, w) in x.expected.items()},
                       "weakened": [{"what": w.what, "a": w.before, "b": w.after, "message": w.message}
                                    for w in x.weakened]})
            return
        if x.identical:
            console.print(f"{model} v{a} and v{b} have identical content ({x.before_hash[:12]})")
            return
        console.print(f"{model} v{a} ({x.before_hash[:12]}) vs v{b} ({x.after_hash[:12]}); "
                      f"changed: {', '.join(x.changed_fields)}")
        for w in x.weakened:
            console.print(f"[bold red]WEAKER[/] in v{b}: {w.message}")
        if x.weakened:
            console.print(f"approving v{b} after v{a} needs --accept-weaker REASON")
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
        accept_weaker: Annotated[str | None, typer.Option(
            "--accept-weaker", metavar="REASON",
            help="Approve a version that drops or loosens promises of its parent or of an active version "
                 "(higher eps/delta, a per-segment budget dropped or loosened, ...); the reason is audited.")] = None,
        token: TokenOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Approve a draft (role approver; not its author), re-verifying its certificate from its evidence.

        The calibration logs the document names (data.evidence) are read when reachable and their
        fingerprint matches; the approval records whether the certificate was re-verified.
        """
        with store_engine() as engine:
            with unit_of_work(engine, readonly=True) as session:  # refuse a wrong token before reading logs
                require(acting_principal(token, session=session, action="policy approve"), "approver",
                        "approve policy versions")
            verification = reverify_version(engine, model, version, roots=None)
            with unit_of_work(engine) as session:
                actor = acting_principal(token, session=session, action="policy approve")
                v = lifecycle.approve(model, version, approver=actor, reason=reason, session=session,
                                      verification=verification, accept_weaker=accept_weaker)
        if as_json:
            emit_json({**jsonable(v), "certificate": verification.to_json()})
            return
        console.print(f"approved {_version_summary(v)} by {actor.name}")
        console.print(f"{verification.label}: {verification.detail}")

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
        with acting(token, "policy activate") as (session, actor):
            active = lifecycle.activate(model, version, env, actor=actor, reason=reason, session=session,
                                        rules=get_settings().rules())
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
        with acting(token, "policy rollback") as (session, actor):
            active = lifecycle.rollback(model, env, actor=actor, to=to, reason=reason, session=session,
                                        rules=get_settings().rules())
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
        with acting(token, "policy retire") as (session, actor):
            v = lifecycle.retire(model, version, actor=actor, reason=reason, session=session)
        emit_json(jsonable(v)) if as_json else console.print(f"retired {_version_summary(v)}")

    def _kill(model: str, env: str, reason: str, token: str | None, as_json: bool, on: bool) -> None:
        with acting(token, "policy kill" if on else "policy unkill") as (session, actor):
            ks = (lifecycle.kill if on else lifecycle.unkill)(model, env, actor=actor, reason=reason, session=session)
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
        with reading() as session:
            a = store.get_active(model, env, session=session)
        _print_active(a, as_json, "active:")


def _print_active(a: Any, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(a)
    else:
        console.print(f"{verb} {a.model} v{a.version} in {a.environment} (content_hash {a.content_hash[:12]}"
                      f"{', KILLED' if a.killed else ''})")
