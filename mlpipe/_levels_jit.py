"""The level-first products of the per-level algebra, compiled (numba).

The several-factor solver keeps the leading factor's right-hand sides "level first"
(m, q, r) — the rows of the (Q, r) vectors it solves for, level by level — and multiplies
them by per-level or constant q×q matrices with these compiled loops (numpy's batched matmul
costs ~50 ns per tiny matrix; these ~10).  Kept apart from `_levels` (the level-last algebra
of both objectives) so that a one-factor fit never imports numba.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

#: held around every call of a parallel (prange) kernel: numba's fallback threading layer
#: ("workqueue", used when neither OpenMP nor TBB is available) must not run two parallel
#: regions at once, so fits in several Python threads take turns in them
PARALLEL = threading.Lock()


@njit(cache=True)
def level_matmul(A, B, trans):
    """A_i B_i (or A_i' B_i) for A (m, q, q), B (m, q, r) → (m, q, r): a loop over levels
    without numpy's per-matrix overhead for tiny blocks."""
    m, q, r = B.shape
    out = np.zeros((m, q, r))
    for i in range(m):
        for a in range(q):
            for b in range(q):
                w = A[i, b, a] if trans else A[i, a, b]
                if w != 0.0:
                    for c in range(r):
                        out[i, a, c] += w * B[i, b, c]
    return out


@njit(cache=True)
def shared_matmul(T, B):
    """T B_i for one (q, q) T and B (m, q, r) → (m, q, r)."""
    m, q, r = B.shape
    out = np.zeros((m, q, r))
    for i in range(m):
        for a in range(q):
            for b in range(q):
                w = T[a, b]
                if w != 0.0:
                    for c in range(r):
                        out[i, a, c] += w * B[i, b, c]
    return out


@njit(cache=True)
def pair_product(out, v, rows, cols, blocks_t, off_j, off_k, symmetric):
    """out += A v for the blocks of one pair of factors (j, k) of Z'Z: block n (its summed
    Z_j'Z_k, "pair last" blocks_t[:, :, n]) links rows off_j + rows[n]·q_j + a to columns
    off_k + cols[n]·q_k + b; with `symmetric` (j ≠ k) its transpose is added too.  v and out
    are (Q, r): Z'Z times r vectors without building Z'Z as a sparse matrix."""
    qj, qk, n = blocks_t.shape
    r = v.shape[1]
    for t in range(n):
        ri = off_j + rows[t] * qj
        ci = off_k + cols[t] * qk
        for a in range(qj):
            for b in range(qk):
                w = blocks_t[a, b, t]
                if w != 0.0:
                    for c in range(r):
                        out[ri + a, c] += w * v[ci + b, c]
                    if symmetric:
                        for c in range(r):
                            out[ci + b, c] += w * v[ri + a, c]


@njit(cache=True)
def level_order(index, m):
    """The stable order of `index` (values in 0..m-1) by value: a counting sort, O(n + m)
    (np.argsort(index, kind="stable") sorts by comparison: ~0.6 s at 10M cells)."""
    start = np.zeros(m + 1, np.int64)
    for v in index:
        start[v + 1] += 1
    for i in range(m):
        start[i + 1] += start[i]
    out = np.empty(len(index), np.int64)
    for t in range(len(index)):
        v = index[t]
        out[start[v]] = t
        start[v] += 1
    return out


def pair_levels(ij: np.ndarray, ik: np.ndarray, mj: int, mk: int):
    """The distinct pairs (ij, ik) of two level indices over the cells, sorted by ij then
    ik, and each cell's pair: (rows, cols, inverse) — np.unique(ij·mk + ik,
    return_inverse=True) by two counting sorts instead of a comparison sort."""
    o = level_order(ik, mk)
    o = o[level_order(ij[o], mj)]
    a, b = ij[o], ik[o]
    new = np.empty(len(o), bool)
    new[:1] = True
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    inv = np.empty(len(o), np.int64)
    inv[o] = np.cumsum(new) - 1
    return a[new], b[new], inv
