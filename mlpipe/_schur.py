"""The per-θ factorization of Λ'Z'ZΛ + I for several grouping factors, by structure.

The random effects are ordered factor by factor, the factor with most levels first (lme4's
order).  Its diagonal block is block-diagonal — one q₁×q₁ block per level — so it is
eliminated first, batched over its levels with elementwise small-matrix algebra (no LAPACK
call per level):

    A = [ D₁  B' ]      D₁ = L₁L₁' (per level),  B̃ = B L₁⁻ᵀ  (one block per shared cell),
        [ B   E  ]      S  = E − B̃B̃'            (the Schur complement onto the other factors)

S is accumulated from the per-level outer products B̃ᵢB̃ᵢ' (Σᵢ kᵢ² terms, kᵢ the entries of
level i in B: one parent level per factor for nested designs, the crossed levels it meets
otherwise) by compiled kernels, in place (dense: tile by tile of S, in parallel; sparse:
into the slots of its fixed pattern).  S is then factored densely (LAPACK) when it is small — the
crossed case: the filled block of the factors with fewer levels — or as a sparse LDL'
(QDLDL, fill-reducing ordering computed once) when it is large and sparse — the nested case,
where S keeps the tree's block structure.  Solves, log-determinants and the entries of
A⁻¹ that the gradient and the conditional variances need (on the pattern of Z'Z: the
diagonal blocks of every factor and the blocks between levels that share cells) follow
from the two stages: with Ω = A⁻¹,

    Ω₂₂ = S⁻¹,   Ω₂₁ = −S⁻¹ B̃ L₁⁻¹,   Ω₁₁,ᵢ = L₁ᵢ⁻ᵀ (I + B̃ᵢ'S⁻¹B̃ᵢ) L₁ᵢ⁻¹

(S⁻¹ dense, or its selected inverse on the pattern of its factor: `_selinv`).
"""

from __future__ import annotations

import numpy as np
import qdldl
from numba import njit, prange
from scipy import linalg

from ._lazy import lazy_import
from ._levels import scale_blocks
from ._levels_jit import (PARALLEL, congruence, lead_factor, level_matmul, level_order,
                          pair_levels)
from ._selinv import _z

sp = lazy_import("scipy.sparse")  # imported when first needed (a fast start)

#: a Schur complement up to this order is factored densely (8000² doubles = 512 MB) when
#: it is filled enough; up to DENSE_SMALL always
DENSE_MAX = 8000
DENSE_SMALL = 500
#: the dense Schur update and Ω₂₂'s products run tile by tile of S (256² doubles = 512 KB:
#: one tile stays in a core's L2 cache)
TILE = 256
_NO_POS = np.zeros(0, np.int64)


# ---------------------------------------------------------------------- compiled kernels
# The Schur update and the Ω₂₁ entries loop over the levels of the leading factor and, per
# level, over the pairs of its entries in B (Σᵢ kᵢ² of them): no (pair) index arrays.

@njit(cache=True)
def _dense_fill(S, r_row, r_col, r_off, ev):
    """The lower triangle of S's own part E + I, in place (S zero on entry)."""
    for t in range(len(ev)):
        if r_off[t] or r_row[t] >= r_col[t]:  # off pairs hold their lower blocks only
            S[r_row[t], r_col[t]] += ev[t]
    for r in range(S.shape[0]):
        S[r, r] += 1.0


@njit(parallel=True, cache=True)
def _dense_update(S, rows_lv, cut, Bv_lv, tile_i, tile_j):
    """S −= B̃B̃' on its lower triangle, tile by tile: tile pair (I, J) = (tile_i[p],
    tile_j[p]), I ≥ J, takes every level's pairs of entries with rows in tile I and tile J
    (`cut[i, I]` the first entry of level i with a row in tile I or later), so the S tile
    stays in cache while the levels stream by; tiles are disjoint, one thread each.
    (q1 = 1 and 2 spelled out: 1.2–1.4x faster than the general loop over c, measured.)"""
    q1 = Bv_lv.shape[1]
    for p in prange(len(tile_i)):
        ti, tj = tile_i[p], tile_j[p]
        for i in range(cut.shape[0]):
            b0, b1 = cut[i, tj], cut[i, tj + 1]
            if b0 == b1:
                continue
            for a in range(cut[i, ti], cut[i, ti + 1]):
                s_row = S[rows_lv[a]]
                stop = a + 1 if ti == tj else b1  # rows ascend: b ≤ a within a tile
                if q1 == 1:
                    x0 = Bv_lv[a, 0]
                    for b in range(b0, stop):
                        s_row[rows_lv[b]] -= x0 * Bv_lv[b, 0]
                elif q1 == 2:
                    x0, x1 = Bv_lv[a, 0], Bv_lv[a, 1]
                    for b in range(b0, stop):
                        s_row[rows_lv[b]] -= x0 * Bv_lv[b, 0] + x1 * Bv_lv[b, 1]
                else:
                    for b in range(b0, stop):
                        acc = 0.0
                        for c in range(q1):
                            acc += Bv_lv[a, c] * Bv_lv[b, c]
                        s_row[rows_lv[b]] -= acc


