"""The batched per-level algebra: one small matrix per level of a grouping factor, all levels
at once.

Layout: "level last", as the statistics store Z_i'Z_i.  A stack of q×r matrices (one per
level, m levels) is an array (q, r, m): entry [a, b] of level i is at [a, b, i]; a stack of
vectors is (q, m).  Every function loops in Python over the q×q (or q×r) entries only and is
elementwise over the levels, so for C-contiguous stacks every operation runs over contiguous
length-m memory — no Python loop over levels, no LAPACK call per level, and no BLAS call with
tiny outer dimensions (slower than these loops at q ≤ 10 or so); a dense product of two
stacks is one `einsum`.  A constant matrix (T, the relative covariance factor, the same for
every level) is a plain 2-d array; its zero entries are skipped, and `matmul` skips the
terms a caller knows to be zero (`inner`).

Functions with `out=` write their result there (it may be a strided view, and for the
solves the right-hand side itself) and `tmp=` is a scratch array shaped like one entry's
slice (`(m,)`, or `(r, m)` for (q, r, m) operands); both are allocated when not given, so
a caller that evaluates many times (the objective's optimizer loop) can allocate nothing.
Lower-triangular results have their strict upper triangle set to zero.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

_DOT_CHUNK = 8192


def _buffer(out: np.ndarray | None, shape: tuple) -> np.ndarray:
    return np.empty(shape) if out is None else out


def _scratch(tmp: np.ndarray | None, shape: tuple) -> np.ndarray:
    return np.empty(shape) if tmp is None else tmp


# ---------------------------------------------------------------------- factor and invert

def chol_batched(A: np.ndarray, *, out: np.ndarray | None = None,
                 tmp: np.ndarray | None = None) -> np.ndarray:
    """Lower Cholesky factors of (q, q, m) symmetric blocks, elementwise over m (reads the
    lower triangle of A).  Raises LinAlgError when a block is not positive definite."""
    def pivot(j: int, d: np.ndarray) -> None:
        if not np.all(d > 0):
            raise linalg.LinAlgError("a diagonal block is not positive definite")

    return _cholesky(A, _buffer(out, A.shape), _scratch(tmp, A.shape[2:]), pivot)


def chol_masked(A: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors of (q, q, m) positive semidefinite blocks, and `ok` (m,): the levels
    whose every pivot exceeds rtol × its diagonal entry of A.  The factors of the other
    levels are not meaningful (their pivots from the first small one on are set to 1)."""
    ok = np.ones(A.shape[2], dtype=bool)

    def pivot(j: int, d: np.ndarray) -> None:
        np.logical_and(ok, d > rtol * A[j, j], out=ok)
        np.copyto(d, 1.0, where=~ok)

    with np.errstate(all="ignore"):
        L = _cholesky(A, np.empty(A.shape), np.empty(A.shape[2:]), pivot)
    return L, ok


def _cholesky(A: np.ndarray, L: np.ndarray, tmp: np.ndarray, pivot) -> np.ndarray:
    """The column-by-column Cholesky of `chol_batched` into L; `pivot(j, d)` checks or
    replaces (in place) the j-th pivots d before their square root."""
    q = A.shape[0]
    for j in range(q):
        d = L[j, j]
        _sum_products(L[j, :j], L[j, :j], d, tmp)
        np.subtract(A[j, j], d, out=d)
        pivot(j, d)
        np.sqrt(d, out=d)
        for i in range(j + 1, q):
            lij = L[i, j]
            _sum_products(L[i, :j], L[j, :j], lij, tmp)
            np.subtract(A[i, j], lij, out=lij)
            lij /= d
        L[j, j + 1:] = 0.0
    return L


def chol_scaled(S: np.ndarray, T: np.ndarray, *, out: np.ndarray | None = None,
                work: np.ndarray | None = None, tmp: np.ndarray | None = None) -> np.ndarray:
    """Cholesky factors L_i of T'S_iT + I for symmetric (q, q, m) S and a constant T (lme4's
    L_i for one grouping factor); `work` (q', q', m) holds T'S_iT + I on return."""
    A = scale_blocks(S, T, T, symmetric=True, out=work, tmp=tmp)
    for a in range(A.shape[0]):
        d = A[a, a]
        d += 1.0
    return chol_batched(A, out=out, tmp=tmp)


