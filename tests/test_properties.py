"""Property tests (hypothesis): statistics add up over any split of the rows, the fit does not
depend on row order or on how the rows are spread over Parquet files, and the deviance from
statistics equals a dense marginal-likelihood computation for random data and random θ."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mlpipe
from conftest import dense_deviance, level_major_z
from mlpipe.blocked import BlockedObjective
from mlpipe.objective import Objective
from mlpipe.stats import compute_statistics

FORMULAS = {
    "one_factor": "y ~ x + (x | a)",
    "crossed": "y ~ x + (x | a) + (1 | b)",
    "nested": "y ~ x + (1 | a/b)",
}

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                print_blob=False, derandomize=True, database=None)


def _data(seed: int, n: int) -> dict:
    """Random rows: a (6 levels, integers), b (4 levels, strings; crossed with a, and nested
    under a when read as a/b), numeric x and y with effects on both factors."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, n)
    b = rng.integers(0, 4, n)
    x = rng.normal(size=n)
    y = (1 + 0.5 * x + rng.normal(size=6)[a] * (1 + 0.5 * x) + 0.7 * rng.normal(size=4)[b]
         + rng.normal(size=n))
    return {"y": y, "x": x, "a": a, "b": np.array([f"b{v}" for v in b])}


def _write(cols: dict, path: Path, rows=None) -> Path:
    table = pa.table({k: (v if rows is None else v[rows]) for k, v in cols.items()})
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------- (a) additivity

@pytest.mark.parametrize("model", sorted(FORMULAS))
@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(40, 120), data=st.data())
def test_statistics_add_up_over_any_split(model, seed, n, data):
    formula = FORMULAS[model]
    cols = _data(seed, n)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    # every part must itself be a model the statistics pass accepts: ≥ 2 levels per factor
    for part in (mask, ~mask):
        assume(part.sum() >= 4)
        assume(len(set(cols["a"][part])) >= 2 and len(set(cols["b"][part])) >= 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        whole = compute_statistics(_write(cols, tmp / "all.parquet"), formula)
        one = compute_statistics(_write(cols, tmp / "p1.parquet", mask), formula)
        two = compute_statistics(_write(cols, tmp / "p2.parquet", ~mask), formula)
    merged = one.merge(two)
    assert merged.n == whole.n == n and merged.m == whole.m
    np.testing.assert_array_equal(merged.n_i, whole.n_i)
    for name in ("ztz", "ztx", "zty", "yty_i"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name),
                                   rtol=1e-12, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(merged.xtx, whole.xtx, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.xty, whole.xty, rtol=1e-12, atol=1e-9)
    assert merged.yty == pytest.approx(whole.yty, rel=1e-12)
    assert len(merged.factors) == len(whole.factors)
    for f, g in zip(merged.factors, whole.factors):
        assert list(f.levels) == list(g.levels)
        np.testing.assert_array_equal(f.index, g.index)
    if not whole.factors:
        assert list(merged.levels) == list(whole.levels)


# ---------------------------------------------------------------- (b) invariance

def _close(a, b, rel=1e-9, abs_=1e-9):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rel, atol=abs_)


@pytest.mark.parametrize("model", sorted(FORMULAS))
@settings(max_examples=8, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(60, 150), data=st.data())
def test_fit_invariant_to_row_order_and_files(model, seed, n, data):
    formula = FORMULAS[model]
    cols = _data(seed, n)
    perm = np.array(data.draw(st.permutations(range(n))))
    k = data.draw(st.integers(2, 5), label="files")
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1,
                                     unique=True), label="cuts"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = mlpipe.fit(_write(cols, tmp / "one.parquet"), formula, ddf=None)
        parts = tmp / "parts"
        parts.mkdir()
        for i, rows in enumerate(np.split(perm, cuts)):
            _write(cols, parts / f"part{i}.parquet", rows)
        many = mlpipe.fit(parts, formula, ddf=None)
    assert one.converged and many.converged
    assert many.nobs == one.nobs == n and many.groups == one.groups
    assert many.deviance == pytest.approx(one.deviance, rel=1e-9)
    _close(many.fixed_effects["estimate"].to_numpy(), one.fixed_effects["estimate"].to_numpy())
    _close(many.fixed_effects["std_error"].to_numpy(), one.fixed_effects["std_error"].to_numpy())
    _close(many.random_effects["variance"].to_numpy(), one.random_effects["variance"].to_numpy(),
           abs_=1e-9 * one.sigma ** 2)
    assert many.sigma == pytest.approx(one.sigma, rel=1e-9)


# ---------------------------------------------------------------- (c) dense deviance

def _random_theta(draw_floats, theta_map):
    diag = np.asarray(theta_map.diagonal)
    theta = np.asarray(draw_floats(len(diag)), dtype=float)
    # diagonal entries of the relative covariance factor are ≥ 0
    theta[diag] = np.abs(theta[diag]) + 0.05
    return theta


def _theta_strategy(data):
    return lambda k: data.draw(st.lists(st.floats(-1.5, 1.5), min_size=k, max_size=k),
                               label="theta")


@pytest.mark.parametrize("reml", [True, False])
@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(3, 10), data=st.data())
def test_one_factor_deviance_matches_dense(reml, seed, m, data):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, size=m)
    g = np.repeat(np.arange(m), sizes)
    n = len(g)
    assume(n >= 2 * m + 3)
    x = rng.normal(size=n)
    y = 1 + x + rng.normal(size=m)[g] * (1 + x) + rng.normal(size=n)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write({"y": y, "x": x, "g": np.array([f"g{k:02d}" for k in g])},
                      Path(tmp) / "d.parquet")
        stats = compute_statistics(path, "y ~ x + (x | g)")
    obj = Objective(stats, reml=reml)
    X = np.column_stack([np.ones(n), x])
    theta = _random_theta(_theta_strategy(data), obj.theta_map)
    dense = dense_deviance(y, X, [level_major_z(g, [np.ones(n), x])],
                           [obj.theta_map.T(theta)], reml)
    assert obj(theta) == pytest.approx(dense, rel=1e-9)


def _factor_keys(cols, f, n):
    return np.array([":".join(str(cols[c][i]) for c in f.columns) for i in range(n)])


@pytest.mark.parametrize("model", ["crossed", "nested"])
@pytest.mark.parametrize("reml", [True, False])
@settings(max_examples=12, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(30, 90), data=st.data())
def test_several_factor_deviance_matches_dense(model, reml, seed, n, data):
    cols = _data(seed, n)
    assume(len(set(cols["a"])) >= 2 and len(set(cols["b"])) >= 2)
    with tempfile.TemporaryDirectory() as tmp:
        stats = compute_statistics(_write(cols, Path(tmp) / "d.parquet"), FORMULAS[model])
    assert stats.general
    obj = BlockedObjective(stats, reml=reml)
    X = np.column_stack([np.ones(n), cols["x"]])
    one = {"(Intercept)": np.ones(n), "x": cols["x"]}
    Zs = []
    for f in obj.factors:
        order = {lab: i for i, lab in enumerate(f.levels)}
        idx = np.array([order[k] for k in _factor_keys(cols, f, n)])
        Zs.append(level_major_z(idx, [one[name] for name in f.names]))
    theta = _random_theta(_theta_strategy(data), obj.theta_map)
    dense = dense_deviance(cols["y"], X, Zs, obj.T_blocks(theta), reml)
    assert obj(theta) == pytest.approx(dense, rel=1e-9)
