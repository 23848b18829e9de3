"""Prediction for models with center() / center(x, by = g) / group_mean(x, by = g): the fit
stores the means it used (Statistics.centering, in stats.parquet), prediction reuses them, so
predictions on the training data are the fitted values; a new group is centred on its own
mean in the new data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe._sql import connect
from mlpipe.design import complete_condition
from mlpipe.errors import FormulaError
from mlpipe.predict import FittedModel, Frame, as_model, linear_predictor, predict

from conftest import DATA

HSB = DATA / "hsb82.parquet"
EGSINGLE = DATA.parent.parent / "data" / "egsingle.parquet"

MODELS = {
    "grand": (HSB, "mAch ~ center(ses) * sector + (center(ses) | school)"),
    "group_mean": (HSB, "mAch ~ group_mean(ses, by = school) + center(ses, by = school) "
                        "+ sector + (center(ses, by = school) | school)"),
    "by_other_column": (HSB, "mAch ~ center(ses, by = sector) + center(meanses) "
                             "+ (1 | school)"),
    "several_factors": (EGSINGLE, "math ~ center(year, by = childid) + "
                                  "group_mean(year, by = childid) + center(lowinc) "
                                  "+ (center(year, by = childid) | schoolid) "
                                  "+ (1 | childid:schoolid)"),
    "nested": (EGSINGLE, "math ~ center(year) + group_mean(year, by = schoolid) "
                         "+ (center(year) | schoolid/childid)"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Each data file with a row id `rid` (to line rows up across passes)."""
    d = tmp_path_factory.mktemp("centered")
    out = {}
    for path in {p for p, _ in MODELS.values()}:
        df = pl.read_parquet(path).with_row_index("rid")
        dest = d / path.name
        df.write_parquet(dest)
        out[path] = dest
    return out


@pytest.fixture(scope="module")
def fits(data):
    return {name: mlpipe.fit(data[path], formula, ddf=None)
            for name, (path, formula) in MODELS.items()}


def _training_fitted(result, path) -> pl.DataFrame:
    """Fitted values by the training-data pass of residuals and the report: the means
    recomputed from the training rows (no stored means involved)."""
    model = as_model(result)
    con = connect()
    try:
        frame = Frame(path, con)
        pred = linear_predictor(model, frame, con, training=True)
        complete = complete_condition(pred.formula.columns(), pred.schema)
        sql = pred.sql("rid, fitted, fitted_population",
                       pred.design.aggregates.source(frame.relation, complete), where=complete)
        return con.sql(sql, params={**frame.params, **pred.params}).pl().sort("rid")
    finally:
        con.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_predictions_on_the_training_data_are_the_fitted_values(name, fits, data):
    res = fits[name]
    path = data[MODELS[name][0]]
    assert res.stats.centering, "the fit stores its means"
    want = _training_fitted(res, path)
    got = predict(res, path)
    assert got["rid"].to_list() == list(range(got.height))  # input order
    got = got.filter(pl.col("rid").is_in(want["rid"].implode()))
    assert got.height == want.height == res.nobs
    for col in ("fitted", "fitted_population"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(),
                                   rtol=1e-10, atol=1e-10, err_msg=col)
    pop = predict(res, path, level="population").filter(
        pl.col("rid").is_in(want["rid"].implode()))
    np.testing.assert_allclose(pop["fitted"].to_numpy(), want["fitted_population"].to_numpy(),
                               rtol=1e-10, atol=1e-10)


def test_group_mean_centred_fitted_values_by_numpy(fits):
    """The HLM model, fitted values X·β + Z·b computed from the raw rows in numpy."""
    res = fits["group_mean"]
    raw = pl.read_parquet(HSB)
    gm = raw.group_by("school").agg(pl.col("ses").mean().alias("gm"))
    df = raw.join(gm, on="school", how="left", maintain_order="left")
    x_gm = df["gm"].to_numpy()
    x_c = (df["ses"] - df["gm"]).to_numpy()
    public = (df["sector"] == "Public").to_numpy().astype(float)
    b = res.fixef
    re = {(r["level"], r["term"]): r["estimate"] for r in res.ranef.iter_rows(named=True)}
    term = "center(ses, by = school)"
    u0 = np.array([re[(s, "(Intercept)")] for s in df["school"]])
    u1 = np.array([re[(s, term)] for s in df["school"]])
    fitted = (b["(Intercept)"] + b["group_mean(ses, by = school)"] * x_gm + b[term] * x_c
              + b["sectorPublic"] * public + u0 + u1 * x_c)
    got = predict(res, HSB)
    np.testing.assert_allclose(got["fitted"].to_numpy(), fitted, rtol=1e-10, atol=1e-10)


