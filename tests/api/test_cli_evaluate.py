"""Issue 12 (4c): ``exitwise evaluate`` shows exact intervals and the policy's risk budgets;
``--fail-over-budget`` exits 3 when a constrained segment's realised risk is over its budget.

Everything through the real console script (``cli``) on the bundled Fashion-MNIST exit logs:
the policy ``make demo`` solves (disagreement <= 1 %, every capture value <= 2 %), on the test
logs and on their corrupted copy (later traffic whose images got worse), and copies of it
edited and re-hashed: studio samples answered at the first exit (far over budget), every
sample at full depth (risk 0), and the guarantee on ``induced_error`` for logs without labels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from exitwise.api.cli import main
from exitwise.calibration.evaluate import risk_interval
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.policies.canonical import with_content_hash

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "fashion_mnist"
CAL, TEST, CARD = DATA / "calibration.parquet", DATA / "test.parquet", DATA / "card.json"
CORRUPTED = DATA / "corrupted.parquet"  # the same test rows, images with less contrast and some noise


def _edited(doc: dict[str, Any], path: Path, **changes: Any) -> Path:
    path.write_text(json.dumps(with_content_hash({**doc, **changes})))
    return path


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evaluate-cli")
    policy = d / "fashion.json"
    with pytest.raises(SystemExit) as exc:
        main(["solve", str(CAL), "--card", str(CARD), "--risk", "disagreement", "--eps", "0.01", "--delta", "0.05",
              "--segment-key", "capture", "--segment-budget", "*=0.02", "--no-baselines", "--out", str(policy),
              "--json"])
    assert exc.value.code in (0, None)
    doc = json.loads(policy.read_text())
    assert set(doc["guarantee"]["segments"]) == {"__all__", "phone", "studio"}
    n_classes, n_early = len(doc["classes"]), len(doc["exits"]) - 1
    studio_first = [[0.0] * n_classes] + [None] * (n_early - 1)  # every studio sample answers at stage1
    unlabelled = d / "unlabelled.npz"
    logs = load_logs(TEST, load_card(CARD))
    write_logs(dataclasses.replace(logs, labels=None), unlabelled)
    return {
        "policy": policy,
        "studio_first": _edited(doc, d / "studio_first.json", thresholds={**doc["thresholds"], "studio": studio_first}),
        "full_depth": _edited(doc, d / "full_depth.json", thresholds={k: None for k in doc["thresholds"]}),
        "induced": _edited(doc, d / "induced.json", guarantee={**doc["guarantee"], "risk": "induced_error"}),
        "unlabelled": unlabelled,
    }


BUDGETS = "risk budgets of the policy"


def _row(out: str, first: str, after: str = "") -> list[str]:
    """The cells of the first table row (rich box drawing) after the text ``after`` whose first cell is ``first``."""
    for line in out[out.index(after):].splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) > 1 and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def _over_line(name: str, b: dict[str, Any], sig: bool) -> str:
    lo, hi = b["risk_interval"]
    return (f"over budget: {name}: realised disagreement {_pct(b['risk'])} on {b['n']:,} rows (95% interval "
            f"{_pct(lo)} – {_pct(hi)}) > budget {_pct(b['eps'])}" + ("; the whole interval is above the budget"
                                                                       if sig else ""))


def test_the_fashion_policy_shows_every_budget_with_its_interval(cli: Any, fashion: dict[str, Path]) -> None:
    doc = json.loads(fashion["policy"].read_text())
    r = cli("evaluate", fashion["policy"], TEST, "--card", CARD, "--json")
    assert r.code == 0 and r.err == "", r
    ev = r.json()
    assert (ev["budget_risk"], ev["delta"], ev["n"]) == ("disagreement", 0.05, 10_000)
    assert list(ev["budgets"]) == ["__all__", "phone", "studio"]
    for name, b in ev["budgets"].items():
        seg = ev if name == "__all__" else ev["segments"]["capture"][name]
        assert b["eps"] == doc["guarantee"]["segments"][name]["eps"]
        assert (b["n"], b["losses"], b["risk"]) == (seg["n"], seg["losses"], seg["risk"])
        assert b["risk_interval"] == seg["risk_interval"] == list(risk_interval(b["losses"], b["n"], 0.05))
        assert b["status"] == ("over" if b["risk"] > b["eps"] else "under")
        assert b["significantly_over"] == (b["risk_interval"][0] > b["eps"])
    for vals in ev["segments"].values():  # every segment value of every column has its interval
        for s in vals.values():
            assert s["risk_interval"][0] <= s["risk"] <= s["risk_interval"][1]
    over = [n for n, b in ev["budgets"].items() if b["status"] == "over"]
    assert ev["over_budget"] == over

    r = cli("evaluate", fashion["policy"], TEST, "--card", CARD)
    assert r.code == 0 and r.err == "", r
    assert f"{BUDGETS} (disagreement; exact 95% intervals)" in r.out
    lo, hi = ev["risk_interval"]
    assert _row(r.out, "risk, 95% interval")[1] == f"{_pct(lo)} – {_pct(hi)}"
    for name, b in ev["budgets"].items():
        label = "__all__ (all traffic)" if name == "__all__" else name
        lo, hi = b["risk_interval"]
        status = "▲ OVER" if b["status"] == "over" else "under"
        want = [f"{b['n']:,}", _pct(b["eps"]), _pct(b["risk"]), f"{_pct(lo)} – {_pct(hi)}", status]
        assert _row(r.out, label, BUDGETS)[1:] == want
    lo, hi = ev["segments"]["region"]["eu"]["risk_interval"]
    assert _row(r.out, "eu")[-1] == f"{_pct(lo)} – {_pct(hi)}"

    r = cli("evaluate", fashion["policy"], TEST, "--card", CARD, "--fail-over-budget")
    assert r.code == (3 if over else 0)
    assert r.err.splitlines() == [_over_line("__all__ (all traffic)" if n == "__all__" else n, ev["budgets"][n],
                                             ev["budgets"][n]["significantly_over"]) for n in over]


def test_a_segment_over_its_budget_exits_3_with_one_stderr_line_each(cli: Any, fashion: dict[str, Path]) -> None:
    args = ("evaluate", fashion["studio_first"], TEST, "--card", CARD)
    r = cli(*args, "--json")
    assert r.code == 0 and r.err == "", r  # without the flag: flagged, not failed
    ev = r.json()
    assert ev["over_budget"] == ["__all__", "studio"]
    studio, phone = ev["budgets"]["studio"], ev["budgets"]["phone"]
    assert (studio["status"], studio["significantly_over"]) == ("over", True)
    assert studio["risk_interval"][0] > studio["eps"] == 0.02
    assert (phone["status"], phone["significantly_over"]) == ("under", False) and phone["risk"] <= 0.02
    assert ev["exit_rate"][0] >= 0.7 * (1 - 1e-9)  # studio is 70 % of the rows, all at stage1
    want_err = [_over_line("__all__ (all traffic)", ev["budgets"]["__all__"], True),
                _over_line("studio", studio, True)]

    r = cli(*args, "--fail-over-budget")
    assert r.code == 3, r
    assert r.err.splitlines() == want_err
    assert _row(r.out, "studio", BUDGETS)[-1] == "▲ OVER (whole interval above budget)"
    assert _row(r.out, "phone", BUDGETS)[-1] == "under"
    assert "over budget: __all__ (all traffic), studio (--fail-over-budget exits with code 3)" in r.out

    r = cli(*args, "--fail-over-budget", "--json")
    assert r.code == 3 and r.err.splitlines() == want_err
    out = r.json()  # the evaluation, not an error object
    assert "error" not in out and out["over_budget"] == ["__all__", "studio"] and out["budgets"] == ev["budgets"]


def test_corrupted_traffic_fails_the_budgets_it_breaks(cli: Any, fashion: dict[str, Path]) -> None:
    r = cli("evaluate", fashion["policy"], CORRUPTED, "--card", CARD, "--fail-over-budget", "--json")
    assert r.code == 3, r
    ev = r.json()
    phone, studio = ev["budgets"]["phone"], ev["budgets"]["studio"]
    assert "phone" in ev["over_budget"] and "__all__" in ev["over_budget"]
    assert phone["significantly_over"] and phone["risk_interval"][0] > 2 * phone["eps"]  # far over, not noise
    assert ev["budgets"]["__all__"]["significantly_over"]
    assert ("studio" in ev["over_budget"]) == (studio["risk"] > studio["eps"])
    assert r.err.splitlines() == [_over_line("__all__ (all traffic)" if n == "__all__" else n, ev["budgets"][n],
                                             ev["budgets"][n]["significantly_over"]) for n in ev["over_budget"]]


def test_a_policy_within_every_budget_passes_the_flag(cli: Any, fashion: dict[str, Path]) -> None:
    r = cli("evaluate", fashion["full_depth"], TEST, "--card", CARD, "--fail-over-budget", "--json")
    assert r.code == 0 and r.err == "", r
    ev = r.json()
    assert ev["over_budget"] == [] and ev["compute_fraction"] == 1.0
    for b in ev["budgets"].values():
        assert (b["status"], b["losses"], b["risk_interval"][0]) == ("under", 0, 0.0)
        assert b["risk_interval"] == list(risk_interval(0, b["n"], 0.05))
    r = cli("evaluate", fashion["full_depth"], TEST, "--card", CARD, "--fail-over-budget")
    assert r.code == 0 and r.err == "" and "every constrained segment is within its budget" in r.out


def test_delta_sets_the_intervals_confidence(cli: Any, fashion: dict[str, Path]) -> None:
    args = ("evaluate", fashion["studio_first"], TEST, "--card", CARD)
    at95 = cli(*args, "--json").json()
    r = cli(*args, "--json", "--delta", "0.001")
    assert r.code == 0, r
    at999 = r.json()
    assert at999["delta"] == 0.001
    for name, b in at999["budgets"].items():
        assert b["risk_interval"] == list(risk_interval(b["losses"], b["n"], 0.001))
        lo95, hi95 = at95["budgets"][name]["risk_interval"]
        assert b["risk_interval"][0] <= lo95 and b["risk_interval"][1] > hi95
    assert f"{BUDGETS} (disagreement; exact 99.9% intervals)" in cli(*args, "--delta", "0.001").out
    for bad in ("0", "1.5"):
        r = cli(*args, "--delta", bad)
        assert r.code == 2 and r.out == "" and r.err == f"error: --delta must be in (0, 1), got {float(bad)}\n", r


def test_budgets_on_a_risk_the_logs_cannot_measure(cli: Any, fashion: dict[str, Path]) -> None:
    args = ("evaluate", fashion["induced"], fashion["unlabelled"], "--card", CARD, "--risk", "disagreement")
    r = cli(*args, "--json")
    assert r.code == 0, r
    ev = r.json()
    assert ev["budget_risk"] == "induced_error" and ev["over_budget"] == []
    assert {b["status"] for b in ev["budgets"].values()} == {"unmeasured"}
    assert _row(cli(*args).out, "studio", BUDGETS)[-1] == "unmeasured (no labels)"
    r = cli(*args, "--fail-over-budget")
    assert r.code == 2 and r.out == "" and r.err.count("\n") == 1, r
    assert "--fail-over-budget checks the policy's induced_error budgets, which need labels" in r.err
