"""Predictor construction in the statistics pass: center(), center(by=), group_mean(by=)."""

from __future__ import annotations

from pathlib import Path
import json

import duckdb
import pytest

import mlpipe

DATA = Path(__file__).parent / "data"
HSB = str(DATA / "hsb82.parquet")


def test_group_centering_reproduces_the_precomputed_hsb_columns():
    """hsb82's meanses / cses are the school means / school-centred ses: computing them in
    SQL must give lme4's hsb_full fit."""
    ref = json.loads(open(DATA / "lme4/hsb_full.json").read())["reml"]
    f = ("mAch ~ group_mean(ses, by=school)*center(ses, by=school) "
         "+ sector*center(ses, by=school) + (center(ses, by=school) | school)")
    res = mlpipe.fit(HSB, f)
    assert res.reml_criterion == pytest.approx(ref["deviance_or_reml"], rel=1e-6)
    assert res.fixed_effects["estimate"].to_list() == pytest.approx(ref["fixed"]["estimate"],
                                                                    abs=1e-4)
    assert res.fixed_effects["term"][1] == "group_mean(ses, by = school)"


def test_grand_mean_centering_shifts_only_the_intercept():
    raw = mlpipe.fit(HSB, "mAch ~ ses + (1|school)")
    cen = mlpipe.fit(HSB, "mAch ~ center(ses) + (1|school)")
    mean_ses = duckdb.connect().execute(f"SELECT avg(ses) FROM '{HSB}'").fetchone()[0]
    b_raw, b_cen = raw.fixef, cen.fixef
    assert b_cen["center(ses)"] == pytest.approx(b_raw["ses"], rel=1e-7)
    assert b_cen["(Intercept)"] == pytest.approx(b_raw["(Intercept)"] + b_raw["ses"] * mean_ses,
                                                 rel=1e-7)
    assert cen.reml_criterion == pytest.approx(raw.reml_criterion, rel=1e-10)


def test_group_mean_needs_by():
    with pytest.raises(mlpipe.FormulaError, match="by="):
        mlpipe.fit(HSB, "mAch ~ group_mean(ses) + (1|school)")
