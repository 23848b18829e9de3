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
M = Z'Z + σ² D⁻¹ (D = diag(σ²_k) per level), the solves M W = Z'[X y] (`Henderson`: the
factor with the most levels eliminated exactly, block Jacobi-PCG on the others' Schur
complement, compiled products with the pairs' counts, O(combinations) each) give
β̂ = (X'X − X'Z W_X)⁻¹ (X'y − X'Z W_y), Var(β̂) = σ² (X'X − X'Z W_X)⁻¹ and the conditional
modes b̂ = W_y − W_X β̂ — the exact GLS / BLUP at the given components, to the
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
    passes: int = 0  # DuckDB queries over the data that built it (0: from cell statistics)

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


def compute_moment_statistics(data, formula: str, *, options=None) -> MomentStatistics:
    """The statistics pass of the method of moments (`sql/moment_*.sql`): totals, one
    GROUP BY per factor, one per pair of factors, over `data`'s complete rows (`options`:
    the pass's `engines.EngineOptions`)."""
    import duckdb

    from ._sql import Source, connect, quote_ident, render
    from .centering import materialize
    from .design import check_columns, design_from_data
    from .formula import parse_formula

    t0 = time.perf_counter()
    parsed = parse_formula(formula)
    source = Source(data)
    con = connect(options=options)
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
                            {"prepare": t1 - t0, "scan": time.perf_counter() - t1},
                            passes=1 + len(factors) + len(pairs))


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



#: the co-occurrence terms of the sampling variances are computed exactly while the sparse
#: product they need has at most this many nonzeros (by its upper bound); beyond, they are
#: estimated with COOCCURRENCE_PROBES Rademacher probes (seeded)
EXACT_TERM_NNZ = 20_000_000
COOCCURRENCE_PROBES = 64


def _cooccurrence_term(c: np.ndarray, i: np.ndarray, j: np.ndarray, div: np.ndarray,
                       rows: int, cols: int, Y: float, N: float) -> tuple[float, str]:
    """E' = tr((P_a − P_0) G_b (P_a − P_0) G_b) = ‖N'D_a⁻¹N − m m'/N‖²_F for the pair
    counts N (rows = levels of a, `div` their row counts; m = N'1, the other factor's
    counts), the centred co-occurrence term of Var(U_a).  It is the one part of the
    sampling variances left small by the cancellations between the U-statistics
    (E' = E − 2Y/N + (m'm)²/N², E = ‖N'D_a⁻¹N‖²_F = ‖D_a^-½NN'D_a^-½‖²_F, Y = m'N'D_a⁻¹Nm),
    so it is what must be computed accurately: "exact" from E through whichever product
    is smaller while it has at most EXACT_TERM_NNZ nonzeros; else "estimated" by
    Hutchinson's E‖M'z‖² = tr(M'²) for M' = N'D_a⁻¹N − m m'/N (z Rademacher, seeded; two
    sparse products per probe), unbiased, and its relative error is E'’s, not E's."""
    import scipy.sparse as sp

    inv = 1.0 / np.where(div > 0, div, 1.0)
    per_row = np.bincount(i, minlength=rows).astype(float)
    per_col = np.bincount(j, minlength=cols).astype(float)
    via_cols = min(float(per_row @ per_row), float(cols) * cols)
    via_rows = min(float(per_col @ per_col), float(rows) * rows)
    Nm = sp.csr_matrix((c, (i, j)), shape=(rows, cols))
    m = np.bincount(j, c, minlength=cols)
    centre = -2 * Y / N + float(m @ m) ** 2 / N ** 2
    if min(via_cols, via_rows) <= EXACT_TERM_NNZ:
        if via_cols <= via_rows:
            prod = Nm.T @ sp.diags(inv) @ Nm  # cols × cols
        else:
            s = sp.diags(np.sqrt(inv))
            prod = s @ Nm @ Nm.T @ s  # rows × rows
        return max(float(np.sum(prod.data ** 2)) + centre, 0.0), "exact"
    from ._pairs_jit import csr_add, csr_arrays

    z = np.random.default_rng(20170).choice([-1.0, 1.0], size=(cols, COOCCURRENCE_PROBES))
    t = np.zeros((rows, z.shape[1]))
    csr_add(t, 0, *csr_arrays(Nm), 0, z)
    t *= inv[:, None]
    mz = -np.outer(m, m @ z) / N
    csr_add(mz, 0, *csr_arrays(Nm.T.tocsr()), 0, t)
    return float(np.mean(np.einsum("ij,ij->j", mz, mz))), "estimated"


