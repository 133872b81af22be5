"""``exitwise calibrate``: files, table, --json, bad input (exit code 2, one line, no traceback)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exitwise.api.cli import main
from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.synthetic import synthetic_logs

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "tests" / "fixtures" / "digits"
EXITWISE = Path(sys.executable).with_name("exitwise")
METRIC_KEYS = {"accuracy", "nll", "brier", "ece", "ece_mass", "mce"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("calibrate-cli")
    logs = synthetic_logs(3000, n_exits=4, n_classes=5, seed=1)
    write_logs(logs, d / "logs.parquet")
    write_logs(synthetic_logs(1000, n_exits=4, n_classes=5, seed=2), d / "test.parquet")
    write_logs(dataclasses.replace(logs, labels=None), d / "unlabelled.npz")
    write_card(logs.card, d / "card.json")
    return {"dir": d, "logs": d / "logs.parquet", "test": d / "test.parquet",
            "unlabelled": d / "unlabelled.npz", "card": d / "card.json"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """The console script's entry point in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", *argv])
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out, err


def test_table_and_files_on_the_digits_fixture(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, str(DIGITS / "logs.parquet"), "--card", str(DIGITS / "card.json"),
                         "--out", str(out_dir))
    assert code == 0, err
    for name in ("pca2", "pca5", "pca12", "pca64"):
        assert name in out
    assert "T=" in out and "\u2192" in out and "ECE-mass" in out
    assert "fit 898 rows, report 899 rows" in out
    cals = json.loads((out_dir / "calibrators.json").read_text())
    assert cals["model"] == "digits-pca-logreg" and cals["method"] == "temperature"
    assert [e["calibrator"]["type"] for e in cals["exits"]] == ["temperature"] * 4
    assert all(e["calibrator"]["temperature"] > 0 for e in cals["exits"])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    exit0 = metrics["exits"][0]
    assert set(exit0["before"]) == set(exit0["after"]) == METRIC_KEYS
    assert sum(exit0["reliability"]["after"]["width"]["count"]) == 899
    assert (out_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out_dir.iterdir()) == ["calibrators.json", "metrics.json", "reliability.png"]


def test_json_prints_exactly_one_object(capsys, tmp_path, synth):
    code, out, err = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(tmp_path),
                         "--json", "--fit-fraction", "0.3", "--seed", "7", "--bins", "10")
    assert code == 0, err
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["method"] == "temperature" and doc["out"] == str(tmp_path)
    assert doc["split"]["fit"] == 900 and doc["split"]["report"] == 2100 and doc["n_bins"] == 10
    assert [e["name"] for e in doc["exits"]] == ["stage1", "stage2", "stage3", "stage4"]
    for e in doc["exits"]:
        assert e["temperature"] > 0 and set(e["before"]) == set(e["after"]) == METRIC_KEYS
    # the synthetic exits are over-confident: temperature scaling lowers NLL and ECE at the first exit
    first = doc["exits"][0]
    assert first["temperature"] > 1.2
    assert first["after"]["nll"] < first["before"]["nll"] and first["after"]["ece"] < first["before"]["ece"]
    # what was printed is what was written
    assert json.loads((tmp_path / "metrics.json").read_text())["exits"][0]["after"] == first["after"]