def test_a_new_group_is_centred_on_its_own_mean(fits):
    res = fits["group_mean"]
    raw = pl.read_parquet(HSB)
    school = raw["school"][0]
    rows = raw.filter(pl.col("school") == school)
    known = predict(res, rows)
    new = predict(res, rows.with_columns(pl.lit("NEW-SCHOOL").alias("school")))
    # its own mean is the training mean here (the same rows): the fixed part is unchanged,
    # and without a random effect the prediction is the population one
    np.testing.assert_allclose(new["fitted_population"].to_numpy(),
                               known["fitted_population"].to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(new["fitted"].to_numpy(), new["fitted_population"].to_numpy(),
                               rtol=0, atol=0)
    # a new group's mean is its own, from the rows of the new data
    shifted = rows.head(5).with_columns(pl.lit("NEW").alias("school"),
                                        (pl.col("ses") + 1.0).alias("ses"))
    p = predict(res, shifted, level="population")
    b = res.fixef
    own = shifted["ses"].mean()
    want = (b["(Intercept)"] + b["group_mean(ses, by = school)"] * own
            + b["center(ses, by = school)"] * (shifted["ses"] - own).to_numpy()
            + b["sectorPublic"] * (shifted["sector"] == "Public").to_numpy())
    np.testing.assert_allclose(p["fitted"].to_numpy(), want, rtol=1e-10)


def test_a_known_group_keeps_its_training_mean(fits):
    res = fits["group_mean"]
    full = predict(res, HSB)
    some = pl.read_parquet(HSB).with_row_index("rid").filter(pl.col("rid") % 7 == 3)
    part = predict(res, some.drop("rid"))
    np.testing.assert_allclose(part["fitted"].to_numpy(),
                               full["fitted"].to_numpy()[some["rid"].to_numpy()], rtol=1e-10)


def test_grand_mean_is_the_training_one(fits):
    res = fits["grand"]
    one = pl.read_parquet(HSB).head(1)
    p = predict(res, one, level="population")
    mean = pl.read_parquet(HSB)["ses"].mean()
    b = res.fixef
    c = one["ses"][0] - mean
    public = float(one["sector"][0] == "Public")
    want = (b["(Intercept)"] + b["center(ses)"] * c + b["sectorPublic"] * public
            + b["center(ses):sectorPublic"] * c * public)
    assert p["fitted"][0] == pytest.approx(want, rel=1e-10)


def test_result_dir_stats_refit_and_cli(fits, data, tmp_path):
    res = fits["group_mean"]
    path = data[HSB]
    want = predict(res, path)["fitted"].to_numpy()
    out = res.write(tmp_path / "fit")
    np.testing.assert_allclose(predict(out, path)["fitted"].to_numpy(), want, rtol=1e-12)
    # statistics saved and refitted: the means travel with them
    res.stats.save(tmp_path / "s.parquet")
    refit = mlpipe.fit(stats=tmp_path / "s.parquet", ddf=None)
    assert refit.stats.centering == res.stats.centering
    np.testing.assert_allclose(predict(refit, path)["fitted"].to_numpy(), want, rtol=1e-10)
    dest = tmp_path / "pred.parquet"
    cli = subprocess.run([sys.executable, "-m", "mlpipe.cli", "predict", str(out), str(path),
                          "--out", str(dest)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    np.testing.assert_allclose(pl.read_parquet(dest)["fitted"].to_numpy(), want, rtol=1e-12)


def test_statistics_are_unchanged_by_storing_the_means(fits, data):
    """The means the pass joins come from the stored tables: the same statistics as a model
    whose centred columns were computed beforehand."""
    res = fits["group_mean"]
    raw = pl.read_parquet(data[HSB])
    gm = raw.group_by("school").agg(pl.col("ses").mean().alias("gm"))
    df = raw.join(gm, on="school", maintain_order="left").with_columns(
        (pl.col("ses") - pl.col("gm")).alias("xc"))
    plain = mlpipe.compute_statistics(df, "mAch ~ gm + xc + sector + (xc | school)")
    np.testing.assert_allclose(res.stats.ztx, plain.ztx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.stats.xtx, plain.xtx, rtol=1e-9, atol=1e-9)
    means = res.stats.centering["by"][0]
    assert means["column"] == "school" and len(means["keys"]) == 160
    got = dict(zip(means["keys"], next(iter(means["means"].values()))))
    for s, m in gm.iter_rows():
        assert got[s] == pytest.approx(m, rel=1e-12)


def test_merged_statistics_have_no_means_and_prediction_says_so(data):
    raw = pl.read_parquet(data[HSB])
    formula = MODELS["group_mean"][1]
    a = mlpipe.compute_statistics(raw.filter(pl.col("rid") % 2 == 0), formula)
    b = mlpipe.compute_statistics(raw.filter(pl.col("rid") % 2 == 1), formula)
    merged = a.merge(b)
    assert merged.centering is None
    res = mlpipe.fit(stats=merged, ddf=None)
    with pytest.raises(FormulaError, match="not stored"):
        predict(res, raw)


def test_a_model_without_stored_means_is_refused():
    model = FittedModel("y ~ center(x) + (1|g)", {"(Intercept)": 0.0, "center(x)": 1.0}, 1.0,
                        pl.DataFrame({"group": "g", "level": ["a"], "term": "(Intercept)",
                                      "estimate": [0.0]}))
    with pytest.raises(FormulaError, match="not stored with this model"):
        predict(model, pl.DataFrame({"x": [1.0], "g": ["a"]}))
