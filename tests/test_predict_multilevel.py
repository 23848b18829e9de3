"""Predictions and residuals of models with several grouping factors (nested, crossed,
random slopes on either): X·β + Σ_k Z_k·b_k against lme4's fitted values and against plain
numpy sums of res.fixed_effects and res.ranef."""

from __future__ import annotations

import argparse
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlpipe
from mlpipe.cli import main
from mlpipe.errors import DataError
from mlpipe.predict import add_cli, predict, residual_summary

from conftest import DATA, REFS

PASTES = DATA / "pastes.parquet"
PENICILLIN = DATA / "penicillin.parquet"
NESTED = "strength ~ 1 + (1|batch/cask)"
CROSSED = "diameter ~ 1 + (1|plate) + (1|sample)"


@pytest.fixture(scope="module")
def pastes():
    return mlpipe.fit(PASTES, NESTED)


@pytest.fixture(scope="module")
def penicillin():
    return mlpipe.fit(PENICILLIN, CROSSED)


def _modes(res) -> dict[tuple[str, str, str], float]:
    """(factor, level, term) -> conditional mode."""
    return {(g, lv, t): e for g, lv, t, e in
            res.ranef.select("group", "level", "term", "estimate").iter_rows()}


def _label(df: pl.DataFrame, columns: list[str]) -> list[str | None]:
    """A factor's level label of every row: its columns' values joined by ':'."""
    cols = [df[c].cast(pl.Utf8).to_list() for c in columns]
    return [None if any(v is None for v in vals) else ":".join(vals) for vals in zip(*cols)]


def _numpy_fitted(res, df: pl.DataFrame, slopes: dict[str, str] | None = None) -> np.ndarray:
    """Xβ + Σ_k Z_k b_k of the rows of `df` in numpy: the intercept-only fixed part plus the
    columns in `slopes` (term -> column), and every factor's modes of each row's level (0 for
    a level the fit never saw)."""
    slopes = slopes or {}
    coef, modes = res.fixef, _modes(res)
    fit = np.full(df.height, coef.get("(Intercept)", 0.0))
    for term, col in slopes.items():
        if term in coef:
            fit = fit + coef[term] * df[col].to_numpy()
    for f in res.stats.factors:
        labels = _label(df, f.columns)
        for term in f.names:
            z = np.ones(df.height) if term == "(Intercept)" else df[slopes[term]].to_numpy()
            b = np.array([modes.get((f.name, lv, term), 0.0) for lv in labels])
            fit = fit + z * b
    return fit


# ---------------------------------------------------------------------- against lme4

@pytest.mark.parametrize("case, data", [("pastes_nested", PASTES),
                                        ("penicillin_crossed", PENICILLIN)])
def test_conditional_fitted_match_lme4(case, data):
    ref = json.loads((REFS / f"{case}.json").read_text())
    res = mlpipe.fit(data, ref["formula"])
    df = predict(res, data)
    raw = pl.read_parquet(data)
    assert df.select(raw.columns).equals(raw)  # input columns and row order kept
    np.testing.assert_allclose(df["fitted"].to_numpy()[:20], ref["reml"]["fitted_head"],
                               rtol=1e-6)
    np.testing.assert_allclose(df["fitted"].to_numpy(), _numpy_fitted(res, raw), rtol=1e-12)
    np.testing.assert_allclose(df["fitted_population"].to_numpy(), res.fixef["(Intercept)"])
    y = raw[ref["formula"].split("~")[0].strip()].to_numpy()
    np.testing.assert_allclose(df["residual"].to_numpy(), y - df["fitted"].to_numpy(),
                               atol=1e-12)


MULTILEVEL = DATA / "multilevel"


@pytest.mark.parametrize("case", ["oxide_3level", "pixel_nested_diag", "tvbo_nested_crossed",
                                  "scotssec_crossed_slope"])
def test_more_structures_match_lme4(case):
    """Three nested levels (Wafer:(Lot:Source)), `||` with lme4's reordered terms beside a
    nested factor, nested-and-crossed interaction factors, a crossed random slope: lme4's
    first conditional fitted values, within the fits' own accuracy."""
    ref = json.loads((MULTILEVEL / f"{case}.json").read_text())
    data = MULTILEVEL / f"{ref['data']}.parquet"
    res = mlpipe.fit(data, ref["formula"], ddf=None)
    head = ref["reml"]["fitted_head"]
    fitted = predict(res, data)["fitted"].drop_nulls().to_numpy()[:len(head)]
    np.testing.assert_allclose(fitted, head, rtol=1e-5)


# ---------------------------------------------------------------------- new levels

