"""The level-first products of the per-level algebra, compiled (numba).

The several-factor solver keeps the leading factor's right-hand sides "level first"
(m, q, r) — the rows of the (Q, r) vectors it solves for, level by level — and multiplies
them by per-level or constant q×q matrices with these compiled loops (numpy's batched matmul
costs ~50 ns per tiny matrix; these ~10).  Kept apart from `_levels` (the level-last algebra
of both objectives) so that a one-factor fit never imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
