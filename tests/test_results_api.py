"""The per-level and named outputs of a fit against lme4: coef() per factor, fixef, the named
vcov table, the "Correlation of Fixed Effects" block (tests/data/lme4_coef/coef_refs.json, made
by tests/data/lme4_coef/make_coef_refs.R); the short repr and the notebook view."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.cli import main
from mlpipe.results import r_abbreviate

DATA = Path(__file__).parent / "data"
REFS = {c["case"]: c for c in json.loads((DATA / "lme4_coef" / "coef_refs.json").read_text())}
FILES = {"sleepstudy": DATA / "sleepstudy.parquet", "hsb82": DATA / "hsb82.parquet",
         "pastes": DATA / "pastes.parquet", "penicillin": DATA / "penicillin.parquet"}


@pytest.fixture(scope="module", params=sorted(REFS))
def case(request):
    ref = REFS[request.param]
    return ref, mlpipe.fit(str(FILES[ref["data"]]), ref["formula"], method="REML")


def test_coef_per_level_matches_lme4(case):
    ref, res = case
    got = res.coef()
    assert list(got) == [g["group"] for g in ref["coef"]]
    for g in ref["coef"]:
        table = got[g["group"]]
        cols = g["columns"] if isinstance(g["columns"], list) else [g["columns"]]
        assert table.columns == ["level"] + cols
        values = np.array(g["values"], dtype=float).reshape(len(g["levels"]), len(cols))
        by_level = {lv: i for i, lv in enumerate(table["level"].to_list())}
        assert set(by_level) == set(g["levels"])
        rows = [by_level[lv] for lv in g["levels"]]
        mine = table.select(cols).to_numpy()[rows]
        np.testing.assert_allclose(mine, values, rtol=2e-5, atol=1e-6 * np.abs(values).max())


def test_fixef_and_named_vcov_match_lme4(case):
    ref, res = case
    assert list(res.fixef) == list(ref["fixef"])
    np.testing.assert_allclose(list(res.fixef.values()), list(ref["fixef"].values()), rtol=1e-6)
    v = res.vcov
    names = ref["vcov"]["names"] if isinstance(ref["vcov"]["names"], list) \
        else [ref["vcov"]["names"]]
    assert isinstance(v, pl.DataFrame) and v.columns == names
    expect = np.array(ref["vcov"]["values"], dtype=float).reshape(len(names), len(names))
    np.testing.assert_allclose(v.to_numpy(), expect, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(v), res.vcov_matrix)
    corr = res.correlation_of_fixed.select(names).to_numpy()
    np.testing.assert_allclose(np.diag(corr), 1.0)


def test_correlation_of_fixed_effects_printed_as_lme4(case):
    ref, res = case
    text = res.summary(correlation=True)
    assert "Correlation of Fixed Effects" not in res.summary()
    if not ref["correlation_text"]:  # one fixed effect: lme4 prints nothing either
        assert "Correlation of Fixed Effects" not in text
        return
    block = text[text.index("Correlation of Fixed Effects:"):].splitlines()
    block = block[:len(ref["correlation_text"])]
    assert block == [line.rstrip() for line in ref["correlation_text"]]


def test_r_abbreviate_matches_r():
    ref = json.loads((DATA / "lme4_coef" / "abbreviate_refs.json").read_text())
    assert r_abbreviate(ref["names"], 6) == ref["min6"]
    assert r_abbreviate(ref["names"], 11) == ref["min11"]


def test_short_repr_and_html(case):
    ref, res = case
    text = repr(res)
    assert len(text.splitlines()) <= 10 and len(text) < 600
    assert ref["formula"] in text and f"{res.nobs:,}" in text and res.method in text
    for g in res.groups:
        assert g in text
    page = res._repr_html_()
    assert page.startswith("<div>") and "<table" in page and "Fixed effects" in page
    assert "&lt;" not in ref["formula"] or "<" not in page.split("<code>")[1].split("</code>")[0]


def test_coef_as_mapping_is_the_fixed_effects_with_a_deprecation_warning(case):
    _, res = case
    with pytest.warns(DeprecationWarning, match="fixef"):
        legacy = dict(res.coef)
    assert legacy == res.fixef
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res.coef()
        res.fixef


def test_cli_correlation_of_fixed(capsys):
    ref = REFS["sleepstudy_rs"]
    assert main(["fit", str(FILES["sleepstudy"]), "-f", ref["formula"], "--ddf", "none",
                 "--correlation-of-fixed"]) == 0
    out = capsys.readouterr().out
    assert "\n".join(line.rstrip() for line in ref["correlation_text"]) in out


def test_public_api_has_docstrings():
    for name in mlpipe.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(mlpipe, name)
        assert (obj.__doc__ or "").strip(), f"mlpipe.{name} has no docstring"
    for name in ("summary", "coefficients", "write", "fixef", "vcov", "correlation_of_fixed"):
        assert (getattr(mlpipe.FitResult, name).__doc__ or "").strip(), name


@pytest.mark.parametrize("case", ["sleepstudy_rs", "pastes_nested", "penicillin_crossed"])
def test_ranef_wide_is_lme4s_ranef(case):
    """`result.ranef_wide()` is lme4's ranef(): per factor, levels × terms of conditional
    modes, equal to lme4's (1e-4 relative to the largest)."""
    ref = json.loads((Path(__file__).parent / "data" / "lme4" / f"{case}.json").read_text())
    data = Path(__file__).parent / "data" / f"{ref['data']}.parquet"
    res = mlpipe.fit(data, ref["formula"], ddf=None)
    wide = res.ranef_wide()
    for block in ref["reml"]["ranef"]:
        table = wide[block["group"]]
        terms = block["terms"] if isinstance(block["terms"], list) else [block["terms"]]
        assert table.columns == ["level"] + terms
        assert table["level"].to_list() == block["levels"]
        got = table.select(terms).to_numpy()
        want = np.asarray(block["values"], dtype=float).reshape(got.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
