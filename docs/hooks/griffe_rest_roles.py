"""Griffe extension: read the project's reST-flavoured docstrings as Markdown.

The docstrings are written for people first, with a few reST habits that Markdown does not
know. Before mkdocstrings renders a docstring this extension rewrites, outside literal blocks:

- a role, ``:func:`exitwise.calibration.rule.decide``` (also ``:class:``, ``:meth:``,
  ``:mod:``, ``:attr:``, ...), into inline code that links to the object when the API
  reference documents it (an optional cross-reference: no warning when it does not);
  ``~`` shows the last name only, and ``title <target>`` shows the title;
- subscripts such as ``tau[s][k]``, which Markdown would read as a reference link, into
  escaped brackets;
- "DESIGN.md", the design notes the docstrings were first written against, into "the design
  contract": that is the site's Design contract page (``docs/design.md``), which replaces it;
- a paragraph that ends in ``::`` (or a line that is only ``::``), which introduces an
  indented literal block in reST, into a plain ``:`` (Markdown already reads the indented
  block that follows as code).

Double-backtick literals need nothing: Markdown reads them as inline code too.
The Python sources are not changed; only what the documentation shows is.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|obj|data|exc|const):`(?P<body>[^`]+)`")
CODE_SPAN = re.compile(r"(`+[^`]*?`+|<code>.*?</code>)")
TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")


class RestRoles(griffe.Extension):
    """Rewrite every loaded object's docstring before it is parsed (see the module docstring)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, lambda target: resolve(obj, target))


def rewrite(text: str, resolve_target: Callable[[str], str | None] | None = None) -> str:
    """The Markdown reading of one docstring; ``resolve_target(name)`` gives a full path or None."""
    text = text.replace("DESIGN.md", "the design contract")
    out: list[str] = []
    opener_indent = 0  # indent of the line that ended in "::"
    pending = False  # the last paragraph ended in "::": an indented literal block may follow
    in_literal = False
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if in_literal:
            if not stripped or indent > opener_indent:
                out.append(line)
                continue
            in_literal = False
        if pending and stripped:
            pending = False
            if indent > opener_indent:
                in_literal = True
                out.append(line)
                continue
        if stripped == "::":
            pending, opener_indent = True, indent
            continue
        if stripped.endswith("::"):
            line = line.rstrip()[:-1]
            pending, opener_indent = True, indent
        out.append(_prose(line, resolve_target))
    return "\n".join(out)


def _prose(line: str, resolve_target: Callable[[str], str | None] | None) -> str:
    """Roles to code; outside code spans, ``a[s][k]`` (an index, not a reference link) escaped."""
    line = ROLE.sub(lambda m: _code(m["body"], resolve_target), line)
    parts = CODE_SPAN.split(line)  # odd items are code spans, kept as they are
    return "".join(part if i % 2 else part.replace("][", "]\\[") for i, part in enumerate(parts))


def _code(body: str, resolve_target: Callable[[str], str | None] | None) -> str:
    match = TITLED.match(body)
    title, target = (match["title"], match["target"]) if match else (None, body)
    short = target.startswith("~")
    target = target.lstrip("~.")
    shown = title or (target.rsplit(".", 1)[-1] if short else target)
    path = resolve_target(target) if resolve_target is not None else None
    if path is None:
        return f"`{shown}`"
    return (f'<autoref identifier="{html.escape(path)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")


def resolve(obj: griffe.Object, target: str) -> str | None:
    """Full path of ``target`` as seen from ``obj``: an absolute ``exitwise.*`` name, or a member
    of an enclosing class, module or package, up to ``exitwise`` itself (so a role written as
    ``calibration.exceptions.ExitwiseError`` finds ``exitwise.calibration.exceptions``); None for
    anything else (shown as plain code)."""
    if target.startswith("exitwise."):
        return target
    first = target.split(".", 1)[0]
    scope: Any = obj
    while scope is not None:
        if (scope.is_class or scope.is_module) and first in scope.members:
            return f"{scope.path}.{target}"  # at the top, ``calibration.x`` written before the namespace
        scope = scope.parent
    return None
