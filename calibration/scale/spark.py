"""Running the passes of the scale engine on Spark: one reducer per partition, merged in a tree.

:func:`spark_runner` returns a :class:`~exitwise.calibration.scale.runner.Runner` that reads
exactly the files of a :class:`~exitwise.calibration.scale.dataset.ParquetDataset` (those
``--where`` kept). Each partition folds its Arrow batches into a fresh copy of the reducer on
the executors (``mapInArrow``: the Parquet reader's batches reach Python as Arrow, with no
Python object per row as ``rdd.mapPartitions`` would build), decoded by the dataset's own
``decode``. The partial reducers merge on the executors, ``FAN_IN`` at a time, in pieces of
``_CHUNK`` bytes, so the driver receives one. All state is exact and order-free: the result is
:func:`~exitwise.calibration.scale.runner.run_local`'s bit for bit. An ExitwiseError raised on
an executor (a bad row) reaches the caller as itself; Ctrl-C cancels the pass's jobs.
"""

from __future__ import annotations

import base64
import math
import os
import pickle
import re
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import SparkConf, SparkContext, TaskContext
from pyspark.java_gateway import launch_gateway
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from exitwise.calibration.exceptions import ExitwiseError, InputError, LogFormatError
from exitwise.calibration.scale.dataset import LogFile, ParquetDataset, RowSelector
from exitwise.calibration.scale.runner import Meter, Runner
from exitwise.calibration.scale.sample import Reservoir

__all__ = ["FAN_IN", "SparkRunner", "spark_runner"]

FAN_IN = 8  # partial reducers merged by one task of the tree
_FILE = "__exitwise_file__"
_CHUNK = 8 << 20  # bytes of a pickled reducer per row: the JVM never holds a whole reducer as one value
_STATE = pa.schema([pa.field("src", pa.int64()), pa.field("seq", pa.int64()), pa.field("chunk", pa.binary())])
_STATE_DDL = "src long, seq long, chunk binary"
_FETCH_PARTITIONS = 4  # the last reducer comes to the driver in this many jobs (a quarter each)
_ERROR = re.compile(r"exitwise-error:([A-Za-z0-9+/=]+):end")
# the launcher always adds --add-modules=jdk.incubator.vector; the JVM then says so on stderr
_JVM_NOISE = ("WARNING: Using incubator modules",)
_DAEMON_PIPE = ("BrokenPipeError", "ConnectionResetError")
_PANDAS_WARNING = "PySpark does not yet fully support pandas"  # pandas 3; mapInArrow uses no pandas
_LOGGERS = {"org.apache.spark.repl.Main": "warn", "org.apache.hadoop.util.NativeCodeLoader": "error",
            # a failed task is reported once, by the driver (an exitwise error unwrapped, or the job's failure)
            "org.apache.spark.executor.Executor": "off", "org.apache.spark.scheduler.TaskSetManager": "off"}
_LOG4J = "\n".join([
    "rootLogger.level = warn", "rootLogger.appenderRef.stderr.ref = console", "appender.console.type = Console",
    "appender.console.name = console", "appender.console.target = SYSTEM_ERR",
    "appender.console.layout.type = PatternLayout", "appender.console.layout.pattern = spark %p %c{1}: %m%n",
    *(f"logger.l{i}.name = {name}\nlogger.l{i}.level = {level}" for i, (name, level) in enumerate(_LOGGERS.items())),
]) + "\n"


def _wrap(exc: ExitwiseError) -> RuntimeError:
    """An executor's error as a RuntimeError whose message carries the pickled original."""
    payload = base64.b64encode(pickle.dumps(exc)).decode("ascii")
    return RuntimeError(f"exitwise-error:{payload}:end")


def _unwrap(exc: BaseException) -> ExitwiseError | None:
    """The ExitwiseError an executor raised, found in the text of Spark's exception (None: another failure)."""
    found = _ERROR.search(str(exc))
    if found is None:
        return None
    try:
        err = pickle.loads(base64.b64decode(found.group(1)))
    except Exception:  # a message cut short: not ours to decode
        return None
    return err if isinstance(err, ExitwiseError) else None


