"""The scale benchmark: simulate a large panel, fit it with mlpipe, compare with a bare
DuckDB query.

    .venv/bin/python benchmarks/bench.py [--rows 10000000 --groups 100000 ...]   (`make bench`)

1. Simulates the panel into --data (default bench_data/) unless a simulation with the same
   settings is already there (its truth.json says so and all its files exist).
2. Runs the full `mlpipe.fit(DATA, FORMULA)` in a fresh Python subprocess (--fit-runs times,
   the best run reported) and measures its wall time (inside: the fit() call; outside: the
   whole subprocess, interpreter start and imports included) and the peak RSS of the
   subprocess (getrusage of the child).
3. Times the floor: one bare DuckDB query over the same Parquet computing the same per-group
   sums of cross-products as mlpipe's statistics pass (best of --floor-runs).
4. Prints the figures, and the estimates against the simulation's truth with their standard
   errors (fixed effects: from the fit; variance components: from the curvature of the
   criterion, see mlpipe.simulate.variance_component_se).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMULA = "y ~ x * w + (x | g)"
RSS_TARGET_MB = 1024
RATIO_TARGET = 1.5


# ---------------------------------------------------------------------- the fit subprocess

def child(data: str, formula: str) -> None:
    """Runs in the fresh subprocess: fit, then report figures as one JSON line."""
    t_start = time.perf_counter()
    import mlpipe
    from mlpipe.simulate import compare_to_truth, read_truth

    t_import = time.perf_counter()
    result = mlpipe.fit(data, formula)
    t_fit = time.perf_counter()
    from mlpipe.runlog import peak_memory_mb

    # VmHWM: this process's own high-water mark (a child's ru_maxrss starts at its parent's)
    peak_fit_kb = peak_memory_mb() * 1024
    opt = result.optimizer
    out = {
        "import_seconds": t_import - t_start,
        "fit_seconds": t_fit - t_import,
        "peak_rss_fit_kb": peak_fit_kb,
        "timings": dict(result.timings),
        "evaluations": opt.evaluations,
        "gradient_evaluations": getattr(opt, "gradient_evaluations", None),
        "optimizer": opt.optimizer,
        "optimizer_seconds": opt.seconds,
        "start": getattr(opt, "start", None),
        "return_code": opt.return_code,
        "converged": result.converged,
        "max_abs_gradient": opt.max_abs_gradient,
        "deviance": result.deviance,
        "nobs": result.nobs,
        "groups": result.groups,
    }
    truth = read_truth(data)
    if truth is not None:
        out["comparison"] = compare_to_truth(result, truth)
    print("BENCH_RESULT " + json.dumps(out))


def run_fit(data: Path, formula: str, script: Path | None = None,
            extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Run `script --child DATA FORMULA [EXTRA...]` (this file by default) in a fresh
    interpreter and return the JSON of its BENCH_RESULT line, plus `subprocess_seconds`."""
    script = Path(__file__) if script is None else script
    cmd = [sys.executable, str(script.resolve()), "--child", str(data), formula, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the fit subprocess failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("BENCH_RESULT "))
    out = json.loads(line[len("BENCH_RESULT "):])
    out["subprocess_seconds"] = wall
    return out


# ---------------------------------------------------------------------- the floor

def floor_sql(data: Path) -> str:
    """The per-group sums mlpipe needs for y ~ x * w + (x | g), written by hand.

    Columns [1 x w x·w y]: every sum of a product of two of them, per group (Z = [1 x] needs
    its products with everything, X = [1 x w x·w] with X and y, and y'y) — i.e. count(*) and
    the 14 sums below, which is exactly what mlpipe's statistics pass computes.
    """
    cols = {"x": "x", "w": "w", "xw": "x * w", "y": "y"}
    sums = [f"sum({e}) AS s_{k}" for k, e in cols.items()]
    for (ka, ea), (kb, eb) in itertools.combinations_with_replacement(cols.items(), 2):
        sums.append(f"sum(({ea}) * ({eb})) AS s_{ka}_{kb}")
    glob = str(data / "*.parquet").replace("'", "''")
    return (f"SELECT g, count(*) AS n, {', '.join(sums)} "
            f"FROM read_parquet('{glob}') GROUP BY g")


def run_floor(data: Path, runs: int) -> tuple[float, list[float], int]:
    import duckdb

    sql = floor_sql(data)
    times = []
    groups = 0
    for _ in range(runs):
        con = duckdb.connect()
        t0 = time.perf_counter()
        table = con.sql(sql).to_arrow_table()  # the result leaves DuckDB, as mlpipe's
        times.append(time.perf_counter() - t0)
        groups = table.num_rows
        con.close()
    return min(times), times, groups


# ---------------------------------------------------------------------- data

def ensure_data(data: Path, rows: int, groups: int, partitions: int, seed: int) -> str:
    sys.path.insert(0, str(ROOT))
    from mlpipe.simulate import read_truth, simulate

    truth = read_truth(data)
    if truth is not None and all(truth.get(k) == v for k, v in
                                 {"rows": rows, "groups": groups, "seed": seed,
                                  "partitions": min(partitions, groups)}.items()) \
            and all((data / f).is_file() for f in truth.get("files", [])) and truth.get("files"):
        return "reused"
    t0 = time.perf_counter()
    simulate(data, rows=rows, groups=groups, partitions=partitions, seed=seed)
    return f"simulated in {time.perf_counter() - t0:.1f} s"


# ---------------------------------------------------------------------- report

def _fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} s"


