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

The gradient is exact (`value_and_gradient`: the selected inverse of the factor gives the
entries of (Λ'Z'ZΛ + I)⁻¹ the trace needs); the optimizer is the projected Newton method of
`optimize.py`, with BOBYQA as its fallback, as for one factor.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ._lazy import lazy_import
from ._levels_jit import (level_sums_xy, pair_levels, pair_product, pair_sums,
                          pair_traces, reorder, shared_matmul)
from ._schur import Factorization, Structure, estimate
from .errors import InputError, MlpipeError
from .objective import Parts, ThetaMap, profile_fixed, profiled_deviance
from .stats import Factor, Statistics

sp = lazy_import("scipy.sparse")  # imported when first needed (a fast start)


@dataclass
class _Pair:
    """The nonzero blocks of A_jk = Z_j'Z_k (j ≥ k in factor order): level indices and sums."""

    j: int
    k: int
    rows: np.ndarray  # level of factor j
    cols: np.ndarray  # level of factor k
    blocks_t: np.ndarray  # (q_j, q_k, npair), "pair last": contiguous vectors per entry

    @property
    def blocks(self) -> np.ndarray:
        """The same blocks "pair first" (npair, q_j, q_k), a view (stored once)."""
        return np.moveaxis(self.blocks_t, -1, 0)


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
    solver: object  # the two-stage factorization of Λ'Z'ZΛ + I (`_schur.Factorization`)


#: `BlockedObjective._information` works on this many bytes of (Q, columns) arrays at a
#: time (of about 4 such arrays): per column, the products with Z'Z and the solves pass
#: over B's entries once for all the columns of a batch
INFO_BATCH_BYTES = 256 << 20
#: ... and keeps, beside, Y = Λ'Z'ZŴ for every θ entry (Q doubles each) and Ŵ (its factor's
#: random effects each): where those exceed this, Newton takes difference Hessians instead
#: (by that count — computed, not measured — 2M children nested in schools with (t | ·) at
#: both keep 6 entries, 291 MB; with (t + t2 | ·) 12 entries, ~870 MB → differences)
INFO_KEPT_BYTES = 512 << 20


