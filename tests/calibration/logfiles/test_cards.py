"""Model cards: JSON and YAML round trips; every bad field or file names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from small_card import small_card

from exitwise.calibration.exceptions import CardError
from exitwise.calibration.logfiles.cards import card_from_dict, card_to_dict, load_card, write_card


def test_card_json_and_yaml_round_trip(tmp_path):
    card = small_card(version="3")
    path = write_card(card, tmp_path / "card.json")
    assert load_card(path) == card
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card_to_dict(card)))
    assert load_card(tmp_path / "card.yaml") == card
    (tmp_path / "card").write_text(yaml.safe_dump(card_to_dict(card)))  # no extension: JSON, else YAML
    assert load_card(tmp_path / "card") == card
    nested = {**card_to_dict(card), "model": {"name": "m", "version": 4}}
    assert card_from_dict(nested).version == "4"


def _card_error(tmp_path: Path, data, name: str = "card.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(CardError) as info:
        load_card(path)
    assert str(path) in str(info.value)
    return str(info.value)


GOOD_CARD = {"model": "m", "exits": [{"name": "a", "cost": 1.0}, {"name": "b", "cost": 2.0}]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"exits": [{"name": "a", "cost": 2.0}, {"name": "b", "cost": 2.0}]}, "costs must strictly increase"),
        ({"exits": [{"name": "a", "cost": 3.0}, {"name": "b", "cost": 2.0}]}, "exit 1 ('b') cost 2.0 <= exit 0"),
        ({"exits": [{"name": "a", "cost": 1.0}, {"name": "b", "cost": "2"}]}, "field 'exits[1].cost' must be a number"),
        ({"exits": [{"name": "a", "cost": -1.0}, {"name": "b", "cost": 2}]}, "'exits[0].cost' must be finite and > 0"),
        ({"exits": [{"name": "a", "cost": 1.0}, {"cost": 2}]}, "field 'exits[1].name'"),
        ({"exits": [{"name": "a", "cost": 1.0}]}, "needs at least 2 exits"),
        ({"exits": [{"name": "a", "cost": 1.0}, {"name": "a", "cost": 2}]}, "exit names must be unique"),
        ({"exits": "a,b"}, "field 'exits' must be a non-empty list"),
        ({"model": ""}, "field 'model'"),
        ({"classes": ["x", "x"]}, "class names must be unique"),
        ({"classes": ["x", None]}, "field 'classes[1]'"),
        ({"segment_columns": "region"}, "field 'segment_columns' must be a list"),
        ({"segment_columns": ["label"]}, "'label' is already used"),
        ({"label_column": 3}, "field 'label_column'"),
        ({"segment_column": ["region"]}, "unknown field 'segment_column'"),
    ],
)
def test_bad_card_fields(tmp_path, change, expected):
    assert expected in _card_error(tmp_path, {**GOOD_CARD, **change})


def test_bad_card_files(tmp_path):
    assert "invalid JSON at line 2" in _card_error(tmp_path, '{"model": "m",\n "exits": [}')
    assert "invalid YAML at line" in _card_error(tmp_path, "model: [unclosed\n", "card.yaml")
    assert "model card is empty" in _card_error(tmp_path, "  \n")
    assert "must be a mapping" in _card_error(tmp_path, "[1, 2]")
    with pytest.raises(CardError, match="model card not found"):
        load_card(tmp_path / "nope.json")

