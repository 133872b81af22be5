"""Model cards (design contract, "The model card"): load a JSON or YAML card, check every field, write one.

A card names the model, its exits with cumulative costs, the classes (or, for token-level logs
of a language model, the ``vocab_size``) and the log columns (label, request id, segments,
group and position). :func:`load_card` reads it, :func:`card_from_dict` checks it
and :class:`~exitwise.calibration.exceptions.CardError` names the file and the field that is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from exitwise.calibration.atomic import atomic_path
from exitwise.calibration.exceptions import CardError
from exitwise.calibration.logfiles.forms import (
    EXIT_COLUMN,
    EXIT_RE,
    LOGITS_COLUMN,
    TOKEN_ARRAYS,
    TOKEN_EXIT_RE,
    TS_COLUMN,
)
from exitwise.calibration.logs import MAX_VOCAB, ExitSpec, ModelCard

__all__ = ["card_from_dict", "card_to_dict", "load_card", "write_card"]

_CARD_FIELDS = (
    "model",
    "version",
    "exits",
    "classes",
    "label_column",
    "id_column",
    "segment_columns",
    "vocab_size",
    "group_column",
    "position_column",
    "description",
    "metadata",
)
DEFAULT_GROUP_COLUMN = "sequence_id"  # token cards: the group column when the card names none
DEFAULT_POSITION_COLUMN = "position"


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read a JSON or YAML model card; :class:`CardError` names the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CardError(f"{p}: model card not found") from None
    except IsADirectoryError:
        raise CardError(f"{p}: is a directory, expected a model card file (JSON or YAML)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(f"{p}: cannot read model card: {exc}") from exc
    if not text.strip():
        raise CardError(f"{p}: model card is empty")
    suffix = p.suffix.lower()
    if suffix == ".json":
        data = _parse_json_card(text, p)
    elif suffix in (".yaml", ".yml"):
        data = _parse_yaml_card(text, p)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _parse_yaml_card(text, p)
    return card_from_dict(data, source=str(p))


def _parse_json_card(text: str, p: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _parse_yaml_card(text: str, p: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CardError(f"{p}: invalid YAML{where}: {problem}") from None


def card_from_dict(data: Any, *, source: str = "<card>") -> ModelCard:
    """Build a :class:`ModelCard` from a parsed card, naming the field that is wrong."""
    if not isinstance(data, Mapping):
        raise CardError(f"{source}: a model card must be a mapping (JSON object), got {type(data).__name__}")
    unknown = [key for key in data if key not in _CARD_FIELDS]
    if unknown:
        raise CardError(f"{source}: unknown field {unknown[0]!r}; expected fields: {', '.join(_CARD_FIELDS)}")
    model, version = _card_model(data, source)
    exits = _card_exits(data, source)
    classes = None
    if data.get("classes") is not None:
        raw = data["classes"]
        if not isinstance(raw, list) or not raw:
            raise CardError(f"{source}: field 'classes' must be a non-empty list of class names")
        for j, name in enumerate(raw):
            if isinstance(name, bool) or not isinstance(name, str | int) or name == "":
                raise CardError(f"{source}: field 'classes[{j}]' must be a non-empty string, got {name!r}")
        classes = tuple(str(name) for name in raw)
    label_column = _card_name(data, "label_column", "label", source)
    id_column = _card_name(data, "id_column", "request_id", source)
    raw_segments = data.get("segment_columns")
    segment_columns: tuple[str, ...] = ()
    if raw_segments is not None:
        if not isinstance(raw_segments, list):
            raise CardError(f"{source}: field 'segment_columns' must be a list of column names, got {raw_segments!r}")
        for j, name in enumerate(raw_segments):
            if not isinstance(name, str) or not name:
                raise CardError(f"{source}: field 'segment_columns[{j}]' must be a non-empty string, got {name!r}")
        segment_columns = tuple(raw_segments)
        if len(set(segment_columns)) != len(segment_columns):
            raise CardError(f"{source}: field 'segment_columns' lists a column twice: {list(segment_columns)}")
    reserved = {label_column: "label_column", id_column: "id_column", TS_COLUMN: "the time column"}
    for name in segment_columns:
        if name in reserved or _is_data_column(name):
            raise CardError(f"{source}: field 'segment_columns': {name!r} is already used as a non-segment column")
    if label_column == id_column:
        raise CardError(f"{source}: fields 'label_column' and 'id_column' are both {label_column!r}")
    vocab_size = _card_vocab(data, source)
    group_column = _card_name(data, "group_column", None, source)
    if group_column is None and vocab_size is not None and "group_column" not in data:
        group_column = DEFAULT_GROUP_COLUMN
    position_column = _card_name(data, "position_column", DEFAULT_POSITION_COLUMN, source)
    _check_token_columns(group_column, position_column, reserved, segment_columns, source)
    try:
        return ModelCard(
            model=model,
            exits=exits,
            classes=classes,
            label_column=label_column,
            id_column=id_column,
            segment_columns=segment_columns,
            version=version,
            vocab_size=vocab_size,
            group_column=group_column,
            position_column=position_column,
        )
    except CardError as exc:
        raise CardError(f"{source}: {exc}") from None


def _is_data_column(name: str, *, npz: bool = False) -> bool:
    """A column name some log form uses for logits or top-k data (``npz``: or a top-level NPZ array)."""
    if EXIT_RE.fullmatch(name) or TOKEN_EXIT_RE.fullmatch(name) or name in (EXIT_COLUMN, LOGITS_COLUMN):
        return True
    return npz and name in (*TOKEN_ARRAYS, "labels")


def _card_vocab(data: Mapping[str, Any], source: str) -> int | None:
    value = data.get("vocab_size")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_VOCAB:
        raise CardError(
            f"{source}: field 'vocab_size' must be an integer in 2..{MAX_VOCAB} (the language model's "
            f"vocabulary size), got {value!r}"
        )
    if data.get("classes") is not None:
        raise CardError(
            f"{source}: fields 'classes' and 'vocab_size' exclude each other: give 'classes' (a classifier) "
            "or 'vocab_size' (a language model's token logs)"
        )
    return value


def _check_token_columns(
    group_column: str | None,
    position_column: str,
    reserved: dict[str, str],
    segment_columns: tuple[str, ...],
    source: str,
) -> None:
    """The group and position columns may not be any other column of the logs (nor each other)."""
    for field, name in (("group_column", group_column), ("position_column", position_column)):
        if name is None:
            continue
        if name in reserved:
            raise CardError(f"{source}: field {field!r}: {name!r} is already used as {reserved[name]}")
        if name in segment_columns:
            raise CardError(f"{source}: field {field!r}: {name!r} is already a segment column")
        if _is_data_column(name, npz=True):
            raise CardError(f"{source}: field {field!r}: {name!r} is the name of an exit-log data column or array")
    if group_column == position_column:
        raise CardError(f"{source}: fields 'group_column' and 'position_column' are both {group_column!r}")


def _card_model(data: Mapping[str, Any], source: str) -> tuple[str, str | None]:
    raw = data.get("model")
    version = data.get("version")
    if isinstance(raw, Mapping):
        version = raw.get("version", version)
        raw = raw.get("name")
    if not isinstance(raw, str) or not raw.strip():
        raise CardError(f"{source}: field 'model' must be a non-empty model name, got {raw!r}")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, str | int | float):
            raise CardError(f"{source}: field 'version' must be a string, got {version!r}")
        version = str(version)
    return raw, version


def _card_exits(data: Mapping[str, Any], source: str) -> tuple[ExitSpec, ...]:
    raw = data.get("exits")
    if not isinstance(raw, list) or not raw:
        raise CardError(f"{source}: field 'exits' must be a non-empty list of {{name, cost}} objects, got {raw!r}")
    exits = []
    for k, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise CardError(f"{source}: field 'exits[{k}]' must be an object with 'name' and 'cost', got {item!r}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise CardError(f"{source}: field 'exits[{k}].name' must be a non-empty string, got {name!r}")
        cost = item.get("cost")
        if isinstance(cost, bool) or not isinstance(cost, int | float):
            raise CardError(f"{source}: field 'exits[{k}].cost' must be a number (cumulative cost), got {cost!r}")
        if not np.isfinite(cost) or cost <= 0:
            raise CardError(f"{source}: field 'exits[{k}].cost' must be finite and > 0, got {cost!r}")
        exits.append(ExitSpec(name=name, cost=float(cost)))
    return tuple(exits)


def _card_name(data: Mapping[str, Any], field: str, default: str | None, source: str) -> str | None:
    value = data.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise CardError(f"{source}: field {field!r} must be a non-empty column name, got {value!r}")
    return value


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    """The JSON form of a card (what :func:`load_card` reads)."""
    out: dict[str, Any] = {
        "model": card.model,
        "exits": [{"name": e.name, "cost": e.cost} for e in card.exits],
    }
    if card.version is not None:
        out["version"] = card.version
    if card.classes is not None:
        out["classes"] = list(card.classes)
    out["label_column"] = card.label_column
    out["id_column"] = card.id_column
    out["segment_columns"] = list(card.segment_columns)
    if card.vocab_size is not None:
        out["vocab_size"] = card.vocab_size
    if card.group_column is not None or card.token_level:
        out["group_column"] = card.group_column  # a token card without groups says so (null)
    if card.token_level or card.position_column != DEFAULT_POSITION_COLUMN:
        out["position_column"] = card.position_column
    return out


def write_card(card: ModelCard, path: str | os.PathLike[str]) -> Path:
    """Write ``card`` as JSON (atomically)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(card_to_dict(card), indent=2) + "\n", encoding="utf-8")
    return target