def test_new_level_of_one_crossed_factor_drops_only_its_term(penicillin):
    res = penicillin
    b0, m = res.fixef["(Intercept)"], _modes(res)
    plate = lambda lv: m[("plate", lv, "(Intercept)")]  # noqa: E731
    sample = lambda lv: m[("sample", lv, "(Intercept)")]  # noqa: E731
    new = pl.DataFrame({"plate": ["a", "zz", "a", None, "zz", "x"],
                        "sample": ["A", "A", "QQ", "B", None, "F"]})
    df = predict(res, new)
    expect = [b0 + plate("a") + sample("A"),  # both known
              b0 + sample("A"),  # a new plate: the sample's effect only
              b0 + plate("a"),  # a new sample: the plate's effect only
              b0 + sample("B"),  # null plate
              b0,  # a new plate and a null sample: the population prediction
              b0 + plate("x") + sample("F")]
    np.testing.assert_allclose(df["fitted"].to_numpy(), expect, rtol=1e-12)
    np.testing.assert_allclose(df["fitted_population"].to_numpy(), b0)
    assert "residual" not in df.columns


def test_new_cask_in_a_known_batch_keeps_the_batch(pastes):
    """Nested: a cask the fit never saw in batch A gets batch A's effect (and only it); an
    unseen batch with a cask label seen elsewhere gets neither."""
    res = pastes
    b0, m = res.fixef["(Intercept)"], _modes(res)
    new = pl.DataFrame({"batch": ["A", "A", "Z", "A"], "cask": ["a", "q", "a", None]})
    df = predict(res, new)
    batch_a = m[("batch", "A", "(Intercept)")]
    expect = [b0 + batch_a + m[("cask:batch", "a:A", "(Intercept)")], b0 + batch_a, b0,
              b0 + batch_a]
    np.testing.assert_allclose(df["fitted"].to_numpy(), expect, rtol=1e-12)


def test_population_needs_no_grouping_column(penicillin):
    df = predict(penicillin, pl.DataFrame({"x": [1, 2]}), level="population")
    np.testing.assert_allclose(df["fitted"].to_numpy(), penicillin.fixef["(Intercept)"])
    with pytest.raises(DataError, match="'plate'.*population"):
        predict(penicillin, pl.DataFrame({"sample": ["A"]}))


# ---------------------------------------------------------------------- random slopes

def _simulate_crossed(path, seed=11, n=1500):
    rng = np.random.default_rng(seed)
    a, b, x = rng.integers(0, 30, n), rng.integers(0, 12, n), rng.normal(size=n)
    ua, va, ub = rng.normal(size=30), 0.5 * rng.normal(size=30), 0.8 * rng.normal(size=12)
    vb = 0.4 * rng.normal(size=12)
    y = 2 + 0.7 * x + ua[a] + va[a] * x + ub[b] + vb[b] * x + rng.normal(size=n)
    pq.write_table(pa.table({"y": y, "x": x, "a": a, "b": [f"b{i}" for i in b]}), path)
    return pl.read_parquet(path)