def test_platt_identity_report_logs_and_unlabelled(capsys, tmp_path, synth):
    code, out, _ = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(tmp_path / "p"),
                       "--method", "platt", "--report-logs", str(synth["test"]), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["split"]["fit"] == 3000 and doc["split"]["report"] == 1000 and doc["split"]["fit_fraction"] is None
    assert all(len(e["coef"]) == 3 and "intercept" in e for e in doc["exits"])
    code, out, _ = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(tmp_path / "i"),
                       "--method", "identity", "--json")
    assert code == 0
    doc = json.loads(out)
    assert all(e["calibrator"] == {"type": "identity"} and e["before"] == e["after"] for e in doc["exits"])
    code, out, _ = run(capsys, str(synth["unlabelled"]), "--card", str(synth["card"]), "--out", str(tmp_path / "u"),
                       "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["target"] == "final" and doc["exits"][-1]["calibrator"] == {"type": "identity"}


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "isotonic"], "--method must be one of temperature, platt, identity"),
        (["--fit-fraction", "1.5"], "--fit-fraction must be strictly between 0 and 1"),
        (["--bins", "0"], "--bins must be a positive integer"),
        (["--jobs", "0"], "--jobs must be a positive integer or -1"),
        (["--target", "labels", "--report-logs", "{unlabelled}"], "have no labels"),
        (["--report-logs", "{missing}"], "report logs .*missing.parquet: no such file"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, tmp_path, synth, extra, match):
    extra = [x.format(unlabelled=synth["unlabelled"], missing=synth["dir"] / "missing.parquet") for x in extra]
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(out_dir), *extra)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing half-written


def test_bad_logs_and_card(capsys, tmp_path, synth):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    wrong_card = tmp_path / "card3.json"
    card = json.loads(synth["card"].read_text())
    card["exits"] = card["exits"][:3]
    wrong_card.write_text(json.dumps(card))
    for argv in (
        [str(garbage), "--card", str(synth["card"])],
        [str(synth["logs"]), "--card", str(wrong_card)],
        [str(synth["logs"]), "--card", str(tmp_path / "nope.json")],
    ):
        code, out, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
        assert code == 2, err
        assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_console_script_bad_input_no_traceback(tmp_path, synth):
    """The real ``exitwise`` executable: NaN logits -> exit code 2, one line naming the problem."""
    logs = synthetic_logs(200, n_exits=4, n_classes=5, seed=1)
    bad = logs.logits.copy()
    bad[5, 1, 2] = np.nan
    np.savez(tmp_path / "bad.npz", logits=bad, labels=logs.labels)
    proc = subprocess.run(
        [str(EXITWISE), "calibrate", str(tmp_path / "bad.npz"), "--card", str(synth["card"]),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert "bad.npz" in lines[0] and "nan" in lines[0].lower()
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_reports_extra_is_named_before_any_work(capsys, tmp_path, synth, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [reports] extra were not installed
    monkeypatch.delitem(sys.modules, "exitwise.policies.figures", raising=False)
    code, out, err = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(tmp_path / "out"))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "'matplotlib'" in err and "pip install 'exitwise[reports]'" in err
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for opt in ("--card", "--out", "--method", "--fit-fraction", "--seed", "--bins", "--target", "--report-logs",
                "--jobs", "--json"):
        assert opt in out
    assert "reliability.png" in out


def test_unwritable_output_is_one_line_naming_the_path(capsys, tmp_path, synth):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out, err = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(blocker / "out"))
    assert code == 1, err
    assert out == "" and err.startswith("error: cannot use ") and str(blocker) in err.replace("\n", "")
    assert "Traceback" not in err and "internal error" not in err
    assert blocker.read_text() == "not a directory"


def test_tables_on_a_captured_stdout_are_not_cut_at_80_columns(capsys):
    from exitwise.api.cli.output import stdout_console

    assert stdout_console().width == 160


def test_solve_help_states_the_split_defaults(capsys):
    from exitwise.calibration.splits import SplitSpec

    with pytest.raises(SystemExit):
        main(["solve", "--help"])
    help_text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert f"at most {SplitSpec.max_choose:,} rows" in help_text
    assert "Default: 0.3 up to 30,000 rows" in help_text and "--family" in help_text


def test_os_errors_without_a_path_stay_internal_errors(capsys, monkeypatch, tmp_path, synth):
    def boom(*_a, **_k):
        raise ConnectionRefusedError(111, "Connection refused")  # an OSError that names no path

    monkeypatch.setattr("exitwise.api.cli.calibrate.load_card", boom)
    code, out, err = run(capsys, str(synth["logs"]), "--card", str(synth["card"]), "--out", str(tmp_path / "o"))
    assert code == 1 and out == ""
    assert err.startswith("internal error: ConnectionRefusedError") and "cannot use" not in err
