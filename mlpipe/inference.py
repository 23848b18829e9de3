"""Inference from sufficient statistics: denominator df, p-values, confidence intervals.

* Satterthwaite df (lmerTest's definition): varpar v = (θ, σ); A = 2·pinv(∇²d(v)) with d the
  REML (or ML) criterion with σ explicit and β profiled; C(v) = σ² (R_X'R_X)⁻¹;
  df = 2 (L'CL)² / (g'Ag), g_k = L' ∂C/∂v_k L (∂C/∂θ in closed form, Hessian by Richardson
  extrapolation as numDeriv does).
* Kenward–Roger (pbkrtest's definition): covariance parameters γ = (entries of σ²TT', σ²),
  Σ linear in γ; P, Q, expected information and the adjusted covariance Φ_A, all from per-group
  Z'Z / Z'X blocks and the total X'X via Woodbury — no n×n matrix.
* Confidence intervals: Wald (fixed effects, and variance components on the sd/cor/σ scale
  from the curvature of the criterion) and profile likelihood (lme4's `confint(method =
  "profile")`: the ML deviance, variance parameters on the sd/cor/σ scale, fixed effects via
  an offset with θ re-optimized; bounds where the signed root deviance reaches ±z).

The derivations, and their checks against lmerTest/pbkrtest/lme4, are in docs/inference.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import nlopt
import numpy as np
import polars as pl
from scipy import optimize as sopt
from scipy import stats as sstats

from .errors import InputError
from .objective import Objective
from .stats import Statistics

LOG_2PI = float(np.log(2 * np.pi))
DDF_METHODS = {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger"}


# ---------------------------------------------------------------------- numerical derivatives

def richardson_hessian(f, x: np.ndarray, eps: float = 1e-4, d: float = 0.1, r: int = 4,
                       v: float = 2.0) -> np.ndarray:
    """numDeriv::hessian (genD with its default method.args), ported."""
    zero_tol = np.sqrt(np.finfo(float).eps / 7e-7)
    n = len(x)
    h0 = np.abs(d * x) + eps * (np.abs(x) < zero_tol)
    f0 = f(x)
    D = np.zeros((n, n))

    def extrapolate(a: np.ndarray) -> float:
        for m in range(1, r):
            a = (a[1:r - m + 1] * 4**m - a[0:r - m]) / (4**m - 1)
        return float(a[0])

    for i in range(n):
        h = h0.copy()
        hd = np.zeros(r)
        for k in range(r):
            e = np.zeros(n)
            e[i] = h[i]
            hd[k] = (f(x + e) - 2 * f0 + f(x - e)) / h[i] ** 2
            h = h / v
        D[i, i] = extrapolate(hd)
    for i in range(n):
        for j in range(i):
            h = h0.copy()
            dap = np.zeros(r)
            for k in range(r):
                e = np.zeros(n)
                e[i], e[j] = h[i], h[j]
                dap[k] = (f(x + e) - 2 * f0 + f(x - e) - D[i, i] * h[i] ** 2
                          - D[j, j] * h[j] ** 2) / (2 * h[i] * h[j])
                h = h / v
            D[i, j] = D[j, i] = extrapolate(dap)
    return D


# ---------------------------------------------------------------------- per-group Woodbury pieces

def _sum_bt_c(B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Σ_i B_i' C_i for stacks (m, q, p) and (m, q, r), as one BLAS product."""
    return np.tensordot(B, C, axes=([0, 1], [0, 1]))


@dataclass
class _Blocks:
    """Group-first views of the statistics and H_i = T (I + T'A_iT)⁻¹ T' at θ."""

    A: np.ndarray  # (m, q, q) Z_i'Z_i
    B: np.ndarray  # (m, q, p) Z_i'X_i
    H: np.ndarray  # (m, q, q)
    T: np.ndarray
    M: np.ndarray  # X'Ṽ⁻¹X = R_X'R_X


