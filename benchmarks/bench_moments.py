"""Benchmark of the method of moments on a MovieLens-32M-shaped crossed design
(`make bench-moments`, issue 11).

    .venv/bin/python benchmarks/bench_moments.py [--rows 32000000 ...]

design: --rows rows (default 32M) of rating ~ x + (1 | user) + (1 | item), 200,000 users x
        84,000 items (MovieLens 32M's counts) whenever that leaves at least
        MIN_ROWS_PER_USER rows per user on average; smaller runs scale the levels down in
        MovieLens's proportions, users = rows / 160 and items = rows / 380 (the table says
        which).  A row's user is drawn with weight 1 / rank^0.5 (mildly skewed activity), its
        item with weight 1 / rank (Zipf popularity); ranks are a seeded permutation of the ids,
        so popularity is not the id order, and the same (user, item) may occur twice.
        Truth: rating = 3 + 0.2 x + a_user + b_item + e, x ~ N(0, 1), a ~ N(0, 0.5^2),
        b ~ N(0, 0.4^2), e ~ N(0, 0.9^2); the effects are drawn once per level (seeded).
figures: the whole `mlpipe.fit(DATA, FORMULA, method="moments")` in a fresh interpreter (wall
        time; its own peak RSS as VmHWM, and when during the fit the RSS peaked, from a
        sampling thread), result.timings, the CG iterations, the variance components and the
        fixed effects against the truth; against the floor — a bare DuckDB query set over the
        same Parquet computing the aggregates of mlpipe's moment pass (sql/moment_*.sql): the
        totals (fsum), count and fsum of x and y per user and per item, and the count per
        (user, item) pair, every result fetched into NumPy (best of --floor-runs in this
        process; once more in a fresh one for its peak RSS).  Beside them: the memory the
        exact solver would need, mlpipe's own estimate (`mlpipe._schur.estimate`, the figure
        behind the exact path's "needs about ..." refusal) from the level and pair counts.
        Targets: whole process <= 300 s, peak RSS <= 4 GB.  Several --rows give a curve
        (`make bench-moments`: 4M and 32M).  The moment estimates' sampling SEs (Gaussian
        model, `moments.moment_covariance`), then the same fit with `refine="reml"` in
        another fresh process (`--no-refine` skips it): its wall time, peak RSS, SQUAREM
        steps / updates / PCG iterations and the refined SDs with the Monte Carlo SE they
        claim, against the same targets.

The data are simulated with NumPy chunk by chunk (seeded per chunk; memory bounded by the
chunk) into bench_data_moments/<name>/part-*.parquet (bench_ar1's writer: each chunk's rows
shuffled and dealt among --partitions files) and reused while their truth.json matches the
settings.  The fit runs in a subprocess with bench.py's runner (`--child DATA FORMULA`, the
method after `OPTION_SEP` in the FORMULA argument).  The machine is shared: the load average
is printed with the figures.  Missed targets print NOT MET; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
from bench_ar1 import met, peak_rss_mb, table, write_data

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench_data_moments"
FORMULA = "rating ~ x + (1 | user) + (1 | item)"
OPTION_SEP = " ;; method="
REFINE_SEP = ";refine="
USERS, ITEMS = 200_000, 84_000  # MovieLens 32M: 200,948 users, 84,432 rated movies
ROWS_PER_USER, ROWS_PER_ITEM = 160, 380  # its proportions, for the scaled-down runs
MIN_ROWS_PER_USER = 10  # the full counts from 2M rows on (see `levels`)
USER_ZIPF, ITEM_ZIPF = 0.5, 1.0
BETA = {"(Intercept)": 3.0, "x": 0.2}
SD = {"user": 0.5, "item": 0.4}
SIGMA = 0.9
CHUNK_ROWS = 1 << 21
TIME_TARGET_S = 300
RSS_TARGET_MB = 4096
FORMAT = 1  # bump when the generator changes: the stored data are then regenerated


# ---------------------------------------------------------------------- the fit subprocess

class RssSampler:
    """A daemon thread reading VmRSS every `every` seconds: when the peak happened (the
    fit's phases are sequential, so their timings place it)."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak_mb, self.peak_at = every, 0.0, 0.0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open("/proc/self/status") as f:
                    kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            if kb / 1024 > self.peak_mb:
                self.peak_mb, self.peak_at = kb / 1024, time.perf_counter() - self._t0
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child(data: str, arg: str) -> None:
    """Runs in the fresh subprocess: fit by moments, report one JSON line."""
    formula, _, method = arg.partition(OPTION_SEP)
    method, _, refine = method.partition(REFINE_SEP)
    t0 = time.perf_counter()
    import mlpipe
    import mlpipe.model  # noqa: F401  (mlpipe imports lazily: the import time is
    import mlpipe.moments  # noqa: F401  reported apart from fit())
    import scipy.sparse.linalg  # noqa: F401
    from mlpipe.errors import MlpipeError

    t1 = time.perf_counter()
    sampler = RssSampler()
    try:
        res = mlpipe.fit(data, formula, method=method or "moments", refine=refine or None)
    except MlpipeError as exc:
        sampler.stop()
        print("BENCH_RESULT " + json.dumps({"refused": str(exc),
                                            "fit_seconds": time.perf_counter() - t1}))
        return
    t2 = time.perf_counter()
    sampler.stop()
    out = {"import_seconds": t1 - t0, "fit_seconds": t2 - t1, "timings": res.timings,
           "peak_rss_mb": peak_rss_mb(), "sampled_peak_mb": sampler.peak_mb,
           "sampled_peak_at": sampler.peak_at, "method": res.method,
           "evaluations": res.optimizer.evaluations, "messages": res.optimizer.messages,
           "nobs": res.nobs, "groups": res.groups, "sigma": res.sigma,
           "residual_variance": res.residual_variance,
           "beta": {r["term"]: [r["estimate"], r["std_error"]]
                    for r in res.fixed_effects.iter_rows(named=True)},
           "sd": {r["group"]: r["std_dev"] for r in res.random_effects.iter_rows(named=True)},
           "moments": res.moments}
    print("BENCH_RESULT " + json.dumps(out, default=str))


def run_child(data: Path, refine: str = "") -> dict:
    """`child` in a fresh interpreter (bench.py's runner); `wall` is the whole process's."""
    from bench import run_fit

    out = run_fit(data, FORMULA + OPTION_SEP + "moments" + (REFINE_SEP + refine if refine else ""),
                  Path(__file__))
    out["wall"] = out.pop("subprocess_seconds")
    return out


# ---------------------------------------------------------------------- the floor

def floor_sql(data: Path) -> list[str]:
    """The aggregates of mlpipe's moment pass, by hand: X'X, X'y, y'y for X = [1 x]
    (moment_totals.sql), count, Σx and Σy per user and per item (moment_levels.sql) and the
    count per (user, item) pair (moment_pairs.sql).  mlpipe's pass also carries the
    complete-row flag (the data have no nulls), numbers the levels (row_number over their
    keys), labels them and joins the pairs to the level tables: its own work, left out of
    the floor."""
    src = "read_parquet('" + str(data / "*.parquet").replace("'", "''") + "')"
    cols = "CAST(x AS DOUBLE) AS x, CAST(rating AS DOUBLE) AS y"
    totals = ("SELECT count(*) AS n, fsum(x) AS s_x, fsum(y) AS s_y, fsum(x * x) AS s_xx, "
              f"fsum(x * y) AS s_xy, fsum(y * y) AS s_yy FROM (SELECT {cols} FROM {src})")
    levels = [f"SELECT {g}, count(*) AS n, fsum(x) AS s_x, fsum(y) AS s_y FROM (SELECT {g}, "
              f"{cols} FROM {src}) GROUP BY {g}" for g in ("user", '"item"')]
    pairs = f'SELECT "user", "item", count(*) AS n FROM {src} GROUP BY "user", "item"'
    return [totals, *levels, pairs]


def floor_queries(statements: list[str]) -> tuple[float, list[dict]]:
    """One fresh connection: every statement, its result fetched into NumPy (as mlpipe's
    pass fetches the levels and the pairs)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    t0 = time.perf_counter()
    results = [con.execute(s).fetchnumpy() for s in statements]
    seconds = time.perf_counter() - t0
    con.close()
    return seconds, results


def floor_child(arg: str) -> None:
    """Runs in a fresh subprocess: the floor once, for its peak RSS."""
    seconds, _ = floor_queries(json.loads(arg))
    print("FLOOR_RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def run_floor(data: Path, runs: int) -> dict:
    """Best of `runs` here, then once in a fresh interpreter for the bare queries' peak RSS;
    with the level and pair counts of the last run's results."""
    import subprocess

    statements = floor_sql(data)
    times, results = [], None
    for _ in range(runs):
        s, results = floor_queries(statements)
        times.append(s)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--floor-child",
                           json.dumps(statements)], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FLOOR_RESULT "))
    _tot, users, items, pairs = results
    return {"best": min(times), "times": times,
            "peak_rss_mb": json.loads(line.split(" ", 1)[1])["peak_rss_mb"],
            "users": users, "items": items, "pair_users": np.asarray(pairs["user"]),
            "pairs": len(pairs["n"])}


