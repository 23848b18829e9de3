"""Compiled sparse products with the level-pair counts (numba), for the method of
moments' block conjugate-gradient solves (`moments.Henderson`).

scipy's CSR × dense block is single-threaded and, with the rows of the dense block
scattered over memory, slower per column than one vector at a time; this loop runs the
output rows in parallel (each written by one thread) and the block's columns innermost.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._levels_jit import PARALLEL


def csr_add(out, row_off, ptr, idx, val, col_off, V):
    """out[row_off + r] += Σ_k val[k] · V[col_off + idx[k]] over row r's nonzeros."""
    with PARALLEL:
        _csr_add(out, row_off, ptr, idx, val, col_off, V)


@njit(parallel=True, cache=True)
def _csr_add(out, row_off, ptr, idx, val, col_off, V):
    n_rows = ptr.shape[0] - 1
    n_cols = V.shape[1]
    for r in prange(n_rows):
        o = row_off + r
        for k in range(ptr[r], ptr[r + 1]):
            c = val[k]
            src = col_off + idx[k]
            for t in range(n_cols):
                out[o, t] += c * V[src, t]


def csr_arrays(mat) -> tuple:
    """A scipy CSR matrix as `csr_add` takes it: (indptr int64, indices int32, data)."""
    return mat.indptr.astype(np.int64), mat.indices.astype(np.int32), mat.data


def warm() -> None:
    """Compile (or load the cache) once, so a timing does not count it."""
    out = np.zeros((2, 1))
    csr_add(out, 0, np.array([0, 1, 1], np.int64), np.array([0], np.int32),
            np.array([1.0]), 0, np.ones((2, 1)))
