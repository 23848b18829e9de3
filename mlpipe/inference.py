"""Inference from sufficient statistics: denominator df, p-values, confidence intervals.

* Satterthwaite df (lmerTest's definition): varpar v = (θ, σ); A = 2·pinv(∇²d(v)) with d the
  REML (or ML) criterion with σ explicit and β profiled; C(v) = σ² (R_X'R_X)⁻¹;
  df = 2 (L'CL)² / (g'Ag), g_k = L' ∂C/∂v_k L (∂C/∂θ in closed form, Hessian by Richardson
  extrapolation as numDeriv does).
* Kenward–Roger (pbkrtest's definition): covariance parameters γ = (entries of σ²TT', σ²),
  Σ linear in γ; P, Q, expected information and the adjusted covariance Φ_A, all from per-group
  Z'Z / Z'X blocks and the total X'X via Woodbury — no n×n matrix.  Several grouping factors
  (`kenward_roger_general`): the same with Q-dimensional algebra (Q = all random effects) on
  the blocked objective's Z_j'Z_k and Z_k'X blocks, in column chunks, up to
  KR_MAX_RANDOM_EFFECTS.
* Confidence intervals: Wald (fixed effects, and variance components on the sd/cor/σ scale
  from the curvature of the criterion) and profile likelihood (lme4's `confint(method =
  "profile")`: the ML deviance, variance parameters on the sd/cor/σ scale, fixed effects via
  an offset with θ re-optimized; bounds where the signed root deviance reaches ±z) — for one
  grouping factor or several, the parameters in lme4's order and with its names.

The derivations, and their checks against lmerTest/pbkrtest/lme4, are in docs/inference.md.
"""

from __future__ import annotations

import weakref
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import nlopt
import numpy as np
import polars as pl
import qdldl

from . import _dist
from ._lazy import lazy_import
from ._levels import chol_scaled, matmul, solve_lower
from .errors import FormulaError, InputError
from .formula import parse_formula
from .objective import Objective
from .stats import Statistics

if TYPE_CHECKING:
    from .blocked import BlockedObjective

sp = lazy_import("scipy.sparse")  # several factors only
sopt = lazy_import("scipy.optimize")  # profile intervals and the ICC only

