"""Inference for models with several grouping factors against lmerTest / pbkrtest / lme4.

References: tests/data/multilevel_inference/*.json, made by make_refs.R there (lme4 1.1-31,
lmerTest 3.1-3, pbkrtest 0.5.2): Pastes (nested), Penicillin (crossed), a simulated nested
model with a fixed covariate and a correlated random slope at the upper level, a simulated
crossed model with an uncorrelated slope (two terms on one factor), and Pixel, whose terms
lme4 reorders with ties reversed, and a simulated crossed model whose second variance is
estimated as 0.  Tolerances: df 1e-2 relative, p 1e-3 relative (1e-12 absolute when tiny),
profile bounds 1e-3 relative — 1e-2 for a parameter whose profile lme4 itself could not fit
by a spline ("bad spline fit ...: falling back to linear interpolation"; sd_(Intercept)|b of
sim_crossed_boundary, whose upper bound moves by 5e-3 between lme4 runs).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import mlpipe
from conftest import listify
from mlpipe import inference
from mlpipe.blocked import BlockedObjective
from mlpipe.model import add_inference, fit_statistics

DATA = Path(__file__).parent / "data"
REFS = DATA / "multilevel_inference"
FILES = {"pastes": DATA / "pastes.parquet", "penicillin": DATA / "penicillin.parquet"}
CASES = ["pastes_nested", "penicillin_crossed", "sim_nested_slope", "sim_crossed_slope",
         "sim_crossed_boundary", "pixel_ties"]


@cache
def reference(case: str) -> dict:
    """The reference, every per-term value as a list (R writes one-element vectors as
    scalars)."""
    ref = json.loads((REFS / f"{case}.json").read_text())
    for key in ("satterthwaite", "kenward_roger", "wald_ci", "profile_ci"):
        ref[key] = {k: listify(v) for k, v in ref[key].items()}
    return ref


def data_file(case: str) -> Path:
    name = reference(case)["data"]
    return FILES.get(name, REFS / f"{name}.parquet")


@cache
def fitted(case: str, ddf: str | None, ci: str | None) -> mlpipe.FitResult:
    return mlpipe.fit(data_file(case), reference(case)["formula"], ddf=ddf, ci=ci)


def _p_close(got, want, rtol=1e-3):
    for g, w, r in zip(got, want, np.broadcast_to(rtol, len(want))):
        assert abs(g - w) <= max(r * w, 1e-12), (g, w)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ddf", ["satterthwaite", "kenward-roger"])
def test_denominator_df_and_p_values(case, ddf):
    res = fitted(case, ddf, "wald")
    ref = reference(case)["satterthwaite" if ddf == "satterthwaite" else "kenward_roger"]
    fe = res.fixed_effects
    assert fe["term"].to_list() == ref["term"]
    assert res.df_method == ("Satterthwaite" if ddf == "satterthwaite" else "Kenward-Roger")
    np.testing.assert_allclose(fe["df"].to_numpy(), ref["df"], rtol=1e-2)
    _p_close(fe["p_value"].to_numpy(), ref["p"])
    np.testing.assert_allclose(fe["t_value"].to_numpy(), ref["t"], rtol=1e-3)
    if ddf == "kenward-roger":  # the adjusted SEs, sqrt(diag(vcovAdj))
        np.testing.assert_allclose(fe["std_error"].to_numpy(), ref["se_vcovadj"], rtol=1e-4)


MULTI = DATA / "multilevel"
DDF_CASES = sorted(p.stem for p in MULTI.glob("*.json")
                   if "satterthwaite" in json.loads(p.read_text())["reml"])


@pytest.mark.parametrize("case", DDF_CASES)
def test_real_data_kenward_roger_and_satterthwaite(case):
    """The real-data cases of tests/data/multilevel (nested to three levels, || at the upper
    level, nested and crossed together, two terms on one factor, pupils crossed with
    teachers in STAR) that carry lmerTest's Satterthwaite, and pbkrtest's Kenward-Roger
    where computed (small cases): df and p-values.  A t tail falls as |t|^-df, so
    p's relative error is about ln|t| times df's: p within 1e-3·max(1, ln|t|) relative
    (oxide: df = 1.0004 against lmerTest's 1.0000 by numerical derivatives, t = 397)."""
    ref = json.loads((MULTI / f"{case}.json").read_text())
    data = MULTI / f"{ref['data']}.parquet"
    for ddf, key in (("kenward-roger", "kenward_roger"), ("satterthwaite", "satterthwaite")):
        if key not in ref["reml"]:
            continue
        fe = mlpipe.fit(data, ref["formula"], ddf=ddf).fixed_effects
        want = {k: listify(v) for k, v in ref["reml"][key].items()}
        assert fe["term"].to_list() == want["term"]
        np.testing.assert_allclose(fe["df"].to_numpy(), want["df"], rtol=1e-2)
        rtol = 1e-3 * np.maximum(1.0, np.log(np.abs(fe["t_value"].to_numpy())))
        _p_close(fe["p_value"].to_numpy(), want["p"], rtol)


@pytest.mark.parametrize("case", CASES)
def test_wald_intervals(case):
    """lme4's names and order; fixed effects as confint(method = "Wald") (unadjusted vcov,
    also under Kenward-Roger); the variance parameters, which lme4 leaves NA, inside their
    space and around the estimate."""
    res = fitted(case, "kenward-roger", "wald")
    ref = reference(case)["wald_ci"]
    ci = res.confidence_intervals
    assert ci["parameter"].to_list() == ref["name"]
    assert res.ci_level == 0.95
    fixed = [i for i, v in enumerate(ref["lower"]) if v is not None]
    assert fixed == list(range(len(ref["name"]) - res.stats.p, len(ref["name"])))
    for col in ("lower", "upper"):
        np.testing.assert_allclose(ci[col].to_numpy()[fixed], [ref[col][i] for i in fixed],
                                   rtol=1e-5)
    var = ci.head(len(ref["name"]) - res.stats.p)
    var = var.filter(~var["lower"].is_nan())  # an sd estimated as 0 has none
    assert np.all(var["lower"].to_numpy() <= var["estimate"].to_numpy())
    assert np.all(var["estimate"].to_numpy() <= var["upper"].to_numpy())
    cor = var.filter(var["parameter"].str.starts_with("cor_"))
    assert np.all(cor["lower"].to_numpy() >= -1) and np.all(cor["upper"].to_numpy() <= 1)
    assert np.all(var.filter(~var["parameter"].str.starts_with("cor_"))["lower"].to_numpy() >= 0)


# pixel_ties is left out here to keep the file fast: its names and order are the Wald
# test's, and its profile bounds agree to 8e-4 (lme4's spline; docs/inference.md §9)
@pytest.mark.parametrize("case", [c for c in CASES if c != "pixel_ties"])
def test_profile_intervals(case):
    res = fitted(case, None, "profile")
    ref = reference(case)["profile_ci"]
    ci = res.confidence_intervals
    assert ci["parameter"].to_list() == ref["name"]
    rtol = np.full(len(ref["name"]), 1e-3)
    for w in ref.get("warnings", []):
        m = re.match(r"bad spline fit for \.sig(\d+)", w)
        if m:
            rtol[int(m.group(1)) - 1] = 1e-2
    for col in ("lower", "upper"):
        got, want = ci[col].to_numpy(), np.asarray(ref[col], dtype=float)
        assert np.all(np.abs(got - want) <= rtol * np.abs(want) + 1e-9), (col, got, want)
    # the estimates are ML's (lme4 profiles the ML deviance)
    ml = reference(case)["ml"]
    assert ci.filter(parameter="sigma")["estimate"][0] == pytest.approx(ml["sigma"], rel=1e-4)


@pytest.mark.parametrize("case, parameter", [("pastes_nested", "sd_(Intercept)|batch"),
                                             ("sim_crossed_boundary", "sd_(Intercept)|b")])
def test_profile_lower_bound_zero(case, parameter):
    """zeta never reaches -1.96 above 0, so the lower end is the bound (lme4 gives 0 too)."""
    ci = fitted(case, None, "profile").confidence_intervals
    assert ci.filter(parameter=parameter)["lower"][0] == 0.0


def test_boundary_fit_kenward_roger():
    """θ_b = 0 (mlpipe snaps it; lme4 stops at 3e-8): Kenward-Roger at the boundary agrees
    with pbkrtest to 1e-6, and the Wald interval of the zero sd is NaN (undefined)."""
    res = fitted("sim_crossed_boundary", "kenward-roger", "wald")
    assert res.singular and res.theta[1] == 0
    ref = reference("sim_crossed_boundary")["kenward_roger"]
    np.testing.assert_allclose(res.fixed_effects["df"].to_numpy(), ref["df"], rtol=1e-6)
    sd_b = res.confidence_intervals.filter(parameter="sd_(Intercept)|b")
    assert sd_b["estimate"][0] == 0 and np.isnan(sd_b["lower"][0])


def test_kenward_roger_equals_the_one_factor_computation():
    """(1 | batch:cask) is a factor on a combination of columns (the blocked objective);
    (1 | sample) is the same factor as one column: Kenward-Roger and both kinds of interval
    agree between the two code paths."""
    one = mlpipe.fit(DATA / "pastes.parquet", "strength ~ 1 + (1|sample)",
                     ddf="kenward-roger", ci="profile")
    gen = mlpipe.fit(DATA / "pastes.parquet", "strength ~ 1 + (1|batch:cask)", ddf=None)
    assert gen.stats.general and not one.stats.general
    obj = BlockedObjective(gen.stats, reml=True)
    beta = one.fixed_effects["estimate"].to_numpy()
    kr = inference.kenward_roger_general(obj, one.theta, one.sigma, beta)
    np.testing.assert_allclose(kr.df, one.fixed_effects["df"].to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(kr.std_error, one.fixed_effects["std_error"].to_numpy(),
                               rtol=1e-10)
    add_inference(gen, ddf=None, ci="profile", obj=obj)
    np.testing.assert_allclose(gen.confidence_intervals["lower"].to_numpy(),
                               one.confidence_intervals["lower"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(gen.confidence_intervals["upper"].to_numpy(),
                               one.confidence_intervals["upper"].to_numpy(), rtol=1e-6)
    assert gen.confidence_intervals["parameter"][0] == "sd_(Intercept)|batch:cask"


def test_level_reaches_the_intervals():
    res = fitted("penicillin_crossed", None, None)
    obj = BlockedObjective(res.stats, reml=True)
    add_inference(res, ddf=None, ci="wald", level=0.9, obj=obj)
    assert res.ci_level == 0.9
    fe = res.fixed_effects.row(0, named=True)
    ci = res.confidence_intervals.filter(parameter="(Intercept)")
    assert ci["lower"][0] == pytest.approx(fe["estimate"] - 1.644854 * fe["std_error"],
                                           rel=1e-6)
    res.confidence_intervals = None


def test_fit_passes_the_level_for_several_factors():
    res = mlpipe.fit(DATA / "penicillin.parquet", "diameter ~ 1 + (1|plate) + (1|sample)",
                     ddf=None, ci="wald", level=0.9)
    assert res.ci_level == 0.9


def test_kenward_roger_size_limit(monkeypatch):
    """Above KR_MAX_RANDOM_EFFECTS random effects Kenward-Roger is refused, before the fit."""
    stats = fitted("pastes_nested", None, None).stats
    monkeypatch.setattr(inference, "KR_MAX_RANDOM_EFFECTS", 39)
    with pytest.raises(mlpipe.InputError, match="limited to 39 random effects.*has 40"):
        fit_statistics(stats, ddf="kenward-roger")
    monkeypatch.setattr(inference, "KR_MAX_RANDOM_EFFECTS", 40)
    assert fit_statistics(stats, ddf="kenward-roger").df_method == "Kenward-Roger"


def test_summary_and_result_json(tmp_path):
    res = fitted("sim_nested_slope", "kenward-roger", "wald")
    text = res.summary()
    assert "(degrees of freedom and p-values: Kenward-Roger)" in text
    assert "Wald confidence intervals (95%):" in text
    assert "cor_x.(Intercept)|school" in text
    res.write(tmp_path / "o")
    out = json.loads((tmp_path / "o" / "result.json").read_text())
    assert out["df_method"] == "Kenward-Roger"
    assert out["confidence_intervals"]["level"] == 0.95
    names = [r["parameter"] for r in out["confidence_intervals"]["intervals"]]
    assert names == reference("sim_nested_slope")["wald_ci"]["name"]
