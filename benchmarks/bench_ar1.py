"""Benchmark of serially correlated residuals, ar1(TIME | GROUP) (`make bench-ar1`).

    .venv/bin/python benchmarks/bench_ar1.py [--rows 10000000 ...] [--points 100000 1000000]

panel:  --rows rows (default 10M: 1M subjects x 10 occasions), y ~ t + w + (t | subject) with
        correlation ar1(t | subject).  Truth: y = 1 + 0.5 t + 0.3 w + b0 + b1 t + e, b0 ~ N(0, 1),
        b1 ~ N(0, 0.2^2), w a subject-level N(0, 1) covariate, e a stationary AR(1) series
        within the subject, phi 0.6, sd(e) 1.  Figures: the whole `mlpipe fit` in a fresh
        interpreter (wall time, peak RSS in the child), against the floor — one bare DuckDB
        query over the same Parquet with the same window (LAG over the subject's rows ordered
        by t) and the same compensated sums (fsum) of this row's, the previous row's and the
        cross products, grouped by subject and first-row-or-not, i.e. the numbers mlpipe's
        lag pass (sql/lag_moments.sql) computes.  Targets: whole process <= 2x the floor,
        peak RSS <= 2 GB.  Several --rows give a curve (`make bench-ar1`: 1M and 10M).
series: one long series per subject (2 subjects: a grouping factor needs two levels, and a
        series must lie within one level), --points time points each, y ~ t1 + (1 | subject)
        with ar1(t | subject), t1 = t / points, phi 0.6.  Figures: wall time, peak RSS, phi
        at each --points (default 100k and 1M), to show time linear and memory flat in the
        series length.  Target: seconds.

The data are simulated with NumPy chunk by chunk (seeded per chunk, so deterministic; memory
bounded by the chunk) into bench_data_ar1/<name>/part-*.parquet, every chunk's rows shuffled
and spread over the files (no file is sorted by subject or time: the window must sort), and
reused while their truth.json matches the settings.  Fits run in a subprocess with bench.py's
runner (`--child DATA FORMULA`; the correlation travels in the FORMULA argument after
`CORRELATION_SEP`); the child reports its own peak RSS as VmHWM (see `peak_rss_mb` for why
not ru_maxrss).  The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench_data_ar1"
PANEL = "y ~ t + w + (t | subject)"
SERIES = "y ~ t1 + (1 | subject)"
CORRELATION = "ar1(t | subject)"
CORRELATION_SEP = " ;; correlation="
PHI = 0.6
PANEL_BETA = {"(Intercept)": 1.0, "t": 0.5, "w": 0.3}
PANEL_SD = {"subject|(Intercept)": 1.0, "subject|t": 0.2}
SERIES_BETA = {"(Intercept)": 1.0, "t1": 0.5}
SERIES_SUBJECTS = 2
CHUNK_ROWS = 1 << 20
RATIO_TARGET = 2.0
RSS_TARGET_MB = 2048
RSS_FLAT = 0.25  # series: "memory O(1) in the length" read as peak RSS growing <= 25%
FORMAT = 1  # bump when the generator changes: the stored data are then regenerated


# ---------------------------------------------------------------------- the fit subprocess

def child(data: str, arg: str) -> None:
    """Runs in the fresh subprocess: fit with the correlation, report one JSON line."""
    formula, _, correlation = arg.partition(CORRELATION_SEP)
    t0 = time.perf_counter()
    import mlpipe
    import mlpipe.inference  # noqa: F401  (mlpipe imports lazily: the import time is
    import mlpipe.model  # noqa: F401  reported apart from fit())
    import mlpipe.residual  # noqa: F401
    from mlpipe.errors import MlpipeError

    t1 = time.perf_counter()
    try:
        res = mlpipe.fit(data, formula, correlation=correlation or None)
    except MlpipeError as exc:
        print("BENCH_RESULT " + json.dumps({"refused": str(exc),
                                            "fit_seconds": time.perf_counter() - t1}))
        return
    t2 = time.perf_counter()
    rs = res.residual_structure or {}
    out = {"import_seconds": t1 - t0, "fit_seconds": t2 - t1, "timings": res.timings,
           "peak_rss_mb": peak_rss_mb(),
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "phi": rs.get("phi"), "series": rs.get("series"),
           "outer": rs.get("optimizer", {}), "evaluations": res.optimizer.evaluations,
           "optimizer": res.optimizer.optimizer, "converged": res.converged,
           "nobs": res.nobs, "groups": res.groups, "sigma": res.sigma,
           "beta": {r["term"]: [r["estimate"], r["std_error"]]
                    for r in res.fixed_effects.iter_rows(named=True)},
           "sd": {f"{r['group']}|{r['term']}": r["std_dev"]
                  for r in res.random_effects.iter_rows(named=True)}}
    print("BENCH_RESULT " + json.dumps(out, default=str))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM of /proc/self/status (mlpipe.runlog.peak_memory_mb),
    not getrusage(RUSAGE_SELF).ru_maxrss, which Linux carries across exec from the process
    that forked: a child of a parent that has held 1.8 GB reports at least 1.8 GB."""
    from mlpipe.runlog import peak_memory_mb

    return peak_memory_mb()


