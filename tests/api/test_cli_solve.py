"""``exitwise solve`` / ``exitwise evaluate``: files, summary, --json, bad input (exit code 2, one line)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from exitwise.api.cli import main
from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.rule import CompiledPolicy
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies.canonical import verify_content_hash
from exitwise.policies.schema import validate_document


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("solve-cli")
    logs = synthetic_logs(6000, n_exits=3, n_classes=4, segments={"region": 3}, seed=1)
    write_logs(logs, d / "logs.parquet")
    write_logs(synthetic_logs(3000, n_exits=3, n_classes=4, segments={"region": 3}, seed=2), d / "test.parquet")
    write_logs(dataclasses.replace(logs, labels=None), d / "unlabelled.npz")
    write_card(logs.card, d / "card.json")
    card = json.loads((d / "card.json").read_text())
    card["exits"][2]["cost"] = card["exits"][0]["cost"] / 2
    (d / "bad_card.json").write_text(json.dumps(card))
    return {"dir": d, "logs": d / "logs.parquet", "test": d / "test.parquet", "unlabelled": d / "unlabelled.npz",
            "card": d / "card.json", "bad_card": d / "bad_card.json"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([*argv])
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out, err


def test_solve_writes_a_valid_policy_and_prints_the_summary(capsys, files, tmp_path):
    out = tmp_path / "policy.json"
    code, stdout, err = run(capsys, "solve", str(files["logs"]), "--card", str(files["card"]), "--eps", "0.03",
                            "--segment-key", "region", "--segment-budget", "region_0=0.05", "--out", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    validate_document(doc)
    assert verify_content_hash(doc)
    assert doc["guarantee"]["certified"] and doc["guarantee"]["split"]["seed"] == 0
    assert set(doc["guarantee"]["segments"]) == {"__all__", "region_0"}
    assert doc["thresholds"]["default"] is None and set(doc["thresholds"]) >= {"region_0", "region_1", "region_2"}
    assert set(doc["expected"]["baselines"]) >= {"full_depth", "global_threshold", "calm", "per_exit"}
    assert doc["expected"]["curve"] and doc["calibration"]["exits"][0]["after"]["ece"] >= 0
    assert doc["data"]["fingerprint"].startswith("sha256:")
    CompiledPolicy.from_document(doc)
    assert "certified" in stdout and "CALM" in stdout and "per-exit" in stdout and "certify split" in stdout
    assert list(tmp_path.iterdir()) == [out]  # no temp files left behind


def test_solve_json_on_test_logs_then_evaluate(capsys, files, tmp_path):
    out = tmp_path / "p.json"
    code, stdout, err = run(capsys, "solve", str(files["logs"]), "--card", str(files["card"]), "--risk",
                            "induced_error", "--eps", "0.03", "--test", str(files["test"]), "--out", str(out),
                            "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["evaluated_on"].startswith("test logs")
    assert summary["certified"] and summary["upper_bound"] <= 0.03
    assert set(summary["baselines"]) == {"full_depth", "global_threshold", "calm", "per_exit", "oracle",
                                         "per_sample_oracle"}
    code, stdout, err = run(capsys, "evaluate", str(out), str(files["test"]), "--card", str(files["card"]), "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    for key in ("compute_fraction", "risk", "disagreement", "induced_error", "segments", "batch_compute_fraction"):
        assert key in ev
    assert ev["risk_type"] == "induced_error"
    assert ev["risk"] == pytest.approx(summary["solution"]["risk"])
    assert ev["compute_fraction"] == pytest.approx(summary["solution"]["compute_fraction"])
    assert set(ev["segments"]["region"]) == {"region_0", "region_1", "region_2"}
    code, stdout, err = run(capsys, "evaluate", str(out), str(files["test"]), "--card", str(files["card"]))
    assert code == 0 and "compute fraction" in stdout


def test_split_fraction_and_families_are_options_and_recorded(capsys, files, tmp_path):
    out = tmp_path / "policy.json"
    code, stdout, err = run(capsys, "solve", str(files["logs"]), "--card", str(files["card"]), "--eps", "0.03",
                            "--choose-fraction", "0.25", "--family", "shared", "--family", "per_exit",
                            "--no-baselines", "--out", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    split = doc["guarantee"]["split"]
    n = split["choose"] + split["certify"]
    assert split["choose"] == round(0.25 * n) and doc["data"]["rows"]["total"] == n
    sel = doc["solver"]["selection"]
    assert [c["family"] for c in sel["candidates"]] == ["per_exit", "shared"]
    assert doc["solver"]["family"] == sel["chosen"] in {"shared", "per_exit"}
    assert f"policy family: {sel['chosen']}" in " ".join(stdout.split())
    scores = {c["family"]: c["oof_compute_fraction"] for c in sel["candidates"]}
    assert sel["chosen"] == ("shared" if scores["shared"] < scores["per_exit"] - 0.01 else "per_exit")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eps", "0"], "--eps must be in (0, 1)"),
        (["--eps", "1.2"], "--eps must be in (0, 1)"),
        (["--delta", "1"], "--delta must be in (0, 1)"),
        (["--segment-key", "planet"], "unknown segment column 'planet'"),
        (["--segment-key", "region", "--segment-budget", "region_9=0.01"], "no rows have segment value 'region_9'"),
        (["--segment-key", "region", "--segment-budget", "region_0"], "expected SEGMENT=EPS"),
        (["--forbid-class", "unicorn"], "--forbid-class 'unicorn' is not a class"),
        (["--max-exit", "7"], "--max-exit 7 is out of range"),
        (["--shadow-rate", "2"], "--shadow-rate must be in [0, 1]"),
        (["--choose-fraction", "1.5"], "the choose fraction must be in (0, 1), got 1.5"),
        (["--family", "per_neuron"], "unknown policy family 'per_neuron'"),
        (["--family", "per_class_segment"], "policy family 'per_class_segment' needs --segment-key"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, files, tmp_path, args, message):
    out = tmp_path / "p.json"
    code, stdout, err = run(capsys, "solve", str(files["logs"]), "--card", str(files["card"]), "--out", str(out),
                            *args)
    assert code == 2
    assert message in err.replace("\n", " ")
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()


def test_bad_files_exit_2(capsys, files, tmp_path):
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "solve", str(files["logs"]), "--card", str(files["bad_card"]), "--out", str(out))
    assert code == 2 and "costs must strictly increase" in err.replace("\n", " ")
    code, _, err = run(capsys, "solve", str(files["unlabelled"]), "--card", str(files["card"]), "--risk",
                       "induced_error", "--out", str(out))
    assert code == 2 and "needs labels" in err.replace("\n", " ")
    code, _, err = run(capsys, "solve", str(files["logs"]), "--card", str(files["card"]), "--risk", "vibes",
                       "--out", str(out))
    assert code == 2 and "unknown risk" in err
    (tmp_path / "junk.json").write_text("{not json")
    code, _, err = run(capsys, "evaluate", str(tmp_path / "junk.json"), str(files["logs"]), "--card",
                       str(files["card"]))
    assert code == 2 and "not JSON" in err
    assert "Traceback" not in err and not out.exists()
