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
The merged per-group statistics come back to the client (O(groups) memory there); with
`--keep-on-workers` (`worker_statistics`, mlpipe/engines/dask_solve.py) they stay on the
workers, split by group, and the fit maps over them.
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
        return self._pass(data, formula, weights, correlation, residual_variance_by, coding)

    def worker_statistics(self, data, formula, *, weights=None):
        """The statistics pass with the per-group statistics left on the workers
        (`--keep-on-workers`, mlpipe/engines/dask_solve.py): the partials split by a hash
        of the group and merged per partition there.  Returns a `dask_solve.WorkerStatistics`
        (the client, the partitions' futures and the totals); close it when done."""
        return self._pass(data, formula, weights, None, None, None, keep=True)

    def _pass(self, data, formula, weights, correlation, residual_variance_by, coding, *,
              keep: bool = False):
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
        if keep and design.group is None:
            raise InputError("--keep-on-workers fits models with one grouping factor (its "
                             "groups are split between the workers); nested and crossed "
                             "models are fitted on the client: drop --keep-on-workers")
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
            n_workers = workers if not opts.scheduler else \
                len(client.scheduler_info().get("workers", {})) or workers
            parts = split_parts(files, n_workers)
            if keep:
                from .dask_solve import keep_statistics

                kept = keep_statistics(client, cluster, parts, formula, weights,
                                       design.levels, types, duck, n_workers)
                kept.header.source = source.location
                kept.header.timings = {"prepare": t1 - t0, "scan": time.perf_counter() - t1}
                runlog.stage("scan", kept.header.timings["scan"], tasks=len(parts),
                             rows=kept.header.rows_read, rows_used=kept.header.n,
                             groups={kept.header.group: kept.m}, partitions=len(kept.parts))
                client = cluster = None  # the WorkerStatistics closes them
                return kept
            stats = _run(client, parts, formula, weights, design.levels, types, duck)
        finally:
            if client is not None:
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
    parts, names = map_partials(client, files, formula, weights, coding, types, duck)
    futures = tree_reduce(client, combine, parts)
    with killed_worker_reported(names):
        wait_for_scan(parts, files)
        del parts
        return futures[0].result()


def map_partials(client, files: list, formula: str, weights, coding: dict, types: dict,
                 duck: dict):
    """The scan's tasks (futures of partial Statistics, one per input part) and the names of
    their inputs by task key (for `killed_worker_reported`)."""
    futures = client.map(partial_statistics, files, formula=formula, weights=weights,
                         coding=coding, types=types, duck=duck, retries=RETRIES, pure=False)
    names = {f.key: (path if isinstance(path, str) else
                     f"{path[0]} (row groups {path[1][0]}-{path[1][-1]})")
             for f, path in zip(futures, files)}
    return list(futures), names


def tree_reduce(client, fn, futures: list) -> list:
    """`fn` over FAN_IN futures at a time until one is left (a list of one future)."""
    while len(futures) > 1:
        futures = [client.submit(fn, *futures[i:i + FAN_IN], retries=RETRIES, pure=False)
                   for i in range(0, len(futures), FAN_IN)]
    return futures


def wait_for_scan(parts: list, files: list) -> None:
    """The progress bar of the scan's tasks on a terminal (nothing otherwise)."""
    from distributed import as_completed

    from .. import progress

    if progress.active():
        n_files = len({f if isinstance(f, str) else f[0] for f in files})
        with progress.stage(f"{len(files)} tasks on Dask ({n_files} files)",
                            total=len(files)) as bar:
            for _ in as_completed(parts):
                bar.advance()


class killed_worker_reported:
    """Context: a task that killed its worker RETRIES + 1 times becomes a one-line DataError
    naming its input (`names`: task key → input) or `what`."""

    def __init__(self, names: dict, what: str = "a reduction of partial statistics"):
        self.names, self.what = names, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from distributed import KilledWorker

        if kind is None or not issubclass(kind, KilledWorker):
            return False
        key = getattr(exc, "task", None) or (exc.args[0] if exc.args else "")
        what = self.names.get(key, self.what)
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