def moment_covariance(ms: MomentStatistics, mom: dict) -> dict | None:
    """Cov(U) of the U-statistics (U_1, …, U_K, U_e) under the Gaussian model at the
    components `mom["sigma2"]` (`moment_estimates`), and Cov(σ̂²) = A⁻¹ Cov(U) A⁻ᵀ.  One
    or two factors (crossed, nested or partly both): the closed form below; three or more:
    exactly through the level Gram matrix while its products are small
    (`_traces_by_gram`), else None (not computed).

    With Q_k = I − P_k (P_k the projection on factor k's level indicators, P_0 on the
    intercept; U_k = y'Q_k y, U_e = N y'Q_0 y), V = σ²_a G_a + σ²_b G_b + σ² I
    (G_k = Z_k Z_k'), Cov(y'Q_k y, y'Q_l y) = 2 tr(Q_k V Q_l V), which Q_k G_k = 0 and
    P_k P_0 = P_0 reduce to sums over the levels and level pairs (O(combinations)):

        tr(Q_a V Q_a V) = σ⁴_b (ΣN_•j² − 2 W_a + E_a) + 2σ²_b σ² (N − T_a) + σ⁴ (N − R)
        tr(Q_a V Q_b V) = σ⁴ (N − R − C + Σ N_ij² / (N_i• N_•j))
        tr(Q_a V Q_0 V) = σ⁴_b (ΣN_•j² − W_a − ΣN_•j³/N + Y_a/N) + 2σ²_b σ² (N − T_a)
                          + σ⁴ (N − R)
        tr(Q_0 V Q_0 V) = Σ_k σ⁴_k (ΣN_k² − 2ΣN_k³/N + (ΣN_k²)²/N²) + 2σ²_a σ²_b (ΣN_ij²
                          − 2 Σ N_ij N_i• N_•j / N + ΣN_i•² ΣN_•j² / N²)
                          + 2σ² Σ_k σ²_k (N − ΣN_k²/N) + σ⁴ (N − 1)

    (and b's by symmetry) with T_a = Σ N_ij²/N_i•, W_a = Σ N_ij² N_•j / N_i•,
    Y_a = Σ_i (Σ_j N_ij N_•j)² / N_i• and E_a = tr(P_a G_b P_a G_b) = ‖N' D_a⁻¹ N‖²_F.
    E_a is the one term that needs the level co-occurrences (the fill-in that makes the
    exact solver too large).  It is computed exactly while that product is small
    (EXACT_TERM_NNZ), otherwise estimated stochastically — in its centred form, the part
    the cancellations between U_a, U_b and U_e leave (`_cooccurrence_term`).  Bounding it
    instead (0 ≤ tr(PGPG) ≤ tr(PG²) for a projection P and G ⪰ 0), as a conservative
    formula would, is not conservative here: σ̂² is a difference of U-statistics, and the
    bound on one of them overstates its variance many times over (2× on a small design).
    Assumptions: Gaussian effects and errors (heavier tails make the true variances
    larger), the plug-in components, and y − Xβ for the OLS residuals (an O(p/N)
    difference)."""
    K = len(ms.factors)
    if K > 2:
        tr = _traces_by_gram(ms, mom["sigma2"])
        return None if tr is None else _covariance(ms, mom, tr, "exact")
    sigma2_k = mom["sigma2"]
    N = float(ms.n)
    s = [float(v) for v in sigma2_k[:K]] + [0.0] * (2 - K)
    se = float(sigma2_k[K])
    fa = ms.factors[0]
    na = fa.n
    sums = {}  # per factor k ∈ {0, 1}: L, ΣN², ΣN³ and, with a partner, T, W, Y, E
    hows: list[str] = []
    if K == 2:
        i, j, c = ms.pairs[(0, 1)]
        nb = ms.factors[1].n
        F = float(np.sum(c ** 2))
        H = float(np.sum(c * na[i] * nb[j]))
        Tab = float(np.sum(c ** 2 / (na[i] * nb[j])))
        for k, (own, other, oi, xi, m_own, m_other) in enumerate(
                [(na, nb, i, j, len(na), len(nb)), (nb, na, j, i, len(nb), len(na))]):
            W = float(np.sum(c ** 2 * other[xi] / own[oi]))
            Y = float(np.sum(np.bincount(oi, c * other[xi], minlength=m_own) ** 2
                             / np.where(own > 0, own, 1.0)))
            Ec, how = _cooccurrence_term(c, oi, xi, own, m_own, m_other, Y, N)
            hows.append(how)
            sums[k] = dict(T=float(np.sum(c ** 2 / own[oi])), W=W, Y=Y, Ec=Ec)
    for k in range(K):
        n_k = ms.factors[k].n
        sums.setdefault(k, {}).update(L=float(np.sum(n_k > 0)), S2=float(n_k @ n_k),
                                      S3=float(np.sum(n_k ** 3)))
    tr = np.zeros((K + 1, K + 1))  # tr(Q_k V Q_l V), k, l ∈ factors + (0: the intercept)
    for k in range(K):
        if K == 2:
            o = 1 - k  # the other factor
            so, S, P = s[o], sums[k], sums[o]
            E = S["Ec"] + 2 * S["Y"] / N - P["S2"] ** 2 / N ** 2
            tr[k, k] = (so ** 2 * (P["S2"] - 2 * S["W"] + E) + 2 * so * se * (N - S["T"])
                        + se ** 2 * (N - S["L"]))
            tr[k, K] = (so ** 2 * (P["S2"] - S["W"] - P["S3"] / N + S["Y"] / N)
                        + 2 * so * se * (N - S["T"]) + se ** 2 * (N - S["L"]))
        else:
            tr[k, k] = tr[k, K] = se ** 2 * (N - sums[k]["L"])
    if K == 2:
        tr[0, 1] = se ** 2 * (N - sums[0]["L"] - sums[1]["L"] + Tab)
    t00 = se ** 2 * (N - 1)
    for k in range(K):
        S = sums[k]
        t00 += s[k] ** 2 * (S["S2"] - 2 * S["S3"] / N + S["S2"] ** 2 / N ** 2)
        t00 += 2 * s[k] * se * (N - S["S2"] / N)
    if K == 2:
        t00 += 2 * s[0] * s[1] * (F - 2 * H / N + sums[0]["S2"] * sums[1]["S2"] / N ** 2)
    tr[K, K] = t00
    tr = np.triu(tr) + np.triu(tr, 1).T
    return _covariance(ms, mom, tr, "estimated" if "estimated" in hows else "exact")


