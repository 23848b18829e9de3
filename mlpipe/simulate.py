"""A synthetic two-level panel with known parameters, written as partitioned Parquet.

    y = b0 + b1 x + b2 w + b3 x·w + u0_g + u1_g x + e
    (u0_g, u1_g) ~ N(0, [[tau00, tau01], [tau01, tau11]]),   e ~ N(0, sigma²)

`x` varies within groups (level 1), `w` is constant within a group (level 2).  Group sizes
are 2 + Multinomial(rows − 2·groups, uniform), i.e. roughly Poisson around rows/groups, and
sum to exactly `rows`.  Groups are split into `partitions` contiguous ranges of ids; each
partition is one Parquet file, written chunk by chunk (memory stays O(chunk), not O(rows)),
so every group's rows sit in exactly one file.

`compare_to_truth` checks a fit of ``y ~ x * w + (x | g)`` against the truth, with standard
errors for the fixed effects (from the fit) and for the variance components (from the
observed information of the REML/ML criterion in (tau00, tau01, tau11, sigma)).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError

#: the true parameters of the simulated model
TRUTH = {
    "beta": {"(Intercept)": 10.0, "x": 2.0, "w": 1.5, "x:w": -0.5},
    "tau00": 1.0,   # Var(u0): intercept variance
    "tau01": 0.15,  # Cov(u0, u1): correlation 0.3
    "tau11": 0.25,  # Var(u1): slope variance
    "sigma": 2.0,   # residual standard deviation
}
FORMULA = "y ~ x * w + (x | g)"
CHUNK_ROWS = 1 << 20  # rows generated and written at a time
SCHEMA = pa.schema([("g", pa.int64()), ("x", pa.float64()), ("w", pa.float64()),
                    ("y", pa.float64())])


def simulate(out_dir: str | os.PathLike[str], *, rows: int, groups: int, partitions: int = 8,
             seed: int = 1) -> dict:
    """Write `rows` rows in `groups` groups to out_dir/part-000.parquet, ...; return the truth.

    The truth (parameters plus the simulation settings) is also written to out_dir/truth.json.
    Existing part-*.parquet files in out_dir are replaced.
    """
    rows, groups, partitions = int(rows), int(groups), int(partitions)
    if groups < 2:
        raise InputError("simulate needs at least 2 groups")
    if rows < 2 * groups:
        raise InputError(f"simulate needs at least 2 rows per group ({2 * groups} rows for "
                         f"{groups} groups), not {rows}")
    if partitions < 1:
        raise InputError("simulate needs at least 1 partition")
    partitions = min(partitions, groups)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()

    rng = np.random.default_rng(seed)
    t = TRUTH
    beta = np.array(list(t["beta"].values()))
    cov = np.array([[t["tau00"], t["tau01"]], [t["tau01"], t["tau11"]]])
    chol = np.linalg.cholesky(cov)

    # group-level draws: O(groups) memory
    sizes = 2 + rng.multinomial(rows - 2 * groups, np.full(groups, 1.0 / groups))
    w = rng.standard_normal(groups)
    u = rng.standard_normal((groups, 2)) @ chol.T  # (groups, 2)

    bounds = np.linspace(0, groups, partitions + 1).round().astype(np.int64)
    ends = np.cumsum(sizes)  # rows of groups [0, k) end at ends[k-1]
    files = []
    for part in range(partitions):
        g_lo, g_hi = int(bounds[part]), int(bounds[part + 1])
        path = out / f"part-{part:03d}.parquet"
        tmp = out / f".part-{part:03d}.parquet.tmp"
        try:
            with pq.ParquetWriter(tmp, SCHEMA, compression="snappy") as writer:
                g = g_lo
                while g < g_hi:
                    # as many whole groups as fit in one chunk (at least one)
                    start_row = ends[g - 1] if g > 0 else 0
                    g_end = int(np.searchsorted(ends, start_row + CHUNK_ROWS, side="right"))
                    g_end = min(max(g_end, g + 1), g_hi)
                    writer.write_table(_chunk(rng, g, g_end, sizes, w, u, beta, t["sigma"]),
                                       row_group_size=CHUNK_ROWS)
                    g = g_end
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        files.append(path.name)

    truth = {**{k: (dict(v) if isinstance(v, dict) else v) for k, v in t.items()},
             "formula": FORMULA, "rows": rows, "groups": groups, "partitions": partitions,
             "seed": seed, "files": files}
    tmp = out / ".truth.json.tmp"
    tmp.write_text(json.dumps(truth, indent=2) + "\n")
    os.replace(tmp, out / "truth.json")
    return truth


def _chunk(rng: np.random.Generator, g_lo: int, g_hi: int, sizes: np.ndarray, w: np.ndarray,
           u: np.ndarray, beta: np.ndarray, sigma: float) -> pa.Table:
    ids = np.arange(g_lo, g_hi, dtype=np.int64)
    g = np.repeat(ids, sizes[g_lo:g_hi])
    n = len(g)
    x = rng.standard_normal(n)
    wr = w[g]
    y = (beta[0] + u[g, 0]) + (beta[1] + u[g, 1]) * x + beta[2] * wr + beta[3] * x * wr \
        + sigma * rng.standard_normal(n)
    return pa.table({"g": g, "x": x, "w": wr, "y": y}, schema=SCHEMA)


def read_truth(out_dir: str | os.PathLike[str]) -> dict | None:
    """The truth.json of a simulated directory, or None when there is none."""
    try:
        return json.loads((Path(out_dir) / "truth.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------------- checking a fit

def variance_component_se(result) -> dict[str, tuple[float, float]]:
    """(estimate, SE) of tau00, tau01, tau11 and sigma for a fitted ``(x | g)`` model.

    The SEs come from the observed information of the criterion (REML or ML, β profiled)
    written as a function of φ = (tau00, tau01, tau11, sigma): Var(φ̂) ≈ 2 H⁻¹ with H the
    finite-difference Hessian of the deviance at φ̂.  Only the sufficient statistics are used.
    """
    from .objective import Objective

    stats = result.stats
    obj = Objective(stats, reml=result.method == "REML")
    n, p = stats.n, stats.p
    dof = n - p if obj.reml else n

    def deviance(phi: np.ndarray) -> float:
        t00, t01, t11, sig = phi
        cov = np.array([[t00, t01], [t01, t11]]) / sig**2
        try:
            T = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            return np.inf
        theta = np.array([T[0, 0], T[1, 0], T[1, 1]])
        dec = obj.decompose(theta)
        d = dec.logdet_l + dof * np.log(2 * np.pi * sig**2) + dec.r2 / sig**2
        return d + (dec.logdet_rx if obj.reml else 0.0)

    T = np.zeros((2, 2))
    th = np.asarray(result.theta, dtype=float)
    T[0, 0], T[1, 0], T[1, 1] = th
    cov = result.sigma**2 * T @ T.T
    phi = np.array([cov[0, 0], cov[0, 1], cov[1, 1], result.sigma])
    h = 1e-4 * np.maximum(np.abs(phi), 1e-3)
    k = len(phi)
    H = np.empty((k, k))
    f0 = deviance(phi)
    for a in range(k):
        for b in range(a, k):
            ea = np.zeros(k)
            eb = np.zeros(k)
            ea[a], eb[b] = h[a], h[b]
            if a == b:
                H[a, a] = (deviance(phi + ea) - 2 * f0 + deviance(phi - ea)) / h[a] ** 2
            else:
                H[a, b] = H[b, a] = (deviance(phi + ea + eb) - deviance(phi + ea - eb)
                                     - deviance(phi - ea + eb) + deviance(phi - ea - eb)) \
                    / (4 * h[a] * h[b])
    try:
        var = np.diag(2 * np.linalg.inv(H))
    except np.linalg.LinAlgError:
        var = np.full(k, np.nan)
    se = np.sqrt(np.where(var > 0, var, np.nan))
    return {name: (float(phi[i]), float(se[i]))
            for i, name in enumerate(["tau00", "tau01", "tau11", "sigma"])}


def compare_to_truth(result, truth: dict) -> list[dict]:
    """One row per parameter: name, truth, estimate, se, z = (estimate − truth)/se."""
    rows = []
    fe = {r["term"]: r for r in result.fixed_effects.iter_rows(named=True)}
    for name, true in truth["beta"].items():
        est, se = fe[name]["estimate"], fe[name]["std_error"]
        rows.append({"parameter": name, "truth": float(true), "estimate": float(est),
                     "se": float(se), "z": (est - true) / se})
    for name, (est, se) in variance_component_se(result).items():
        true = float(truth[name])
        rows.append({"parameter": name, "truth": true, "estimate": est, "se": se,
                     "z": (est - true) / se if se > 0 else float("nan")})
    return rows