def _failure(exc: Exception) -> Exception:
    """Another failure of a Spark job as one line (raised from the original, for EXITWISE_DEBUG)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0][:500] if lines else type(exc).__name__
    if "FAILED_READ_FILE" in first:  # a data page the footer check could not see
        return LogFormatError(f"Spark cannot read a file of the dataset (corrupt Parquet?): {first}")
    return RuntimeError(f"the Spark job failed: {first}")


def _is_worker_noise(block: list[str]) -> bool:
    """A traceback of PySpark's worker daemon writing to a task the JVM already killed (a job cancelled)."""
    return any("pyspark/daemon.py" in ln for ln in block) and block[-1].startswith(_DAEMON_PIPE)


def _forward(stream: Any, out: TextIO) -> None:
    """Copy the JVM's stderr to ours, without what only says how the JVM was started or that a killed
    task's worker lost its pipe (the job's failure is reported once, by the driver)."""
    block: list[str] = []
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        if line.startswith(_JVM_NOISE):
            continue
        if block or line.startswith("Traceback (most recent call last):"):
            block.append(line)
            if line[:1].isspace() or line.startswith("Traceback"):
                continue  # the traceback goes on
            if not _is_worker_noise(block):
                out.write("".join(block))
            block = []
        else:
            out.write(line)
        out.flush()
    if block:
        out.write("".join(block))


@contextmanager
def _quiet_pandas() -> Iterator[None]:
    """Without PySpark's warning about pandas 3 (mapInArrow and this module use no pandas)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PANDAS_WARNING, category=FutureWarning)
        yield


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def _new_session(master: str | None) -> SparkSession:
    """Start Spark: ``master``, else what spark-submit set, else ``local[2]``; quiet, no UI."""
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # this process was started by spark-submit
    conf = SparkConf(loadDefaults=False)
    if master is not None or not submitted:
        conf.setMaster(master or "local[2]")
    conf.setAppName("exitwise-solve")
    conf.set("spark.ui.enabled", "false")
    conf.set("spark.ui.showConsoleProgress", "false")  # the CLI shows its own progress
    conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    conf.set("spark.sql.shuffle.partitions", "8")
    conf.set("spark.executorEnv.PYTHONWARNINGS", f"ignore:{_PANDAS_WARNING}:FutureWarning")
    if submitted:  # the JVM runs already, with spark-submit's settings: quiet logs unless they say otherwise
        with _quiet_pandas():
            SparkContext._ensure_initialized()
            if not SparkConf().contains("spark.log.level"):
                conf.set("spark.log.level", "WARN")
            return SparkSession.builder.config(conf=conf).getOrCreate()
    resolved = conf.get("spark.master") or "local[2]"
    if _is_local(resolved):  # everything on this machine: bind to the loopback, run workers with this Python
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        conf.set("spark.driver.bindAddress", "127.0.0.1")
        conf.set("spark.driver.host", "127.0.0.1")
    log4j = Path(tempfile.mkdtemp(prefix="exitwise-spark-")) / "log4j2.properties"
    log4j.write_text(_LOG4J, encoding="utf-8")
    conf.set("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={log4j.as_uri()}")
    gateway = launch_gateway(conf, popen_kwargs={"stderr": -1})  # subprocess.PIPE
    proc = getattr(gateway, "proc", None)
    if proc is not None and proc.stderr is not None:
        threading.Thread(target=_forward, args=(proc.stderr, sys.stderr), daemon=True,
                         name="exitwise-spark-stderr").start()
    with _quiet_pandas():  # the JVM's first call imports pyspark.testing, which warns about pandas 3
        SparkContext(conf=conf, gateway=gateway)
    return SparkSession.builder.getOrCreate()


def _session(master: str | None) -> SparkSession:
    """The active session (when its master is ``master`` or none was asked for), else a new one."""
    active = SparkSession.getActiveSession()
    if active is None:
        return _new_session(master)
    have = active.sparkContext.master
    if master is not None and master != have:
        raise InputError(f"--master {master}: a Spark session with master {have} is already running in this "
                         "process; stop it first or drop --master")
    return active


def _file_key(uri: str) -> str:
    """A file name as Spark reports it (a URI) -> an absolute local path, to match the dataset's files."""
    parsed = urlparse(uri)
    path = unquote(parsed.path) if parsed.scheme in ("file", "") else uri
    return os.path.normpath(path)