# ---------------------------------------------------------------------- the exact path

def exact_estimate(fl: dict) -> dict:
    """mlpipe's estimate of the exact solver's memory (`_schur.estimate`, which the exact
    path compares with the memory limit or the machine's memory before building anything),
    from the floor's counts: the factor with more levels (users) leads and is eliminated
    level by level; the Schur complement onto the other (items) is of order R = its levels
    (one intercept each), with Σ_users k² update terms (k: a user's distinct items).  The
    pairs' blocks are placeholders of the right sizes (estimate reads only their sizes)."""
    from mlpipe._schur import DENSE_MAX, DENSE_SMALL, estimate

    m_u, m_i = len(fl["users"]["n"]), len(fl["items"]["n"])
    if m_u < m_i:  # lme4's order would lead with the items: not this design's shape
        raise SystemExit(f"{m_u:,} users < {m_i:,} items: the estimate assumes users lead")
    _, user_idx = np.unique(fl["pair_users"], return_inverse=True)
    r_u, r_i = np.arange(m_u), np.arange(m_i)
    pairs = [(0, 0, r_u, r_u, np.zeros((1, 1, m_u))),
             (1, 0, np.zeros(len(user_idx), np.int64), user_idx.astype(np.int64),
              np.zeros((1, 1, 0))),  # kk == 0: its blocks are not counted
             (1, 1, r_i, r_i, np.zeros((1, 1, m_i)))]
    est = estimate([1, 1], [m_u, m_i], pairs)
    R = est["order"]
    k_sum = len(user_idx)
    if est["dense"]:
        formula = (f"dense (R <= {DENSE_MAX}): 48 B x (distinct pairs) + 3 x 8 B x R^2 = "
                   f"48 x {k_sum:,} + 24 x {R:,}^2")
    else:
        half = (est["update_terms"] + k_sum) // 2
        formula = (f"sparse LDL' (R = {R:,} > DENSE_MAX {DENSE_MAX}; dense only if R <= "
                   f"{DENSE_SMALL} or filled): 48 B x {k_sum:,} pairs + 16 B x h + 32 B x "
                   f"min(h + {m_i:,} + R, R(R+1)/2), h = (sum k^2 + sum k)/2 = {half:,}")
    est["formula"] = formula
    # per pair: its row, level and place in level order, B~, H and the Omega_21 entry (8 B
    # each); the dense path's S, its factor and its inverse (8 B x R^2 each)
    est["dense_bytes"] = 48 * k_sum + 24 * R * R  # the dense factorization, for reference
    return est


