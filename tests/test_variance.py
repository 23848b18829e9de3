"""ICC and proportional reduction in variance (mlpipe.variance) on the HSB models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

import mlpipe
from conftest import DATA, reference
from mlpipe.errors import InputError
from mlpipe.objective import Objective
from mlpipe.variance import icc, icc_or_none, variance_explained

HSB = DATA / "hsb82.parquet"
CASES = ("null", "ancova", "means", "rc", "full")


@pytest.fixture(scope="module")
def fits() -> dict[tuple[str, str], mlpipe.FitResult]:
    out = {}
    for case in CASES:
        reml = mlpipe.fit(HSB, reference(f"hsb_{case}")["formula"], method="REML")
        out[(case, "REML")] = reml
        out[(case, "ML")] = mlpipe.fit_statistics(reml.stats, method="ML")
    return out


def ref_variances(case: str, method: str) -> dict[str, float]:
    """lme4's variance components of a case: {term or 'Residual': variance}."""
    return {("Residual" if r["grp"] == "Residual" else r["var1"]): r["vcov"]
            for r in reference(f"hsb_{case}")[method.lower()]["varcorr"] if r["var2"] is None}


# ---------------------------------------------------------------------- ICC

@pytest.mark.parametrize("method", ["REML", "ML"])
def test_icc_of_the_null_model(fits, method):
    v = ref_variances("null", method)
    want = v["(Intercept)"] / (v["(Intercept)"] + v["Residual"])
    got = icc(fits[("null", method)])
    assert got.icc == pytest.approx(want, abs=1e-4)
    if method == "REML":  # Raudenbush & Bryk's τ00 = 8.614, σ² = 39.148: mlpipe's ICC
        assert got.icc == pytest.approx(8.614 / (8.614 + 39.148), abs=1e-4)
    assert got.tau00 == pytest.approx(v["(Intercept)"], rel=1e-4)
    assert got.sigma2 == pytest.approx(v["Residual"], rel=1e-4)
    assert got.lower < got.icc < got.upper
    assert 0.02 < got.upper - got.lower < 0.1  # 160 schools: a few points either side
    assert got.level == 0.95 and got.method == f"profile-likelihood ({method})"


def test_profile_interval_ends_where_the_deviance_rises_by_the_chi2_quantile(fits):
    res = fits[("null", "REML")]
    got = icc(res)
    obj = Objective(res.stats, reml=True)
    theta = lambda r: math.sqrt(r / (1 - r))  # noqa: E731  ICC = θ²/(1+θ²)
    d_hat = obj(np.array([theta(got.icc)]))
    assert d_hat == pytest.approx(res.deviance, abs=1e-6)
    for end in (got.lower, got.upper):
        assert obj(np.array([theta(end)])) - d_hat == pytest.approx(sps.chi2.ppf(0.95, 1),
                                                                    abs=1e-6)


def test_icc_interval_against_r():
    # R: the REML devfun of lmer(Yield ~ 1 + (1|Batch), Dyestuff) (update(m, devFunOnly=TRUE))
    # solved with uniroot at qchisq(.95, 1): θ ∈ [0.271419, 2.125379] → ICC ∈ [0.068614, 0.818750]
    res = mlpipe.fit(DATA / "dyestuff.parquet", reference("dyestuff_null")["formula"])
    got = icc(res)
    assert got.icc == pytest.approx(0.418487, abs=1e-5)
    assert got.lower == pytest.approx(0.068614, abs=1e-5)
    assert got.upper == pytest.approx(0.818750, abs=1e-5)


def test_hsb_null_interval_values(fits):
    # the profile and Wald-logit intervals of the sufficient-statistics prototype
    prof, wald = icc(fits[("null", "REML")]), icc(fits[("null", "REML")], method="wald")
    assert (prof.lower, prof.upper) == pytest.approx((0.147178, 0.221027), abs=2e-6)
    assert (wald.lower, wald.upper) == pytest.approx((0.146516, 0.219987), abs=2e-6)


