"""Every two-level reference model, REML and ML, against lme4 1.1-31 (tests/data/lme4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REFS, TWO_LEVEL, check_criterion, check_fixed_effects, fitted, listify

CASES = [(c, m) for c in TWO_LEVEL + ["oxboys_growth"] for m in ("REML", "ML")]


@pytest.mark.parametrize("case,method", CASES)
def test_criterion(case, method):
    res, ref = fitted(case, method)
    check_criterion(res, ref)


@pytest.mark.parametrize("case,method", CASES)
def test_fixed_effects(case, method):
    res, ref = fitted(case, method)
    assert res.fixed_effects["term"].to_list() == listify(ref["fixed"]["term"])
    check_fixed_effects(res, ref)


@pytest.mark.parametrize("case,method", CASES)
def test_variance_components(case, method):
    res, ref = fitted(case, method)
    sd = {r["term"]: r["std_dev"] for r in res.random_effects.iter_rows(named=True)}
    cor = {(r["term1"], r["term2"]): r["correlation"]
           for r in res.random_correlations.iter_rows(named=True)}
    for row in ref["varcorr"]:
        if row["grp"] == "Residual":
            got = res.sigma
        elif row["var2"] is None:
            got = sd[row["var1"]]
        else:
            got = cor[(row["var1"], row["var2"])]
        assert got == pytest.approx(row["sdcor"], rel=1e-3, abs=1e-4), row


@pytest.mark.parametrize("case,method", CASES)
def test_conditional_modes(case, method):
    res, ref = fitted(case, method)
    (re,) = ref["ranef"]
    terms = listify(re["terms"])
    values = np.array(re["values"])
    cond_sd = np.array(re["cond_sd"])
    tab = res.ranef
    for k, term in enumerate(terms):
        sub = tab.filter(tab["term"] == term)
        assert sub["level"].to_list() == re["levels"]
        np.testing.assert_allclose(sub["estimate"].to_numpy(), values[:, k], rtol=0,
                                   atol=1e-3 * cond_sd[:, k].min())
        np.testing.assert_allclose(sub["cond_sd"].to_numpy(), cond_sd[:, k], rtol=1e-3)


def test_reference_cases_cover_the_issue():
    """Every reference model with one grouping factor is in the suite above."""
    one_factor = set()
    for path in REFS.glob("*.json"):
        ref = json.loads(path.read_text())
        if "ngroups" in ref.get("reml", {}) and len(ref["reml"]["ngroups"]) == 1:
            one_factor.add(ref["case"])
    assert one_factor == set(TWO_LEVEL) | {"oxboys_growth"}