@pytest.mark.parametrize("formula", ["y ~ x + (x|a) + (1|b)", "y ~ x + (1|a) + (x||b)"])
def test_random_slope_on_a_crossed_factor(tmp_path, formula):
    """On the training rows the prediction is y − (y − Xβ − Σ Z_k b_k), the residual computed
    in numpy from res.fixed_effects and res.ranef; residual_summary agrees with it too."""
    data = tmp_path / "crossed.parquet"
    raw = _simulate_crossed(data)
    res = mlpipe.fit(data, formula)
    assert set(res.groups) == {"a", "b"}
    fe = dict(zip(res.fixed_effects["term"], res.fixed_effects["estimate"]))
    y, x = raw["y"].to_numpy(), raw["x"].to_numpy()
    resid = y - fe["(Intercept)"] - fe["x"] * x
    for (g, lv, term), est in _modes(res).items():
        rows = (raw[g].cast(pl.Utf8) == lv).to_numpy()
        resid[rows] -= est * (1.0 if term == "(Intercept)" else x[rows])
    df = predict(res, data)
    np.testing.assert_allclose(df["fitted"].to_numpy(), y - resid, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(df["residual"].to_numpy(), resid, atol=1e-10)

    s = residual_summary(res)
    expect = np.quantile(resid / res.sigma, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(list(s.quantiles.values()), expect, rtol=1e-9)
    by = s.by_group
    assert s.groups == list(res.groups) and s.group == s.groups[0]
    assert by.columns == ["group", "level", "n", "mean_residual", "residual_variance"]
    assert by["group"].unique(maintain_order=True).to_list() == list(res.groups)
    for g, n_levels in res.groups.items():
        part = by.filter(pl.col("group") == g)
        assert part.height == n_levels and part["n"].sum() == raw.height
        want = res.ranef.filter(pl.col("group") == g)["level"].unique(maintain_order=True)
        assert part["level"].to_list() == want.to_list()  # ranef's order
        for row in part.iter_rows(named=True):
            ri = resid[(raw[g].cast(pl.Utf8) == row["level"]).to_numpy()]
            assert row["n"] == len(ri)
            assert row["mean_residual"] == pytest.approx(ri.mean(), abs=1e-9)
            assert row["residual_variance"] == pytest.approx(np.var(ri, ddof=1), rel=1e-8)


def test_slope_at_the_outer_level_of_a_nested_model(tmp_path):
    """(x | school) + (1 | school:cls) with integer columns; new data has the ids as doubles,
    an unseen class in a known school, an unseen school."""
    rng = np.random.default_rng(5)
    n = 1200
    school, cls, x = rng.integers(0, 25, n), rng.integers(0, 4, n), rng.normal(size=n)
    y = (1 + 0.5 * x + rng.normal(size=25)[school] + 0.4 * rng.normal(size=25)[school] * x
         + 0.8 * rng.normal(size=(25, 4))[school, cls] + rng.normal(size=n))
    data = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"y": y, "x": x, "school": school, "cls": cls}), data)
    raw = pl.read_parquet(data)
    res = mlpipe.fit(data, "y ~ x + (x|school) + (1|school:cls)")
    np.testing.assert_allclose(predict(res, data)["fitted"].to_numpy(),
                               _numpy_fitted(res, raw, {"x": "x"}), rtol=1e-12)
    new = pl.DataFrame({"x": [0.5, 0.5, 0.5], "school": [3.0, 3.0, 99.0],
                        "cls": [1.0, 7.0, 1.0]})
    df = predict(res, new)
    m, c = _modes(res), res.fixef
    school3 = m[("school", "3", "(Intercept)")] + 0.5 * m[("school", "3", "x")]
    cls31 = m[("school:cls", "3:1", "(Intercept)")]
    np.testing.assert_allclose(df["fitted"].to_numpy(),
                               [c["(Intercept)"] + 0.5 * c["x"] + school3 + cls31,
                                c["(Intercept)"] + 0.5 * c["x"] + school3,
                                c["(Intercept)"] + 0.5 * c["x"]], rtol=1e-12)
    # a null random-slope variable where the level is known: no conditional prediction
    df = predict(res, pl.DataFrame({"x": [None, 1.0], "school": [3, 3], "cls": [1, 1]},
                                   schema={"x": pl.Float64, "school": pl.Int64,
                                           "cls": pl.Int64}))
    assert df["fitted"][0] is None and df["fitted"][1] is not None


def test_a_colon_inside_a_level_value(tmp_path, pastes):
    """Labels such as 'a:x:A' cannot be split into the factor's two columns: the label
    itself is matched, with the same predictions as numpy's."""
    data = tmp_path / "colon.parquet"
    pl.read_parquet(PASTES).with_columns(pl.col("cask") + ":x").write_parquet(data)
    res = mlpipe.fit(data, NESTED)
    assert "a:x:A" in res.ranef["level"].to_list()
    raw = pl.read_parquet(data)
    np.testing.assert_allclose(predict(res, data)["fitted"].to_numpy(),
                               _numpy_fitted(res, raw), rtol=1e-12)


# ---------------------------------------------------------------------- result dirs, CLI

def test_result_dir_and_cli(pastes, tmp_path, capsys):
    rdir = pastes.write(tmp_path / "res")
    np.testing.assert_allclose(predict(rdir, PASTES)["fitted"].to_numpy(),
                               predict(pastes, PASTES)["fitted"].to_numpy(), rtol=1e-12)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "pred.parquet"
    args = parser.parse_args(["predict", str(rdir), str(PASTES), "--out", str(out)])
    assert args.func(args) == 0
    assert "60 rows" in capsys.readouterr().out
    got = pl.read_parquet(out)
    np.testing.assert_allclose(got["fitted"].to_numpy(),
                               _numpy_fitted(pastes, pl.read_parquet(PASTES)), rtol=1e-12)


def test_fit_residuals_writes_every_factor(tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", str(PENICILLIN), "--formula", CROSSED, "--residuals",
                 "--out", str(out)]) == 0
    assert "Scaled residuals:" in capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert list(res["scaled_residuals"]) == ["Min", "1Q", "Median", "3Q", "Max"]
    by = pl.read_parquet(out / "residuals_by_group.parquet")
    assert by.group_by("group", maintain_order=True).len().rows() == [("plate", 24),
                                                                     ("sample", 6)]
    assert (by.filter(pl.col("group") == "plate")["n"] == 6).all()
    assert (by.filter(pl.col("group") == "sample")["n"] == 24).all()


def test_bad_input_is_one_line_exit_2(pastes, tmp_path, capsys):
    rdir = pastes.write(tmp_path / "res")
    bad = tmp_path / "nobatch.parquet"
    pq.write_table(pa.table({"cask": ["a"]}), bad)
    out = tmp_path / "pred.parquet"
    assert main(["predict", str(rdir), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlpipe: error: ") and "'batch'" in err[0]
    assert not out.exists()
