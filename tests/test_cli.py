"""The CLI contract: result.json / ranef.parquet, stats → fit --stats, configs, dropped rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlpipe.cli import main
from mlpipe.stats import Statistics

DATA = Path(__file__).parent / "data"
HSB = str(DATA / "hsb82.parquet")
FULL = "mAch ~ meanses*cses + sector*cses + (cses|school)"
RESULT_KEYS = {"formula", "method", "nobs", "groups", "fixed_effects", "random_effects",
               "random_correlations", "residual_variance", "loglik", "deviance",
               "reml_criterion", "aic", "bic", "converged", "singular", "optimizer"}


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(["fit", HSB, "--formula", FULL, "--out", str(out), "-q"]) == 0
    return out


def test_result_json_contract(full_dir):
    res = json.loads((full_dir / "result.json").read_text())
    assert RESULT_KEYS <= set(res)
    assert res["method"] == "REML" and res["nobs"] == 7185 and res["groups"] == {"school": 160}
    assert res["loglik"] == pytest.approx(-res["reml_criterion"] / 2)
    assert res["deviance"] == pytest.approx(-2 * res["loglik"])
    fe = res["fixed_effects"][0]
    assert set(fe) >= {"term", "estimate", "std_error", "t_value", "df", "p_value"}
    assert res["random_correlations"][0]["term1"] == "(Intercept)"
    assert res["random_correlations"][0]["correlation"] == pytest.approx(0.3909, abs=2e-3)
    assert res["optimizer"]["final_objective"] == pytest.approx(46503.6628681261, rel=1e-8)


def test_ranef_parquet_contract(full_dir):
    ranef = pl.read_parquet(full_dir / "ranef.parquet")
    assert ranef.columns == ["group", "level", "term", "estimate", "cond_sd"]
    assert ranef.height == 2 * 160
    assert ranef.schema["level"] == pl.Utf8 and ranef.schema["cond_sd"] == pl.Float64


def test_stats_then_fit_from_stats(tmp_path, capsys):
    s = tmp_path / "hsb.stats.parquet"
    assert main(["stats", HSB, "--formula", FULL, "--out", str(s)]) == 0
    stats = Statistics.load(s)
    assert (stats.m, stats.p, stats.q, stats.n) == (160, 6, 2, 7185)
    out = tmp_path / "refit"
    assert main(["fit", "--stats", str(s), "--ml", "--out", str(out), "-q"]) == 0
    res = json.loads((out / "result.json").read_text())
    ref = json.loads(open(DATA / "lme4/hsb_full.json").read())["ml"]
    assert res["method"] == "ML" and res["reml_criterion"] is None
    assert res["deviance"] == pytest.approx(ref["deviance_or_reml"], rel=1e-6)


def test_config_run_writes_resolved_config(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    out = tmp_path / "o"
    cfg.write_text(f'data = "{HSB}"\nformula = "mAch ~ cses + (1|school)"\nout = "{out}"\n'
                   '[duckdb]\nthreads = 1\nmemory_limit = "1GB"\n')
    assert main(["fit", "--config", str(cfg), "--ml"]) == 0
    printed = capsys.readouterr().out
    assert "maximum likelihood" in printed and "cses" in printed
    resolved = (out / "config.toml").read_text()
    assert 'method = "ML"' in resolved and "threads = 1" in resolved
    res = json.loads((out / "result.json").read_text())
    assert res["loglik"] == pytest.approx(-23360.2059308377, rel=1e-8)


def test_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('data = "x"\nformla = "y ~ 1"\n')
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "formla" in capsys.readouterr().err


def test_rows_with_nulls_are_dropped_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(5)
    n = 200
    x = rng.normal(size=n)
    y = 1 + x + rng.normal(size=20).repeat(10) + rng.normal(size=n)
    mask = np.zeros(n, bool)
    mask[[3, 50, 77]] = True
    g = [f"g{i // 10}" for i in range(n)]
    g_null = [None if i == 120 else v for i, v in enumerate(g)]
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"y": pa.array(np.where(mask, np.nan, y), mask=mask),
                             "x": x, "g": g_null}), path)
    out = tmp_path / "o"
    assert main(["fit", str(path), "-f", "y ~ x + (1|g)", "--out", str(out)]) == 0
    assert "(4 rows with missing values dropped)" in capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert res["nobs"] == 196 and res["rows_dropped"] == 4


def test_csv_input_matches_parquet(tmp_path, capsys):
    assert main(["fit", str(DATA / "hsb82.csv"), "-f", "mAch ~ cses + (1|school)",
                 "--out", str(tmp_path / "c"), "-q"]) == 0
    res = json.loads((tmp_path / "c" / "result.json").read_text())
    assert res["reml_criterion"] == pytest.approx(46723.9957062383, rel=1e-6)


def test_fit_with_residuals_pass(tmp_path, capsys):
    """--residuals: lme4's scaled-residual quantiles in the summary and result.json, and the
    per-group residual variance, from one more pass over the data."""
    out = tmp_path / "r"
    assert main(["fit", str(DATA / "sleepstudy.parquet"), "-f", "Reaction ~ Days + (Days|Subject)",
                 "--ml", "--residuals", "--out", str(out)]) == 0
    assert "Scaled residuals:" in capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    q = res["scaled_residuals"]
    assert set(q) == {"Min", "1Q", "Median", "3Q", "Max"} and q["Min"] < q["Median"] < q["Max"]
    by_group = pl.read_parquet(out / "residuals_by_group.parquet")
    assert by_group.height == 18 and by_group["n"].sum() == 180


def test_predict_cli_round_trip(full_dir, tmp_path, capsys):
    pred = tmp_path / "pred.parquet"
    assert main(["predict", str(full_dir), HSB, "--out", str(pred)]) == 0
    df = pl.read_parquet(pred)
    assert df.height == 7185 and {"fitted", "fitted_population", "residual"} <= set(df.columns)
    ref = json.loads(open(DATA / "lme4/hsb_full.json").read())["reml"]["fitted_head"]
    np.testing.assert_allclose(df["fitted"].head(20).to_numpy(), ref, rtol=1e-5)


def test_nan_is_missing_like_r(tmp_path, capsys):
    """NaN in a float column (as pandas writes missing values) is dropped like NULL, as R's
    NA handling drops it in lme4."""
    rng = np.random.default_rng(7)
    n = 120
    x = rng.normal(size=n)
    y = 1 + x + rng.normal(size=12).repeat(10) + rng.normal(size=n)
    y_nan = y.copy()
    y_nan[[5, 17]] = np.nan
    x_nan = x.copy()
    x_nan[40] = np.nan
    g = [f"g{i // 10}" for i in range(n)]
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"y": y_nan, "x": x_nan, "g": g}), path)
    keep = ~(np.isnan(y_nan) | np.isnan(x_nan))
    ref = tmp_path / "ref.parquet"
    pq.write_table(pa.table({"y": y[keep], "x": x[keep], "g": np.array(g)[keep]}), ref)
    import mlpipe
    a, b = mlpipe.fit(path, "y ~ x + (1|g)"), mlpipe.fit(ref, "y ~ x + (1|g)")
    assert a.nobs == 117 and a.rows_dropped == 3
    assert a.reml_criterion == pytest.approx(b.reml_criterion, rel=1e-12)


def test_glob_and_hive_partitioned_directory(tmp_path, capsys):
    """A glob of files and a hive-partitioned directory read as one table."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM '{HSB}') TO '{tmp_path / 'hive'}' "
                "(FORMAT parquet, PARTITION_BY (sector))")
    con.execute(f"COPY (SELECT * FROM '{HSB}' WHERE sector = 'Public') TO "
                f"'{tmp_path / 'a.parquet'}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * FROM '{HSB}' WHERE sector <> 'Public') TO "
                f"'{tmp_path / 'b.parquet'}' (FORMAT parquet)")
    import mlpipe
    want = 46503.6628681261
    f = "mAch ~ meanses*cses + sector*cses + (cses|school)"
    assert mlpipe.fit(tmp_path / "hive", f).reml_criterion == pytest.approx(want, rel=1e-8)
    assert mlpipe.fit(str(tmp_path / "*.parquet"), f).reml_criterion == pytest.approx(want,
                                                                                    rel=1e-8)


def test_rewriting_a_result_dir_leaves_no_stale_files(tmp_path, capsys):
    out = tmp_path / "o"
    f = "Reaction ~ Days + (Days|Subject)"
    assert main(["fit", str(DATA / "sleepstudy.parquet"), "-f", f, "--residuals",
                 "--out", str(out), "-q"]) == 0
    assert (out / "residuals_by_group.parquet").is_file()
    # a path relative to the current directory is recorded as an absolute one
    relative = os.path.relpath(DATA / "sleepstudy.parquet")
    assert main(["fit", relative, "-f", f, "--out", str(out), "-q"]) == 0
    assert not (out / "residuals_by_group.parquet").exists()
    cfg = (out / "config.toml").read_text()
    assert f'data = "{(DATA / "sleepstudy.parquet").resolve()}"' in cfg
