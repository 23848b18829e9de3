"""The compiled per-level kernels of the several-factor solver (mlpipe/_levels_jit.py, the
leading factor's kernels of mlpipe/_schur.py) against plain NumPy, for q = 1, 2 (spelled-out
branches) and 3, 4 (the general loops), on random data."""

from __future__ import annotations

import numpy as np
import pytest

from mlpipe import _levels_jit as lj
from mlpipe import _schur

QS = [1, 2, 3, 4]


def _spd(rng, q, m):
    a = rng.normal(size=(m, q, q))
    return np.einsum("mab,mcb->mac", a, a)  # (m, q, q) positive semidefinite


@pytest.mark.parametrize("q", QS)
def test_lead_factor_is_the_inverse_cholesky_of_t_s_t_plus_i(q):
    rng = np.random.default_rng(q)
    m = 257
    S = _spd(rng, q, m)
    T = np.tril(rng.normal(size=(q, q)))
    inv, logdet = lj.lead_factor(np.ascontiguousarray(np.moveaxis(S, 0, -1)), T)
    A = np.einsum("ca,mcd,db->mab", T, S, T) + np.eye(q)
    L = np.linalg.cholesky(A)
    np.testing.assert_allclose(inv, np.linalg.inv(L), rtol=1e-10, atol=1e-12)
    assert logdet == pytest.approx(float(np.sum(np.linalg.slogdet(A)[1])), rel=1e-12)
    bad = np.ascontiguousarray(np.moveaxis(S, 0, -1))
    bad[0, 0, 5] = -1e6  # not positive definite at level 5
    with pytest.raises(np.linalg.LinAlgError):
        lj.lead_factor(bad, np.eye(q))


@pytest.mark.parametrize("q", QS)
def test_level_and_shared_products(q):
    rng = np.random.default_rng(10 + q)
    m, r = 301, 3
    A, B, T = rng.normal(size=(m, q, q)), rng.normal(size=(m, q, r)), rng.normal(size=(q, q))
    np.testing.assert_allclose(lj.level_matmul(A, B, False), A @ B, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lj.level_matmul(A, B, True), np.swapaxes(A, 1, 2) @ B,
                               rtol=1e-12, atol=1e-13)
    out = np.empty((m, q, r))
    assert lj.shared_matmul(T, B, out=out) is out
    np.testing.assert_allclose(out, T[None] @ B, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("q", QS)
def test_pair_products_traces_and_sums(q):
    rng = np.random.default_rng(20 + q)
    qk, n, mj, mk, r = 2, 500, 40, 90, 3
    rows, cols = rng.integers(0, mj, n), rng.integers(0, mk, n)
    bt = rng.normal(size=(q, qk, n))
    Q = mj * q + mk * qk
    v = rng.normal(size=(Q, r))
    out = np.zeros((Q, r))
    lj.pair_product(out, v, rows, cols, bt, 0, mj * q, True)
    dense = np.zeros((Q, Q))
    for t in range(n):
        i, k = rows[t] * q, mj * q + cols[t] * qk
        dense[i:i + q, k:k + qk] += bt[:, :, t]
    dense = dense + dense.T
    np.testing.assert_allclose(out, dense @ v, rtol=1e-10, atol=1e-10)
    diag = rng.normal(size=(q, q, mj))
    out = np.zeros((Q, r))
    lj.pair_product(out, v, np.arange(mj), np.arange(mj), diag, 0, 0, False)
    want = np.einsum("abm,mbr->mar", diag, v[:mj * q].reshape(mj, q, r)).reshape(-1, r)
    np.testing.assert_allclose(out[:mj * q], want, rtol=1e-10, atol=1e-12)
    om = rng.normal(size=(n, q, qk)).transpose(1, 2, 0)  # a strided view, as in the solver
    np.testing.assert_allclose(lj.pair_traces(om, bt), np.einsum("abn,cdn->abcd", om, bt),
                               rtol=1e-10, atol=1e-10)
    cells, m = 700, 60
    ztz = rng.normal(size=(q + 1, q + 1, cells))
    index = rng.integers(0, m, cells)
    zj, zk = np.arange(q), np.array([q])
    blocks = np.zeros((q, 1, m))
    lj.pair_sums(ztz, zj, zk, index, blocks)
    for a in range(q):
        np.testing.assert_allclose(blocks[a, 0], np.bincount(index, ztz[a, q], minlength=m),
                                   rtol=1e-12, atol=1e-12)
    p = 2
    ztx, zty = rng.normal(size=(q + 1, p, cells)), rng.normal(size=(q + 1, cells))
    g = np.zeros((m, q, p + 1))
    lj.level_sums_xy(ztx, zty, zj, index, g)
    for a in range(q):
        for c in range(p):
            np.testing.assert_allclose(g[:, a, c], np.bincount(index, ztx[a, c], minlength=m),
                                       rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g[:, a, p], np.bincount(index, zty[a], minlength=m),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", QS)
def test_scaled_entries_and_omega_levels(q):
    """B̃ = T_j' B T_0 L⁻ᵀ per block, and Ω₁₁ = L⁻ᵀ(I + Σ B̃'H)L⁻¹, −H L⁻¹ per level."""
    rng = np.random.default_rng(30 + q)
    m1, qj = 50, q
    cols = np.repeat(np.arange(m1), 2)  # two blocks per level (level order)
    n = len(cols)
    bt = rng.normal(size=(qj, q, n))
    Tj, T0 = np.tril(rng.normal(size=(qj, qj))), np.tril(rng.normal(size=(q, q)))
    Li = np.linalg.inv(np.linalg.cholesky(np.eye(q) + _spd(rng, q, m1)))
    out = np.empty((n * qj, q))
    _schur._scaled_entries(out, bt, cols, Tj, T0, Li, _schur._NO_POS, 0)
    want = np.einsum("ca,cdn,db->nab", Tj, bt, T0)  # (n, qj, q): T_j' B T0
    want = np.einsum("nab,ncb->nac", want, Li[cols])  # · L⁻ᵀ
    np.testing.assert_allclose(out, want.reshape(n * qj, q), rtol=1e-10, atol=1e-12)
    lv_starts = np.arange(0, n * qj + 1, 2 * qj).astype(np.int64)
    H = rng.normal(size=(n * qj, q))
    H0 = H.copy()
    om11 = _schur._omega_levels(Li, lv_starts, out, H)
    for i in range(m1):
        e = slice(lv_starts[i], lv_starts[i + 1])
        K = np.eye(q) + out[e].T @ H0[e]
        np.testing.assert_allclose(om11[:, :, i], Li[i].T @ K @ Li[i], rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(H[e], -H0[e] @ Li[i], rtol=1e-10, atol=1e-12)