def _covariance(ms: MomentStatistics, mom: dict, tr: np.ndarray, terms: str) -> dict:
    """Cov(U) = 2 tr(Q_k V Q_l V) (U_e scaled by N) → Cov(σ̂²) = A⁻¹ Cov(U) A⁻ᵀ."""
    K, N = len(ms.factors), float(ms.n)
    scale = np.ones(K + 1)
    scale[K] = N  # U_e = N y'Q_0 y
    cov_u = 2 * tr * np.outer(scale, scale)
    rs = np.abs(mom["A"]).max(axis=1)  # rows of A scaled alike (U_e is ~N times the others)
    Ainv = np.linalg.inv(mom["A"] / rs[:, None])
    cov = Ainv @ (cov_u / np.outer(rs, rs)) @ Ainv.T
    return {"cov_u": cov_u, "cov": cov, "se": np.sqrt(np.maximum(np.diag(cov), 0.0)),
            "terms": terms}


def _traces_by_gram(ms: MomentStatistics, sigma2_k: np.ndarray) -> np.ndarray | None:
    """tr(Q_k V Q_l V) for any number of factors (k, l over the factors and, last, the
    intercept), exactly, through the Gram matrix G = Z'Z of the level indicators (q × q,
    sparse) and H_k = Z'P_k Z = G_·k D_k⁻¹ G_k· — or None when some H_k would have more
    than EXACT_TERM_NNZ nonzeros (its bound: Σ over k's levels of their rows' nonzeros², at
    most q²).
    With S = diag(σ²) over the levels, A_k = Z'Q_k Z = G − H_k and
    B_lk = Z'Q_l Q_k Z = G − H_l − H_k + G_·l D_l⁻¹ N_lk D_k⁻¹ G_k·:

        tr(Q_k V Q_l V) = σ⁴ tr(Q_k Q_l) + 2σ² tr(S B_lk) + tr(S A_k S A_l),

    the intercept's H_0 = n n'/N kept as a rank-one term (P_0 P_k = P_0, so B_0k = A_k)."""
    import scipy.sparse as sp

    K, N = len(ms.factors), float(ms.n)
    offs = np.concatenate([[0], np.cumsum([f.m for f in ms.factors])]).astype(np.int64)
    q = int(offs[-1])
    rows, cols, vals = [np.arange(q)], [np.arange(q)], [np.concatenate([f.n for f in
                                                                       ms.factors])]
    for (k, ll), (i, j, c) in ms.pairs.items():
        rows += [offs[k] + i, offs[ll] + j]
        cols += [offs[ll] + j, offs[k] + i]
        vals += [c, c]
    G = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(q, q))
    row_nnz = np.diff(G.indptr).astype(float)
    for k in range(K):
        if min(float(np.sum(row_nnz[offs[k]:offs[k + 1]] ** 2)), float(q) ** 2) > \
                EXACT_TERM_NNZ:
            return None
    n = np.concatenate([f.n for f in ms.factors])
    S = np.concatenate([np.full(f.m, float(sigma2_k[k])) for k, f in enumerate(ms.factors)])
    se = float(sigma2_k[K])
    Gk = [G[:, offs[k]:offs[k + 1]].tocsr() for k in range(K)]
    inv = [1.0 / np.where(f.n > 0, f.n, 1.0) for f in ms.factors]
    H = [(Gk[k] @ sp.diags(inv[k]) @ Gk[k].T).tocsr() for k in range(K)]
    A = [(G - H[k]).tocsr() for k in range(K)]
    SAS = [sp.diags(S) @ A[k] @ sp.diags(S) for k in range(K)]
    Sn = S * n
    SGS = sp.diags(S) @ G @ sp.diags(S)
    tr = np.zeros((K + 1, K + 1))
    L = [float(np.sum(f.n > 0)) for f in ms.factors]
    for k in range(K + 1):
        for ll in range(k, K + 1):
            # σ⁴ tr(Q_k Q_l)
            if k == K and ll == K:
                qq = N - 1
            elif ll == K or k == ll:
                qq = N - L[k]
            else:
                i, j, c = ms.pairs[(k, ll)]
                qq = N - L[k] - L[ll] + float(np.sum(c ** 2 * inv[k][i] * inv[ll][j]))
            # tr(S B_lk): diag of G − H_l − H_k + G_·l D_l⁻¹ N_lk D_k⁻¹ G_k·
            if ll == K:
                B_diag = (G.diagonal() - n * n / N) if k == K else (G.diagonal()
                                                                   - H[k].diagonal())
            elif k == ll:
                B_diag = G.diagonal() - H[k].diagonal()
            else:
                Nlk = G[offs[ll]:offs[ll + 1], offs[k]:offs[k + 1]]
                F = (Gk[ll] @ sp.diags(inv[ll]) @ Nlk @ sp.diags(inv[k])).tocsr()
                B_diag = (G.diagonal() - H[ll].diagonal() - H[k].diagonal()
                          + np.asarray(F.multiply(Gk[k]).sum(axis=1)).ravel())
            sb = float(S @ B_diag)
            # tr(S A_k S A_l), A_0 = G − n n'/N
            if k == K:  # both the intercept
                t = (float(SGS.multiply(G).sum()) - 2 / N * float(Sn @ (G @ Sn))
                     + float(Sn @ n) ** 2 / N ** 2)
            elif ll == K:
                t = float(SAS[k].multiply(G).sum()) - float(Sn @ (A[k] @ Sn)) / N
            else:
                t = float(SAS[k].multiply(A[ll]).sum())
            tr[k, ll] = tr[ll, k] = se ** 2 * qq + 2 * se * sb + t
    return tr