def _blocks(stats: Statistics, obj: Objective, theta: np.ndarray) -> _Blocks:
    A = np.ascontiguousarray(np.moveaxis(stats.ztz, -1, 0))
    B = np.ascontiguousarray(np.moveaxis(stats.ztx, -1, 0))
    T = obj.theta_map.T(theta)
    K = np.eye(stats.q)[None] + T.T @ A @ T
    H = T @ np.linalg.inv(K) @ T.T
    M = stats.xtx - _sum_bt_c(B, H @ B)
    return _Blocks(A, B, H, T, M)


def _criterion_vp_gradient(obj: Objective, vp: np.ndarray) -> np.ndarray:
    """The exact gradient of `_criterion_vp` in (θ, σ), from the objective's parts."""
    theta, sigma = vp[:-1], vp[-1]
    pt = obj.parts(theta)
    s2 = sigma**2
    n, p = obj.stats.n, obj.stats.p
    g_theta = pt.d_logdet_l + pt.d_r2 / s2
    dof = n - p if obj.reml else n
    if obj.reml:
        g_theta = g_theta + pt.d_logdet_rx
    g_sigma = -2.0 * pt.r2 / sigma**3 + 2.0 * dof / sigma
    return np.r_[g_theta, g_sigma]


def criterion_hessian(obj: Objective, vp: np.ndarray) -> np.ndarray:
    """∇² of the criterion in (θ, σ): central differences of its exact gradient (2k gradient
    evaluations where numDeriv's Richardson scheme needs ~(k+1)²·8 deviance evaluations)."""
    k = len(vp)
    H = np.empty((k, k))
    for j in range(k):
        h = 1e-4 * max(abs(vp[j]), 1e-2)
        e = np.zeros(k)
        e[j] = h
        g_plus, g_minus = _criterion_vp_gradient(obj, vp + e), _criterion_vp_gradient(obj, vp - e)
        H[:, j] = (g_plus - g_minus) / (2 * h)
    return (H + H.T) / 2


def _criterion_vp(obj: Objective, vp: np.ndarray) -> float:
    """lmerTest's devfun_vp: the REML (or ML) criterion at (θ, σ), β profiled, σ explicit."""
    theta, sigma = vp[:-1], vp[-1]
    dec = obj.decompose(theta)
    s2 = sigma**2
    n, p = obj.stats.n, obj.stats.p
    dev = dec.logdet_l + dec.r2 / s2 + n * (LOG_2PI + np.log(s2))
    if obj.reml:
        dev += dec.logdet_rx - p * (LOG_2PI + np.log(s2))
    return float(dev)


# ---------------------------------------------------------------------- Satterthwaite

@dataclass
class DdfResult:
    method: str
    df: np.ndarray
    std_error: np.ndarray
    t_value: np.ndarray
    p_value: np.ndarray


def satterthwaite(stats: Statistics, theta: np.ndarray, sigma: float, beta: np.ndarray, *,
                  reml: bool = True) -> DdfResult:
    obj = Objective(stats, reml=reml)
    vp = np.r_[theta, sigma]
    hess = criterion_hessian(obj, vp)
    w, U = np.linalg.eigh(hess)
    pos = w > 1e-8
    avp = 2 * (U[:, pos] / w[pos]) @ U[:, pos].T
    bl = _blocks(stats, obj, theta)
    minv = np.linalg.inv(bl.M)
    cov = sigma**2 * minv
    F = bl.B - bl.A @ (bl.H @ bl.B)  # Z_i'Ṽ_i⁻¹X_i
    tm = obj.theta_map
    jac = []
    for r, c in zip(tm.rows, tm.cols):
        E = np.zeros((stats.q, stats.q))
        E[r, c] = 1.0
        dD = E @ bl.T.T + bl.T @ E.T
        jac.append(sigma**2 * minv @ _sum_bt_c(F, dD @ F) @ minv)
    jac.append(2 * sigma * minv)
    se = np.sqrt(np.diag(cov))
    df = np.empty(stats.p)
    for j in range(stats.p):
        g = np.array([J[j, j] for J in jac])
        df[j] = 2 * cov[j, j] ** 2 / (g @ avp @ g)
    t = beta / se
    return DdfResult("Satterthwaite", df, se, t, 2 * sstats.t.sf(np.abs(t), df))


