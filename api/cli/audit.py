"""``exitwise audit``: read, verify and export the hash-chained audit trail; sign its head outside the database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.table import Table

from exitwise.api.cli.output import JsonOption, console, emit_json
from exitwise.api.cli.session import reading
from exitwise.calibration.exceptions import InputError
from exitwise.policies import anchor
from exitwise.policies.audit import ChainReport, export, log, verify, verify_export
from exitwise.policies.errors import AuditChainBroken
from exitwise.policies.settings import StoreSettings, get_settings


def _verification_key(settings: StoreSettings, public_key: Path | None) -> Ed25519PublicKey:
    """--public-key, else EXITWISE_ANCHOR_PUBLIC_KEY, else the public half of EXITWISE_ANCHOR_KEY."""
    source = public_key or settings.anchor_public_key or settings.anchor_key
    if source is None:
        raise InputError("checking the anchor needs the public key: pass --public-key PEM "
                         "(or set EXITWISE_ANCHOR_PUBLIC_KEY or EXITWISE_ANCHOR_KEY)")
    return anchor.load_public_key(source)


def register(app: typer.Typer) -> None:
    grp = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
    app.add_typer(grp, name="audit")

    @grp.command("log")
    def log_(
        model: Annotated[str | None, typer.Option("--model", "-m", help="Only events of this model.")] = None,
        limit: Annotated[int, typer.Option("--limit", "-n", help="Newest N events.", min=1)] = 50,
        as_json: JsonOption = False,
    ) -> None:
        """Show the newest audit events."""
        with reading() as session:
            events = log(session=session, model=model, limit=limit)
        if as_json:
            emit_json({"events": events})
            return
        table = Table("seq", "time (UTC)", "actor", "action", "target", "reason", "hash")
        for e in events:
            target = " ".join(x for x in (e.model, f"v{e.version}" if e.version else None, e.environment) if x)
            if e.action.startswith("principal."):
                target = str(e.details.get("principal", ""))
            table.add_row(str(e.seq), e.ts[:19].replace("T", " "), e.actor, e.action, target, e.reason or "",
                          e.hash[:12])
        console.print(table if events else "no audit events")

    @grp.command("verify")
    def verify_(
        file: Annotated[Path | None, typer.Option(
            "--file", help="Verify an exported trail (jsonl or csv) instead of the database.", dir_okay=False)] = None,
        head: Annotated[str | None, typer.Option(
            "--head", help="With --file: the head hash the store published (detects a cut-off tail).")] = None,
        anchor_file: Annotated[Path | None, typer.Option(
            "--anchor", help="Check the chain against the signed checkpoints in this anchor file "
                             "(default: EXITWISE_ANCHOR_FILE when set).", dir_okay=False)] = None,
        public_key: Annotated[Path | None, typer.Option(
            "--public-key", help="PEM key the checkpoints must be signed with (default: EXITWISE_ANCHOR_PUBLIC_KEY, "
                                 "else the public half of EXITWISE_ANCHOR_KEY).", dir_okay=False)] = None,
        store: Annotated[str | None, typer.Option(
            "--store", help="Only checkpoints of this store name (default: EXITWISE_ANCHOR_STORE).")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Walk the chain, check it against the anchor's signed checkpoints, replay it against the
        activations, versions and kill switches; exit 1 naming the first problem."""
        if head is not None and file is None:
            raise InputError("--head only applies with --file")
        settings = get_settings()
        anchor_file = anchor_file or settings.anchor_file
        checkpoints = None
        if anchor_file is not None:
            key = _verification_key(settings, public_key)
            checkpoints = anchor.load_verified(anchor_file, key, store=store or settings.anchor_store)
        if file is not None:
            if not file.is_file():
                raise InputError(f"audit export {file}: no such file")
            report = verify_export(file, head_hash=head, checkpoints=checkpoints)
        else:
            with reading() as session:
                report = verify(session=session, checkpoints=checkpoints)
        if as_json:
            emit_json(report)
            if not report.ok:
                raise typer.Exit(AuditChainBroken.exit_code)
            return
        if not report.ok:
            raise AuditChainBroken(report.message)
        console.print(_verified(report))

    @grp.command("checkpoint")
    def checkpoint_(as_json: JsonOption = False) -> None:
        """Verify the chain (against the anchor file's checkpoints, if any) and sign its head into the anchor.

        Needs EXITWISE_ANCHOR_KEY and EXITWISE_ANCHOR_FILE and/or EXITWISE_ANCHOR_URL. Refuses
        (exit 1) when verification fails: a checkpoint must never bless a tampered chain.
        """
        settings = get_settings()
        writer = anchor.Anchor.from_settings(settings)
        checkpoints = None
        if writer.file is not None and writer.file.is_file() and writer.file.stat().st_size:
            mine = [c for c in anchor.read_checkpoints(writer.file) if c.store == writer.store]
            anchor.check_signatures(mine, writer.key.public_key())
            checkpoints = mine or None
        with reading() as session:
            report = verify(session=session, checkpoints=checkpoints)
        if not report.ok:
            raise AuditChainBroken(f"not checkpointing: {report.message}")
        cp = writer.write(report.head_seq, report.head_hash)
        if as_json:
            emit_json({**cp.to_json(), "file": str(writer.file) if writer.file else None, "url": writer.url})
        else:
            where = " and ".join(x for x in (str(writer.file) if writer.file else None, writer.url) if x)
            console.print(f"checkpoint seq={cp.seq} hash={cp.hash} signed by key {cp.key_id} -> {where}")

    @grp.command("keygen")
    def keygen_(
        path: Annotated[Path, typer.Argument(help="Where to write the new private key (mode 0600; never overwritten).",
                                             dir_okay=False)],
        as_json: JsonOption = False,
    ) -> None:
        """Create the Ed25519 key that signs checkpoints; prints its public key for the verifiers."""
        public = anchor.generate_key(path)
        pem, kid = anchor.public_pem(public), anchor.key_id(public)
        if as_json:
            emit_json({"path": str(path), "key_id": kid, "public_key": pem})
            return
        console.print(f"wrote {path} (mode 0600, key id {kid}); set EXITWISE_ANCHOR_KEY={path}\n"
                      "public key (give it to whoever runs 'exitwise audit verify --public-key'):")
        typer.echo(pem, nl=False)

    @grp.command("export")
    def export_(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output file.", dir_okay=False)],
        fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl or csv.")] = "jsonl",
        as_json: JsonOption = False,
    ) -> None:
        """Export the whole chain (with hashes) for an external auditor; written atomically."""
        fmt = fmt.lower()
        if fmt not in ("jsonl", "csv"):
            raise InputError(f"--format must be jsonl or csv, got {fmt!r}")
        with reading() as session:
            result = export(out, fmt, session=session)  # type: ignore[arg-type]
        if as_json:
            emit_json(result)
        else:
            console.print(f"exported {result.events} events to {result.path} "
                          f"(head seq={result.head_seq} hash={result.head_hash})")


def _verified(report: ChainReport) -> str:
    line = f"audit chain verifies: {report.events} events, head seq={report.head_seq} hash={report.head_hash}"
    if "anchored_seq" in report.details:
        line += (f"; matches {report.details['checkpoints']} signed checkpoint(s), latest seq="
                 f"{report.details['anchored_seq']}")
    return line
