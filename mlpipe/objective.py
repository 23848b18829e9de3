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

Layout and cost.  The per-group algebra is `_levels`' (one q×q matrix per group, all groups
at once, "level last"): Z_i'Z_i as a (q, q, m) stack and the cross-products with [X y] as one
C-contiguous (q, p+1, m) array, so every operation is elementwise over contiguous length-m
(or (p+1)·m) memory and every sum over groups is a 1-d dot product.  Large BLAS calls with
tiny outer dimensions (gemm/gemv of shape (p+1)×m) are avoided on purpose: they are slower
than elementwise loops here.  The optimizer's evaluations reuse one set of work arrays.

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

from ._levels import (chol_masked, chol_scaled, const_matmul, gram, inv_from_chol,
                      logdet_chol, matmul, solve_lower, solve_lower_t, vdot)
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
    L: np.ndarray  # (q, q, m) the per-group Cholesky factors (lower triangular)
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


class _Workspace:
    """Named work arrays of the evaluations.

    The same arrays serve every evaluation, so the optimizer's loop allocates nothing: a
    fresh multi-megabyte array costs a page fault per 4 KiB page, which at ~10⁵ groups is as
    slow as the arithmetic itself.  `handing_out(names)` is the same workspace but with the
    named arrays freshly allocated (results that outlive the evaluation).
    """

    def __init__(self, arrays: dict | None = None, fresh: tuple[str, ...] = ()):
        self._arrays = {} if arrays is None else arrays
        self._fresh = fresh

    def handing_out(self, *names: str) -> _Workspace:
        return _Workspace(self._arrays, names)

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name in self._fresh:
            return np.empty(shape)
        key = (name, shape)  # one array per shape: fewer columns of T on the boundary
        a = self._arrays.get(key)
        if a is None:
            a = self._arrays[key] = np.empty(shape)
        return a


