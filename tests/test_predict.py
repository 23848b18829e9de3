"""Predictions and residuals (mlpipe.predict) against lme4 and direct numpy computations."""

from __future__ import annotations

import argparse
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlpipe

from mlpipe.errors import DataError, FormulaError, InputError
from mlpipe.predict import (FittedModel, PredictionFile, add_cli, load_result_dir, predict,
                            residual_summary)

from conftest import DATA, fitted

SLEEP = DATA / "sleepstudy.parquet"
HSB = DATA / "hsb82.parquet"


@pytest.fixture(scope="module")
def sleep():
    res, ref = fitted("sleepstudy_rs", "REML")
    return res, ref


@pytest.fixture(scope="module")
def hsb():
    res, ref = fitted("hsb_full", "REML")
    return res, ref


def _ranef_wide(res) -> dict[str, dict[str, float]]:
    """level -> term -> conditional mode."""
    out: dict[str, dict[str, float]] = {}
    for r in res.ranef.iter_rows(named=True):
        out.setdefault(r["level"], {})[r["term"]] = r["estimate"]
    return out


# ---------------------------------------------------------------------- sleepstudy (numeric)

def test_conditional_fitted_match_lme4(sleep):
    res, ref = sleep
    df = predict(res, SLEEP)
    raw = pl.read_parquet(SLEEP)
    assert df.columns == raw.columns + ["fitted_population", "fitted", "residual"]
    assert df.height == raw.height
    # input order and input columns are kept
    assert df.select(raw.columns).equals(raw)
    np.testing.assert_allclose(df["fitted"].to_numpy()[:20], ref["fitted_head"], rtol=1e-3)
    np.testing.assert_allclose(df["residual"].to_numpy(),
                               (df["Reaction"] - df["fitted"]).to_numpy(), rtol=0, atol=1e-9)


def test_population_is_x_beta(sleep):
    res, _ = sleep
    b0, b1 = res.fixef["(Intercept)"], res.fixef["Days"]
    for level in ("conditional", "population"):
        df = predict(res, SLEEP, level=level)
        np.testing.assert_allclose(df["fitted_population"].to_numpy(),
                                   b0 + b1 * df["Days"].to_numpy(), rtol=1e-12)
    pop = predict(res, SLEEP, level="population")
    np.testing.assert_allclose(pop["fitted"].to_numpy(), pop["fitted_population"].to_numpy())


def test_conditional_is_x_beta_plus_z_b(sleep):
    res, _ = sleep
    df = predict(res, SLEEP)
    re = _ranef_wide(res)
    expect = [res.fixef["(Intercept)"] + re[s]["(Intercept)"]
              + (res.fixef["Days"] + re[s]["Days"]) * d
              for s, d in zip(df["Subject"], df["Days"])]
    np.testing.assert_allclose(df["fitted"].to_numpy(), expect, rtol=1e-12)


def test_unseen_and_missing_groups_fall_back_to_population(sleep, tmp_path):
    res, _ = sleep
    new = tmp_path / "new.parquet"
    pq.write_table(pa.table({"Days": pa.array([0, 5, 9, 3], pa.int64()),
                             "Subject": ["308", "999", None, "308"]}), new)
    df = predict(res, new)
    assert "residual" not in df.columns  # no response column in the new data
    pop = res.fixef["(Intercept)"] + res.fixef["Days"] * df["Days"].to_numpy()
    np.testing.assert_allclose(df["fitted_population"].to_numpy(), pop)
    fit = df["fitted"].to_numpy()
    np.testing.assert_allclose(fit[1:3], pop[1:3])  # unseen "999" and null Subject
    assert abs(fit[0] - pop[0]) > 1 and abs(fit[3] - pop[3]) > 1  # "308" has its own line


def test_null_predictor_gives_null(sleep):
    res, _ = sleep
    new = pl.DataFrame({"Days": [1, None], "Subject": ["308", "308"]})
    df = predict(res, new)
    assert df["fitted"].null_count() == 1 and df["fitted"][1] is None
    assert df["fitted_population"][1] is None