class Henderson:
    """Henderson's u-block M = Z'Z + σ² D⁻¹ over the factors with a positive component,
    as sparse products with the pairs' counts (O(combinations) per product), and its
    solves (`solve`).  M's block of the factor with the most levels is diagonal (its
    levels share no rows with each other), so that factor is eliminated exactly and block
    PCG — Jacobi-preconditioned conjugate gradients on every right-hand side at once, one
    read of the pair matrices per iteration — runs on the Schur complement of the other
    factors' levels, S = M_rr − M_re D_e⁻¹ M_er (for users × items: on the items).  With
    one factor M is diagonal and solved directly."""

    def __init__(self, ms: MomentStatistics, active: list[int]):
        import scipy.sparse as sp

        from ._pairs_jit import csr_arrays

        self.ms, self.active = ms, active
        self.offs = np.concatenate([[0], np.cumsum([ms.factors[k].m for k in active])]
                                   ).astype(np.int64)
        self.q = int(self.offs[-1])
        where = {k: j for j, k in enumerate(active)}
        # the eliminated factor (most levels) and the others' offsets in the reduced space
        self.elim = max(range(len(active)), key=lambda j: ms.factors[active[j]].m) \
            if active else None
        self.rest_off = {}
        off = 0
        for j in range(len(active)):
            if j != self.elim:
                self.rest_off[j] = off
                off += ms.factors[active[j]].m
        self.q_rest = off
        # directed pair blocks: (row factor, column factor, CSR arrays rows × columns)
        self.directed = []
        self.pair_arrays = []  # (row factor, column factor, i, j, c) for diag(S)
        for (k, ll), (i, j, c) in ms.pairs.items():
            if k in where and ll in where:
                B = sp.csr_matrix((c, (i, j)), shape=(ms.factors[k].m, ms.factors[ll].m))
                for a, b, mat in ((where[k], where[ll], B), (where[ll], where[k], B.T.tocsr())):
                    self.directed.append((a, b, *csr_arrays(mat)))
                self.pair_arrays.append((where[k], where[ll], i, j, c))
        self.ztxy = np.concatenate([np.column_stack([ms.factors[k].sx.T, ms.factors[k].sy])
                                    for k in active]) if active else np.zeros((0, ms.p + 1))

    def diagonal(self, sigma2_k: np.ndarray) -> np.ndarray:
        """diag(M) at the components (σ²_1..σ²_K, σ²)."""
        sigma2 = float(sigma2_k[-1])
        return np.concatenate([self.ms.factors[k].n + sigma2 / sigma2_k[k]
                               for k in self.active]) if self.active else np.zeros(0)

    # the full space: factors at self.offs; the reduced space: the non-eliminated factors
    def _e(self, V: np.ndarray) -> np.ndarray:
        return V[self.offs[self.elim]:self.offs[self.elim + 1]]

    def _rest(self, V: np.ndarray) -> np.ndarray:
        return np.concatenate([V[self.offs[j]:self.offs[j + 1]] for j in self.rest_off]) \
            if self.rest_off else V[:0]

    def _add(self, out, out_space: str, V, v_space: str, sign: float = 1.0) -> None:
        """out += sign · (the pair blocks from V's space into out's space) V."""
        from ._pairs_jit import csr_add

        src = V if sign == 1.0 else -V
        for a, b, ptr, idx, val in self.directed:
            a_e, b_e = a == self.elim, b == self.elim
            if (out_space == "e") != a_e or (v_space == "e") != b_e:
                continue
            csr_add(out, 0 if a_e else self.rest_off[a], ptr, idx, val,
                    0 if b_e else self.rest_off[b], src)

    def _schur(self, d_e: np.ndarray, d_r: np.ndarray, V: np.ndarray) -> np.ndarray:
        """S V = d_r V + M_rr,off V − M_re D_e⁻¹ M_er V for a (q_rest, r) block V."""
        V = np.ascontiguousarray(V)
        t = np.zeros((len(d_e), V.shape[1]))
        self._add(t, "e", V, "r")
        t /= d_e[:, None]
        out = d_r[:, None] * V
        self._add(out, "r", V, "r")
        self._add(out, "r", t, "e", sign=-1.0)
        return out

    def _schur_diagonal(self, d_e: np.ndarray, d_r: np.ndarray) -> np.ndarray:
        out = d_r.copy()
        for a, b, i, j, c in self.pair_arrays:
            if a == self.elim or b == self.elim:
                e_idx, r_idx, rf = (i, j, b) if a == self.elim else (j, i, a)
                out[self.rest_off[rf]:self.rest_off[rf] + self.ms.factors[
                    self.active[rf]].m] -= np.bincount(r_idx, c ** 2 / d_e[e_idx],
                                                       minlength=self.ms.factors[
                                                           self.active[rf]].m)
        return out

    def solve(self, d: np.ndarray, B: np.ndarray, X0: np.ndarray | None = None, *,
              rtol: float = PCG_RTOL) -> tuple[np.ndarray, int]:
        """M X = B (columns of B) → (X, PCG iterations): S X_r = B_r − M_re D_e⁻¹ B_e by
        block PCG to ‖residual‖ ≤ rtol ‖that right-hand side‖ per column, then
        X_e = D_e⁻¹ (B_e − M_er X_r).  `X0`: a start (full space)."""
        if self.elim is None:
            return np.zeros_like(B), 0
        d_e, d_r = self._e(d), self._rest(d)
        B_e = np.ascontiguousarray(self._e(B))
        X_r, it = np.zeros((self.q_rest, B.shape[1])), 0
        if self.q_rest:
            Br = np.ascontiguousarray(self._rest(B))
            self._add(Br, "r", B_e / d_e[:, None], "e", sign=-1.0)
            pre = self._schur_diagonal(d_e, d_r)[:, None]
            x0 = Br / pre if X0 is None else np.ascontiguousarray(self._rest(X0))
            X_r, it = self._pcg(d_e, d_r, pre, Br, x0, rtol)
        X_e = B_e.copy()
        self._add(X_e, "e", X_r, "r", sign=-1.0)
        X_e /= d_e[:, None]
        X = np.empty_like(B, dtype=float)
        X[self.offs[self.elim]:self.offs[self.elim + 1]] = X_e
        for j, off in self.rest_off.items():
            X[self.offs[j]:self.offs[j + 1]] = X_r[off:off + self.offs[j + 1] - self.offs[j]]
        return X, it

    def _pcg(self, d_e, d_r, pre, B, X, rtol):
        """Block PCG on S with the Jacobi preconditioner `pre` (diag S): the columns still
        iterating kept compacted (contiguous), a converged one written back as it drops
        out."""
        R = B - self._schur(d_e, d_r, X)
        target = rtol ** 2 * np.einsum("ij,ij->j", B, B)
        live = np.flatnonzero(np.einsum("ij,ij->j", R, R) > target)
        Xl, Rl = X[:, live], R[:, live]
        P = Rl / pre
        rz = np.einsum("ij,ij->j", Rl, P)
        it = 0
        while live.size:
            if it >= PCG_MAXITER:
                raise InputError(f"the conjugate-gradient solve did not converge in "
                                 f"{PCG_MAXITER} iterations (rtol {rtol:g})")
            it += 1
            AP = self._schur(d_e, d_r, P)
            alpha = rz / np.einsum("ij,ij->j", P, AP)
            Xl += alpha * P
            Rl -= alpha * AP
            keep = np.einsum("ij,ij->j", Rl, Rl) > target[live]
            if not keep.all():
                X[:, live[~keep]] = Xl[:, ~keep]
                live, Xl, Rl, P, rz = (live[keep], Xl[:, keep], Rl[:, keep], P[:, keep],
                                       rz[keep])
                if not live.size:
                    break
            Zr = Rl / pre
            rz_new = np.einsum("ij,ij->j", Rl, Zr)
            P = Zr + (rz_new / rz) * P
            rz = rz_new
        return X, it


