"""The method of moments for random-intercept models too large for the exact solver, with
fixed effects by generalized least squares at the moment estimates (`fit_moments`).

Model: y = Xβ + Σ_k Z_k a_k + e, one random intercept per grouping factor k (crossed or
nested, any number), a_k ~ N(0, σ²_k I), e ~ N(0, σ² I).

**Variance components** (Gao & Owen 2017, "Efficient moment calculations for variance
components in large unbalanced crossed random effects models", extended to K factors).
On the OLS residuals r = y − Xβ̂_OLS, the within-level sums of squares of each factor and
the total pairwise sum of squares

    U_k = Σ_i Σ_{rows in level i of k} (r − r̄_i)²  = Σ r² − Σ_i R_i² / N_i
    U_e = N Σ r² − (Σ r)²

have expectations linear in (σ²_1, …, σ²_K, σ²):

    E U_k = Σ_{l≠k} σ²_l (N − Σ_i Σ_m N_im² / N_i) + σ² (N − L_k)
    E U_e = Σ_l σ²_l (N² − Σ_m N_m²) + σ² (N² − N)

(N_i rows in level i of k, N_im of them in level m of l, L_k levels), and the estimates solve
that (K+1)×(K+1) system; a negative solution is set to 0 (and recorded).  Everything comes
from per-level sums and, per pair of factors, the counts of their level combinations — a
`MomentStatistics` value, built by its own SQL pass (`compute_moment_statistics`: a totals
scan, one GROUP BY per factor, one per pair of factors; never the per-cell statistics) or
from cell statistics already at hand (`MomentStatistics.from_statistics`).  Assumptions,
as the paper's: the moments are those of y − Xβ (the OLS fit's effect on them, O(p/N), is
ignored), and the estimates are unbiased but not efficient — they are not REML;
`tests/test_moments.py` measures how far they are from it.

**Fixed effects** by GLS at those components, from Henderson's equations: with
M = Z'Z + σ² D⁻¹ (D = diag(σ²_k) per level), p + 1 preconditioned conjugate-gradient solves
M W = Z'[X y] (Jacobi preconditioner; sparse products with the pairs' counts, O(combinations) each)
give β̂ = (X'X − X'Z W_X)⁻¹ (X'y − X'Z W_y), Var(β̂) = σ² (X'X − X'Z W_X)⁻¹ and the
conditional modes b̂ = W_y − W_X β̂ — the exact GLS / BLUP at the given components, to the
solver's tolerance.  Conditional SDs are approximated by σ / sqrt(diag M) (a lower bound on
the exact ones).  There is no likelihood: loglik, AIC and BIC are NaN, and fits by moments
are not compared by likelihood ratio.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .errors import DataError, InputError

PCG_RTOL = 1e-12
PCG_MAXITER = 5000


@dataclass
class LevelSums:
    """One random-intercept factor: its levels' labels, row counts, Σx (p, m) and Σy."""

    name: str
    labels: np.ndarray
    n: np.ndarray
    sx: np.ndarray
    sy: np.ndarray

    @property
    def m(self) -> int:
        return len(self.n)


