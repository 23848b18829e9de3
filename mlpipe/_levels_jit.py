"""The level-first products of the per-level algebra, compiled (numba).

The several-factor solver keeps the leading factor's right-hand sides "level first"
(m, q, r) — the rows of the (Q, r) vectors it solves for, level by level — and multiplies
them by per-level or constant q×q matrices with these compiled loops (numpy's batched matmul
costs ~50 ns per tiny matrix; these ~10).  Kept apart from `_levels` (the level-last algebra
of both objectives) so that a one-factor fit imports numba only where it pays: the
one-factor objective's compiled core and gradient (`core_sums2`, `gradient_sums2`) above
`objective.FUSED_MIN_LEVELS` groups.
"""

from __future__ import annotations

import os
import threading

# OpenMP's worker threads (numba's threading layer here) spin after every parallel region by
# default, taking the cores from the LAPACK call that follows (OpenBLAS has threads of its
# own): a dense Cholesky of order 1,000 took 22 ms after a parallel kernel against 15 ms
# alone (10 ms with passive waiting, measured).  The runtime reads this when numba loads it,
# at the first parallel kernel, which runs after this import; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

#: held around every call of a parallel (prange) kernel: numba's fallback threading layer
#: ("workqueue", used when neither OpenMP nor TBB is available) must not run two parallel
#: regions at once, so fits in several Python threads take turns in them
PARALLEL = threading.Lock()


@njit(parallel=True, cache=True)
def _level_matmul(A, B, trans, out):
    """A_i B_i (or A_i' B_i) for A (m, q, q), B (m, q, r) → (m, q, r): a loop over levels
    without numpy's per-matrix overhead for tiny blocks (levels in parallel: each writes
    its own rows; into `out`)."""
    m, q, r = B.shape
    if q == 2:  # spelled out: ~2x faster than the loops below
        for i in prange(m):
            a00, a11 = A[i, 0, 0], A[i, 1, 1]
            a01, a10 = (A[i, 1, 0], A[i, 0, 1]) if trans else (A[i, 0, 1], A[i, 1, 0])
            for c in range(r):
                b0, b1 = B[i, 0, c], B[i, 1, c]
                out[i, 0, c] = a00 * b0 + a01 * b1
                out[i, 1, c] = a10 * b0 + a11 * b1
        return out
    for i in prange(m):
        for a in range(q):
            for c in range(r):
                acc = 0.0
                for b in range(q):
                    acc += (A[i, b, a] if trans else A[i, a, b]) * B[i, b, c]
                out[i, a, c] = acc
    return out


@njit(cache=True, inline="always")
def congruence(blocks_t, t, Tj, Tk, tmp, out):
    """out = T_j' B T_k for block t of blocks_t (q_j, q_k, n), tmp (q_j, q_k') scratch: the
    general loops of the kernels' per-level scaling (inlined where it is called)."""
    qj, qk = blocks_t.shape[0], blocks_t.shape[1]
    for a in range(qj):  # B T_k
        for b in range(Tk.shape[1]):
            acc = 0.0
            for c in range(qk):
                acc += blocks_t[a, c, t] * Tk[c, b]
            tmp[a, b] = acc
    for a in range(Tj.shape[1]):  # T_j' (B T_k)
        for b in range(Tk.shape[1]):
            acc = 0.0
            for c in range(qj):
                acc += Tj[c, a] * tmp[c, b]
            out[a, b] = acc


@njit(cache=True, inline="always")
def _chol2(s00, s01, s10, s11, t00, t01, t10, t11):
    """The Cholesky factor [[l00, 0], [l10, l11]] of T'S T + I for one 2×2 S and T, its
    squared pivots d0, d1 and whether both were positive (a pivot that is not is taken as 1,
    so the caller's loop runs on and reports the block)."""
    st00, st01 = s00 * t00 + s01 * t10, s00 * t01 + s01 * t11  # S T
    st10, st11 = s10 * t00 + s11 * t10, s10 * t01 + s11 * t11
    a00 = t00 * st00 + t10 * st10 + 1.0  # T'S T + I
    a10 = t01 * st00 + t11 * st10
    a11 = t01 * st01 + t11 * st11 + 1.0
    good = True
    d0 = a00
    if not d0 > 0.0:
        good = False
        d0 = 1.0
    l00 = np.sqrt(d0)
    l10 = a10 / l00
    d1 = a11 - l10 * l10
    if not d1 > 0.0:
        good = False
        d1 = 1.0
    return l00, l10, np.sqrt(d1), d0, d1, good