def report(args, data_note: str, fits: list[dict], floor: tuple[float, list[float], int]) -> int:
    best = min(fits, key=lambda r: r["fit_seconds"])
    floor_best, floor_times, floor_groups = floor
    tm = best["timings"]
    stats_pass = tm.get("prepare", 0.0) + tm.get("scan", 0.0)
    solve = tm.get("solve")
    inference = tm.get("inference")
    peak_mb = max(r["peak_rss_fit_kb"] for r in fits) / 1024  # measured in each child
    fit_s = best["fit_seconds"]
    ratio = fit_s / floor_best
    ratio_sub = best["subprocess_seconds"] / floor_best
    import duckdb
    import numpy

    print(f"mlpipe benchmark: {args.rows:,} rows, {args.groups:,} groups, {args.partitions} "
          f"Parquet partitions in {args.data}/ ({data_note})")
    print(f"formula: {args.formula}")
    print(f"machine: {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; Python "
          f"{platform.python_version()}, DuckDB {duckdb.__version__}, NumPy {numpy.__version__}")
    print()
    rows = [
        ("mlpipe.fit() wall time" + (f" (best of {len(fits)})" if len(fits) > 1 else ""),
         _fmt_s(fit_s), ""),
        ("  statistics pass (prepare + scan)", _fmt_s(stats_pass),
         f"prepare {tm.get('prepare', 0):.3f} s + scan {tm.get('scan', 0):.3f} s"),
        ("  solver (optimize + results)", _fmt_s(solve),
         f"optimizer alone {best['optimizer_seconds']:.3f} s"),
        ("  inference (df, p-values)", _fmt_s(inference), ""),
        ("  other (formula checks, glue)",
         _fmt_s(fit_s - stats_pass - (solve or 0) - (inference or 0)), ""),
        ("fit runs", ", ".join(f"{r['fit_seconds']:.3f} s" for r in fits), ""),
        ("subprocess wall time (with interpreter start, imports)",
         _fmt_s(best["subprocess_seconds"]), f"imports {best['import_seconds']:.3f} s"),
        ("throughput", f"{args.rows / fit_s / 1e6:.2f} M rows/s", "rows / fit() wall time"),
        ("peak RSS of the fit subprocess", f"{peak_mb:.0f} MB",
         f"target <= {RSS_TARGET_MB} MB: {'met' if peak_mb <= RSS_TARGET_MB else 'NOT MET'}"),
        ("floor: bare DuckDB GROUP BY" + f" (best of {len(floor_times)})", _fmt_s(floor_best),
         "runs " + ", ".join(f"{t:.3f}" for t in floor_times) + f" s; {floor_groups:,} groups"),
        ("ratio mlpipe.fit() / floor", f"{ratio:.2f} x",
         f"target <= {RATIO_TARGET}: {'met' if ratio <= RATIO_TARGET else 'NOT MET'}"),
        ("ratio subprocess wall / floor", f"{ratio_sub:.2f} x", ""),
        ("ratio (statistics pass + solver) / floor",
         f"{(stats_pass + (solve or 0)) / floor_best:.2f} x", "fit() without the inference step"),
        ("ratio statistics pass / floor", f"{stats_pass / floor_best:.2f} x", ""),
        ("objective evaluations", str(best["evaluations"]),
         f"{best['gradient_evaluations']} with gradient; optimizer {best['optimizer']}, "
         f"start {best['start']}, {best['return_code']}"),
        ("converged", str(best["converged"]),
         f"max |gradient| {best['max_abs_gradient']:.2g}; deviance {best['deviance']:.4f}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'figure':<{w0}}  {'value':>{w1}}  note")
    print("-" * (w0 + w1 + 40))
    for name, value, note in rows:
        print(f"{name:<{w0}}  {value:>{w1}}  {note}")
    print()

    comp = best.get("comparison") or []
    if comp:
        print("estimates vs truth (fixed effects: SE from the fit; tau/sigma: SE from the "
              "observed information of the criterion)")
        print(f"{'parameter':<12} {'truth':>9} {'estimate':>10} {'SE':>9} {'z':>7}  within 3 SE")
        for r in comp:
            ok = abs(r["z"]) <= 3 if r["z"] == r["z"] else False
            print(f"{r['parameter']:<12} {r['truth']:>9.4f} {r['estimate']:>10.5f} "
                  f"{r['se']:>9.5f} {r['z']:>7.2f}  {'yes' if ok else 'NO'}")
        print()
    missed = []
    if ratio > RATIO_TARGET:
        missed.append(f"time ratio {ratio:.2f}x > {RATIO_TARGET}x")
    if peak_mb > RSS_TARGET_MB:
        missed.append(f"peak RSS {peak_mb:.0f} MB > {RSS_TARGET_MB} MB")
    if any(not abs(r["z"]) <= 3 for r in comp):
        missed.append("an estimate is more than 3 SE from the truth")
    print("targets: " + ("all met" if not missed else "NOT MET: " + "; ".join(missed)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", default="bench_data", help="data directory (under the repo root "
                    "when relative)")
    ap.add_argument("--formula", default=FORMULA)
    ap.add_argument("--fit-runs", type=int, default=2, help="fresh subprocesses; best reported")
    ap.add_argument("--floor-runs", type=int, default=2)
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.is_absolute():
        data = ROOT / data
    note = ensure_data(data, args.rows, args.groups, args.partitions, args.seed)
    floor = run_floor(data, args.floor_runs)
    fits = [run_fit(data, args.formula) for _ in range(max(1, args.fit_runs))]
    return report(args, note, fits, floor)


if __name__ == "__main__":
    sys.exit(main())
