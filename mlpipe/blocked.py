"""Stage 3 for any random-effects structure: the profiled REML / ML deviance of θ from the
per-cell statistics of several grouping factors (nested to any depth, crossed, or both).

MixedModels.jl's "A once, L per θ".  The random effects of factor k are b_k = σ Λ_k u_k with
Λ_k = I_{m_k} ⊗ T_k (T_k the factor's q_k×q_k relative covariance factor, block-diagonal over
its terms).  Factors are ordered by number of levels, largest first (lme4's order, also θ's).
From the statistics, once:

    A_jk = Z_j'Z_k       one q_j×q_k block per pair of levels (i of j, l of k) that share a
                         cell: the diagonal blocks (j = k) are block-diagonal by level; a
                         factor nested in another has one off-diagonal block per level of
                         the inner factor; crossed factors have one per shared cell
    C_k  = Z_k'[X y]     one q_k×(p+1) block per level

Per θ: the blocks are scaled (T_j' A_jk T_k, batched over all level pairs of (j, k) as one
einsum), written into the fixed sparse pattern of Λ'Z'ZΛ + I, and factored by a sparse LDL'
(QDLDL, with its fill-reducing AMD ordering computed once, on the first factorization; the
numeric factorization is redone per θ).  Then

    log|L|²  = Σ log D
    M        = [X y]'[X y] − (Λ'Z'[X y])' (Λ'Z'ZΛ + I)⁻¹ (Λ'Z'[X y])     ((p+1)×(p+1))
    R_X'R_X  = M[:p, :p],  β̂ = (R_X'R_X)⁻¹ M[:p, p],  r² = M[p, p] − β̂' M[:p, p]

and the deviance is formed as in `objective.py`.  The sparsity of L follows the structure:
a nested hierarchy stays block-sparse (no fill beyond the tree), crossed factors fill the
trailing block of the factor with fewer levels — `structure()` reports which, and its size.

The gradient is by central differences of the deviance (2 evaluations per θ); the default
optimizer for this objective is bounded BOBYQA, as lme4's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import qdldl
import scipy.sparse as sp
from scipy import linalg

from .objective import LOG_2PI, ThetaMap
from .stats import Factor, Statistics


@dataclass
class _Pair:
    """The nonzero blocks of A_jk = Z_j'Z_k (j ≥ k in factor order): level indices and sums."""

    j: int
    k: int
    rows: np.ndarray  # level of factor j
    cols: np.ndarray  # level of factor k
    blocks: np.ndarray  # (npair, q_j, q_k)


@dataclass
class BlockedDecomposition:
    """Everything the deviance at θ is built from; results are read off it."""

    theta: np.ndarray
    T: list[np.ndarray]  # per factor (sorted order)
    xtx_adj: np.ndarray  # R_X'R_X
    rx: np.ndarray
    beta: np.ndarray
    r2: float
    logdet_l: float
    logdet_rx: float
    u: np.ndarray  # (Q,) spherical conditional modes
    solver: object  # the QDLDL factorization of Λ'Z'ZΛ + I


