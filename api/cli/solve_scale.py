"""``exitwise solve --engine stream|spark``: the scale engine behind the solve command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ModelCard
from exitwise.calibration.pipeline import SolveSpec
from exitwise.calibration.scale.dataset import DEFAULT_BATCH_ROWS, ParquetDataset
from exitwise.calibration.scale.engine import ScaleSettings
from exitwise.calibration.scale.runner import ProgressFn, Runner, run_local
from exitwise.calibration.scale.where import parse_where
from exitwise.policies.authoring import ScaleOutcome, solve_policy_at_scale

__all__ = ["ENGINES", "check_engine_options", "open_dataset", "scale_runner", "scale_settings", "scale_summary",
           "solve_scale"]

ENGINES = ("memory", "stream", "spark")


def check_engine_options(engine: str, *, where: str | None, test: Path | None, spark_only: bool) -> None:
    """The options that only one engine takes (InputError naming the option)."""
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "memory":
        if where:
            raise InputError("--where filters the partitions of a dataset: give --engine stream (or spark)")
        if spark_only:
            raise InputError("--master is Spark's: give --engine spark")
        return
    if test is not None:
        raise InputError(f"--test is not available with --engine {engine}: evaluate the policy on the test logs "
                         "with 'exitwise evaluate'")
    if spark_only and engine != "spark":
        raise InputError("--master is Spark's: give --engine spark")


def scale_runner(engine: str, master: str | None) -> Runner:
    """The pass runner of ``engine``: this process, or Spark (the ``[spark]`` extra)."""
    if engine == "stream":
        return run_local
    try:
        # lazy: PySpark (the [spark] extra) takes seconds to import and is not installed by default
        from exitwise.calibration.scale.spark import spark_runner
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "exitwise":
            raise
        raise InputError("--engine spark needs PySpark: pip install 'exitwise[spark]' (and Java 17)") from None
    return spark_runner(master)


def open_dataset(logs: Path, card: ModelCard, where: str | None, batch_rows: int | None) -> ParquetDataset:
    """The dataset at ``logs`` (a Parquet file or directory), its partitions filtered by ``where``."""
    source = ParquetDataset(logs, card, where=parse_where(where), batch_rows=batch_rows or DEFAULT_BATCH_ROWS)
    if not source.files:
        raise InputError(f"{logs}: --where {where!r} keeps no file of the dataset")
    return source


def scale_settings(sample_rows: int) -> ScaleSettings:
    """The engine's settings for ``--sample-rows`` (the report sample is as large, at most 100,000 rows)."""
    return ScaleSettings(sample_rows=sample_rows, report_rows=max(1_000, min(sample_rows, 100_000)))


def solve_scale(logs: Path, card: ModelCard, card_path: Path, spec: SolveSpec, *, engine: str, where: str | None,
                sample_rows: int, batch_rows: int | None, master: str | None, shadow_rate: float,
                progress: ProgressFn) -> ScaleOutcome:
    """Solve ``spec`` on the dataset at ``logs`` with the scale engine ``engine``."""
    source = open_dataset(logs, card, where, batch_rows)
    filt = source.where
    settings = scale_settings(sample_rows)
    return solve_policy_at_scale(
        source, spec, settings=settings, runner=scale_runner(engine, master), shadow_rate=shadow_rate,
        progress=progress, where=filt.to_json(),
        evidence={"logs": str(logs.resolve()), "card": str(card_path.resolve())})


def scale_summary(outcome: ScaleOutcome) -> dict[str, Any]:
    """What the run measured per pass: rows read and seconds."""
    return {name: {"rows": int(v["rows"]), "seconds": round(v["seconds"], 3)}
            for name, v in outcome.result.passes.items()}
