"""Reliability: bad input found early and cheaply, degenerate models refused, outputs in the
format their name says.  Real files in tmp_path, the CLI in-process or in a subprocess."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.parametrize("formula", ["y ~ x + (1|g)", "y ~ x + (1|g) + (1|h)",
                                     "y ~ x + (x|g)", "y ~ 0 + x + (1|g)"])
@pytest.mark.parametrize("value", [0.0, 7.25, -1e6])
def test_constant_outcome_is_refused(capsys, tmp_path, formula, value):
    n = 60
    rng = np.random.default_rng(3)
    path = _parquet(tmp_path, y=np.full(n, value), x=rng.normal(size=n),
                    g=np.arange(n) % 6, h=np.arange(n) % 5)
    line = _input_error(capsys, tmp_path, ["fit", path, "-f", formula])
    assert "outcome 'y' is constant in the rows used" in line


def test_nearly_constant_outcome_still_fits(tmp_path):
    """The tolerance is relative: an outcome of 1000 ± 0.01 is not constant."""
    n = 200
    rng = np.random.default_rng(4)
    g = np.arange(n) % 10
    y = 1000 + 0.01 * (rng.normal(size=n) + rng.normal(size=10)[g])
    res = mlpipe.fit(_parquet(tmp_path, y=y, g=g), "y ~ 1 + (1|g)", ddf=None)
    assert 0.005 < res.sigma < 0.02


def test_constant_outcome_refused_from_saved_statistics(capsys, tmp_path):
    from mlpipe.stats import compute_statistics

    n = 40
    path = _parquet(tmp_path, y=np.full(n, 3.0), g=np.arange(n) % 4)
    compute_statistics(path, "y ~ 1 + (1|g)").save(tmp_path / "s.parquet")
    line = _input_error(capsys, tmp_path, ["fit", "--stats", str(tmp_path / "s.parquet")])
    assert "outcome 'y' is constant in the rows used" in line


@pytest.mark.parametrize("formula", ["y ~ y + x + (1|g)", "y ~ x + (y|g)", "y ~ x*y + (1|g)",
                                     "log(y) ~ x + log(y) + (1|g)", "y ~ x + (1|g) + (0+y|h)"])
def test_response_among_the_predictors(capsys, tmp_path, formula):
    n = 60
    rng = np.random.default_rng(5)
    path = _parquet(tmp_path, y=rng.uniform(1, 2, n), x=rng.normal(size=n),
                    g=np.arange(n) % 6, h=np.arange(n) % 5)
    line = _input_error(capsys, tmp_path, ["fit", path, "-f", formula])
    assert "appears among the predictors" in line and "response" in line


HSB = str(Path(__file__).parent / "data" / "hsb82.parquet")


@pytest.mark.parametrize("formula", ["mAch ~ ses + (1|mAch)",
                                     "mAch ~ ses + (1|school) + (1|mAch)"])
def test_grouping_by_the_outcome_is_refused_in_one_line(tmp_path, formula):
    proc = subprocess.run([sys.executable, "-m", "mlpipe.cli", "fit", HSB, "-f", formula,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "grouping factor 'mAch' is the outcome" in lines[0]
    assert "residual variance is not identifiable" in lines[0]
    assert not (tmp_path / "out").exists()


def test_outcome_constant_within_levels_of_another_column(capsys, tmp_path):
    n = 60
    g = np.arange(n) % 6
    path = _parquet(tmp_path, y=g * 1.5 + 2, x=np.random.default_rng(6).normal(size=n), g=g)
    line = _input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x + (1|g)"])
    assert "constant within every level of 'g'" in line


# ---------------------------------------------------------------------- predict --out format

@pytest.fixture(scope="module")
def hsb_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "res"
    assert main(["fit", HSB, "-f", "mAch ~ ses + (1|school)", "--ddf", "none",
                 "--out", str(out)]) == 0
    return str(out)


@pytest.mark.parametrize("name", ["p.csv", "P.CSV"])
def test_predict_csv_suffix_writes_csv(capsys, tmp_path, hsb_result, name):
    import polars as pl

    dest = tmp_path / name
    assert main(["predict", hsb_result, HSB, "--out", str(dest)]) == 0
    capsys.readouterr()
    assert not dest.read_bytes().startswith(b"PAR1")
    assert dest.read_text().splitlines()[0].split(",")[-3:] == \
        ["fitted_population", "fitted", "residual"]
    got = pl.read_csv(dest)
    ref = pl.read_parquet(HSB)
    assert got.height == ref.height == 7185
    assert got["mAch"].to_list() == pytest.approx(ref["mAch"].to_list())
    # the CSV holds the same numbers as the Parquet output
    assert main(["predict", hsb_result, HSB, "--out", str(tmp_path / "p.parquet")]) == 0
    pq_out = pl.read_parquet(tmp_path / "p.parquet")
    assert got["fitted"].to_list() == pytest.approx(pq_out["fitted"].to_list(), rel=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "p.parquet"])


def test_predict_parquet_suffix_writes_parquet(capsys, tmp_path, hsb_result):
    dest = tmp_path / "p.parquet"
    assert main(["predict", hsb_result, HSB, "--out", str(dest)]) == 0
    assert dest.read_bytes()[:4] == b"PAR1"


@pytest.mark.parametrize("name", ["p.txt", "p", "p.json", "p.csv.gz"])
def test_predict_unknown_suffix_is_refused(capsys, tmp_path, hsb_result, name):
    dest = tmp_path / name
    code = main(["predict", hsb_result, HSB, "--out", str(dest)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "unknown output format" in err[0] and ".parquet or .csv" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_predict_csv_failure_leaves_nothing(capsys, tmp_path, hsb_result):
    """A CSV input with a bad value fails with its line; no partial CSV output is left."""
    path = tmp_path / "in.csv"
    import polars as pl

    pl.read_parquet(HSB).write_csv(path)
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    row = lines[100].split(",")
    row[head.index("ses")] = "oops"
    lines[100] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")
    dest = tmp_path / "out" / "p.csv"
    code = main(["predict", hsb_result, str(path), "--out", str(dest)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "line 101, column 'ses'" in err[0]
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
