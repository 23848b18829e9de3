"""Extra two-level reference models on real datasets mlpipe was never tuned on (tests/data/extra).

References: lme4 1.1-31 with bobyqa, made by tests/data/extra/make_refs.R (same JSON layout as
tests/data/lme4).  Each case is fitted by REML and by ML and compared with the tolerances of
test_accuracy_lme4.py.  What each case exercises:

- exam_rs               mlmRev::Exam, correlated random slope, 4k rows, string grouping column
- exam_sex_singular     a factor in the random part, (sex | school): singular, correlation -1
- gcsemv_na             mlmRev::Gcsemv, NAs in the response (R drops 202 rows)
- chem97_ri             mlmRev::Chem97, 31k rows, 2410 groups; R's level order M < F re-sorted
- orthodont_int         nlme::Orthodont, factor x numeric interaction (age:SexMale), random slope
- machines_nointslopes  nlme::Machines, (0 + Machine | Worker): full dummy coding, 3x3 covariance
- ergostool_noint       nlme::ergoStool, 0 + factor in the fixed part (TypeT1..TypeT4)
- cake_facnum           lme4::cake, recipe * temp, integer response, NUMERIC grouping column
- cake_facfac           lme4::cake, recipe * temperature: factor x factor interaction naming/order
- rail_null             nlme::Rail, intercept only, integer response
- dyestuff2_singular    lme4::Dyestuff2, variance exactly on the boundary (0)
- sleep_diag3           `||` with three terms incl. I(Days^2)
- sleep_log_slope       log() response, random slope without intercept (0 + Days | Subject)
- bodyweight_rs         nlme::BodyWeight, Time * Diet with (Time | Rat)
- orange_quad           nlme::Orange, age + I(age^2) on the raw scale (age^2 ~ 2.5e6): conditioning
- oats_noint_space      nlme::Oats, 0 + Variety: a level with a space ("VarietyGolden Rain")
- gcsemv_na_pred        NAs in the response AND in a predictor (course ~ written + ...)
- scotssec_numfac       mlmRev::ScotsSec, numeric x factor interaction (verbal:sexM)
- quinidine_factors     nlme::Quinidine, 1110 NA responses, levels "No/Mild", "< 50", ">= 50"
- gcsemv_rs3            3x3 correlated (written + gender | school): optimizer path via theta_11 = 0
- quinidine_rs          (glyco | Subject): same trap, 2x2
- orange_rs             (I(age/365) | Tree): same trap; the optimum is singular (correlation -1)
- cake_rs_boundary      (temp | replicate): singular; lme4's bobyqa stops early under REML, so
                        the reference is lme4's Nelder_Mead fit (see make_refs.R, best_fit)
- orange_log_ratio      term name of arithmetic inside a function: R writes log(age/365)

Names are checked in test_term_names only; the numeric tests pair mlpipe's terms with lme4's by
position, so a naming difference does not hide (or fake) a numeric one.

Run ``python tests/test_accuracy_extra.py`` for a table of the largest errors per case.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import mlpipe
from conftest import (check_conditional_modes, check_criterion, check_fixed_effects,
                      check_variance_components, listify, ranef_table, varcorr_pairs)

EXTRA = Path(__file__).parent / "data" / "extra"
CASE_NAMES = sorted(p.stem for p in EXTRA.glob("*.json"))
CASES = [(c, m) for c in CASE_NAMES for m in ("REML", "ML")]

#: absolute tolerance, in units of the residual SD, for SDs and correlations of a singular fit
#: (on the boundary the criterion is flat, so values at 0 / +-1 only agree to optimizer accuracy)
SINGULAR_ABS = 1e-3


@cache
def reference(case: str) -> dict:
    return json.loads((EXTRA / f"{case}.json").read_text())


@cache
def fitted(case: str, method: str) -> tuple[mlpipe.FitResult, dict]:
    """Fit a case once per session; return (mlpipe result, reference block for the method)."""
    ref = reference(case)
    res = mlpipe.fit(EXTRA / f"{ref['data']}.parquet", ref["formula"], method=method)
    return res, ref[method.lower()]


def _rel(got, want) -> float:
    got, want = np.asarray(got, float), np.asarray(want, float)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300)))


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,method", CASES)
def test_criterion(case, method):
    res, ref = fitted(case, method)
    check_criterion(res, ref)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_term_names(case):
    """R's names: fixed effects in R's column order, random-effect terms, correlation pairs."""
    res, ref = fitted(case, "REML")
    assert res.fixed_effects["term"].to_list() == listify(ref["fixed"]["term"])
    (re,) = ref["ranef"]
    assert res.random_effects["term"].to_list() == listify(re["terms"])
    pairs = {(r["term1"], r["term2"]) for r in res.random_correlations.iter_rows(named=True)}
    assert pairs == {(r["var1"], r["var2"]) for r in ref["varcorr"] if r["var2"] is not None}


@pytest.mark.parametrize("case,method", CASES)
def test_fixed_effects(case, method):
    res, ref = fitted(case, method)
    assert res.fixed_effects.height == len(listify(ref["fixed"]["term"]))
    check_fixed_effects(res, ref)


@pytest.mark.parametrize("case,method", CASES)
def test_variance_components(case, method):
    res, ref = fitted(case, method)
    check_variance_components(res, ref, SINGULAR_ABS)


@pytest.mark.parametrize("case,method", CASES)
def test_conditional_modes(case, method):
    res, ref = fitted(case, method)
    check_conditional_modes(res, ref)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_level_order(case):
    """Levels of the grouping factor in lme4's order (numeric order for a numeric column)."""
    res, ref = fitted(case, "REML")
    (re,) = ref["ranef"]
    first = res.random_effects["term"].to_list()[0]
    sub = res.ranef.filter(res.ranef["term"] == first)
    assert [str(x) for x in sub["level"].to_list()] == re["levels"]