def _sum_products(a: np.ndarray, b: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """out = Σ_k a[k]·b[k] (0 for no terms), accumulated in order."""
    if len(a) == 0:
        out.fill(0.0)
        return
    np.multiply(a[0], b[0], out=out)
    for k in range(1, len(a)):
        np.multiply(a[k], b[k], out=tmp)
        out += tmp


def tri_inv_batched(L: np.ndarray, *, out: np.ndarray | None = None,
                    tmp: np.ndarray | None = None) -> np.ndarray:
    """Inverses of (q, q, m) lower-triangular blocks, elementwise over m."""
    q, _, m = L.shape
    inv = _buffer(out, L.shape)
    tmp = _scratch(tmp, (m,))
    for i in range(q):
        np.divide(1.0, L[i, i], out=inv[i, i])
        for j in range(i):
            acc = inv[i, j]
            _sum_products(L[i, j:i], inv[j:i, j], acc, tmp)
            np.negative(acc, out=acc)
            acc *= inv[i, i]
        inv[i, i + 1:] = 0.0
    return inv


def inv_from_chol(L: np.ndarray) -> np.ndarray:
    """A⁻¹ = L⁻ᵀ L⁻¹ for A = L L' from its (q, q, m) Cholesky factors (LAPACK's potri)."""
    Li = tri_inv_batched(L)
    return matmul(Li.transpose(1, 0, 2), Li)


def logdet_chol(L: np.ndarray, *, tmp: np.ndarray | None = None) -> float:
    """Σ_levels log|A_i| = 2 Σ log diag(L_i) for (q, q, m) Cholesky factors: one log per
    level of the product of the q pivots (a log per pivot when that product overflows)."""
    q = L.shape[0]
    prod = _scratch(tmp, L.shape[2:])
    np.copyto(prod, L[0, 0])
    for j in range(1, q):
        prod *= L[j, j]
    out = 2.0 * float(np.sum(np.log(prod)))
    if not np.isfinite(out):
        out = 2.0 * float(sum(np.sum(np.log(L[j, j])) for j in range(q)))
    return out


# ---------------------------------------------------------------------- triangular solves

def solve_lower(L: np.ndarray, B: np.ndarray, *, out: np.ndarray | None = None,
                tmp: np.ndarray | None = None) -> np.ndarray:
    """L⁻¹B by forward substitution, per level: L (q, q, m) lower triangular, B (q, m) or
    (q, r, m) — or (q, r, 1), one right-hand side for every level.  `out` may be B."""
    return _substitute(L, B, out, tmp, transposed=False)


def solve_lower_t(L: np.ndarray, B: np.ndarray, *, out: np.ndarray | None = None,
                  tmp: np.ndarray | None = None) -> np.ndarray:
    """L⁻ᵀB by back substitution, per level (shapes as `solve_lower`).  `out` may be B."""
    return _substitute(L, B, out, tmp, transposed=True)


def _substitute(L: np.ndarray, B: np.ndarray, out: np.ndarray | None,
                tmp: np.ndarray | None, *, transposed: bool) -> np.ndarray:
    q, m = L.shape[0], L.shape[2]
    shape = B.shape[:-1] + (m,)
    out = _buffer(out, shape)
    tmp = _scratch(tmp, shape[1:])
    if out is not B:
        np.copyto(out, B)
    for i in (reversed(range(q)) if transposed else range(q)):
        acc = out[i]  # (bound once: `out[i] -= x` would copy the view back onto itself)
        for k in (range(i + 1, q) if transposed else range(i)):
            np.multiply(L[k, i] if transposed else L[i, k], out[k], out=tmp)
            acc -= tmp
        acc /= L[i, i]
    return out


# ---------------------------------------------------------------------- products

def matmul(A: np.ndarray, B: np.ndarray, *, inner=None, out: np.ndarray | None = None,
           tmp: np.ndarray | None = None) -> np.ndarray:
    """A_i B_i per level: A (q, k, m), B (k, r, m) → (q, r, m), or B (k, m) → (q, m).
    `inner`: the indices c of the sum over A[:, c] B[c] that can be nonzero (all if None;
    e.g. the nonzero rows of T for A = (·)T').  A dense product is one `einsum` (one pass
    per output entry, faster than a multiply and an add per term)."""
    q, k = A.shape[0], A.shape[1]
    shape = (q,) + B.shape[1:]
    out = _buffer(out, shape)
    if inner is None or len(inner) == k:
        return np.einsum("ikm,k...m->i...m", A, B, out=out)
    if not len(inner):
        out.fill(0.0)
        return out
    tmp = _scratch(tmp, shape[1:])
    for i in range(q):
        acc = out[i]
        np.multiply(A[i, inner[0]], B[inner[0]], out=acc)
        for c in inner[1:]:
            np.multiply(A[i, c], B[c], out=tmp)
            acc += tmp
    return out


def gram(Y: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Y_i Y_i' per level for Y (q, p, m) → (q, q, m): the lower triangle, mirrored."""
    q, p, m = Y.shape
    out = _buffer(out, (q, q, m))
    for a in range(q):
        for b in range(a + 1):
            np.einsum("jm,jm->m", Y[a], Y[b], out=out[a, b])
            if b < a:
                out[b, a] = out[a, b]
    return out


def const_matmul(C: np.ndarray, B: np.ndarray, *, out: np.ndarray | None = None,
                 tmp: np.ndarray | None = None) -> np.ndarray:
    """C B_i per level for a constant C (k, q) and B (q, …, m) → (k, …, m); zeros of C are
    skipped.  (T'G for T' = C.T: pass the transposed view.)"""
    shape = (C.shape[0],) + B.shape[1:]
    out = _buffer(out, shape)
    tmp = _scratch(tmp, shape[1:])
    for a in range(C.shape[0]):
        terms = [(C[a, b], B[b]) for b in range(C.shape[1]) if C[a, b] != 0.0]
        if not terms:
            out[a] = 0.0
            continue
        acc = out[a]
        np.multiply(terms[0][1], terms[0][0], out=acc)
        for c, v in terms[1:]:
            np.multiply(v, c, out=tmp)
            acc += tmp
    return out


def scale_blocks(blocks_t: np.ndarray, Tj: np.ndarray, Tk: np.ndarray, *,
                 symmetric: bool = False, out: np.ndarray | None = None,
                 tmp: np.ndarray | None = None) -> np.ndarray:
    """T_j' B_n T_k for blocks (q_j, q_k, n) → (q_j', q_k', n), elementwise over n.

    `symmetric` (blocks symmetric, T_j = T_k): the lower triangle is computed from the
    blocks' lower triangles (the two mirror terms of each entry merged) and mirrored."""
    qj, qk, n = blocks_t.shape
    pa, pb = Tj.shape[1], Tk.shape[1]
    out = _buffer(out, (pa, pb, n))
    tmp = _scratch(tmp, (n,))
    for a in range(pa):
        for b in range(a + 1 if symmetric else pb):
            terms: dict[tuple[int, int], float] = {}
            for r in range(qj):
                if Tj[r, a] == 0.0:
                    continue
                for c in range(qk):
                    coef = Tj[r, a] * Tk[c, b]
                    if coef != 0.0:
                        key = (max(r, c), min(r, c)) if symmetric else (r, c)
                        terms[key] = terms.get(key, 0.0) + coef
            acc = out[a, b]
            if not terms:
                acc.fill(0.0)
            for t, ((r, c), coef) in enumerate(terms.items()):
                if t == 0:
                    np.multiply(blocks_t[r, c], coef, out=acc)
                else:
                    np.multiply(blocks_t[r, c], coef, out=tmp)
                    acc += tmp
            if symmetric and b < a:
                out[b, a] = acc
    return out


# ---------------------------------------------------------------------- sums over levels

def vdot(a: np.ndarray, b: np.ndarray) -> float:
    """a·b for long contiguous vectors (a sum over levels), as BLAS dots of at most 8192
    elements each.

    OpenBLAS runs a dot of more than 10⁴ elements on several threads, and those threads spin
    waiting for each other whenever the cores are busy with other work: a 10⁵-element dot
    then costs milliseconds instead of microseconds.  Shorter dots stay on one thread; one
    `vecdot` call over the rows of a (k, 8192) view keeps the Python overhead at one call.
    """
    n = a.shape[0]
    k = n // _DOT_CHUNK
    cut = k * _DOT_CHUNK
    total = float(np.dot(a[cut:], b[cut:])) if cut < n else 0.0
    if k:
        total += float(np.vecdot(a[:cut].reshape(k, _DOT_CHUNK),
                                 b[:cut].reshape(k, _DOT_CHUNK)).sum())
    return total