# ---------------------------------------------------------------------- data

def levels(rows: int) -> tuple[int, int, str]:
    """MovieLens's 200k users x 84k items when they leave >= MIN_ROWS_PER_USER rows per user
    on average (>= 24 per item), else its proportions rows/160 x rows/380.  Not a mean of
    2: with skewed activity most users would then have a single row."""
    if rows >= MIN_ROWS_PER_USER * USERS:
        return USERS, ITEMS, "MovieLens-32M counts"
    return (max(2, rows // ROWS_PER_USER), max(2, rows // ROWS_PER_ITEM),
            f"scaled: rows/{ROWS_PER_USER}, rows/{ROWS_PER_ITEM}")


def effects(users: int, items: int, seed: int) -> dict:
    """Per level, drawn once: the effects and the cumulative sampling weights (weight
    1/rank^s, ranks a seeded permutation of the ids)."""
    rng = np.random.default_rng([seed, 7])
    a = rng.normal(0.0, SD["user"], users)
    b = rng.normal(0.0, SD["item"], items)
    w_u = (rng.permutation(users) + 1.0) ** -USER_ZIPF
    w_i = (rng.permutation(items) + 1.0) ** -ITEM_ZIPF
    return {"a": a, "b": b, "cum_u": np.cumsum(w_u) / w_u.sum(),
            "cum_i": np.cumsum(w_i) / w_i.sum()}


def design_chunks(rows: int, users: int, items: int, seed: int):
    eff = effects(users, items, seed)
    for k, lo in enumerate(range(0, rows, CHUNK_ROWS)):
        n = min(rows, lo + CHUNK_ROWS) - lo
        rng = np.random.default_rng([seed, k])
        u = np.minimum(np.searchsorted(eff["cum_u"], rng.random(n), side="right"), users - 1)
        i = np.minimum(np.searchsorted(eff["cum_i"], rng.random(n), side="right"), items - 1)
        x = rng.normal(size=n)
        y = BETA["(Intercept)"] + BETA["x"] * x + eff["a"][u] + eff["b"][i] \
            + rng.normal(0.0, SIGMA, n)
        yield k, {"user": u.astype(np.int32), "item": i.astype(np.int32), "x": x, "rating": y}


# ---------------------------------------------------------------------- report

def bench(args) -> list[str]:
    runs, missed = [], []
    for rows in args.rows:
        users, items, how_levels = levels(rows)
        data = DATA / f"rows{rows}-u{users}-i{items}"
        tag = {"format": FORMAT, "rows": rows, "users": users, "items": items,
               "user_zipf": USER_ZIPF, "item_zipf": ITEM_ZIPF, "partitions": args.partitions,
               "seed": args.seed, "beta": BETA, "sd": SD, "sigma": SIGMA, "formula": FORMULA}
        how = write_data(data, tag, design_chunks(rows, users, items, args.seed))
        print(f"{rows:,} rows, {users:,} users x {items:,} items ({how_levels}) in "
              f"{data.relative_to(ROOT)}/ ({how})", flush=True)
        fl = run_floor(data, args.floor_runs)
        est = exact_estimate(fl)
        fl.pop("pair_users")
        fits = [run_child(data) for _ in range(args.fit_runs)]
        refined = run_child(data, "reml") if args.refine else None
        eff = effects(users, items, args.seed)
        realized = {"user": float(np.std(eff["a"], ddof=1)),
                    "item": float(np.std(eff["b"], ddof=1))}
        runs.append({"rows": rows, "users": users, "items": items, "how": how_levels,
                     "floor": fl, "est": est, "fits": fits, "realized": realized,
                     "refined": refined})
        print(f"  floor {fl['best']:.1f} s; fit {fits[0].get('wall', float('nan')):.1f} s",
              flush=True)
    print()
    for r in runs:
        if "refused" in r["fits"][0]:
            print(f"mlpipe refused the {r['rows']:,}-row fit: {r['fits'][0]['refused']}")
            missed.append(f"{r['rows']:,} rows: refused")
    runs = [r for r in runs if "refused" not in r["fits"][0]]
    if not runs:
        return missed
    for r in runs:
        r["best"] = min(r["fits"], key=lambda f: f["wall"])
    best = [r["best"] for r in runs]
    head = [f"{r['rows']:,} rows" for r in runs]
    f0 = [r["floor"]["best"] for r in runs]
    out: list[tuple] = [
        ("users (generated / with rows)",
         [f"{r['users']:,} / {len(r['floor']['users']['n']):,}" for r in runs],
         "; ".join(sorted({r["how"] for r in runs}))),
        ("items (generated / with rows)",
         [f"{r['items']:,} / {len(r['floor']['items']['n']):,}" for r in runs],
         f"Zipf popularity (1/rank^{ITEM_ZIPF:g}); users 1/rank^{USER_ZIPF:g}"),
        ("rows per user: mean / min / max",
         [f"{r['rows'] / len(r['floor']['users']['n']):.0f} / "
          f"{int(r['floor']['users']['n'].min())} / {int(r['floor']['users']['n'].max()):,}"
          for r in runs], ""),
        ("rows per item: mean / min / max",
         [f"{r['rows'] / len(r['floor']['items']['n']):.0f} / "
          f"{int(r['floor']['items']['n'].min())} / {int(r['floor']['items']['n'].max()):,}"
          for r in runs], ""),
        ("distinct (user, item) pairs", [f"{r['floor']['pairs']:,}" for r in runs],
         "the nonzeros of Z_user'Z_item"),
        (f"floor: bare DuckDB aggregates (best of {args.floor_runs})",
         [f"{x:.2f} s" for x in f0],
         "runs " + "; ".join(", ".join(f"{t:.1f}" for t in r["floor"]["times"]) for r in runs)
         + " s"),
        ("mlpipe fit, whole process (fresh interpreter)", [f"{b['wall']:.2f} s" for b in best],
         f"target <= {TIME_TARGET_S} s: " + ", ".join(met(b["wall"] <= TIME_TARGET_S)
                                                      for b in best)),
        ("ratio whole process / floor", [f"{b['wall'] / x:.2f} x" for b, x in zip(best, f0)],
         ""),
        ("  imports", [f"{b['import_seconds']:.2f} s" for b in best], ""),
        ("  fit()", [f"{b['fit_seconds']:.2f} s" for b in best], ""),
    ]
    notes = {"prepare": "formula, schema, levels, pre-pass",
             "scan": "moment pass: totals, 2 level GROUP BYs, the pair GROUP BY",
             "solve": "moment equations, GLS by PCG, results"}
    for k in ("prepare", "scan", "solve"):
        out.append((f"    {k}", [f"{b['timings'].get(k, float('nan')):.2f} s" for b in best],
                    notes[k]))
    out += [
        ("    ratio scan / floor",
         [f"{b['timings'].get('scan', float('nan')) / x:.2f} x" for b, x in zip(best, f0)], ""),
        ("  block PCG iterations (p + 1 = 3 right-hand sides)",
         [str(b["evaluations"]) for b in best],
         "optimizer.evaluations; on the items' Schur complement (users eliminated)"),
        ("peak RSS of the fit process", [f"{b['peak_rss_mb']:.0f} MB" for b in best],
         f"target <= {RSS_TARGET_MB} MB: " + ", ".join(met(b["peak_rss_mb"] <= RSS_TARGET_MB)
                                                       for b in best)),
        ("  peak RSS reached during", [phase(b) for b in best],
         "VmRSS sampled every 50 ms, placed by result.timings"),
        ("peak RSS of the floor (bare DuckDB, fresh process)",
         [f"{r['floor']['peak_rss_mb']:.0f} MB" for r in runs], ""),
        ("throughput", [f"{r['rows'] / b['wall'] / 1e6:.2f} M rows/s"
                        for r, b in zip(runs, best)], "rows / whole process"),
    ]
    for g in ("user", "item"):
        out.append((f"sigma_{g} (truth {SD[g]})",
                    [f"{b['sd'][g]:.4f} ({rel(b['sd'][g], SD[g])})" for b in best],
                    "estimate (relative error); realized SD of the drawn effects "
                    + ", ".join(f"{r['realized'][g]:.4f}" for r in runs)))
    out.append((f"sigma (truth {SIGMA})",
                [f"{b['sigma']:.4f} ({rel(b['sigma'], SIGMA)})" for b in best], "residual SD"))
    for term, true in BETA.items():
        out.append((f"beta {term} (truth {true:g})",
                    [f"{b['beta'][term][0]:.4f} ({b['beta'][term][1]:.4f}) "
                     f"z={(b['beta'][term][0] - true) / b['beta'][term][1]:+.1f}"
                     for b in best], "estimate (SE) z vs truth, GLS at the moment estimates"))
    for g, name in [("user", "user"), ("item", "item"), ("Residual", "sigma^2")]:
        out.append((f"  sampling SE of sigma^2_{g}" if g != "Residual" else
                     "  sampling SE of sigma^2",
                     [f"{b['moments']['variance_se'][g]:.2g}" for b in best],
                     "Gaussian-model SE of the moment estimate (co-occurrence terms "
                     + ", ".join(b["moments"]["cooccurrence_terms"] for b in best) + ")"))
    refs = [r["refined"] for r in runs]
    if all(x and "refused" not in x for x in refs):
        out += [
            ("--refine reml: whole process", [f"{x['wall']:.2f} s" for x in refs],
             f"target <= {TIME_TARGET_S} s: " + ", ".join(met(x["wall"] <= TIME_TARGET_S)
                                                          for x in refs)),
            ("  solve (moments + refinement + GLS)",
             [f"{x['timings']['solve']:.2f} s" for x in refs], ""),
            ("  steps / updates / PCG iterations",
             [f"{x['moments']['refinement']['steps']} / {x['moments']['refinement']['updates']}"
              f" / {x['moments']['refinement']['pcg_iterations']}" for x in refs],
             f"{refs[0]['moments']['refinement']['probes']} probes; SQUAREM steps"),
            ("  peak RSS", [f"{x['peak_rss_mb']:.0f} MB" for x in refs],
             f"target <= {RSS_TARGET_MB} MB: " + ", ".join(met(x["peak_rss_mb"] <= RSS_TARGET_MB)
                                                          for x in refs)),
        ]
        for g, true in [("user", SD["user"]), ("item", SD["item"]), ("Residual", SIGMA)]:
            out.append((f"  refined sigma_{g}" if g != "Residual" else "  refined sigma",
                        [f"{np.sqrt(x['moments']['refinement']['sigma2'][g]):.4f} "
                         f"(±{x['moments']['refinement']['mc_se'][g] / 2 / np.sqrt(x['moments']['refinement']['sigma2'][g]):.1g})"  # noqa: E501
                         for x in refs],
                        f"truth {true}; ± the Monte Carlo SE the refinement claims"))
    from mlpipe.blocked import human_bytes as human  # as the exact path's refusal prints
    from mlpipe.blocked import physical_memory

    est = [r["est"] for r in runs]
    mem = physical_memory()
    out += [
        ("exact path: Schur complement order R", [f"{e['order']:,}" for e in est],
         "items (one intercept each); users eliminated level by level"),
        ("  update terms sum_users k^2", [f"{e['update_terms']:,}" for e in est],
         "k: a user's distinct items"),
        ("  memory the exact solver would need", [human(e["bytes"]) for e in est],
         "mlpipe._schur.estimate; " + ("dense" if est[0]["dense"] else "sparse")
         + f" factor; machine {human(mem) if mem else '?'}: "
         + ", ".join("refused" if mem and e["bytes"] > mem else "fits" for e in est)),
        ("  (bytes)", [f"{e['bytes']:,}" for e in est], ""),
        ("  dense Schur complement, for reference", [human(e["dense_bytes"]) for e in est],
         "48 B x pairs + 3 x 8 B x R^2 (S, its factor, its inverse)"),
    ]
    table(f"{FORMULA}, method of moments (mlpipe.fit(..., method='moments'))", head, out)
    for r in runs:
        print(f"exact path at {r['rows']:,} rows: {r['est']['formula']}")
    for b, r in zip(best, runs):
        print(f"optimizer messages at {r['rows']:,} rows: " + " | ".join(b["messages"]))
    print()
    if len(runs) >= 2:
        a, z = runs[0], runs[-1]
        print(f"rows x{z['rows'] / a['rows']:g}: whole process "
              f"x{z['best']['wall'] / a['best']['wall']:.2f}, scan "
              f"x{z['best']['timings']['scan'] / a['best']['timings']['scan']:.2f}, solve "
              f"x{z['best']['timings']['solve'] / a['best']['timings']['solve']:.2f}, floor "
              f"x{z['floor']['best'] / a['floor']['best']:.2f}; peak RSS "
              f"{a['best']['peak_rss_mb']:.0f} -> {z['best']['peak_rss_mb']:.0f} MB; pairs "
              f"x{z['floor']['pairs'] / a['floor']['pairs']:.2f}")
        print()
    for r in runs:
        x = r["refined"]
        if x and "refused" not in x:
            if x["wall"] > TIME_TARGET_S:
                missed.append(f"{r['rows']:,} rows, --refine reml: {x['wall']:.0f} s > "
                              f"{TIME_TARGET_S} s")
            if x["peak_rss_mb"] > RSS_TARGET_MB:
                missed.append(f"{r['rows']:,} rows, --refine reml: peak RSS "
                              f"{x['peak_rss_mb']:.0f} MB > {RSS_TARGET_MB} MB")
    for b, r in zip(best, runs):
        if b["wall"] > TIME_TARGET_S:
            missed.append(f"{r['rows']:,} rows: {b['wall']:.0f} s > {TIME_TARGET_S} s")
        if b["peak_rss_mb"] > RSS_TARGET_MB:
            missed.append(f"{r['rows']:,} rows: peak RSS {b['peak_rss_mb']:.0f} MB > "
                          f"{RSS_TARGET_MB} MB")
    return missed


def phase(b: dict) -> str:
    """Which of the fit's phases the sampled RSS peak fell in."""
    t, at = b["timings"], b["sampled_peak_at"]
    edges = [("prepare", t.get("prepare", 0.0)), ("scan", t.get("scan", 0.0)),
             ("solve", t.get("solve", 0.0))]
    acc = 0.0
    for name, dt in edges:
        acc += dt
        if at <= acc:
            return f"{name} ({b['sampled_peak_mb']:.0f} MB at {at:.0f} s)"
    return f"after solve ({b['sampled_peak_mb']:.0f} MB at {at:.0f} s)"


def rel(est: float, true: float) -> str:
    return f"{(est - true) / true:+.1%}"


def main() -> None:
    import argparse

    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-child":
        floor_child(sys.argv[2])
        return
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32_000_000],
                    help="rows (one run each; several give a curve)")
    ap.add_argument("--partitions", type=int, default=8, help="Parquet files per data set")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fit-runs", type=int, default=1, help="fresh subprocesses, the fastest "
                    "reported")
    ap.add_argument("--floor-runs", type=int, default=2)
    ap.add_argument("--no-refine", dest="refine", action="store_false",
                    help="skip the fit with --refine reml")
    args = ap.parse_args()
    import duckdb

    from mlpipe.blocked import human_bytes, physical_memory

    print(f"machine: {os.cpu_count()} CPUs (shared: timings are noisy), "
          f"{human_bytes(physical_memory() or 0)} memory; Python {platform.python_version()}, "
          f"DuckDB {duckdb.__version__}, NumPy {np.__version__}\n", flush=True)
    missed = bench(args)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets: " + ("all met" if not missed else "NOT MET: " + "; ".join(missed)))


if __name__ == "__main__":
    main()
