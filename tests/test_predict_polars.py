"""Prediction through the Polars engine (`predict(..., engine="polars")`,
`mlpipe predict --engine polars`): the same predictions as DuckDB's to 1e-12 — fixed part,
conditional and population, one factor, nested, crossed, categorical predictors and
scale(), unseen levels, null keys and predictors, unknown categorical levels, GLMMs'
response scale (logit, probit, log with an offset) — the same files, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.cli import main
from mlpipe.errors import InputError
from mlpipe.predict import predict

DATA = Path(__file__).parent / "data"
ML = DATA / "multilevel"
GLMM = DATA / "glmm"


def assert_same(a: pl.DataFrame, b: pl.DataFrame) -> None:
    """Same columns, rows and nulls; numbers to 1e-12 of the column's scale."""
    assert a.columns == b.columns and a.height == b.height
    for c in a.columns:
        x, y = a[c], b[c]
        assert x.is_null().to_list() == y.is_null().to_list(), c
        if x.dtype.is_float():
            xv, yv = x.drop_nulls().to_numpy(), y.drop_nulls().to_numpy()
            scale = max(float(np.max(np.abs(xv))) if xv.size else 1.0, 1.0)
            np.testing.assert_allclose(yv, xv, rtol=0, atol=1e-12 * scale, err_msg=c)
        else:
            assert x.to_list() == y.to_list(), c


CASES = [
    (DATA / "hsb82.parquet", "mAch ~ scale(ses) * factor(sector) + minrty + (ses | school)"),
    (ML / "egsingle.parquet", "math ~ year + (year | schoolid/childid)"),
    (ML / "scotssec.parquet", "attain ~ verbal + sex + (1 | primary) + (1 | second)"),
    (ML / "oats.parquet", "yield ~ nitro + (1 | Block/Variety)"),
]


@pytest.mark.parametrize("data,formula", CASES, ids=["one_factor", "nested", "crossed",
                                                     "nested_oats"])
@pytest.mark.parametrize("level", ["conditional", "population"])
def test_polars_predictions_equal_duckdb(data, formula, level):
    m = mlpipe.fit(data, formula, ddf=None)
    a = predict(m, data, level=level)
    b = predict(m, data, level=level, engine="polars")
    assert_same(a, b)
    if level == "conditional":  # on the training data: the fitted values
        assert b["residual"].is_null().sum() == 0


def test_new_levels_nulls_and_unknown_categories(tmp_path):
    """Rows with an unseen school, a null school, a null predictor and a sector level the
    model never saw: the same nulls and fall-backs as DuckDB's (in input order)."""
    data = DATA / "hsb82.parquet"
    m = mlpipe.fit(data, "mAch ~ ses + factor(sector) + (ses | school)", ddf=None)
    new = pl.read_parquet(data).head(40).with_columns(
        pl.when(pl.int_range(pl.len()) % 5 == 0).then(pl.lit("no-such-school"))
        .when(pl.int_range(pl.len()) % 7 == 0).then(None)
        .otherwise(pl.col("school").cast(pl.String)).alias("school"),
        pl.when(pl.int_range(pl.len()) % 6 == 1).then(None).otherwise(pl.col("ses"))
        .alias("ses"),
        pl.when(pl.int_range(pl.len()) % 9 == 2).then(pl.lit(7.0))
        .otherwise(pl.col("sector")).alias("sector"))
    path = tmp_path / "new.parquet"
    new.write_parquet(path)
    a = predict(m, path)
    b = predict(m, path, engine="polars")
    assert_same(a, b)
    assert b["fitted"].is_null().sum() > 0  # null ses, unknown sector
    unseen = b.filter(pl.col("school") == "no-such-school")
    ok = unseen.filter(pl.col("fitted").is_not_null())
    np.testing.assert_allclose(ok["fitted"].to_numpy(), ok["fitted_population"].to_numpy())
    # data in memory: a polars DataFrame
    assert_same(a, predict(m, new, engine="polars"))


@pytest.mark.parametrize("ref", ["tmb_cbpp_logit", "tmb_cbpp_probit", "mmmec_pois_offset"])
def test_glmm_response_scale(ref):
    spec = json.loads((GLMM / f"{ref}.json").read_text())
    data = GLMM / ("mmmec.parquet" if "mmmec" in ref else "cbpp.parquet")
    m = mlpipe.fit(data, spec["formula"], family=spec["family"], link=spec["link"])
    a = predict(m, data)
    b = predict(m, data, engine="polars")
    assert "fitted_response" in b.columns
    assert_same(a, b)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_files_and_the_command_line(tmp_path, suffix, capsys):
    data = ML / "scotssec.parquet"
    out = tmp_path / "fit"
    assert main(["fit", str(data), "-f", "attain ~ verbal + (1 | primary) + (1 | second)",
                 "-q", "--out", str(out)]) == 0
    for engine in ("duckdb", "polars"):
        assert main(["predict", str(out), str(data), "--out", str(tmp_path / f"{engine}{suffix}"),
                     "--engine", engine]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split(" to ")[0] == printed[1].split(" to ")[0]  # rows and nulls
    read = pl.read_csv if suffix == ".csv" else pl.read_parquet
    assert_same(read(tmp_path / f"duckdb{suffix}"), read(tmp_path / f"polars{suffix}"))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_refusals(tmp_path):
    data = DATA / "hsb82.parquet"
    m = mlpipe.fit(data, "mAch ~ center(ses) + (1 | school)", ddf=None)
    with pytest.raises(InputError, match="polars engine does not predict center"):
        predict(m, data, engine="polars")
    with pytest.raises(InputError, match="predict runs on --engine duckdb or polars"):
        predict(m, data, engine="dask")