def test_missing_columns(sleep, tmp_path):
    res, _ = sleep
    only_days = tmp_path / "days.parquet"
    pq.write_table(pa.table({"Days": pa.array([1, 2], pa.int64())}), only_days)
    with pytest.raises(DataError, match="'Subject'.*population"):
        predict(res, only_days)
    pop = predict(res, only_days, level="population")  # no group needed at population level
    assert pop["fitted"].to_list() == pytest.approx(
        [res.fixef["(Intercept)"] + res.fixef["Days"] * d for d in (1, 2)])
    no_days = tmp_path / "nodays.parquet"
    pq.write_table(pa.table({"Subject": ["308"]}), no_days)
    with pytest.raises(DataError, match="predictor column 'Days' is not in"):
        predict(res, no_days)
    with pytest.raises(InputError, match="level must be"):
        predict(res, SLEEP, level="marginal")


def test_wrong_type(sleep):
    res, _ = sleep
    with pytest.raises(DataError, match="'Days' was numeric"):
        predict(res, pl.DataFrame({"Days": ["a"], "Subject": ["308"]}))


# ---------------------------------------------------------------------- hsb82 (categorical)

def test_hsb_categorical_matches_lme4(hsb):
    res, ref = hsb
    df = predict(res, HSB)
    np.testing.assert_allclose(df["fitted"].to_numpy()[:20], ref["fitted_head"], rtol=1e-3)
    c = res.fixef
    public = (df["sector"] == "Public").cast(pl.Float64).to_numpy()
    ms, cs = df["meanses"].to_numpy(), df["cses"].to_numpy()
    pop = (c["(Intercept)"] + c["meanses"] * ms + c["cses"] * cs + c["sectorPublic"] * public
           + c["meanses:cses"] * ms * cs + c["cses:sectorPublic"] * cs * public)
    np.testing.assert_allclose(df["fitted_population"].to_numpy(), pop, rtol=1e-10)


def test_hsb_unknown_level_and_null_category(hsb):
    res, _ = hsb
    new = pl.DataFrame({"school": ["1224"] * 3, "meanses": [0.1] * 3, "cses": [0.5] * 3,
                        "sector": ["Public", "Martian", None]})
    df = predict(res, new)
    assert df["fitted"][0] is not None
    assert df["fitted"][1] is None and df["fitted"][2] is None
    assert df["fitted_population"][1] is None


def test_categorical_random_slope():
    """A factor only in the random part: Z's dummies at conditional level, unused at
    population level (where the column may even be absent)."""
    import mlpipe

    res = mlpipe.fit(HSB, "mAch ~ cses + (sector | school)")
    re = _ranef_wide(res)["1224"]
    new = pl.DataFrame({"school": ["1224"] * 3, "cses": [0.1] * 3,
                        "sector": ["Public", "Catholic", "Mars"]})
    df = predict(res, new)
    pop = res.fixef["(Intercept)"] + 0.1 * res.fixef["cses"]
    np.testing.assert_allclose(df["fitted_population"].to_numpy(), pop)
    assert df["fitted"][0] == pytest.approx(pop + re["(Intercept)"] + re["sectorPublic"])
    assert df["fitted"][1] == pytest.approx(pop + re["(Intercept)"])
    assert df["fitted"][2] is None  # a level the model never saw
    df = predict(res, new.drop("sector"), level="population")
    np.testing.assert_allclose(df["fitted"].to_numpy(), pop)


def test_hsb_csv_input(hsb):
    """CSV gives school as BIGINT: the join on the group still matches the fit's levels."""
    res, _ = hsb
    a = predict(res, HSB)
    b = predict(res, DATA / "hsb82.csv")
    np.testing.assert_allclose(b["fitted"].to_numpy(), a["fitted"].to_numpy(), rtol=1e-12)


# ---------------------------------------------------------------------- output file, result dir

def test_write_parquet(sleep, tmp_path):
    res, _ = sleep
    out = tmp_path / "sub" / "pred.parquet"
    written = predict(res, SLEEP, out)
    assert isinstance(written, PredictionFile)
    assert written.rows == 180 and written.null_predictions == 0
    assert pl.read_parquet(out).equals(predict(res, SLEEP))
    assert [p.name for p in out.parent.iterdir()] == ["pred.parquet"]


