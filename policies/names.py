"""Names and identifiers the whole service agrees on, defined once.

What a model, an environment and a principal may be called (the store, the document schema,
the REST routes and the fast read lane all validate with these), and the problem-type URNs of
the REST API (which the runtime client reads back). Standard library only: the runtime client
imports it.
"""

from __future__ import annotations

import re

MODEL_NAME_MAX = 200
ENVIRONMENT_MAX = 64
PRINCIPAL_NAME_MAX = 200

# Unanchored bodies (for composing paths); the anchored forms below are what validators use.
MODEL_NAME_BODY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}"
ENVIRONMENT_BODY = r"[a-z0-9][a-z0-9_.-]{0,63}"
PRINCIPAL_NAME_BODY = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,199}"

MODEL_NAME_PATTERN = f"^{MODEL_NAME_BODY}$"
ENVIRONMENT_PATTERN = f"^{ENVIRONMENT_BODY}$"
PRINCIPAL_NAME_PATTERN = f"^{PRINCIPAL_NAME_BODY}$"

MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
ENVIRONMENT_RE = re.compile(ENVIRONMENT_PATTERN)
PRINCIPAL_NAME_RE = re.compile(PRINCIPAL_NAME_PATTERN)

ENVIRONMENT_RULE = "lower-case letters, digits, '.', '_', '-' (max 64)"
PRINCIPAL_NAME_RULE = "letters, digits, '.', '_', '@', '-' (max 200), starting with a letter or digit"

PROBLEM_PREFIX = "urn:exitwise:problem:"


def problem_urn(kind: str) -> str:
    """The problem type of one kind of error: ``urn:exitwise:problem:<kind>`` (kind in kebab case)."""
    return PROBLEM_PREFIX + kind


def kebab(name: str) -> str:
    """``FourEyesViolation`` -> ``four-eyes-violation`` (how an error class names its problem type)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


NOT_FOUND_PROBLEM = problem_urn("not-found")
REQUEST_VALIDATION_PROBLEM = problem_urn("request-validation")


# Control characters no stored text may hold (tab and line breaks excepted): PostgreSQL refuses
# NUL in text, and the others hide or rewrite what a reviewer reads.
_CONTROL_CHARACTERS = frozenset(chr(c) for c in range(32)) - {"\t", "\n", "\r"}


def control_character(text: str) -> str | None:
    """The first forbidden control character of ``text`` as ``U+XXXX``, or None."""
    bad = next((ch for ch in text if ch in _CONTROL_CHARACTERS), None)
    return None if bad is None else f"U+{ord(bad):04X}"