def richardson_jacobian(f, x: np.ndarray, eps: float = 1e-4, d: float = 1e-4, r: int = 4,
                        v: float = 2.0) -> list[np.ndarray]:
    """numDeriv::jacobian (method "Richardson", its default method.args), ported: for each
    coordinate the derivative of the array-valued f, by extrapolated central differences."""
    zero_tol = np.sqrt(np.finfo(float).eps / 7e-7)
    h0 = np.abs(d * x) + eps * (np.abs(x) < zero_tol)
    out = []
    for i in range(len(x)):
        h = h0[i]
        a = []
        for _ in range(r):
            e = np.zeros(len(x))
            e[i] = h
            a.append((np.asarray(f(x + e)) - np.asarray(f(x - e))) / (2 * h))
            h = h / v
        for m in range(1, r):
            a = [(a[k + 1] * 4**m - a[k]) / (4**m - 1) for k in range(len(a) - 1)]
        out.append(a[0])
    return out


def satterthwaite_general(obj, theta: np.ndarray, sigma: float,
                          beta: np.ndarray) -> DdfResult:
    """Satterthwaite df for any random-effects structure, as lmerTest computes them: the
    Hessian of the criterion in (θ, σ) (β profiled, σ explicit) and the Jacobian of
    Var(β̂) = σ² (R_X'R_X)⁻¹(θ) in (θ, σ), both by numDeriv's Richardson schemes."""
    n, p = obj.stats.n, obj.stats.p

    def crit(vp: np.ndarray) -> float:
        r2, logdet_l, logdet_rx = obj.parts_at(vp[:-1])
        s2 = vp[-1] ** 2
        dev = logdet_l + r2 / s2 + n * (LOG_2PI + np.log(s2))
        if obj.reml:
            dev += logdet_rx - p * (LOG_2PI + np.log(s2))
        return float(dev)

    def vcov(vp: np.ndarray) -> np.ndarray:
        return vp[-1] ** 2 * np.linalg.inv(obj.xtx_adj_at(vp[:-1]))

    vp = np.r_[theta, sigma]
    hess = richardson_hessian(crit, vp)
    w, U = np.linalg.eigh(hess)
    pos = w > 1e-8
    avp = 2 * (U[:, pos] / w[pos]) @ U[:, pos].T
    cov = vcov(vp)
    jac = richardson_jacobian(vcov, vp)
    se = np.sqrt(np.diag(cov))
    df = np.empty(p)
    for j in range(p):
        g = np.array([J[j, j] for J in jac])
        df[j] = 2 * cov[j, j] ** 2 / (g @ avp @ g)
    t = beta / se
    return DdfResult("Satterthwaite", df, se, t, 2 * sstats.t.sf(np.abs(t), df))


# ---------------------------------------------------------------------- Kenward-Roger