# ------------------------------------------------------------------------------------------


def error_summary(case: str, method: str) -> dict[str, float | str]:
    """Largest errors of one case (relative, or in the units the tests use)."""
    try:
        res, ref = fitted(case, method)
    except Exception as exc:  # noqa: BLE001 - report, do not stop the table
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, float | str] = {"dev": _rel(res.deviance, ref["deviance_or_reml"])}
    fe = res.fixed_effects
    if fe.height == len(listify(ref["fixed"]["term"])):
        se = np.array(listify(ref["fixed"]["se"]))
        out["fe/SE"] = float(np.max(np.abs(fe["estimate"].to_numpy()
                                           - listify(ref["fixed"]["estimate"])) / se))
        out["SE"] = _rel(fe["std_error"].to_numpy(), se)
    else:
        out["fe/SE"] = out["SE"] = "count"
    errs = [abs(got - row["sdcor"]) / max(abs(row["sdcor"]), 1e-4)
            for row, got in varcorr_pairs(res, ref) if got is not None]
    out["sd/cor"] = max(errs) if errs else float("nan")
    (re,) = ref["ranef"]
    tab = ranef_table(res, ref)
    values, cond_sd = np.array(re["values"]), np.array(re["cond_sd"])
    e_mode, e_csd = 0.0, 0.0
    for k, term in enumerate(listify(re["terms"])):
        if term not in tab or set(tab[term]) != set(re["levels"]):
            e_mode = e_csd = float("inf")
            continue
        got = np.array([tab[term][lev] for lev in re["levels"]])
        scale = max(cond_sd[:, k].min(), 1e-300)
        e_mode = max(e_mode, float(np.max(np.abs(got[:, 0] - values[:, k])) / scale))
        e_csd = max(e_csd, float(np.max(np.abs(got[:, 1] - cond_sd[:, k])
                                        / np.maximum(cond_sd[:, k], 1e-300))))
    out["mode/cSD"], out["cSD"] = e_mode, e_csd
    out["singular"] = f"{res.singular}/{ref['singular']}"
    out["names"] = "ok" if (fe["term"].to_list() == listify(ref["fixed"]["term"])
                            and res.random_effects["term"].to_list()
                            == listify(re["terms"])) else "DIFF"
    return out


if __name__ == "__main__":
    cols = ["dev", "fe/SE", "SE", "sd/cor", "mode/cSD", "cSD", "singular", "names"]
    print(f"{'case':22s} {'method':6s} " + " ".join(f"{c:>9s}" for c in cols))
    for case, method in CASES:
        s = error_summary(case, method)
        if "error" in s:
            print(f"{case:22s} {method:6s} {s['error']}")
            continue
        cells = [f"{s[c]:9.1e}" if isinstance(s[c], float) else f"{s[c]:>9s}" for c in cols]
        print(f"{case:22s} {method:6s} " + " ".join(cells))
