"""Signed checkpoints of the audit chain's head, kept outside the policy database.

The chain (``exitwise.policies.audit``) proves that events are linked, and the store records
its head in the same database — so whoever can rewrite the database can rewrite both. A
checkpoint is an Ed25519 signature, made with a key the database never sees, over::

    {"v": 1, "store": <EXITWISE_ANCHOR_STORE or null>, "seq": <head seq>, "hash": <head hash>,
     "ts": <UTC YYYY-MM-DDTHH:MM:SS.ffffffZ>, "key_id": <first 16 hex of sha256(raw public key)>}

signed as canonical JSON (keys sorted, no spaces, UTF-8); the line written is the same object
plus ``"sig"`` (base64 of the 64-byte signature). Checkpoints are appended (``O_APPEND``,
``fsync``) to ``EXITWISE_ANCHOR_FILE``, one self-contained line each, and optionally POSTed
as JSON to ``EXITWISE_ANCHOR_URL`` (best effort). :func:`install_anchor_hook` writes one after
every committed audit event; a failure is logged and never undoes the change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exitwise.calibration.exceptions import InputError
from exitwise.policies import events
from exitwise.policies.audit import format_ts
from exitwise.policies.canonical import canonical_json
from exitwise.policies.errors import AuditChainBroken
from exitwise.policies.settings import StoreSettings, get_settings

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_APPEND alone
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Checkpoint:
    """One signed statement "the chain of ``store`` had head (seq, hash) at ``ts``"."""

    store: str | None
    seq: int
    hash: str
    ts: str
    key_id: str
    sig: str
    where: str = ""  # file:line it was read from (not signed)

    def payload(self) -> dict[str, Any]:
        return {"v": FORMAT_VERSION, "store": self.store, "seq": self.seq, "hash": self.hash, "ts": self.ts,
                "key_id": self.key_id}

    def to_json(self) -> dict[str, Any]:
        return {**self.payload(), "sig": self.sig}

    def line(self) -> str:
        return canonical_json(self.to_json()).decode("utf-8") + "\n"

    def label(self) -> str:
        return f"checkpoint {self.where or 'seq=' + str(self.seq)} (signed {self.ts})"


# ---------------------------------------------------------------- keys

def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def generate_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Write a new private key (PKCS#8 PEM, mode 0600, never overwriting) and return its public key."""
    target = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InputError(f"anchor key {target} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(target, 0o600)  # the umask cannot widen it, but be explicit
    return key.public_key()


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The signing key at ``path``; warns when group or others may read it."""
    p = Path(path)
    data = _read_pem(p, "anchor key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"anchor key {p}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"anchor key {p}: an Ed25519 key is required, got {type(key).__name__}")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("anchor key %s is readable by group/others (mode %o); chmod 600 it", p, p.stat().st_mode & 0o777)
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """The verification key at ``path``: a public PEM, or the private key PEM (its public half)."""
    p = Path(path)
    data = _read_pem(p, "anchor public key")
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise InputError(f"anchor public key {p}: not a PEM public (or private) key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"anchor public key {p}: an Ed25519 key is required, got {type(key).__name__}")
    return key


# ---------------------------------------------------------------- sign, write, read

def sign(key: Ed25519PrivateKey, *, seq: int, head_hash: str, store: str | None = None,
         when: datetime | None = None) -> Checkpoint:
    """A checkpoint of head (``seq``, ``head_hash``) signed with ``key``."""
    unsigned = Checkpoint(store=store, seq=int(seq), hash=head_hash, ts=format_ts(when or datetime.now(UTC)),
                          key_id=key_id(key.public_key()), sig="")
    sig = key.sign(canonical_json(unsigned.payload()))
    return Checkpoint(**{**asdict(unsigned), "sig": base64.b64encode(sig).decode("ascii")})


def append_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    """Append one line to the anchor file: ``O_APPEND`` (plus ``flock`` against other writers), ``fsync``."""
    data = checkpoint.line().encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the lock


def post_checkpoint(url: str, checkpoint: Checkpoint, *, timeout: float) -> None:
    """POST the checkpoint as JSON to ``url``; raises on a transport error or a non-2xx answer."""
    httpx.post(url, json=checkpoint.to_json(), timeout=timeout).raise_for_status()


def parse(obj: Any, where: str) -> Checkpoint:
    """A checkpoint from its JSON object (a line, or a POSTed body); ``where`` names it in errors."""
    if not isinstance(obj, dict):
        raise AuditChainBroken(f"anchor {where}: not a checkpoint object")
    try:
        if obj.get("v") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {obj.get('v')!r}")
        cp = Checkpoint(store=obj["store"], seq=obj["seq"], hash=obj["hash"], ts=obj["ts"], key_id=obj["key_id"],
                        sig=obj["sig"], where=where)
        if not isinstance(cp.seq, int) or isinstance(cp.seq, bool) or cp.seq < 0:
            raise ValueError(f"bad seq {cp.seq!r}")
        if not all(isinstance(x, str) for x in (cp.hash, cp.ts, cp.key_id, cp.sig)):
            raise ValueError("hash, ts, key_id and sig must be strings")
    except (KeyError, ValueError) as exc:
        raise AuditChainBroken(f"anchor {where}: malformed checkpoint ({exc})") from None
    return cp


def read_checkpoints(path: str | os.PathLike[str]) -> list[Checkpoint]:
    """Every checkpoint line of an anchor file, in file order (``where`` = ``file:line``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"anchor file {p}: no such file") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            obj = json.loads(line)
        except ValueError:
            raise AuditChainBroken(f"anchor {where}: not JSON (a torn or edited line)") from None
        out.append(parse(obj, where))
    return out


def check_signatures(checkpoints: list[Checkpoint], public_key: Ed25519PublicKey) -> None:
    """Raise ``AuditChainBroken`` naming the first checkpoint not signed by ``public_key``."""
    kid = key_id(public_key)
    for cp in checkpoints:
        if cp.key_id != kid:
            raise AuditChainBroken(f"anchor {cp.where}: signed with key {cp.key_id}, not with the given key {kid}")
        try:
            public_key.verify(base64.b64decode(cp.sig, validate=True), canonical_json(cp.payload()))
        except (InvalidSignature, binascii.Error, ValueError):
            raise AuditChainBroken(f"anchor {cp.where}: signature does not verify (seq={cp.seq}); "
                                   "the line was altered or not written by the anchor key") from None


def load_verified(path: str | os.PathLike[str], public_key: Ed25519PublicKey, *,
                  store: str | None) -> list[Checkpoint]:
    """The checkpoints of ``store`` in ``path``, every signature checked; at least one is required."""
    cps = read_checkpoints(path)
    check_signatures(cps, public_key)
    mine = [c for c in cps if c.store == store]
    if not mine:
        raise AuditChainBroken(f"anchor file {path} holds no checkpoint for store {store!r} "
                               f"({len(cps)} for other stores); nothing to verify against")
    return mine


# ---------------------------------------------------------------- the writer and the hook

@dataclass
class Anchor:
    """Where checkpoints go: the signing key, the file and/or URL, the store's name."""

    key: Ed25519PrivateKey
    file: Path | None = None
    url: str | None = None
    store: str | None = None
    timeout: float = 2.0

    @classmethod
    def from_settings(cls, settings: StoreSettings | None = None) -> Anchor:
        s = settings or get_settings()
        if s.anchor_key is None:
            raise InputError("no anchor key: set EXITWISE_ANCHOR_KEY (create one with 'exitwise audit keygen PATH')")
        if s.anchor_file is None and not s.anchor_url:
            raise InputError("nowhere to write checkpoints: set EXITWISE_ANCHOR_FILE and/or EXITWISE_ANCHOR_URL")
        return cls(load_private_key(s.anchor_key), s.anchor_file, s.anchor_url or None, s.anchor_store,
                   s.anchor_timeout_s)

    def write(self, seq: int, head_hash: str, *, post: bool = True) -> Checkpoint:
        """Sign (seq, hash) and append it to the file (raising on failure); POST it when ``post``."""
        cp = sign(self.key, seq=seq, head_hash=head_hash, store=self.store)
        if self.file is not None:
            append_checkpoint(self.file, cp)
        if post:
            self.post(cp)
        return cp

    def post(self, cp: Checkpoint) -> None:
        """Best effort: a failed POST is logged, never raised."""
        if not self.url:
            return
        try:
            post_checkpoint(self.url, cp, timeout=self.timeout)
        except Exception as exc:  # best effort: the file is the record
            log.error("ANCHOR NOT POSTED: checkpoint seq=%s to %s failed: %s", cp.seq, self.url, exc)


def install_anchor_hook(settings: StoreSettings | None = None, *,
                        background: bool = False) -> Callable[[Any], None] | None:
    """Write a signed checkpoint after every committed audit event; None when no key is configured.

    Registers an ``exitwise.policies.events.on_commit`` callback (returned, for ``events.remove``).
    The file is written synchronously (a few ms); the POST runs in a daemon thread when
    ``background`` (the API). Failures are logged at ERROR and never undo the change.
    """
    s = settings or get_settings()
    if s.anchor_key is None:
        return None
    try:
        anchor = Anchor.from_settings(s)
    except InputError as exc:
        log.error("ANCHOR DISABLED: %s; committed changes are not checkpointed", exc)
        return None

    def _hook(event: Any) -> None:
        try:
            cp = anchor.write(event.seq, event.hash, post=False)
        except Exception:
            log.exception("ANCHOR NOT WRITTEN for audit seq=%s to %s; run 'exitwise audit checkpoint'",
                          event.seq, anchor.file)
            return
        if anchor.url:
            if background:
                threading.Thread(target=anchor.post, args=(cp,), daemon=True,
                                 name=f"exitwise-anchor-{cp.seq}").start()
            else:
                anchor.post(cp)

    events.on_commit(_hook)
    return _hook