def test_failed_write_leaves_nothing(sleep, tmp_path):
    res, _ = sleep
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"Days": pa.array([1, 2], pa.int64()), "Subject": ["308", "309"]}),
                   data / "a.parquet")
    pq.write_table(pa.table({"Days": ["x", "y"], "Subject": ["308", "309"]}), data / "b.parquet")
    out = tmp_path / "out" / "pred.parquet"
    with pytest.raises(DataError, match="cannot predict"):
        predict(res, str(data / "*.parquet"), out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_result_dir_and_cli(sleep, tmp_path, capsys):
    res, _ = sleep
    rdir = tmp_path / "res"
    res.write(rdir)
    model = load_result_dir(rdir)
    assert model.formula == res.formula and model.fixed == pytest.approx(res.fixef)
    assert model.sigma == pytest.approx(res.sigma)

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "pred.parquet"
    args = parser.parse_args(["predict", str(rdir), str(SLEEP), "--out", str(out)])
    assert args.func(args) == 0
    assert "180 rows" in capsys.readouterr().out
    got = pl.read_parquet(out)
    np.testing.assert_allclose(got["fitted"].to_numpy(), predict(res, SLEEP)["fitted"].to_numpy(),
                               rtol=1e-12)
    args = parser.parse_args(["predict", str(rdir), str(SLEEP), "-o", str(out), "--population"])
    assert args.func(args) == 0
    got = pl.read_parquet(out)
    np.testing.assert_allclose(got["fitted"].to_numpy(), got["fitted_population"].to_numpy())


def test_result_dir_categorical(hsb, tmp_path):
    res, _ = hsb
    rdir = tmp_path / "res"
    res.write(rdir)
    model = load_result_dir(rdir)
    assert model.factor_levels == {"sector": ["Catholic", "Public"]}
    a = predict(rdir, HSB)
    np.testing.assert_allclose(a["fitted"].to_numpy(), predict(res, HSB)["fitted"].to_numpy(),
                               rtol=1e-12)


def test_result_dir_errors(sleep, tmp_path):
    with pytest.raises(InputError, match="result directory not found"):
        load_result_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="result.json is missing"):
        load_result_dir(tmp_path / "empty")
    res, _ = sleep
    rdir = tmp_path / "res"
    res.write(rdir)
    (rdir / "result.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid mlpipe result"):
        load_result_dir(rdir)


def test_row_order_is_kept_across_the_join():
    """A parallel hash join reorders rows; predictions come back in input order anyway."""
    n, m = 300_000, 3000
    rng = np.random.default_rng(7)
    g, x = rng.integers(0, m, n), rng.normal(size=n)
    data = pl.DataFrame({"g": g.astype(str), "x": x})
    b = rng.normal(size=m)
    ranef = pl.DataFrame({"group": "g", "level": [str(i) for i in range(m)],
                          "term": "(Intercept)", "estimate": b})
    model = FittedModel("y ~ x + (1|g)", {"(Intercept)": 1.0, "x": 2.0}, 1.0, ranef)
    df = predict(model, data, threads=4)
    np.testing.assert_array_equal(df["x"].to_numpy(), x)
    np.testing.assert_allclose(df["fitted"].to_numpy(), 1 + 2 * x + b[g], rtol=1e-12)


def test_aggregate_formulas_are_refused():
    model = FittedModel("y ~ center(x) + (1|g)", {"(Intercept)": 0.0, "center(x)": 1.0}, 1.0,
                        pl.DataFrame({"group": "g", "level": ["a"], "term": "(Intercept)",
                                      "estimate": [0.0]}))
    with pytest.raises(FormulaError, match="center"):
        predict(model, pl.DataFrame({"x": [1.0], "g": ["a"]}))


# ---------------------------------------------------------------------- residuals

def test_residual_summary_sleepstudy(sleep):
    res, _ = sleep
    s = residual_summary(res, SLEEP)
    raw = pq.read_table(SLEEP).to_pydict()
    re = _ranef_wide(res)
    y = np.asarray(raw["Reaction"])
    days = np.asarray(raw["Days"], dtype=float)
    subj = raw["Subject"]
    fit = np.array([res.fixef["(Intercept)"] + re[s_]["(Intercept)"]
                    + (res.fixef["Days"] + re[s_]["Days"]) * d for s_, d in zip(subj, days)])
    r = y - fit
    expect = np.quantile(r / res.sigma, [0, 0.25, 0.5, 0.75, 1])  # R's type 7
    assert list(s.quantiles) == ["Min", "1Q", "Median", "3Q", "Max"]
    np.testing.assert_allclose(list(s.quantiles.values()), expect, rtol=1e-9)
    # lme4's summary(lmer(Reaction ~ Days + (Days | Subject), sleepstudy))
    np.testing.assert_allclose(list(s.quantiles.values()),
                               [-3.9536, -0.4634, 0.0231, 0.4634, 5.1793], atol=2e-4)
    assert abs(s.quantiles["Median"]) < 0.1 and s.n == 180
    assert "Scaled residuals" in str(s)
    by = s.by_group
    assert by.columns == ["group", "level", "n", "mean_residual", "residual_variance"]
    assert by["level"].to_list() == sorted(set(subj)) and by["n"].sum() == 180
    for row in by.iter_rows(named=True):
        ri = r[np.asarray(subj) == row["level"]]
        assert row["residual_variance"] == pytest.approx(np.var(ri, ddof=1), rel=1e-9)
        assert row["mean_residual"] == pytest.approx(ri.mean(), abs=1e-9)


