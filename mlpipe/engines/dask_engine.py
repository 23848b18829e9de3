"""The Dask engine: the statistics pass distributed over the input files.

    client                                   workers (processes)
    ------                                   -------------------
    schema, checks, categorical levels,      one task per input file (or per run of a
    scale()/poly() constants (one DuckDB     Parquet file's row groups, `split_parts`):
    query over those columns only)             DuckDB's statistics pass (mlpipe/stats.py)
                                               with the client's coding -> partial Statistics
                                             tree reduction, FAN_IN partials per task:
                                               Statistics.combine (cells added by key)
    the merged Statistics  <-----------------  one value

With no scheduler address a `LocalCluster` of `workers` processes (one thread each) is
started for the pass and closed after it; with one, the running cluster is used.  A task
whose worker dies is retried (RETRIES times, on another worker when there is one); when
that fails too the pass stops with a one-line error.  The merged sums differ from the
DuckDB engine's by rounding only (a different order of additions: ~1e-15 relative).

Not distributed (refused, naming the option): center() / group_mean() (their means come
from all rows; the DuckDB engine computes them in the same pass), residual structures (a
series split between files would lose its lags) and data in memory (nothing to send).
The merged per-group statistics come back to the client (O(groups) memory there).
"""

from __future__ import annotations

import logging
import time

from ..errors import DataError, InputError
from .base import Engine, cpu_count

#: partials merged by one reduction task
FAN_IN = 8
#: times a task is retried when its worker dies
RETRIES = 2
#: the least memory a LocalCluster worker gets (below it the nannies restart workers that
#: run out of memory over and over)
MIN_WORKER_MEMORY = 512 * 10**6


#: a Parquet file is split into tasks of whole row groups when there are fewer files than
#: TASKS_PER_WORKER tasks per worker
TASKS_PER_WORKER = 4


def partial_statistics(part, formula: str, weights: str | None, coding: dict,
                       types: dict, duck: dict):
    """A worker's task: the statistics of one input file, or of some of a Parquet file's
    row groups (`part` = (path, [row groups]): read by pyarrow, only the model's columns),
    of no cells when it has no complete rows — read with the client's types of the model
    columns and its coding of categorical predictors."""
    from ..errors import MlpipeError
    from ..stats import compute_statistics

    if isinstance(part, str):
        return compute_statistics(part, formula, weights=weights, coding=coding,
                                  partial=True, types=types, **duck)
    import pyarrow.parquet as pq

    path, groups = part
    table = pq.ParquetFile(path).read_row_groups(groups, columns=list(types))
    try:
        return compute_statistics(table, formula, weights=weights, coding=coding,
                                  partial=True, types=types, **duck)
    except MlpipeError as exc:  # name the file and its rows, not "data in memory"
        raise type(exc)(f"{path} (row groups {groups[0]}-{groups[-1]}): {exc}") from None


