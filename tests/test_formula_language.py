"""The formula language of issue 12 against lme4 fits on real datasets: factor(x),
relevel(x, ref) / C(x, ref = r), `(a + b + c)^2`, `%in%`, `pi`, `offset(x)`, scale(x),
poly(x, k), and case weights (lme4's `weights =`).

References: tests/data/formula_language/make_refs.R (lme4 at its best optimum, polished; the
JSON layout of tests/data/extra plus `weights` and `fitted_head`).  Each case is fitted by
REML and ML and held to the tolerances of test_accuracy_lme4.py: criteria 1e-6 relative,
fixed effects 1e-3 x SE, SEs, SDs and correlations 1e-3 relative; R's term names exactly.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from conftest import (check_conditional_modes, check_criterion, check_fixed_effects,
                      check_variance_components, listify)
from mlpipe.errors import FormulaError, MlpipeError
from mlpipe.formula import parse_formula

DATA = Path(__file__).parent / "data" / "formula_language"
CASE_NAMES = sorted(p.stem for p in DATA.glob("*.json") if p.stem != "poly_coefs")
CASES = [(c, m) for c in CASE_NAMES for m in ("REML", "ML")]

#: cases fitted by mlpipe with another spelling of the same model (names then differ)
SPELLINGS = {
    "sleep_relevel_C": ("sleep_relevel", "Reaction ~ C(Days, ref = 3) + (1 | Subject)"),
    "hsb_relevel_C": ("hsb_relevel_string",
                      'mAch ~ C(sector, ref = "Public") * cses + (cses | school)'),
    "hsb_power_spelled": ("hsb_power", "mAch ~ meanses + cses + sector + meanses:cses + "
                          "meanses:sector + cses:sector + (cses | school)"),
    "hsb_in_spelled": ("hsb_in", "mAch ~ sector + sector:cses + (cses | school)"),
    # pw(t, knot): the two segments min(t, knot) and max(t - knot, 0) as one term
    "sleep_pw": ("sleep_piecewise", "Reaction ~ pw(Days, 4) + (pw(Days, 4) | Subject)"),
}


@cache
def reference(case: str) -> dict:
    return json.loads((DATA / f"{case}.json").read_text())


@cache
def fitted(case: str, method: str, formula: str | None = None):
    ref = reference(case)
    res = mlpipe.fit(DATA / f"{ref['data']}.parquet", formula or ref["formula"], method=method,
                     weights=ref.get("weights") or None)
    return res, ref[method.lower()]


@pytest.mark.parametrize("case,method", CASES)
def test_criterion(case, method):
    res, ref = fitted(case, method)
    check_criterion(res, ref)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_term_names(case):
    """R's names of the fixed effects (factor(Days)1, relevel(sector, "Public")Catholic,
    poly(Days, 2)1, scale(Days), ...) in R's column order, and of the random effects."""
    res, ref = fitted(case, "REML")
    assert res.fixed_effects["term"].to_list() == listify(ref["fixed"]["term"])
    mine = res.random_effects.select("group", "term").rows()
    theirs = [(g["group"], t) for g in ref["ranef"] for t in listify(g["terms"])]
    assert sorted(mine) == sorted(theirs)


@pytest.mark.parametrize("case,method", CASES)
def test_fixed_effects(case, method):
    res, ref = fitted(case, method)
    check_fixed_effects(res, ref)


@pytest.mark.parametrize("case,method", [c for c in CASES
                                         if len(reference(c[0])["reml"]["ranef"]) == 1])
def test_variance_and_modes(case, method):
    res, ref = fitted(case, method)
    check_variance_components(res, ref)
    check_conditional_modes(res, ref)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_other_spellings(name, method):
    """C(x, ref = r) is relevel(); `(a+b+c)^2` and `%in%` equal their expansions."""
    case, formula = SPELLINGS[name]
    res, ref = fitted(case, method, formula)
    check_criterion(res, ref)
    check_fixed_effects(res, ref)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_fitted_values_on_the_training_rows(case):
    """predict reproduces each new term on the data (factor levels, the offset added back,
    scale()'s and poly()'s stored constants): lme4's fitted values of the first 20 rows."""
    ref = reference(case)
    res, _ = fitted(case, "REML")
    path = DATA / f"{ref['data']}.parquet"
    pred = mlpipe.predict.predict(res, path)
    # lme4's fitted values are of the rows it used: those with every model variable present
    used = pl.read_parquet(path).select(
        pl.all_horizontal(pl.col(c).is_not_null()
                          for c in parse_formula(ref["formula"]).value_columns())).to_series()
    got = pred["fitted"].filter(used).to_numpy()[:20]
    want = np.asarray(ref["reml"]["fitted_head"], float)
    scale = float(np.std(want)) + 1.0
    assert np.max(np.abs(got - want)) < 1e-4 * scale