def test_residual_summary_defaults_to_training_data(hsb, tmp_path):
    res, _ = hsb
    s = residual_summary(res)  # the source recorded with the fit
    assert s.n == res.nobs and s.by_group.height == 160
    assert abs(s.quantiles["Median"]) < 0.1
    assert s.quantiles["Min"] < s.quantiles["1Q"] < s.quantiles["3Q"] < s.quantiles["Max"]
    approx = residual_summary(res, exact=False)
    assert approx.quantiles["Median"] == pytest.approx(s.quantiles["Median"], abs=0.02)
    assert approx.quantiles["Min"] == pytest.approx(s.quantiles["Min"], rel=1e-12)
    rdir = tmp_path / "res"
    res.write(rdir)
    from_dir = residual_summary(rdir)
    assert from_dir.quantiles == pytest.approx(s.quantiles, rel=1e-9)
    with pytest.raises(DataError, match="response"):
        residual_summary(res, pl.DataFrame({"school": ["1224"], "meanses": [0.1],
                                            "cses": [0.5], "sector": ["Public"]}))


def test_json_result_fields_used(sleep, tmp_path):
    """The loader only needs result.json's formula, fixed_effects, sigma and ranef.parquet."""
    res, _ = sleep
    rdir = tmp_path / "res"
    rdir.mkdir()
    meta = {"formula": res.formula, "sigma": res.sigma,
            "fixed_effects": [{"term": t, "estimate": e} for t, e in res.fixef.items()]}
    (rdir / "result.json").write_text(json.dumps(meta))
    res.ranef.write_parquet(rdir / "ranef.parquet")
    df = predict(rdir, SLEEP)
    np.testing.assert_allclose(df["fitted"].to_numpy(), predict(res, SLEEP)["fitted"].to_numpy(),
                               rtol=1e-12)


def test_group_key_of_another_numeric_type_still_matches(tmp_path):
    """Fitted on an integer group column, predicted on the same ids stored as doubles: the
    conditional modes must still be found (the key is cast to the fit's type first)."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(10), 8)
    x = rng.normal(size=80)
    y = x + rng.normal(size=10)[g] + rng.normal(size=80)
    pq.write_table(pa.table({"y": y, "x": x, "g": g}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"x": x[:16], "g": g[:16].astype(float)}), tmp_path / "new.parquet")
    res = mlpipe.fit(tmp_path / "train.parquet", "y ~ x + (1|g)")
    res.write(tmp_path / "fit")
    out = predict(tmp_path / "fit", tmp_path / "new.parquet")
    b = res.ranef.filter(pl.col("level").is_in(["0", "1"]))["estimate"].to_numpy()
    np.testing.assert_allclose((out["fitted"] - out["fitted_population"]).to_numpy(),
                               np.repeat(b, 8), rtol=1e-10)


def test_residuals_of_a_model_with_computed_centering():
    """center(by=) / group_mean(by=) recomputed in the residual pass give the same residuals
    as the precomputed HSB columns."""
    a = mlpipe.fit(HSB, "mAch ~ group_mean(ses, by=school) + center(ses, by=school) "
                        "+ (center(ses, by=school) | school)")
    b = mlpipe.fit(HSB, "mAch ~ meanses + cses + (cses | school)")
    ra, rb = residual_summary(a), residual_summary(b)
    for k in ("Min", "1Q", "Median", "3Q", "Max"):
        assert ra.quantiles[k] == pytest.approx(rb.quantiles[k], rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(ra.by_group["residual_variance"].to_numpy(),
                               rb.by_group["residual_variance"].to_numpy(), rtol=1e-6)
