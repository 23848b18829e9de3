"""Reliability: bad input found early and cheaply, degenerate models refused, outputs in the
format their name says.  Real files in tmp_path, the CLI in-process or in a subprocess."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest

import mlpipe
from mlpipe.cli import main
from mlpipe.errors import DataError


def _csv(path, n, bad_line=None, bad_column="y", value="abc"):
    """A CSV of `n` rows (y, x, g); file line `bad_line` (the header is line 1) holds `value`
    in `bad_column`."""
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        f.write("y,x,g\n")
        for i in range(n):
            row = {"y": f"{rng.normal():.4f}", "x": f"{rng.normal():.4f}", "g": f"g{i % 30}"}
            if i + 2 == bad_line:
                row[bad_column] = value
            f.write(f"{row['y']},{row['x']},{row['g']}\n")
    return str(path)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("column", ["y", "x"])
def test_non_numeric_value_in_numeric_csv_column_fails_fast(tmp_path, capsys, column):
    path = _csv(tmp_path / "d.csv", 3000, bad_line=1700, bad_column=column)
    peak0, t0 = _peak_mb(), time.perf_counter()
    code = main(["fit", path, "-f", "y ~ x + (1|g)", "--out", str(tmp_path / "out")])
    elapsed, grown = time.perf_counter() - t0, _peak_mb() - peak0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"mlpipe: error: {path}, line 1700, column '{column}': "
                   f"value 'abc' is not a number"]
    assert elapsed < 1.0, elapsed
    assert grown < 200, f"peak memory grew by {grown:.0f} MB"
    assert not (tmp_path / "out").exists()


def test_bad_value_beyond_the_type_sniffers_sample(tmp_path):
    """DuckDB sniffs types from the first rows: a bad value after them still fails with its
    file, line and column, not a generic conversion error."""
    path = _csv(tmp_path / "d.csv", 30_000, bad_line=29_000, bad_column="x", value="n/a?")
    with pytest.raises(DataError, match=r"line 29000, column 'x': value 'n/a\?' is not"):
        mlpipe.fit(path, "y ~ x + (1|g)")


def test_text_columns_stay_categorical(tmp_path):
    """A CSV text column that is not mostly numbers is still a factor."""
    rng = np.random.default_rng(2)
    path = tmp_path / "d.csv"
    with open(path, "w") as f:
        f.write("y,sector,g\n")
        for i in range(300):
            f.write(f"{rng.normal():.4f},{'ab'[i % 2]},g{i % 10}\n")
    res = mlpipe.fit(str(path), "y ~ sector + (1|g)", ddf=None)
    assert res.fixed_effects["term"].to_list() == ["(Intercept)", "sectorb"]


# ---------------------------------------------------------------------- degenerate outcomes

def _parquet(tmp_path, **cols):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(cols), path)
    return str(path)


def _input_error(capsys, tmp_path, argv):
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize("formula", ["y ~ y + x + (1|g)", "y ~ x + (y|g)", "y ~ x*y + (1|g)",
                                     "log(y) ~ x + log(y) + (1|g)", "y ~ x + (1|g) + (0+y|h)"])
def test_response_among_the_predictors(capsys, tmp_path, formula):
    n = 60
    rng = np.random.default_rng(5)
    path = _parquet(tmp_path, y=rng.uniform(1, 2, n), x=rng.normal(size=n),
                    g=np.arange(n) % 6, h=np.arange(n) % 5)
    line = _input_error(capsys, tmp_path, ["fit", path, "-f", formula])
    assert "appears among the predictors" in line and "response" in line