def parse_bytes(text: str) -> int | None:
    """'4GB', '512MB', '2GiB', '1e9' → bytes (DuckDB's spelling of memory limits)."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3,
             "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, f in units.items():
        if t.endswith(u):
            try:
                return int(float(t[:-len(u)]) * f)
            except ValueError:
                return None
    try:
        return int(float(t))
    except ValueError:
        return None


def physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def lme4_order(factors: list[Factor]) -> list[Factor]:
    """The factors (and the terms within each) in lme4's order of random-effect terms:
    `mkReTrms` reorders the terms by number of levels, largest first, as rev(order(nl)) —
    so ties come out in reverse formula order — and only when some term has more levels
    than the one before it; otherwise formula order stands."""
    terms = [(k, b) for k, f in enumerate(factors) for b in range(len(f.blocks))]
    nl = [factors[k].m for k, _ in terms]
    if any(b > a for a, b in zip(nl, nl[1:])):
        asc = sorted(range(len(terms)), key=lambda i: nl[i])  # stable, as R's order()
        terms = [terms[i] for i in reversed(asc)]
    out: list[Factor] = []
    seen: dict[int, list[int]] = {}
    for k, b in terms:
        seen.setdefault(k, []).append(b)
    for k, blocks in seen.items():
        f = factors[k]
        if blocks == list(range(len(f.blocks))):
            out.append(f)
            continue
        cols = [c for b in blocks for c in range(f.blocks[b][0], sum(f.blocks[b]))]
        new_blocks, start = [], 0
        for b in blocks:
            new_blocks.append((start, f.blocks[b][1]))
            start += f.blocks[b][1]
        out.append(Factor(f.name, f.columns, [f.z[c] for c in cols], [f.names[c] for c in cols],
                          new_blocks, f.levels, f.index))
    return out


_WARM = False


def warm_up() -> None:
    """Load the compiled kernels from numba's cache by evaluating a tiny two-factor model
    (crossed, a random slope) with its gradient: a fresh process's first several-factor
    evaluation otherwise pays ~0.3 s for numba's target and ~5 ms a kernel.  `fit` runs it
    in the background during the scan (`mlpipe/_preload.py`); once per process."""
    global _WARM
    if _WARM:
        return
    _WARM = True
    obj = BlockedObjective(warm_statistics())
    obj.value_and_gradient(np.asarray(obj.theta_map.initial, dtype=float))
    for a in (np.zeros(2), np.zeros(2, np.int64)):  # the statistics pass's cell order
        reorder(a, order=np.arange(2))
        reorder(a, position=np.arange(2))


def warm_statistics() -> Statistics:
    """The statistics of y ~ x + (x | g) + (1 | h) on 48 random rows (g = row % 8, h = row
    % 3: 24 cells of 2 rows), summed here with NumPy: the warm-up runs beside the scan, and
    a second DuckDB database there cost the large crossed fit ~150-300 MB of peak memory
    (the Polars engine would not do: it labels levels through DuckDB).  Its statistics are
    the pass's (tests/test_multilevel.py)."""
    rng = np.random.default_rng(0)
    n, m = 48, 24
    y, x = rng.normal(size=n), rng.normal(size=n)
    cell = (np.arange(n) % 8) * 3 + np.arange(n) % 3  # cells ordered by (g, h)
    z = np.stack([np.ones(n), x])
    per_cell = lambda v: np.bincount(cell, weights=v, minlength=m)  # noqa: E731
    ztz = np.array([[per_cell(z[a] * z[b]) for b in range(2)] for a in range(2)])
    labels = lambda k: np.array([str(i) for i in range(k)], dtype=object)  # noqa: E731
    names = ["(Intercept)", "x"]
    return Statistics(
        formula="y ~ x + (x | g) + (1 | h)", response="y", fixed_names=names,
        random_names=names, blocks=[], group="", levels=np.arange(m),
        n_i=per_cell(np.ones(n)), ztz=ztz, ztx=ztz.copy(),
        zty=np.array([per_cell(z[a] * y) for a in range(2)]), yty_i=per_cell(y * y),
        xtx=z @ z.T, xty=z @ y, yty=float(y @ y), n=n, rows_read=n,
        factors=[Factor("g", ["g"], [0, 1], names, [(0, 2)], labels(8), np.arange(m) // 3),
                 Factor("h", ["h"], [0], names[:1], [(0, 1)], labels(3), np.arange(m) % 3)],
        group_types={"g": "BIGINT", "h": "BIGINT"})


class BlockedObjective:
    """`BlockedObjective(stats, reml=True)(theta)` → the deviance, for `stats.general`."""

    default_method = "newton"

    def __init__(self, stats: Statistics, *, reml: bool = True,
                 memory_limit: str | None = None):
        if not stats.general:
            raise ValueError("BlockedObjective needs per-cell statistics of several factors")
        self.stats = stats
        self.reml = reml
        self.evaluations = 0
        self.last_value: float | None = None  # the latest criterion (progress)
        self.gradient_evaluations = 0
        self.factors: list[Factor] = lme4_order(stats.factors)
        qs = [f.q for f in self.factors]
        self.toff = np.concatenate([[0], np.cumsum(qs)]).astype(int)  # offsets in global T
        blocks = [(int(self.toff[k]) + s, n) for k, f in enumerate(self.factors)
                  for s, n in f.blocks]
        self.theta_map = ThetaMap(blocks, int(self.toff[-1]))
        ms = [f.m for f in self.factors]
        self.uoff = np.concatenate([[0], np.cumsum([m * q for m, q in zip(ms, qs)])]).astype(int)
        self.Q = int(self.uoff[-1])
        # the level pairs of factors sharing cells: (j, k, rows, cols, each cell's pair)
        self._pair_keys = []
        for j, fj in enumerate(self.factors):
            for k in range(j + 1):
                fk = self.factors[k]
                if j == k:
                    rows = np.arange(fj.m)
                    self._pair_keys.append((j, k, rows, rows, fj.index, fj.m))
                    continue
                if k == 0:  # B's blocks by level of the leading factor: the solver's
                    # level order is then theirs (sequential kernels, no scatter)
                    cols, rows, inv = pair_levels(fk.index, fj.index, fk.m, fj.m)
                else:
                    rows, cols, inv = pair_levels(fj.index, fk.index, fj.m, fk.m)
                self._pair_keys.append((j, k, rows, cols, inv, len(rows)))
        parts = self.linear_parts_of(stats)
        npairs = len(self._pair_keys)
        self.pairs: list[_Pair] = [_Pair(j, k, rows, cols, parts[t]) for t, (j, k, rows, cols,
                                   _inv, _n) in enumerate(self._pair_keys)]
        self.G = parts[npairs:npairs + len(self.factors)]
        self._M0 = parts[-1]
        self._blocks_t = [pr.blocks_t for pr in self.pairs]
        spec = ([f.q for f in self.factors], [f.m for f in self.factors],
                [(pr.j, pr.k, pr.rows, pr.cols, bt) for pr, bt in zip(self.pairs,
                                                                     self._blocks_t)])
        self.size = estimate(*spec)
        limit = parse_bytes(memory_limit) if memory_limit else physical_memory()
        if limit and self.size["bytes"] > limit:
            raise InputError(
                f"the random-effects structure needs about {human_bytes(self.size['bytes'])} "
                f"for the solver (a Schur complement of order {self.size['order']} with "
                f"{self.size['update_terms']:,} update terms), more than the "
                f"{'memory limit ' + memory_limit if memory_limit else 'machine has'}; "
                f"simplify the random part or raise --memory-limit")
        self._st = Structure(*spec)
        self._lock = threading.Lock()
        self._last_factorization = None  # (θ's T blocks as bytes, (fac, C, W)), `_factorize`
        self._last_gradient = None  # ((θ's bytes, with_rx), `_gradient_parts`' value)
        # Newton's Hessian (mlpipe/optimize.py): the information (`_information`), taken at
        # every iterate, costs a product with Z'Z and a solve per entry of θ — less than the
        # difference Hessian's factorization and gradient per entry, whatever the structure
        # (crossed with a dense trailing block: the factorization is the R³/3; 2M children
        # nested in 20k schools: the fit took 4.9 s against 6.0 s, 5 evaluations against
        # 12); the differences remain the fallback where the information stops describing
        # the curvature (a variance near 0).  Its memory: `INFO_BATCH_BYTES` at a time, the
        # gradient's temporaries freed first, and what it keeps (`INFO_KEPT_BYTES`)
        kept = sum(self.Q + self.factors[k].m * self.factors[k].q for k, _r, _c in self.params)
        self.information_pays = 8 * kept <= INFO_KEPT_BYTES

    def linear_parts_of(self, stats: Statistics) -> list[np.ndarray]:
        """The arrays the evaluations read, from `stats` (per-cell statistics of this
        model's cells): per level pair the summed Z_j'Z_k blocks "pair last", per factor the
        summed Z'[X y] per level, and [X y]'[X y].  All are linear in the statistics (see
        `linear_parts`)."""
        p = stats.p
        ztz, ztx, zty = (np.asarray(a, dtype=float) for a in (stats.ztz, stats.ztx, stats.zty))
        out = []
        ints = lambda z: np.asarray(z, dtype=np.int64)  # noqa: E731
        for j, k, _rows, _cols, index, n in self._pair_keys:  # Σ over each pair's cells
            zj, zk = self.factors[j].z, self.factors[k].z
            blocks = np.zeros((len(zj), len(zk), n))
            pair_sums(ztz, ints(zj), ints(zk), ints(index), blocks)
            out.append(blocks)
        for f in self.factors:  # Σ Z'[X y] over each level's cells, level first
            g = np.zeros((f.m, f.q, p + 1))
            level_sums_xy(ztx, zty, ints(f.z), ints(f.index), g)
            out.append(g)
        m0 = np.empty((p + 1, p + 1))
        m0[:p, :p] = stats.xtx
        m0[:p, p] = m0[p, :p] = stats.xty
        m0[p, p] = stats.yty
        return out + [m0]

    def linear_parts(self) -> list[np.ndarray]:
        """The live arrays of `linear_parts_of` (the pairs' blocks, as the solver's
        structure holds them, G, [X y]'[X y]): writing into them in place changes the
        statistics the objective evaluates (mlpipe/residual.py re-weights them); then call
        `statistics_changed`."""
        return [pr.blocks_t for pr in self.pairs] + list(self.G) + [self._M0]

    def statistics_changed(self) -> None:
        """Drop what was derived from the `linear_parts` (the sparse Z'Z of the gradient,
        the latest factorization)."""
        self._last_factorization = None
        self._last_gradient = None
        self._ztz = None

    # ------------------------------------------------------------------ structure
    def _nested(self, pr: _Pair) -> bool:
        """Whether factor pr.k (more levels) is nested in factor pr.j: each of its levels
        shares cells with one level of pr.j only."""
        return pr.j != pr.k and len(pr.rows) == self.factors[pr.k].m

    def structure(self) -> list[dict]:
        """Per factor: name, levels, columns, and how it relates to each earlier (larger)
        factor — "nested" (each level of the larger lies within one level of this one),
        or "crossed" — read off the data, never the syntax."""
        out = []
        for j, f in enumerate(self.factors):
            rel = {}
            for pr in self.pairs:
                if pr.j == j and pr.k < j:  # factor k has more levels
                    rel[self.factors[pr.k].name] = "nested" if self._nested(pr) else "crossed"
            out.append({"factor": f.name, "levels": f.m, "columns": f.q,
                        "relations": rel})
        if out:
            out[0]["solver"] = {**self.size, "memory": human_bytes(self.size["bytes"]),
                                "cells": int(self.stats.m)}
        return out

    # ------------------------------------------------------------------ per θ
    def T_blocks(self, theta: np.ndarray) -> list[np.ndarray]:
        T = self.theta_map.T(np.asarray(theta, dtype=float))
        return [T[self.toff[k]:self.toff[k + 1], self.toff[k]:self.toff[k + 1]]
                for k in range(len(self.factors))]

    def _rhs(self, Ts: list[np.ndarray]) -> np.ndarray:
        """Λ'Z'[X y] as (Q, p+1): per level T'G_i, one compiled product per factor."""
        C = np.empty((self.Q, self.stats.p + 1))
        for k, (T, G) in enumerate(zip(Ts, self.G)):
            shared_matmul(T.T, G, out=C[self.uoff[k]:self.uoff[k + 1]].reshape(G.shape))
        return C

    def _factorize(self, Ts: list[np.ndarray]):
        """Factorization at θ and W = A⁻¹ Λ'Z'[X y] → (fac, C, W), C and W (Q, p+1).

        The latest is kept: the optimizer's gradient at the θ it has just scored (its
        moment start, a line search's accepted step) reuses it instead of factorizing again
        (~1 s on the 9.75M-cell crossed benchmark).  It is dropped before a factorization at
        another θ, so two are never held at once, and by `statistics_changed`.  Nothing
        writes into what it returns."""
        key = b"".join(np.ascontiguousarray(T, dtype=float).tobytes() for T in Ts)
        last = self._last_factorization
        if last is not None and last[0] == key:
            return last[1]
        del last  # the only other reference: freed before the new one is built
        self._last_factorization = None
        fac = Factorization(self._st, Ts)
        C = self._rhs(Ts)
        out = (fac, C, self._solve(fac, C))
        self._last_factorization = (key, out)
        return out

    def _solve(self, fac, C: np.ndarray) -> np.ndarray:
        """A⁻¹ C for C (Q, r) with the factorization at θ."""
        n1 = int(self.uoff[1])
        f0 = self.factors[0]
        W = np.empty_like(C)
        fac.solve(C[:n1].reshape(f0.m, f0.q, -1), C[n1:],
                  out=(W[:n1].reshape(f0.m, f0.q, -1), W[n1:]))
        return W

    def _evaluate(self, theta: np.ndarray, keep: bool = False):
        p = self.stats.p
        Ts = self.T_blocks(theta)
        fac, C, W = self._factorize(Ts)
        logdet_l = fac.logdet
        xtx_adj, rx, beta, r2, logdet_rx = self._profile(C, W)
        if not keep:
            return r2, logdet_l, logdet_rx
        u = W[:, p] - W[:, :p] @ beta
        return BlockedDecomposition(np.asarray(theta, float), Ts, xtx_adj, rx, beta, r2,
                                    logdet_l, logdet_rx, u, fac)

    def _profile(self, C: np.ndarray, W: np.ndarray):
        """From Λ'Z'[X y] and A⁻¹ of it: R_X'R_X, R_X, β̂, r², log|R_X|²."""
        M = self._M0 - C.T @ W
        return profile_fixed((M + M.T) / 2, self.stats.p)

    def _deviance(self, r2: float, logdet_l: float, logdet_rx: float) -> float:
        # case weights: lme4's criterion has -Σ log w_i (the residual covariance σ² W⁻¹)
        return profiled_deviance(r2, logdet_l, logdet_rx, self.stats.n, self.stats.p,
                                 self.reml) - self.stats.log_weights

    def __call__(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                self.last_value = float(self._deviance(*self._evaluate(
                    np.asarray(theta, dtype=float))))
                return self.last_value
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
            return self._evaluate(np.asarray(theta, dtype=float), keep=True)

    def deviance_of(self, dec: BlockedDecomposition) -> float:
        return self._deviance(dec.r2, dec.logdet_l, dec.logdet_rx)

    def sigma(self, dec: BlockedDecomposition) -> float:
        dof = self.stats.n - (self.stats.p if self.reml else 0)
        return float(np.sqrt(dec.r2 / dof))

    def value_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The deviance and its exact gradient in θ (inf and NaNs if undefined).

        With Ω = (Λ'Z'ZΛ + I)⁻¹, E_t = ∂Λ/∂θ_t (entry (r, c) of T_k at every level of
        factor k), u the conditional modes, W = Ω Λ'Z'X and Y = Z'ZΛW:

            ∂ log|L|² = 2 Σ_i (Ω Λ'Z'Z)[(k,i,c), (k,i,r)]     (Ω on the pattern of Z'Z only:
                                                               the selected inverse)
            ∂ r²      = −2 Σ_i u[(k,i,c)] (Z'(y − Xβ̂) − Z'ZΛu)[(k,i,r)]     (envelope)
            ∂ R_X'R_X = −(F + F' − G − G'),  F = (E'Z'X)'W,  G = (E W)'Y
        """
        x = np.asarray(theta, dtype=float)
        self.evaluations += 1
        self.gradient_evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                f, g = self._value_and_gradient(x)
        except (linalg.LinAlgError, FloatingPointError, ValueError, ZeroDivisionError):
            return np.inf, np.full(len(x), np.nan)
        self.last_value = float(f) if np.isfinite(f) else self.last_value
        return f, g

    def pair_omegas(self, fac) -> list[np.ndarray]:
        """Ω = (Λ'Z'ZΛ + I)⁻¹ on every pair's blocks, "pair last" (q_j, q_k, n) — the
        entries the gradient's trace and the conditional variances need (the pairs with the
        leading factor as strided views of Ω₂₁)."""
        om11, om21, om22 = fac.omega()
        st = self._st
        out: list[np.ndarray | None] = [None] * len(self.pairs)
        out[0] = om11
        start = 0
        for t in st.b_pairs:
            pr = self.pairs[t]
            nb, qj, q1 = pr.blocks.shape
            blk = om21[start:start + nb * qj].reshape(nb, qj, q1)
            out[t] = blk.transpose(1, 2, 0)  # a view: no copy of the ~10⁷ entries
            start += nb * qj
        start = 0
        for t in st.r_pairs:
            pr = self.pairs[t]
            nb, qj, qk = pr.blocks.shape
            size = nb * qj * qk
            vals = om22(st.r_row[start:start + size], st.r_col[start:start + size])
            out[t] = vals.reshape(qj, qk, nb)
            start += size
        return out

    def ztz_times(self, v: np.ndarray) -> np.ndarray:
        """Z'Z v for v (Q, r), from the pairs' blocks (no sparse Z'Z is built)."""
        v = np.ascontiguousarray(v, dtype=float)
        out = np.zeros_like(v)
        for pr in self.pairs:
            pair_product(out, v, pr.rows, pr.cols, pr.blocks_t, int(self.uoff[pr.j]),
                         int(self.uoff[pr.k]), pr.j != pr.k)
        return out

    @property
    def ztz(self) -> sp.csr_matrix:
        """The full symmetric Z'Z (Q×Q, CSR, the random effects in this objective's order:
        factor k, level i, column a → uoff[k] + i·q_k + a), built once from the pairs."""
        if getattr(self, "_ztz", None) is None:
            rows, cols, vals = [], [], []
            for pr in self.pairs:
                qj, qk = self.factors[pr.j].q, self.factors[pr.k].q
                n = len(pr.rows)
                ui = np.broadcast_to(self.uoff[pr.j] + pr.rows[:, None, None] * qj
                                     + np.arange(qj)[None, :, None], (n, qj, qk)).ravel()
                uk = np.broadcast_to(self.uoff[pr.k] + pr.cols[:, None, None] * qk
                                     + np.arange(qk)[None, None, :], (n, qj, qk)).ravel()
                for r, c in [(ui, uk)] + ([(uk, ui)] if pr.j != pr.k else []):
                    rows.append(r)
                    cols.append(c)
                    vals.append(pr.blocks.ravel())
            self._ztz = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                              np.concatenate(cols))),
                                      shape=(self.Q, self.Q))
        return self._ztz

    @property
    def params(self) -> list[tuple[int, int, int]]:
        """(factor, row, column) of every θ entry within its factor's T."""
        if getattr(self, "_params", None) is None:
            self._params = []
            for R, Cc in zip(self.theta_map.rows, self.theta_map.cols):
                k = int(np.searchsorted(self.toff, R, side="right") - 1)
                self._params.append((k, R - int(self.toff[k]), Cc - int(self.toff[k])))
        return self._params

    def _lam(self, Ts: list[np.ndarray], v: np.ndarray, trans: bool = False,
             out: np.ndarray | None = None) -> np.ndarray:
        """Λ v (Λ'v with `trans`) for v (Q,) or (Q, r): per level T v_i (T'v_i), into `out`
        (C-contiguous, not v) when given."""
        out = np.empty_like(v) if out is None else out
        for k, f in enumerate(self.factors):
            sl = slice(self.uoff[k], self.uoff[k + 1])
            T = Ts[k].T if trans else Ts[k]
            if v.ndim == 1:
                out[sl] = (v[sl].reshape(f.m, f.q) @ T.T).ravel()
            else:
                r = v.shape[1]  # may be 0 (no fixed effects left in a profile)
                shared_matmul(T, np.ascontiguousarray(v[sl].reshape(f.m, f.q, r)),
                              out=out[sl].reshape(f.m, f.q, r))
        return out

    def _value_and_gradient(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        f, pt, _dms, _minv, _info = self._gradient_parts(x, self.reml)
        n, p = self.stats.n, self.stats.p
        if self.reml:
            return f, pt.d_logdet_l + pt.d_logdet_rx + (n - p) / pt.r2 * pt.d_r2
        return f, pt.d_logdet_l + n / pt.r2 * pt.d_r2

    def parts(self, theta: np.ndarray):
        """log|L|², log|R_X|², r² at θ and their exact gradients (as `Objective.parts`:
        Satterthwaite's Hessian by differences of them).  Raises LinAlgError if undefined."""
        self.evaluations += 1
        self.gradient_evaluations += 1
        with np.errstate(invalid="raise", divide="raise"), self._lock:
            try:
                return self._gradient_parts(np.asarray(theta, dtype=float), True)[1]
            except (FloatingPointError, ZeroDivisionError) as exc:
                raise linalg.LinAlgError(str(exc)) from None

    def vcov_jacobian(self, theta: np.ndarray, sigma: float) -> list[np.ndarray]:
        """∂Var(β̂)/∂v_k for v = (θ, σ), Var(β̂) = σ²(R_X'R_X)⁻¹: −σ² M⁻¹ ∂M/∂θ_k M⁻¹ with
        the gradient's ∂R_X'R_X, and 2σ M⁻¹ (Satterthwaite's Jacobian in closed form)."""
        with np.errstate(invalid="raise", divide="raise"), self._lock:
            _f, _pt, dms, minv, _info = self._gradient_parts(np.asarray(theta, dtype=float),
                                                             True)
        return [-sigma**2 * minv @ dm @ minv for dm in dms] + [2 * sigma * minv]

    def value_gradient_information(self, theta: np.ndarray
                                   ) -> tuple[float, np.ndarray, np.ndarray | None]:
        """The deviance, its exact gradient and `_information` (an approximation of its
        Hessian, None where undefined) at θ, from one factorization: Newton's Hessian
        without a gradient per parameter (mlpipe/optimize.py)."""
        x = np.asarray(theta, dtype=float)
        self.evaluations += 1
        self.gradient_evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                f, pt, _dms, _minv, info = self._gradient_parts(x, self.reml, info=True)
        except (linalg.LinAlgError, FloatingPointError, ValueError, ZeroDivisionError):
            return np.inf, np.full(len(x), np.nan), None
        n, p = self.stats.n, self.stats.p
        g = (pt.d_logdet_l + pt.d_logdet_rx + (n - p) / pt.r2 * pt.d_r2 if self.reml
             else pt.d_logdet_l + n / pt.r2 * pt.d_r2)
        self.last_value = float(f) if np.isfinite(f) else self.last_value
        return f, g, info

    def _information(self, Ts: list[np.ndarray], fac, C: np.ndarray, u: np.ndarray,
                     v: np.ndarray, a: np.ndarray, minv: np.ndarray, r2: float) -> np.ndarray:
        """ASReml's average information, with σ² profiled out, as an approximation of the
        deviance's Hessian in θ (exact in expectation at the optimum; no differences).

        With V = σ²(ZΛΛ'Z' + I), P the REML projection and V_t = ∂V/∂θ_t, the average
        information is AI_tu = ½ y'P V_t P V_u P y.  For the θ entry t (entry (r, c) of
        factor k's T, E_t = ∂Λ/∂θ_t), V_t P y = Z ŵ_t, ŵ_t = E_t u + Λ E_t'v, with u the
        conditional modes and v = Z'(y − Xβ̂ − ZΛu); σ² profiled at σ̂² = r²/d:

            H ≈ (d/r²) [Ŵ'Z'Z K − Ĝ'M⁻¹Ĝ − 4 a a'/r²],   K = Ŵ − ΛA⁻¹Λ'Z'ZŴ,

        Ĝ = X'Z K, M = R_X'R_X, a_t = u'E_t'v and d = n − p (REML; n for ML, which uses
        the same projected form); Ŵ'Z'Z K = Ŵ'Z'ZŴ − Y'A⁻¹Y with Y = Λ'Z'ZŴ, and
        Ĝ = X'ZŴ − C_X'A⁻¹Y.  Its cost is, per θ entry, one product with Z'Z and one solve
        with the factorization."""
        s = self.stats
        p = s.p
        params = self.params
        nk = len(params)
        # ŵ_t is zero outside its factor's levels: kept as that slice alone, the θ entries
        # of one factor side by side (the columns of a factor with millions of levels are
        # the bulk).  Z'Z Ŵ and A⁻¹Y are computed for as many columns at a time as
        # INFO_BATCH_BYTES allows (all of them for a few thousand levels): per column of a
        # batch Y (written over the batch's Ŵ), Z'Z Ŵ (freed before the solve) and A⁻¹Y
        # with the solve's temporary; every Y is kept for y_t'A⁻¹y_u (one column each)
        by_factor: dict[int, list[int]] = {}
        for t, (k, _r, _c) in enumerate(params):
            by_factor.setdefault(k, []).append(t)
        what = {}  # factor → (its θ entries, ŵ of each on the factor's slice (m·q, entries))
        for k, ts in by_factor.items():
            sl = slice(self.uoff[k], self.uoff[k + 1])
            q = self.factors[k].q
            vk, uk = v[sl].reshape(-1, q), u[sl].reshape(-1, q)
            w = np.empty((len(vk), q, len(ts)))
            for j, t in enumerate(ts):
                _k, r, c = params[t]
                np.multiply(vk[:, r, None], Ts[k][None, :, c], out=w[:, :, j])  # Λ E_t'v
                w[:, r, j] += uk[:, c]  # + E_t u
            what[k] = (ts, w.reshape(-1, len(ts)))
        H = np.empty((nk, nk))
        yh = np.empty((nk, nk))  # y_t'A⁻¹y_u
        gx = np.empty((p, nk))  # X'Z k_t = X'Z ŵ_t − (Λ'Z'X)'A⁻¹y_t
        for k, (ts, w) in what.items():
            gx[:, ts] = (self.G[k].reshape(len(w), p + 1)[:, :p].T @ w)
        per_batch = max(1, min(nk, INFO_BATCH_BYTES // (4 * 8 * self.Q)))
        ys: list[tuple[list[int], np.ndarray]] = []
        for lo in range(0, nk, per_batch):
            batch = list(range(lo, min(nk, lo + per_batch)))
            col = np.zeros((self.Q, len(batch)))
            for k, (ts, w) in what.items():
                sl = slice(self.uoff[k], self.uoff[k + 1])
                for j, t in enumerate(batch):
                    if t in ts:
                        col[sl, j] = w[:, ts.index(t)]
            zw = self.ztz_times(col)
            for k, (ts, w) in what.items():  # ŵ'Z'Z ŵ_t
                H[ts, lo:lo + len(batch)] = w.T @ zw[self.uoff[k]:self.uoff[k + 1]]
            y = self._lam(Ts, zw, trans=True, out=col)  # Y = Λ'Z'Z Ŵ, over Ŵ
            del zw, col
            h = self._solve(fac, y)  # A⁻¹Y
            gx[:, lo:lo + len(batch)] -= C[:, :p].T @ h
            ys.append((batch, y))
            for batch2, y2 in ys:
                yh[np.ix_(batch2, batch)] = y2.T @ h
                yh[np.ix_(batch, batch2)] = yh[np.ix_(batch2, batch)].T
            del h
        H = H - yh  # ŵ'Z'Z K = ŵ'Z'Z ŵ − y'A⁻¹y
        H = (H + H.T) / 2 - gx.T @ minv @ gx - 4.0 * np.outer(a, a) / r2
        d = s.n - (p if self.reml else 0)
        H = d / r2 * H
        return (H + H.T) / 2

    def _gradient_parts(self, x: np.ndarray, with_rx: bool, info: bool = False):
        """(f, the `Parts` at θ = x (∂log|R_X|² NaN without `with_rx`), [∂R_X'R_X/∂θ_t]
        (empty without), (R_X'R_X)⁻¹, `_information` (None without `info`)).

        The latest θ's value is kept (small: vectors and p×p matrices, never written
        again): Satterthwaite's Hessian and Jacobian ask for it at θ̂, where the optimizer
        took its last gradient (~0.45 s each at 2M children nested in schools)."""
        key = (x.tobytes(), with_rx)
        last = self._last_gradient
        if not info and last is not None and last[0] == key:
            return last[1] + (None,)
        out = self._compute_gradient_parts(x, with_rx, info)
        self._last_gradient = (key, out[:4])
        return out

    def _compute_gradient_parts(self, x: np.ndarray, with_rx: bool, info: bool):
        s = self.stats
        p = s.p
        Ts = self.T_blocks(x)
        fac, C, W = self._factorize(Ts)
        logdet_l = fac.logdet
        xtx_adj, rx, beta, r2, logdet_rx = self._profile(C, W)
        f = float(self._deviance(r2, logdet_l, logdet_rx))
        if not np.isfinite(f):
            raise linalg.LinAlgError("the deviance is not finite")
        gamma = np.append(-beta, 1.0)
        u = W @ gamma  # the conditional modes
        zzl = self.ztz_times(self._lam(Ts, W))  # Z'ZΛW in one pass (Z'ZΛu = zzl γ)
        v = np.concatenate([G.reshape(-1, G.shape[2]) @ gamma for G in self.G])
        v -= zzl @ gamma  # Z'(y − Xβ̂) − Z'ZΛu
        minv = linalg.cho_solve((rx, False), np.eye(p), check_finite=False)
        oms = self.pair_omegas(fac)
        gld = [np.zeros((f_.q, f_.q)) for f_ in self.factors]
        for pr, om, blocks_t in zip(self.pairs, oms, self._blocks_t):
            dd = pair_traces(om, blocks_t)  # dd[a, b, c, d] = Σ_n Ω_n[a, b] S_n[c, d]
            Tj, Tk = Ts[pr.j], Ts[pr.k]
            # ∂/∂T_k: Σ_n (Ω_n' T_j' S_n)[c, r] = Σ_bs T_j[s, b] dd[b, c, s, r]
            gld[pr.k] += np.einsum("sb,bcsr->cr", Tj, dd)
            if pr.j != pr.k:  # ∂/∂T_j: Σ_n (Ω_n T_k' S_n')[c, r] = Σ_bs T_k[s, b] dd[c, b, r, s]
                gld[pr.j] += np.einsum("sb,cbrs->cr", Tk, dd)
        # per factor, the sums over its levels every θ entry of it needs, as three products
        # of (levels × q·(p+1)) blocks: uv[c, r] = Σ_i u_ic v_ir; GW[r, :, c, :] =
        # Σ_i G_i[r]' W_i[c] (F's X'·W_X part); WY[c, :, r, :] = Σ_i W_i[c]' (Z'ZΛW)_i[r]
        sums = []
        for k, fk in enumerate(self.factors):
            sl = slice(self.uoff[k], self.uoff[k + 1])
            m, q = fk.m, fk.q
            uv = u[sl].reshape(m, q).T @ v[sl].reshape(m, q)
            GW = WY = None
            if with_rx:
                Wk = W[sl].reshape(m, q * (p + 1))
                GW = (self.G[k].reshape(m, q * (p + 1)).T @ Wk).reshape(q, p + 1, q, p + 1)
                WY = (Wk.T @ zzl[sl].reshape(m, q * (p + 1))).reshape(q, p + 1, q, p + 1)
            sums.append((uv, GW, WY))
        k_all = len(x)
        g_r2, g_ld = np.empty(k_all), np.empty(k_all)
        g_rx = np.full(k_all, np.nan)
        dms = []
        for t, (k, r, c) in enumerate(self.params):
            uv, GW, WY = sums[k]
            g_r2[t] = -2.0 * float(uv[c, r])
            g_ld[t] = 2.0 * gld[k][c, r]
            if with_rx:
                F = GW[r, :p, c, :p]  # Σ_i (Z'X)_i[r]' (W_X)_i[c]
                Gm = WY[c, :p, r, :p]  # Σ_i (W_X)_i[c]' (Z'ZΛW_X)_i[r]
                dM = -(F + F.T - Gm - Gm.T)
                dms.append(dM)
                g_rx[t] = float(np.sum(minv * dM))
        H = None
        if info:  # the gradient's (Q, ·) temporaries freed first: the information's room
            del zzl, oms, om
            fac.forget_omega()  # recomputed if asked for again (the results' at θ̂: once)
            H = self._information(Ts, fac, C, u, v, -g_r2 / 2, minv, r2)
        return f, Parts(logdet_l, logdet_rx, r2, g_ld, g_rx, g_r2), dms, minv, H

    def moment_start(self) -> np.ndarray | None:
        """A cheap starting θ; `optimize` keeps it only when it beats lme4's default start.

        Random intercepts only: the joint method-of-moments estimate of all the factors'
        variances (mlpipe/moments.py, Gao & Owen's U-statistics), θ_k = σ_k / σ (floored at
        0.01, off the boundary).  Otherwise, for every factor alone, the moment estimate of
        a one-factor model on its levels (the cell statistics summed by level,
        `Objective.moment_start`): each ignores the others — an inner factor's variance
        inflates an outer one's — but it puts every block at its scale.  Each one-factor
        model's residual variance holds the other factors' variances too (a crossed factor's
        wholly), so every block is put relative to the smallest of them (θ_k σ_k / σ_min):
        the variances stay as each model estimated them, on one residual scale."""
        from dataclasses import replace

        from .objective import Objective

        self._last_factorization = None  # not held beside the moment sums' temporaries
        s = self.stats
        if all(f.names == ["(Intercept)"] for f in self.factors) and not s.weights \
                and s.residual is None:
            from .moments import MomentStatistics, moment_estimates

            try:
                ms = MomentStatistics.from_statistics(s)
                est = moment_estimates(ms)["sigma2"]
            except (np.linalg.LinAlgError, ValueError, MlpipeError):
                est = None
            if est is not None and est[-1] > 0:
                by_name = {f.name: np.sqrt(v / est[-1]) for f, v in zip(ms.factors, est)}
                theta = np.array([max(by_name[f.name], 0.01) for f in self.factors])
                if np.all(np.isfinite(theta)) and len(theta) == len(self.theta_map):
                    return theta
        parts = []
        for f in self.factors:
            def by_level(a: np.ndarray) -> np.ndarray:
                flat = a.reshape(-1, a.shape[-1])
                out = np.stack([np.bincount(f.index, r, minlength=f.m) for r in flat])
                return out.reshape(a.shape[:-1] + (f.m,))

            z = np.asarray(f.z)
            one = replace(s, random_names=list(f.names), blocks=list(f.blocks),
                          group=f.name, levels=f.levels, n_i=by_level(s.n_i[None])[0],
                          ztz=by_level(s.ztz[z][:, z]), ztx=by_level(s.ztx[z]),
                          zty=by_level(s.zty[z]), yty_i=by_level(s.yty_i[None])[0],
                          factors=[])
            est = Objective(one, reml=self.reml).moment_estimate()
            if est is None:
                return None
            parts.append(est)
        smallest = min(s2 for _th, s2 in parts)
        theta = np.concatenate([th * np.sqrt(s2 / smallest) for th, s2 in parts])
        return self._less_outer_factors(theta) if len(theta) == len(self.theta_map) else None

    def _less_outer_factors(self, theta: np.ndarray) -> np.ndarray:
        """The one-factor moment start of a factor nested in others holds their variances
        too (its levels' means carry the outer levels' effects): from each factor's
        covariance subtract those of the factors it is nested in (read off the data), on
        the terms they share, outermost factor first; `ThetaMap.from_covariance` keeps
        the result positive definite.  Crossed factors are left as they are."""
        Ts = self.T_blocks(theta)
        covs = [T @ T.T for T in Ts]
        outer: dict[int, list[int]] = {k: [] for k in range(len(covs))}
        for pr in self.pairs:  # (a factor with as many levels is the same partition)
            if self._nested(pr) and self.factors[pr.j].m < self.factors[pr.k].m:
                outer[pr.k].append(pr.j)
        if not any(outer.values()):
            return theta
        rel = np.zeros((int(self.toff[-1]),) * 2)
        for k in reversed(range(len(covs))):  # fewest levels first: outer before inner
            names = self.factors[k].names
            for j in outer[k]:
                nj = self.factors[j].names
                mine = [a for a, n in enumerate(names) if n in nj]  # the shared terms
                theirs = [int(self.toff[j]) + nj.index(names[a]) for a in mine]
                covs[k][np.ix_(mine, mine)] -= rel[np.ix_(theirs, theirs)]
            sl = slice(int(self.toff[k]), int(self.toff[k + 1]))
            rel[sl, sl] = covs[k]
        return self.theta_map.from_covariance(rel)

    # ------------------------------------------------------------------ conditional modes
    def conditional_modes(self, dec: BlockedDecomposition, sigma: float) -> list[dict]:
        """Per factor (sorted order): b = Λ u as (m, q), and the conditional SDs
        sqrt(diag(σ² T (Λ'Z'ZΛ + I)⁻¹_ii T')) per level, the diagonal blocks of the inverse
        from the two-stage factorization (`pair_omegas`)."""
        oms = self.pair_omegas(dec.solver)
        diag = {pr.j: om for pr, om in zip(self.pairs, oms) if pr.j == pr.k}
        out = []
        for k, f in enumerate(self.factors):
            q, m = f.q, f.m
            T = dec.T[k]
            u = dec.u[self.uoff[k]:self.uoff[k + 1]].reshape(m, q)
            b = u @ T.T
            om = diag[k]  # (q, q, m): the diagonal blocks of Ω, level last
            var = np.zeros((q, m))  # diag(T Ω_i T')[a] = Σ_cd T[a, c] T[a, d] Ω_i[c, d]
            for a in range(q):
                for c in range(q):
                    for d in range(q):
                        if T[a, c] * T[a, d] != 0.0:
                            var[a] += (T[a, c] * T[a, d]) * om[c, d]
            sd = sigma * np.sqrt(np.clip(var.T, 0, None))
            out.append({"factor": f, "b": b, "cond_sd": sd})
        return out