def _group_by_file(batch: pa.RecordBatch) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The rows of a batch per input file (a partition may span files), the file column dropped."""
    files = batch.column(_FILE)
    keep = [i for i, name in enumerate(batch.schema.names) if name != _FILE]
    rows = pa.RecordBatch.from_arrays([batch.column(i) for i in keep], schema=pa.schema([batch.schema.field(i)
                                                                                         for i in keep]))
    if pc.count_distinct(files).as_py() == 1:
        yield files[0].as_py(), rows
        return
    for name in pc.unique(files).to_pylist():
        yield name, rows.filter(pc.equal(files, name))


def _shrink(reducer: Any) -> None:
    """Compact the bounded samples a reducer holds (k rows each, not up to 2k + 1024) before it ships."""
    for value in vars(reducer).values():
        for item in value.values() if isinstance(value, dict) else (value,):
            if isinstance(item, Reservoir):
                item.compact()


def _emit(reducer: Any) -> Iterator[pa.RecordBatch]:
    """A reducer as rows (src: this task's partition, seq, a piece of its pickle of at most _CHUNK bytes)."""
    _shrink(reducer)
    blob = memoryview(pickle.dumps(reducer, protocol=5))
    src = pa.array([TaskContext.get().partitionId()], pa.int64())  # type: ignore[union-attr]
    for seq, start in enumerate(range(0, len(blob), _CHUNK)):
        piece = pa.array([blob[start:start + _CHUNK].tobytes()], pa.binary())
        yield pa.RecordBatch.from_arrays([src, pa.array([seq], pa.int64()), piece], schema=_STATE)


def _rebuild(pieces: list[tuple[int, bytes]]) -> Any:
    if [seq for seq, _ in pieces] != list(range(len(pieces))):
        raise RuntimeError(f"the pieces of a partial pass came out of order: {[seq for seq, _ in pieces]}")
    return pickle.loads(b"".join(piece for _, piece in pieces))


def _reducers(batches: Iterator[pa.RecordBatch]) -> Iterator[Any]:
    """The reducers in rows sorted by (src, seq), each rebuilt from its pieces."""
    src: int | None = None
    pieces: list[tuple[int, bytes]] = []
    for batch in batches:
        for s, seq, piece in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if s != src and pieces:
                yield _rebuild(pieces)
                pieces = []
            src = s
            pieces.append((seq, piece))
    if pieces:
        yield _rebuild(pieces)


def _merge_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """One task of the merge tree: the reducers of its partition merged into one, shipped as rows."""
    merged = None
    try:
        for reducer in _reducers(batches):
            if merged is None:
                merged = reducer
            else:
                merged.merge(reducer)
    except ExitwiseError as exc:
        raise _wrap(exc) from None
    if merged is not None:
        yield from _emit(merged)


@dataclass(frozen=True, eq=False)
class _Fold:
    """What one partition runs (pickled to the executors): fold its batches into a fresh reducer."""

    source: Any  # broadcast ParquetDataset
    reducer: Any  # broadcast pickled reducer (a fresh copy per partition: Python workers are reused)
    select: RowSelector | None
    files: Any  # broadcast {absolute path: the dataset's LogFile}
    rows: Any  # accumulator of rows read (progress)

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        source: ParquetDataset = self.source.value
        files: dict[str, LogFile] = self.files.value
        reducer = pickle.loads(self.reducer.value)
        folded = 0
        try:
            for batch in batches:
                for uri, rows in _group_by_file(batch):
                    n = rows.num_rows
                    f = files.get(_file_key(uri))
                    if f is None:
                        raise RuntimeError(f"Spark read {uri}, which is not a file of the dataset {source.root}")
                    if self.select is not None and n:  # keys as the dataset's own chunks() decode them
                        keep = np.asarray(self.select(source._keys(rows, f, self.select.key, None)), dtype=bool)
                        rows = rows.filter(pa.array(keep)) if keep.any() else rows.slice(0, 0)
                    if rows.num_rows:
                        reducer.update(source.decode(pa.Table.from_batches([rows]), str(f.path), f.partition,
                                                     None, n))
                        folded += 1
                    self.rows.add(n)
        except ExitwiseError as exc:
            raise _wrap(exc) from None
        if folded:
            yield from _emit(reducer)


def _tree_merge(states: DataFrame, n: int) -> list[Any]:
    """Merge the partition reducers on the executors, FAN_IN per task, and collect the one left (or none)."""
    while n > 1:
        m = max(1, math.ceil(n / FAN_IN))
        with _quiet_pandas():
            states = (states.repartition(m, F.col("src") % m).sortWithinPartitions("src", "seq")
                      .mapInArrow(_merge_partition, _STATE_DDL))
        n = m
    # the pieces of the last reducer spread over partitions fetched one at a time: never all in the JVM at once
    rows = states.repartition(_FETCH_PARTITIONS, "seq").toLocalIterator()
    pieces = sorted((int(r["seq"]), bytes(r["chunk"])) for r in rows)
    return [_rebuild(pieces)] if pieces else []


@dataclass(frozen=True, eq=False)
class SparkRunner:
    """A Runner on a Spark session (see the module docstring)."""

    session: SparkSession
    poll: float = 0.25  # seconds between progress updates

    def __call__(self, source: Any, reducer: Any, select: RowSelector | None, meter: Meter) -> Any:
        if not isinstance(source, ParquetDataset):
            raise InputError(f"--engine spark reads Parquet datasets, not {type(source).__name__}")
        if source.files and source.schema is not None:
            for part in self._run(source, reducer, select, meter):
                reducer.merge(part)
        source.check_unchanged()
        return reducer

    def _run(self, source: ParquetDataset, reducer: Any, select: RowSelector | None, meter: Meter) -> list[Any]:
        """The merged reducer of every partition (a list of one, or none without rows).

        The Spark calls run in a thread of their own while this one waits and reports progress,
        so Ctrl-C lands here, never inside a call to the JVM, and cancels the pass's jobs.
        """
        sc = self.session.sparkContext
        paths = [str(f.path) for f in source.files]
        names = {os.path.normpath(os.path.abspath(f.path)): f for f in source.files}
        names.update({os.path.normpath(os.path.realpath(f.path)): f for f in source.files})
        rows = sc.accumulator(0)
        shared = [sc.broadcast(source), sc.broadcast(pickle.dumps(reducer, protocol=5)), sc.broadcast(names)]
        fold = _Fold(source=shared[0], reducer=shared[1], select=select, files=shared[2], rows=rows)
        group = f"exitwise-{uuid.uuid4().hex[:12]}"
        out: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                sc.setJobGroup(group, f"exitwise {meter.label}", interruptOnCancel=True)
                out["merged"] = _tree_merge(*self._states(source, paths, fold))
            except BaseException as exc:
                out["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=work, daemon=True, name="exitwise-spark-pass")
        try:
            thread.start()
            while not done.wait(self.poll):
                if int(rows.value) > meter.done:
                    meter.advance(int(rows.value) - meter.done)
        except KeyboardInterrupt:  # PySpark's own handler may have cancelled every job already
            tracker = sc.statusTracker()
            if set(tracker.getJobIdsForGroup(group)) & set(tracker.getActiveJobsIds()):
                sc.cancelJobGroup(group)
            thread.join(timeout=30)
            raise
        finally:
            for b in shared:
                b.destroy()
        if "error" in out:
            exc = out["error"]
            err = _unwrap(exc)
            if err is not None:
                raise err from None
            if not isinstance(exc, Exception):
                raise exc
            raise _failure(exc) from exc
        meter.advance(max(0, int(rows.value) - meter.done))
        meter.finish()
        return out["merged"]

    def _states(self, source: ParquetDataset, paths: list[str], fold: _Fold) -> tuple[DataFrame, int]:
        """The partition reducers as rows (the files' columns and names folded by ``fold``), and how many."""
        self.session.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(source.batch_rows))
        base = source.root if source.root.is_dir() else source.root.parent
        cols = [F.col("`" + c.replace("`", "``") + "`") for c in source.columns]
        df = (self.session.read.option("basePath", str(base)).parquet(*paths)
              .select(*cols, F.input_file_name().alias(_FILE)))
        with _quiet_pandas():
            return df.mapInArrow(fold, _STATE_DDL), df.rdd.getNumPartitions()


def spark_runner(master: str | None = None) -> Runner:
    """A Runner on Spark at ``master``: ``local[2]``, ``spark://host:7077``, ``yarn``.

    None: the master spark-submit set, else ``local[2]``. A session already running in this
    process is reused (the tests' and a notebook's).
    """
    return SparkRunner(_session(master))
