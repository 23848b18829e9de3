"""Appendable statistics stores (mlpipe/store.py): creating a store, appending partitions in
any split of the rows (groups spanning partitions, one factor and crossed factors), the fit
from the store equal to the fit of all rows, and the refusals that leave the store as it
was (the same input twice, a new categorical level, formulas and structures that cannot be
appended)."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe import store
from mlpipe.cli import main
from mlpipe.errors import DataError, InputError


def _frame(seed: int = 0, n: int = 3000) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 60, n)
    h = rng.integers(0, 25, n)
    x = rng.normal(size=n)
    sector = np.where(rng.random(n) < 0.4, "public", "private")
    y = 1 + 0.5 * x + (sector == "public") + rng.normal(0, 0.7, 60)[g] * (1 + 0.3 * x) \
        + rng.normal(0, 0.5, 25)[h] + rng.normal(size=n)
    return pl.DataFrame({"g": g, "h": [f"h{v}" for v in h], "x": x, "sector": sector, "y": y})


def _split(frame: pl.DataFrame, tmp_path, parts: int, seed: int) -> list:
    """Rows dealt at random to `parts` files: every group spans several of them."""
    rng = np.random.default_rng(seed)
    part = rng.integers(0, parts, frame.height)
    paths = []
    for k in range(parts):
        p = tmp_path / f"part{k}.parquet"
        frame.filter(pl.Series(part == k)).write_parquet(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("formula", ["y ~ x + sector + (x | g)",
                                     "y ~ x + sector + (1 | g) + (1 | h)"])
@pytest.mark.parametrize("parts", [2, 4])
def test_appends_equal_the_statistics_of_all_rows(tmp_path, formula, parts):
    frame = _frame()
    full = tmp_path / "all.parquet"
    frame.write_parquet(full)
    paths = _split(frame, tmp_path, parts, seed=parts)
    st = tmp_path / "store.parquet"
    store.create(paths[0], formula, st)
    for p in paths[1:]:
        store.append(p, st)
    assert [r["path"] for r in store.stored_inputs(st)] == [str(p.resolve()) for p in paths]
    a = mlpipe.fit(stats=st, ddf=None)
    b = mlpipe.fit(full, formula, ddf=None)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-10)
    np.testing.assert_allclose(a.fixed_effects["estimate"].to_numpy(),
                               b.fixed_effects["estimate"].to_numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.random_effects["variance"].to_numpy(),
                               b.random_effects["variance"].to_numpy(), rtol=1e-8)
    assert a.nobs == b.nobs == frame.height


def test_refusals_leave_the_store_unchanged(tmp_path, capsys):
    frame = _frame(seed=1)
    paths = _split(frame, tmp_path, 3, seed=1)
    st = tmp_path / "store.parquet"
    assert main(["stats", str(paths[0]), "-f", "y ~ x + sector + (1 | g)", "--out", str(st)]) == 0
    assert "1 input files" in capsys.readouterr().out
    assert main(["stats", str(paths[1]), "--append-to", str(st)]) == 0
    before = st.read_bytes()
    # the same content again, under its own name and under another
    copy = tmp_path / "renamed.parquet"
    shutil.copy(paths[1], copy)
    for again in (paths[1], copy):
        assert main(["stats", str(again), "--append-to", str(st)]) == 2
        assert "is already in the store" in capsys.readouterr().err
        assert st.read_bytes() == before
    # a level of sector the store's coding does not have
    odd = tmp_path / "odd.parquet"
    frame.head(50).with_columns(pl.lit("charter").alias("sector")).write_parquet(odd)
    assert main(["stats", str(odd), "--append-to", str(st)]) == 2
    assert "level 'charter' of 'sector' is not in the statistics' coding" in \
        capsys.readouterr().err
    assert st.read_bytes() == before
    # a formula other than the store's
    assert main(["stats", str(paths[2]), "-f", "y ~ x + (1 | g)", "--append-to", str(st)]) == 2
    assert "holds statistics of" in capsys.readouterr().err
    assert st.read_bytes() == before
    # new data with only one of the levels is fine: the store's coding is used
    one = tmp_path / "one.parquet"
    pl.read_parquet(paths[2]).filter(pl.col("sector") == "public").write_parquet(one)
    assert main(["stats", str(one), "--append-to", str(st)]) == 0
    assert len(store.stored_inputs(st)) == 3


def test_formulas_and_structures_that_cannot_be_appended(tmp_path):
    frame = _frame(seed=2).with_columns(pl.arange(0, 3000).alias("t"))
    paths = _split(frame, tmp_path, 2, seed=2)
    for formula, options, message in [
            ("y ~ center(x) + (1 | g)", {}, "constants come from all rows"),
            ("y ~ scale(x) + (1 | g)", {}, "constants come from all rows"),
            ("y ~ x + (1 | g)", {"correlation": "ar1(t | g)"}, "cannot be appended to")]:
        st = tmp_path / "s.parquet"
        store.create(paths[0], formula, st, **options)
        before = st.read_bytes()
        with pytest.raises(InputError, match=message):
            store.append(paths[1], st)
        assert st.read_bytes() == before
    with pytest.raises(InputError, match="give a path, not data in memory"):
        store.create(frame, "y ~ x + (1 | g)", tmp_path / "m.parquet")
    with pytest.raises(DataError, match="statistics file not found"):
        store.append(paths[1], tmp_path / "missing.parquet")