def _gls_step(ms: MomentStatistics, hend: Henderson, W: np.ndarray):
    """From the solves W = M⁻¹ Z'[X y]: R_X'R_X = X'X − X'Z W_X, β̂ and b̂ = W_y − W_X β̂
    (`gls`, and each update of `refine`)."""
    p = ms.p
    ZtX, WX, Wy = hend.ztxy[:, :p], W[:, :p], W[:, p]
    xtx_adj = np.asarray(ms.xtx, dtype=float) - ZtX.T @ WX
    xtx_adj = (xtx_adj + xtx_adj.T) / 2
    beta = np.linalg.solve(xtx_adj, np.asarray(ms.xty, dtype=float) - ZtX.T @ Wy)
    return xtx_adj, beta, Wy - WX @ beta


def gls(ms: MomentStatistics, sigma2_k: np.ndarray, *, rtol: float = PCG_RTOL) -> dict:
    """β̂, Var(β̂), b̂ and approximate conditional SDs at the variance components
    (σ²_1..σ²_K, σ²), by block PCG on Henderson's equations (see the module docstring)."""
    K = len(ms.factors)
    sigma2 = float(sigma2_k[K])
    if not sigma2 > 0:
        raise InputError("the method of moments estimates the residual variance as 0")
    active = [k for k in range(K) if sigma2_k[k] > 0]
    hend = Henderson(ms, active)
    out_b = {k: np.zeros(ms.factors[k].m) for k in range(K)}
    out_sd = {k: np.zeros(ms.factors[k].m) for k in range(K)}
    # every variance component at 0: W = 0, OLS
    d = hend.diagonal(sigma2_k)
    W, iterations = hend.solve(d, hend.ztxy, rtol=rtol) if hend.q else (hend.ztxy, 0)
    xtx_adj, beta, b = _gls_step(ms, hend, W)
    vcov = sigma2 * np.linalg.inv(xtx_adj)
    if hend.q:
        sd = np.sqrt(sigma2 / d)
        for jj, k in enumerate(active):
            out_b[k] = b[hend.offs[jj]:hend.offs[jj + 1]]
            out_sd[k] = sd[hend.offs[jj]:hend.offs[jj + 1]]
    return {"beta": beta, "vcov": vcov, "b": out_b, "cond_sd": out_sd,
            "iterations": iterations, "sigma2": sigma2, "xtx_adj": xtx_adj}