#: `Objective._fused`: from this many groups a random intercept and slope take the compiled
#: one-pass core and gradient (numba imported then)
FUSED_MIN_LEVELS = 500_000


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
        self.last_value: float | None = None  # the latest criterion (progress)
        self.gradient_evaluations = 0
        self._S, self._G, self._M0 = self.linear_parts_of(stats)
        # the reusable work space of the evaluations (its arrays allocated on first use);
        # the lock keeps concurrent evaluations of one Objective from sharing it
        self._ws = _Workspace()
        self._lock = threading.Lock()
        self._last_core = None  # (θ's bytes, `_core`'s value) in the work space
        self._last_parts = None  # ((θ's bytes, with_rx), `_parts`' value)

    def linear_parts_of(self, stats: Statistics) -> list[np.ndarray]:
        """The arrays the evaluations read, computed from `stats` (this model's structure):
        per-group Z'Z (q, q, m) symmetric from its lower triangle, Z'[X y] (q, p+1, m) and
        [X y]'[X y].  All are linear in the statistics (see `linear_parts`)."""
        q, p = stats.q, stats.p
        S = np.array(stats.ztz, dtype=float, order="C")
        for a in range(q):
            for b in range(a + 1, q):
                S[a, b] = S[b, a]
        G = np.ascontiguousarray(
            np.concatenate([np.asarray(stats.ztx, dtype=float),
                            np.asarray(stats.zty, dtype=float)[:, None, :]], axis=1))
        m0 = np.empty((p + 1, p + 1))
        m0[:p, :p] = stats.xtx
        m0[:p, p] = m0[p, :p] = stats.xty
        m0[p, p] = stats.yty
        return [S, G, m0]

    def linear_parts(self) -> list[np.ndarray]:
        """The live arrays of `linear_parts_of`: writing into them (in place) changes the
        statistics the objective evaluates — how a residual structure re-weights one
        objective at each of its parameter values (mlpipe/residual.py); then call
        `statistics_changed`."""
        return [self._S, self._G, self._M0]

    def statistics_changed(self) -> None:
        """The `linear_parts` were rewritten: the cached core (`_core`) and parts are stale."""
        self._last_core = None
        self._last_parts = None

    def __getstate__(self) -> dict:  # picklable: the work space and the lock are rebuilt
        state = dict(self.__dict__)
        state.update(_ws=None, _lock=None, _last_core=None, _last_parts=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ws = _Workspace()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the core
    def _core(self, theta: np.ndarray, ws: _Workspace):
        """At θ: T; J, the columns of T that are not zero (a zero column drops its random
        effect: its rows of A = T'S T + I are the identity's, its rows of R_aug zero, so the
        algebra runs on J alone — a fit on the boundary costs less, not more); L, the
        Cholesky factors of A_JJ per group, (|J|, |J|, m); R_aug = L⁻¹T_J'[Z'X Z'y] as
        (p+1, |J|, m); M = [X y]'[X y] − R_aug'R_aug; and log|L|².

        In the objective's own work space the latest θ's core is kept: the gradient after
        the criterion at the same θ (a Dask partition's two rounds), the statistics' adjoint
        after the gradient (a residual structure's ψ derivative) and Satterthwaite's steps in
        σ alone reuse it instead of factorizing again.  Only `_core` writes its arrays (L, R
        in the work space), and `statistics_changed` drops it."""
        theta = np.asarray(theta, dtype=float)
        if ws is not self._ws:
            return self._compute_core(theta, ws)
        key = theta.tobytes()
        last = self._last_core
        if last is None or last[0] != key:
            self._last_core = None  # a failed computation leaves the arrays half written
            last = self._last_core = (key, self._compute_core(theta, ws))
        return last[1]

    def _fused(self, J: list[int]) -> bool:
        """The compiled one-pass core and gradient sums (`_levels_jit.core_sums2`): a random
        intercept and slope off the boundary, many groups (numba's import and loading its two
        kernels cost 0.27 s once, measured: below FUSED_MIN_LEVELS groups that is not won
        back)."""
        return self.stats.q == 2 and len(J) == 2 and self.stats.m >= FUSED_MIN_LEVELS

    def _compute_core(self, theta: np.ndarray, ws: _Workspace):
        s = self.stats
        p, m = s.p, s.m
        T = self.theta_map.T(np.asarray(theta, dtype=float))
        J = [c for c in range(s.q) if np.any(T[:, c])]
        TJ, qa = T[:, J], len(J)
        if self._fused(J):
            from ._levels_jit import core_sums2

            L, R = ws("L", (2, 2, m)), ws("R", (p + 1, 2, m))
            rr, logdet, ok = core_sums2(self._S, self._G, TJ, L, R)
            if not ok or not np.isfinite(logdet):
                raise linalg.LinAlgError("a diagonal block is not positive definite")
            return T, J, L, R, self._M0 - rr, logdet
        t = ws("t", (m,))
        # T'S T + I is built in the gradient's scratch C (free until `gradient_sums`)
        L = chol_scaled(self._S, TJ, out=ws("L", (qa, qa, m)), work=ws("C", (qa, qa, m)), tmp=t)
        # R_aug is (p+1, |J|, m) so that each row R_aug[j] is one contiguous (|J|·m) vector
        # for the sums below; the algebra writes it through its (|J|, p+1, m) view
        R = ws("R", (p + 1, qa, m))
        Rq = R.transpose(1, 0, 2)
        tG = ws("tG", (p + 1, m))
        const_matmul(TJ.T, self._G, out=Rq, tmp=tG)
        solve_lower(L, Rq, out=Rq, tmp=tG)
        M = self._M0.copy()
        flat = R.reshape(p + 1, qa * m)
        for j in range(p + 1):
            for k in range(j + 1):
                v = vdot(flat[j], flat[k])
                M[j, k] -= v
                if j != k:
                    M[k, j] -= v
        return T, J, L, R, M, logdet_chol(L, tmp=t) if qa else 0.0

    def _profile(self, M: np.ndarray):
        return profile_fixed(M, self.stats.p)

    def decompose(self, theta: np.ndarray, beta: np.ndarray | None = None) -> Decomposition:
        """Everything at θ.  `beta`: β̂ given, not profiled (a Dask worker's share of the
        groups, whose β̂ is the whole data's; R_X and r² are then None)."""
        s = self.stats
        q, p, m = s.q, s.p, s.m
        with self._lock:  # L and R are handed out: fresh arrays
            T, J, L, R, M, logdet_l = self._core(theta, self._ws.handing_out("L", "R"))
        if len(J) < q:  # the dropped random effects' rows: L's the identity's, R's zero
            L_J, R_J = L, R
            L, R = np.zeros((q, q, m)), np.zeros((p + 1, q, m))
            L[range(q), range(q)] = 1.0
            L[np.ix_(J, J)] = L_J
            R[:, J] = R_J
        if beta is None:
            xtx_adj, rx, beta, r2, logdet_rx = self._profile(M)
        else:
            xtx_adj = rx = r2 = logdet_rx = None
        # R is (p+1, q, m): hand out (q, p, m) and (q, m) views
        return Decomposition(np.asarray(theta, float), T, L, R[:p].transpose(1, 0, 2), R[p],
                             xtx_adj, rx, beta, r2, logdet_l, logdet_rx)

    def _deviance(self, r2: float, logdet_l: float, logdet_rx: float) -> float:
        # case weights: lme4's criterion has -Σ log w_i (the residual covariance σ² W⁻¹)
        return profiled_deviance(r2, logdet_l, logdet_rx, self.stats.n, self.stats.p,
                                 self.reml) - self.stats.log_weights

    def parts_at(self, theta: np.ndarray) -> tuple[float, float, float]:
        """(r², log|L|², log|R_X|²) at θ (as `BlockedObjective.parts_at`)."""
        with self._lock:
            M, logdet_l = self._core(theta, self._ws)[-2:]
        _xtx, _rx, _beta, r2, logdet_rx = self._profile(M)
        return r2, logdet_l, logdet_rx

    def deviance_of(self, dec: Decomposition) -> float:
        return self._deviance(dec.r2, dec.logdet_l, dec.logdet_rx)

    def __call__(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        try:
            with np.errstate(invalid="raise", divide="raise"), self._lock:
                M, logdet_l = self._core(theta, self._ws)[-2:]
                _xtx, _rx, _beta, r2, logdet_rx = self._profile(M)
                self.last_value = float(self._deviance(r2, logdet_l, logdet_rx))
                return self.last_value
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
        self.last_value = f
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
        # the latest θ's parts are kept (fresh arrays, never written again): Satterthwaite's
        # Hessian asks for them at θ̂, where the optimizer's last gradient was taken
        key = (theta.tobytes(), with_rx)
        last = self._last_parts
        if last is not None and last[0] == key:
            return last[1]
        T, J, L, _R, M, logdet_l = self._core(theta, self._ws)
        _xtx, rx, beta, r2, logdet_rx = self._profile(M)
        if not np.isfinite(r2) or r2 <= 0:
            raise linalg.LinAlgError("the penalized residual sum of squares is not positive")
        g_ld, g_r2, g_rx = self.gradient_sums(T, J, L, beta, rx, with_rx)
        parts = Parts(logdet_l, logdet_rx, r2, g_ld, g_rx, g_r2)
        self._last_parts = (key, parts)
        return parts

    def gradient_sums(self, T: np.ndarray, J: list[int], L: np.ndarray, beta: np.ndarray,
                      rx: np.ndarray, with_rx: bool):
        """The sums over groups of the gradient (∂log|L|², ∂r², ∂log|R_X|² — NaN without
        `with_rx`) at the core's T, J, L and the profiled β̂, R_X.  Each is a sum of per-group
        terms, so a subset of the groups (a Dask worker's, mlpipe/engines/dask_solve.py) gives
        its share when β̂ and R_X are the whole data's."""
        s = self.stats
        q, p, m = s.q, s.p, s.m
        S, G, ws = self._S, self._G, self._ws
        TJ, qa = T[:, J], len(J)
        if self._fused(J):
            return self._gradient_sums_fused(TJ, L, beta, rx, with_rx)
        t, tq = ws("t", (m,)), ws("tq", (q, m))
        # Q = A⁻¹T' per group: its rows on J, L⁻ᵀL⁻¹T_J' (|J|, q, m) — the others are zero —
        # and its columns where T's rows are zero are zero
        Q = solve_lower(L, TJ.T[:, :, None], out=ws("Q", (qa, q, m)), tmp=tq)
        solve_lower_t(L, Q, out=Q, tmp=tq)
        nz = [a for a in range(q) if np.any(T[a])]
        # r_i = Z_i'y_i − Z_i'X_i β̂ (q, m);  û = Q r (on J);  v = r − S T û
        gamma = np.append(-beta, 1.0)
        r = ws("r", (q, m))
        for a in range(q):
            np.einsum("j,jm->m", gamma, G[a], out=r[a])
        u = matmul(Q, r, inner=nz, out=ws("u", (qa, m)), tmp=t)
        lu = const_matmul(TJ, u, out=ws("lu", (q, m)), tmp=t)
        v = matmul(S, lu, out=ws("v", (q, m)), tmp=t)
        np.subtract(r, v, out=v)
        rows, cols = self.theta_map.rows, self.theta_map.cols
        on_j = [J.index(cc) if cc in J else None for cc in cols]  # row of Q and û, or zero
        k = len(rows)
        g_ld = np.zeros(k)
        g_r2 = np.zeros(k)
        for idx, (rr, i) in enumerate(zip(rows, on_j)):
            if i is not None:
                g_ld[idx] = 2.0 * vdot(S[rr].reshape(-1), Q[i].reshape(-1))
                g_r2[idx] = -2.0 * vdot(v[rr], u[i])
        if not with_rx:
            return g_ld, g_r2, np.full(k, np.nan)
        # C_i = Z_i'X_i (R_X'R_X)⁻¹ X_i'Z_i = Y_i Y_i',  Y[a] = R_X⁻ᵀ (Z'X)[a]: (q, p, m)
        rinv, info = linalg.lapack.dtrtri(rx, lower=0)
        if info != 0:
            raise linalg.LinAlgError("R_X is singular")
        Y = ws("Y", (q, p, m))
        for a in range(q):
            np.einsum("lj,lm->jm", rinv, G[a, :p], out=Y[a])
        C = gram(Y, out=ws("C", (q, q, m)))
        # term_k = Σ_i (Q C V)[c, r] with V = I − T N, N = Q S:
        #        = Σ_i K[c, r] − Σ_b Σ_i K[c, b] (T N)[b, r],   K = Q C  (rows on J)
        K = matmul(Q, C, inner=nz, out=ws("K", (qa, q, m)), tmp=tq)
        N = matmul(Q, S, inner=nz, out=C[:qa], tmp=tq)  # C is not needed after K
        TN = const_matmul(TJ, N, out=ws("TN", (q, q, m)), tmp=tq)
        g_rx = np.zeros(k)
        for idx, (rr, i) in enumerate(zip(rows, on_j)):
            if i is not None:
                tot = float(np.sum(K[i, rr]))
                for b in range(q):
                    tot -= vdot(K[i, b], TN[b, rr])
                g_rx[idx] = -2.0 * tot
        return g_ld, g_r2, g_rx

    def _gradient_sums_fused(self, TJ: np.ndarray, L: np.ndarray, beta: np.ndarray,
                             rx: np.ndarray, with_rx: bool):
        """`gradient_sums` by the compiled pass (`_levels_jit.gradient_sums2`)."""
        from ._levels_jit import gradient_sums2

        rinv = None
        if with_rx:
            rinv, info = linalg.lapack.dtrtri(rx, lower=0)
            if info != 0:
                raise linalg.LinAlgError("R_X is singular")
        N, VU, KV = gradient_sums2(self._S, self._G, TJ, L, np.append(-beta, 1.0), rinv)
        rows, cols = self.theta_map.rows, self.theta_map.cols
        g_ld = np.array([2.0 * N[c, r] for r, c in zip(rows, cols)])
        g_r2 = np.array([-2.0 * VU[r, c] for r, c in zip(rows, cols)])
        g_rx = np.array([-2.0 * KV[c, r] for r, c in zip(rows, cols)]) if with_rx \
            else np.full(len(rows), np.nan)
        return g_ld, g_r2, g_rx

    def linear_parts_adjoint(self, theta: np.ndarray) -> list[np.ndarray]:
        """The derivative of the deviance at θ with respect to each array of `linear_parts`
        (Z'Z, Z'[X y], [X y]'[X y]), as arrays of their shapes: the deviance changes by
        Σ ⟨adjoint, δ part⟩ for a change δ of the statistics (symmetric in Z'Z); the arrays
        are the work space's, valid until the next evaluation.  A residual
        structure's statistics are linear in its weights, so this gives the criterion's
        exact derivative in ψ (mlpipe/residual.py, JointObjective).

        With H_i = T A_i⁻¹ T', P_i = H_i G_i, γ = (−β̂, 1) and Φ = c γγ' (+ (R_X'R_X)⁻¹ on
        the X block under REML), c = (n − p)/r² (REML) or n/r² (ML):
        ∂d/∂S_i = H_i + P_i Φ P_i',  ∂d/∂G_i = −2 P_i Φ,  ∂d/∂M0 = Φ.
        Raises LinAlgError where the deviance is undefined."""
        s = self.stats
        q, p, m = s.q, s.p, s.m
        with np.errstate(invalid="raise", divide="raise"), self._lock:
            try:
                T, J, L, R, M, _ld = self._core(np.asarray(theta, float), self._ws)
                _xtx, rx, beta, r2, _lrx = self._profile(M)
                if not np.isfinite(r2) or r2 <= 0:
                    raise linalg.LinAlgError("the penalized residual sum of squares is not "
                                             "positive")
                gamma = np.append(-beta, 1.0)
                phi = ((s.n - p) if self.reml else s.n) / r2 * np.outer(gamma, gamma)
                if self.reml:
                    phi[:p, :p] += linalg.cho_solve((rx, False), np.eye(p))
                TJ, qa = T[:, J], len(J)
                # the adjoint is read before the next evaluation; its (q, q, m) and
                # (|J|, q, m) arrays are the gradient's scratch C, TN and Q (not read after
                # `gradient_sums` returns): ~3 such arrays less memory at 1M groups
                ws = self._ws
                dS, dG = ws("C", (q, q, m)), ws("adj_G", (q, p + 1, m))
                if qa:
                    tG = ws("tG", (p + 1, m))
                    W = solve_lower_t(L, R.transpose(1, 0, 2), out=ws("adj_W", (qa, p + 1, m)),
                                      tmp=tG)
                    P = const_matmul(TJ, W, out=ws("adj_P", (q, p + 1, m)), tmp=tG)
                    B = solve_lower(L, TJ.T[:, :, None], out=ws("Q", (qa, q, m)),
                                    tmp=ws("tq", (q, m)))  # L⁻¹T_J'
                    np.einsum("kam,kbm->abm", B, B, out=dS)  # H
                    np.einsum("ajm,jk->akm", P, phi, out=dG)  # P Φ
                    dS += np.einsum("akm,bkm->abm", dG, P, out=ws("TN", (q, q, m)))
                    dG *= -2.0
                else:
                    dS.fill(0.0)
                    dG.fill(0.0)
            except FloatingPointError as exc:
                raise linalg.LinAlgError(str(exc)) from None
        return [dS, dG, phi]

    # ------------------------------------------------------------------ helpers
    def sigma(self, dec: Decomposition) -> float:
        dof = self.stats.n - (self.stats.p if self.reml else 0)
        return float(np.sqrt(dec.r2 / dof))

    def moment_start(self) -> np.ndarray | None:
        """A moment estimate of θ: a cheap starting value for the optimizer (None if none);
        see `moment_estimate`."""
        est = self.moment_estimate()
        return None if est is None else est[0]

    def moment_estimate(self) -> tuple[np.ndarray, float] | None:
        """(θ, σ̂²) by the method of moments, σ̂² the within-group residual variance θ is
        relative to (None if there is no estimate).

        β from OLS; per group the least-squares random effects b̂_i = S_i⁻¹ r_i (groups whose
        S_i = Z_i'Z_i is numerically singular are left out); then Cov(b) ≈ mean(b̂ b̂') −
        σ̂² mean(S_i⁻¹) and θ from chol(Cov(b) / σ̂²), restricted to the block structure and
        made positive definite.  The sums over groups are `moment_sums` (a subset of the
        groups gives its share), the rest `moment_theta`.
        """
        s = self.stats
        try:
            with np.errstate(all="ignore"):
                beta = np.linalg.solve(s.xtx, s.xty)
        except np.linalg.LinAlgError:
            return None
        return moment_theta(self.theta_map, s, beta, self.moment_sums(beta))

    def moment_sums(self, beta: np.ndarray):
        """(groups used, Σ r_i'b̂_i, Σ b̂_i b̂_i' (q×q), Σ S_i⁻¹ (q×q)) over this objective's
        groups at the OLS β (see `moment_start`)."""
        q = self.stats.q
        with np.errstate(all="ignore"):
            gamma = np.append(-beta, 1.0)
            r = np.einsum("j,ajm->am", gamma, self._G)
            # Cholesky of S_i; ok where every pivot is well away from zero
            L, ok = chol_masked(self._S, 1e-8)
            # S⁻¹ = L⁻ᵀ L⁻¹ (0 for the groups left out) and b̂ = S⁻¹ r
            Sinv = np.where(ok, inv_from_chol(L), 0.0)
            bh = matmul(Sinv, r)
            within = vdot(r.reshape(-1), bh.reshape(-1))
            bb = np.array([[vdot(bh[a], bh[b]) for b in range(q)] for a in range(q)])
            ss = np.array([[float(np.sum(Sinv[a, b])) for b in range(q)] for a in range(q)])
        return int(ok.sum()), float(within), bb, ss


def moment_theta(theta_map: ThetaMap, stats: Statistics, beta: np.ndarray,
                 sums) -> tuple[np.ndarray, float] | None:
    """`Objective.moment_estimate`'s (θ, σ̂²) from the totals of `stats`, the OLS β and
    the `moment_sums` over all groups (None when they give no estimate)."""
    k_ok, within, bb, ss = sums
    q, p = stats.q, stats.p
    if k_ok < max(q + 1, 2):
        return None
    try:
        with np.errstate(all="ignore"):
            rss_tot = stats.yty - 2 * beta @ stats.xty + beta @ stats.xtx @ beta
            dof = stats.n - q * k_ok - p
            if dof <= 0:
                return None
            sigma2 = (rss_tot - within) / dof
            if not np.isfinite(sigma2) or sigma2 <= 0:
                return None
            cov = (bb - sigma2 * ss) / k_ok
            if not np.all(np.isfinite(cov)):
                return None
            theta = theta_map.from_covariance(cov / sigma2)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(theta)):
        return None
    return theta, float(sigma2)
