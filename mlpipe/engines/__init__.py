"""Engines: what reads the data and builds the model's `Statistics`.

    duckdb   embedded DuckDB (the default): one streaming SQL pass (sql/, mlpipe/stats.py)
    polars   Polars' lazy API over scan_parquet / scan_csv (mlpipe/engines/polars_engine.py)
    dask     the DuckDB pass on every input file as a Dask task, on a LocalCluster of worker
             processes or an existing cluster, the partials merged by a tree reduction
             (mlpipe/engines/dask_engine.py)

`get_engine(name, options)` gives one; every engine returns the same `Statistics` value, so
the solver, results and inference cannot tell engines apart.
"""

from __future__ import annotations

from .base import ENGINE_NAMES, Engine, EngineOptions, get_engine

__all__ = ["ENGINE_NAMES", "Engine", "EngineOptions", "get_engine"]