@njit(parallel=True, cache=True)
def _lead_factor(blocks_t, T):
    """Per level i of the leading factor: L_i L_i' = T' S_i T + I (S_i = blocks_t[:, :, i],
    symmetric) → (L_i⁻¹ level first (m, q, q), log|L_i|² (m,), ok (m,): the block was
    positive definite) — the Cholesky factor and its inverse in one pass, levels in
    parallel."""
    q, _, m = blocks_t.shape
    inv = np.zeros((m, q, q))
    logd = np.empty(m)
    ok = np.ones(m, np.bool_)
    if q == 2:  # spelled out (scalars in registers): ~5x faster than the loops below
        for i in prange(m):
            l00, l10, l11, d0, d1, good = _chol2(
                blocks_t[0, 0, i], blocks_t[0, 1, i], blocks_t[1, 0, i], blocks_t[1, 1, i],
                T[0, 0], T[0, 1], T[1, 0], T[1, 1])
            if not good:
                ok[i] = False
            logd[i] = np.log(d0) + np.log(d1)
            inv[i, 0, 0] = 1.0 / l00
            inv[i, 1, 1] = 1.0 / l11
            inv[i, 1, 0] = -(l10 / l00) / l11
        return inv, logd, ok
    nch = min(m, 256)  # chunks of levels: scratch allocated once per chunk
    for ch in prange(nch):
        A = np.empty((q, q))
        ST = np.empty((q, q))
        L = np.zeros((q, q))
        for i in range(ch * m // nch, (ch + 1) * m // nch):
            congruence(blocks_t, i, T, T, ST, A)  # T' S T, then + I
            for a in range(q):
                A[a, a] += 1.0
            ld = 0.0
            for j in range(q):  # Cholesky, column by column
                d = A[j, j]
                for k in range(j):
                    d -= L[j, k] * L[j, k]
                if not d > 0.0:
                    ok[i] = False
                    d = 1.0
                L[j, j] = np.sqrt(d)
                ld += np.log(d)
                for r in range(j + 1, q):
                    acc = A[r, j]
                    for k in range(j):
                        acc -= L[r, k] * L[j, k]
                    L[r, j] = acc / L[j, j]
            logd[i] = ld
            for r in range(q):  # L⁻¹, row by row (lower triangular)
                inv[i, r, r] = 1.0 / L[r, r]
                for c in range(r):
                    acc = 0.0
                    for k in range(c, r):
                        acc += L[r, k] * inv[i, k, c]
                    inv[i, r, c] = -acc / L[r, r]
    return inv, logd, ok


def level_matmul(A: np.ndarray, B: np.ndarray, trans: bool,
                 out: np.ndarray | None = None) -> np.ndarray:
    """A_i B_i (or A_i' B_i with `trans`) per level, A (m, q, q), B (m, q, r) → (m, q, r)
    (into `out`, C-contiguous, when given)."""
    out = np.empty(B.shape) if out is None else out
    with PARALLEL:
        _level_matmul(A, B, trans, out)
    return out


def shared_matmul(T: np.ndarray, B: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """T B_i per level for one (q, q) T and B (m, q, r) → (m, q, r) (into `out` when
    given): `level_matmul` with T at every level (a broadcast view, no copy)."""
    T = np.ascontiguousarray(T, dtype=float)
    return level_matmul(np.broadcast_to(T, (B.shape[0],) + T.shape), B, False, out)


def lead_factor(blocks_t: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, float]:
    """(L_i⁻¹ level first (m, q, q), Σ_i log|L_i|²) for L_i L_i' = T' S_i T + I per level of
    symmetric S (q, q, m) "pair last"; LinAlgError if a block is not positive definite."""
    with PARALLEL:
        inv, logd, ok = _lead_factor(blocks_t, np.ascontiguousarray(T, dtype=float))
    if not ok.all():
        from scipy import linalg

        raise linalg.LinAlgError("a diagonal block is not positive definite")
    return inv, float(np.sum(logd))


def pair_product(out: np.ndarray, v: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 blocks_t: np.ndarray, off_j: int, off_k: int, symmetric: bool) -> None:
    """out += A v for the blocks of one pair of factors (j, k) of Z'Z: block n (its summed
    Z_j'Z_k, "pair last" blocks_t[:, :, n]) links rows off_j + rows[n]·q_j + a to columns
    off_k + cols[n]·q_k + b; with `symmetric` (j ≠ k) its transpose is added too.  v and out
    are (Q, r): Z'Z times r vectors without building Z'Z as a sparse matrix.  A factor's
    own (diagonal) pair, one block per level, runs levels in parallel; a pair of two
    factors scatters onto both, in order."""
    if symmetric:
        _pair_product(out, v, rows, cols, blocks_t, off_j, off_k)
    else:
        with PARALLEL:
            _diag_product(out, v, rows, blocks_t, off_j)


@njit(parallel=True, cache=True)
def _diag_product(out, v, rows, blocks_t, off):
    """out += A v for a factor's own blocks (rows distinct: levels in parallel)."""
    q, _, n = blocks_t.shape
    r = v.shape[1]
    for t in prange(n):
        ri = off + rows[t] * q
        for a in range(q):
            for b in range(q):
                w = blocks_t[a, b, t]
                for c in range(r):
                    out[ri + a, c] += w * v[ri + b, c]


@njit(cache=True)
def _pair_product(out, v, rows, cols, blocks_t, off_j, off_k):
    """out += A v + A' v for the blocks of two factors' pair (j ≠ k), in order."""
    qj, qk, n = blocks_t.shape
    r = v.shape[1]
    if qj == 2 and qk == 2:  # spelled out: the loop below costs ~2x more at q = 2
        for t in range(n):
            ri = off_j + rows[t] * 2
            ci = off_k + cols[t] * 2
            w00, w01, w10, w11 = (blocks_t[0, 0, t], blocks_t[0, 1, t], blocks_t[1, 0, t],
                                  blocks_t[1, 1, t])
            for c in range(r):
                vr0, vr1, vc0, vc1 = v[ri, c], v[ri + 1, c], v[ci, c], v[ci + 1, c]
                out[ri, c] += w00 * vc0 + w01 * vc1
                out[ri + 1, c] += w10 * vc0 + w11 * vc1
                out[ci, c] += w00 * vr0 + w10 * vr1
                out[ci + 1, c] += w01 * vr0 + w11 * vr1
        return
    for t in range(n):
        ri = off_j + rows[t] * qj
        ci = off_k + cols[t] * qk
        for a in range(qj):
            for b in range(qk):
                w = blocks_t[a, b, t]
                if w != 0.0:
                    for c in range(r):
                        out[ri + a, c] += w * v[ci + b, c]
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


def lex_order(ranks: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """The order of the rows by (ranks[0], ranks[1], ...) — each ranks[k] with values in
    0..sizes[k]-1 — by one stable counting sort per key, last key first (LSD radix)."""
    o = level_order(ranks[-1], sizes[-1])
    for r, m in zip(ranks[-2::-1], sizes[-2::-1]):
        o = o[level_order(r[o], m)]
    return o


@njit(parallel=True, cache=True)
def _gather(a, order, tmp):
    for i in prange(len(order)):
        tmp[i] = a[order[i]]
    for i in prange(len(order)):
        a[i] = tmp[i]


@njit(parallel=True, cache=True)
def _scatter(a, position, tmp):
    for i in prange(len(position)):
        tmp[position[i]] = a[i]
    for i in prange(len(position)):
        a[i] = tmp[i]


def reorder(a: np.ndarray, *, order: np.ndarray | None = None,
            position: np.ndarray | None = None, tmp: np.ndarray | None = None) -> None:
    """Rearrange the 1-d array `a` in place: a[:] = a[order], or a[position] = a (each row's
    new place); `tmp` a scratch array of a's length and dtype, reused across calls."""
    tmp = np.empty_like(a) if tmp is None or tmp.dtype != a.dtype else tmp[:len(a)]
    with PARALLEL:
        if order is not None:
            _gather(a, order, tmp)
        else:
            _scatter(a, position, tmp)


def pair_levels(ij: np.ndarray, ik: np.ndarray, mj: int, mk: int):
    """The distinct pairs (ij, ik) of two level indices over the cells, sorted by ij then
    ik, and each cell's pair: (rows, cols, inverse) — np.unique(ij·mk + ik,
    return_inverse=True) by two counting sorts instead of a comparison sort."""
    return _pair_levels(np.asarray(ij, np.int64), np.asarray(ik, np.int64), mj, mk)


@njit(cache=True)
def _pair_levels(ij, ik, mj, mk):
    o = level_order(ik, mk)
    o = o[level_order(ij[o], mj)]
    rows = np.empty(len(o), np.int64)
    cols = np.empty(len(o), np.int64)
    inv = np.empty(len(o), np.int64)
    count = 0
    for t in range(len(o)):  # in sorted order: a new pair where (a, b) changes
        c = o[t]
        a, b = ij[c], ik[c]
        if count == 0 or a != rows[count - 1] or b != cols[count - 1]:
            rows[count] = a
            cols[count] = b
            count += 1
        inv[c] = count - 1
    return rows[:count].copy(), cols[:count].copy(), inv


#: chunks of the sums over blocks in `pair_traces`: a fixed split, so the rounded sums do not
#: depend on the number of threads
TRACE_CHUNKS = 64


def pair_traces(om: np.ndarray, blocks_t: np.ndarray) -> np.ndarray:
    """dd[a, b, c, d] = Σ_n om[a, b, n] · blocks_t[c, d, n] for (q_j, q_k, n) arrays "pair
    last" (`om` may be a strided view): the gradient's traces over a pair's blocks in one
    pass (chunks of blocks in parallel, summed in chunk order)."""
    with PARALLEL:
        return _pair_traces(om, blocks_t)


@njit(parallel=True, cache=True)
def _pair_traces(om, bt):
    qj, qk, n = bt.shape
    nch = TRACE_CHUNKS
    part = np.zeros((nch, qj, qk, qj, qk))
    for ch in prange(nch):
        lo, hi = ch * n // nch, (ch + 1) * n // nch
        for a in range(qj):
            for b in range(qk):
                for c in range(qj):
                    for d in range(qk):
                        acc = 0.0
                        for t in range(lo, hi):
                            acc += om[a, b, t] * bt[c, d, t]
                        part[ch, a, b, c, d] = acc
    dd = np.zeros((qj, qk, qj, qk))
    for ch in range(nch):
        dd += part[ch]
    return dd


@njit(cache=True)
def pair_sums(ztz, zj, zk, index, out):
    """out[a, b, index[t]] += ztz[zj[a], zk[b], t] over the cells t: the summed Z_j'Z_k
    blocks of each level pair (out zero on entry, (len(zj), len(zk), n)) in one pass."""
    for t in range(len(index)):
        i = index[t]
        for a in range(len(zj)):
            for b in range(len(zk)):
                out[a, b, i] += ztz[zj[a], zk[b], t]


@njit(cache=True)
def level_sums_xy(ztx, zty, z, index, out):
    """out[index[t], a, c] += Z'[X y] of cell t, column z[a] (c < p: ztx, c = p: zty): each
    level's Z'[X y] (out zero on entry, (m, len(z), p + 1), level first) in one pass."""
    p = ztx.shape[1]
    for t in range(len(index)):
        i = index[t]
        for a in range(len(z)):
            for c in range(p):
                out[i, a, c] += ztx[z[a], c, t]
            out[i, a, p] += zty[z[a], t]


# ---------------------------------------------------------------------- the one-factor core
# `Objective` (mlpipe/objective.py) with a random intercept and slope (q = 2, both columns of T
# nonzero) and many groups: its core and gradient sums in one pass over the levels each, the
# 2×2 algebra spelled out (scalars in registers), where its level-last NumPy steps take one
# pass over all levels per entry (1M groups: the core 28 ms against ~50-80 ms, measured)

#: the sums over levels are taken in this many chunks of consecutive levels, added in chunk
#: order: the rounded result does not depend on the number of threads
CORE_CHUNKS = 64


def core_sums2(S: np.ndarray, G: np.ndarray, TJ: np.ndarray, L: np.ndarray,
               R: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """`Objective._compute_core` for q = 2: S (2, 2, m) symmetric, G = Z'[X y] (2, p+1, m),
    TJ = T (2, 2); writes L (2, 2, m), the Cholesky factors of T'S_iT + I, and
    R (p+1, 2, m) = L⁻¹T'G_i → (Σ_i R_i'R_i (p+1, p+1), Σ_i log|L_i|², ok) — ok False when
    a block is not positive definite."""
    p1 = G.shape[1]
    part = np.zeros((CORE_CHUNKS, p1, p1))
    logd = np.zeros(CORE_CHUNKS)
    ok = np.ones(CORE_CHUNKS, np.bool_)
    with PARALLEL:
        _core2(S, np.ascontiguousarray(TJ, dtype=float), G, L, R, part, logd, ok)
    rr = np.zeros((p1, p1))
    for ch in range(CORE_CHUNKS):  # in chunk order
        rr += part[ch]
    return rr, 2.0 * float(np.sum(logd)), bool(ok.all())


@njit(parallel=True, cache=True)
def _core2(S, TJ, G, L, R, part, logd, ok):
    m, p1, nch = S.shape[2], G.shape[1], part.shape[0]
    t00, t01, t10, t11 = TJ[0, 0], TJ[0, 1], TJ[1, 0], TJ[1, 1]
    for ch in prange(nch):
        acc = np.zeros((p1, p1))
        r0 = np.empty(p1)
        r1 = np.empty(p1)
        ld = 0.0
        for i in range(ch * m // nch, (ch + 1) * m // nch):
            s01 = S[1, 0, i]  # the lower triangle, as the NumPy steps read it
            l00, l10, l11, _d0, _d1, good = _chol2(S[0, 0, i], s01, s01, S[1, 1, i],
                                                   t00, t01, t10, t11)
            if not good:
                ok[ch] = False
            prod = l00 * l11
            ld += np.log(prod) if prod > 0.0 and prod < np.inf else np.log(l00) + np.log(l11)
            L[0, 0, i], L[0, 1, i], L[1, 0, i], L[1, 1, i] = l00, 0.0, l10, l11
            for c in range(p1):  # L⁻¹ T'G_i
                g0, g1 = G[0, c, i], G[1, c, i]
                x0 = (t00 * g0 + t10 * g1) / l00
                x1 = (t01 * g0 + t11 * g1 - l10 * x0) / l11
                r0[c], r1[c] = x0, x1
                R[c, 0, i], R[c, 1, i] = x0, x1
            for j in range(p1):
                for k in range(j + 1):
                    acc[j, k] += r0[j] * r0[k] + r1[j] * r1[k]
        for j in range(p1):
            for k in range(j + 1):
                part[ch, j, k] = acc[j, k]
                part[ch, k, j] = acc[j, k]
        logd[ch] = ld


def gradient_sums2(S: np.ndarray, G: np.ndarray, TJ: np.ndarray, L: np.ndarray,
                   gamma: np.ndarray, rinv: np.ndarray | None):
    """`Objective.gradient_sums`' sums over groups for q = 2 in one pass (L from
    `core_sums2`, γ = (−β̂, 1), rinv = R_X⁻¹ or None without ∂log|R_X|²) → (N, VU, KV),
    each (2, 2): with Q_i = A_i⁻¹T', u_i = Q_i r_i, v_i = r_i − S_iTu_i (r_i = G_iγ),
    C_i = Y_iY_i' (Y_i = Z_i'X_i R_X⁻¹), N = Σ_i Q_iS_i, VU[a, c] = Σ_i v_i[a] u_i[c],
    KV = Σ_i Q_iC_i(I − T Q_iS_i)."""
    p = G.shape[1] - 1
    part = np.zeros((CORE_CHUNKS, 3, 2, 2))
    with PARALLEL:
        _gradient2(S, np.ascontiguousarray(TJ, dtype=float), G, L,
                   np.ascontiguousarray(gamma, dtype=float),
                   np.zeros((p, p)) if rinv is None else np.ascontiguousarray(rinv, dtype=float),
                   rinv is not None, part)
    tot = np.zeros((3, 2, 2))
    for ch in range(CORE_CHUNKS):
        tot += part[ch]
    return tot[0], tot[1], tot[2]


@njit(parallel=True, cache=True)
def _gradient2(S, TJ, G, L, gamma, rinv, with_rx, part):
    m, p1, nch = S.shape[2], G.shape[1], part.shape[0]
    p = p1 - 1
    t00, t01, t10, t11 = TJ[0, 0], TJ[0, 1], TJ[1, 0], TJ[1, 1]
    for ch in prange(nch):
        acc = np.zeros((3, 2, 2))
        y0 = np.empty(p)
        y1 = np.empty(p)
        for i in range(ch * m // nch, (ch + 1) * m // nch):
            s00, s01, s11 = S[0, 0, i], S[1, 0, i], S[1, 1, i]
            l00, l10, l11 = L[0, 0, i], L[1, 0, i], L[1, 1, i]
            # A⁻¹ = L⁻ᵀL⁻¹ with L⁻¹ = [[1/l00, 0], [−l10/(l00 l11), 1/l11]]
            i00, i11 = 1.0 / l00, 1.0 / l11
            i10 = -l10 * i00 * i11
            b00 = i00 * i00 + i10 * i10
            b01 = i10 * i11
            b11 = i11 * i11
            # Q = A⁻¹ T' (rows on the random effects, columns on Z's)
            q00, q01 = b00 * t00 + b01 * t01, b00 * t10 + b01 * t11
            q10, q11 = b01 * t00 + b11 * t01, b01 * t10 + b11 * t11
            # N = Q S
            n00, n01 = q00 * s00 + q01 * s01, q00 * s01 + q01 * s11
            n10, n11 = q10 * s00 + q11 * s01, q10 * s01 + q11 * s11
            acc[0, 0, 0] += n00
            acc[0, 0, 1] += n01
            acc[0, 1, 0] += n10
            acc[0, 1, 1] += n11
            # r = G γ, u = Q r, v = r − S T u
            r0 = 0.0
            r1 = 0.0
            for c in range(p1):
                r0 += G[0, c, i] * gamma[c]
                r1 += G[1, c, i] * gamma[c]
            u0, u1 = q00 * r0 + q01 * r1, q10 * r0 + q11 * r1
            lu0, lu1 = t00 * u0 + t01 * u1, t10 * u0 + t11 * u1
            v0 = r0 - (s00 * lu0 + s01 * lu1)
            v1 = r1 - (s01 * lu0 + s11 * lu1)
            acc[1, 0, 0] += v0 * u0
            acc[1, 0, 1] += v0 * u1
            acc[1, 1, 0] += v1 * u0
            acc[1, 1, 1] += v1 * u1
            if with_rx:
                # Y = G_X R_X⁻¹ (2 × p), C = Y Y'
                for j in range(p):
                    a0 = 0.0
                    a1 = 0.0
                    for k in range(j + 1):  # R_X⁻¹ is upper triangular
                        a0 += G[0, k, i] * rinv[k, j]
                        a1 += G[1, k, i] * rinv[k, j]
                    y0[j], y1[j] = a0, a1
                c00 = 0.0
                c01 = 0.0
                c11 = 0.0
                for j in range(p):
                    c00 += y0[j] * y0[j]
                    c01 += y0[j] * y1[j]
                    c11 += y1[j] * y1[j]
                # K = Q C, V = I − T N
                k00, k01 = q00 * c00 + q01 * c01, q00 * c01 + q01 * c11
                k10, k11 = q10 * c00 + q11 * c01, q10 * c01 + q11 * c11
                w00, w01 = 1.0 - (t00 * n00 + t01 * n10), -(t00 * n01 + t01 * n11)
                w10, w11 = -(t10 * n00 + t11 * n10), 1.0 - (t10 * n01 + t11 * n11)
                acc[2, 0, 0] += k00 * w00 + k01 * w10
                acc[2, 0, 1] += k00 * w01 + k01 * w11
                acc[2, 1, 0] += k10 * w00 + k11 * w10
                acc[2, 1, 1] += k10 * w01 + k11 * w11
        for a in range(3):
            for b in range(2):
                for c in range(2):
                    part[ch, a, b, c] = acc[a, b, c]
