"""Data in memory: `fit`, `compute_statistics` and `predict` accept polars DataFrames and
LazyFrames, pandas DataFrames, pyarrow Tables, RecordBatchReaders and Datasets and DuckDB
relations, and give what the Parquet file of the same rows gives."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

import mlpipe
from mlpipe.errors import InputError
from mlpipe.predict import predict

from conftest import DATA

HSB = DATA / "hsb82.parquet"
PASTES = DATA / "pastes.parquet"

#: (name, data file, formula): one factor (with a categorical predictor), and
#: nested factors
MODELS = [
    ("one_factor", HSB, "mAch ~ meanses + sector*cses + (cses | school)"),
    ("nested", PASTES, "strength ~ 1 + (1 | batch/cask)"),
]


def _pandas(path):
    pd = pytest.importorskip("pandas")
    assert isinstance(pd.DataFrame, type)
    return pq.read_table(path).to_pandas()


_CONNECTIONS: list = []


def _relation(path):
    """A query on a connection of its own (not mlpipe's): every row, columns reordered."""
    con = duckdb.connect()
    _CONNECTIONS.append(con)
    cols = pq.read_schema(path).names
    rel = con.read_parquet(str(path)).filter("true")
    return rel.select(*reversed(cols))


#: name -> a function of the Parquet path giving the same rows in memory
KINDS = {
    "polars": lambda p: pl.read_parquet(p),
    "polars_lazy": lambda p: pl.read_parquet(p).lazy().filter(pl.lit(True)),
    "polars_scan": lambda p: pl.scan_parquet(p),
    "pandas": _pandas,
    "arrow_table": lambda p: pq.read_table(p),
    "arrow_reader": lambda p: pq.read_table(p).to_reader(max_chunksize=1000),
    "arrow_dataset": lambda p: pds.dataset(p),
    "duckdb_relation": _relation,
    "duckdb_default": lambda p: duckdb.read_parquet(str(p)),
}

STAT_ARRAYS = ("n_i", "ztz", "ztx", "zty", "yty_i", "xtx", "xty")


@pytest.fixture(scope="module")
def reference():
    """Statistics and fit of every model from its Parquet file."""
    out = {}
    for name, path, formula in MODELS:
        out[name] = (mlpipe.compute_statistics(path, formula),
                     mlpipe.fit(path, formula, ddf=None))
    return out


def _same_statistics(st, ref) -> None:
    for a in STAT_ARRAYS:
        np.testing.assert_allclose(getattr(st, a), getattr(ref, a), rtol=1e-12, atol=1e-12,
                                   err_msg=a)
    assert st.yty == pytest.approx(ref.yty, rel=1e-12)
    assert (st.n, st.rows_read, st.rows_dropped) == (ref.n, ref.rows_read, ref.rows_dropped)
    assert list(st.levels) == list(ref.levels)
    assert st.fixed_names == ref.fixed_names and st.random_names == ref.random_names
    assert st.factor_levels == ref.factor_levels
    assert [(f.name, list(f.levels), f.index.tolist()) for f in st.factors] == \
        [(f.name, list(f.levels), f.index.tolist()) for f in ref.factors]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("model", [m[0] for m in MODELS])
def test_statistics_and_fit_equal_the_parquet_file(kind, model, reference):
    _name, path, formula = next(m for m in MODELS if m[0] == model)
    ref_stats, ref_fit = reference[model]
    st = mlpipe.compute_statistics(KINDS[kind](path), formula)
    _same_statistics(st, ref_stats)
    res = mlpipe.fit(KINDS[kind](path), formula, ddf=None)
    assert res.deviance == pytest.approx(ref_fit.deviance, rel=1e-10)
    np.testing.assert_allclose(res.fixed_effects["estimate"].to_numpy(),
                               ref_fit.fixed_effects["estimate"].to_numpy(), rtol=1e-8)


@pytest.mark.parametrize("kind", list(KINDS))
def test_predict_equals_the_parquet_file(kind, reference):
    _stats, res = reference["one_factor"]
    want = predict(res, HSB)
    got = predict(res, KINDS[kind](HSB))
    assert sorted(got.columns) == sorted(want.columns) and got.height == want.height
    np.testing.assert_allclose(got["fitted"].to_numpy(), want["fitted"].to_numpy(),
                               rtol=1e-12)
    assert got["school"].to_list() == want["school"].to_list()  # input order kept


def test_rows_with_nulls_are_dropped_as_from_a_file(tmp_path):
    df = pl.read_parquet(HSB).with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 0).then(None).otherwise(pl.col("cses"))
        .alias("cses"))
    path = tmp_path / "nulls.parquet"
    df.write_parquet(path)
    formula = "mAch ~ cses + (1 | school)"
    ref = mlpipe.compute_statistics(path, formula)
    assert ref.rows_dropped > 0
    for data in (df, df.lazy(), df.to_arrow()):
        _same_statistics(mlpipe.compute_statistics(data, formula), ref)


def test_in_memory_fit_records_no_source_and_residuals_need_the_data():
    df = pl.read_parquet(HSB)
    res = mlpipe.fit(df, "mAch ~ cses + (1 | school)", ddf=None)
    assert res.stats.source == ""
    with pytest.raises(InputError, match="needs the training data"):
        mlpipe.predict.residual_summary(res)
    summary = mlpipe.predict.residual_summary(res, df)
    assert summary.n == df.height


def test_unknown_column_names_the_in_memory_source():
    with pytest.raises(InputError, match="not in the data"):
        mlpipe.fit(pl.read_parquet(HSB), "mAch ~ nope + (1 | school)")
    res = mlpipe.fit(HSB, "mAch ~ cses + (1 | school)", ddf=None)
    with pytest.raises(InputError, match="'cses' is not in the polars DataFrame"):
        predict(res, pl.read_parquet(HSB).drop("cses"))


@pytest.mark.parametrize("bad, name", [({"mAch": [1.0]}, "dict"), ([1, 2, 3], "list"),
                                       (np.zeros((3, 2)), "numpy.ndarray"), (42, "int"),
                                       (b"data/hsb82.parquet", "bytes")])
def test_a_bad_type_is_one_line_naming_it(bad, name):
    formula = "mAch ~ cses + (1 | school)"
    res = mlpipe.fit(HSB, formula, ddf=None)
    for call in (lambda: mlpipe.fit(bad, formula),
                 lambda: mlpipe.compute_statistics(bad, formula), lambda: predict(res, bad)):
        with pytest.raises(InputError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and len(msg) < 300
        assert msg.startswith(f"cannot read data of type {name}: give a file path")
        assert "polars DataFrame" in msg


def test_a_consumed_reader_is_refused_clearly():
    reader = pq.read_table(HSB).to_reader()
    formula = "mAch ~ cses + (1 | school)"
    mlpipe.compute_statistics(reader, formula)
    with pytest.raises(InputError, match="already read"):
        mlpipe.compute_statistics(reader, formula)


def test_a_record_batch_is_a_table():
    batch = pq.read_table(HSB).combine_chunks().to_batches()[0]
    st = mlpipe.compute_statistics(batch, "mAch ~ cses + (1 | school)")
    assert st.n == pa.Table.from_batches([batch]).num_rows


def test_pandas_is_not_imported_for_other_inputs():
    code = ("import sys, polars as pl, mlpipe; "
            f"mlpipe.compute_statistics(pl.read_parquet({str(HSB)!r}), 'mAch ~ cses + (1|school)');"
            " print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