def run_child(data: Path, formula: str, correlation: str) -> dict:
    """`child` in a fresh interpreter (bench.py's runner); `wall` is the whole process's."""
    from bench import run_fit

    out = run_fit(data, formula + CORRELATION_SEP + correlation, Path(__file__))
    out["wall"] = out.pop("subprocess_seconds")
    return out


# ---------------------------------------------------------------------- the floor

def floor_sql(data: Path, group: str, time_col: str, cols: list[str]) -> str:
    """The lag sums of sql/lag_moments.sql, written by hand for the columns [1 cols...]:
    per subject and first-row-or-not, count(*) and for every pair (a, b) of them but (1, 1)
    fsum(a b) (this row), fsum(la lb) (the previous row) and fsum(la b + a lb) (across the
    pair).  For both models here every such pair is one mlpipe's pass sums.  mlpipe's pass
    also carries the complete-row flag (in the partition and the GROUP BY), the lagged
    cell keys and strata and counts of crossing pairs and tied times: its own checks, left
    out of the floor."""
    import itertools

    one = [("1", "1")] + [(c, f"l_{c}") for c in cols]
    sums = []
    for (a, la), (b, lb) in itertools.combinations_with_replacement(one, 2):
        if a == "1" and b == "1":
            continue
        this = b if a == "1" else f"{a} * {b}"
        prev = lb if a == "1" else f"{la} * {lb}"
        cross = f"{lb} + {b}" if a == "1" else f"{la} * {b} + {a} * {lb}"
        key = f"{a}_{b}".replace("1_", "")
        sums += [f"fsum({this}) AS s_{key}", f"fsum({prev}) AS b_{key}",
                 f"fsum({cross}) AS x_{key}"]
    lags = ", ".join(f"LAG({c}) OVER w AS l_{c}" for c in cols) \
        + ", LAG(__t) OVER w AS prev_t"  # the panel's t lagged twice, as in mlpipe's pass
    src = str(data / "*.parquet").replace("'", "''")
    doubles = ", ".join(f"CAST({c} AS DOUBLE) AS {c}" for c in cols)  # as mlpipe's columns
    return (f"CREATE OR REPLACE TEMP TABLE floor AS SELECT {group}, prev_t IS NULL AS first, "
            f"count(*) AS n, {', '.join(sums)} FROM (SELECT {group}, {', '.join(cols)}, "
            f"{lags} FROM (SELECT {group}, {time_col} AS __t, {doubles} FROM "
            f"read_parquet('{src}')) WINDOW w AS (PARTITION BY {group} ORDER BY __t)) "
            f"GROUP BY {group}, first")


