"""The compiled one-pass core and gradient of the one-factor objective (q = 2, many groups:
`Objective._fused`, `_levels_jit.core_sums2` / `gradient_sums2`) against its NumPy steps.
The threshold FUSED_MIN_LEVELS is lowered here so that the small reference data take it."""

from __future__ import annotations

import numpy as np
import pytest

import mlpipe
from conftest import DATA
from mlpipe import objective
from mlpipe.objective import Objective
from mlpipe.stats import compute_statistics

CASES = [
    ("sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)", {}),
    ("sleepstudy.parquet", "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", {}),
    ("hsb82.parquet", "mAch ~ meanses * cses + sector * cses + (cses | school)", {}),
    ("oxboys.parquet", "height ~ age + (age | Subject)",
     {"correlation": "ar1(Occasion | Subject)"}),
]


@pytest.mark.parametrize("path, formula, extra", CASES,
                         ids=["sleepstudy", "sleepstudy-diag", "hsb", "oxboys-ar1"])
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_fused_core_and_gradient_equal_the_numpy_steps(path, formula, extra, reml,
                                                       monkeypatch):
    st = compute_statistics(DATA / path, formula, **extra)
    plain = Objective(st, reml=reml)
    monkeypatch.setattr(objective, "FUSED_MIN_LEVELS", 0)
    fused = Objective(st, reml=reml)
    assert fused._fused([0, 1])
    rng = np.random.default_rng(7)
    x0 = np.asarray(plain.theta_map.initial, dtype=float)
    for _ in range(3):
        x = x0 * rng.uniform(0.3, 2.0, len(x0)) + 0.05 * rng.normal(size=len(x0))
        monkeypatch.setattr(objective, "FUSED_MIN_LEVELS", 10**12)
        f1, g1 = plain.value_and_gradient(x)
        p1 = plain.parts(x)
        monkeypatch.setattr(objective, "FUSED_MIN_LEVELS", 0)
        f2, g2 = fused.value_and_gradient(x)
        p2 = fused.parts(x)
        assert abs(f1 - f2) <= 1e-11 * abs(f1)
        np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-10 * max(1.0, np.max(np.abs(g1))))
        for a in ("d_logdet_l", "d_logdet_rx", "d_r2"):
            np.testing.assert_allclose(getattr(p2, a), getattr(p1, a), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose([p2.r2, p2.logdet_l, p2.logdet_rx],
                                   [p1.r2, p1.logdet_l, p1.logdet_rx], rtol=1e-11)
        d1, d2 = plain.decompose(x), fused.decompose(x)
        np.testing.assert_allclose(d2.L, d1.L, rtol=0, atol=1e-12)
        np.testing.assert_allclose(d2.rzx, d1.rzx, rtol=0, atol=1e-9)
        np.testing.assert_allclose(d2.cu, d1.cu, rtol=0, atol=1e-9)


def test_fused_fit_equals_the_numpy_fit(monkeypatch):
    """The whole fit (optimizer, Satterthwaite) with the compiled pass: the same answer."""
    path, formula = DATA / "sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)"
    a = mlpipe.fit(path, formula)
    monkeypatch.setattr(objective, "FUSED_MIN_LEVELS", 0)
    b = mlpipe.fit(path, formula)
    assert abs(a.deviance - b.deviance) <= 1e-12 * abs(a.deviance)
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-7)
    np.testing.assert_allclose(b.fixed_effects["df"].to_numpy(),
                               a.fixed_effects["df"].to_numpy(), rtol=1e-6)


def test_a_block_that_is_not_positive_definite_is_refused(monkeypatch):
    monkeypatch.setattr(objective, "FUSED_MIN_LEVELS", 0)
    st = compute_statistics(DATA / "sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)")
    obj = Objective(st)
    assert obj(np.array([1.0, np.nan, 1.0])) == np.inf
