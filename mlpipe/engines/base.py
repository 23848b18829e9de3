"""What an engine is: the resource options it runs with, and the statistics pass."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError

ENGINE_NAMES = ("duckdb", "polars", "dask")


@dataclass(frozen=True)
class EngineOptions:
    """The resources of a pass, one typed value instead of loose arguments.

    `threads` and `memory_limit` ("4GB") bound the pass (DuckDB's settings; Polars runs its
    streaming engine under a memory limit; a Dask worker gets memory_limit / workers);
    `temp_directory` is where DuckDB spills.  Dask only: `workers` (processes of the
    LocalCluster started when no `scheduler` address is given; default: one per CPU) and
    `scheduler` (the address of a running cluster, "tcp://host:8786")."""

    threads: int | None = None
    memory_limit: str | None = None
    temp_directory: str | None = None
    workers: int | None = None
    scheduler: str | None = None

    def duckdb(self) -> dict:
        """The options as `mlpipe.stats.compute_statistics` / `_sql.connect` take them."""
        return {"threads": self.threads, "memory_limit": self.memory_limit,
                "temp_directory": self.temp_directory}

    @classmethod
    def from_config(cls, config: dict) -> EngineOptions:
        """From a config's `[duckdb]` table (memory_limit, threads, temp_directory) and
        `[dask]` table (workers, scheduler) — what a result directory's config.toml holds."""
        duck, dask = config.get("duckdb") or {}, config.get("dask") or {}
        return cls(threads=duck.get("threads"), memory_limit=duck.get("memory_limit"),
                   temp_directory=duck.get("temp_directory"), workers=dask.get("workers"),
                   scheduler=dask.get("scheduler"))


class Engine:
    """An engine builds the `Statistics` of a model over a data source."""

    name = ""

    def __init__(self, options: EngineOptions | None = None):
        self.options = options or EngineOptions()

    def statistics(self, data, formula: str, *, weights: str | None = None,
                   correlation: str | None = None, residual_variance_by: str | None = None,
                   coding: dict[str, list] | None = None):
        """One pass over `data` → the model's `Statistics` (see mlpipe/stats.py)."""
        raise NotImplementedError

    def refuse(self, parsed, correlation, residual_variance_by, *, poly: bool = False,
               why: str = "") -> None:
        """What this engine does not compute, refused before any work, naming the engine
        that does: residual structures, center() / group_mean() (`why`: the reason), and
        with `poly`, poly()."""
        if correlation is not None or residual_variance_by is not None:
            raise InputError(f"the {self.name} engine does not fit residual structures{why}: "
                             f"use --engine duckdb")
        if parsed.aggregates():
            raise InputError(f"the {self.name} engine does not compute center() / "
                             f"group_mean(){why}: use --engine duckdb")
        if poly and any(c.value == "poly" for c in parsed.prepass()):
            raise InputError(f"the {self.name} engine does not compute poly(): use --engine "
                             f"duckdb")


def get_engine(name: str | None, options: EngineOptions | None = None) -> Engine:
    """The engine called `name` (None: DuckDB)."""
    name = "duckdb" if name is None else str(name).lower()
    options = options or EngineOptions()
    if name != "dask" and (options.workers is not None or options.scheduler is not None):
        raise InputError("--workers and --scheduler apply to the Dask engine only "
                         "(--engine dask)")
    if options.workers is not None and (int(options.workers) < 1):
        raise InputError(f"--workers must be a positive integer, not {options.workers}")
    if name == "duckdb":
        from .duckdb_engine import DuckDBEngine

        return DuckDBEngine(options)
    if name == "polars":
        from .polars_engine import PolarsEngine

        return PolarsEngine(options)
    if name == "dask":
        from .dask_engine import DaskEngine

        return DaskEngine(options)
    raise InputError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")


def cpu_count() -> int:
    return os.cpu_count() or 1
