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
from the cell statistics: per factor O(levels) sums, per pair of factors the counts of their
level pairs.  Assumptions, as the paper's: the moments are those of y − Xβ (the OLS fit's
effect on them, O(p/N), is ignored), and the estimates are unbiased but not efficient —
they are not REML; `tests/test_moments.py` measures how far they are from it.

**Fixed effects** by GLS at those components, from Henderson's equations: with
M = Z'Z + σ² D⁻¹ (D = diag(σ²_k) per level), p + 1 preconditioned conjugate-gradient solves
M W = Z'[X y] (Jacobi preconditioner; sparse matrix-vector products with Z'Z, O(cells) each)
give β̂ = (X'X − X'Z W_X)⁻¹ (X'y − X'Z W_y), Var(β̂) = σ² (X'X − X'Z W_X)⁻¹ and the
conditional modes b̂ = W_y − W_X β̂ — the exact GLS / BLUP at the given components, to the
solver's tolerance.  Conditional SDs are approximated by σ / sqrt(diag M) (a lower bound on
the exact ones).  There is no likelihood: loglik, AIC and BIC are NaN, and fits by moments
are not compared by likelihood ratio.
"""

from __future__ import annotations

import math
import time

import numpy as np
import polars as pl

from .errors import InputError

PCG_RTOL = 1e-12
PCG_MAXITER = 5000


def _factors(stats) -> list[tuple[str, np.ndarray, int, np.ndarray]]:
    """(name, level of every cell, levels, labels) per random-intercept factor."""
    if stats.general:
        out = []
        for f in stats.factors:
            if f.q != 1 or f.names != ["(Intercept)"]:
                raise InputError(f"the method of moments fits random intercepts only; "
                                 f"{f.name} has {', '.join(f.names)}")
            out.append((f.name, np.asarray(f.index, np.int64), f.m, np.asarray(f.levels)))
        return out
    if stats.random_names != ["(Intercept)"]:
        raise InputError(f"the method of moments fits random intercepts only; {stats.group} "
                         f"has {', '.join(stats.random_names)}")
    return [(stats.group, np.arange(stats.m, dtype=np.int64), stats.m,
             np.asarray(stats.levels))]


def moment_estimates(stats) -> dict:
    """σ²_k per factor and σ² from the U-statistics (see the module docstring), with the
    (K+1)×(K+1) system, the OLS β and the per-cell pieces the GLS step reuses."""
    if stats.weights or stats.residual is not None:
        raise InputError("the method of moments takes no case weights or residual structure")
    factors = _factors(stats)
    a = stats.random_names.index("(Intercept)")
    n_c = np.asarray(stats.ztz[a, a], dtype=float)  # rows per cell
    sy_c = np.asarray(stats.zty[a], dtype=float)
    sx_c = np.asarray(stats.ztx[a], dtype=float)  # (p, cells)
    beta = np.linalg.solve(stats.xtx, stats.xty)
    rss = float(stats.yty - 2 * beta @ stats.xty + beta @ stats.xtx @ beta)
    r_c = sy_c - beta @ sx_c
    N = float(stats.n)
    K = len(factors)
    A = np.zeros((K + 1, K + 1))
    u = np.zeros(K + 1)
    counts = [np.bincount(idx, n_c, minlength=m) for _name, idx, m, _lab in factors]
    for k, (_name, idx, m, _lab) in enumerate(factors):
        Ni = counts[k]
        Ri = np.bincount(idx, r_c, minlength=m)
        used = Ni > 0
        u[k] = rss - float(np.sum(Ri[used] ** 2 / Ni[used]))
        A[k, K] = N - float(used.sum())
        for ll, (_n2, idx_l, m_l, _l2) in enumerate(factors):
            if ll == k:
                continue
            uniq, inv = np.unique(idx * m_l + idx_l, return_inverse=True)
            nim = np.bincount(inv, n_c)
            A[k, ll] = N - float(np.sum(nim ** 2 / Ni[uniq // m_l]))
    total = float(np.sum(r_c))
    u[K] = N * rss - total ** 2
    for ll in range(K):
        A[K, ll] = N ** 2 - float(np.sum(counts[ll] ** 2))
    A[K, K] = N ** 2 - N
    # rows scaled to a common magnitude before solving (U_e is ~N times the others)
    scale = np.abs(A).max(axis=1)
    raw = np.linalg.solve(A / scale[:, None], u / scale)
    return {"factors": factors, "raw": raw, "sigma2": np.maximum(raw, 0.0), "A": A, "u": u,
            "beta_ols": beta, "n_c": n_c, "sy_c": sy_c, "sx_c": sx_c}


def gls(stats, mom: dict, *, rtol: float = PCG_RTOL) -> dict:
    """β̂, Var(β̂), b̂ and approximate conditional SDs at the moment estimates, by PCG on
    Henderson's equations (see the module docstring)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator, cg

    factors, s2 = mom["factors"], mom["sigma2"]
    K = len(factors)
    sigma2 = float(s2[K])
    if not sigma2 > 0:
        raise InputError("the method of moments estimates the residual variance as 0")
    active = [k for k in range(K) if s2[k] > 0]
    p = stats.p
    n_c, sy_c, sx_c = mom["n_c"], mom["sy_c"], mom["sx_c"]
    cells = len(n_c)
    offs = np.concatenate([[0], np.cumsum([factors[k][2] for k in active])]).astype(np.int64)
    Q = int(offs[-1])
    out_b = {k: np.zeros(factors[k][2]) for k in range(K)}
    out_sd = {k: np.zeros(factors[k][2]) for k in range(K)}
    iterations = 0
    if Q == 0:  # every variance component at 0: OLS
        xtx_adj = np.asarray(stats.xtx, dtype=float)
        rhs = np.asarray(stats.xty, dtype=float)
    else:
        rows = np.concatenate([np.arange(cells)] * len(active))
        cols = np.concatenate([factors[k][1] + offs[j] for j, k in enumerate(active)])
        Zc = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(cells, Q))
        ZtZ = (Zc.T @ sp.diags(n_c) @ Zc).tocsr()
        lam = np.concatenate([np.full(factors[k][2], sigma2 / s2[k]) for k in active])
        M = (ZtZ + sp.diags(lam)).tocsr()
        d = M.diagonal()
        pre = LinearOperator((Q, Q), matvec=lambda v: v / d, dtype=float)
        ZtXy = np.column_stack([Zc.T @ sx_c[j] for j in range(p)] + [Zc.T @ sy_c])
        W = np.empty_like(ZtXy)
        for j in range(p + 1):
            count = [0]

            def tick(_x, count=count):
                count[0] += 1
            rhs_j = ZtXy[:, j]
            x0 = rhs_j / d
            sol, info = cg(M, rhs_j, x0=x0, rtol=rtol, atol=0.0, maxiter=PCG_MAXITER, M=pre,
                           callback=tick)
            if info != 0:
                raise InputError(f"the conjugate-gradient solve did not converge in "
                                 f"{PCG_MAXITER} iterations (rtol {rtol:g})")
            W[:, j] = sol
            iterations += count[0]
        ZtX, WX, Wy = ZtXy[:, :p], W[:, :p], W[:, p]
        xtx_adj = np.asarray(stats.xtx, dtype=float) - ZtX.T @ WX
        rhs = np.asarray(stats.xty, dtype=float) - ZtX.T @ Wy
    xtx_adj = (xtx_adj + xtx_adj.T) / 2
    beta = np.linalg.solve(xtx_adj, rhs)
    vcov = sigma2 * np.linalg.inv(xtx_adj)
    if Q:
        b = Wy - WX @ beta
        sd = np.sqrt(sigma2 / d)
        for j, k in enumerate(active):
            out_b[k] = b[offs[j]:offs[j + 1]]
            out_sd[k] = sd[offs[j]:offs[j + 1]]
    return {"beta": beta, "vcov": vcov, "b": out_b, "cond_sd": out_sd,
            "iterations": iterations, "sigma2": sigma2}