def _group_sum(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Σ of values (cells, ...) by index (cells,) → (size, ...)."""
    out = np.zeros((size,) + values.shape[1:])
    np.add.at(out, index, values)
    return out


class BlockedObjective:
    """`BlockedObjective(stats, reml=True)(theta)` → the deviance, for `stats.general`."""

    default_method = "bobyqa"

    def __init__(self, stats: Statistics, *, reml: bool = True):
        if not stats.general:
            raise ValueError("BlockedObjective needs per-cell statistics of several factors")
        self.stats = stats
        self.reml = reml
        self.evaluations = 0
        self.gradient_evaluations = 0
        # factors by number of levels, largest first (stable: formula order on ties)
        self.order = sorted(range(len(stats.factors)), key=lambda k: -stats.factors[k].m)
        self.factors: list[Factor] = [stats.factors[k] for k in self.order]
        qs = [f.q for f in self.factors]
        self.toff = np.concatenate([[0], np.cumsum(qs)]).astype(int)  # offsets in global T
        blocks = [(int(self.toff[k]) + s, n) for k, f in enumerate(self.factors)
                  for s, n in f.blocks]
        self.theta_map = ThetaMap(blocks, int(self.toff[-1]))
        ms = [f.m for f in self.factors]
        self.uoff = np.concatenate([[0], np.cumsum([m * q for m, q in zip(ms, qs)])]).astype(int)
        self.Q = int(self.uoff[-1])
        p = stats.p
        # per-cell [Z X y] cross-products, cells first: S (C, qa, qa), G (C, qa, p+1)
        S = np.ascontiguousarray(np.moveaxis(np.asarray(stats.ztz, dtype=float), -1, 0))
        G = np.concatenate([np.moveaxis(np.asarray(stats.ztx, dtype=float), -1, 0),
                            np.asarray(stats.zty, dtype=float).T[:, :, None]], axis=2)
        self.pairs: list[_Pair] = []
        for j, fj in enumerate(self.factors):
            for k in range(j + 1):
                fk = self.factors[k]
                sub = S[:, fj.z][:, :, fk.z]
                if j == k:
                    rows = np.arange(fj.m)
                    blocks = _group_sum(fj.index, sub, fj.m)
                    self.pairs.append(_Pair(j, k, rows, rows, blocks))
                    continue
                key = fj.index * fk.m + fk.index
                uniq, inv = np.unique(key, return_inverse=True)
                self.pairs.append(_Pair(j, k, uniq // fk.m, uniq % fk.m,
                                        _group_sum(inv, sub, len(uniq))))
        self.G = [_group_sum(f.index, G[:, f.z, :], f.m) for f in self.factors]
        m0 = np.empty((p + 1, p + 1))
        m0[:p, :p] = stats.xtx
        m0[:p, p] = m0[p, :p] = stats.xty
        m0[p, p] = stats.yty
        self._M0 = m0
        self._pattern()
        self._solver = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ structure
    def _pattern(self) -> None:
        """The upper triangle of Λ'Z'ZΛ + I as a fixed CSC pattern, and for every value the
        blocks produce (in their order) the slot it goes to."""
        rows, cols = [], []
        for pr in self.pairs:
            qj, qk = self.factors[pr.j].q, self.factors[pr.k].q
            # value (a, b) of block (level i of j, level l of k) is entry
            # (u index of (k, l, b), u index of (j, i, a)): k ≤ j, so upper triangle
            a, b = np.meshgrid(np.arange(qj), np.arange(qk), indexing="ij")
            ui = self.uoff[pr.j] + pr.rows[:, None, None] * qj + a[None]
            uk = self.uoff[pr.k] + pr.cols[:, None, None] * qk + b[None]
            if pr.j == pr.k:  # a diagonal block: its upper triangle only
                keep = (b <= a)[None].repeat(len(pr.rows), 0)
                ui, uk = ui[keep], uk[keep]
            rows.append(uk.ravel())
            cols.append(ui.ravel())
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        slot = np.arange(1, len(rows) + 1, dtype=float)
        mat = sp.csc_matrix((slot, (rows, cols)), shape=(self.Q, self.Q))
        mat.sort_indices()
        self._csc = mat
        self._slot = mat.data.astype(np.int64) - 1  # csc slot → value position
        self._diag_slots = np.flatnonzero(mat.indices == np.repeat(np.arange(self.Q),
                                                                   np.diff(mat.indptr)))

    def structure(self) -> list[dict]:
        """Per factor: name, levels, columns, and how it relates to each earlier (larger)
        factor — "nested" (each level of the larger lies within one level of this one),
        or "crossed" — read off the data, never the syntax."""
        out = []
        for j, f in enumerate(self.factors):
            rel = {}
            for pr in self.pairs:
                if pr.j == j and pr.k < j:  # factor k has more levels
                    nested = len(pr.rows) == self.factors[pr.k].m
                    rel[self.factors[pr.k].name] = "nested" if nested else "crossed"
            out.append({"factor": f.name, "levels": f.m, "columns": f.q,
                        "relations": rel})
        return out

    def structure_line(self) -> str:
        """One line for the summary: the factors largest first and how each relates to the
        ones before it, with the size of the sparse factor."""
        parts = []
        for s in self.structure():
            rel = "; ".join(f"{v} in {k}" if v == "nested" else f"crossed with {k}"
                            for k, v in s["relations"].items())
            # "nested in school" reads naturally for the inner factor: say it of the larger
            parts.append(f"{s['factor']} ({s['levels']} levels x {s['columns']})"
                         + (f" [{rel}]" if rel else ""))
        return "; ".join(parts)

    def nnz_estimate(self) -> int:
        """Nonzeros of the pattern of Λ'Z'ZΛ + I (its factor has at least as many)."""
        return int(self._csc.nnz)

    # ------------------------------------------------------------------ per θ
    def T_blocks(self, theta: np.ndarray) -> list[np.ndarray]:
        T = self.theta_map.T(np.asarray(theta, dtype=float))
        return [T[self.toff[k]:self.toff[k + 1], self.toff[k]:self.toff[k + 1]]
                for k in range(len(self.factors))]

    def _matrix(self, Ts: list[np.ndarray]) -> sp.csc_matrix:
        vals = []
        for pr in self.pairs:
            Tj, Tk = Ts[pr.j], Ts[pr.k]
            v = np.einsum("ra,nrs,sb->nab", Tj, pr.blocks, Tk, optimize=True)
            if pr.j == pr.k:
                q = Tj.shape[0]
                a, b = np.meshgrid(np.arange(q), np.arange(q), indexing="ij")
                v = v + np.eye(q)[None]
                v = v[:, b <= a]
            vals.append(v.ravel())
        vals = np.concatenate(vals)
        mat = self._csc.copy()
        mat.data = vals[self._slot]
        return mat

    def _rhs(self, Ts: list[np.ndarray]) -> np.ndarray:
        """Λ'Z'[X y] as (Q, p+1)."""
        parts = [np.einsum("ra,mrj->maj", T, G).reshape(-1, G.shape[2])
                 for T, G in zip(Ts, self.G)]
        return np.concatenate(parts, axis=0)

    def _factor(self, mat: sp.csc_matrix):
        if self._solver is None:
            self._solver = qdldl.Solver(mat, upper=True)
        else:
            self._solver.update(mat, upper=True)
        return self._solver

    def _evaluate(self, theta: np.ndarray, keep: bool = False):
        s = self.stats
        p = s.p
        Ts = self.T_blocks(theta)
        mat = self._matrix(Ts)
        solver = self._factor(mat)
        _L, D, _P = solver.factors()
        if not np.all(D > 0):
            raise linalg.LinAlgError("Λ'Z'ZΛ + I is not positive definite")
        logdet_l = float(np.sum(np.log(D)))
        C = self._rhs(Ts)
        W = np.column_stack([solver.solve(np.ascontiguousarray(C[:, j])) for j in range(p + 1)])
        M = self._M0 - C.T @ W
        M = (M + M.T) / 2
        xtx_adj = M[:p, :p].copy()
        xty_adj = M[:p, p].copy()
        rx = linalg.cholesky(xtx_adj, lower=False, check_finite=False)
        beta = linalg.cho_solve((rx, False), xty_adj, check_finite=False)
        r2 = float(M[p, p]) - float(beta @ xty_adj)
        logdet_rx = 2.0 * float(np.sum(np.log(np.abs(np.diag(rx)))))
        if not keep:
            return r2, logdet_l, logdet_rx
        u = W[:, p] - W[:, :p] @ beta
        return BlockedDecomposition(np.asarray(theta, float), Ts, xtx_adj, rx, beta, r2,
                                    logdet_l, logdet_rx, u, solver)

    def _deviance(self, r2: float, logdet_l: float, logdet_rx: float) -> float:
        n, p = self.stats.n, self.stats.p
        if not np.isfinite(r2) or r2 <= 0:
            return np.inf
        if self.reml:
            dof = n - p
            return logdet_l + logdet_rx + dof * (1.0 + LOG_2PI + np.log(r2 / dof))
        return logdet_l + n * (1.0 + LOG_2PI + np.log(r2 / n))

    def __call__(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                return float(self._deviance(*self._evaluate(np.asarray(theta, dtype=float))))
        except (linalg.LinAlgError, FloatingPointError, ValueError):
            return np.inf

    def parts_at(self, theta: np.ndarray) -> tuple[float, float, float]:
        """(r², log|L|², log|R_X|²) at θ."""
        with self._lock:
            return self._evaluate(np.asarray(theta, dtype=float))

    def xtx_adj_at(self, theta: np.ndarray) -> np.ndarray:
        """R_X'R_X at θ (σ² times its inverse is Var(β̂))."""
        with self._lock:
            return self._evaluate(np.asarray(theta, dtype=float), keep=True).xtx_adj

    def decompose(self, theta: np.ndarray) -> BlockedDecomposition:
        with self._lock:
            dec = self._evaluate(np.asarray(theta, dtype=float), keep=True)
        self._solver = None  # the decomposition keeps this factorization
        return dec

    def deviance_of(self, dec: BlockedDecomposition) -> float:
        return self._deviance(dec.r2, dec.logdet_l, dec.logdet_rx)

    def sigma(self, dec: BlockedDecomposition) -> float:
        dof = self.stats.n - (self.stats.p if self.reml else 0)
        return float(np.sqrt(dec.r2 / dof))

    def value_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The deviance and its gradient by central differences (inf and NaNs if undefined)."""
        x = np.asarray(theta, dtype=float)
        f = self(x)
        self.gradient_evaluations += 1
        g = np.full(len(x), np.nan)
        if not np.isfinite(f):
            return np.inf, g
        for j in range(len(x)):
            h = 1e-6 * max(1.0, abs(x[j]))
            xp, xm = x.copy(), x.copy()
            xp[j] += h
            xm[j] -= h
            g[j] = (self(xp) - self(xm)) / (2 * h)
        return f, g

    def moment_start(self) -> None:
        return None

    # ------------------------------------------------------------------ conditional modes
    def conditional_modes(self, dec: BlockedDecomposition, sigma: float) -> list[dict]:
        """Per factor (sorted order): b = Λ u as (m, q), and the conditional SDs
        sqrt(diag(σ² T (Λ'Z'ZΛ + I)⁻¹_ii T')) per level — the diagonal blocks of the
        inverse from the LDL' factor, by triangular solves in chunks of columns."""
        L, D, P = dec.solver.factors()
        Lfull = (L + sp.eye(self.Q, format="csc")).tocsr()
        pos = np.empty(self.Q, dtype=np.int64)
        pos[P] = np.arange(self.Q)  # u index → row of the permuted system
        out = []
        for k, f in enumerate(self.factors):
            q, m = f.q, f.m
            T = dec.T[k]
            u = dec.u[self.uoff[k]:self.uoff[k + 1]].reshape(m, q)
            b = u @ T.T
            cov = np.empty((m, q, q))
            chunk = int(max(1, min(4096, 2e7 // self.Q) // q))  # ≤ 160 MB per chunk
            for start in range(0, m, chunk):
                lv = np.arange(start, min(m, start + chunk))
                idx = (self.uoff[k] + lv[:, None] * q + np.arange(q)[None]).ravel()
                rhs = sp.csr_matrix((np.ones(len(idx)), (pos[idx], np.arange(len(idx)))),
                                    shape=(self.Q, len(idx))).toarray()
                Xs = sp.linalg.spsolve_triangular(Lfull, rhs, lower=True, unit_diagonal=True)
                Xs = Xs / np.sqrt(D)[:, None]
                Xs = Xs.reshape(self.Q, len(lv), q)
                blockinv = np.einsum("nla,nlb->lab", Xs, Xs)
                cov[lv] = T[None] @ blockinv @ T.T[None]
            sd = sigma * np.sqrt(np.clip(np.einsum("maa->ma", cov), 0, None))
            out.append({"factor": f, "b": b, "cond_sd": sd})
        return out
