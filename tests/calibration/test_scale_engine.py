"""The scale engine: in memory and streamed from a dataset give the same counts and the same policy,
bit for bit; the counts agree with an independent evaluation; the rule runs many candidates at once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.calibrators import TemperatureScaler
from exitwise.calibration.certify import Constraint, check_constraints, upper_bound
from exitwise.calibration.evaluate import evaluate
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GroupIndex, group_losses
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitLogs, SegmentColumn
from exitwise.calibration.pipeline import SolveSpec
from exitwise.calibration.rule import CompiledPolicy, first_exit, first_exits
from exitwise.calibration.scale.dataset import ArraySource, ParquetDataset
from exitwise.calibration.scale.engine import ScaleSettings, solve_at_scale
from exitwise.calibration.scale.passes import SplitSelector
from exitwise.calibration.splits import SplitSpec
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.calibration.synthetic_tokens import synthetic_token_logs
from exitwise.policies.authoring import solve_policy_at_scale
from tests.calibration.test_scale_dataset import write_dataset

SMALL = ScaleSettings(sample_rows=4_000, floor_rows=300, report_rows=3_000)
SPECS = {
    "segments": SolveSpec(eps=0.03, segment_keys=("region",), segment_budgets=(("*", 0.06),),
                          split=SplitSpec(choose=0.3), seed=4),
    "induced": SolveSpec(risk="induced_error", eps=0.03, split=SplitSpec(choose=0.25), seed=1),
}


@pytest.fixture(scope="module")
def logs() -> ExitLogs:
    return synthetic_logs(30_000, 4, 6, segments={"region": 4}, seed=11)


@pytest.fixture(scope="module")
def dataset(logs: ExitLogs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale-ds")
    write_dataset(logs, root, files_per_day=3, seed=5)
    return root


def _same_counts(a: object, b: object) -> None:
    assert a.counts.keys() == b.counts.keys()  # type: ignore[attr-defined]
    for col in a.counts:  # type: ignore[attr-defined]
        assert a.counts[col].keys() == b.counts[col].keys()  # type: ignore[attr-defined]
        for level, block in a.counts[col].items():  # type: ignore[attr-defined]
            assert np.array_equal(block, b.counts[col][level])  # type: ignore[attr-defined]
    assert a.full_right == b.full_right  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_memory_and_stream_give_the_same_counts_and_policy(name: str, logs: ExitLogs, dataset: Path) -> None:
    spec = SPECS[name]
    mem = solve_policy_at_scale(ArraySource(logs, batch_rows=logs.n, label=dataset.name), spec, settings=SMALL)
    streamed = solve_policy_at_scale(ParquetDataset(dataset, logs.card, batch_rows=777), spec, settings=SMALL)
    reread = solve_policy_at_scale(ParquetDataset(dataset, logs.card, batch_rows=4096), spec,
                                   settings=replace(SMALL, spill=False))
    assert "temperature_1" in mem.result.passes  # the choose split outgrew the sample: streamed Newton steps
    for other in (streamed, reread):
        _same_counts(mem.result.counts, other.result.counts)
        assert other.result.data == mem.result.data
        assert other.document["exits"] == mem.document["exits"]
        assert other.document["content_hash"] == mem.document["content_hash"]
    doc = mem.document
    assert doc["guarantee"]["split"]["method"] == "hash" and doc["guarantee"]["certified"]
    assert doc["data"]["rows"]["total"] == logs.n


def test_the_certificate_agrees_with_an_independent_evaluation(logs: ExitLogs) -> None:
    spec = SPECS["segments"]
    out = solve_policy_at_scale(ArraySource(logs, batch_rows=5_000), spec, settings=SMALL)
    doc = out.document
    g = doc["guarantee"]
    frac = g["split"]["choose_fraction"]
    cert = SplitSelector(spec.seed, frac, choose=False).mask(logs.request_ids)
    ev = evaluate(doc, logs.take(np.flatnonzero(cert)))
    assert g["segments"]["__all__"]["n"] == ev.n == g["split"]["certify"]
    assert g["segments"]["__all__"]["upper_bound"] == upper_bound(ev.losses["disagreement"], ev.n, spec.delta)
    for region, seg in ev.segments["region"].items():
        got = g["segments"][region]
        assert got["n"] == seg.n
        assert got["upper_bound"] == upper_bound(seg.losses["disagreement"], seg.n, spec.delta)
        assert got["upper_bound"] <= 0.06
    assert doc["expected"]["compute_fraction"] == pytest.approx(ev.compute_fraction, abs=1e-12)
    assert doc["expected"]["risk"] == pytest.approx(ev.risk, abs=1e-12)


def test_streamed_temperatures_are_the_fit_on_every_choose_row(logs: ExitLogs) -> None:
    spec = SPECS["segments"]
    out = solve_at_scale(ArraySource(logs), spec, SMALL)
    choose = SplitSelector(spec.seed, 0.3, choose=True).mask(logs.request_ids)
    z = logs.logits[choose]
    target = np.argmax(z[:, -1, :], axis=1)
    for k, cal in enumerate(out.solution.prepared.calibrators[:-1]):
        full = TemperatureScaler().fit(z[:, k, :], target).temperature_
        assert cal["temperature"] == pytest.approx(full, rel=2e-4)
    assert out.solution.prepared.calibrators[-1] == {"type": "identity"}


def test_an_interrupted_run_leaves_no_spill_behind(logs: ExitLogs, tmp_path: Path) -> None:
    def stop(message: str, fraction: float) -> None:
        if "temperatures" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        solve_at_scale(ArraySource(logs, batch_rows=2_000), SPECS["segments"],
                       replace(SMALL, spill_dir=str(tmp_path)), progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_what_the_engine_does_not_certify_is_refused(logs: ExitLogs) -> None:
    with pytest.raises(InputError, match="defined per group: give --group-column"):
        solve_at_scale(ArraySource(logs), SolveSpec(risk="sequence_disagreement"))
    with pytest.raises(InputError, match="'nope' is not a segment column"):
        solve_at_scale(ArraySource(logs), SolveSpec(group_column="nope"))
    with pytest.raises(InputError, match=r"sample-rows must be in"):
        solve_at_scale(ArraySource(logs), SolveSpec(), ScaleSettings(sample_rows=10))


@st.composite
def _policies(draw: st.DrawFn) -> tuple[list[CompiledPolicy], np.ndarray, np.ndarray, np.ndarray]:
    k = draw(st.integers(2, 4))
    c = draw(st.integers(2, 4))
    s = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    forced_c = rng.random(c) < 0.2
    forced_s = rng.random(s) < 0.2
    max_exit = draw(st.integers(0, k - 1))
    pols = []
    for _ in range(draw(st.integers(1, 5))):
        thr = rng.choice([0.2, 0.5, 0.7, 0.9, np.nan], size=(s, k - 1, c))
        pols.append(CompiledPolicy(thresholds=thr, segment_index={}, forced_classes=forced_c,
                                   forced_segments=forced_s, max_exit=max_exit, killed=False,
                                   calibrators=(), score="max_prob", segment_keys=()))
    scores = rng.choice([0.2, 0.5, 0.6, 0.9, 1.0], size=(n, k))
    preds = rng.integers(0, c, size=(n, k))
    seg = rng.integers(0, s, size=n)
    return pols, scores, preds, seg


@settings(max_examples=80, deadline=None)
@given(_policies())
def test_first_exits_is_first_exit_for_every_candidate(case: tuple) -> None:
    pols, scores, preds, seg = case
    got = first_exits(pols, scores, preds, seg)
    for j, pol in enumerate(pols):
        assert np.array_equal(got[:, j], first_exit(pol, scores, preds, seg).exit)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExitLogs, Path]:
    """Logs whose rows come in groups of 1..8 (a user), the group a segment column; rows of a group
    scattered over files and days."""
    base = synthetic_logs(24_000, 4, 6, segments={"region": 2}, seed=12)
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 9, size=6_000)
    group = np.repeat(np.arange(sizes.size), sizes)[:base.n]
    region = np.asarray([f"region_{g % 2}" for g in group], dtype=object)  # one region per group
    logs = replace(base, segments={"region": SegmentColumn.from_values(region),
                                   "user": SegmentColumn.from_values(np.asarray([f"u{g}" for g in group]))},
                   card=replace(base.card, segment_columns=("region", "user")))
    root = tmp_path_factory.mktemp("scale-groups")
    write_dataset(logs, root, files_per_day=2, seed=9)
    return logs, root


@pytest.mark.parametrize("risk", ["disagreement", "sequence_disagreement"])
def test_groups_are_split_and_certified_whole_in_memory_and_streamed(risk: str, grouped: tuple[ExitLogs, Path]
                                                                     ) -> None:
    logs, root = grouped
    spec = SolveSpec(risk=risk, eps=0.05 if risk == "disagreement" else 0.2, group_column="user",
                     segment_keys=("region",), segment_budgets=(("*", 0.1 if risk == "disagreement" else 0.3),),
                     split=SplitSpec(choose=0.3), seed=2)
    mem = solve_policy_at_scale(ArraySource(logs, batch_rows=5_000, label=root.name), spec, settings=SMALL)
    streamed = solve_policy_at_scale(ParquetDataset(root, logs.card, batch_rows=999), spec, settings=SMALL)
    assert streamed.document["content_hash"] == mem.document["content_hash"]
    doc = mem.document
    g = doc["guarantee"]
    assert g["unit"] == "group" and g["group_column"] == "user" and g["split"]["key_column"] == "user"
    users = logs.segments["user"].values()
    certify = SplitSelector(spec.seed, g["split"]["choose_fraction"], False, key="user").mask(users)
    assert not set(users[certify]) & set(users[~certify])  # no group on both sides
    assert g["groups"]["certify"] == len(set(users[certify])) == g["segments"]["__all__"]["n"]
    # the certificate, recomputed in memory over the certify groups with the pipeline's own test
    sub = logs.take(np.flatnonzero(certify))
    ev = evaluate(doc, sub)
    index = GroupIndex.from_values(sub.segments["user"].values())
    per_group = group_losses(index, ev.loss, risk)  # the rows' disagreements, per group: mean or any
    step = check_constraints(per_group, [Constraint("__all__", spec.eps, np.arange(index.n_groups))], spec.delta)
    assert step.results[0].upper_bound == pytest.approx(g["segments"]["__all__"]["upper_bound"], rel=1e-12)
    figures = mem.result.expected.groups
    assert figures is not None and figures["n"] == index.n_groups
    assert figures["sequence_disagreement"] == pytest.approx(float(index.any(ev.loss).mean()), abs=1e-12)


def test_token_logs_stream_to_the_same_vocabulary_policy(tmp_path: Path) -> None:
    logs = synthetic_token_logs(800, 25, n_exits=4, vocab_size=400, top_k=8, seed=3)
    perm = np.random.default_rng(2).permutation(logs.n)  # a sequence's tokens scattered over files
    for i, rows in enumerate(np.array_split(perm, 4)):
        (tmp_path / f"shard={i % 2}").mkdir(exist_ok=True)
        write_logs(logs.take(np.sort(rows)), tmp_path / f"shard={i % 2}" / f"part-{i}.parquet")
    spec = SolveSpec(eps=0.05, split=SplitSpec(choose=0.3), seed=5)
    small = replace(SMALL, sample_rows=3_000, report_rows=2_000)
    mem = solve_policy_at_scale(ArraySource(logs, batch_rows=4_000, label=tmp_path.name), spec, settings=small)
    streamed = solve_policy_at_scale(ParquetDataset(tmp_path, logs.card, batch_rows=1_500), spec, settings=small)
    _same_counts(mem.result.counts, streamed.result.counts)
    assert streamed.document["content_hash"] == mem.document["content_hash"]
    doc = mem.document
    assert doc["vocabulary"]["size"] == 400 and doc["guarantee"]["unit"] == "group"
    assert doc["guarantee"]["groups"]["total"] == 800
    assert doc["guarantee"]["split"]["key_column"] == logs.card.group_column