def fit_moments(stats, *, reason: str | None = None):
    """A FitResult by the method of moments and GLS (no likelihood).  `reason`: why this
    path was taken instead of the exact one (recorded in the optimizer's messages)."""
    from .optimize import OptSummary
    from .results import FitResult, _fixed_table

    t0 = time.perf_counter()
    mom = moment_estimates(stats)
    est = gls(stats, mom)
    factors, s2 = mom["factors"], mom["sigma2"]
    K = len(factors)
    sigma2 = est["sigma2"]
    sigma = math.sqrt(sigma2)
    rx = np.linalg.cholesky(sigma2 * np.linalg.inv(est["vcov"])).T  # R_X'R_X = σ² Var(β)⁻¹
    fixed, vcov = _fixed_table(stats.fixed_names, est["beta"], rx, sigma2)
    rand = pl.DataFrame({"group": [f[0] for f in factors], "term": ["(Intercept)"] * K,
                         "variance": s2[:K], "std_dev": np.sqrt(s2[:K])})
    corrs = pl.DataFrame(schema={"group": pl.Utf8, "term1": pl.Utf8, "term2": pl.Utf8,
                                 "correlation": pl.Float64})
    ranef = pl.concat([pl.DataFrame({"group": name, "level": pl.Series(labels, dtype=pl.Utf8),
                                     "term": "(Intercept)", "estimate": est["b"][k],
                                     "cond_sd": est["cond_sd"][k]})
                       for k, (name, _idx, _m, labels) in enumerate(factors)])
    theta = np.sqrt(s2[:K] / sigma2)
    messages = [f"variance components by the method of moments (U-statistics, Gao & Owen "
                f"2017); fixed effects by GLS at them ({est['iterations']} conjugate-"
                f"gradient iterations, rtol {PCG_RTOL:g})"]
    clipped = [factors[k][0] for k in range(K) if mom["raw"][k] < 0]
    if clipped:
        messages.append(f"negative moment estimates set to 0: {', '.join(clipped)}")
    if reason:
        messages.insert(0, reason)
    opt = OptSummary("moments+PCG", [], float("nan"), theta.tolist(), float("nan"),
                     evaluations=est["iterations"], return_code="SUCCESS", converged=True,
                     reml=False, seconds=time.perf_counter() - t0, messages=messages,
                     start="moments")
    npar = stats.p + K + 1
    nan = float("nan")
    groups = {f[0]: f[2] for f in factors}
    return FitResult(
        formula=stats.formula, method="moments", nobs=stats.n, groups=groups,
        fixed_effects=fixed, vcov_matrix=vcov, random_effects=rand, random_correlations=corrs,
        residual_variance=sigma2, sigma=sigma, loglik=nan, deviance=nan, reml_criterion=None,
        aic=nan, bic=nan, npar=npar, converged=True, singular=bool(clipped), optimizer=opt,
        ranef=ranef, theta=theta, rows_dropped=stats.rows_dropped, stats=stats)
