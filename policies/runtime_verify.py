"""Checks of a served policy body before the runtime client uses it (stdlib, numpy via the rule).

A body is used only if it is a v1 policy document of the model asked for, its ``content_hash``
matches its content, its runtime fields are well-typed and its own, it compiles with the one
decision rule, its shape is the runtime's, and its ETag (when it is an exitwise ETag) agrees
with it. Each failure raises :class:`~exitwise.policies.runtime_errors.PolicyRejected` naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from exitwise.calibration.rule import CompiledPolicy
from exitwise.policies.canonical import SCHEMA, content_hash
from exitwise.policies.runtime_errors import PolicyRejected

__all__ = ["check_etag", "short", "verify_policy_document"]

# The exitwise server's policy ETag (exitwise.api.cache.policy_etag): content hash, version, kill state.
_POLICY_ETAG = re.compile(r'^(?:W/)?"([0-9a-f]{64})\.v([0-9]+)\.(live|killed)(?:\.a[0-9a-f]{1,16})?"$')


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted bodies."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _check_runtime_fields(doc: Mapping[str, Any], env: str | None) -> None:
    """The fields the runtime acts on beyond the thresholds must be what the rule expects."""
    rate = doc.get("shadow_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) \
            or not 0.0 <= rate <= 1.0:
        raise PolicyRejected(f"policy field shadow_rate must be a number in [0, 1], got {short(rate)}", "field")
    if "killed" in doc and not isinstance(doc["killed"], bool):
        raise PolicyRejected(f"policy field killed must be true or false, got {short(doc['killed'])}", "field")
    version = doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PolicyRejected(f"policy field version must be a positive integer, got {short(version)}", "field")
    if env is not None and "environment" in doc and doc["environment"] != env:
        raise PolicyRejected(f"policy is for environment {short(doc['environment'])}, expected {env!r}",
                             "environment")


def verify_policy_document(doc: Any, model: str | None = None, *, env: str | None = None,
                           n_exits: int | None = None, n_classes: int | None = None) -> CompiledPolicy:
    """Check a served policy document and compile it; raise :class:`PolicyRejected` if unusable.

    Checks: a JSON object with the v1 schema, the model asked for, a ``content_hash`` equal to
    the hash of its content (governance fields excluded, see :mod:`exitwise.policies.canonical`),
    the runtime fields (``shadow_rate`` a finite number in [0, 1]; ``killed`` a bool, ``version``
    a positive int and ``environment`` equal to ``env`` when present), a shape the decision rule
    accepts and, when given, the runtime's own number of exits and classes (a policy solved for
    another architecture is never applied). For a large-vocabulary policy ``n_classes`` is the
    logits per exit (the vocabulary size; its thresholds have one column per token bucket) and
    the token-to-bucket map must match its ``sha256`` (the rule decodes and checks it).
    """
    if not isinstance(doc, dict):
        raise PolicyRejected(f"policy body is not a JSON object ({type(doc).__name__})", "not_object")
    if doc.get("schema") != SCHEMA:
        raise PolicyRejected(f"policy schema is {short(doc.get('schema'))}, expected {SCHEMA!r}", "schema")
    name = (doc.get("model") or {}).get("name") if isinstance(doc.get("model"), dict) else None
    if model is not None and name != model:
        raise PolicyRejected(f"policy is for model {short(name)}, expected {model!r}", "model")
    claimed = doc.get("content_hash")
    try:
        actual = content_hash(doc)
    except (TypeError, ValueError) as exc:
        raise PolicyRejected(f"policy cannot be hashed: {exc}", "hash") from None
    if claimed != actual:
        raise PolicyRejected(f"content_hash mismatch: body claims {short(claimed, 80)}, content hashes to {actual!r}",
                             "hash")
    _check_runtime_fields(doc, env)
    try:
        compiled = CompiledPolicy.from_document(doc)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PolicyRejected(f"policy does not compile: {type(exc).__name__}: {exc}", "compile") from None
    if n_exits is not None and compiled.n_exits != n_exits:
        raise PolicyRejected(f"policy has {compiled.n_exits} exits, this runtime's model has {n_exits}", "shape")
    if n_classes is not None and compiled.n_outputs != n_classes:
        what = (f"{compiled.n_classes} classes" if compiled.class_bucket is None
                else f"a vocabulary of {compiled.n_outputs} tokens")
        raise PolicyRejected(f"policy has {what}, this runtime's model has {n_classes}", "shape")
    return compiled


def check_etag(etag: str | None, doc: Mapping[str, Any]) -> bool:
    """Whether ``etag`` is an exitwise policy ETag; raise :class:`PolicyRejected` if it contradicts ``doc``.

    The ETag carries the content hash, the version and the kill state (``.killed``/``.live``,
    see ``exitwise.api.cache.policy_etag``); the body carries them too, and they must agree.
    """
    match = _POLICY_ETAG.match(etag) if isinstance(etag, str) else None
    if match is None:
        return False
    digest, version, state = match.groups()
    killed = doc.get("killed", False)
    if digest != doc.get("content_hash") or int(version) != doc.get("version", int(version)) \
            or (state == "killed") != killed:
        raise PolicyRejected(f"ETag {etag} disagrees with the body (content_hash "
                             f"{short(doc.get('content_hash'), 20)}, version {doc.get('version')!r}, "
                             f"killed {killed!r})", "etag")
    return True


