"""The deviance from sufficient statistics equals a dense computation from the raw rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import dense_deviance, level_major_z
from mlpipe.objective import Objective
from mlpipe.stats import compute_statistics


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("reml", [True, False])
def test_statistics_deviance_matches_dense(tmp_path, seed, reml):
    rng = np.random.default_rng(seed)
    m = 12
    sizes = rng.integers(2, 9, size=m)
    g = np.repeat(np.arange(m), sizes)
    n = len(g)
    x = rng.normal(size=n)
    z2 = rng.normal(size=n)
    w = rng.normal(size=m)[g]
    cat = rng.choice(["a", "b", "c"], size=n)
    y = 1 + 0.5 * x - w + rng.normal(size=m)[g] * (1 + x) + rng.normal(size=n) + (cat == "b")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"y": y, "x": x, "z2": z2, "w": w, "cat": cat,
                             "g": [f"g{k:02d}" for k in g]}), path)
    stats = compute_statistics(path, "y ~ x * w + cat + (1 + x | g) + (0 + z2 | g)")
    assert stats.fixed_names == ["(Intercept)", "x", "w", "catb", "catc", "x:w"]
    assert stats.random_names == ["(Intercept)", "x", "z2"]
    X = np.column_stack([np.ones(n), x, w, cat == "b", cat == "c", x * w]).astype(float)
    Z = np.column_stack([np.ones(n), x, z2])
    obj = Objective(stats, reml=reml)
    for _ in range(4):
        theta = rng.uniform(0.1, 1.5, size=len(obj.theta_map))
        theta[~obj.theta_map.diagonal] = rng.normal(size=(~obj.theta_map.diagonal).sum())
        T = obj.theta_map.T(theta)
        dense = dense_deviance(y, X, [level_major_z(g, list(Z.T))], [T], reml)
        assert obj(theta) == pytest.approx(dense, rel=1e-10)
