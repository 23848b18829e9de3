"""Stage 3: the profiled REML / ML deviance as a function of θ, from sufficient statistics.

lme4's parameterization: the random effects of group i are b_i = σ T u_i with u_i ~ N(0, I),
T the q×q lower-triangular relative covariance factor whose free entries are θ.  For each θ,
per group (batched over all m groups at once, elementwise over arrays of length m):

    L_i L_i' = T' Z_i'Z_i T + I                      (q×q Cholesky)
    R_ZX,i   = L_i⁻¹ T' Z_i'X_i,   c_u,i = L_i⁻¹ T' Z_i'y_i
    R_X'R_X  = X'X − Σ_i R_ZX,i' R_ZX,i
    β̂        = (R_X'R_X)⁻¹ (X'y − Σ_i R_ZX,i' c_u,i)
    r²       = y'y − Σ_i |c_u,i|² − β̂'(X'y − Σ_i R_ZX,i' c_u,i)

    ML:   d(θ) = log|L|² + n (1 + log(2π r²/n))
    REML: d(θ) = log|L|² + log|R_X|² + (n−p) (1 + log(2π r²/(n−p)))

This is exactly lme4's `mkLmerDevfun` objective; nothing here touches raw rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from .stats import Statistics

LOG_2PI = float(np.log(2 * np.pi))


class ThetaMap:
    """The free entries of T: lower triangles of the correlated blocks, lme4's order."""

    def __init__(self, blocks: list[tuple[int, int]], q: int):
        self.q = q
        self.rows: list[int] = []
        self.cols: list[int] = []
        for start, size in blocks:
            for c in range(size):
                for r in range(c, size):
                    self.rows.append(start + r)
                    self.cols.append(start + c)
        self.diagonal = np.array([r == c for r, c in zip(self.rows, self.cols)])
        self.lower = np.where(self.diagonal, 0.0, -np.inf)
        self.initial = np.where(self.diagonal, 1.0, 0.0)

    def __len__(self) -> int:
        return len(self.rows)

    def T(self, theta: np.ndarray) -> np.ndarray:
        out = np.zeros((self.q, self.q))
        out[self.rows, self.cols] = theta
        return out


@dataclass
class Decomposition:
    """Everything the deviance at θ is built from; results are read off it."""

    theta: np.ndarray
    T: np.ndarray
    L: list[list[np.ndarray | None]]  # L[i][j]: (m,) entries of the per-group Cholesky factors
    rzx: np.ndarray  # (q, p, m)
    cu: np.ndarray  # (q, m)
    xtx_adj: np.ndarray  # R_X'R_X
    rx: np.ndarray  # upper-triangular R_X
    beta: np.ndarray
    r2: float
    logdet_l: float
    logdet_rx: float


class Objective:
    """`Objective(stats, reml=True)(theta)` → the deviance (REML criterion under REML)."""

    def __init__(self, stats: Statistics, *, reml: bool = True):
        self.stats = stats
        self.reml = reml
        self.theta_map = ThetaMap(stats.blocks, stats.q)
        self.evaluations = 0

    def decompose(self, theta: np.ndarray) -> Decomposition:
        s = self.stats
        q = s.q
        T = self.theta_map.T(np.asarray(theta, dtype=float))
        # A_i = T' Z_i'Z_i T + I, as (q, q, m)
        A = np.tensordot(np.tensordot(T, s.ztz, axes=(0, 0)), T, axes=(1, 0))  # (c, m, d)
        A = np.moveaxis(A, 2, 1)
        L: list[list[np.ndarray | None]] = [[None] * q for _ in range(q)]
        for j in range(q):
            d = A[j, j] + 1.0
            for k in range(j):
                d = d - L[j][k] ** 2
            L[j][j] = np.sqrt(d)
            for i in range(j + 1, q):
                v = A[i, j]
                for k in range(j):
                    v = v - L[i][k] * L[j][k]
                L[i][j] = v / L[j][j]
        W = np.tensordot(T, s.ztx, axes=(0, 0))  # T' Z'X: (q, p, m)
        w = np.tensordot(T, s.zty, axes=(0, 0))  # T' Z'y: (q, m)
        rzx = np.empty_like(W)
        cu = np.empty_like(w)
        for i in range(q):
            acc, acc_y = W[i], w[i]
            for k in range(i):
                acc = acc - L[i][k] * rzx[k]
                acc_y = acc_y - L[i][k] * cu[k]
            rzx[i] = acc / L[i][i]
            cu[i] = acc_y / L[i][i]
        xtx_adj = s.xtx - np.tensordot(rzx, rzx, axes=([0, 2], [0, 2]))
        xty_adj = s.xty - np.tensordot(rzx, cu, axes=([0, 2], [0, 1]))
        yty_adj = s.yty - float(np.sum(cu * cu))
        rx = linalg.cholesky(xtx_adj, lower=False, check_finite=False)
        beta = linalg.cho_solve((rx, False), xty_adj, check_finite=False)
        r2 = yty_adj - float(beta @ xty_adj)
        logdet_l = 2.0 * float(sum(np.sum(np.log(L[j][j])) for j in range(q)))
        logdet_rx = 2.0 * float(np.sum(np.log(np.abs(np.diag(rx)))))
        return Decomposition(np.asarray(theta, float), T, L, rzx, cu, xtx_adj, rx, beta, r2,
                             logdet_l, logdet_rx)

    def deviance_of(self, dec: Decomposition) -> float:
        n, p = self.stats.n, self.stats.p
        r2 = dec.r2
        if not np.isfinite(r2) or r2 <= 0:
            return np.inf
        if self.reml:
            dof = n - p
            return dec.logdet_l + dec.logdet_rx + dof * (1.0 + LOG_2PI + np.log(r2 / dof))
        return dec.logdet_l + n * (1.0 + LOG_2PI + np.log(r2 / n))

    def __call__(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        try:
            return self.deviance_of(self.decompose(theta))
        except (linalg.LinAlgError, FloatingPointError, ValueError):
            return np.inf

    def sigma(self, dec: Decomposition) -> float:
        dof = self.stats.n - (self.stats.p if self.reml else 0)
        return float(np.sqrt(dec.r2 / dof))