def test_prepass_constants_equal_r():
    """scale()'s mean and SD and poly()'s alpha and norm2 (R's attr(, "coefs"))."""
    coefs = json.loads((DATA / "poly_coefs.json").read_text())
    from mlpipe.stats import compute_statistics
    st = compute_statistics(DATA / "sleepstudy_w.parquet",
                            "Reaction ~ poly(Days, 2) + scale(Days) + (1 | Subject)")
    c = coefs["sleep_days_2"]
    assert st.factor_levels["poly(Days, 2)"] == pytest.approx(
        listify(c["alpha"]) + listify(c["norm2"]), rel=1e-12)
    sc = coefs["sleep_scale"]
    assert st.factor_levels["scale(Days)"] == pytest.approx([sc["center"], sc["scale"]],
                                                            rel=1e-12)
    st = compute_statistics(DATA / "hsb.parquet", "mAch ~ poly(ses, 3) + (1 | school)")
    c = coefs["hsb_ses_3"]
    assert st.factor_levels["poly(ses, 3)"] == pytest.approx(
        listify(c["alpha"]) + listify(c["norm2"]), rel=1e-9)


def test_weights_from_saved_statistics(tmp_path):
    """The weights and Σ log w travel with the statistics: a refit from the file is the same."""
    ref = reference("sleep_weights")
    res = mlpipe.fit(DATA / "sleepstudy_w.parquet", ref["formula"], weights="w")
    from mlpipe.stats import Statistics, compute_statistics
    st = compute_statistics(DATA / "sleepstudy_w.parquet", ref["formula"], weights="w")
    st.save(tmp_path / "s.parquet")
    back = Statistics.load(tmp_path / "s.parquet")
    assert back.weights == "w" and back.log_weights == pytest.approx(st.log_weights)
    again = mlpipe.fit(stats=tmp_path / "s.parquet")
    assert again.reml_criterion == pytest.approx(res.reml_criterion, rel=1e-12)


def test_unit_weights_are_no_weights(tmp_path):
    plain = mlpipe.fit(DATA / "sleepstudy_w.parquet", "Reaction ~ Days + (Days | Subject)")
    import duckdb
    path = tmp_path / "ones.parquet"
    duckdb.sql(f"COPY (SELECT *, 1.0 AS one FROM '{DATA / 'sleepstudy_w.parquet'}') "
               f"TO '{path}' (FORMAT parquet)")
    weighted = mlpipe.fit(path, "Reaction ~ Days + (Days | Subject)", weights="one")
    assert weighted.reml_criterion == pytest.approx(plain.reml_criterion, rel=1e-12)


@pytest.mark.parametrize("text,labels", [
    ("y ~ (a + b + c)^2 + (1|g)", ["a", "b", "c", "a:b", "a:c", "b:c"]),
    ("y ~ (a + b + c)^3 + (1|g)", ["a", "b", "c", "a:b", "a:c", "b:c", "a:b:c"]),
    ("y ~ a + b %in% a + (1|g)", ["a", "a:b"]),
    ("y ~ b %in% a + a + (1|g)", ["a", "b:a"]),
    ("y ~ (a + b) %in% (c + d) + (1|g)", ["a:c:d", "b:c:d"]),
    ("y ~ a:b %in% c + (1|g)", ["a:b:c"]),
    ('y ~ relevel(x, "b") + C(x, ref = "b") + factor(z) + (1|g)',
     ['relevel(x, "b")', 'C(x, ref = "b")', "factor(z)"]),
    ("y ~ I(2 * pi * x) + (1|g)", ["I(2 * pi * x)"]),
    ("y ~ poly(x, 2) + scale(x) + offset(w) + (1|g)", ["poly(x, 2)", "scale(x)"]),
])
def test_parsing(text, labels):
    """R's term labels (as attr(terms(f), "term.labels") gives them)."""
    f = parse_formula(text)
    assert [":".join(v.label for v in t) for t in f.fixed] == labels


def test_pi_is_a_constant_and_backticked_pi_a_column():
    f = parse_formula("y ~ I(pi * x) + I(`pi` * x) + (1|g)")
    assert f.columns() == ["y", "x", "pi", "g"]
    assert parse_formula("y ~ offset(log(w)) + x + (1|g)").offsets[0].deparse() == "log(w)"


@pytest.mark.parametrize("text,message", [
    ("y ~ pi + (1|g)", "pi is a constant"),
    ("y ~ a %x% b + (1|g)", "%x% "),
    ("y ~ (a + b)^x + (1|g)", "whole number"),
    ("y ~ (offset(x) | g)", "offset() is not allowed inside"),
    ('y ~ C(x, "b") + (1|g)', "ref ="),
    ("y ~ relevel(x) + (1|g)", "relevel() needs the reference level"),
    ("y ~ poly(x) + (1|g)", "expected ','"),
    ("y ~ poly(x, 2, raw = TRUE) + (1|g)", "orthogonal polynomials only"),
    ("y ~ factor(log(x)) + (1|g)", "column name"),
    ("y ~ scale(x, center = FALSE) + (1|g)", "one argument"),
])
def test_formula_errors(text, message):
    with pytest.raises(FormulaError, match=None) as err:
        parse_formula(text)
    assert message in str(err.value)