def floor_child(sql: str) -> None:
    """Runs in a fresh subprocess: the floor once, for its peak RSS."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    t0 = time.perf_counter()
    con.execute(sql)
    print("FLOOR_RESULT " + json.dumps({"seconds": time.perf_counter() - t0,
                                        "peak_rss_mb": peak_rss_mb()}))


def run_floor(sql: str, runs: int) -> tuple[float, list[float], int, float]:
    """Timed here, as bench.py's floor: best of `runs` fresh connections; the result stays
    in DuckDB (a temp table), as the lag pass's lag_moments does.  Then once more in a fresh
    interpreter for the bare query's own peak RSS (the memory DuckDB's window needs)."""
    import subprocess

    import duckdb

    times, n = [], 0
    for _ in range(runs):
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")
        t0 = time.perf_counter()
        con.execute(sql)
        times.append(time.perf_counter() - t0)
        n = con.execute("SELECT count(*) FROM floor").fetchone()[0]
        con.close()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--floor-child", sql],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FLOOR_RESULT "))
    return min(times), times, n, json.loads(line.split(" ", 1)[1])["peak_rss_mb"]


# ---------------------------------------------------------------------- data

def write_data(out: Path, tag: dict, chunks) -> str:
    """Write `chunks` (an iterator of (chunk index, dict of columns)) into tag["partitions"]
    Parquet files: each chunk's rows shuffled and dealt at random among the files (one row
    group per chunk and file).  Skipped when truth.json already records `tag`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamp = out / "truth.json"
    files = [f"part-{k:03d}.parquet" for k in range(tag["partitions"])]
    if stamp.is_file() and json.loads(stamp.read_text()) == {**tag, "files": files} \
            and all((out / f).is_file() for f in files):
        return "reused"
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for f in out.glob("part-*.parquet"):
        f.unlink()
    t0 = time.perf_counter()
    writers = None
    try:
        for k, cols in chunks:
            rng = np.random.default_rng([tag["seed"], 1_000_003, k])
            n = len(next(iter(cols.values())))
            perm = rng.permutation(n)
            part = rng.integers(0, len(files), n)[perm]
            table = pa.table({c: v[perm] for c, v in cols.items()})
            if writers is None:
                writers = [pq.ParquetWriter(out / f, table.schema) for f in files]
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(len(files) + 1))
            for p, w in enumerate(writers):
                w.write_table(table.take(order[bounds[p]:bounds[p + 1]]))
    finally:
        for w in writers or []:
            w.close()
    stamp.write_text(json.dumps({**tag, "files": files}, indent=1))
    return f"simulated in {time.perf_counter() - t0:.1f} s"


