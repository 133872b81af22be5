"""``--where``: a filter on the hive partitions of a dataset (``date >= '2026-11-01' and model = 'a'``).

A small grammar, parsed here and never evaluated as code:

    filter  := clause ("and" clause)*
    clause  := NAME op literal | NAME "in" "(" literal ("," literal)* ")"
    op      := "=" | "==" | "!=" | "<" | "<=" | ">" | ">="
    literal := 'single-quoted string' | "double-quoted string" | number

Partition values are strings (``date=2026-11-01`` in a directory name), compared as strings
with a quoted literal (ISO dates order correctly) and as numbers with a numeric one. The
filter selects whole files, so row numbers in error messages stay the rows of the file.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from exitwise.calibration.exceptions import InputError

__all__ = ["Clause", "PartitionFilter", "parse_where"]

MAX_WHERE_CHARS = 4096
_TOKEN = re.compile(r"""\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?P<num>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
                     |(?P<op><=|>=|==|!=|=|<|>|\(|\)|,)|(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*))""", re.X)
_OPS: dict[str, Callable[[object, object], bool]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}


@dataclass(frozen=True)
class Clause:
    """``column op value`` (``in``: the value is a tuple of literals)."""

    column: str
    op: str
    value: str | float | tuple[str | float, ...]

    def matches(self, partition: str) -> bool:
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        if self.op == "in":
            return any(_compare("==", partition, v, self.column) for v in values)
        return _compare(self.op, partition, values[0], self.column)

    def __str__(self) -> str:
        if isinstance(self.value, tuple):
            return f"{self.column} in ({', '.join(_lit(v) for v in self.value)})"
        return f"{self.column} {self.op} {_lit(self.value)}"


def _lit(v: str | float) -> str:
    return repr(v) if isinstance(v, str) else f"{v:g}"


def _compare(op: str, partition: str, literal: str | float, column: str) -> bool:
    if isinstance(literal, str):
        return _OPS[op](partition, literal)
    try:
        number = float(partition)
    except ValueError:
        raise InputError(f"--where: partition {column}={partition!r} is not a number, "
                         f"but the filter compares it with the number {literal:g}; quote the literal") from None
    return _OPS[op](number, literal)


@dataclass(frozen=True)
class PartitionFilter:
    """The parsed ``--where``: every clause must hold (an empty filter keeps every file)."""

    clauses: tuple[Clause, ...] = ()
    text: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.column for c in self.clauses))

    def check_columns(self, partitions: set[str], where: str) -> None:
        """Every filtered column must be a partition column of the dataset (InputError otherwise)."""
        for column in self.columns:
            if column not in partitions:
                known = ", ".join(sorted(partitions)) or "none (no key=value directories)"
                raise InputError(f"--where {self.text!r}: {column!r} is not a partition column of {where}; "
                                 f"--where filters whole files by their partition directories; partitions: {known}")

    def keeps(self, partition: Mapping[str, str]) -> bool:
        return all(c.matches(partition[c.column]) for c in self.clauses)

    def to_json(self) -> str | None:
        return self.text or None


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise InputError(f"--where {text!r}: cannot parse at character {pos + 1}: {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _literal(kind: str, value: str, text: str) -> str | float:
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    if kind == "num":
        number = float(value)
        if not math.isfinite(number):
            raise InputError(f"--where {text!r}: {value} is not a finite number")
        return number
    raise InputError(f"--where {text!r}: expected a quoted string or a number, got {value!r}")


def parse_where(text: str | None) -> PartitionFilter:
    """Parse ``--where``; InputError naming the position of what does not parse."""
    if text is None or not text.strip():
        return PartitionFilter()
    if len(text) > MAX_WHERE_CHARS:
        raise InputError(f"--where is {len(text)} characters long; at most {MAX_WHERE_CHARS}")
    toks = _tokens(text)
    clauses: list[Clause] = []
    i = 0

    def take() -> tuple[str, str]:
        nonlocal i
        if i >= len(toks):
            raise InputError(f"--where {text!r}: ends too early")
        i += 1
        return toks[i - 1]

    while True:
        kind, name = take()
        if kind != "name" or name.lower() in ("and", "in"):
            raise InputError(f"--where {text!r}: expected a partition column name, got {name!r}")
        kind, op = take()
        if kind == "name" and op.lower() == "in":
            if take() != ("op", "("):
                raise InputError(f"--where {text!r}: expected '(' after {name} in")
            values = []
            while True:
                values.append(_literal(*take(), text))
                sep = take()
                if sep == ("op", ")"):
                    break
                if sep != ("op", ","):
                    raise InputError(f"--where {text!r}: expected ',' or ')' in the list of {name}, got {sep[1]!r}")
            clauses.append(Clause(name, "in", tuple(values)))
        elif kind == "op" and op in _OPS:
            clauses.append(Clause(name, op, _literal(*take(), text)))
        else:
            raise InputError(f"--where {text!r}: expected an operator (= != < <= > >= in) after {name}, got {op!r}")
        if i == len(toks):
            break
        kind, word = take()
        if kind != "name" or word.lower() != "and":
            raise InputError(f"--where {text!r}: expected 'and' between clauses, got {word!r}")
    return PartitionFilter(clauses=tuple(clauses), text=text.strip())