@dataclass
class MomentStatistics:
    """What the method of moments and its GLS step need: totals X'X, X'y, y'y, n; per
    factor `LevelSums`; per pair of factors (k < l) the counts of their level combinations
    (i, j, n) — the nonzeros of Z_k'Z_l.  O(levels + combinations), never O(rows)."""

    formula: str
    fixed_names: list[str]
    n: int
    rows_dropped: int
    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    factors: list[LevelSums]
    pairs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def p(self) -> int:
        return len(self.fixed_names)

    @classmethod
    def from_statistics(cls, stats) -> MomentStatistics:
        """From cell statistics (`Statistics`) of a random-intercept model."""
        if stats.weights or stats.residual is not None:
            raise InputError("the method of moments takes no case weights or residual "
                             "structure")
        if stats.general:
            facs = []
            for f in stats.factors:
                if f.q != 1 or f.names != ["(Intercept)"]:
                    raise InputError(f"the method of moments fits random intercepts only; "
                                     f"{f.name} has {', '.join(f.names)}")
                facs.append((f.name, np.asarray(f.index, np.int64), f.m, np.asarray(f.levels)))
        else:
            if stats.random_names != ["(Intercept)"]:
                raise InputError(f"the method of moments fits random intercepts only; "
                                 f"{stats.group} has {', '.join(stats.random_names)}")
            facs = [(stats.group, np.arange(stats.m, dtype=np.int64), stats.m,
                     np.asarray(stats.levels))]
        a = stats.random_names.index("(Intercept)")
        n_c = np.asarray(stats.ztz[a, a], dtype=float)
        sy_c = np.asarray(stats.zty[a], dtype=float)
        sx_c = np.asarray(stats.ztx[a], dtype=float)
        factors = [LevelSums(name, labels, np.bincount(idx, n_c, minlength=m),
                             np.stack([np.bincount(idx, sx_c[j], minlength=m)
                                       for j in range(stats.p)]).reshape(stats.p, m),
                             np.bincount(idx, sy_c, minlength=m))
                   for name, idx, m, labels in facs]
        pairs = {}
        for k in range(len(facs)):
            for ll in range(k + 1, len(facs)):
                ik, il, ml = facs[k][1], facs[ll][1], facs[ll][2]
                uniq, inv = np.unique(ik * ml + il, return_inverse=True)
                pairs[(k, ll)] = (uniq // ml, uniq % ml, np.bincount(inv, n_c))
        return cls(stats.formula, list(stats.fixed_names), int(stats.n), int(stats.rows_dropped),
                   np.asarray(stats.xtx, float), np.asarray(stats.xty, float), float(stats.yty),
                   factors, pairs, dict(stats.timings))


def compute_moment_statistics(data, formula: str, *, memory_limit: str | None = None,
                              threads: int | None = None,
                              temp_directory: str | None = None) -> MomentStatistics:
    """The statistics pass of the method of moments (`sql/moment_*.sql`): totals, one
    GROUP BY per factor, one per pair of factors, over `data`'s complete rows."""
    import duckdb

    from ._sql import Source, connect, quote_ident, render
    from .centering import materialize
    from .design import check_columns, design_from_data
    from .formula import parse_formula

    t0 = time.perf_counter()
    parsed = parse_formula(formula)
    source = Source(data)
    con = connect(memory_limit=memory_limit, threads=threads, temp_directory=temp_directory)
    try:
        schema = source.schema(con, parsed.value_columns())
        check_columns(parsed, schema)
        design = design_from_data(con, source, parsed, schema)
        for f in design.factors:
            if f.names != ("(Intercept)",):
                raise InputError(f"the method of moments fits random intercepts only; "
                                 f"{f.name} has {', '.join(f.names)}")
        if design.offset is not None:
            raise InputError("the method of moments takes no offset()")
        t1 = time.perf_counter()
        src, _means = materialize(con, source, design)
        params = {**source.params, **design.params}
        complete = design.complete_sql
        p = len(design.fixed)
        cols = [f"CAST({c.sql or '1.0'} AS DOUBLE) AS x{j}" for j, c in enumerate(design.fixed)]
        cols.append(f"CAST({design.response.sql} AS DOUBLE) AS y")
        names = [f"x{j}" for j in range(p)] + ["y"]
        prods = [(a, b) for ia, a in enumerate(names) for b in names[ia:]]
        sums = ", ".join(f"fsum({a} * {b}) FILTER (WHERE complete) AS {a}_{b}"
                         for a, b in prods)

        def run(sql: str):
            try:
                return con.execute(sql, params)
            except duckdb.Error as exc:
                raise source.error(exc, "the moment pass failed over") from None

        row = run(render("moment_totals", sums=sums, complete=complete,
                         columns=", ".join(cols), source=src)).fetchnumpy()
        tot = {k: float(v[0]) if v[0] is not None else float("nan") for k, v in row.items()}
        n = int(tot["n"])
        if n == 0:
            raise DataError(f"no rows left after dropping rows with missing values "
                            f"({int(tot['rows_read'])} rows read, all dropped)")
        get = lambda a, b: tot[f"{a}_{b}"] if f"{a}_{b}" in tot else tot[f"{b}_{a}"]  # noqa
        xtx = np.array([[get(names[i], names[j]) for j in range(p)] for i in range(p)])
        xty = np.array([get(names[i], "y") for i in range(p)])
        yty = get("y", "y")
        if not np.all(np.isfinite(xtx)) or not np.isfinite(yty):
            raise DataError("a model column takes non-finite values in the rows used")
        factors, tables = [], []
        for k, f in enumerate(design.factors):
            keys = [f"k{c}" for c in range(len(f.columns))]
            key_columns = ", ".join(f"src.{quote_ident(c)} AS {kk}"
                                    for c, kk in zip(f.columns, keys))
            label = " || ':' || ".join(f"CAST({kk} AS VARCHAR)" for kk in keys)
            sum_names = [f"x{j}" for j in range(p)] + ["y"]
            run(render("moment_levels", table=f"mlv{k}", keys=", ".join(keys),
                       label=label, sum_names=", ".join(f"s_{c}" for c in sum_names),
                       sums=", ".join(f"fsum({c}) AS s_{c}" for c in sum_names),
                       key_columns=key_columns, columns=", ".join(cols), source=src,
                       complete=complete))
            lv = con.execute(f"SELECT label, n, {', '.join(f's_{c}' for c in sum_names)} "
                             f"FROM mlv{k} ORDER BY idx").fetchnumpy()
            sx = np.stack([np.asarray(lv[f"s_x{j}"], float) for j in range(p)]).reshape(
                p, len(lv["n"]))
            factors.append(LevelSums(f.name, np.asarray(lv["label"], dtype=object),
                                     np.asarray(lv["n"], float), sx,
                                     np.asarray(lv["s_y"], float)))
            tables.append((f.columns, keys))
        pairs = {}
        for k in range(len(factors)):
            for ll in range(k + 1, len(factors)):
                ca, cb = design.factors[k].columns, design.factors[ll].columns
                union = list(dict.fromkeys(list(ca) + list(cb)))
                ukeys = [f"u{i}" for i in range(len(union))]
                key_columns = ", ".join(f"src.{quote_ident(c)} AS {u}"
                                        for c, u in zip(union, ukeys))
                join = lambda cols, t: " AND ".join(  # noqa: E731
                    f"pairs.{ukeys[union.index(c)]} = {t}.k{i}" for i, c in enumerate(cols))
                try:  # no model columns here: the source's parameters only
                    reader = con.execute(render(
                        "moment_pairs", keys=", ".join(ukeys), key_columns=key_columns,
                        source=src, complete=complete, table_a=f"mlv{k}",
                        table_b=f"mlv{ll}", join_a=join(ca, "a"), join_b=join(cb, "b")),
                        source.params).fetchnumpy()
                except duckdb.Error as exc:
                    raise source.error(exc, "the moment pass failed over") from None
                pairs[(k, ll)] = (np.asarray(reader["i"], np.int64),
                                  np.asarray(reader["j"], np.int64),
                                  np.asarray(reader["n"], float))
    finally:
        con.close()
    return MomentStatistics(parsed.text, [c.name for c in design.fixed], n,
                            int(tot["rows_read"]) - n, xtx, xty, float(yty), factors, pairs,
                            {"prepare": t1 - t0, "scan": time.perf_counter() - t1})


def moment_estimates(ms: MomentStatistics) -> dict:
    """σ²_k per factor and σ² from the U-statistics (see the module docstring)."""
    beta = np.linalg.solve(ms.xtx, ms.xty)
    rss = float(ms.yty - 2 * beta @ ms.xty + beta @ ms.xtx @ beta)
    N = float(ms.n)
    K = len(ms.factors)
    A = np.zeros((K + 1, K + 1))
    u = np.zeros(K + 1)
    for k, f in enumerate(ms.factors):
        R = f.sy - beta @ f.sx
        used = f.n > 0
        u[k] = rss - float(np.sum(R[used] ** 2 / f.n[used]))
        A[k, K] = N - float(used.sum())
    for (k, ll), (i, j, c) in ms.pairs.items():
        A[k, ll] = N - float(np.sum(c ** 2 / ms.factors[k].n[i]))
        A[ll, k] = N - float(np.sum(c ** 2 / ms.factors[ll].n[j]))
    f0 = ms.factors[0]  # every row used is in one of its levels: Σ r over all rows
    total = float(f0.sy.sum() - beta @ f0.sx.sum(axis=1))
    u[K] = N * rss - total ** 2
    for ll, f in enumerate(ms.factors):
        A[K, ll] = N ** 2 - float(np.sum(f.n ** 2))
    A[K, K] = N ** 2 - N
    scale = np.abs(A).max(axis=1)  # U_e is ~N times the others
    raw = np.linalg.solve(A / scale[:, None], u / scale)
    return {"raw": raw, "sigma2": np.maximum(raw, 0.0), "A": A, "u": u, "beta_ols": beta}


def gls(ms: MomentStatistics, sigma2_k: np.ndarray, *, rtol: float = PCG_RTOL) -> dict:
    """β̂, Var(β̂), b̂ and approximate conditional SDs at the variance components
    (σ²_1..σ²_K, σ²), by PCG on Henderson's equations (see the module docstring)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator, cg

    K = len(ms.factors)
    sigma2 = float(sigma2_k[K])
    if not sigma2 > 0:
        raise InputError("the method of moments estimates the residual variance as 0")
    active = [k for k in range(K) if sigma2_k[k] > 0]
    p = ms.p
    offs = np.concatenate([[0], np.cumsum([ms.factors[k].m for k in active])]).astype(np.int64)
    Q = int(offs[-1])
    out_b = {k: np.zeros(ms.factors[k].m) for k in range(K)}
    out_sd = {k: np.zeros(ms.factors[k].m) for k in range(K)}
    iterations = 0
    xtx = np.asarray(ms.xtx, dtype=float)
    if Q == 0:  # every variance component at 0: OLS
        xtx_adj, rhs = xtx, np.asarray(ms.xty, dtype=float)
    else:
        d = np.concatenate([ms.factors[k].n + sigma2 / sigma2_k[k] for k in active])
        where = {k: j for j, k in enumerate(active)}
        blocks = []  # (row offset, column offset, the pair's CSR matrix)
        for (k, ll), (i, j, c) in ms.pairs.items():
            if k in where and ll in where:
                B = sp.csr_matrix((c, (i, j)), shape=(ms.factors[k].m, ms.factors[ll].m))
                blocks.append((offs[where[k]], offs[where[k] + 1], offs[where[ll]],
                               offs[where[ll] + 1], B))

        def matvec(v):
            v = np.ravel(v)
            out = d * v
            for r0, r1, c0, c1, B in blocks:
                out[r0:r1] += B @ v[c0:c1]
                out[c0:c1] += B.T @ v[r0:r1]
            return out

        M = LinearOperator((Q, Q), matvec=matvec, dtype=float)
        pre = LinearOperator((Q, Q), matvec=lambda v: np.ravel(v) / d, dtype=float)
        ZtXy = np.concatenate([np.column_stack([ms.factors[k].sx.T, ms.factors[k].sy])
                               for k in active])
        W = np.empty_like(ZtXy)
        for col in range(p + 1):
            count = [0]

            def tick(_x, count=count):
                count[0] += 1
            rhs_c = ZtXy[:, col]
            sol, info = cg(M, rhs_c, x0=rhs_c / d, rtol=rtol, atol=0.0, maxiter=PCG_MAXITER,
                           M=pre, callback=tick)
            if info != 0:
                raise InputError(f"the conjugate-gradient solve did not converge in "
                                 f"{PCG_MAXITER} iterations (rtol {rtol:g})")
            W[:, col] = sol
            iterations += count[0]
        ZtX, WX, Wy = ZtXy[:, :p], W[:, :p], W[:, p]
        xtx_adj = xtx - ZtX.T @ WX
        rhs = np.asarray(ms.xty, dtype=float) - ZtX.T @ Wy
    xtx_adj = (xtx_adj + xtx_adj.T) / 2
    beta = np.linalg.solve(xtx_adj, rhs)
    vcov = sigma2 * np.linalg.inv(xtx_adj)
    if Q:
        b = Wy - WX @ beta
        sd = np.sqrt(sigma2 / d)
        for jj, k in enumerate(active):
            out_b[k] = b[offs[jj]:offs[jj + 1]]
            out_sd[k] = sd[offs[jj]:offs[jj + 1]]
    return {"beta": beta, "vcov": vcov, "b": out_b, "cond_sd": out_sd,
            "iterations": iterations, "sigma2": sigma2}


def fit_moments(data, *, reason: str | None = None):
    """A FitResult by the method of moments and GLS (no likelihood) from `data`: a
    `MomentStatistics` or cell statistics (`Statistics`).  `reason`: why this path was taken
    instead of the exact one (the optimizer record's first message)."""
    from .model import rank_deficient_columns
    from .optimize import OptSummary
    from .results import FitResult, _fixed_table, modes_table, variance_tables

    t0 = time.perf_counter()
    stats = None
    if isinstance(data, MomentStatistics):
        ms = data
    else:
        stats, ms = data, MomentStatistics.from_statistics(data)
    if ms.n <= ms.p:
        raise DataError(f"{ms.p} fixed effects for {ms.n} observations")
    if "(Intercept)" not in ms.fixed_names:
        raise InputError("the method of moments needs an intercept among the fixed effects "
                         "(its U-statistics cannot tell a random effect's variance from a "
                         "nonzero mean the model leaves out)")
    dependent = rank_deficient_columns(ms.xtx)
    if dependent:
        raise DataError(f"fixed-effects design is rank deficient: "
                        f"{', '.join(ms.fixed_names[j] for j in dependent)}")
    for f in ms.factors:
        if f.m < 2:
            raise DataError(f"grouping factor {f.name} has fewer than 2 levels")
    mom = moment_estimates(ms)
    s2 = mom["sigma2"]
    est = gls(ms, s2)
    K = len(ms.factors)
    sigma2 = est["sigma2"]
    sigma = math.sqrt(sigma2)
    rx = np.linalg.cholesky(sigma2 * np.linalg.inv(est["vcov"])).T  # R_X'R_X = σ² Var(β)⁻¹
    fixed, vcov = _fixed_table(ms.fixed_names, est["beta"], rx, sigma2)
    rand, corrs = variance_tables([(f.name, ["(Intercept)"], np.array([[s2[k]]]), [(0, 1)])
                                   for k, f in enumerate(ms.factors)])
    ranef = pl.concat([modes_table(f.name, f.labels, ["(Intercept)"], est["b"][k][:, None],
                                   est["cond_sd"][k][:, None])
                       for k, f in enumerate(ms.factors)])
    theta = np.sqrt(s2[:K] / sigma2)
    messages = [f"variance components by the method of moments (U-statistics, Gao & Owen "
                f"2017); fixed effects by GLS at them ({est['iterations']} conjugate-"
                f"gradient iterations, rtol {PCG_RTOL:g})"]
    clipped = [ms.factors[k].name for k in range(K) if mom["raw"][k] < 0]
    if clipped:
        messages.append(f"negative moment estimates set to 0: {', '.join(clipped)}")
    if reason:
        messages.insert(0, reason)
    opt = OptSummary("moments+PCG", [], float("nan"), theta.tolist(), float("nan"),
                     evaluations=est["iterations"], return_code="SUCCESS", converged=True,
                     reml=False, seconds=time.perf_counter() - t0, messages=messages,
                     start="moments")
    nan = float("nan")
    return FitResult(
        formula=ms.formula, method="moments", nobs=ms.n,
        groups={f.name: f.m for f in ms.factors}, fixed_effects=fixed, vcov_matrix=vcov,
        random_effects=rand, random_correlations=corrs, residual_variance=sigma2, sigma=sigma,
        loglik=nan, deviance=nan, reml_criterion=None, aic=nan, bic=nan,
        npar=ms.p + K + 1, converged=True, singular=bool(clipped), optimizer=opt,
        ranef=ranef, theta=theta, rows_dropped=ms.rows_dropped, stats=stats)