def panel_chunks(subjects: int, occasions: int, seed: int):
    """Subjects in chunks: b0, b1, w per subject; e exactly AR(1) over the occasions
    (e_1 ~ N(0, 1), e_t = phi e_(t-1) + sqrt(1 - phi^2) z_t)."""
    per = max(1, CHUNK_ROWS // occasions)
    s = math.sqrt(1 - PHI**2)
    t = np.arange(occasions, dtype=np.int32)
    for k, lo in enumerate(range(0, subjects, per)):
        hi = min(subjects, lo + per)
        rng = np.random.default_rng([seed, k])
        n = hi - lo
        b0 = rng.normal(size=n) * PANEL_SD["subject|(Intercept)"]
        b1 = rng.normal(size=n) * PANEL_SD["subject|t"]
        w = rng.normal(size=n)
        z = rng.normal(size=(n, occasions))
        e = np.empty_like(z)
        e[:, 0] = z[:, 0]
        for j in range(1, occasions):
            e[:, j] = PHI * e[:, j - 1] + s * z[:, j]
        beta = PANEL_BETA
        y = beta["(Intercept)"] + beta["t"] * t + beta["w"] * w[:, None] + b0[:, None] \
            + b1[:, None] * t + e
        yield k, {"subject": np.repeat(np.arange(lo, hi, dtype=np.int64), occasions),
                  "t": np.tile(t, n), "w": np.repeat(w, occasions), "y": y.ravel()}


def series_chunks(points: int, seed: int):
    """SERIES_SUBJECTS series of `points` time points, generated in chunks of time with the
    AR(1) recursion's state carried across chunks."""
    from scipy.signal import lfilter

    rng0 = np.random.default_rng([seed, 999])
    b0 = rng0.normal(size=SERIES_SUBJECTS)
    s = math.sqrt(1 - PHI**2)
    state = [None] * SERIES_SUBJECTS
    per = max(1, CHUNK_ROWS // SERIES_SUBJECTS)
    for k, lo in enumerate(range(0, points, per)):
        hi = min(points, lo + per)
        rng = np.random.default_rng([seed, k])
        t = np.arange(lo, hi, dtype=np.int64)
        cols: dict[str, list] = {"subject": [], "t": [], "t1": [], "y": []}
        for g in range(SERIES_SUBJECTS):
            z = rng.normal(size=hi - lo)
            if state[g] is None:  # the series' first point: e_1 = z_1 ~ N(0, 1)
                e = np.empty_like(z)
                e[0] = z[0]
                e[1:], _ = lfilter([s], [1.0, -PHI], z[1:], zi=[PHI * z[0]])
            else:
                e, _ = lfilter([s], [1.0, -PHI], z, zi=[PHI * state[g]])
            state[g] = e[-1]
            t1 = t / points
            cols["subject"].append(np.full(hi - lo, g, dtype=np.int64))
            cols["t"].append(t)
            cols["t1"].append(t1)
            cols["y"].append(SERIES_BETA["(Intercept)"] + SERIES_BETA["t1"] * t1 + b0[g] + e)
        yield k, {c: np.concatenate(v) for c, v in cols.items()}


# ---------------------------------------------------------------------- report

def table(title: str, head: list[str], rows: list[tuple]) -> None:
    """rows: (figure, [value per column], note)."""
    print(title)
    w0 = max(len(r[0]) for r in rows)
    ws = [max([len(h)] + [len(r[1][i]) for r in rows]) for i, h in enumerate(head)]
    print(f"{'figure':<{w0}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(head, ws)) + "  note")
    print("-" * (w0 + sum(ws) + 2 * len(ws) + 30))
    for name, values, note in rows:
        print(f"{name:<{w0}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, ws))
              + f"  {note}")
    print()


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def bench_panel(args) -> list[str]:
    runs, missed = [], []
    for rows in args.rows:
        subjects = rows // args.occasions
        data = DATA / f"panel-{subjects}x{args.occasions}"
        tag = {"format": FORMAT, "case": "panel", "subjects": subjects,
               "occasions": args.occasions, "rows": subjects * args.occasions,
               "partitions": args.partitions, "seed": args.seed, "phi": PHI,
               "beta": PANEL_BETA, "sd": PANEL_SD, "sigma": 1.0, "formula": PANEL,
               "correlation": CORRELATION}
        how = write_data(data, tag, panel_chunks(subjects, args.occasions, args.seed))
        print(f"panel: {subjects * args.occasions:,} rows, {subjects:,} subjects x "
              f"{args.occasions} occasions in {data.relative_to(ROOT)}/ ({how})", flush=True)
        fl = run_floor(floor_sql(data, "subject", "t", ["t", "w", "y"]), args.floor_runs)
        fits = [run_child(data, PANEL, CORRELATION) for _ in range(args.fit_runs)]
        runs.append((subjects * args.occasions, subjects, fl, fits))
    print()
    head = [f"{r:,} rows" for r, *_ in runs]
    out: list[tuple] = [("subjects", [f"{s:,}" for _, s, *_ in runs], "")]
    out.append((f"floor: bare DuckDB window + fsum (best of {args.floor_runs})",
                [f"{f[0]:.2f} s" for _, _, f, _ in runs],
                "runs " + "; ".join(", ".join(f"{t:.2f}" for t in f[1]) for _, _, f, _ in runs)
                + " s"))
    if any("refused" in fits[0] for *_, fits in runs):
        for r, _, _, fits in runs:
            if "refused" in fits[0]:
                print(f"mlpipe refused the {r:,}-row fit: {fits[0]['refused']}")
                missed.append(f"panel {r:,} rows: refused")
        runs = [r for r in runs if "refused" not in r[3][0]]
        if not runs:
            return missed
        head = [f"{r:,} rows" for r, *_ in runs]
    best = [min(fits, key=lambda f: f["wall"]) for *_, fits in runs]
    ratio = [b["wall"] / f[0] for b, (_, _, f, _) in zip(best, runs)]
    out += [
        ("mlpipe fit, whole process (fresh interpreter)", [f"{b['wall']:.2f} s" for b in best],
         f"best of {args.fit_runs}" if args.fit_runs > 1 else ""),
        ("ratio whole process / floor", [f"{x:.2f} x" for x in ratio],
         f"target <= {RATIO_TARGET:g}x: " + ", ".join(met(x <= RATIO_TARGET) for x in ratio)),
        ("  imports", [f"{b['import_seconds']:.2f} s" for b in best], ""),
        ("  fit()", [f"{b['fit_seconds']:.2f} s" for b in best], ""),
        ("  ratio fit() / floor", [f"{b['fit_seconds'] / f[0]:.2f} x"
                                   for b, (_, _, f, _) in zip(best, runs)], ""),
    ]
    for k in ("prepare", "scan", "solve", "inference"):
        out.append((f"    {k}", [f"{b['timings'].get(k, float('nan')):.2f} s" for b in best],
                    {"prepare": "schema, levels, pre-pass", "scan": "the lag pass and reading "
                     "its statistics", "solve": "(theta, phi) jointly, theta at phi-hat, results",
                     "inference": "Satterthwaite df"}[k]))
    peak = [b["peak_rss_mb"] for b in best]
    out += [
        ("peak RSS of the fit process", [f"{p:.0f} MB" for p in peak],
         f"target <= {RSS_TARGET_MB} MB: " + ", ".join(met(p <= RSS_TARGET_MB) for p in peak)),
        ("peak RSS of the floor (bare DuckDB, fresh process)",
         [f"{f[3]:.0f} MB" for _, _, f, _ in runs], "what DuckDB's window alone needs"),
        ("throughput", [f"{r / b['wall'] / 1e6:.2f} M rows/s" for b, (r, *_) in
                        zip(best, runs)], "rows / whole process"),
        (f"phi (truth {PHI})", [f"{b['phi']:.4f}" for b in best], ""),
    ]
    for term, true in PANEL_BETA.items():
        out.append((f"beta {term} (truth {true})", [f"{b['beta'][term][0]:.4f} "
                                                    f"({b['beta'][term][1]:.4f})" for b in best],
                    "estimate (SE)"))
    for term, true in PANEL_SD.items():
        out.append((f"sd {term} (truth {true})", [f"{b['sd'][term]:.4f}" for b in best], ""))
    out += [
        ("sigma (truth 1)", [f"{b['sigma']:.4f}" for b in best], "sd(e)"),
        ("evaluations estimating (theta, phi)", [str(b["outer"].get("evaluations")) for b in best],
         str(best[0]["outer"].get("method"))),
        ("evaluations of the fit at phi-hat", [str(b["evaluations"]) for b in best],
         f"{best[0]['optimizer']}; converged: " + ", ".join(str(b["converged"])
                                                            for b in best)),
    ]
    table(f"panel: {PANEL}, correlation {CORRELATION}", head, out)
    for b, x, (r, *_) in zip(best, ratio, runs):
        if x > RATIO_TARGET:
            missed.append(f"panel {r:,} rows: time ratio {x:.2f}x > {RATIO_TARGET:g}x")
        if b["peak_rss_mb"] > RSS_TARGET_MB:
            missed.append(f"panel {r:,} rows: peak RSS {b['peak_rss_mb']:.0f} MB > "
                          f"{RSS_TARGET_MB} MB")
    return missed


def bench_series(args) -> list[str]:
    runs, missed = [], []
    for points in args.points:
        data = DATA / f"series-{SERIES_SUBJECTS}x{points}"
        tag = {"format": FORMAT, "case": "series", "subjects": SERIES_SUBJECTS,
               "points": points, "rows": SERIES_SUBJECTS * points,
               "partitions": args.partitions, "seed": args.seed, "phi": PHI,
               "beta": SERIES_BETA, "sigma": 1.0, "formula": SERIES,
               "correlation": CORRELATION, "t1": "t / points"}
        how = write_data(data, tag, series_chunks(points, args.seed))
        print(f"series: {SERIES_SUBJECTS} series x {points:,} time points in "
              f"{data.relative_to(ROOT)}/ ({how})", flush=True)
        fl = run_floor(floor_sql(data, "subject", "t", ["t1", "y"]), args.floor_runs)
        fit = run_child(data, SERIES, CORRELATION)
        runs.append((points, fl, fit))
    print()
    refused = [(p, f) for p, _, f in runs if "refused" in f]
    for p, f in refused:
        print(f"mlpipe refused the {p:,}-point series: {f['refused']}")
        missed.append(f"series {p:,} points: refused")
    runs = [r for r in runs if "refused" not in r[2]]
    if not runs:
        return missed
    head = [f"{p:,} points" for p, *_ in runs]
    fits = [f for *_, f in runs]
    out = [
        ("rows", [f"{SERIES_SUBJECTS * p:,}" for p, *_ in runs], f"{SERIES_SUBJECTS} series"),
        (f"floor: bare DuckDB window + fsum (best of {args.floor_runs})",
         [f"{fl[0]:.2f} s" for _, fl, _ in runs], ""),
        ("mlpipe fit, whole process (fresh interpreter)", [f"{f['wall']:.2f} s" for f in fits],
         "target: seconds"),
        ("ratio whole process / floor", [f"{f['wall'] / fl[0]:.2f} x" for _, fl, f in runs],
         ""),
        ("  fit()", [f"{f['fit_seconds']:.2f} s" for f in fits], ""),
    ]
    for k in ("prepare", "scan", "solve", "inference"):
        out.append((f"    {k}", [f"{f['timings'].get(k, float('nan')):.2f} s" for f in fits],
                    ""))
    out += [
        ("peak RSS of the fit process", [f"{f['peak_rss_mb']:.0f} MB" for f in fits],
         "target: not growing with the series length"),
        ("peak RSS of the floor (bare DuckDB, fresh process)",
         [f"{fl[3]:.0f} MB" for _, fl, _ in runs], "what DuckDB's window alone needs"),
        (f"phi (truth {PHI})", [f"{f['phi']:.4f}" for f in fits], ""),
        ("beta t1 (truth 0.5)", [f"{f['beta']['t1'][0]:.4f} ({f['beta']['t1'][1]:.4f})"
                                 for f in fits], "estimate (SE)"),
        ("sigma (truth 1)", [f"{f['sigma']:.4f}" for f in fits], ""),
        ("evaluations estimating (theta, phi)",
         [str(f["outer"].get("evaluations")) for f in fits], ""),
    ]
    table(f"series: {SERIES}, correlation {CORRELATION}", head, out)
    if len(runs) >= 2:
        (p0, fl0, f0), (p1, fl1, f1) = runs[0], runs[-1]
        grow = f1["peak_rss_mb"] - f0["peak_rss_mb"]
        flat = grow <= RSS_FLAT * f0["peak_rss_mb"]
        print(f"series length x{p1 / p0:g}: whole process x{f1['wall'] / f0['wall']:.2f}, "
              f"scan x{f1['timings']['scan'] / f0['timings']['scan']:.2f}, floor "
              f"x{fl1[0] / fl0[0]:.2f} (linear: x{p1 / p0:g})")
        print(f"peak RSS {f0['peak_rss_mb']:.0f} -> {f1['peak_rss_mb']:.0f} MB ({grow:+.0f} MB; "
              f"the bare DuckDB floor {fl0[3]:.0f} -> {fl1[3]:.0f} MB, {fl1[3] - fl0[3]:+.0f} MB): "
              f"memory O(1) in the series length (growth <= {RSS_FLAT:.0%}): {met(flat)}")
        print(f"  (a series of {p1:,} points is {p1 * 4 * 8 / 2**20:.0f} MB in 4 8-byte "
              f"columns; DuckDB's window sorts a partition — here a whole series — at once)")
        print()
        if not flat:
            missed.append(f"series: peak RSS grows {grow:+.0f} MB from {p0:,} to {p1:,} points")
    for p, f in ((p, f) for p, _, f in runs):
        if f["wall"] > 60:
            missed.append(f"series {p:,} points: {f['wall']:.0f} s is not seconds")
    return missed


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-child":
        floor_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000_000],
                    help="panel rows (one run each; several give a curve)")
    ap.add_argument("--occasions", type=int, default=10, help="per subject")
    ap.add_argument("--points", type=int, nargs="+", default=[100_000, 1_000_000],
                    help="time points of each long series (one run each)")
    ap.add_argument("--partitions", type=int, default=8, help="Parquet files per data set")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fit-runs", type=int, default=1, help="panel: fresh subprocesses, the "
                    "fastest reported")
    ap.add_argument("--floor-runs", type=int, default=2)
    ap.add_argument("--skip-panel", action="store_true")
    ap.add_argument("--skip-series", action="store_true")
    args = ap.parse_args()
    import duckdb

    print(f"machine: {os.cpu_count()} CPUs (shared: timings are noisy); Python "
          f"{platform.python_version()}, DuckDB {duckdb.__version__}, NumPy {np.__version__}\n",
          flush=True)
    missed = []
    if not args.skip_panel:
        missed += bench_panel(args)
    if not args.skip_series:
        missed += bench_series(args)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets: " + ("all met" if not missed else "NOT MET: " + "; ".join(missed)))


if __name__ == "__main__":
    main()
