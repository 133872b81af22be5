"""The scale engine on real Spark (local[2]): the same state as one machine, bit for bit.

A synthetic dataset is written in hive partitions (day=0..2, several files a day, rows
shuffled across files) and read three ways: in memory (ArraySource), streamed in this process
(run_local on the ParquetDataset) and by Spark. Spark's file partitions outnumber the merge
tree's fan-in, so the partial reducers merge in two levels. Bad input goes through the real
CLI in a subprocess (its own JVM), as a user runs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exitwise.calibration.exceptions import LogFormatError
from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.pipeline import SolveSpec
from exitwise.calibration.scale.dataset import ArraySource, ParquetDataset
from exitwise.calibration.scale.engine import ScaleSettings
from exitwise.calibration.scale.passes import CertifyPass, SamplePass
from exitwise.calibration.scale.runner import Meter, run_local
from exitwise.calibration.scale.where import parse_where
from exitwise.calibration.splits import SplitSpec
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.calibration.synthetic_tokens import synthetic_token_logs
from exitwise.policies.authoring import solve_policy_at_scale
from exitwise.policies.canonical import content_hash

if os.environ.get("CI") == "true":  # CI installs the dev extra (PySpark) and has Java 17: never skip there
    import pyspark  # noqa: F401
else:
    pytest.importorskip("pyspark", reason="the [spark] extra is not installed")
if shutil.which("java") is None:
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true: Java 17 is required for the Spark tests", pytrace=False)
    pytest.skip("no java on PATH: Spark needs Java 17", allow_module_level=True)

from exitwise.calibration.scale.spark import FAN_IN, SparkRunner, spark_runner

N_ROWS = 12_000
DAYS, FILES_PER_DAY = 3, 6
SPEC = SolveSpec(eps=0.05, segment_keys=("region",), split=SplitSpec(choose=0.3))


def _write_dataset(logs: ExitLogs, root: Path) -> list[Path]:
    """``logs`` in hive partitions day=0..DAYS-1, FILES_PER_DAY files each, rows shuffled across files."""
    perm = np.random.default_rng(5).permutation(logs.n)
    files = []
    for d, part in enumerate(np.array_split(perm, DAYS)):
        (root / f"day={d}").mkdir(parents=True)
        for i, rows in enumerate(np.array_split(part, FILES_PER_DAY)):
            files.append(write_logs(logs.take(rows), root / f"day={d}" / f"part-{i}.parquet"))
    return files


@pytest.fixture(scope="module")
def logs() -> ExitLogs:
    return synthetic_logs(N_ROWS, 4, 10, segments={"region": 4}, seed=3)


@pytest.fixture(scope="module")
def dataset(logs: ExitLogs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spark") / "logs"
    _write_dataset(logs, root)
    write_card(logs.card, root.parent / "card.json")
    return root


@pytest.fixture(scope="module")
def spark(dataset: Path) -> Iterator[SparkRunner]:
    """One local[2] session for the module; every file its own partition (more than FAN_IN of them)."""
    runner = spark_runner("local[2]")
    assert isinstance(runner, SparkRunner)
    size = max(p.stat().st_size for p in dataset.rglob("*.parquet"))
    runner.session.conf.set("spark.sql.files.maxPartitionBytes", str(size))
    runner.session.conf.set("spark.sql.files.openCostInBytes", str(size))
    yield runner
    runner.session.stop()


def _source(dataset: Path, logs: ExitLogs, where: str | None = None) -> ParquetDataset:
    return ParquetDataset(dataset, logs.card, where=parse_where(where), batch_rows=700)


def _sample_pass() -> SamplePass:
    return SamplePass(seed=0, choose_fraction=0.3, strata_keys=("region",), sample_rows=1000, floor_rows=100,
                      report_rows=1000)


def _sample_state(p: SamplePass) -> dict[str, Any]:
    sample, report = p.choose_sample(), p.report_sample()
    assert sample is not None and report is not None
    return {"rows": p.rows, "choose": p.choose_counts, "certify": p.certify_counts, "segments": p.segment_counts,
            "fingerprint": p.fingerprint, "shape": p.shape, "labelled": p.labelled,
            "sample": sample.arrays["ids"][sample.order()].tolist(),
            "report": report.arrays["ids"][report.order()].tolist(),
            "bound": p.sample.bound if p.sample is not None else None}


def _same_counts(a: CertifyPass, b: CertifyPass) -> None:
    """Every count array of every candidate, column and value, and the full-depth right answers."""
    assert a.rows == b.rows and a.full_right == b.full_right and a.stratum_levels == b.stratum_levels
    assert a.counts.keys() == b.counts.keys() and a.counts
    for column in a.counts:
        assert a.counts[column].keys() == b.counts[column].keys()
        for level, block in a.counts[column].items():
            np.testing.assert_array_equal(block, b.counts[column][level])


def test_the_files_outnumber_the_merge_fan_in(spark: SparkRunner, dataset: Path) -> None:
    """Otherwise the tree below would merge in one task and never ship a merged reducer on."""
    paths = [str(p) for p in sorted(dataset.rglob("*.parquet"))]
    parts = spark.session.read.option("basePath", str(dataset)).parquet(*paths).rdd.getNumPartitions()
    assert parts > FAN_IN


def test_sample_pass_state_is_the_same_on_spark_stream_and_memory(spark: SparkRunner, dataset: Path,
                                                                   logs: ExitLogs) -> None:
    source = _source(dataset, logs)
    stream = run_local(source, _sample_pass(), None, Meter("stream", source.rows))
    memory = run_local(ArraySource(logs, batch_rows=900), _sample_pass(), None, Meter("memory", logs.n))
    meter = Meter("spark", source.rows)
    on_spark = spark(source, _sample_pass(), None, meter)
    assert _sample_state(on_spark) == _sample_state(stream) == _sample_state(memory)
    assert on_spark.rows == N_ROWS and meter.done == N_ROWS
    assert len(_sample_state(on_spark)["sample"]) >= 1000  # the reservoir was full: bottom-k, not everything


@pytest.mark.parametrize("sample_rows", [5_000, 1_000], ids=["whole-choose-split", "temperature-passes"])
def test_policy_and_counts_are_the_same_on_spark_stream_and_memory(spark: SparkRunner, dataset: Path,
                                                                    logs: ExitLogs, sample_rows: int) -> None:
    """The document's content hash and every certify count; with 1,000 sample rows the choose split
    (~3,600 rows) is larger than the sample, so temperatures are refined by Newton passes over it."""
    settings = ScaleSettings(sample_rows=sample_rows, floor_rows=100, report_rows=1_000)
    source = _source(dataset, logs)
    outcomes = {
        "memory": solve_policy_at_scale(ArraySource(logs, batch_rows=900, label=source.name), SPEC,
                                        settings=settings),
        "stream": solve_policy_at_scale(source, SPEC, settings=settings),
        "spark": solve_policy_at_scale(source, SPEC, settings=settings, runner=spark),
    }
    passes = {name: sorted(o.result.passes) for name, o in outcomes.items()}
    assert passes["spark"] == passes["stream"] == passes["memory"]
    assert ("temperature_1" in passes["spark"]) == (sample_rows == 1_000)
    hashes = {name: content_hash(o.document) for name, o in outcomes.items()}
    assert hashes["spark"] == hashes["stream"] == hashes["memory"]
    _same_counts(outcomes["spark"].result.counts, outcomes["stream"].result.counts)
    _same_counts(outcomes["spark"].result.counts, outcomes["memory"].result.counts)
    temps = {name: [c.get("temperature") for c in o.result.solution.prepared.calibrators]
             for name, o in outcomes.items()}
    assert temps["spark"] == temps["stream"] == temps["memory"]


def test_where_keeps_the_same_files_on_spark_as_streamed(spark: SparkRunner, dataset: Path, logs: ExitLogs) -> None:
    source = _source(dataset, logs, "day >= '1'")
    kept = sum(f.rows for f in source.files)
    assert {f.partition for f in source.files} == {(("day", "1"),), (("day", "2"),)} and kept < N_ROWS
    stream = run_local(source, _sample_pass(), None, Meter("stream", kept))
    on_spark = spark(source, _sample_pass(), None, Meter("spark", kept))
    assert on_spark.rows == kept
    assert _sample_state(on_spark) == _sample_state(stream)


def test_an_executor_error_reaches_the_caller_as_itself(spark: SparkRunner, dataset: Path, logs: ExitLogs,
                                                       tmp_path: Path) -> None:
    """A NaN logit in a late row of one file: the LogFormatError names the file and the request id."""
    root = tmp_path / "bad"
    bad_file, bad_id = _bad_copy(dataset, root, logs)
    with pytest.raises(LogFormatError) as err:
        spark(_source(root, logs), _sample_pass(), None, Meter("spark", N_ROWS))
    assert str(bad_file) in str(err.value) and f"request_id {bad_id}" in str(err.value)
    assert "NaN" in str(err.value) and "Traceback" not in str(err.value)


def _bad_copy(dataset: Path, root: Path, logs: ExitLogs) -> tuple[Path, int]:
    """A copy of the dataset whose last file has a NaN logit three rows from its end."""
    shutil.copytree(dataset, root)
    target = sorted(root.rglob("*.parquet"))[-1]
    source = ParquetDataset(target, logs.card)
    bad = next(iter(source.chunks())).logs
    assert bad.n == sum(f.rows for f in source.files)  # one batch: the whole file
    bad.logits[-3, 1, 2] = np.nan
    assert bad.request_ids is not None
    write_logs(bad, target)
    return target, int(bad.request_ids[-3])


def test_cli_reports_a_bad_row_on_one_line_and_writes_nothing(dataset: Path, logs: ExitLogs, tmp_path: Path) -> None:
    """``exitwise solve --engine spark`` in its own process: exit code 2, one line on stderr, no policy."""
    root = tmp_path / "bad"
    bad_file, bad_id = _bad_copy(dataset, root, logs)
    out = tmp_path / "policy.json"
    exe = Path(sys.executable).with_name("exitwise")
    run = subprocess.run([str(exe), "solve", str(root), "--card", str(dataset.parent / "card.json"), "--out", str(out),
                          "--engine", "spark", "--eps", "0.05"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "EXITWISE_DEBUG": "0"})
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert str(bad_file) in lines[0] and f"request_id {bad_id}" in lines[0] and "NaN" in lines[0]
    assert run.stdout == ""
    assert not out.exists()


def test_ctrl_c_cancels_the_pass_and_the_session_still_works(spark: SparkRunner, dataset: Path,
                                                             logs: ExitLogs) -> None:
    """SIGINT while executors work: KeyboardInterrupt on the caller, no Spark job left running."""
    source = _source(dataset, logs)
    tracker = spark.session.sparkContext.statusTracker()

    class Slow:  # a RowSelector by request id, pickled by value to the executors
        key = None

        def __call__(self, ids: np.ndarray) -> np.ndarray:
            time.sleep(2.0)
            return np.ones(len(ids), dtype=bool)

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not tracker.getActiveJobsIds() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # past reading the files' schema: the fold's tasks are in the selector
        os.kill(os.getpid(), signal.SIGINT)

    killer = threading.Thread(target=interrupt, daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        spark(source, _sample_pass(), Slow(), Meter("spark", source.rows))
    killer.join()
    assert time.monotonic() - t0 < 10  # the whole pass would take 18 s: a batch a file, 2 s each, 2 cores
    deadline = time.monotonic() + 20
    while tracker.getActiveJobsIds() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tracker.getActiveJobsIds() == []
    again = spark(source, _sample_pass(), None, Meter("spark", source.rows))
    assert again.rows == N_ROWS



def test_token_logs_give_the_same_vocabulary_policy_on_spark(spark: SparkRunner, tmp_path: Path) -> None:
    """Token-level logs (top-k columns, split by sequence): a sequence's tokens scattered over files."""
    logs = synthetic_token_logs(400, 20, n_exits=3, vocab_size=300, top_k=6, seed=3)
    perm = np.random.default_rng(2).permutation(logs.n)
    for i, rows in enumerate(np.array_split(perm, 4)):
        (tmp_path / f"shard={i % 2}").mkdir(exist_ok=True)
        write_logs(logs.take(np.sort(rows)), tmp_path / f"shard={i % 2}" / f"part-{i}.parquet")
    spec = SolveSpec(eps=0.05, split=SplitSpec(choose=0.3), seed=5)
    settings = ScaleSettings(sample_rows=1_500, floor_rows=100, report_rows=1_000)
    source = ParquetDataset(tmp_path, logs.card, batch_rows=1_500)
    streamed = solve_policy_at_scale(source, spec, settings=settings)
    on_spark = solve_policy_at_scale(source, spec, settings=settings, runner=spark)
    _same_counts(on_spark.result.counts, streamed.result.counts)
    assert content_hash(on_spark.document) == content_hash(streamed.document)
    assert on_spark.document["guarantee"]["unit"] == "group"


def test_groups_split_whole_give_the_same_policy_on_spark(spark: SparkRunner, dataset: Path, logs: ExitLogs) -> None:
    """--group-column: rows split and certified by a hash of their group (a segment column) on Spark too."""
    spec = SolveSpec(eps=0.05, group_column="region", segment_keys=(), split=SplitSpec(choose=0.5), seed=2)
    settings = ScaleSettings(sample_rows=5_000, floor_rows=100, report_rows=1_000)
    source = _source(dataset, logs)
    streamed = solve_policy_at_scale(source, spec, settings=settings)
    on_spark = solve_policy_at_scale(source, spec, settings=settings, runner=spark)
    _same_counts(on_spark.result.counts, streamed.result.counts)
    assert content_hash(on_spark.document) == content_hash(streamed.document)
