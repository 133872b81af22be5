"""The bundled corrupted Fashion-MNIST logs: a row-for-row corrupted copy of ``test.parquet``.

Read with the project's own reader and card: same schema, rows, ids, labels and segments as
``test.parquet``, timestamps in the later window, accuracy as ``metadata.json`` records it. The
recorded command names the script and only options its argparse defines (read from the
script's source, so no torch is needed), and the docs show that command.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logs import ExitLogs

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "fashion_mnist"


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads((DATA / "metadata.json").read_text())


@pytest.fixture(scope="module")
def logs() -> tuple[ExitLogs, ExitLogs]:
    card = load_card(DATA / "card.json")
    return load_logs(DATA / "test.parquet", card), load_logs(DATA / "corrupted.parquet", card)


def script_options(path: Path) -> dict[str, Any]:
    """``--option`` -> its literal default (None if none) of every ``add_argument`` call in ``path``."""
    options: dict[str, Any] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flag = ast.literal_eval(node.args[0])
            default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
            try:
                options[flag] = None if default is None else ast.literal_eval(default)
            except ValueError:  # a computed default (a path): not a literal
                options[flag] = None
    return options


def command_options(command: str) -> tuple[str, dict[str, str]]:
    """(script path, {--option: value}) of ``python SCRIPT --opt value ...``."""
    words = shlex.split(command)
    assert words[0] == "python" and len(words) % 2 == 0, command
    pairs = words[2:]
    assert all(w.startswith("--") for w in pairs[::2]), command
    return words[1], dict(zip(pairs[::2], pairs[1::2], strict=True))


def test_same_schema_rows_and_segments_as_test(logs: tuple[ExitLogs, ExitLogs]) -> None:
    clean, bad = logs
    assert pq.read_schema(DATA / "corrupted.parquet").equals(pq.read_schema(DATA / "test.parquet"))
    assert bad.logits.shape == clean.logits.shape == (10_000, 5, 10)
    assert np.array_equal(bad.request_ids, clean.request_ids)
    assert np.array_equal(bad.labels, clean.labels)
    assert set(bad.segments) == set(clean.segments) == {"capture", "region"}
    for name in clean.segments:
        assert np.array_equal(bad.segments[name].values(), clean.segments[name].values()), name
    # A corrupted copy, not the same logits.
    assert not np.array_equal(bad.logits, clean.logits)


def test_timestamps_in_the_later_window(logs: tuple[ExitLogs, ExitLogs], meta: dict[str, Any]) -> None:
    clean, bad = logs
    lo, hi = (np.datetime64(t.rstrip("Z")) for t in meta["corrupted"]["time_window"])
    assert lo >= np.datetime64(meta["data"]["time_windows"]["test"][1].rstrip("Z"))
    assert bad.ts.min() >= lo and bad.ts.max() < hi
    assert bad.ts.min() > clean.ts.max()
    assert np.all(np.diff(bad.ts) >= np.timedelta64(0))


def test_accuracy_matches_metadata_and_degrades(logs: tuple[ExitLogs, ExitLogs], meta: dict[str, Any]) -> None:
    entry = meta["corrupted"]
    measured = {name: (lg.logits.argmax(axis=2) == lg.labels[:, None]).mean(axis=0)
                for name, lg in zip(("clean", "corrupted"), logs, strict=True)}
    for name, acc in measured.items():
        np.testing.assert_allclose(acc, entry["accuracy"][name]["accuracy"], atol=1e-4, err_msg=name)
    assert entry["accuracy"]["clean"] == meta["accuracy"]["test"]
    drop = measured["clean"] - measured["corrupted"]
    np.testing.assert_allclose(drop, entry["accuracy_drop"], atol=2e-4)
    # The model still works but clearly degrades, the shallow exits more than the last.
    assert 0.05 <= drop[-1] <= 0.15
    assert drop[:2].min() > drop[-1]


def test_recorded_command_is_an_option_set_of_the_script(meta: dict[str, Any]) -> None:
    entry = meta["corrupted"]
    script, opts = command_options(entry["command"])
    assert script == entry["script"] and (ROOT / script).is_file()
    defined = script_options(ROOT / script)
    assert set(opts) <= set(defined), set(opts) - set(defined)
    recorded = {"--seed": entry["seed"], "--noise": entry["noise"], "--contrast-loss": entry["contrast_loss"],
                "--threads": entry["threads"]}
    assert set(opts) == set(recorded)
    for flag, value in recorded.items():
        assert type(value)(opts[flag]) == value, flag
        # The defaults are the committed setting: the script alone reproduces the file.
        assert defined[flag] == value, flag


def test_docs_show_the_command(meta: dict[str, Any]) -> None:
    command = meta["corrupted"]["command"].removeprefix("python ")
    assert command in (ROOT / "docs" / "calibration.md").read_text()


def test_option_parsing_helpers_reject_what_they_should(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text('import argparse\nap = argparse.ArgumentParser()\nap.add_argument("--a", type=int, default=3)\n'
                      'ap.add_argument("--out", default=Path("x"))\n')
    assert script_options(script) == {"--a": 3, "--out": None}
    assert command_options("python s.py --a 4") == ("s.py", {"--a": "4"})
    with pytest.raises(AssertionError):
        command_options("python s.py --a")
    with pytest.raises(AssertionError):
        command_options("python s.py a 4")