LOG_2PI = float(np.log(2 * np.pi))
#: Kenward-Roger for several grouping factors works with Q x Q algebra (Q = total random
#: effects), in column chunks; above this Q it is refused
KR_MAX_RANDOM_EFFECTS = 20000
DDF_METHODS = {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger"}


# ---------------------------------------------------------------------- numerical derivatives

def _richardson(a: np.ndarray):
    """Richardson extrapolation of estimates a[0], a[1], ... at steps h, h/2, ... (numDeriv's
    scheme, error O(h²) removed at each level) → the extrapolated a[0] (array-valued ok)."""
    for m in range(1, len(a)):
        a = (a[1:] * 4**m - a[:-1]) / (4**m - 1)
    return a[0]


def richardson_hessian(f, x: np.ndarray, eps: float = 1e-4, d: float = 0.1, r: int = 4,
                       v: float = 2.0) -> np.ndarray:
    """numDeriv::hessian (genD with its default method.args), ported."""
    zero_tol = np.sqrt(np.finfo(float).eps / 7e-7)
    n = len(x)
    h0 = np.abs(d * x) + eps * (np.abs(x) < zero_tol)
    f0 = f(x)
    D = np.zeros((n, n))

    def extrapolate(a: np.ndarray) -> float:
        return float(_richardson(a))

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


def _group_pieces(ztz: np.ndarray, ztx: np.ndarray, T: np.ndarray):
    """Group-first A_i = Z_i'Z_i (m, q, q), B_i = Z_i'X_i (m, q, p) and H_i (m, q, q) from
    level-last statistics (or a slice of their levels)."""
    A = np.ascontiguousarray(np.moveaxis(ztz, -1, 0))
    B = np.ascontiguousarray(np.moveaxis(ztx, -1, 0))
    # H_i = T K_i⁻¹ T' = P_i'P_i with K_i = T'A_iT + I = L_iL_i' and P_i = L_i⁻¹T'
    P = solve_lower(chol_scaled(ztz, T), T.T[:, :, None])
    H = np.ascontiguousarray(np.moveaxis(matmul(P.transpose(1, 0, 2), P), -1, 0))
    return A, B, H


def _blocks(stats: Statistics, obj: Objective, theta: np.ndarray) -> _Blocks:
    T = obj.theta_map.T(theta)
    A, B, H = _group_pieces(stats.ztz, stats.ztx, T)
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


#: the relative step of `criterion_hessian`'s forward differences: against central
#: differences (2 gradients per θ entry) the df moved by 1e-8 to 5e-6 relative on seven
#: reference fits (one factor, nested, crossed; 1e-5: up to 3e-5, 1e-7: round-off, up to
#: 4e-5), where lmerTest's own df agree with mlpipe's to ~1e-3
HESSIAN_STEP = 1e-6


def criterion_hessian(obj: Objective, vp: np.ndarray) -> np.ndarray:
    """∇² of the criterion in (θ, σ): the θ columns by forward differences of its exact
    gradient from θ̂ (one evaluation each, the gradient at θ̂ being the fit's latest; where
    numDeriv's Richardson scheme needs ~(k+1)²·8 deviance evaluations), the σ column in
    closed form from the parts at θ (σ enters the criterion only through r²/σ² and the
    log σ² terms)."""
    k = len(vp)
    H = np.empty((k, k))
    theta, sigma = vp[:-1], vp[-1]
    pt = obj.parts(theta)  # first: at θ̂ the fit's latest parts (`Objective._parts`)
    g0 = _criterion_vp_gradient(obj, vp)
    for j in range(k - 1):
        h = HESSIAN_STEP * max(abs(vp[j]), 1e-2)
        e = np.zeros(k)
        e[j] = h
        H[:, j] = (_criterion_vp_gradient(obj, vp + e) - g0) / h
    dof = obj.stats.n - obj.stats.p if obj.reml else obj.stats.n
    H[:-1, -1] = -2.0 * pt.d_r2 / sigma**3  # ∂/∂σ of ∂/∂θ (r²/σ²)
    H[-1, -1] = 6.0 * pt.r2 / sigma**4 - 2.0 * dof / sigma**2
    return (H + H.T) / 2


def _criterion_vp(obj, vp: np.ndarray) -> float:
    """lmerTest's devfun_vp: the REML (or ML) criterion at (θ, σ), β profiled, σ explicit
    (an Objective or a BlockedObjective)."""
    theta, sigma = vp[:-1], vp[-1]
    try:
        r2, logdet_l, logdet_rx = obj.parts_at(theta)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return np.inf
    s2 = sigma**2
    n, p = obj.stats.n, obj.stats.p
    dev = logdet_l + r2 / s2 + n * (LOG_2PI + np.log(s2))
    if obj.reml:
        dev += logdet_rx - p * (LOG_2PI + np.log(s2))
    return float(dev)


# ---------------------------------------------------------------------- Satterthwaite

@dataclass
class DdfResult:
    method: str
    df: np.ndarray
    std_error: np.ndarray
    t_value: np.ndarray
    p_value: np.ndarray


@dataclass
class SatterthwaiteParts:
    """lmerTest's pieces: vcov_beta = Var(β̂), Jac_list (∂Var(β̂)/∂v_k for v = (θ, σ)) and
    vcov_varpar (A = 2·pinv(∇²d(v))); the df of a contrast l is 2(l'Cl)²/(g'Ag), g_k = l'J_kl."""

    cov: np.ndarray
    jac: list[np.ndarray]
    avp: np.ndarray

    def df(self, L: np.ndarray) -> np.ndarray:
        """The Satterthwaite df of each row of L (contest1D)."""
        L = np.atleast_2d(L)
        g = np.stack([np.einsum("ri,ij,rj->r", L, J, L) for J in self.jac], axis=1)
        var = np.einsum("ri,ij,rj->r", L, self.cov, L)
        return 2 * var**2 / np.einsum("rk,kl,rl->r", g, self.avp, g)

    def result(self, beta: np.ndarray) -> DdfResult:
        se = np.sqrt(np.diag(self.cov))
        df = self.df(np.eye(len(beta)))
        t = beta / se
        return DdfResult("Satterthwaite", df, se, t, 2 * _dist.t_sf(np.abs(t), df))


def satterthwaite(stats: Statistics, theta: np.ndarray, sigma: float, beta: np.ndarray, *,
                  reml: bool = True, obj=None) -> DdfResult:
    """`obj`: the fit's `Objective` (its workspace is warm: a new one built here cost 0.2 s
    at 1M groups, and its first evaluations the page faults of fresh scratch arrays); one
    of other statistics or of the other criterion is not used."""
    if obj is not None and (obj.stats is not stats or obj.reml != reml):
        obj = None
    return satterthwaite_parts(stats, theta, sigma, reml=reml, obj=obj).result(beta)


def satterthwaite_parts(stats: Statistics, theta: np.ndarray, sigma: float, *,
                        reml: bool = True, obj=None, sums=None) -> SatterthwaiteParts:
    """One grouping factor: Var(β̂), its Jacobian in (θ, σ) in closed form, and A.
    `obj`: the fit's objective (of `stats`, with the same `reml`; built here when None);
    `sums`: `satterthwaite_sums` over all groups, when the groups are not in `stats` (the
    Dask workers', mlpipe/engines/dask_solve.py)."""
    obj = Objective(stats, reml=reml) if obj is None else obj
    vp = np.r_[theta, sigma]
    hess = criterion_hessian(obj, vp)
    w, U = np.linalg.eigh(hess)
    pos = w > 1e-8
    avp = 2 * (U[:, pos] / w[pos]) @ U[:, pos].T
    M, S = satterthwaite_sums(stats, obj, theta) if sums is None else sums
    minv = np.linalg.inv(M)
    cov = sigma**2 * minv
    jac = [sigma**2 * minv @ Sk @ minv for Sk in S]
    jac.append(2 * sigma * minv)
    return SatterthwaiteParts(cov, jac, avp)


#: levels per chunk of `satterthwaite_sums`: its temporaries (a dozen (levels, q, p) arrays)
#: stay a few tens of MB whatever the number of groups
SUMS_CHUNK = 1 << 16


def satterthwaite_sums(stats: Statistics, obj: Objective, theta: np.ndarray):
    """X'Ṽ⁻¹X = X'X − Σ_i B_i'H_iB_i and, per entry k of θ, Σ_i F_i' ∂D/∂θ_k F_i with
    F_i = Z_i'Ṽ_i⁻¹X_i: sums over groups (a subset of them gives its share), accumulated
    over chunks of SUMS_CHUNK levels in a fixed order."""
    T = obj.theta_map.T(theta)
    tm = obj.theta_map
    dDs = []
    for r, c in zip(tm.rows, tm.cols):
        E = np.zeros((stats.q, stats.q))
        E[r, c] = 1.0
        dDs.append(E @ T.T + T @ E.T)
    bhb = np.zeros((stats.p, stats.p))
    S = [np.zeros((stats.p, stats.p)) for _ in dDs]
    for lo in range(0, stats.m, SUMS_CHUNK):
        sl = slice(lo, lo + SUMS_CHUNK)
        A, B, H = _group_pieces(stats.ztz[..., sl], stats.ztx[..., sl], T)
        HB = H @ B
        bhb += _sum_bt_c(B, HB)
        F = B - A @ HB  # Z_i'Ṽ_i⁻¹X_i
        for Sk, dD in zip(S, dDs):
            Sk += _sum_bt_c(F, dD @ F)
    return stats.xtx - bhb, S


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
        out.append(_richardson(np.asarray(a)))
    return out


def satterthwaite_general(obj, theta: np.ndarray, sigma: float,
                          beta: np.ndarray) -> DdfResult:
    """Satterthwaite df for any random-effects structure, as lmerTest computes them: the
    Hessian of the criterion in (θ, σ) (β profiled, σ explicit) and the Jacobian of
    Var(β̂) = σ² (R_X'R_X)⁻¹(θ) in (θ, σ), both by numDeriv's Richardson schemes."""
    return satterthwaite_general_parts(obj, theta, sigma).result(beta)


def satterthwaite_general_parts(obj, theta: np.ndarray, sigma: float) -> SatterthwaiteParts:
    """`satterthwaite_general`'s pieces (Var(β̂), its Jacobian, A).  With the objective's
    exact gradients (`BlockedObjective.parts`, `vcov_jacobian`) as the one-factor path
    computes them: the Hessian by forward differences of the exact gradient and the
    Jacobian in closed form (k+1 gradient evaluations where Richardson's schemes need
    ~8(k+1)² + 8(k+1) evaluations); otherwise numDeriv's schemes on the criterion."""

    def crit(vp: np.ndarray) -> float:
        return _criterion_vp(obj, vp)

    def vcov(vp: np.ndarray) -> np.ndarray:
        return vp[-1] ** 2 * np.linalg.inv(obj.xtx_adj_at(vp[:-1]))

    vp = np.r_[theta, sigma]
    if hasattr(obj, "vcov_jacobian"):
        try:
            # Var(β̂) and its Jacobian first: at θ̂ the objective still holds the optimizer's
            # last factorization and gradient, which the differences' steps replace
            cov, jac = vcov(vp), obj.vcov_jacobian(theta, sigma)
            hess = criterion_hessian(obj, vp)
            w, U = np.linalg.eigh(hess)
            pos = w > 1e-8
            return SatterthwaiteParts(cov, jac, 2 * (U[:, pos] / w[pos]) @ U[:, pos].T)
        except np.linalg.LinAlgError:  # a step of the differences left the domain
            pass
    hess = richardson_hessian(crit, vp)
    w, U = np.linalg.eigh(hess)
    pos = w > 1e-8
    avp = 2 * (U[:, pos] / w[pos]) @ U[:, pos].T
    cov = vcov(vp)
    jac = richardson_jacobian(vcov, vp)
    return SatterthwaiteParts(cov, jac, avp)


# ---------------------------------------------------------------------- Kenward-Roger

def kenward_roger(stats: Statistics, theta: np.ndarray, sigma: float,
                  beta: np.ndarray) -> DdfResult:
    return kenward_roger_adjusted(stats, theta, sigma).result(beta)


def kenward_roger_adjusted(stats: Statistics, theta: np.ndarray,
                           sigma: float) -> KenwardRogerParts:
    """One grouping factor: pbkrtest's vcovAdj (Φ, Φ_A, P_r, W) by per-group algebra."""
    obj = Objective(stats, reml=True)
    bl = _blocks(stats, obj, theta)
    A, B, H = bl.A, bl.B, bl.H
    q = stats.q
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
    return _kenward_roger_adjust(phi, P, Q, K)


@dataclass
class KenwardRogerParts:
    """pbkrtest's vcovAdj: Φ = Var(β̂), the adjusted Φ_A, its attributes P (the P_r) and W."""

    phi: np.ndarray
    phi_a: np.ndarray
    P: list[np.ndarray]
    W: np.ndarray

    def result(self, beta: np.ndarray) -> DdfResult:
        """Lb_ddf for one row of L per fixed effect: df = 2(L'ΦL)²/(g'Wg)."""
        phi, p = self.phi, len(self.phi)
        df = np.empty(p)
        for j in range(p):
            g = np.array([(phi @ Pr @ phi)[j, j] for Pr in self.P])
            df[j] = 2 * phi[j, j] ** 2 / (g @ self.W @ g)
        se = np.sqrt(np.diag(self.phi_a))
        t = beta / se
        return DdfResult("Kenward-Roger", df, se, t, 2 * _dist.t_sf(np.abs(t), df))


def _kenward_roger_adjust(phi: np.ndarray, P: list[np.ndarray],
                          Q: dict[tuple[int, int], np.ndarray],
                          K: np.ndarray) -> KenwardRogerParts:
    """pbkrtest's vcovAdj from Φ, P_r, Q_rs (r ≤ s) and K_rs: the expected information,
    W = 2·IE2⁻¹ and Φ_A = Φ + 2ΦUΦ."""
    R, p = len(P), len(phi)
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
    return KenwardRogerParts(phi, phi + 2 * phi @ U @ phi, P, W)


# ---------------------------------------------------------------------- several factors

def _blocked_system(obj: BlockedObjective, theta: np.ndarray):
    """Z'Z (sparse Q×Q), Z'X (Q×p) and Λ (sparse, I_{m_k} ⊗ T_k per factor) of a
    BlockedObjective, from its per-pair blocks (`pairs`) and per-level Z_k'[X y] (`G`); the
    random effects in its order (factor k, level i, column a) → uoff[k] + i·q_k + a."""
    p = obj.stats.p
    A = obj.ztz
    B = np.concatenate([G[:, :, :p].reshape(-1, p) for G in obj.G], axis=0)
    lam = sp.block_diag([sp.kron(sp.eye(f.m), T) for f, T in zip(obj.factors,
                                                                  obj.T_blocks(theta))],
                        format="csr")
    return A, B, lam


def kenward_roger_general(obj: BlockedObjective, theta: np.ndarray, sigma: float,
                          beta: np.ndarray, *, chunk_bytes: float = 4e7) -> DdfResult:
    """`kenward_roger_general_adjusted`'s t tests (pbkrtest's Lb_ddf per fixed effect)."""
    return kenward_roger_general_adjusted(obj, theta, sigma, chunk_bytes=chunk_bytes).result(
        beta)


def kenward_roger_general_adjusted(obj: BlockedObjective, theta: np.ndarray, sigma: float, *,
                                   chunk_bytes: float = 4e7) -> KenwardRogerParts:
    """pbkrtest's Kenward-Roger for any random-effects structure, without an n×n matrix.

    With Z (n×Q), Γ = ΛΛ', Σ = σ²(I + ZΓZ') and H = Λ(Λ'Z'ZΛ + I)⁻¹Λ' (Woodbury: Σ⁻¹ =
    σ⁻²(I − ZHZ')), every piece pbkrtest forms from n×n matrices is Q-dimensional; writing
    A = Z'Z, B = Z'X, N = I − HA, Y = X − ZHB (so Z'Y = B − AHB and Σ⁻¹X = σ⁻²Y):

        S  = Z'Σ⁻¹Z = σ⁻²AN          S2 = Z'Σ⁻²Z = σ⁻²N'S          F = Z'Σ⁻¹X = σ⁻²(B − AHB)
        F2 = Z'Σ⁻²X = σ⁻²N'F         X'Σ⁻¹X = σ⁻²(X'X − B'HB)       X'Σ⁻²X = σ⁻⁴ Y'Y
        X'Σ⁻³X = σ⁻⁶(Y'Y − (Z'Y)'H(Z'Y))                           tr Σ⁻² = σ⁻⁴(n − Q + ‖K⁻¹‖²_F)

    (K = Λ'AΛ + I).  A variance/covariance parameter r of factor k has G_r = Z Ẽ_r Z' with
    Ẽ_r = I_{m_k} ⊗ E_r, so P_r = −F'Ẽ_rF, Q_rs = (Ẽ_rF)'S(Ẽ_sF), K_rs = tr(Ẽ_rSẼ_sS) (a sum
    over the level pairs of factors k and l of tr(E_r S_ij E_s S_ij')), Q_r,σ² = (Ẽ_rF)'F2,
    K_r,σ² = Σ_i tr(E_r S2_ii).  S is never stored whole: it is built in chunks of columns
    (`chunk_bytes` per Q×w array) from sparse LDL' solves with K, which accumulate S·(Ẽ_sF),
    the level-pair sums Ω_kl and the diagonal blocks of S2.  Cost O(Q·solve + Q²q²); refused
    above KR_MAX_RANDOM_EFFECTS random effects."""
    stats = obj.stats
    Q, p, n = obj.Q, stats.p, stats.n
    if Q > KR_MAX_RANDOM_EFFECTS:
        raise InputError(f"Kenward-Roger is limited to {KR_MAX_RANDOM_EFFECTS} random effects "
                         f"for several grouping factors; this model has {Q}: use --ddf "
                         f"satterthwaite")
    s2 = sigma**2
    A, B, lam = _blocked_system(obj, theta)
    lam_t = lam.T.tocsr()
    K = sp.triu(lam_t @ A @ lam + sp.eye(Q)).tocsc()
    ldl = qdldl.Solver(K, upper=True)  # sparse LDL' with AMD ordering, as blocked.py

    def solve(M: np.ndarray) -> np.ndarray:  # K⁻¹·M, a column at a time (faster than SuperLU)
        M = np.asarray(M)
        out = np.empty_like(M)
        for j in range(M.shape[1]):
            out[:, j] = ldl.solve(np.ascontiguousarray(M[:, j]))
        return out

    def h(M: np.ndarray) -> np.ndarray:  # H·M
        return lam @ solve(lam_t @ M)

    # the variance parameters γ: one per θ entry (lme4's order), then σ²
    par = []
    tm = obj.theta_map
    for r, c in zip(tm.rows, tm.cols):
        k = int(np.searchsorted(obj.toff, r, side="right") - 1)
        q = obj.factors[k].q
        E = np.zeros((q, q))
        E[r - obj.toff[k], c - obj.toff[k]] = E[c - obj.toff[k], r - obj.toff[k]] = 1.0
        par.append((k, E))
    nr = len(par)

    def et(k: int, E: np.ndarray, M: np.ndarray) -> np.ndarray:  # Ẽ·M
        f, sl = obj.factors[k], slice(obj.uoff[k], obj.uoff[k + 1])
        out = np.zeros_like(M)
        out[sl] = np.einsum("ab,ibj->iaj", E, M[sl].reshape(f.m, f.q, -1)).reshape(
            -1, M.shape[1])
        return out

    xtx = stats.xtx
    HB = h(B)
    ZY = B - A @ HB
    F = ZY / s2
    YY = xtx - 2 * B.T @ HB + HB.T @ (A @ HB)
    phi = np.linalg.inv((xtx - B.T @ HB) / s2)
    xs2 = YY / s2**2
    xs3 = (YY - ZY.T @ h(ZY)) / s2**3
    F2 = (F - A @ h(F)) / s2
    EF = np.concatenate([et(k, E, F) for k, E in par], axis=1) if nr else np.zeros((Q, 0))

    SEF = np.zeros_like(EF)
    omega: dict[tuple[int, int], np.ndarray] = {}
    s2diag = [np.zeros((f.q, f.q)) for f in obj.factors]
    kinv_f2 = 0.0
    for fc, f in enumerate(obj.factors):  # the chunk's columns: levels of factor fc
        step = max(1, int(chunk_bytes / (8 * Q)) // f.q)
        for start in range(0, f.m, step):
            lv = min(f.m, start + step) - start
            lo = int(obj.uoff[fc]) + start * f.q
            w = lv * f.q
            Ac = A[:, lo:lo + w].toarray()
            sol = solve(lam_t @ Ac)  # K⁻¹Λ'A[:, c]
            # K⁻¹[:, c] = I[:, c] − K⁻¹Λ'AΛ[:, c], and Λ[:, c] = Λ[c, c] (level-aligned chunk)
            kinv = -np.asarray((lam[lo:lo + w, lo:lo + w].T @ sol.T).T)
            kinv[lo + np.arange(w), np.arange(w)] += 1.0
            kinv_f2 += float(np.sum(kinv**2))
            HAc = lam @ sol
            Sc = (Ac - A @ HAc) / s2
            Nc = -HAc
            Nc[lo + np.arange(w), np.arange(w)] += 1.0
            s2diag[fc] += np.einsum("wia,wib->ab", Nc.reshape(Q, lv, f.q),
                                   Sc.reshape(Q, lv, f.q)) / s2
            for k, fk in enumerate(obj.factors):
                S4 = Sc[obj.uoff[k]:obj.uoff[k + 1]].reshape(fk.m, fk.q, lv, f.q)
                o = np.einsum("ixjy,iajb->xyab", S4, S4)
                omega[k, fc] = omega[k, fc] + o if (k, fc) in omega else o
            SEF += Sc @ EF[lo:lo + w]

    R = nr + 1
    P = [-F.T @ EF[:, r * p:(r + 1) * p] for r in range(nr)] + [-xs2]
    Qd: dict[tuple[int, int], np.ndarray] = {}
    Kmat = np.zeros((R, R))
    for r in range(R):
        for s in range(r, R):
            if s < nr:
                (kr, Er), (ks, Es) = par[r], par[s]
                Qd[r, s] = EF[:, r * p:(r + 1) * p].T @ SEF[:, s * p:(s + 1) * p]
                Kmat[r, s] = np.einsum("ab,cd,bcad->", Er, Es, omega[kr, ks])
            elif r < nr:
                kr, Er = par[r]
                Qd[r, s] = EF[:, r * p:(r + 1) * p].T @ F2
                Kmat[r, s] = np.sum(Er * s2diag[kr].T)
            else:
                Qd[r, s] = xs3
                Kmat[r, s] = (n - Q + kinv_f2) / s2**2
            Kmat[s, r] = Kmat[r, s]
    return _kenward_roger_adjust(phi, P, Qd, Kmat)


# ---------------------------------------------------------------------- sd/cor parameterization
#
# The variance parameters of the intervals are lme4's: per random-effect term the sd of each
# column and the correlations of the pairs, in θ's order within the term (sd_1, cor_21, ...,
# sd_2, ...), the terms in lme4's order, then σ.  lme4 orders the terms (mkReTrms) as they
# appear in the formula (`(x || g)` being two terms) unless some term has more levels than
# the one before it; then by levels, most first, ties in *reverse* formula order
# (rev(order(nl))), e.g. for (day || Dog) + (1 | Dog:Side): Dog:Side, Dog.day, Dog.(Intercept).
# The blocked objective keeps a factor's terms together in its θ, so the orders can differ
# (terms of two factors interleaved in the formula); `_lme4_order` maps θ to lme4's order by
# matching each term by its factor and columns, whatever order the objective uses.

def _term_slices(obj) -> list[tuple[str, list[str], list[int]]]:
    """Per correlated block of T, in θ's order: (group name, column names, θ indices)."""
    tm = obj.theta_map
    out = []
    pos = 0
    if obj.stats.general:  # a BlockedObjective
        blocks = [(f.name, f.names, s, n) for f in obj.factors for s, n in f.blocks]
    else:
        rn = obj.stats.random_names
        blocks = [(obj.stats.group, rn, s, n) for s, n in tm.blocks]
    for group, names, start, size in blocks:
        k = size * (size + 1) // 2
        out.append((group, list(names[start:start + size]), list(range(pos, pos + k))))
        pos += k
    return out


_ORDER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lme4_order(obj) -> np.ndarray:
    """The permutation `perm` with θ[perm] in lme4's order of the variance parameters
    (cached per objective: the profiles convert sd/cor to θ thousands of times)."""
    if obj not in _ORDER_CACHE:
        _ORDER_CACHE[obj] = _lme4_order_of(obj)
    return _ORDER_CACHE[obj]


def _lme4_order_of(obj) -> np.ndarray:
    terms = _term_slices(obj)
    ident = np.arange(len(obj.theta_map))
    if not obj.stats.general:  # not a BlockedObjective
        return ident  # one factor: lme4 keeps the terms in formula order (equal levels)
    # the formula's random terms in order: the t-th term on factor g is block t of g in the
    # statistics (the design's order); a block is known by its factor and column names,
    # whatever order the objective keeps its blocks in
    try:
        formula_terms = [r.group for r in parse_formula(obj.stats.formula).random]
    except FormulaError:
        return ident
    factors = {f.name: f for f in obj.stats.factors}
    keys, seen = [], {}
    for g in formula_terms:
        t = seen.get(g, 0)
        seen[g] = t + 1
        if g not in factors or t >= len(factors[g].blocks):
            return ident
        start, size = factors[g].blocks[t]
        keys.append((g, tuple(factors[g].names[start:start + size])))
    theta_of = {(g, tuple(cols)): idx for g, cols, idx in terms}
    if sorted(keys) != sorted(theta_of):
        return ident
    nl = [factors[g].m for g, _ in keys]
    if any(y > x for x, y in zip(nl, nl[1:])):  # lme4: rev(order(nl)), order() is stable
        asc = sorted(range(len(keys)), key=lambda i: nl[i])
        keys = [keys[i] for i in reversed(asc)]
    return np.array([i for key in keys for i in theta_of[key]], dtype=int)


def parameter_names(stats: Statistics, obj) -> list[str]:
    """lme4's names: sd_(Intercept)|g, cor_x.(Intercept)|g, sd_x|g, ..., sigma — for several
    factors with their lme4 names (sd_(Intercept)|cask:batch), in lme4's order."""
    names = []
    for group, cols, _ in _term_slices(obj):
        size = len(cols)
        for c in range(size):
            for r in range(c, size):
                names.append(f"sd_{cols[r]}|{group}" if r == c
                             else f"cor_{cols[r]}.{cols[c]}|{group}")
    perm = _lme4_order(obj)
    return [names[i] for i in perm] + ["sigma"]


def _bounds_sv(obj) -> tuple[np.ndarray, np.ndarray]:
    """The parameter space of (sd, cor, ..., σ) in lme4's order: sd, σ ≥ 0, −1 ≤ cor ≤ 1."""
    diag = obj.theta_map.diagonal[_lme4_order(obj)]
    return (np.r_[np.where(diag, 0.0, -1.0), 0.0], np.r_[np.where(diag, np.inf, 1.0), np.inf])


def theta_to_sdcor(obj, theta: np.ndarray, sigma: float) -> np.ndarray:
    """(sd, cor, ..., σ) in lme4's order from θ and σ (an Objective or a BlockedObjective)."""
    T = obj.theta_map.T(theta)
    D = sigma**2 * T @ T.T
    sd = np.sqrt(np.diag(D))
    out = []
    for r, c in zip(obj.theta_map.rows, obj.theta_map.cols):
        if r == c:
            out.append(sd[r])
        else:
            out.append(D[r, c] / (sd[r] * sd[c]) if sd[r] * sd[c] > 0 else 0.0)
    return np.r_[np.array(out)[_lme4_order(obj)], sigma]


def sdcor_to_theta(obj, sv: np.ndarray) -> np.ndarray:
    """lme4's Sv_to_Cv: a semidefinite-safe Cholesky of D/σ² within each block; `sv` in lme4's
    order (as `theta_to_sdcor` gives it), θ in the objective's order."""
    tm = obj.theta_map
    q = tm.q
    sigma = sv[-1]
    vals = np.empty(len(tm))
    vals[_lme4_order(obj)] = sv[:-1]
    sd = np.zeros(q)
    for k, (r, c) in enumerate(zip(tm.rows, tm.cols)):
        if r == c:
            sd[r] = vals[k]
    D = np.zeros((q, q))
    for k, (r, c) in enumerate(zip(tm.rows, tm.cols)):
        D[r, c] = D[c, r] = sd[r] ** 2 if r == c else vals[k] * sd[r] * sd[c]
    L = np.zeros((q, q))
    for j in range(q):
        v = D[j, j] - L[j, :j] @ L[j, :j]
        L[j, j] = np.sqrt(max(v, 0.0))
        for i in range(j + 1, q):
            L[i, j] = 0.0 if L[j, j] == 0 else (D[i, j] - L[i, :j] @ L[j, :j]) / L[j, j]
    L /= sigma
    return L[tm.rows, tm.cols]


def _criterion_sv(obj, sv: np.ndarray) -> float:
    return _criterion_vp(obj, np.r_[sdcor_to_theta(obj, sv), sv[-1]])


# ---------------------------------------------------------------------- confidence intervals

def _objective(stats: Statistics, reml: bool):
    """The objective of the statistics' structure: one factor or several (blocked)."""
    if stats.general:
        from .blocked import BlockedObjective

        return BlockedObjective(stats, reml=reml)
    return Objective(stats, reml=reml)


def _optimize(obj, theta0: np.ndarray | None = None):
    from .optimize import optimize

    return optimize(obj, theta0=theta0, method=obj.default_method)


def wald_intervals(stats: Statistics, theta: np.ndarray, sigma: float, beta: np.ndarray,
                   se: np.ndarray, *, reml: bool, level: float = 0.95,
                   obj=None) -> pl.DataFrame:
    """β ± z·SE; variance parameters on the sd/cor/σ scale from the criterion's curvature
    (the fit's criterion, REML or ML; lme4's confint(method = "Wald") gives NA for them).
    Any structure: one grouping factor or several (lme4's order and names).  `obj`: the
    fit's objective (default: one built from `stats`)."""
    z = _dist.norm_ppf(0.5 + level / 2)
    obj = _objective(stats, reml) if obj is None else obj
    sv = theta_to_sdcor(obj, theta, sigma)
    names = parameter_names(stats, obj)
    hess = richardson_hessian(lambda v: _criterion_sv(obj, v), sv)
    w, U = np.linalg.eigh(hess)
    pos = w > 1e-8
    cov = 2 * (U[:, pos] / w[pos]) @ U[:, pos].T
    sv_se = np.sqrt(np.clip(np.diag(cov), 0, None))
    lo_sv, hi_sv = _bounds_sv(obj)
    # an sd at 0 (a boundary fit) has no Wald interval; correlations may be negative
    is_sd = np.r_[obj.theta_map.diagonal[_lme4_order(obj)], False]
    sv_se[is_sd & (sv <= 0)] = np.nan
    est = np.r_[sv, beta]
    err = np.r_[sv_se, se]
    # variance parameters: clipped to their space (sd, σ ≥ 0; -1 ≤ cor ≤ 1)
    lo_b = np.r_[lo_sv, np.full(len(beta), -np.inf)]
    hi_b = np.r_[hi_sv, np.full(len(beta), np.inf)]
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
    """lme4's profile confidence intervals: the ML deviance profiled for each parameter.
    Any structure: one grouping factor or several (the blocked objective, re-optimized with
    its default method; parameters in lme4's order)."""
    z = _dist.norm_ppf(0.5 + level / 2)
    obj = _objective(stats, reml=False)
    opt = _optimize(obj)
    theta_ml = np.asarray(opt.final_theta)
    dec = obj.decompose(theta_ml)
    sigma_ml = obj.sigma(dec)
    base = obj.deviance_of(dec)
    sv0 = theta_to_sdcor(obj, theta_ml, sigma_ml)
    names = parameter_names(stats, obj)
    lower_b, upper_b = _bounds_sv(obj)
    lower_b[-1] = 1e-12 * sigma_ml

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
            o = _objective(_offset_statistics(stats, j, b), reml=False)
            r = _optimize(o, theta0=theta_ml)
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


# ---------------------------------------------------------------------- the ICC (variance.py)

INTERCEPT = "(Intercept)"
ICC_METHODS = ("profile", "wald")


@dataclass
class ICC:
    icc: float
    lower: float
    upper: float
    level: float
    method: str  # e.g. "profile-likelihood (REML)"
    tau00: float
    sigma2: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}

    def __str__(self) -> str:
        pct = f"{100 * self.level:g}%"
        return (f"ICC = {self.icc:.4f}  ({pct} CI {self.lower:.4f} to {self.upper:.4f}, "
                f"{self.method}); tau00 = {self.tau00:.4g}, sigma^2 = {self.sigma2:.4g}")


def is_random_intercept_only(result) -> bool:
    re = result.random_effects
    return re.height == 1 and re["term"][0] == INTERCEPT


def icc_of(result, level: float = 0.95, *, method: str = "profile") -> ICC:
    """The ICC of a fitted random-intercept model (a FitResult with its statistics) with its
    confidence interval (see `variance.py` for the method)."""
    if not is_random_intercept_only(result):
        terms = ", ".join(result.random_effects["term"].to_list())
        raise InputError(f"the ICC needs a model with one random intercept and no random "
                         f"slopes; {result.formula!r} has random terms {terms}")
    if not 0 < level < 1:
        raise InputError(f"level must be between 0 and 1, not {level!r}")
    if method not in ICC_METHODS:
        raise InputError(f"method must be one of {', '.join(ICC_METHODS)}, not {method!r}")
    if result.stats is None:
        raise InputError("the ICC interval needs the model's statistics; fit it with "
                         "mlpipe.fit or pass a config / result directory")
    tau00 = float(result.random_effects["variance"][0])
    sigma2 = float(result.residual_variance)
    obj = Objective(result.stats, reml=result.method == "REML")
    th = float(abs(np.asarray(result.theta)[0]))
    d_hat = obj(np.array([th]))
    to_icc = lambda t: t * t / (1.0 + t * t)  # noqa: E731
    point = tau00 / (tau00 + sigma2)

    if method == "profile":
        crit = float(_dist.chi2_ppf(level, 1))
        f = lambda t: obj(np.array([t])) - d_hat - crit  # noqa: E731
        lo = 0.0 if f(0.0) <= 0 else sopt.brentq(f, 0.0, th, xtol=1e-12, rtol=1e-12)
        b = 2.0 * th + 1.0
        for _ in range(200):
            if f(b) > 0:
                break
            b *= 2.0
        else:
            return ICC(point, to_icc(lo), 1.0, level, f"profile-likelihood ({result.method})",
                       tau00, sigma2)
        hi = sopt.brentq(f, th, b, xtol=1e-12, rtol=1e-12)
        return ICC(point, to_icc(lo), to_icc(hi), level,
                   f"profile-likelihood ({result.method})", tau00, sigma2)

    if th < 1e-6:
        raise InputError("the Wald ICC interval is not defined for a zero random-intercept "
                         "variance; use method='profile'")
    h = 1e-3
    lt = math.log(th)
    dev = lambda x: obj(np.array([math.exp(x)]))  # noqa: E731
    d2 = (dev(lt + h) - 2.0 * d_hat + dev(lt - h)) / (h * h)
    if not d2 > 0:
        raise InputError("the deviance is not convex at the estimate; use method='profile'")
    se_logit = 2.0 * math.sqrt(2.0 / d2)
    z = float(_dist.norm_ppf(0.5 + level / 2))
    expit = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return ICC(point, expit(2 * lt - z * se_logit), expit(2 * lt + z * se_logit), level,
               f"Wald on the logit scale ({result.method})", tau00, sigma2)


def icc_or_none(result, level: float = 0.95) -> dict | None:
    """`icc(result).to_dict()` for random-intercept models with statistics, else None."""
    if result.stats is None or not is_random_intercept_only(result):
        return None
    try:
        return icc_of(result, level).to_dict()
    except (InputError, ValueError, ArithmeticError):
        return None
