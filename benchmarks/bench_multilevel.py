"""Benchmarks for several grouping factors (`make bench-nested`, `make bench-crossed`).

    .venv/bin/python benchmarks/bench_multilevel.py nested  [--rows 20000000 --schools 20000
                                                             --children 2000000]
    .venv/bin/python benchmarks/bench_multilevel.py crossed [--rows 10000000 --g 100000 --c 2000
                                                             --memory-limit 1500MB]

nested:  y ~ t + (t | school) + (t | school:child), children nested in schools (simulated,
         Parquet partitions written chunk by chunk).  Figures: the whole `mlpipe fit` in a
         fresh process (wall time, peak RSS), the bare DuckDB GROUP BY computing the same cell
         statistics (the floor), their ratio.  Targets: ratio <= 2, RSS <= 2 GB.
crossed: (small) the real InstEval data (73,421 ratings; 2,972 students x 1,128 instructors x
         14 departments, tests/data/multilevel/insteval.parquet), y ~ service + (1|s) + (1|d)
         + (1|dept): fit wall time (target <= 1 s) beside lme4's recorded time on this machine
         (the reference JSON made by tests/data/multilevel/make_refs.R);
         (large) y ~ x + w + (x | g) + (1 | c), g crossed with c (simulated): wall time against
         the floor (target <= 10x) and peak RSS (target <= 3 GB); then the same fit with
         --memory-limit (default 1500MB: DuckDB spills its hash aggregate of the cells).

Every fit runs in a subprocess (`--child`), so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NESTED = "y ~ t + (t | school) + (t | school:child)"
CROSSED_SMALL = "y ~ service + (1 | s) + (1 | d) + (1 | dept)"
CROSSED_LARGE = "y ~ x + w + (x | g) + (1 | c)"
CHUNK = 1 << 21


def child(data: str, formula: str, memory_limit: str | None = None) -> None:
    t0 = time.perf_counter()
    import mlpipe
    import mlpipe.blocked  # noqa: F401  (mlpipe imports lazily: the import time is
    import mlpipe.inference  # noqa: F401  reported apart from fit())
    import mlpipe.model  # noqa: F401
    from mlpipe.errors import MlpipeError
    from mlpipe.runlog import peak_memory_mb

    t1 = time.perf_counter()
    try:
        res = mlpipe.fit(data, formula, ddf=None, memory_limit=memory_limit)
    except MlpipeError as exc:
        print("BENCH_RESULT " + json.dumps({"refused": str(exc),
                                            "seconds": time.perf_counter() - t1}))
        return
    t2 = time.perf_counter()
    out = {"import_seconds": t1 - t0, "fit_seconds": t2 - t1, "timings": res.timings,
           "peak_rss_mb": peak_memory_mb(),  # VmHWM (a child's ru_maxrss starts at its parent's)
           "evaluations": res.optimizer.evaluations, "optimizer": res.optimizer.optimizer,
           "converged": res.converged, "criterion": res.deviance, "groups": res.groups,
           "structure": res.optimizer.structure,
           "sd": {f"{r['group']}|{r['term']}": r["std_dev"]
                  for r in res.random_effects.iter_rows(named=True)}, "sigma": res.sigma}
    print("BENCH_RESULT " + json.dumps(out, default=str))


def run_child(data: Path, formula: str, memory_limit: str | None = None) -> dict:
    """`child` in a fresh interpreter (bench.py's runner): its figures, `wall` its wall time."""
    from bench import run_fit

    out = run_fit(data, formula, Path(__file__), [memory_limit] if memory_limit else [])
    out["wall"] = out.pop("subprocess_seconds")
    return out


def floor(data: Path, keys: list[str], cols: list[str], runs: int = 2) -> float:
    """The bare DuckDB GROUP BY over the cells computing every cross-product of cols."""
    import itertools

    import duckdb

    sums = [f"sum({c})" for c in cols] + [
        f"sum({a} * {b})" for a, b in itertools.combinations_with_replacement(cols, 2)]
    src = str(data / "*.parquet") if data.is_dir() else str(data)
    sql = (f"SELECT {', '.join(keys)}, count(*), {', '.join(sums)} FROM "
           f"read_parquet('{src}') GROUP BY {', '.join(keys)}")
    best = np.inf
    for _ in range(runs):
        con = duckdb.connect()
        t0 = time.perf_counter()
        con.sql(sql).to_arrow_table()
        best = min(best, time.perf_counter() - t0)
        con.close()
    return best


# ---------------------------------------------------------------------- data

def write_parts(out: Path, make, rows: int, tag: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamp = out / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == tag:
        return "reused"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("part-*.parquet"):
        f.unlink()
    t0 = time.perf_counter()
    for k, lo in enumerate(range(0, rows, CHUNK)):
        pq.write_table(pa.table(make(lo, min(rows, lo + CHUNK))), out / f"part-{k:04d}.parquet")
    stamp.write_text(json.dumps(tag))
    return f"simulated in {time.perf_counter() - t0:.1f} s"


def nested_data(out: Path, rows: int, schools: int, children: int) -> str:
    rng = np.random.default_rng(7)
    u = rng.normal(size=(schools, 2)) * [1.0, 0.3]
    v = rng.normal(size=(children, 2)) * [0.8, 0.2]

    def make(lo, hi):
        r = np.random.default_rng(lo)
        child = (np.arange(lo, hi) * children) // rows  # contiguous, ~rows/children each
        school = child % schools
        t = r.integers(0, 10, hi - lo).astype(float)
        y = 5 + 0.5 * t + u[school, 0] + u[school, 1] * t + v[child, 0] + v[child, 1] * t \
            + r.normal(size=hi - lo)
        return {"school": school, "child": child, "t": t, "y": y}

    return write_parts(out, make, rows, {"rows": rows, "schools": schools,
                                         "children": children})


def crossed_data(out: Path, rows: int, g: int, c: int) -> str:
    rng = np.random.default_rng(11)
    ug = rng.normal(size=(g, 2)) * [1.0, 0.3]
    uc = rng.normal(size=c) * 0.5
    w_g = rng.normal(size=g)

    def make(lo, hi):
        r = np.random.default_rng(lo)
        gi = (np.arange(lo, hi) * g) // rows
        ci = r.integers(0, c, hi - lo)
        x = r.normal(size=hi - lo)
        y = 1 + 0.5 * x + 0.3 * w_g[gi] + ug[gi, 0] + ug[gi, 1] * x + uc[ci] \
            + r.normal(size=hi - lo)
        return {"g": gi, "c": ci, "x": x, "w": w_g[gi], "y": y}

    return write_parts(out, make, rows, {"rows": rows, "g": g, "c": c})


# ---------------------------------------------------------------------- report

def line(name: str, value: str, note: str = "") -> None:
    print(f"{name:<52} {value:>18}  {note}")


def bench_nested(args) -> None:
    data = ROOT / "bench_data_multilevel" / "nested"
    how = nested_data(data, args.rows, args.schools, args.children)
    print(f"nested: {NESTED}\n{args.rows:,} rows, {args.children:,} children in "
          f"{args.schools:,} schools ({how})\n")
    res = run_child(data, NESTED)
    fl = floor(data, ["school", "child"], ["t", "y"])
    ratio = res["wall"] / fl
    line("mlpipe fit, whole process (fresh interpreter)", f"{res['wall']:.2f} s",
         f"fit() {res['fit_seconds']:.2f} s: scan {res['timings'].get('scan', 0):.2f} s, "
         f"solve {res['timings'].get('solve', 0):.2f} s")
    line("floor: bare DuckDB GROUP BY of the cell statistics", f"{fl:.2f} s")
    line("ratio whole process / floor", f"{ratio:.1f} x",
         f"target <= 2: {'met' if ratio <= 2 else 'NOT MET'}")
    line("peak RSS of the fit process", f"{res['peak_rss_mb']:.0f} MB",
         f"target <= 2048 MB: {'met' if res['peak_rss_mb'] <= 2048 else 'NOT MET'}")
    line("objective evaluations", str(res["evaluations"]), res["optimizer"])
    line("estimates (truth: child 0.8, 0.2; school 1, 0.3; sigma 1)",
         ", ".join(f"{v:.3f}" for v in res["sd"].values()) + f"; {res['sigma']:.3f}")


def bench_crossed(args) -> None:
    ins = ROOT / "tests" / "data" / "multilevel" / "insteval.parquet"
    ref = json.loads((ins.parent / "insteval_crossed.json").read_text())
    print(f"crossed, small: {CROSSED_SMALL} on InstEval ({ref['reml']['nobs']:,} rows; "
          f"{', '.join(f'{k} {v}' for k, v in ref['reml']['ngroups'].items())})\n")
    res = run_child(ins, CROSSED_SMALL)
    line("mlpipe fit, whole process", f"{res['wall']:.2f} s",
         f"fit() {res['fit_seconds']:.2f} s (target <= 1 s: "
         f"{'met' if res['fit_seconds'] <= 1 else 'NOT MET'})")
    line("lme4 on this machine (recorded by make_refs.R)",
         f"{ref['reml'].get('seconds_bobyqa', float('nan')):.1f} s", "REML, bobyqa")
    line("REML criterion mlpipe / lme4", f"{res['criterion']:.4f}",
         f"lme4 {ref['reml']['deviance_or_reml']:.4f}")
    line("objective evaluations", str(res["evaluations"]), res["optimizer"])
    data = ROOT / "bench_data_multilevel" / "crossed"
    how = crossed_data(data, args.rows, args.g, args.c)
    print(f"\ncrossed, large: {CROSSED_LARGE}; {args.rows:,} rows, g {args.g:,} x c "
          f"{args.c:,} ({how})\n")
    res = run_child(data, CROSSED_LARGE)
    fl = floor(data, ["g", "c"], ["x", "w", "y"])
    line("floor: bare DuckDB GROUP BY of the cell statistics", f"{fl:.2f} s")
    if "refused" in res:
        line("mlpipe fit", "refused", f"after {res['wall']:.1f} s: {res['refused']}")
        line("target <= 10x the floor, <= 3 GB", "NOT MET", "exact REML refused by the "
             "memory estimate")
        return
    ratio = res["wall"] / fl
    line("mlpipe fit, whole process", f"{res['wall']:.2f} s",
         f"fit() {res['fit_seconds']:.2f} s: scan {res['timings'].get('scan', 0):.2f} s, "
         f"solve {res['timings'].get('solve', 0):.2f} s")
    line("ratio whole process / floor", f"{ratio:.1f} x",
         f"target <= 10: {'met' if ratio <= 10 else 'NOT MET'}")
    line("peak RSS of the fit process", f"{res['peak_rss_mb']:.0f} MB",
         f"target <= 3072 MB: {'met' if res['peak_rss_mb'] <= 3072 else 'NOT MET'}")
    solver = res["structure"][0]["solver"]
    line("solver (estimated before building)", solver["memory"],
         f"Schur complement of order {solver['order']}, {solver['update_terms']:,} update "
         f"terms, {solver['cells']:,} cells")
    line("objective evaluations", str(res["evaluations"]), res["optimizer"])
    line("estimates (truth: g 1, 0.3; c 0.5; sigma 1)",
         ", ".join(f"{v:.3f}" for v in res["sd"].values()) + f"; {res['sigma']:.3f}")
    if args.memory_limit:  # the same fit with DuckDB's (and the solver's) memory bounded
        lim = run_child(data, CROSSED_LARGE, args.memory_limit)
        ratio = lim["wall"] / fl
        line(f"with --memory-limit {args.memory_limit}: whole process", f"{lim['wall']:.2f} s",
             f"{ratio:.1f} x the floor (target <= 10: {'met' if ratio <= 10 else 'NOT MET'})")
        line(f"with --memory-limit {args.memory_limit}: peak RSS",
             f"{lim['peak_rss_mb']:.0f} MB",
             f"target <= 3072 MB: {'met' if lim['peak_rss_mb'] <= 3072 else 'NOT MET'}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3], *sys.argv[4:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", choices=["nested", "crossed"])
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--schools", type=int, default=20_000)
    ap.add_argument("--children", type=int, default=2_000_000)
    ap.add_argument("--g", type=int, default=100_000)
    ap.add_argument("--c", type=int, default=2_000)
    ap.add_argument("--memory-limit", default="1500MB",
                    help="crossed: also fit the large design with this --memory-limit "
                         "(DuckDB spills its hash aggregate; '' to skip)")
    args = ap.parse_args()
    if args.which == "nested":
        args.rows = args.rows or 20_000_000
        bench_nested(args)
    else:
        args.rows = args.rows or 10_000_000
        bench_crossed(args)


if __name__ == "__main__":
    main()