@njit(parallel=True, cache=True)
def _scaled_entries(out, blocks_t, cols, Tj, T0, Li, pos, base):
    """B̃'s entries of one pair (factor j with the leading one): block n, row a →
    out[pos[base + n·q_j + a]] = (T_j' B_n T_0 L⁻ᵀ_{cols[n]})[a] (level order; `pos`
    empty: the entry order is the level order)."""
    qj, q1, n = blocks_t.shape
    if qj == 2 and q1 == 2:  # spelled out (scalars in registers): ~5x the loops below
        t00, t01, t10, t11 = T0[0, 0], T0[0, 1], T0[1, 0], T0[1, 1]
        j00, j01, j10, j11 = Tj[0, 0], Tj[0, 1], Tj[1, 0], Tj[1, 1]
        for t in prange(n):
            i = cols[t]
            b00, b01, b10, b11 = (blocks_t[0, 0, t], blocks_t[0, 1, t], blocks_t[1, 0, t],
                                  blocks_t[1, 1, t])
            bt00, bt01 = b00 * t00 + b01 * t10, b00 * t01 + b01 * t11  # B T0
            bt10, bt11 = b10 * t00 + b11 * t10, b10 * t01 + b11 * t11
            m00, m01 = j00 * bt00 + j10 * bt10, j00 * bt01 + j10 * bt11  # T_j' (B T0)
            m10, m11 = j01 * bt00 + j11 * bt10, j01 * bt01 + j11 * bt11
            l00, l10, l11 = Li[i, 0, 0], Li[i, 1, 0], Li[i, 1, 1]
            r0 = pos[base + t * 2] if len(pos) else base + t * 2
            r1 = pos[base + t * 2 + 1] if len(pos) else base + t * 2 + 1
            out[r0, 0] = m00 * l00  # (·) L⁻ᵀ
            out[r0, 1] = m00 * l10 + m01 * l11
            out[r1, 0] = m10 * l00
            out[r1, 1] = m10 * l10 + m11 * l11
        return
    nch = min(n, 256)  # chunks of blocks in parallel (each writes its own rows of out)
    for ch in prange(nch):
        M = np.empty((qj, q1))
        BT = np.empty((qj, q1))
        for t in range(ch * n // nch, (ch + 1) * n // nch):
            i = cols[t]
            congruence(blocks_t, t, Tj, T0, BT, M)  # T_j' B T0
            for a in range(qj):  # (·) L⁻ᵀ: (L⁻ᵀ)[d, c] = L⁻¹[c, d], d ≤ c
                row = pos[base + t * qj + a] if len(pos) else base + t * qj + a
                for c in range(q1):
                    acc = 0.0
                    for d in range(c + 1):
                        acc += M[a, d] * Li[i, c, d]
                    out[row, c] = acc


@njit(cache=True)
def _b_apply(rest, lead, rows_lv, lv_starts, Bv_lv):
    """The leading factor's solve through B̃, in place: rest (R, r) −= B̃ lead (lead
    (m1, q1, r), level first; a scatter onto the rest rows, in order)."""
    q1, r = lead.shape[1], lead.shape[2]
    if q1 == 2:  # spelled out: ~2x faster than the loops below
        for i in range(len(lv_starts) - 1):
            for a in range(lv_starts[i], lv_starts[i + 1]):
                ra = rows_lv[a]
                w0, w1 = Bv_lv[a, 0], Bv_lv[a, 1]
                for s in range(r):
                    rest[ra, s] -= w0 * lead[i, 0, s] + w1 * lead[i, 1, s]
        return
    for i in range(len(lv_starts) - 1):
        for a in range(lv_starts[i], lv_starts[i + 1]):
            ra = rows_lv[a]
            for c in range(q1):
                w = Bv_lv[a, c]
                for s in range(r):
                    rest[ra, s] -= w * lead[i, c, s]


@njit(parallel=True, cache=True)
def _b_apply_t(rest, lead, rows_lv, lv_starts, Bv_lv):
    """lead (m1, q1, r) −= B̃' rest, in place: levels in parallel (each its own rows)."""
    q1, r = lead.shape[1], lead.shape[2]
    for i in prange(len(lv_starts) - 1):
        for a in range(lv_starts[i], lv_starts[i + 1]):
            ra = rows_lv[a]
            for c in range(q1):
                w = Bv_lv[a, c]
                for s in range(r):
                    lead[i, c, s] -= w * rest[ra, s]


@njit(parallel=True, cache=True)
def _omega_levels(Li, lv_starts, Bv_lv, H_lv):
    """Per level i of the leading factor: Ω₁₁,ᵢ = L⁻ᵀ (I + Σ_a B̃_a H_a') L⁻¹ (Li = L⁻¹
    (m1, q1, q1), level first), returned (q1, q1, m1), and Ω₂₁ at its entries a, −H_a L⁻¹,
    written over H_lv (entries, q1; level order) in place.  Levels in parallel, in chunks
    (each writes its own level's blocks and entries)."""
    m1, q1, _ = Li.shape
    om11 = np.empty((q1, q1, m1))
    if q1 == 2:  # spelled out (scalars in registers): ~7x faster than the loops below
        for i in prange(m1):
            k00, k01, k10, k11 = 1.0, 0.0, 0.0, 1.0
            l00, l10, l11 = Li[i, 0, 0], Li[i, 1, 0], Li[i, 1, 1]
            for e in range(lv_starts[i], lv_starts[i + 1]):
                b0, b1, h0, h1 = Bv_lv[e, 0], Bv_lv[e, 1], H_lv[e, 0], H_lv[e, 1]
                k00 += b0 * h0
                k01 += b0 * h1
                k10 += b1 * h0
                k11 += b1 * h1
                H_lv[e, 0] = -(h0 * l00 + h1 * l10)
                H_lv[e, 1] = -(h1 * l11)
            a00, a01 = l00 * k00 + l10 * k10, l00 * k01 + l10 * k11  # L⁻ᵀ K
            a10, a11 = l11 * k10, l11 * k11
            om11[0, 0, i] = a00 * l00 + a01 * l10  # (L⁻ᵀ K) L⁻¹
            om11[0, 1, i] = a01 * l11
            om11[1, 0, i] = a10 * l00 + a11 * l10
            om11[1, 1, i] = a11 * l11
        return om11
    nch = min(m1, 256)
    for ch in prange(nch):
        K = np.empty((q1, q1))
        LK = np.empty((q1, q1))
        for i in range(ch * m1 // nch, (ch + 1) * m1 // nch):
            for a in range(q1):
                for b in range(q1):
                    K[a, b] = 1.0 if a == b else 0.0
            for e in range(lv_starts[i], lv_starts[i + 1]):
                for a in range(q1):
                    w = Bv_lv[e, a]
                    for b in range(q1):
                        K[a, b] += w * H_lv[e, b]
                for d in range(q1):  # (−H L⁻¹)[d] = −Σ_c H[c] L⁻¹[c, d], L⁻¹ lower: c ≥ d
                    acc = 0.0
                    for c in range(d, q1):
                        acc += H_lv[e, c] * Li[i, c, d]
                    H_lv[e, d] = -acc  # in place: the later d' > d read only H[e, c ≥ d']
            for a in range(q1):  # LK = L⁻ᵀ K: (L⁻ᵀ)[a, b] = L⁻¹[b, a], nonzero for b ≥ a
                for c in range(q1):
                    acc = 0.0
                    for b in range(a, q1):
                        acc += Li[i, b, a] * K[b, c]
                    LK[a, c] = acc
            for a in range(q1):  # (L⁻ᵀ K) L⁻¹: L⁻¹[c, d] nonzero for c ≥ d
                for d in range(q1):
                    acc = 0.0
                    for c in range(d, q1):
                        acc += LK[a, c] * Li[i, c, d]
                    om11[a, d, i] = acc
    return om11


@njit(cache=True)
def _symmetrize_lower(M):
    for i in range(M.shape[0]):
        for j in range(i):
            M[j, i] = M[i, j]


@njit(parallel=True, cache=True)
def _dense_h(inv, rows_lv, cut, lv_starts, Bv_lv, H_lv):
    """H[a] = Σ_b Ω₂₂[row a, row b] B̃[b] over the entries b of a's level (level order),
    Ω₂₂ whole (symmetric): one thread per tile I of a's rows (the H rows in it written by
    that thread only; Ω₂₂'s rows of the tile stay in cache while the levels stream by).
    q1 = 1 and 2 keep their sums in registers: 2x faster than the general loop, which
    accumulates in H (a local accumulator array was slower still)."""
    q1 = Bv_lv.shape[1]
    for ti in prange(cut.shape[1] - 1):
        for i in range(cut.shape[0]):
            b0, b1 = lv_starts[i], lv_starts[i + 1]
            for a in range(cut[i, ti], cut[i, ti + 1]):
                row = inv[rows_lv[a]]
                if q1 == 1:
                    h0 = 0.0
                    for b in range(b0, b1):
                        h0 += row[rows_lv[b]] * Bv_lv[b, 0]
                    H_lv[a, 0] += h0
                elif q1 == 2:
                    h0, h1 = 0.0, 0.0
                    for b in range(b0, b1):
                        w = row[rows_lv[b]]
                        h0 += w * Bv_lv[b, 0]
                        h1 += w * Bv_lv[b, 1]
                    H_lv[a, 0] += h0
                    H_lv[a, 1] += h1
                else:
                    for b in range(b0, b1):
                        w = row[rows_lv[b]]
                        for c in range(q1):
                            H_lv[a, c] += w * Bv_lv[b, c]


def tile_cuts(rows_lv: np.ndarray, lv_starts: np.ndarray, order: int, tile: int
              ) -> np.ndarray:
    """(levels, tiles + 1): the first entry of each level whose row lies in tile t or a
    later one (rows ascend within a level; the last column is the level's end)."""
    nt = max(1, -(-order // tile))
    level = np.repeat(np.arange(len(lv_starts) - 1, dtype=np.int64), np.diff(lv_starts))
    keys = level * (nt + 1) + rows_lv // tile  # ascending: by level, then tile
    want = (np.arange(len(lv_starts) - 1, dtype=np.int64)[:, None] * (nt + 1)
            + np.arange(nt + 1, dtype=np.int64)[None, :])
    return np.searchsorted(keys, want).astype(np.int64)


@njit(cache=True)
def _pair_keys(rows_lv, lv_starts, R):
    """lo·R + hi of every pair of entries of a level (each unordered pair once, with
    itself): the upper-triangle positions of S that the update fills."""
    n = 0
    for i in range(len(lv_starts) - 1):
        k = lv_starts[i + 1] - lv_starts[i]
        n += k * (k + 1) // 2
    out = np.empty(n, dtype=np.int64)
    t = 0
    for i in range(len(lv_starts) - 1):
        for a in range(lv_starts[i], lv_starts[i + 1]):
            for b in range(lv_starts[i], a + 1):  # rows ascend: rows_lv[b] ≤ rows_lv[a]
                out[t] = rows_lv[b] * R + rows_lv[a]
                t += 1
    return out


@njit(cache=True)
def _sparse_fill(data, fill_pos, lv_starts, Bv_lv):
    """data −= the update B̃B̃' on the upper triangle of S (CSC data): the term of entries
    (a, b ≤ a) of a level, in `_pair_keys`' order, lands at data[fill_pos[t]]."""
    q1 = Bv_lv.shape[1]
    t = 0
    for i in range(len(lv_starts) - 1):
        for a in range(lv_starts[i], lv_starts[i + 1]):
            for b in range(lv_starts[i], a + 1):
                acc = 0.0
                for c in range(q1):
                    acc += Bv_lv[a, c] * Bv_lv[b, c]
                data[fill_pos[t]] -= acc
                t += 1


@njit(parallel=True, cache=True)
def _sparse_h(indptr, indices, zdata, zdiag, pos, rows_lv, lv_starts, Bv_lv, H_lv):
    """As `_dense_h`, with Ω₂₂ the selected inverse (on the pattern of the factor, which
    holds every pair of rows a level's entries share); levels in parallel (each writes
    its own entries)."""
    q1 = Bv_lv.shape[1]
    for i in prange(len(lv_starts) - 1):
        for a in range(lv_starts[i], lv_starts[i + 1]):
            pa = pos[rows_lv[a]]
            w = zdiag[pa]
            for c in range(q1):
                H_lv[a, c] += w * Bv_lv[a, c]
            for b in range(lv_starts[i], a):
                w = _z(indptr, indices, zdata, zdiag, pa, pos[rows_lv[b]])
                for c in range(q1):
                    H_lv[a, c] += w * Bv_lv[b, c]
                    H_lv[b, c] += w * Bv_lv[a, c]


def use_dense(order: int, entries: int) -> bool:
    """Factor the Schur complement densely when it is small, or filled: its entries (an
    upper bound: the update terms plus its own blocks) reach a tenth of order²."""
    return order <= DENSE_SMALL or (order <= DENSE_MAX and entries >= 0.1 * order * order)


#: above this average number of off-diagonal entries per row of S, its sparse LDL' factor is
#: taken as filled (see `factor_entries`)
FILL_DEGREE = 64


def factor_entries(order: int, pattern: int) -> int:
    """The entries of S's sparse LDL' factor, estimated before any ordering is computed:
    the pattern's when S is sparse in the nested way (levels of the rest linked along a tree:
    a few entries per row, and a fill-reducing ordering adds little), the whole triangle when
    the rows average more than FILL_DEGREE entries — crossed factors link the rest's levels
    like a random graph, whose factor fills in almost completely whatever the ordering (the
    pattern alone would under-count it by orders of magnitude: 84,000 items linked by
    200,000 users' 4M ratings, a pattern of 74M entries, factor to ~3.5e9)."""
    full = order * (order + 1) // 2
    if 2 * max(pattern - order, 0) > FILL_DEGREE * order:
        return full
    return min(pattern, full)


def _distinct_terms(qs: list[int], ms: list[int], pairs: list[tuple], k: np.ndarray) -> int:
    """Σ kᵢ(kᵢ + 1)/2 (the upper triangle of each level's update block) over the levels of
    factor 0 with distinct sets of rest levels: an upper bound of the update's distinct
    positions in S, tight when the structure is nested (every child of a school fills the
    same school block: 2M children give 8M update terms but 20k blocks).
    Levels are told apart by a random 64-bit hash of their set of rest levels."""
    off = np.cumsum([0] + [int(m) for m in ms[1:]])
    salt = np.random.default_rng(0x5C4E).integers(1, 2**63, size=max(int(off[-1]), 1),
                                                  dtype=np.uint64)
    h = np.zeros(ms[0], np.uint64)
    for j, kk, rows, cols, _b in pairs:
        if kk == 0 and j != 0:
            order = level_order(np.asarray(cols, np.int64), ms[0])
            c, vals = np.asarray(cols)[order], salt[off[j - 1] + np.asarray(rows)[order]]
            if len(c):
                starts = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
                h[c[starts]] += np.add.reduceat(vals, starts)  # uint64: wraps around
    _, first = np.unique(h, return_index=True)
    kd = k[first].astype(np.int64)
    return int(np.sum(kd * kd + kd) // 2)


def estimate(qs: list[int], ms: list[int], pairs: list[tuple]) -> dict:
    """The solver's size before anything is built: the order R of the Schur complement,
    the Σᵢ kᵢ² terms of its update, whether it is factored densely, and the bytes of the
    arrays this takes (the update's index and value arrays, the dense or sparse factor)."""
    R = int(sum(m * q for m, q in zip(ms[1:], qs[1:])))
    k = np.zeros(ms[0])
    for j, kk, _rows, cols, _b in pairs:
        if kk == 0 and j != 0:
            k += qs[j] * np.bincount(cols, minlength=ms[0])
    triplets = int(np.sum(k.astype(np.int64) ** 2))
    distinct = _distinct_terms(qs, ms, pairs, k)
    own = sum(b.size for j, kk, _r, _c, b in pairs if kk > 0)  # the rest's own blocks
    dense = use_dense(R, triplets + own)
    # per entry of B: its row, level and place in level order, B̃, H and Ω₂₁ (q₁ each)
    entries = int(k.sum()) * (24 + 24 * qs[0])
    if dense:  # S, its factor and its inverse; the update runs in place (no index arrays)
        stage2 = 8 * 3 * R * R
    else:  # the pattern's keys with their counting sorts' temporaries (~48 bytes a key,
        # at the build), the update terms' places in S (4 bytes each, kept), the upper
        # triangle of S (at most each level's pairs of entries, the own blocks and the
        # diagonal) and its factor
        half = (triplets + int(k.sum())) // 2
        pattern = distinct + own + R
        stage2 = 52 * half + 32 * factor_entries(R, pattern)
    return {"order": R, "update_terms": triplets, "dense": dense,
            "bytes": int(entries + stage2)}


class Structure:
    """What the factorization needs from the pairs of factors, computed once.

    `pairs[t]` = (j, k, rows, cols, blocks_t): level pairs of factors j ≥ k sharing cells and
    their summed Z_j'Z_k blocks "pair last" (q_j, q_k, n).  Factor 0 is the leading one.
    """

    def __init__(self, qs: list[int], ms: list[int], pairs: list[tuple]):
        self.qs, self.ms = qs, ms
        self.q1, self.m1 = qs[0], ms[0]
        self.pairs = pairs
        self.roff = np.concatenate([[0], np.cumsum([m * q for m, q in zip(ms[1:], qs[1:])])]
                                   ).astype(np.int64)  # rest offsets per factor (1..)
        self.R = int(self.roff[-1])
        # entries of B: one per (pair n, row a of its q_j): the rest row and the level of 0
        e_row, e_level, e_pair = [], [], []
        for t, (j, k, rows, cols, _b) in enumerate(pairs):
            if k != 0 or j == 0:
                continue
            qj = qs[j]
            e_row.append((self.roff[j - 1] + rows[:, None] * qj + np.arange(qj)[None]).ravel())
            e_level.append(np.repeat(cols, qj))
            e_pair.append(t)
        self.b_pairs = e_pair
        e_row = np.concatenate(e_row) if e_row else np.zeros(0, np.int64)
        self.n_entries = len(e_row)
        e_level = np.concatenate(e_level) if e_level else np.zeros(0, np.int64)
        # the entries grouped by level (the compiled kernels' loops); Σᵢ kᵢ² update terms
        lv_order = level_order(e_level, self.m1)
        counts = np.bincount(e_level, minlength=self.m1)
        self.lv_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # entry → its place in level order; None when that is the entry order (one pair
        # with the leading factor, its blocks sorted by the leading factor's level)
        self.lv_pos, self.rows_lv = None, e_row
        if np.any(lv_order != np.arange(len(lv_order))):
            self.lv_pos = np.empty(len(lv_order), np.int64)
            self.lv_pos[lv_order] = np.arange(len(lv_order))
            self.rows_lv = e_row[lv_order]
        # the kernels visit each pair of a level's entries once, the lower one second: the
        # rows must ascend within every level (entries are made in row order, sorted stably)
        step = np.diff(self.rows_lv)
        new_level = np.zeros(len(step), bool)
        firsts = self.lv_starts[1:-1]
        new_level[firsts[(firsts > 0) & (firsts < len(self.rows_lv))] - 1] = True
        assert np.all((step > 0) | new_level), "entries out of row order within a level"
        self.n_triplets = int(np.sum(counts.astype(np.int64) ** 2))
        self.dense = use_dense(self.R, self.n_triplets + int(sum(
            b.size for j, k, _r, _c, b in pairs if k > 0)))
        # the rest's own blocks (pairs with k ≥ 1): rows/cols in rest indices
        r_rows, r_cols, r_off, self.r_pairs = [], [], [], []
        for t, (j, k, rows, cols, _b) in enumerate(pairs):
            if k == 0:
                continue
            qj, qk = qs[j], qs[k]
            rr = self.roff[j - 1] + rows[:, None, None] * qj + np.arange(qj)[None, :, None]
            cc = self.roff[k - 1] + cols[:, None, None] * qk + np.arange(qk)[None, None, :]
            rr, cc = np.broadcast_arrays(rr, cc)
            # "pair last" value order (a, b, n) as scale_blocks returns
            r_rows.append(np.moveaxis(rr, 0, -1).ravel())
            r_cols.append(np.moveaxis(cc, 0, -1).ravel())
            r_off.append(np.full(rr.size, j != k))
            self.r_pairs.append(t)
        self.r_row = np.concatenate(r_rows) if r_rows else np.zeros(0, np.int64)
        self.r_col = np.concatenate(r_cols) if r_cols else np.zeros(0, np.int64)
        self.r_off = np.concatenate(r_off) if r_off else np.zeros(0, bool)
        if self.dense:  # the tiles of S the dense kernels run over (lower pairs I ≥ J)
            self.cut = tile_cuts(self.rows_lv, self.lv_starts, self.R, TILE)
            ti, tj = np.tril_indices(self.cut.shape[1] - 1)
            self.tile_i, self.tile_j = ti.astype(np.int64), tj.astype(np.int64)
        else:
            self._sparse_pattern()

    def _sparse_pattern(self) -> None:
        """The upper-triangle pattern of S (its own blocks ∪ the update's fill ∪ the
        diagonal) as a CSC matrix with sorted rows, and the slots of the own blocks."""
        R = self.R
        lo = np.minimum(self.r_row, self.r_col)
        hi = np.maximum(self.r_row, self.r_col)
        own = lo * R + hi
        fill = _pair_keys(self.rows_lv, self.lv_starts, R)  # in `_sparse_fill`'s order
        keys = np.concatenate([own, fill, np.arange(R, dtype=np.int64) * (R + 1)])
        del fill
        # the distinct keys, sorted, and every key's slot: two counting sorts over (lo, hi)
        # (np.unique sorted the ~6M keys of a 2M-level nested panel by comparison: 0.5 s)
        ulo, uhi, slots = pair_levels(keys // R, keys % R, R, R)
        del keys
        n_own = len(own)
        self.s_slot_r = slots[:n_own]
        self.s_slot_d = slots[len(slots) - R:]
        # the rest's blocks are stored once per pair (j ≥ k), an off-diagonal block entry
        # (row > col) lands in the upper triangle once; a diagonal-pair entry appears at
        # (a, b) and (b, a): keep only one of the two (and the diagonal once)
        self.r_keep = (self.r_row <= self.r_col) | self.r_off
        self.n_slots = len(ulo)
        slot = np.arange(1, len(ulo) + 1, dtype=float)
        mat = sp.csc_matrix((slot, (ulo, uhi)), shape=(R, R))
        mat.sort_indices()
        self.csc_order = mat.data.astype(np.int64) - 1
        self.csc_indptr = mat.indptr.astype(np.int64)
        self.csc_indices = mat.indices.astype(np.int64)
        # the update's terms' places in S's CSC data, once (no search per term and θ)
        csc_pos = np.empty(len(ulo), np.int64)
        csc_pos[self.csc_order] = np.arange(len(ulo))
        small = np.int32 if len(ulo) < 2**31 else np.int64
        self.fill_pos = csc_pos[slots[n_own:len(slots) - R]].astype(small)
        self.mat = mat


class Factorization:
    """Λ'Z'ZΛ + I at one θ, factored in two stages (see the module docstring)."""

    def __init__(self, st: Structure, Ts: list[np.ndarray]):
        self.st = st
        q1 = st.q1
        j0, k0, _r0, _c0, d1 = st.pairs[0]
        assert j0 == 0 and k0 == 0
        T0 = np.ascontiguousarray(Ts[0], dtype=float)
        # per level L L' = T'S T + I: L⁻¹ level first (m1, q1, q1) and Σ log|L|²
        self.Li, self.logdet = lead_factor(d1, T0)
        # B̃'s entries in level order: Bv[e, c] = (T_j' B_n T_1 L1⁻ᵀ)[a, c]
        self.Bv_lv = np.empty((st.n_entries, q1))
        base = 0
        for t in st.b_pairs:
            j, _k, _rows, cols, bt = st.pairs[t]
            with PARALLEL:
                _scaled_entries(self.Bv_lv, bt, cols, np.ascontiguousarray(Ts[j], dtype=float),
                                T0, self.Li, _NO_POS if st.lv_pos is None else st.lv_pos, base)
            base += bt.shape[0] * bt.shape[2]
        self._stage2(Ts)

    # ------------------------------------------------------------------ stage 2
    def _rest_values(self, Ts: list[np.ndarray]) -> np.ndarray:
        st = self.st
        vals = [scale_blocks(st.pairs[t][4], Ts[st.pairs[t][0]], Ts[st.pairs[t][1]]).ravel()
                for t in st.r_pairs]
        return np.concatenate(vals) if vals else np.zeros(0)

    def _stage2(self, Ts: list[np.ndarray]) -> None:
        st = self.st
        R = st.R
        if R == 0:
            return
        ev = self._rest_values(Ts)
        if st.dense:
            S = np.zeros((R, R))
            _dense_fill(S, st.r_row, st.r_col, st.r_off, ev)
            if st.n_entries:
                with PARALLEL:
                    _dense_update(S, st.rows_lv, st.cut, self.Bv_lv, st.tile_i, st.tile_j)
            self.S_chol = linalg.cholesky(S, lower=True, overwrite_a=True, check_finite=False)
            self.logdet += 2.0 * float(np.sum(np.log(np.diag(self.S_chol))))
            return
        vals = np.bincount(st.s_slot_r[st.r_keep], ev[st.r_keep], minlength=st.n_slots)
        vals += np.bincount(st.s_slot_d, np.ones(R), minlength=st.n_slots)
        data = vals[st.csc_order]
        _sparse_fill(data, st.fill_pos, st.lv_starts, self.Bv_lv)
        # a factorization owns its factor: a decomposition kept by a caller (the result's
        # conditional variances, inference) must not change when the objective is evaluated
        # at another θ, so no solver is shared between θs (the symbolic analysis is redone:
        # cheap next to the numeric factorization and the selected inverse)
        self.solver = qdldl.Solver(sp.csc_matrix((data, st.mat.indices, st.mat.indptr),
                                                 shape=st.mat.shape), upper=True)
        _L, D, _P = self.solver.factors()
        if not np.all(D > 0):
            raise linalg.LinAlgError("the Schur complement is not positive definite")
        self.logdet += float(np.sum(np.log(D)))

    def _solve_S(self, rhs: np.ndarray) -> np.ndarray:
        if self.st.R == 0:
            return rhs
        if self.st.dense:
            return linalg.cho_solve((self.S_chol, True), rhs, check_finite=False)
        return np.column_stack([self.solver.solve(np.ascontiguousarray(rhs[:, j]))
                                for j in range(rhs.shape[1])])

    # ------------------------------------------------------------------ solves
    def solve(self, C1: np.ndarray, C2: np.ndarray, out: tuple | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """A⁻¹ [C1; C2] for C1 (m1, q1, r) and C2 (R, r) → (W1 (m1, q1, r), W2 (R, r)),
        into `out` = (W1, W2) (C-contiguous) when given."""
        st = self.st
        Li = self.Li
        y1 = level_matmul(Li, np.ascontiguousarray(C1), False)  # L1⁻¹ C1 per level
        # C2 − B̃ y1, then W1 = L1⁻ᵀ (y1 − B̃' W2) per level (compiled loops over B̃'s entries)
        c2 = np.array(C2, dtype=float, order="C")
        if st.n_entries:
            _b_apply(c2, y1, st.rows_lv, st.lv_starts, self.Bv_lv)
        if out is None:
            W2 = np.ascontiguousarray(self._solve_S(c2))
        else:
            W2 = out[1]
            W2[...] = self._solve_S(c2)
        if st.n_entries:
            with PARALLEL:
                _b_apply_t(W2, y1, st.rows_lv, st.lv_starts, self.Bv_lv)
        W1 = level_matmul(Li, y1, True, out=None if out is None else out[0])  # L1⁻ᵀ z
        return W1, W2

    # ------------------------------------------------------------------ Ω = A⁻¹ on the pattern
    def omega(self) -> tuple[np.ndarray, np.ndarray, object]:
        """→ (Ω₁₁ diagonal blocks (q1, q1, m1), Ω₂₁ at B's entries (e, q1), Ω₂₂ lookup),
        computed once per factorization (the gradient at θ̂ and the conditional variances
        after it share one; nothing writes into them)."""
        if getattr(self, "_omega", None) is None:
            self._omega = self._compute_omega()
        return self._omega

    def forget_omega(self) -> None:
        """Drop the kept Ω blocks (their memory: ~2 q₁ doubles per entry of B and q₁² per
        level) and S⁻¹ behind them (dense: R² doubles); `omega` computes them again when
        asked."""
        self._omega = None
        self._inv = self._zsel = None

    def _compute_omega(self) -> tuple[np.ndarray, np.ndarray, object]:
        st = self.st
        q1 = st.q1
        om22 = self._omega22()
        H_lv = np.zeros((st.n_entries, q1))
        if st.n_entries:
            if st.dense:
                # Ω₂₂ is symmetric and LAPACK's inverse column-major: its transpose is the
                # same matrix with rows contiguous (the kernel reads along rows)
                with PARALLEL:
                    _dense_h(self._inv.T, st.rows_lv, st.cut, st.lv_starts, self.Bv_lv, H_lv)
            else:
                with PARALLEL:
                    _sparse_h(*self._zsel, st.rows_lv, st.lv_starts, self.Bv_lv, H_lv)
        with PARALLEL:
            om11 = _omega_levels(self.Li, st.lv_starts, self.Bv_lv, H_lv)  # H_lv → Ω₂₁
        # back to B's entry order (pair by pair), unless that is the level order already
        om21 = H_lv if st.lv_pos is None else H_lv[st.lv_pos]
        return om11, om21, om22

    def _omega22(self):
        """Ω₂₂ = S⁻¹ as a lookup (rows, cols) → entries: the whole inverse (dense S, from
        its Cholesky factor by LAPACK's potri) or the selected inverse on the pattern of
        the sparse factor (entries off it are not needed)."""
        st = self.st
        if st.R == 0:
            return lambda a, b: np.zeros(len(a))
        if st.dense:
            inv, info = linalg.lapack.dpotri(self.S_chol, lower=1)
            if info != 0:
                raise linalg.LinAlgError("the Schur complement is singular")
            _symmetrize_lower(inv)
            self._inv = inv
            return lambda a, b: inv[a, b]
        from ._selinv import lookup, selected_inverse

        L, D, P = self.solver.factors()
        L = L.tocsc()
        L.sort_indices()
        indptr, indices = L.indptr.astype(np.int64), L.indices.astype(np.int64)
        zdiag, zdata = selected_inverse(indptr, indices, L.data.astype(float), D)
        pos = np.empty(st.R, dtype=np.int64)
        pos[np.asarray(P)] = np.arange(st.R)
        self._zsel = (indptr, indices, zdata, zdiag, pos)
        return lambda a, b: lookup(indptr, indices, zdata, zdiag, pos[a], pos[b])
