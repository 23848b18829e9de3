"""Satterthwaite / Kenward-Roger df and p-values, Wald and profile intervals vs lmerTest/lme4."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlpipe
from conftest import DATA

CASES = {"sleepstudy_rs": ("sleepstudy.parquet", "Reaction ~ Days + (Days|Subject)"),
         "hsb_full": ("hsb82.parquet", "mAch ~ meanses*cses + sector*cses + (cses|school)")}


def ref(case):
    return json.loads((DATA / "lme4" / f"{case}_inference.json").read_text())


def _p_close(got, want):
    """p-values within 1e-3 relative, or 1e-12 absolute when tiny."""
    for g, w in zip(got, want):
        assert abs(g - w) <= max(1e-3 * w, 1e-12), (g, w)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param


DDF = {"satterthwaite": ("Satterthwaite", "df_satterthwaite", "p_satterthwaite"),
       "kenward-roger": ("Kenward-Roger", "df_kenward_roger", "p_kenward_roger")}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("ddf", list(DDF))
def test_denominator_df_and_p_values(case_name, ddf):
    """df within 1e-2 relative and p-values as `_p_close` (Satterthwaite is the default)."""
    data, formula = CASES[case_name]
    method, df_key, p_key = DDF[ddf]
    res = mlpipe.fit(DATA / data, formula, ddf=ddf)
    r = ref(case_name)
    fe = res.fixed_effects
    assert res.df_method == method
    np.testing.assert_allclose(fe["df"].to_numpy(), r[df_key], rtol=1e-2)
    _p_close(fe["p_value"].to_numpy(), r[p_key])


@pytest.mark.parametrize("case_name", list(CASES))
def test_satterthwaite_is_the_default_and_t_matches(case_name):
    data, formula = CASES[case_name]
    res = mlpipe.fit(DATA / data, formula)
    assert res.df_method == "Satterthwaite"
    np.testing.assert_allclose(res.fixed_effects["t_value"].to_numpy(), ref(case_name)["t"],
                               rtol=1e-3)


@pytest.mark.parametrize("case_name", list(CASES))
def test_profile_intervals(case_name):
    data, formula = CASES[case_name]
    res = mlpipe.fit(DATA / data, formula, ci="profile")
    r = ref(case_name)["profile_ci"]
    ci = res.confidence_intervals
    assert ci["parameter"].to_list() == r["param"]
    for got, want in [(ci["lower"].to_numpy(), r["lower"]), (ci["upper"].to_numpy(), r["upper"])]:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-9)


def test_wald_intervals_and_json(tmp_path):
    data, formula = CASES["sleepstudy_rs"]
    res = mlpipe.fit(DATA / data, formula, ci="wald")
    ci = {row["parameter"]: row for row in res.confidence_intervals.iter_rows(named=True)}
    fe = {row["term"]: row for row in res.fixed_effects.iter_rows(named=True)}
    days = ci["Days"]
    wald_lower = fe["Days"]["estimate"] - 1.959964 * fe["Days"]["std_error"]
    assert days["lower"] == pytest.approx(wald_lower, rel=1e-6)
    # lme4's profile interval for sigma is [22.898, 28.858]; Wald is close to it
    assert 22.0 < ci["sigma"]["lower"] < 23.2 and 28.2 < ci["sigma"]["upper"] < 29.2
    assert -1.0 <= ci["cor_Days.(Intercept)|Subject"]["lower"] < 0
    res.write(tmp_path / "o")
    out = json.loads((tmp_path / "o" / "result.json").read_text())
    assert out["df_method"] == "Satterthwaite"
    assert out["confidence_intervals"]["level"] == 0.95
    assert len(out["confidence_intervals"]["intervals"]) == 6
    assert out["fixed_effects"][1]["p_value"] == pytest.approx(3.26382446992738e-06, rel=1e-3)


def test_kenward_roger_needs_reml():
    data, formula = CASES["sleepstudy_rs"]
    with pytest.raises(mlpipe.InputError, match="REML"):
        mlpipe.fit(DATA / data, formula, method="ML", ddf="kenward-roger")


def test_satterthwaite_sums_chunked_equal_whole(monkeypatch):
    """The sums over groups accumulated in chunks of levels (memory O(chunk)) equal the sums
    in one piece: hsb82's 160 schools in chunks of 7 (the last one short) and of 1."""
    from mlpipe import inference
    from mlpipe.objective import Objective
    from mlpipe.stats import compute_statistics

    st = compute_statistics(DATA / "hsb82.parquet", CASES["hsb_full"][1])
    obj = Objective(st, reml=True)
    theta = np.array([0.5, 0.05, 0.1])
    M0, S0 = inference.satterthwaite_sums(st, obj, theta)
    assert st.m == 160 and inference.SUMS_CHUNK > st.m  # one piece
    for chunk in (7, 1):
        monkeypatch.setattr(inference, "SUMS_CHUNK", chunk)
        M, S = inference.satterthwaite_sums(st, obj, theta)
        np.testing.assert_allclose(M, M0, rtol=1e-12, atol=1e-12 * np.abs(M0).max())
        assert len(S) == len(S0) == 3
        for a, b in zip(S, S0):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12 * np.abs(b).max())
            assert np.abs(b).max() > 0



def _central_hessian(obj, vp):
    """criterion_hessian by central differences with the step 1e-4 (truncation O(h²))."""
    from mlpipe import inference

    k = len(vp)
    H = np.empty((k, k))
    pt = obj.parts(vp[:-1])
    for j in range(k - 1):
        e = np.zeros(k)
        e[j] = 1e-4 * max(abs(vp[j]), 1e-2)
        H[:, j] = (inference._criterion_vp_gradient(obj, vp + e)
                   - inference._criterion_vp_gradient(obj, vp - e)) / (2 * e[j])
    dof = obj.stats.n - obj.stats.p
    H[:-1, -1] = -2.0 * pt.d_r2 / vp[-1] ** 3
    H[-1, -1] = 6.0 * pt.r2 / vp[-1] ** 4 - 2.0 * dof / vp[-1] ** 2
    return (H + H.T) / 2


@pytest.mark.parametrize("path, formula", [
    ("sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)"),
    ("hsb82.parquet", "mAch ~ meanses * cses + sector * cses + (cses | school)"),
    ("pastes.parquet", "strength ~ 1 + (1|batch/cask)"),
    ("penicillin.parquet", "diameter ~ 1 + (1|plate) + (1|sample)"),
], ids=["sleepstudy", "hsb", "pastes-nested", "penicillin-crossed"])
def test_forward_difference_hessian_matches_central_differences(path, formula, monkeypatch):
    """Satterthwaite's Hessian (`criterion_hessian`: forward differences of the exact
    gradient, one per θ entry) against central differences (two per entry): within 2e-5
    relative of its largest entry, and the df within 1e-5 relative (lmerTest's own df agree
    with mlpipe's to ~1e-3)."""
    from mlpipe import inference
    from mlpipe.model import make_objective

    res = mlpipe.fit(DATA / path, formula)
    obj = make_objective(res.stats, reml=True)
    vp = np.r_[res.theta, res.sigma]
    got, want = inference.criterion_hessian(obj, vp), _central_hessian(obj, vp)
    assert np.max(np.abs(got - want)) <= 2e-5 * np.max(np.abs(want))
    monkeypatch.setattr(inference, "criterion_hessian", _central_hessian)
    central = mlpipe.fit(DATA / path, formula)
    np.testing.assert_allclose(res.fixed_effects["df"].to_numpy(),
                               central.fixed_effects["df"].to_numpy(), rtol=1e-5)