def split_parts(files: list[str], workers: int) -> list:
    """The tasks of the pass: one per file, or, when there are fewer files than
    TASKS_PER_WORKER × workers, each multi-row-group Parquet file cut into runs of whole
    row groups (about as many tasks in all; the rows of a run are contiguous, so the
    partials merge as the file's would)."""
    want = TASKS_PER_WORKER * max(1, workers)
    if len(files) >= want:
        return list(files)
    import pyarrow.parquet as pq

    counts = {}
    for f in files:
        if f.lower().endswith((".parquet", ".pq", ".parq")):
            try:
                counts[f] = pq.ParquetFile(f).metadata.num_row_groups
            except Exception:  # not readable as Parquet here: one task, DuckDB reports it
                counts[f] = 1
    total = sum(counts.values()) + sum(1 for f in files if f not in counts)
    per_task = max(1, -(-total // want))
    parts: list = []
    for f in files:
        n = counts.get(f, 1)
        if n <= 1 or per_task >= n:
            parts.append(f)
        else:
            parts += [(f, list(range(a, min(a + per_task, n)))) for a in range(0, n, per_task)]
    return parts


def combine(*parts):
    """A reduction task: the partials' combined statistics."""
    from ..stats import Statistics

    return Statistics.combine(list(parts), source="")


class DaskEngine(Engine):
    name = "dask"

    def statistics(self, data, formula, *, weights=None, correlation=None,
                   residual_variance_by=None, coding=None):
        from .._sql import Source, connect
        from ..design import check_columns, check_weights, design_from_data
        from ..formula import parse_formula
        from .. import runlog

        parsed = parse_formula(formula)
        self.refuse(parsed, correlation, residual_variance_by,
                    why=" (a series or a mean spans the files, and each file is a task)")
        t0 = time.perf_counter()
        source = Source(data)
        if source.in_memory:
            raise InputError("the Dask engine distributes input files: give a path (data in "
                             "memory is read by --engine duckdb or polars)")
        files = source.files()
        opts = self.options
        con = connect(**opts.duckdb())
        try:
            schema = source.schema(con, parsed.value_columns() + ([weights] if weights else []))
            check_columns(parsed, schema)
            check_weights(weights, schema)
            design = design_from_data(con, source, parsed, schema, weights=weights,
                                      coding=coding)
        finally:
            con.close()
        t1 = time.perf_counter()
        runlog.stage("prepare", t1 - t0)
        workers = opts.workers or cpu_count()
        duck = {"threads": opts.threads or 1, "temp_directory": opts.temp_directory,
                "memory_limit": _per_worker(opts.memory_limit, workers)
                if not opts.scheduler else opts.memory_limit}
        client, cluster = _connect(opts.scheduler, workers, opts.memory_limit)
        from ..design import model_columns

        types = {c: schema[c] for c in model_columns(parsed, weights) if c in schema}
        try:
            parts = split_parts(files, workers if not opts.scheduler else
                                len(client.scheduler_info().get("workers", {})) or workers)
            stats = _run(client, parts, formula, weights, design.levels, types, duck)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        if stats.n == 0:
            raise DataError(f"no rows left after dropping rows with missing values "
                            f"({stats.rows_read} rows read, all dropped)")
        stats.source = source.location
        stats.timings = {"prepare": t1 - t0, "scan": time.perf_counter() - t1}
        runlog.stage("scan", stats.timings["scan"], tasks=len(parts),
                     **runlog.statistics_fields(stats))
        return stats


def _run(client, files: list, formula: str, weights, coding: dict, types: dict,
         duck: dict):
    from distributed import KilledWorker, as_completed

    from .. import progress

    futures = client.map(partial_statistics, files, formula=formula, weights=weights,
                         coding=coding, types=types, duck=duck, retries=RETRIES, pure=False)
    names = {f.key: (path if isinstance(path, str) else
                     f"{path[0]} (row groups {path[1][0]}-{path[1][-1]})")
             for f, path in zip(futures, files)}
    parts = list(futures)
    while len(futures) > 1:
        futures = [client.submit(combine, *futures[i:i + FAN_IN], retries=RETRIES, pure=False)
                   for i in range(0, len(futures), FAN_IN)]
    try:
        if progress.active():
            n_files = len({f if isinstance(f, str) else f[0] for f in files})
            with progress.stage(f"{len(files)} tasks on Dask ({n_files} files)",
                                total=len(files)) as bar:
                for _ in as_completed(parts):
                    bar.advance()
        del parts
        return futures[0].result()
    except KilledWorker as exc:
        key = getattr(exc, "task", None) or (exc.args[0] if exc.args else "")
        what = names.get(key, "a reduction of partial statistics")
        raise DataError(f"a Dask worker died {RETRIES + 1} times while computing {what}; "
                        f"see the workers' logs (out of memory?)") from None


def _per_worker(limit: str | None, workers: int) -> str | None:
    if not limit:
        return None
    from ..blocked import parse_bytes

    return f"{max(1, parse_bytes(limit) // workers // 10**6)}MB"


def _connect(address: str | None, workers: int, memory_limit: str | None):
    """A client of the cluster at `address`, or of a new LocalCluster of `workers`
    processes (returned too, to close)."""
    from distributed import Client, LocalCluster

    if address:
        try:
            return Client(address, timeout="10s"), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {address}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from None
    from ..blocked import parse_bytes

    if memory_limit and parse_bytes(memory_limit) // workers < MIN_WORKER_MEMORY:
        raise InputError(f"--memory-limit {memory_limit} leaves {workers} Dask workers "
                         f"{parse_bytes(memory_limit) // workers // 10**6} MB each: a worker "
                         f"needs at least {MIN_WORKER_MEMORY // 10**6} MB (raise the limit or "
                         f"use fewer --workers)")
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               memory_limit=(parse_bytes(memory_limit) // workers
                                             if memory_limit else "auto"),
                               dashboard_address=None, worker_dashboard_address=None,
                               silence_logs=logging.ERROR)
    except (RuntimeError, OSError) as exc:  # e.g. a script read from stdin cannot spawn
        raise InputError(f"could not start a Dask LocalCluster of {workers} worker "
                         f"processes ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                         f"run from a script or module with an `if __name__ == "
                         f"\"__main__\":` guard, or give --scheduler") from None
    return Client(cluster), cluster