# ------------------------------------------------------------------ the REML refinement

REFINE_PROBES = 16
REFINE_TOL = 1e-6  # relative change of every component in one (accelerated) step
REFINE_MAXITER = 100
REFINE_EXACT_LEVELS = 64  # a factor with no more levels has its trace term exactly
REFINE_RTOL = 1e-8  # the PCG solves of one update (its Monte Carlo error is far larger)
REFINE_FLOOR = 1e-3  # a component the moments set to 0 starts at this share of σ²


def refine(ms: MomentStatistics, sigma2_k: np.ndarray, *, reml: bool = True,
           probes: int = REFINE_PROBES, seed: int = 0, tol: float = REFINE_TOL,
           maxiter: int = REFINE_MAXITER) -> dict:
    """Approximate REML (or ML) variance components from the moment estimates, within
    O(levels + combinations) memory: the fixed point of the EM-REML update

        σ²_k ← (b̂_k'b̂_k + σ² tr(C^kk)) / L_k,    σ² ← y'(y − Xβ̂ − Zb̂) / (N − p)

    (N for ML), whose fixed points are the stationary points of the REML criterion
    (Harville 1977).  b̂, β̂ come from block-PCG solves with M = Z'Z + σ²D⁻¹ (`Henderson`);
    tr(C^kk) — level block k of the inverse of Henderson's matrix with β absorbed,
    M⁻¹ + W_X S⁻¹ W_X' (S = X'X − X'Z W_X) — is the exact diagonal of the second part
    plus tr_k(M⁻¹): exact for a factor of at most REFINE_EXACT_LEVELS levels (its unit
    vectors solved; few levels make a small, poorly probed trace), else Hutchinson's
    estimate from `probes` Rademacher probes on the other factors' levels, solved with the
    same block PCG.  The probes are drawn once (seeded), so the update is a fixed, smooth
    map: its fixed point is found by SQUAREM-accelerated iteration (Varadhan & Roland
    2008) with warm-started solves.  The Monte Carlo error of the result —
    (I − J)⁻¹ δF, δF the probes' scatter of the update, J its Jacobian by differences —
    is what the refinement claims (`mc_se`)."""
    K = len(ms.factors)
    N, p = float(ms.n), ms.p
    s0 = np.asarray(sigma2_k, dtype=float).copy()
    floor = REFINE_FLOOR * s0[K]
    s0[:K] = np.maximum(s0[:K], floor)
    hend = Henderson(ms, list(range(K)))
    levels = np.array([ms.factors[k].m for k in range(K)], dtype=float)
    # a factor of at most REFINE_EXACT_LEVELS levels has tr_k(M⁻¹) exactly, from its unit
    # vectors; the probes cover the other factors' levels only
    small = [k for k in range(K) if levels[k] <= REFINE_EXACT_LEVELS]
    rng = np.random.default_rng(seed)
    Zp = rng.choice([-1.0, 1.0], size=(hend.q, probes))
    units = []
    for k in small:
        Zp[hend.offs[k]:hend.offs[k + 1]] = 0.0
        e = np.zeros((hend.q, int(levels[k])))
        e[np.arange(hend.offs[k], hend.offs[k + 1]), np.arange(int(levels[k]))] = 1.0
        units.append(e)
    rhs = np.column_stack([hend.ztxy, Zp] + units)
    state = {"W": None, "evaluations": 0, "iterations": 0}
    xty = np.asarray(ms.xty, float)
    zty = hend.ztxy[:, p]

    def update(s: np.ndarray, keep: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(F(s), the probes' per-probe contributions to F's components)."""
        d = hend.diagonal(s)
        W, it = hend.solve(d, rhs, state["W"], rtol=REFINE_RTOL)
        state["evaluations"] += 1
        state["iterations"] += it
        if keep:
            state["W"] = W
        WX, Wz = W[:, :p], W[:, p + 1:p + 1 + probes]
        S, beta, b = _gls_step(ms, hend, W)
        ye = float(ms.yty - beta @ xty - b @ zty)
        new = np.empty(K + 1)
        new[K] = ye / (N - p if reml else N)
        extra = np.sum(WX * np.linalg.solve(S, WX.T).T, axis=1) if reml else 0.0
        per_probe = np.zeros((K, probes))
        col = p + 1 + probes
        for k in range(K):
            sl = slice(hend.offs[k], hend.offs[k + 1])
            if k in small:  # the diagonal of M⁻¹ over the level block, exactly
                t_probe = np.full(probes, float(np.trace(W[sl, col:col + int(levels[k])])))
                col += int(levels[k])
            else:
                t_probe = np.sum(Zp[sl] * Wz[sl], axis=0)
            tr = float(t_probe.mean()) + (float(np.sum(extra[sl])) if reml else 0.0)
            new[k] = (float(b[sl] @ b[sl]) + s[K] * tr) / levels[k]
            per_probe[k] = s[K] * t_probe / levels[k]
        return new, per_probe

    x = s0
    steps, converged = 0, False
    fx, _ = update(x)
    while steps < maxiter:
        steps += 1
        x1 = fx
        x2, _ = update(x1)
        r, v = x1 - x, x2 - 2 * x1 + x
        nv = float(np.linalg.norm(v))
        alpha = -float(np.linalg.norm(r)) / nv if nv > 0 else -1.0
        alpha = min(alpha, -1.0)
        xn = x - 2 * alpha * r + alpha ** 2 * v
        if not np.all(xn > 0):
            xn = x2
        fn, _ = update(xn)
        change = float(np.max(np.abs(fn - xn) / np.maximum(np.abs(xn), 1e-300)))
        x, fx = xn, fn
        if change < tol:
            converged = True
            break
    x = fx  # one last update from the (converged) point
    fx, per_probe = update(x)
    # Monte Carlo error: J by forward differences of the fixed probes' map
    J = np.empty((K + 1, K + 1))
    for c in range(K + 1):
        h = 1e-4 * x[c]
        xp = x.copy()
        xp[c] += h
        J[:, c] = (update(xp, keep=False)[0] - fx) / h
    dF = np.zeros((K + 1, K + 1))
    dF[:K, :K] = np.cov(per_probe) / probes if K > 1 else np.var(per_probe, ddof=1) / probes
    G = np.linalg.inv(np.eye(K + 1) - J)
    mc = np.sqrt(np.maximum(np.diag(G @ dF @ G.T), 0.0))
    return {"sigma2": fx, "mc_se": mc, "converged": converged, "steps": steps,
            "evaluations": state["evaluations"], "iterations": state["iterations"],
            "probes": probes,
            "at_floor": [ms.factors[k].name for k in range(K) if fx[k] <= floor * 1.0001]}


def fit_moments(data, *, reason: str | None = None, refine_with: str | None = None):
    """A FitResult by the method of moments and GLS (no likelihood) from `data`: a
    `MomentStatistics` or cell statistics (`Statistics`).  `reason`: why this path was taken
    instead of the exact one (the optimizer record's first message).  `refine_with`:
    "REML" or "ML" refines the components by `refine` before the GLS step."""
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
    K = len(ms.factors)
    names = [f.name for f in ms.factors] + ["Residual"]
    mom = moment_estimates(ms)
    cov = moment_covariance(ms, mom)
    record = {"estimates": dict(zip(names, mom["sigma2"].tolist())),
              "raw": dict(zip(names, mom["raw"].tolist()))}
    if cov is not None:
        record["variance_se"] = dict(zip(names, cov["se"].tolist()))
        record["variance_cov"] = cov["cov"].tolist()
        record["cooccurrence_terms"] = cov["terms"]
    source = (f"{ms.passes} passes over the data: totals, a GROUP BY per factor and per pair "
              f"of factors" if ms.passes else "summed from the cell statistics")
    messages = [f"variance components by the method of moments (U-statistics, Gao & Owen "
                f"2017; {source})"]
    clipped = [ms.factors[k].name for k in range(K) if mom["raw"][k] < 0]
    if clipped:
        messages.append(f"negative moment estimates set to 0: {', '.join(clipped)}")
    s2 = mom["sigma2"]
    method = "moments+PCG"
    if refine_with is not None:
        ref = refine(ms, s2, reml=refine_with == "REML")
        moved = ", ".join(f"{nm} {math.sqrt(a):.4g} → {math.sqrt(b):.4g}"
                          f" (±{e / (2 * math.sqrt(b)):.2g})"
                          for nm, a, b, e in zip(names, s2, ref["sigma2"], ref["mc_se"]))
        messages.append(
            f"refined to approximate {refine_with} by stochastic EM ({ref['probes']} probes, "
            f"{ref['steps']} accelerated step{'s' * (ref['steps'] != 1)}, "
            f"{ref['evaluations']} updates, "
            f"{ref['iterations']} PCG iterations"
            + ("" if ref["converged"] else f"; NOT converged in {REFINE_MAXITER} steps")
            + f"): SDs moved {moved} (± the Monte Carlo SE)")
        if ref["at_floor"]:
            messages.append(f"at the refinement's floor (its REML value is 0 or near it): "
                            f"{', '.join(ref['at_floor'])}")
        record["refinement"] = {
            "criterion": refine_with, "sigma2": dict(zip(names, ref["sigma2"].tolist())),
            "mc_se": dict(zip(names, ref["mc_se"].tolist())), "probes": ref["probes"],
            "steps": ref["steps"], "updates": ref["evaluations"],
            "pcg_iterations": ref["iterations"], "converged": ref["converged"]}
        s2 = ref["sigma2"]
        method = f"moments+EM-{refine_with}+PCG"
    est = gls(ms, s2)
    messages.append(f"fixed effects by GLS at them ({est['iterations']} block conjugate-"
                    f"gradient iterations, rtol {PCG_RTOL:g})")
    if reason:
        messages.insert(0, reason)
    sigma2 = est["sigma2"]
    sigma = math.sqrt(sigma2)
    rx = np.linalg.cholesky(est["xtx_adj"]).T  # R_X'R_X = σ² Var(β)⁻¹
    fixed, vcov = _fixed_table(ms.fixed_names, est["beta"], rx, sigma2)
    rand, corrs = variance_tables([(f.name, ["(Intercept)"], np.array([[s2[k]]]), [(0, 1)])
                                   for k, f in enumerate(ms.factors)])
    ranef = pl.concat([modes_table(f.name, f.labels, ["(Intercept)"], est["b"][k][:, None],
                                   est["cond_sd"][k][:, None])
                       for k, f in enumerate(ms.factors)])
    theta = np.sqrt(s2[:K] / sigma2)
    opt = OptSummary(method, [], float("nan"), theta.tolist(), float("nan"),
                     evaluations=est["iterations"], return_code="SUCCESS", converged=True,
                     reml=False, seconds=time.perf_counter() - t0, messages=messages,
                     start="moments")
    nan = float("nan")
    singular = bool(clipped) if refine_with is None else bool(record["refinement"] and
                                                             ref["at_floor"])
    return FitResult(
        formula=ms.formula, method="moments", nobs=ms.n,
        groups={f.name: f.m for f in ms.factors}, fixed_effects=fixed, vcov_matrix=vcov,
        random_effects=rand, random_correlations=corrs, residual_variance=sigma2, sigma=sigma,
        loglik=nan, deviance=nan, reml_criterion=None, aic=nan, bic=nan,
        npar=ms.p + K + 1, converged=True, singular=singular, optimizer=opt,
        ranef=ranef, theta=theta, rows_dropped=ms.rows_dropped, stats=stats,
        moments=record)