@pytest.mark.parametrize("formula,weights,message", [
    ('Reaction ~ relevel(factor(Days), "12") + (1 | Subject)', None, "is not a level"),
    ("Reaction ~ relevel(factor(Days), 11) + (1 | Subject)", None, "position 11"),
    ("Reaction ~ Days + (1 | Subject)", "nope", "weights column 'nope'"),
    ("Reaction ~ Days + (1 | Subject)", "Subject", "not numeric"),
    ("Reaction ~ Days + (1 | Subject)", "Days", "must be positive"),
    ("Reaction ~ poly(Days, 10) + (1 | Subject)", None, "unique points"),
])
def test_data_errors(formula, weights, message):
    with pytest.raises(MlpipeError) as err:
        mlpipe.fit(DATA / "sleepstudy_w.parquet", formula, weights=weights)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["sleep_scale", "sleep_poly", "hsb_poly", "sleep_offset",
                                  "sleep_factor"])
def test_prediction_on_new_rows_uses_the_stored_constants(case, tmp_path):
    """On new data (here 20 training rows alone) scale() and poly() use the training
    constants, not the new rows' moments: the predictions are still lme4's fitted values."""
    import duckdb
    ref = reference(case)
    res, _ = fitted(case, "REML")
    path = tmp_path / "new.parquet"
    duckdb.sql(f"COPY (SELECT * FROM '{DATA / (ref['data'] + '.parquet')}' LIMIT 20) "
               f"TO '{path}' (FORMAT parquet)")
    got = mlpipe.predict.predict(res, path)["fitted"].to_numpy()
    want = np.asarray(ref["reml"]["fitted_head"], float)
    assert np.max(np.abs(got - want)) < 1e-4 * (float(np.std(want)) + 1.0)


def test_unseen_factor_level_predicts_null(tmp_path):
    """factor(Days) on a Days value the model never saw: NULL, not the reference level."""
    import duckdb
    res, _ = fitted("sleep_factor", "REML")
    path = tmp_path / "new.parquet"
    duckdb.sql(f"COPY (SELECT * REPLACE (CASE WHEN Days = 3 THEN 42 ELSE Days END AS Days) "
               f"FROM '{DATA / 'sleepstudy_w.parquet'}' LIMIT 10) TO '{path}' (FORMAT parquet)")
    out = mlpipe.predict.predict(res, path)
    fitted_ = out["fitted"].to_list()
    assert fitted_[3] is None and all(v is not None for k, v in enumerate(fitted_) if k != 3)


def test_cli_weights_option_and_config(tmp_path):
    """--weights COL on fit and stats, `weights = "col"` in a config: lme4's criterion."""
    from mlpipe.cli import main
    ref = reference("sleep_weights")
    data = str(DATA / "sleepstudy_w.parquet")
    assert main(["fit", data, "-f", ref["formula"], "--weights", "w", "-q",
                 "--out", str(tmp_path / "a")]) == 0
    got = json.loads((tmp_path / "a" / "result.json").read_text())["reml_criterion"]
    assert got == pytest.approx(ref["reml"]["deviance_or_reml"], rel=1e-6)
    assert 'weights = "w"' in (tmp_path / "a" / "config.toml").read_text()
    assert main(["stats", data, "-f", ref["formula"], "-w", "w",
                 "-o", str(tmp_path / "s.parquet")]) == 0
    assert main(["fit", "--stats", str(tmp_path / "s.parquet"), "--ml", "-q",
                 "--out", str(tmp_path / "b")]) == 0
    got = json.loads((tmp_path / "b" / "result.json").read_text())["deviance"]
    assert got == pytest.approx(ref["ml"]["deviance_or_reml"], rel=1e-6)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{data}"\nformula = "{ref["formula"]}"\nweights = "w"\n'
                   f'out = "{tmp_path / "c"}"\n')
    assert main(["fit", "-c", str(cfg), "-q"]) == 0
    got = json.loads((tmp_path / "c" / "result.json").read_text())["reml_criterion"]
    assert got == pytest.approx(ref["reml"]["deviance_or_reml"], rel=1e-6)
    # statistics built with other weights than asked for: refused
    assert main(["fit", "--stats", str(tmp_path / "s.parquet"), "--weights", "Days"]) == 2


@pytest.mark.parametrize("engine", ["duckdb", "polars"])
def test_scale_and_poly_constants_include_rows_missing_other_variables(engine):
    """R evaluates scale(x) / poly(x, k) on the whole data and only then drops the rows
    missing another variable (STAR: 2,183 rows without math): the constants are taken over
    every row with a value of x, so the fit equals lme4's (before, over the complete rows,
    the fixed effects were 8 SE off) — in both engines that compute them."""
    ref = reference("star_scale_na")
    path = DATA / f"{ref['data']}.parquet"
    data = pl.read_parquet(path)
    yrs = data["yrs"].drop_nulls()
    res = mlpipe.fit(path, ref["formula"], ddf=None, engine=engine)
    assert res.stats.factor_levels["scale(yrs)"] == pytest.approx(
        [float(yrs.mean()), float(yrs.std())], rel=1e-12)
    assert data["math"].null_count() > 0 and res.nobs == data["math"].drop_nulls().len()
    check_criterion(res, ref["reml"])
