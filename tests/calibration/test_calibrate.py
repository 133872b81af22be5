"""Calibrating exit logs: one calibrator per exit, and the calibration job (fit on one split, report on another)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from temperature_reference import T_RTOL, reference_temperature

from exitwise.calibration.calibrate import calibrate_logs, fit_exit_calibrators
from exitwise.calibration.calibrators import IdentityCalibrator, PlattScaler, TemperatureScaler
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.metrics import exit_metrics
from exitwise.calibration.splits import split_rows
from exitwise.calibration.synthetic import synthetic_logs


@pytest.fixture(scope="module")
def logs():
    return synthetic_logs(4000, n_exits=4, n_classes=5, seed=3)


def test_fit_exit_calibrators_recovers_per_exit_temperatures(logs):
    cals = fit_exit_calibrators(logs, "temperature")
    assert [type(c) for c in cals] == [TemperatureScaler] * 4
    for k, cal in enumerate(cals):
        ref = reference_temperature(logs.logits[:, k, :], logs.labels)
        assert cal.temperature_ == pytest.approx(ref, rel=T_RTOL)
    # over-confident early exits need T > 1 (the generator's true temperatures fall with depth)
    temps = [c.temperature_ for c in cals]
    assert temps[0] > temps[-1] > 1.0


def test_fit_exit_calibrators_targets_index_and_final(logs):
    idx = np.arange(0, logs.n, 2)
    a = fit_exit_calibrators(logs.logits, "temperature", targets=logs.labels, index=idx)
    b = fit_exit_calibrators(logs.take(idx), "temperature")
    assert [c.to_dict() for c in a] == [c.to_dict() for c in b]
    per_exit = np.repeat(logs.labels[:, None], logs.n_exits, axis=1)
    c = fit_exit_calibrators(logs.logits, "temperature", targets=per_exit)
    assert [x.to_dict() for x in c] == [x.to_dict() for x in fit_exit_calibrators(logs, "temperature")]
    unlabelled = dataclasses.replace(logs, labels=None)
    final = fit_exit_calibrators(unlabelled, "platt")  # pseudo-labels: the final exit's answers
    assert [type(x) for x in final] == [PlattScaler] * 3 + [IdentityCalibrator]
    pseudo = logs.logits[:, -1, :].argmax(axis=1)
    assert final[0].to_dict() == PlattScaler().fit(logs.logits[:, 0, :], pseudo).to_dict()
    seen = []
    fit_exit_calibrators(logs, "identity", progress=seen.append)
    assert seen == [0, 1, 2, 3]


def test_fit_exit_calibrators_errors(logs):
    with pytest.raises(InputError, match="pass targets by keyword"):
        fit_exit_calibrators(logs.logits, logs.labels)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no labels"):
        fit_exit_calibrators(dataclasses.replace(logs, labels=None), "temperature", target="labels")
    with pytest.raises(InputError, match=r"shape \(n, K, C\)"):
        fit_exit_calibrators(logs.logits[:, 0, :], "temperature", targets=logs.labels)
    bad = logs.logits.copy()
    bad[17, 2, 1] = np.nan
    with pytest.raises(InputError, match="exit 2: logits must be finite; found nan at sample 17, class 1"):
        fit_exit_calibrators(bad, "temperature", targets=logs.labels)


def test_calibrate_logs_fits_on_one_split_and_reports_on_the_other(logs):
    res = calibrate_logs(logs, "temperature", fit_fraction=0.25, seed=4)
    fit_idx, rep_idx = split_rows(logs.n, [round(0.25 * logs.n)], 4)  # the one split function
    assert (res.n_fit, res.n_report) == (1000, 3000) == (fit_idx.size, rep_idx.size)
    assert np.intersect1d(fit_idx, rep_idx).size == 0
    for k in range(logs.n_exits):
        z_fit, z_rep = logs.logits[fit_idx, k, :], logs.logits[rep_idx, k, :]
        ref = TemperatureScaler().fit(z_fit, logs.labels[fit_idx])
        assert res.calibrators[k].to_dict() == ref.to_dict()
        assert res.after[k].to_dict() == exit_metrics(z_rep, logs.labels[rep_idx], ref).to_dict()
        assert res.before[k].to_dict() == exit_metrics(z_rep, logs.labels[rep_idx], None).to_dict()
        assert res.after[k].ece < res.before[k].ece  # over-confident synthetic exits get better
    section = res.policy_section()
    assert [e["name"] for e in section["exits"]] == list(res.exit_names)
    assert set(section["exits"][0]["before"]) == {"accuracy", "nll", "brier", "ece", "ece_mass", "mce"}
    d = res.to_dict(reliability=True)
    assert d["exits"][0]["temperature"] == res.calibrators[0].temperature_
    assert len(d["exits"][0]["reliability"]["after"]["width"]["count"]) == 15


def test_calibrate_logs_threads_give_the_same_result(logs):
    a = calibrate_logs(logs, "platt", n_jobs=1).to_dict(reliability=True)
    b = calibrate_logs(logs, "platt", n_jobs=2).to_dict(reliability=True)
    assert a == b


def test_calibrate_logs_report_logs_and_unlabelled(logs):
    other = synthetic_logs(1500, n_exits=4, n_classes=5, seed=99)
    res = calibrate_logs(logs, "temperature", report_logs=other)
    assert (res.n_fit, res.n_report, res.fit_fraction) == (4000, 1500, None)
    unl = calibrate_logs(dataclasses.replace(logs, labels=None), "temperature")
    assert unl.target == "final" and unl.after[-1].accuracy == 1.0
    assert unl.calibrators[-1].to_dict() == {"type": "identity"}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"fit_fraction": 1.0}, "strictly between 0 and 1"), ({"method": "isotonic"}, "unknown calibration method"),
     ({"n_bins": 0}, "positive integer"), ({"n_jobs": 0}, "n_jobs")],
)
def test_calibrate_logs_bad_arguments(logs, kwargs, match):
    with pytest.raises(InputError, match=match):
        calibrate_logs(logs, **kwargs)
