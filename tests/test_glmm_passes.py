"""GLMMs by iterated passes (mlpipe/glmm_passes.py): glmer's nAGQ = 0 on real data
(tests/data/glmm/nagq0_*.json, made by make_refs_nagq0.R there), the DuckDB passes equal to
the in-memory ones, and the automatic switch to passes when the data do not compress."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlpipe
from mlpipe import glmm
from mlpipe.errors import DataError, InputError
from mlpipe.glmm_passes import PatternPasses, SqlPasses, fit_passes

DATA = Path(__file__).parent / "data" / "glmm"
CASES = sorted(p.stem for p in DATA.glob("nagq0_*.json"))
assert len(CASES) >= 6, f"the nAGQ = 0 references are missing from {DATA}"


def ref_of(case: str) -> dict:
    return json.loads((DATA / f"{case}.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_nagq0_against_glmer(case):
    """The issue's targets: logLik within 1e-5 relative (or higher), fixed effects within
    1e-2 SE, SEs and random-effect SDs within 1e-2 relative.  Measured: logLik 1e-10 to
    9e-7 relative above glmer's, fixed effects within 8e-4 SE, SEs within 7e-4."""
    ref = ref_of(case)
    res = mlpipe.fit(DATA / f"{ref['data']}.parquet", ref["formula"], family=ref["family"],
                     link=ref["link"], nagq=0)
    assert res.nagq == 0 and res.family == ref["family"]
    ll = ref["loglik"]
    assert res.loglik > ll - 1e-9 * abs(ll)
    assert res.loglik == pytest.approx(ll, rel=1e-5)
    se = np.asarray(ref["se"], float)
    est = res.fixed_effects["estimate"].to_numpy()
    assert np.all(np.abs(est - np.asarray(ref["estimate"])) <= 1e-2 * se)
    np.testing.assert_allclose(res.fixed_effects["std_error"].to_numpy(), se, rtol=1e-2)
    sds = [v for vs in ref["sd_by_group"].values() for v in np.atleast_1d(vs)]
    np.testing.assert_allclose(res.random_effects["std_dev"].to_numpy(), sds, rtol=1e-2)


@pytest.mark.parametrize("case", ["nagq0_contraception_slope", "nagq0_contraception_cloglog",
                                  "nagq0_mmmec_slope"])
def test_duckdb_passes_equal_the_in_memory_ones(case):
    """The same iterations over the data by DuckDB (β bound, modes joined per level) and over
    the compressed patterns: the fits agree to rounding."""
    ref = ref_of(case)
    data = DATA / f"{ref['data']}.parquet"
    pat = glmm.compress(data, ref["formula"], ref["family"], link=ref["link"])
    a = fit_passes(PatternPasses(pat))
    src = SqlPasses(data, ref["formula"], ref["family"], ref["link"])
    try:
        b = fit_passes(src)
    finally:
        src.close()
    assert b.loglik == pytest.approx(a.loglik, rel=1e-10)
    np.testing.assert_allclose(b.fixed_effects["estimate"].to_numpy(),
                               a.fixed_effects["estimate"].to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-5, atol=1e-7)
    assert src.passes == a.passes  # the same iterations


def test_data_that_do_not_compress_are_fitted_by_passes(monkeypatch):
    """Above MAX_PATTERNS (lowered here to 100: contraception has 1,292 patterns) the fit
    switches to DuckDB passes and says why: the Laplace fit by default, equal to the
    in-memory one; nAGQ = 0 on request, equal to the in-memory nAGQ = 0 fit."""
    data = DATA / "contraception.parquet"
    formula = "use ~ age + urban + (1 | district)"
    laplace = mlpipe.fit(data, formula, family="binomial")
    fast = mlpipe.fit(data, formula, family="binomial", nagq=0)
    monkeypatch.setattr(glmm, "MAX_PATTERNS", 100)
    for nagq, memory in ((1, laplace), (0, fast)):
        res = mlpipe.fit(data, formula, family="binomial", nagq=nagq)
        assert res.nagq == nagq
        assert any("fitted by iterated passes" in m for m in res.optimizer.messages)
        assert res.loglik > memory.loglik - 1e-10 * abs(memory.loglik)
        assert res.loglik == pytest.approx(memory.loglik, rel=1e-10)
        se = memory.fixed_effects["std_error"].to_numpy()
        diff = np.abs(res.fixed_effects["estimate"].to_numpy()
                      - memory.fixed_effects["estimate"].to_numpy())
        assert np.all(diff <= 1e-4 * se)
        np.testing.assert_allclose(res.fixed_effects["std_error"].to_numpy(), se, rtol=1e-2)
        assert res.groups == {"district": 60} and res.nobs == 1934
    with pytest.raises(InputError, match="adaptive quadrature"):
        mlpipe.fit(data, formula, family="binomial", nagq=5)
    with pytest.raises(InputError, match="canonical links"):
        mlpipe.fit(data, formula, family="binomial", link="cloglog")
    with pytest.raises(InputError, match="families binomial, poisson"):
        mlpipe.fit(DATA / "grouseticks.parquet", "TICKS ~ YEAR + (1 | LOCATION)",
                   family="negative_binomial")


@pytest.mark.parametrize("case", ["tmb_contraception_slope", "tmb_mmmec_slope",
                                  "tmb_cbpp_logit", "tmb_contraception"])
