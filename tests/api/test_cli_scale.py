"""``exitwise solve|calibrate --engine stream``: datasets, --where, JSON summaries, bad input writes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies.canonical import verify_content_hash
from exitwise.policies.schema import validate_document
from tests.calibration.test_scale_dataset import DAYS, write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("scale-cli")
    logs = synthetic_logs(12_000, 3, 4, segments={"region": 3}, seed=3)
    files = write_dataset(logs, d / "ds")
    write_card(logs.card, d / "card.json")
    return {"dir": d, "ds": d / "ds", "card": d / "card.json", "logs": logs, "files": files}


def test_solve_streams_a_partitioned_dataset(cli: Any, data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    res = cli("solve", data["ds"], "--card", data["card"], "--out", out, "--engine", "stream", "--eps", "0.03",
              "--segment-key", "region", "--where", f"day >= '{DAYS[1]}'", "--batch-rows", "500",
              "--sample-rows", "3000", "--json")
    assert res.code == 0, res.err
    summary = res.json()
    doc = json.loads(out.read_text())
    validate_document(doc)
    assert verify_content_hash(doc)
    kept = sum(rows.size for path, rows in data["files"].items() if DAYS[0] not in path)
    assert doc["data"]["rows"]["total"] == kept and doc["data"]["where"] == f"day >= '{DAYS[1]}'"
    assert doc["guarantee"]["split"]["method"] == "hash"
    assert doc["guarantee"]["split"]["choose"] + doc["guarantee"]["split"]["certify"] == kept
    assert summary["content_hash"] == doc["content_hash"] and summary["certified"] == doc["guarantee"]["certified"]
    assert summary["passes"]["sample"]["rows"] == kept
    assert summary["passes"]["certify"]["rows"] == doc["guarantee"]["split"]["certify"]
    human = cli("solve", data["ds"], "--card", data["card"], "--out", tmp_path / "p2.json", "--engine", "stream",
                "--eps", "0.03", "--segment-key", "region", "--where", f"day >= '{DAYS[1]}'", "--batch-rows", "500",
                "--sample-rows", "3000")
    assert human.code == 0 and "pass sample:" in human.out and "rows/s" in human.out
    assert json.loads((tmp_path / "p2.json").read_text())["content_hash"] == doc["content_hash"]


def test_a_bad_row_in_the_dataset_fails_with_one_line_and_writes_nothing(cli: Any, data: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    files = write_dataset(data["logs"], ds)
    last = sorted(files)[-1]
    rows = files[last]
    bad: ExitLogs = data["logs"].take(rows)
    z = bad.logits.copy()
    z[-1, 0, 0] = np.nan
    write_logs(ExitLogs(logits=z, card=bad.card, labels=bad.labels, segments=bad.segments,
                        request_ids=bad.request_ids, ts=bad.ts), last)
    out = tmp_path / "policy.json"
    res = cli("solve", ds, "--card", data["card"], "--out", out, "--engine", "stream", "--batch-rows", "300")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and last in lines[0] and f"row {rows.size - 1} " in lines[0] and "NaN" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--engine", "stream", "--test", "x.parquet"], "--test is not available"),
    (["--where", "day = '1'"], "--where filters the partitions"),
    (["--engine", "stream", "--where", "region = 'a'"], "'region' is not a partition column"),
    (["--engine", "stream", "--where", "day >"], "ends too early"),
    (["--engine", "stream", "--risk", "sequence_disagreement"], "give --group-column"),
    (["--engine", "warp"], "--engine 'warp'"),
    (["--engine", "stream", "--master", "local[2]"], "--master is Spark's"),
])
def test_engine_options_are_checked(cli: Any, data: dict[str, Any], tmp_path: Path, args: list[str],
                                    says: str) -> None:
    out = tmp_path / "p.json"
    res = cli("solve", data["ds"], "--card", data["card"], "--out", out, *args)
    assert res.code == 2 and says in res.err and not out.exists()


def test_the_memory_engine_points_a_directory_to_the_stream_engine(cli: Any, data: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    res = cli("solve", data["ds"], "--card", data["card"], "--out", tmp_path / "p.json")
    assert res.code == 2 and "--engine stream" in res.err


def test_calibrate_streams_a_dataset(cli: Any, data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cal"
    res = cli("calibrate", data["ds"], "--card", data["card"], "--out", out, "--engine", "stream",
              "--sample-rows", "2000", "--json")
    assert res.code == 0, res.err
    payload = res.json()
    assert payload["passes"]["sample"]["rows"] == 12_000 and 0.45 < payload["split"]["fit"] / 12_000 < 0.55
    assert payload["split"]["report"] == 2000 and "temperature_1" in payload["passes"]
    cals = json.loads((out / "calibrators.json").read_text())
    temps = [e["calibrator"].get("temperature") for e in cals["exits"]]
    assert all(t is not None and 1.0 < t < 3.0 for t in temps)  # the synthetic early exits are over-confident
    assert (out / "reliability.png").stat().st_size > 0
    res = cli("calibrate", data["ds"], "--card", data["card"], "--out", out, "--engine", "stream",
              "--report-logs", data["card"])
    assert res.code == 2 and "--report-logs is not available" in res.err
