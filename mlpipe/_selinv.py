"""The selected inverse of a sparse LDL' factorization (Takahashi's equations), compiled.

For P A P' = (I + L) D (I + L)' with L strictly lower triangular (CSC, sorted row indices),
the entries of Z = (P A P')⁻¹ on the pattern of L and its diagonal follow, column by column
from the last, from

    Z[i, j] = − Σ_{k ∈ col j} L[k, j] Z[i, k]        (i ∈ col j)
    Z[j, j] = 1 / D[j] − Σ_{k ∈ col j} L[k, j] Z[k, j]

and every Z[i, k] they need lies on the pattern of L (the rows of a column of a Cholesky
factor form a clique of its filled graph).  The cost is Σ_j |col j|² lookups — of the order
of the factorization itself — where the inverse as a whole would be dense.  The diagonal
blocks of A⁻¹ are the conditional covariances of the random effects (lme4's condVar).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _find(indptr, indices, col, row):
    """Position of (row, col) in the CSC pattern (binary search), or -1."""
    lo, hi = indptr[col], indptr[col + 1]
    while lo < hi:
        mid = (lo + hi) // 2
        v = indices[mid]
        if v == row:
            return mid
        if v < row:
            lo = mid + 1
        else:
            hi = mid
    return -1


@njit(cache=True)
def _z(indptr, indices, zdata, zdiag, i, k):
    if i == k:
        return zdiag[i]
    if i < k:
        i, k = k, i
    pos = _find(indptr, indices, k, i)
    return zdata[pos] if pos >= 0 else 0.0


@njit(cache=True)
def selected_inverse(indptr, indices, data, D):
    """→ (diagonal of Z, Z on the pattern of L in L's data order)."""
    n = len(D)
    zdata = np.zeros(len(data))
    zdiag = np.zeros(n)
    for j in range(n - 1, -1, -1):
        s, e = indptr[j], indptr[j + 1]
        for p in range(s, e):
            i = indices[p]
            acc = 0.0
            for r in range(s, e):
                acc += data[r] * _z(indptr, indices, zdata, zdiag, i, indices[r])
            zdata[p] = -acc
        acc = 0.0
        for p in range(s, e):
            acc += data[p] * zdata[p]
        zdiag[j] = 1.0 / D[j] - acc
    return zdiag, zdata


@njit(cache=True)
def lookup(indptr, indices, zdata, zdiag, rows, cols):
    """Z[rows[t], cols[t]] for every t (entries off the pattern of L are 0)."""
    out = np.empty(len(rows))
    for t in range(len(rows)):
        out[t] = _z(indptr, indices, zdata, zdiag, rows[t], cols[t])
    return out