def test_laplace_by_passes_against_glmmtmb(case):
    """The Laplace fit by DuckDB passes (L-BFGS-B on the exact gradient of the deviance)
    against glmmTMB's exact Laplace: logLik to 1e-9 relative (measured: equal or up to 2e-9
    absolute higher), fixed effects to 1e-3 SE, SEs (central differences of the gradient)
    to 1e-2, SDs to 1e-3."""
    ref = ref_of(case)
    src = SqlPasses(DATA / f"{ref['data']}.parquet", ref["formula"], ref["family"],
                    ref["link"])
    try:
        res = fit_passes(src, nagq=1)
    finally:
        src.close()
    assert res.nagq == 1 and res.converged
    assert res.loglik == pytest.approx(ref["loglik"], rel=1e-9)
    est, se = np.asarray(ref["fixed"]["estimate"]), np.asarray(ref["fixed"]["se"])
    assert np.all(np.abs(res.fixed_effects["estimate"].to_numpy() - est) <= 1e-3 * se)
    np.testing.assert_allclose(res.fixed_effects["std_error"].to_numpy(), se, rtol=1e-2)
    sds = np.concatenate([np.atleast_1d(ref["sd"])])
    np.testing.assert_allclose(res.random_effects["std_dev"].to_numpy(), sds, rtol=1e-3)


def test_laplace_gradient_equals_finite_differences():
    """The exact gradient of the Laplace deviance in (θ, β) against central differences,
    away from the optimum (a random slope: every term of the derivation is exercised)."""
    from mlpipe.glmm_passes import Laplace1
    from mlpipe.objective import ThetaMap

    pat = glmm.compress(DATA / "contraception.parquet", "use ~ age + urban + (urban | "
                        "district)", "binomial")
    src = PatternPasses(pat)
    tm = ThetaMap(pat.blocks, 2)
    obj = Laplace1(src, tm, 3, pat.m, 2)
    x = np.array([0.5, -0.4, 0.6, -0.6, 0.01, 0.6])
    _value, grad = obj.value_and_gradient(x)
    fd = []
    for i in range(len(x)):
        e = np.zeros(len(x))
        e[i] = 1e-5 * max(1.0, abs(x[i]))
        fd.append((obj.value_and_gradient(x + e)[0] - obj.value_and_gradient(x - e)[0])
                  / (2 * e[i]))
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-3)


def test_bad_outcomes_on_the_pass_path(tmp_path):
    import polars as pl

    df = pl.read_parquet(DATA / "contraception.parquet")
    bad = df.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(2).otherwise(pl.col("use"))
                          .alias("use"))
    path = tmp_path / "bad.parquet"
    bad.write_parquet(path)
    with pytest.raises(DataError, match="0 or 1"):
        SqlPasses(path, "use ~ age + (1 | district)", "binomial")
    const = df.with_columns(pl.lit(1).alias("use"))
    const.write_parquet(path)
    with pytest.raises(DataError, match="constant"):
        SqlPasses(path, "use ~ age + (1 | district)", "binomial")
    with pytest.raises(InputError, match="one grouping factor"):
        SqlPasses(DATA / "contraception.parquet", "use ~ age + (1 | district) + (1 | urban)",
                  "binomial")


def test_cli_nagq0(tmp_path):
    out = tmp_path / "fit"
    proc = subprocess.run([sys.executable, "-m", "mlpipe", "fit",
                           str(DATA / "contraception.parquet"), "-f",
                           "use ~ age + urban + (1 | district)", "--family", "binomial",
                           "--nagq", "0", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "(Laplace Approximation, nAGQ = 0)" in proc.stdout
    res = json.loads((out / "result.json").read_text())
    assert res["nagq"] == 0
    assert res["loglik"] == pytest.approx(ref_of("nagq0_contraception")["loglik"], rel=1e-5)


def test_diagnostics_on_the_pass_path(tmp_path):
    """The fit by passes says what the in-memory fit says, from one more pass: Poisson
    overdispersion (grouseticks, Pearson chi-squared / df 2.72) and complete separation
    (cbpp with a period without a case); on grouseticks it reaches the in-memory optimum."""
    import polars as pl

    over = fit_passes(SqlPasses(DATA / "grouseticks.parquet",
                                "TICKS ~ YEAR + cHEIGHT + (1 | LOCATION)", "poisson"), nagq=1)
    note = [m for m in over.optimizer.messages if m.startswith("overdispersion")]
    assert note
    memory = mlpipe.fit(DATA / "grouseticks.parquet", "TICKS ~ YEAR + cHEIGHT + (1 | LOCATION)",
                        family="poisson")
    # the Laplace optimum itself (L-BFGS-B once stalled here, 0.18 below it: cHEIGHT's scale)
    assert over.loglik > memory.loglik - 1e-9 * abs(memory.loglik)
    ratio = float(note[0].split("= ")[1].split(" ")[0])
    want = [m for m in memory.optimizer.messages if m.startswith("overdispersion")][0]
    assert ratio == pytest.approx(float(want.split("= ")[1].split(" ")[0]), abs=0.011)
    frame = pl.read_parquet(DATA / "cbpp.parquet").with_columns(
        incidence=pl.when(pl.col("period") == "4").then(0).otherwise(pl.col("incidence")))
    frame = frame.with_columns(failures=pl.col("size") - pl.col("incidence"))
    frame.write_parquet(tmp_path / "sep.parquet")
    sep = fit_passes(SqlPasses(tmp_path / "sep.parquet",
                               "cbind(incidence, failures) ~ period + (1 | herd)", "binomial"),
                     nagq=0)
    assert any("separation" in m for m in sep.optimizer.messages)
