"""Stage 3: the profiled REML / ML deviance as a function of θ, from sufficient statistics.

lme4's parameterization: the random effects of group i are b_i = σ T u_i with u_i ~ N(0, I),
T the q×q lower-triangular relative covariance factor whose free entries are θ.  For each θ,
per group (batched over all m groups at once, elementwise over arrays of length m):

    L_i L_i' = A_i = T' Z_i'Z_i T + I                (q×q Cholesky)
    R_ZX,i   = L_i⁻¹ T' Z_i'X_i,   c_u,i = L_i⁻¹ T' Z_i'y_i
    R_X'R_X  = X'X − Σ_i R_ZX,i' R_ZX,i
    β̂        = (R_X'R_X)⁻¹ (X'y − Σ_i R_ZX,i' c_u,i)
    r²       = y'y − Σ_i |c_u,i|² − β̂'(X'y − Σ_i R_ZX,i' c_u,i)

    ML:   d(θ) = log|L|² + n (1 + log(2π r²/n))
    REML: d(θ) = log|L|² + log|R_X|² + (n−p) (1 + log(2π r²/(n−p)))

This is exactly lme4's `mkLmerDevfun` objective; nothing here touches raw rows.

Layout and cost.  A per-group q×q matrix is held as nested lists of length-m vectors (q is
small), and the per-group cross-products with [X y] as one C-contiguous (q, p+1, m) array, so
every operation is elementwise over contiguous length-m (or (p+1)·m) memory and every sum
over groups is a 1-d dot product.  Large BLAS calls with tiny outer dimensions (gemm/gemv of
shape (p+1)×m) are avoided on purpose: they are slower than elementwise loops here.

The gradient (`value_and_gradient`) is analytic.  With Λ = T, E_k = ∂Λ/∂θ_k = e_r e_c',
Q_i = A_i⁻¹ Λ', û_i = Q_i (Z_i'y_i − Z_i'X_i β̂) (the spherical conditional modes) and
v_i = Z_i'(y_i − X_i β̂ − Z_i Λ û_i) (the Z-weighted residuals):

    ∂ log|L|²  / ∂θ_k = 2 Σ_i (S_i Q_i')[r, c]                     S_i = Z_i'Z_i
    ∂ r²       / ∂θ_k = −2 Σ_i v_i[r] û_i[c]                       (envelope theorem)
    ∂ log|R_X|²/ ∂θ_k = −2 Σ_i (Q_i C_i (I − Λ Q_i S_i))[c, r]   C_i = Z_i'X_i (R_X'R_X)⁻¹ X_i'Z_i

and d' follows by the chain rule through the log terms.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from .stats import Statistics

LOG_2PI = float(np.log(2 * np.pi))


def profiled_deviance(r2: float, logdet_l: float, logdet_rx: float, n: int, p: int,
                      reml: bool) -> float:
    """The profiled deviance (REML criterion) from its pieces; inf when r² is not positive."""
    if not np.isfinite(r2) or r2 <= 0:
        return np.inf
    if reml:
        dof = n - p
        return logdet_l + logdet_rx + dof * (1.0 + LOG_2PI + np.log(r2 / dof))
    return logdet_l + n * (1.0 + LOG_2PI + np.log(r2 / n))


def profile_fixed(M: np.ndarray, p: int):
    """From M = [X y]'V̂⁻¹[X y] (relative, (p+1)×(p+1)): R_X'R_X, R_X, β̂, r², log|R_X|²."""
    xtx_adj = M[:p, :p].copy()
    xty_adj = M[:p, p].copy()
    rx = linalg.cholesky(xtx_adj, lower=False, check_finite=False)
    beta = linalg.cho_solve((rx, False), xty_adj, check_finite=False)
    r2 = float(M[p, p]) - float(beta @ xty_adj)
    logdet_rx = 2.0 * float(np.sum(np.log(np.abs(np.diag(rx)))))
    return xtx_adj, rx, beta, r2, logdet_rx


class ThetaMap:
    """The free entries of T: lower triangles of the correlated blocks, lme4's order."""

    def __init__(self, blocks: list[tuple[int, int]], q: int):
        self.q = q
        self.blocks = [(int(start), int(size)) for start, size in blocks]
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

    def from_covariance(self, rel_cov: np.ndarray) -> np.ndarray:
        """θ whose T T' is the block-diagonal part of `rel_cov`, made positive definite."""
        rel_cov = np.asarray(rel_cov, dtype=float)
        T = np.zeros((self.q, self.q))
        for start, size in self.blocks:
            idx = slice(start, start + size)
            sub = (rel_cov[idx, idx] + rel_cov[idx, idx].T) / 2
            w, v = np.linalg.eigh(sub)
            w = np.maximum(w, 1e-4 * max(1.0, float(w.max(initial=0.0))))
            T[idx, idx] = np.linalg.cholesky((v * w) @ v.T)
        return T[self.rows, self.cols]


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