def kenward_roger(stats: Statistics, theta: np.ndarray, sigma: float,
                  beta: np.ndarray) -> DdfResult:
    obj = Objective(stats, reml=True)
    bl = _blocks(stats, obj, theta)
    A, B, H = bl.A, bl.B, bl.H
    q, p = stats.q, stats.p
    s2 = sigma**2
    AH = A @ H
    H2 = 2 * H - H @ AH
    H3 = H2 + H - H2 @ A @ H
    eye = np.eye(q)[None]
    Zs = (A - AH @ A) / s2  # Z'Σ⁻¹Z
    Xs = (eye - AH) @ B / s2  # Z'Σ⁻¹X
    Z2 = (A - A @ H2 @ A) / s2**2  # Z'Σ⁻²Z
    X2 = (eye - A @ H2) @ B / s2**2  # Z'Σ⁻²X

    def xsx(Hk: np.ndarray, k: int) -> np.ndarray:
        return (stats.xtx - np.einsum("mai,mab,mbj->ij", B, Hk, B)) / s2**k

    phi = np.linalg.inv(xsx(H, 1))
    Es = []
    tm = obj.theta_map
    for r, c in zip(tm.rows, tm.cols):
        E = np.zeros((q, q))
        E[r, c] = E[c, r] = 1.0
        Es.append(E)
    R = len(Es) + 1
    P = [-np.einsum("mai,ab,mbj->ij", Xs, E, Xs) for E in Es] + [-xsx(H2, 2)]
    Q: dict[tuple[int, int], np.ndarray] = {}
    K = np.zeros((R, R))
    for r in range(R):
        for s in range(r, R):
            if s < R - 1:
                Q[r, s] = np.einsum("mai,ab,mbc,cd,mdj->ij", Xs, Es[r], Zs, Es[s], Xs)
                K[r, s] = np.einsum("ab,mbc,cd,mda->", Es[r], Zs, Es[s], Zs)
            elif r < R - 1:
                Q[r, s] = np.einsum("mai,ab,mbj->ij", Xs, Es[r], X2)
                K[r, s] = np.einsum("ab,mba->", Es[r], Z2)
            else:
                Q[r, s] = xsx(H3, 3)
                K[r, s] = float(np.sum(stats.n_i - np.einsum("mab,mba->m", H2, A))) / s2**2
            K[s, r] = K[r, s]
    ie2 = np.zeros((R, R))
    for r in range(R):
        for s in range(r, R):
            ie2[r, s] = ie2[s, r] = (K[r, s] - 2 * np.sum(phi * Q[r, s])
                                     + np.sum((phi @ P[r]) * (P[s] @ phi)))
    w = np.linalg.eigvalsh(ie2)
    W = 2 * (np.linalg.pinv(ie2) if np.min(np.abs(w)) <= 1e-10 else np.linalg.inv(ie2))
    U = np.zeros((p, p))
    for r in range(R):
        for s in range(r, R):
            term = W[r, s] * (Q[r, s] - P[r] @ phi @ P[s])
            U += term if r == s else term + term.T
    phi_a = phi + 2 * phi @ U @ phi
    df = np.empty(p)
    for j in range(p):
        g = np.array([(phi @ Pr @ phi)[j, j] for Pr in P])
        df[j] = 2 * phi[j, j] ** 2 / (g @ W @ g)
    se = np.sqrt(np.diag(phi_a))
    t = beta / se
    return DdfResult("Kenward-Roger", df, se, t, 2 * sstats.t.sf(np.abs(t), df))


# ---------------------------------------------------------------------- sd/cor parameterization

def parameter_names(stats: Statistics, obj: Objective) -> list[str]:
    """lme4's names: sd_(Intercept)|g, cor_x.(Intercept)|g, sd_x|g, ..., sigma."""
    names = []
    rn = stats.random_names
    for r, c in zip(obj.theta_map.rows, obj.theta_map.cols):
        names.append(f"sd_{rn[r]}|{stats.group}" if r == c
                     else f"cor_{rn[r]}.{rn[c]}|{stats.group}")
    return names + ["sigma"]


def theta_to_sdcor(obj: Objective, theta: np.ndarray, sigma: float) -> np.ndarray:
    T = obj.theta_map.T(theta)
    D = sigma**2 * T @ T.T
    sd = np.sqrt(np.diag(D))
    out = []
    for r, c in zip(obj.theta_map.rows, obj.theta_map.cols):
        if r == c:
            out.append(sd[r])
        else:
            out.append(D[r, c] / (sd[r] * sd[c]) if sd[r] * sd[c] > 0 else 0.0)
    return np.array(out + [sigma])


def sdcor_to_theta(obj: Objective, sv: np.ndarray) -> np.ndarray:
    """lme4's Sv_to_Cv: a semidefinite-safe Cholesky of D/σ² within each block."""
    tm = obj.theta_map
    q = obj.stats.q
    sigma = sv[-1]
    sd = np.zeros(q)
    for k, (r, c) in enumerate(zip(tm.rows, tm.cols)):
        if r == c:
            sd[r] = sv[k]
    D = np.zeros((q, q))
    for k, (r, c) in enumerate(zip(tm.rows, tm.cols)):
        D[r, c] = D[c, r] = sd[r] ** 2 if r == c else sv[k] * sd[r] * sd[c]
    L = np.zeros((q, q))
    for j in range(q):
        v = D[j, j] - L[j, :j] @ L[j, :j]
        L[j, j] = np.sqrt(max(v, 0.0))
        for i in range(j + 1, q):
            L[i, j] = 0.0 if L[j, j] == 0 else (D[i, j] - L[i, :j] @ L[j, :j]) / L[j, j]
    L /= sigma
    return L[tm.rows, tm.cols]