def test_icc_interval_methods_and_levels_agree(fits):
    res = fits[("null", "REML")]
    prof, wald = icc(res), icc(res, method="wald")
    assert wald.icc == prof.icc
    assert wald.lower == pytest.approx(prof.lower, abs=0.003)
    assert wald.upper == pytest.approx(prof.upper, abs=0.003)
    wide = icc(res, level=0.99)
    assert wide.lower < prof.lower and wide.upper > prof.upper
    d = prof.to_dict()
    assert set(d) == {"icc", "lower", "upper", "level", "method", "tau00", "sigma2"}


def test_icc_of_a_conditional_random_intercept_model(fits):
    v = ref_variances("means", "REML")
    got = icc(fits[("means", "REML")])  # residual ICC after school mean SES
    assert got.icc == pytest.approx(v["(Intercept)"] / (v["(Intercept)"] + v["Residual"]),
                                    abs=1e-4)
    assert got.lower < got.icc < got.upper


def test_icc_needs_a_random_intercept_only_model(fits):
    with pytest.raises(InputError, match="random slopes"):
        icc(fits[("rc", "REML")])
    with pytest.raises(InputError, match="level"):
        icc(fits[("null", "REML")], level=95)
    assert icc_or_none(fits[("rc", "REML")]) is None
    assert icc_or_none(fits[("null", "REML")])["icc"] == pytest.approx(icc(
        fits[("null", "REML")]).icc)


def test_icc_from_a_config(tmp_path):
    cfg = tmp_path / "null.toml"
    cfg.write_text(f'data = "{HSB.as_posix()}"\nformula = "mAch ~ 1 + (1|school)"\n')
    v = ref_variances("null", "REML")
    assert icc(cfg).icc == pytest.approx(v["(Intercept)"] / (v["(Intercept)"] + v["Residual"]),
                                         abs=1e-4)


# ---------------------------------------------------------------------- proportional reduction

def _expected(base: str, model: str, method: str = "REML") -> dict[tuple[int, str], float]:
    b, m = ref_variances(base, method), ref_variances(model, method)
    return {(1 if t == "Residual" else 2, t): (b[t] - m[t]) / b[t] for t in b if t in m}


@pytest.mark.parametrize("base,model", [("null", "ancova"), ("null", "means"), ("rc", "full")])
def test_proportion_reduction_matches_the_reference_variances(fits, base, model):
    tab = variance_explained(fits[(base, "REML")], fits[(model, "REML")])
    assert tab.columns == ["level", "term", "base_variance", "model_variance",
                           "proportion_reduction"]
    want = _expected(base, model)
    got = {(r["level"], r["term"]): r for r in tab.iter_rows(named=True)}
    assert set(got) == set(want)
    b, m = ref_variances(base, "REML"), ref_variances(model, "REML")
    for key, prop in want.items():
        assert got[key]["proportion_reduction"] == pytest.approx(prop, abs=1e-4), key
        assert got[key]["base_variance"] == pytest.approx(b[key[1]], rel=1e-4)
        assert got[key]["model_variance"] == pytest.approx(m[key[1]], rel=1e-4)


def test_proportion_reduction_textbook_values(fits):
    # Raudenbush & Bryk: group-centred SES explains ~5% of the within-school variance and
    # leaves τ00 about unchanged (slightly larger); school mean SES explains ~69% of τ00.
    anc = {r["term"]: r["proportion_reduction"]
           for r in variance_explained(fits[("null", "REML")],
                                       fits[("ancova", "REML")]).iter_rows(named=True)}
    assert anc["Residual"] == pytest.approx(0.0546, abs=5e-4)
    assert -0.01 < anc["(Intercept)"] < 0
    means = variance_explained(fits[("null", "REML")], fits[("means", "REML")])
    tau = means.filter(means["level"] == 2)["proportion_reduction"][0]
    assert tau == pytest.approx(0.694, abs=1e-3)


def test_proportion_reduction_needs_comparable_fits(fits):
    with pytest.raises(InputError, match="same method"):
        variance_explained(fits[("null", "REML")], fits[("ancova", "ML")])