@dataclass
class Parts:
    """The pieces of the profiled deviance at θ and their gradients in θ."""

    logdet_l: float
    logdet_rx: float
    r2: float
    d_logdet_l: np.ndarray
    d_logdet_rx: np.ndarray  # NaN when not computed (ML deviance)
    d_r2: np.ndarray


_DOT_CHUNK = 8192


def _vdot(a: np.ndarray, b: np.ndarray) -> float:
    """a·b for long contiguous vectors, as BLAS dots of at most 8192 elements each.

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


class _Work:
    """Length-m work vectors and the elementwise algebra on them.

    With `reuse`, the same vectors serve every evaluation (`reset()` at its start), so the
    optimizer's loop allocates nothing: a fresh multi-megabyte array costs a page fault per
    4 KiB page, which at ~10⁵ groups is as slow as the arithmetic itself.  Without `reuse`
    every vector is freshly allocated (for results that outlive the evaluation).
    None stands for a structural zero throughout.
    """

    def __init__(self, m: int, *, reuse: bool):
        self.m = m
        self.reuse = reuse
        self.pool: list[np.ndarray] = []
        self.next = 0
        self.tmp = np.empty(m)

    def reset(self) -> None:
        self.next = 0

    def new(self) -> np.ndarray:
        if not self.reuse:
            return np.empty(self.m)
        if self.next == len(self.pool):
            self.pool.append(np.empty(self.m))
        v = self.pool[self.next]
        self.next += 1
        return v

    def lincomb(self, coefs, vectors, out: np.ndarray | None = None) -> np.ndarray | None:
        """Σ_k coefs[k]·vectors[k] (scalar coefficients); None when every term is zero."""
        terms = [(c, v) for c, v in zip(coefs, vectors) if v is not None and c != 0.0]
        if not terms:
            return None
        c0, v0 = terms[0]
        out = np.multiply(v0, c0, out=self.new() if out is None else out)
        for c, v in terms[1:]:
            np.multiply(v, c, out=self.tmp)
            out += self.tmp
        return out

    def sumprod(self, pairs, init: np.ndarray | None = None, *, sign: float = 1.0,
                const: float = 0.0, inplace: bool = False) -> np.ndarray | None:
        """init + sign·Σ a⊙b + const (None entries skipped), or None if that is zero.

        A new vector, or `init` itself updated when `inplace` (for vectors the caller owns).
        """
        terms = [(a, b) for a, b in pairs if a is not None and b is not None]
        if init is None and not terms:
            return None if const == 0.0 else _fill(self.new(), const)
        if init is not None and inplace:
            out = init
        elif init is not None:
            out = self.new()
            np.copyto(out, init)
        else:
            out = self.new()
            a, b = terms.pop(0)
            np.multiply(a, b, out=out)
            if sign < 0:
                np.negative(out, out=out)
        for a, b in terms:
            np.multiply(a, b, out=self.tmp)
            if sign < 0:
                out -= self.tmp
            else:
                out += self.tmp
        if const != 0.0:
            out += const
        return out


def _fill(v: np.ndarray, value: float) -> np.ndarray:
    v.fill(value)
    return v


class Objective:
    """`Objective(stats, reml=True)(theta)` → the deviance (REML criterion under REML).

    `value_and_gradient(theta)` → the deviance and its exact gradient.  `evaluations` counts
    deviance evaluations (with or without gradient), `gradient_evaluations` those with one.
    """

    default_method = "newton"

    def __init__(self, stats: Statistics, *, reml: bool = True):
        self.stats = stats
        self.reml = reml
        self.theta_map = ThetaMap(stats.blocks, stats.q)
        self.evaluations = 0
        self.gradient_evaluations = 0
        q, p = stats.q, stats.p
        # per-group Z'Z entries as contiguous length-m vectors (views), symmetric access
        ztz = np.ascontiguousarray(stats.ztz, dtype=float)
        self._S = [[ztz[max(a, b), min(a, b)] for b in range(q)] for a in range(q)]
        # Z_i'[X y] per group: (q, p+1, m), C-contiguous
        self._G = np.ascontiguousarray(
            np.concatenate([np.asarray(stats.ztx, dtype=float),
                            np.asarray(stats.zty, dtype=float)[:, None, :]], axis=1))
        m0 = np.empty((p + 1, p + 1))
        m0[:p, :p] = stats.xtx
        m0[:p, p] = m0[p, :p] = stats.xty
        m0[p, p] = stats.yty
        self._M0 = m0
        # the reusable work space of the evaluations (allocated on first use); the lock
        # keeps concurrent evaluations of one Objective from sharing it
        self._work: _Work | None = None
        self._R: np.ndarray | None = None  # (p+1, q, m)
        self._Y: np.ndarray | None = None  # (q, p, m)
        self._tmpG: np.ndarray | None = None  # (p+1, m)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable: the work space and the lock are rebuilt
        state = dict(self.__dict__)
        state.update(_work=None, _R=None, _Y=None, _tmpG=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the core
    def _factor(self, T: np.ndarray, w: _Work):
        """Per-group L (Cholesky of T'S T + I), 1/diag(L), and P = L⁻¹ T' (q×q per group)."""
        q = self.stats.q
        S = self._S
        nz = [(a, c) for a in range(q) for c in range(q) if T[a, c] != 0.0]
        L: list[list[np.ndarray | None]] = [[None] * q for _ in range(q)]
        inv: list[np.ndarray] = []
        for d in range(q):
            for c in range(d, q):
                # A[c][d] = Σ_{a,b} T[a,c] S[a][b] T[b,d] + δ_cd
                coef: dict[tuple[int, int], float] = {}
                for a, cc in nz:
                    if cc == c:
                        for b, dd in nz:
                            if dd == d:
                                key = (max(a, b), min(a, b))
                                coef[key] = coef.get(key, 0.0) + T[a, c] * T[b, d]
                acc = w.lincomb(list(coef.values()), [S[a][b] for a, b in coef])
                if c == d:
                    acc = w.sumprod([(L[d][k], L[d][k]) for k in range(d)], acc, sign=-1.0,
                                    const=1.0, inplace=True)
                    np.sqrt(acc, out=acc)
                    L[d][d] = acc
                    inv.append(np.divide(1.0, acc, out=w.new()))
                else:
                    acc = w.sumprod([(L[c][k], L[d][k]) for k in range(d)], acc, sign=-1.0,
                                    inplace=True)
                    if acc is not None:
                        acc *= inv[d]
                    L[c][d] = acc
        # P = L⁻¹ T' by forward substitution: P[i][a] = (T[a,i] − Σ_{k<i} L[i][k] P[k][a]) / L[i][i]
        P: list[list[np.ndarray | None]] = [[None] * q for _ in range(q)]
        for i in range(q):
            for a in range(q):
                pairs = [(L[i][k], P[k][a]) for k in range(i)
                         if L[i][k] is not None and P[k][a] is not None]
                if not pairs:  # P[i][a] = T[a,i] / L[i][i]
                    P[i][a] = None if T[a, i] == 0.0 else np.multiply(inv[i], T[a, i],
                                                                       out=w.new())
                    continue
                acc = w.sumprod(pairs, sign=-1.0, const=T[a, i])
                acc *= inv[i]
                P[i][a] = acc
        return L, inv, P

    def _core(self, theta: np.ndarray, w: _Work, R: np.ndarray, tmp: np.ndarray):
        """L, 1/diag(L), P, R_aug = [R_ZX c_u] as (p+1, q, m), M = [X y]'[X y] − R_aug'R_aug."""
        s = self.stats
        q, p, m = s.q, s.p, s.m
        T = self.theta_map.T(np.asarray(theta, dtype=float))
        L, inv, P = self._factor(T, w)
        G = self._G
        # R_aug[:, i] = Σ_a P[i][a] G[a]; (p+1, q, m) so that each row R_aug[j] is one
        # contiguous (q·m) vector for the sums below
        for i in range(q):
            terms = [(P[i][a], G[a]) for a in range(q) if P[i][a] is not None]
            if not terms:
                R[:, i, :] = 0.0
                continue
            np.multiply(terms[0][1], terms[0][0], out=R[:, i, :])
            for pa, ga in terms[1:]:
                np.multiply(ga, pa, out=tmp)
                R[:, i, :] += tmp
        M = self._M0.copy()
        flat = R.reshape(p + 1, q * m)
        for j in range(p + 1):
            for k in range(j + 1):
                v = _vdot(flat[j], flat[k])
                M[j, k] -= v
                if j != k:
                    M[k, j] -= v
        prod = w.new()
        np.copyto(prod, L[0][0])
        for j in range(1, q):
            prod *= L[j][j]
        logdet_l = 2.0 * float(np.sum(np.log(prod)))
        if not np.isfinite(logdet_l):  # the product overflowed: sum the logs one at a time
            logdet_l = 2.0 * float(sum(np.sum(np.log(L[j][j])) for j in range(q)))
        return T, L, inv, P, M, logdet_l

    def _profile(self, M: np.ndarray):
        return profile_fixed(M, self.stats.p)

    def _workspace(self):
        if self._work is None:
            s = self.stats
            self._work = _Work(s.m, reuse=True)
            self._R = np.empty((s.p + 1, s.q, s.m))
            self._tmpG = np.empty((s.p + 1, s.m))
        self._work.reset()
        return self._work, self._R, self._tmpG

    def decompose(self, theta: np.ndarray) -> Decomposition:
        s = self.stats
        R = np.empty((s.p + 1, s.q, s.m))  # handed out: never the reused buffer
        with self._lock:
            w, _R, tmp = self._workspace()
            T, L, _inv, _P, M, logdet_l = self._core(theta, w, R, tmp)
            # the work vectors are reused by the next evaluation: hand out copies of L
            L = [[None if j > i else np.zeros(s.m) if L[i][j] is None else L[i][j].copy()
                  for j in range(s.q)] for i in range(s.q)]
        xtx_adj, rx, beta, r2, logdet_rx = self._profile(M)
        # R is (p+1, q, m): hand out (q, p, m) and (q, m) views
        return Decomposition(np.asarray(theta, float), T, L, R[:s.p].transpose(1, 0, 2), R[s.p],
                             xtx_adj, rx, beta, r2, logdet_l, logdet_rx)

    def _deviance(self, r2: float, logdet_l: float, logdet_rx: float) -> float:
        return profiled_deviance(r2, logdet_l, logdet_rx, self.stats.n, self.stats.p,
                                 self.reml)

    def parts_at(self, theta: np.ndarray) -> tuple[float, float, float]:
        """(r², log|L|², log|R_X|²) at θ (as `BlockedObjective.parts_at`)."""
        dec = self.decompose(theta)
        return dec.r2, dec.logdet_l, dec.logdet_rx

    def deviance_of(self, dec: Decomposition) -> float:
        return self._deviance(dec.r2, dec.logdet_l, dec.logdet_rx)

    def __call__(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                w, R, tmp = self._workspace()
                _T, _L, _inv, _P, M, logdet_l = self._core(theta, w, R, tmp)
                _xtx, _rx, _beta, r2, logdet_rx = self._profile(M)
                return float(self._deviance(r2, logdet_l, logdet_rx))
        except (linalg.LinAlgError, FloatingPointError, ValueError):
            return np.inf

    # ------------------------------------------------------------------ the gradient
    def value_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The deviance and its exact gradient with respect to θ (inf and NaNs if undefined)."""
        self.evaluations += 1
        self.gradient_evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                parts = self._parts(np.asarray(theta, dtype=float), self.reml)
        except (linalg.LinAlgError, FloatingPointError, ValueError):
            parts = None
        k = len(self.theta_map)
        if parts is None:
            return np.inf, np.full(k, np.nan)
        f = float(self._deviance(parts.r2, parts.logdet_l, parts.logdet_rx))
        if not np.isfinite(f):
            return np.inf, np.full(k, np.nan)
        n, p = self.stats.n, self.stats.p
        if self.reml:
            return f, parts.d_logdet_l + parts.d_logdet_rx + (n - p) / parts.r2 * parts.d_r2
        return f, parts.d_logdet_l + n / parts.r2 * parts.d_r2

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        return self.value_and_gradient(theta)[1]

    def parts(self, theta: np.ndarray) -> Parts:
        """log|L|², log|R_X|², r² at θ and their exact gradients in θ (for criteria built
        from them, e.g. the deviance with σ explicit).  Raises LinAlgError if undefined."""
        self.evaluations += 1
        self.gradient_evaluations += 1
        with np.errstate(invalid="raise", divide="raise"), self._lock:
            try:
                return self._parts(np.asarray(theta, dtype=float), True)
            except FloatingPointError as exc:
                raise linalg.LinAlgError(str(exc)) from None

    def _parts(self, theta: np.ndarray, with_rx: bool) -> Parts:
        s = self.stats
        q, p = s.q, s.p
        S, G = self._S, self._G
        w, R, tmp = self._workspace()
        T, L, inv, P, M, logdet_l = self._core(theta, w, R, tmp)
        _xtx, rx, beta, r2, logdet_rx = self._profile(M)
        if not np.isfinite(r2) or r2 <= 0:
            raise linalg.LinAlgError("the penalized residual sum of squares is not positive")
        # Q = A⁻¹ T' = L⁻ᵀ P: Q[i][a] = (P[i][a] − Σ_{k>i} L[k][i] Q[k][a]) / L[i][i]
        Q: list[list[np.ndarray | None]] = [[None] * q for _ in range(q)]
        for i in reversed(range(q)):
            for a in range(q):
                # P is not needed after this: update it in place
                acc = w.sumprod([(L[k][i], Q[k][a]) for k in range(i + 1, q)], P[i][a],
                                sign=-1.0, inplace=True)
                if acc is not None:
                    acc *= inv[i]
                Q[i][a] = acc
        # r_i = Z_i'y_i − Z_i'X_i β̂ (q, m);  û = Q r;  v = r − S T û
        gamma = np.append(-beta, 1.0)
        r = [np.einsum("j,jm->m", gamma, G[a], out=w.new()) for a in range(q)]
        u = [w.sumprod([(Q[c][a], r[a]) for a in range(q)]) for c in range(q)]
        lu = [w.lincomb(T[a], u) for a in range(q)]
        v = [w.sumprod([(S[b][a], lu[a]) for a in range(q)], r[b], sign=-1.0)
             for b in range(q)]
        rows, cols = self.theta_map.rows, self.theta_map.cols
        k = len(rows)
        g_ld = np.zeros(k)
        g_r2 = np.zeros(k)
        for idx, (rr, cc) in enumerate(zip(rows, cols)):
            g_ld[idx] = 2.0 * sum(_vdot(S[rr][a], Q[cc][a]) for a in range(q)
                                  if Q[cc][a] is not None)
            if u[cc] is not None:
                g_r2[idx] = -2.0 * _vdot(v[rr], u[cc])
        if not with_rx:
            return Parts(logdet_l, logdet_rx, r2, g_ld, np.full(k, np.nan), g_r2)
        # C_i = Z_i'X_i (R_X'R_X)⁻¹ X_i'Z_i = Y_i Y_i',  Y[a] = R_X⁻ᵀ (Z'X)[a]: (p, m)
        rinv, info = linalg.lapack.dtrtri(rx, lower=0)
        if info != 0:
            raise linalg.LinAlgError("R_X is singular")
        if self._Y is None:
            self._Y = np.empty((q, p, s.m))
        Y = self._Y
        for a in range(q):
            np.einsum("lj,lm->jm", rinv, G[a, :p], out=Y[a])
        C = [[None] * q for _ in range(q)]
        for a in range(q):
            for b in range(a + 1):
                C[a][b] = C[b][a] = np.einsum("jm,jm->m", Y[a], Y[b], out=w.new())
        # term_k = Σ_i (Q C V)[c, r] with V = I − T N, N = Q S:
        #        = Σ_b K[c][b] (δ_b,r − (T N)[b][r]),   K = Q C
        K = [[w.sumprod([(Q[c][a], C[a][b]) for a in range(q)]) for b in range(q)]
             for c in range(q)]
        ncol: dict[int, list[np.ndarray | None]] = {}
        tncol: dict[tuple[int, int], np.ndarray | None] = {}
        g_rx = np.zeros(k)
        for idx, (rr, cc) in enumerate(zip(rows, cols)):
            if rr not in ncol:
                ncol[rr] = [w.sumprod([(Q[c][a], S[a][rr]) for a in range(q)])
                            for c in range(q)]
            tot = 0.0
            for b in range(q):
                kb = K[cc][b]
                if kb is None:
                    continue
                if b == rr:
                    tot += float(np.sum(kb))
                if (b, rr) not in tncol:
                    tncol[(b, rr)] = w.lincomb(T[b], ncol[rr])
                tn = tncol[(b, rr)]
                if tn is not None:
                    tot -= _vdot(kb, tn)
            g_rx[idx] = -2.0 * tot
        return Parts(logdet_l, logdet_rx, r2, g_ld, g_rx, g_r2)

    # ------------------------------------------------------------------ helpers
    def sigma(self, dec: Decomposition) -> float:
        dof = self.stats.n - (self.stats.p if self.reml else 0)
        return float(np.sqrt(dec.r2 / dof))

    def moment_start(self) -> np.ndarray | None:
        """A moment estimate of θ: a cheap starting value for the optimizer (None if none).

        β from OLS; per group the least-squares random effects b̂_i = S_i⁻¹ r_i (groups whose
        S_i = Z_i'Z_i is numerically singular are left out); then Cov(b) ≈ mean(b̂ b̂') −
        σ̂² mean(S_i⁻¹) and θ from chol(Cov(b) / σ̂²), restricted to the block structure and
        made positive definite.  All per-group algebra is elementwise over length-m vectors.
        """
        s = self.stats
        q, p, m = s.q, s.p, s.m
        S = self._S
        w = _Work(m, reuse=False)
        try:
            with np.errstate(all="ignore"):
                beta = np.linalg.solve(s.xtx, s.xty)
                gamma = np.append(-beta, 1.0)
                r = [np.einsum("j,jm->m", gamma, self._G[a]) for a in range(q)]
                # elementwise Cholesky of S_i; ok where every pivot is well away from zero
                L = [[None] * q for _ in range(q)]
                ok = np.ones(m, dtype=bool)
                for j in range(q):
                    d = w.sumprod([(L[j][k], L[j][k]) for k in range(j)], S[j][j], sign=-1.0)
                    ok &= d > 1e-8 * S[j][j]
                    L[j][j] = np.sqrt(np.where(ok, d, 1.0))
                    for i in range(j + 1, q):
                        v = w.sumprod([(L[i][k], L[j][k]) for k in range(j)], S[i][j], sign=-1.0)
                        L[i][j] = v / L[j][j]
                k_ok = int(ok.sum())
                if k_ok < max(q + 1, 2):
                    return None
                # L⁻¹ (lower), then S⁻¹ = L⁻ᵀ L⁻¹ and b̂ = S⁻¹ r
                Li = [[None] * q for _ in range(q)]
                for i in range(q):
                    Li[i][i] = 1.0 / L[i][i]
                    for j in range(i):
                        acc = w.sumprod([(L[i][kk], Li[kk][j]) for kk in range(j, i)])
                        Li[i][j] = -acc * Li[i][i]
                Sinv = [[None] * q for _ in range(q)]
                for a in range(q):
                    for b in range(a + 1):
                        v = w.sumprod([(Li[kk][a], Li[kk][b]) for kk in range(a, q)])
                        Sinv[a][b] = Sinv[b][a] = np.where(ok, v, 0.0)
                bh = [w.sumprod([(Sinv[a][c], r[c]) for c in range(q)]) for a in range(q)]
                rss_tot = s.yty - 2 * beta @ s.xty + beta @ s.xtx @ beta
                within = sum(_vdot(r[a], bh[a]) for a in range(q))
                dof = s.n - q * k_ok - p
                if dof <= 0:
                    return None
                sigma2 = (rss_tot - within) / dof
                if not np.isfinite(sigma2) or sigma2 <= 0:
                    return None
                cov = np.array([[(_vdot(bh[a], bh[b]) - sigma2 * float(np.sum(Sinv[a][b])))
                                 / k_ok for b in range(q)] for a in range(q)])
                if not np.all(np.isfinite(cov)):
                    return None
                theta = self.theta_map.from_covariance(cov / sigma2)
        except np.linalg.LinAlgError:
            return None
        return theta if np.all(np.isfinite(theta)) else None