def _criterion_sv(obj: Objective, sv: np.ndarray) -> float:
    return _criterion_vp(obj, np.r_[sdcor_to_theta(obj, sv), sv[-1]])


# ---------------------------------------------------------------------- confidence intervals

def wald_intervals(stats: Statistics, theta: np.ndarray, sigma: float, beta: np.ndarray,
                   se: np.ndarray, *, reml: bool, level: float = 0.95) -> pl.DataFrame:
    """β ± z·SE; variance parameters on the sd/cor/σ scale from the criterion's curvature."""
    z = sstats.norm.ppf(0.5 + level / 2)
    obj = Objective(stats, reml=reml)
    sv = theta_to_sdcor(obj, theta, sigma)
    names = parameter_names(stats, obj)
    hess = richardson_hessian(lambda v: _criterion_sv(obj, v), sv)
    w, U = np.linalg.eigh(hess)
    pos = w > 1e-8
    cov = 2 * (U[:, pos] / w[pos]) @ U[:, pos].T
    sv_se = np.sqrt(np.clip(np.diag(cov), 0, None))
    on_bound = np.array([v <= 0 for v in sv[:-1]] + [False])
    sv_se[on_bound] = np.nan
    est = np.r_[sv, beta]
    err = np.r_[sv_se, se]
    # variance parameters: clipped to their space (sd, σ ≥ 0; -1 ≤ cor ≤ 1)
    lo_b = np.r_[np.where(obj.theta_map.diagonal, 0.0, -1.0), 0.0, np.full(len(beta), -np.inf)]
    hi_b = np.r_[np.where(obj.theta_map.diagonal, np.inf, 1.0), np.inf, np.full(len(beta), np.inf)]
    return pl.DataFrame({"parameter": names + list(stats.fixed_names), "estimate": est,
                         "lower": np.clip(est - z * err, lo_b, hi_b),
                         "upper": np.clip(est + z * err, lo_b, hi_b), "method": "Wald"})


