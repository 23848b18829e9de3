"""The engines at scale: `y ~ x * w + (x | g)` (w a level-2 covariate) on synthetic panels
of 1M / 10M / 100M rows (groups = rows / 100: 10k / 100k / 1M) in many Parquet files,
through the DuckDB, Polars and Dask engines (dask-keep: Dask with --keep-on-workers, the
groups' statistics left on the workers), against a bare DuckDB aggregation.

    .venv/bin/python benchmarks/bench_scale.py [--rows 1000000 10000000 100000000]
                                                [--engines duckdb polars dask dask-keep]
                                                (make bench-scale)

Each fit runs in a fresh interpreter (`mlpipe.fit(DATA, FORMULA, engine=...)`; Dask on a
LocalCluster of 2 worker processes started by that interpreter before the fit); the figures
are the whole subprocess (interpreter start, imports, cluster start-up and shutdown, the fit
with Satterthwaite df), fit() alone, the statistics pass, and the peak RSS (VmHWM) of the
process — for Dask the sum of the client's and both workers' peaks.  The floor is the same
per-group sums as one bare DuckDB GROUP BY in this process (bench.py's, best of 2, the
result fetched to Arrow).  Data are simulated once into bench_data_scale/ (not in git).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import ensure_data, run_floor, run_fit  # noqa: E402

FORMULA = "y ~ x * w + (x | g)"
RATIO_TARGET = 1.5
RSS_TARGET_MB = 2048


def child(data: str, formula: str, engine: str) -> None:
    t0 = time.perf_counter()
    import mlpipe
    import mlpipe.model  # noqa: F401  (imported lazily by mlpipe: timed apart)
    from mlpipe.runlog import peak_memory_mb

    t1 = time.perf_counter()
    workers_mb = []
    if engine.startswith("dask"):  # the cluster is started here, to read its workers' peaks
        import logging

        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None, worker_dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            t1 = time.perf_counter()
            res = mlpipe.fit(data, formula, engine="dask", scheduler=cluster.scheduler_address,
                             keep_on_workers=engine == "dask-keep")
            t2 = time.perf_counter()
            workers_mb = list(client.run(peak_memory_mb).values())
    else:
        res = mlpipe.fit(data, formula, engine=engine)
        t2 = time.perf_counter()
    print("BENCH_RESULT " + json.dumps({
        "import_seconds": t1 - t0, "fit_seconds": t2 - t1, "timings": res.timings,
        "peak_rss_mb": peak_memory_mb() + sum(workers_mb), "client_mb": peak_memory_mb(),
        "workers_mb": workers_mb, "deviance": res.deviance, "nobs": res.nobs,
        "groups": res.groups, "converged": res.converged,
        "evaluations": res.optimizer.evaluations}))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--engines", nargs="+", default=["duckdb", "polars", "dask", "dask-keep"])
    ap.add_argument("--data", default="bench_data_scale")
    args = ap.parse_args(argv)
    import duckdb
    import polars
    import dask

    print(f"bench-scale: {FORMULA}; machine: {os.cpu_count()} CPUs; DuckDB {duckdb.__version__}, "
          f"Polars {polars.__version__}, Dask {dask.__version__}")
    print("whole = the fresh subprocess start to end; fit() = the call alone; pass = the "
          "statistics pass inside it;\nfloor = bare DuckDB GROUP BY of the same sums in a warm "
          "process (best of 2)\n")
    head = (f"{'rows':>12} {'groups':>9} {'files':>5} {'engine':>7} {'whole s':>8} "
            f"{'fit() s':>8} {'pass s':>7} {'floor s':>7} {'whole/floor':>11} "
            f"{'vs duckdb':>9} {'peak MB':>8} {'client MB':>9}  deviance")
    print(head)
    print("-" * len(head))
    summary = []
    for rows in args.rows:
        groups = rows // 100
        files = max(8, min(64, rows // 1_500_000))
        data = ROOT / args.data / f"rows_{rows}"
        ensure_data(data, rows, groups, files, seed=1)
        floor, _runs, _g = run_floor(data, 2)
        base = None
        for engine in args.engines:
            r = run_fit(data, FORMULA, Path(__file__), [engine])
            whole = r["subprocess_seconds"]
            base = whole if engine == "duckdb" else base
            tm = r["timings"]
            stats_pass = tm.get("prepare", 0) + tm.get("scan", 0)
            vs = f"{whole / base:.2f}x" if base else "-"
            print(f"{rows:>12,} {groups:>9,} {files:>5} {engine:>9} {whole:>8.2f} "
                  f"{r['fit_seconds']:>8.2f} {stats_pass:>7.2f} {floor:>7.2f} "
                  f"{whole / floor:>10.2f}x {vs:>9} {r['peak_rss_mb']:>8.0f} "
                  f"{r['client_mb']:>9.0f}  "
                  f"{r['deviance']:.6f}", flush=True)
            summary.append((rows, engine, whole, floor, r["peak_rss_mb"]))
    print()
    largest = max(args.rows)
    for rows, engine, whole, floor, peak in summary:
        if rows != largest:
            continue
        ratio = whole / floor
        print(f"{rows:,} rows, {engine}: whole process / floor {ratio:.2f}x (target <= "
              f"{RATIO_TARGET}: {'met' if ratio <= RATIO_TARGET else 'NOT MET'}); peak RSS "
              f"{peak:.0f} MB (target <= {RSS_TARGET_MB}: "
              f"{'met' if peak <= RSS_TARGET_MB else 'NOT MET'})")
    duck = {rows: whole for rows, engine, whole, _f, _p in summary if engine == "duckdb"}
    if len(duck) > 1:
        rs = sorted(duck)
        steps = ", ".join(f"{b / a:.0f}x rows -> {duck[b] / duck[a]:.1f}x time"
                          for a, b in zip(rs, rs[1:]))
        print(f"DuckDB engine curve (whole process): {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