def _bobyqa_min(f, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    if len(x0) == 0:
        return f(x0)
    if len(x0) == 1:
        lo = lower[0] if np.isfinite(lower[0]) else x0[0] - 10 * (abs(x0[0]) + 1)
        hi = upper[0] if np.isfinite(upper[0]) else x0[0] + 10 * (abs(x0[0]) + 1)
        res = sopt.minimize_scalar(lambda t: f(np.array([t])), bounds=(lo, hi),
                                   method="bounded", options={"xatol": 1e-10})
        return min(float(res.fun), f(x0))
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_min_objective(lambda x, g: f(x))
    opt.set_lower_bounds(lower)
    opt.set_upper_bounds(upper)
    opt.set_ftol_rel(1e-13)
    opt.set_xtol_abs(1e-10)
    opt.set_maxeval(5000)
    step = np.maximum(0.05 * np.abs(x0), 1e-3)
    opt.set_initial_step(step)
    x0 = np.clip(x0, lower, upper)
    try:
        opt.optimize(x0)
    except nlopt.RoundoffLimited:
        pass
    return float(opt.last_optimum_value())


def profile_intervals(stats: Statistics, *, level: float = 0.95) -> pl.DataFrame:
    """lme4's profile confidence intervals: the ML deviance profiled for each parameter."""
    from .optimize import optimize

    z = sstats.norm.ppf(0.5 + level / 2)
    obj = Objective(stats, reml=False)
    opt = optimize(obj)
    theta_ml = np.asarray(opt.final_theta)
    dec = obj.decompose(theta_ml)
    sigma_ml = obj.sigma(dec)
    base = obj.deviance_of(dec)
    sv0 = theta_to_sdcor(obj, theta_ml, sigma_ml)
    names = parameter_names(stats, obj)
    tm = obj.theta_map
    lower_b = np.array([0.0 if d else -1.0 for d in tm.diagonal] + [1e-12 * sigma_ml])
    upper_b = np.array([np.inf if d else 1.0 for d in tm.diagonal] + [np.inf])

    def zeta_var(w: int, x: float) -> float:
        free = [k for k in range(len(sv0)) if k != w]

        def f(u):
            sv = sv0.copy()
            sv[w] = x
            sv[free] = u
            v = _criterion_sv(obj, sv)
            return v if np.isfinite(v) else 1e300

        best = _bobyqa_min(f, sv0[free].copy(), lower_b[free], upper_b[free])
        return float(np.sign(x - sv0[w]) * np.sqrt(max(best - base, 0.0)))

    lows, highs = [], []
    for w in range(len(sv0)):
        scale = 0.1 * (abs(sv0[w]) + 0.1) if w < len(sv0) - 1 else 0.1 * sv0[w]
        lo, hi = _bracket_roots(lambda x: zeta_var(w, x), sv0[w], z, scale,
                                lower_b[w] if w < len(sv0) - 1 else 0.0, upper_b[w])
        lows.append(lo)
        highs.append(hi)

    beta_ml = dec.beta
    se_ml = sigma_ml * np.sqrt(np.diag(np.linalg.inv(dec.xtx_adj)))
    for j in range(stats.p):
        def zeta_fixed(b: float, j: int = j) -> float:
            sub = _offset_statistics(stats, j, b)
            o = Objective(sub, reml=False)
            r = optimize(o, theta0=theta_ml)
            return float(np.sign(b - beta_ml[j]) * np.sqrt(max(r.final_objective - base, 0.0)))

        lo, hi = _bracket_roots(zeta_fixed, beta_ml[j], z, se_ml[j], -np.inf, np.inf)
        lows.append(lo)
        highs.append(hi)
    est = np.r_[sv0, beta_ml]
    return pl.DataFrame({"parameter": names + list(stats.fixed_names), "estimate": est,
                         "lower": lows, "upper": highs, "method": "profile"})


def _bracket_roots(zeta, x0: float, z: float, step: float, lower: float, upper: float):
    """The points where zeta(x) = -z (below x0) and +z (above x0); a bound when not reached."""
    out = []
    for sign in (-1.0, 1.0):
        bound = lower if sign < 0 else upper
        target = sign * z
        a = x0
        h = step if step > 0 else 1e-3
        found = bound
        for _ in range(60):
            b = x0 + sign * h
            if (sign < 0 and b <= bound) or (sign > 0 and b >= bound):
                b = bound
            fb = zeta(b) - target
            if fb * sign >= 0:
                found = sopt.brentq(lambda x: zeta(x) - target, a, b, xtol=1e-9, rtol=1e-10)
                break
            if b == bound:
                break
            a = b
            h *= 1.6
        out.append(found)
    return out[0], out[1]


def _offset_statistics(stats: Statistics, j: int, b: float) -> Statistics:
    """The statistics of the model with β_j fixed at b: y → y − b·x_j, column j dropped."""
    keep = [k for k in range(stats.p) if k != j]
    return replace(
        stats,
        fixed_names=[stats.fixed_names[k] for k in keep],
        ztx=stats.ztx[:, keep, :],
        zty=stats.zty - b * stats.ztx[:, j, :],
        xtx=stats.xtx[np.ix_(keep, keep)],
        xty=stats.xty[keep] - b * stats.xtx[keep, j],
        yty=stats.yty - 2 * b * stats.xty[j] + b * b * stats.xtx[j, j],
        yty_i=stats.yty_i,  # not used by the objective
    )


def check_ddf(ddf: str | None) -> str | None:
    if ddf is None:
        return None
    key = str(ddf).lower().replace("_", "-").replace(" ", "-")
    if key in ("none", "no", "false"):
        return None
    if key in ("kr", "kenward"):
        key = "kenward-roger"
    if key not in DDF_METHODS:
        raise InputError(f"ddf must be satterthwaite, kenward-roger or none, not {ddf!r}")
    return key
