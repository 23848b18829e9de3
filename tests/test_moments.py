"""The method of moments with GLS fixed effects (mlpipe/moments.py): equal to REML on a
balanced crossed design (where ANOVA estimators are REML's), unbiased on simulated crossed
data with known truth (balanced and Zipf-unbalanced), its fixed effects and conditional
modes equal to the exact GLS / BLUP at the same variance components, the automatic switch
when the exact solver's memory estimate exceeds the limit, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.blocked import BlockedObjective
from mlpipe.cli import main
from mlpipe.errors import InputError

DATA = Path(__file__).parent / "data"
PEN = DATA / "penicillin.parquet"


def _crossed(seed: int, zipf: bool, n: int = 20000, R: int = 400, C: int = 150,
             sa: float = 1.0, sb: float = 0.5, se: float = 1.0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    if zipf:  # item popularity ~ 1/rank
        w = 1.0 / np.arange(1, C + 1)
        j = rng.choice(C, size=n, p=w / w.sum())
    else:
        j = rng.integers(0, C, n)
    i = rng.integers(0, R, n)
    x = rng.normal(size=n)
    y = 2 + 0.5 * x + rng.normal(0, sa, R)[i] + rng.normal(0, sb, C)[j] + rng.normal(0, se, n)
    return pl.DataFrame({"u": [f"u{v}" for v in i], "it": [f"i{v}" for v in j], "x": x, "y": y})


def test_balanced_crossed_equals_reml():
    f = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    m = mlpipe.fit(PEN, f, method="moments")
    r = mlpipe.fit(PEN, f, ddf=None)
    assert m.method == "moments" and np.isnan(m.loglik)
    np.testing.assert_allclose(m.random_effects["variance"].to_numpy(),
                               r.random_effects["variance"].to_numpy(), rtol=1e-5)
    assert m.sigma == pytest.approx(r.sigma, rel=1e-6)
    assert m.fixed_effects["estimate"][0] == pytest.approx(r.fixed_effects["estimate"][0],
                                                           rel=1e-9)
    assert m.fixed_effects["std_error"][0] == pytest.approx(r.fixed_effects["std_error"][0],
                                                            rel=1e-5)


@pytest.mark.parametrize("zipf", [False, True], ids=["balanced", "zipf"])
def test_simulated_truth_unbiased(tmp_path, zipf):
    """Over 8 seeds (20,000 rows, 400 × 400 levels; item popularity uniform or Zipf), the
    mean estimate of each variance component (truth σ²_u 1, σ²_item 0.25, σ² 1) lies within
    4 standard errors of the truth (the SE from the seeds' spread); fixed effects within 4 SE
    of theirs.  Under Zipf popularity the item variance is much less precise (SD ~0.08
    against ~0.03) — the moment estimator is unbiased, not efficient."""
    est, ses, path = [], [], tmp_path / "c.parquet"
    for seed in range(1, 9):
        _crossed(seed, zipf, C=400).write_parquet(path)
        m = mlpipe.fit(path, "y ~ x + (1 | u) + (1 | it)", method="moments")
        var = dict(zip(m.random_effects["group"], m.random_effects["variance"]))
        est.append([var["u"], var["it"], m.residual_variance])
        ses.append([m.moments["variance_se"][g] for g in ("u", "it", "Residual")])
        fe = dict(zip(m.fixed_effects["term"], zip(m.fixed_effects["estimate"],
                                                   m.fixed_effects["std_error"])))
        assert abs(fe["x"][0] - 0.5) < 4 * fe["x"][1]
        assert abs(fe["(Intercept)"][0] - 2.0) < 4 * fe["(Intercept)"][1]
    est = np.array(est)
    se = est.std(axis=0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(axis=0) - [1.0, 0.25, 1.0]) < 4 * se), (est.mean(0), se)
    assert np.all(se < [0.03, 0.05, 0.01])  # and the spread is what it should be
    # the sampling SEs the method reports (Gaussian model) match the seeds' spread: with 8
    # seeds the ratio of an SD to its true value lies in [0.52, 1.39] 95% of the time
    ratio = est.std(axis=0, ddof=1) / np.mean(ses, axis=0)
    assert np.all((ratio > 0.5) & (ratio < 1.5)), ratio
    z = (est - [1.0, 0.25, 1.0]) / np.array(ses)
    assert np.all(np.abs(z) < 4), z


def test_gls_equals_the_exact_gls_at_the_same_components(tmp_path):
    """β̂, Var(β̂) and the conditional modes of the PCG solve equal the exact two-stage
    factorization's at θ = σ_k / σ (1e-6 relative) on an unbalanced crossed design."""
    path = tmp_path / "c.parquet"
    _crossed(7, True, n=6000, R=300, C=80).write_parquet(path)
    stats = mlpipe.compute_statistics(path, "y ~ x + (1 | u) + (1 | it)")
    m = mlpipe.fit_statistics(stats, method="moments")
    obj = BlockedObjective(stats, reml=True)
    var = dict(zip(m.random_effects["group"], m.random_effects["variance"]))
    theta = np.array([np.sqrt(var[f.name] / m.residual_variance) for f in obj.factors])
    dec = obj.decompose(theta)
    np.testing.assert_allclose(m.fixed_effects["estimate"].to_numpy(), dec.beta, rtol=1e-6)
    exact_vcov = m.residual_variance * np.linalg.inv(dec.xtx_adj)
    np.testing.assert_allclose(m.vcov_matrix, exact_vcov, rtol=1e-6)
    for mode in obj.conditional_modes(dec, m.sigma):
        f = mode["factor"]
        mine = m.ranef.filter(pl.col("group") == f.name)
        np.testing.assert_allclose(mine["estimate"].to_numpy(), mode["b"][:, 0], rtol=1e-6,
                                   atol=1e-9)
        # the approximate conditional SDs are lower bounds of the exact ones
        assert np.all(mine["cond_sd"].to_numpy() <= mode["cond_sd"][:, 0] * (1 + 1e-9))


def test_nested_and_one_factor():
    for f, data in [("strength ~ 1 + (1 | batch/cask)", "pastes"),
                    ("Yield ~ 1 + (1 | Batch)", "dyestuff")]:
        m = mlpipe.fit(DATA / f"{data}.parquet", f, method="moments")
        r = mlpipe.fit(DATA / f"{data}.parquet", f, ddf=None)
        # balanced designs: the ANOVA estimators are REML's when they are positive
        np.testing.assert_allclose(m.random_effects["variance"].to_numpy(),
                                   r.random_effects["variance"].to_numpy(), rtol=1e-4)


def test_automatic_switch_when_the_exact_solver_does_not_fit(tmp_path, capsys):
    f = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    res = mlpipe.fit_statistics(mlpipe.compute_statistics(PEN, f), memory_limit="4KB")
    assert res.method == "moments"
    assert "REML not attempted: the random-effects structure needs about" in \
        res.optimizer.messages[0]
    assert "fitted by the method of moments instead" in res.optimizer.messages[0]
    assert main(["fit", str(PEN), "-f", f, "--moments", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "Linear mixed model fit by the method of moments" in out
    saved = json.loads((tmp_path / "o" / "result.json").read_text())
    assert saved["method"] == "moments" and saved["loglik"] is None
    assert main(["compare", str(tmp_path / "o"), str(tmp_path / "o")]) == 2
    assert "no likelihood" in capsys.readouterr().err
    # from saved statistics on the command line: --memory-limit reaches the solver
    assert main(["stats", str(PEN), "-f", f, "--out", str(tmp_path / "s.parquet")]) == 0
    capsys.readouterr()
    assert main(["fit", "--stats", str(tmp_path / "s.parquet"), "--memory-limit", "4KB",
                 "-q", "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "result.json").read_text())["method"] == "moments"


def test_refusals():
    with pytest.raises(InputError, match="random intercepts only"):
        mlpipe.fit(DATA / "sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)",
                   method="moments")
    with pytest.raises(InputError, match="profile intervals need a likelihood"):
        mlpipe.fit(PEN, "diameter ~ 1 + (1 | plate)", method="moments", ci="profile")
    m = mlpipe.fit(PEN, "diameter ~ 1 + (1 | plate)", method="moments", ci="wald")
    ci = m.confidence_intervals.filter(pl.col("parameter") == "(Intercept)").row(0, named=True)
    assert ci["lower"] < m.fixed_effects["estimate"][0] < ci["upper"]
    # the components' intervals: σ̂²_k ± z SE on the variance scale, as SDs
    z = 1.959963984540054
    for name, group in [("sd_(Intercept)|plate", "plate"), ("sigma", "Residual")]:
        row = m.confidence_intervals.filter(pl.col("parameter") == name).row(0, named=True)
        v, se = m.moments["estimates"][group], m.moments["variance_se"][group]
        assert row["lower"] == pytest.approx(np.sqrt(max(v - z * se, 0)), rel=1e-12)
        assert row["upper"] == pytest.approx(np.sqrt(v + z * se), rel=1e-12)
    with pytest.raises(InputError, match="refine must be reml, ml or none"):
        mlpipe.fit(PEN, "diameter ~ 1 + (1 | plate)", method="moments", refine="yes")


@pytest.mark.parametrize("case,bounds", [
    # (factor: largest |SD ratio - 1|), fixed effects within this many SE of REML's
    ("insteval_crossed", ({"s": 0.05, "d": 0.05, "dept": 0.2}, 0.05)),
    ("scotssec_crossed", ({"primary": 0.03, "second": 0.45}, 0.1)),
])
def test_distance_from_reml_on_real_crossed_data(case, bounds):
    """The README's figures: on InstEval (73k ratings; students × instructors × departments)
    the moment SDs are within 3% (s, d) and 14% (dept) of REML's, on ScotsSec within 2%
    (primary) and 36% (second: few levels, a small component), within 3 of their reported
    sampling SEs (the largest is 1.2); fixed effects within 0.01-0.08 SE."""
    ref = json.loads((DATA / "multilevel" / f"{case}.json").read_text())
    path = DATA / "multilevel" / f"{ref['data']}.parquet"
    m = mlpipe.fit(path, ref["formula"], method="moments")
    r = mlpipe.fit(path, ref["formula"], ddf=None)
    sd_m = dict(zip(m.random_effects["group"], m.random_effects["std_dev"]))
    sd_r = dict(zip(r.random_effects["group"], r.random_effects["std_dev"]))
    limits, fe_limit = bounds
    for g, lim in limits.items():
        assert abs(sd_m[g] / sd_r[g] - 1) < lim, (g, sd_m[g], sd_r[g])
    # and REML's variances lie within 3 of the sampling SEs the moments report
    var_r = dict(zip(r.random_effects["group"], r.random_effects["variance"]))
    var_r["Residual"] = r.residual_variance
    for g, v in var_r.items():
        assert abs(m.moments["estimates"][g] - v) < 3 * m.moments["variance_se"][g], g
    assert m.sigma == pytest.approx(r.sigma, rel=0.01)
    diff = np.abs(m.fixed_effects["estimate"].to_numpy() - r.fixed_effects["estimate"].to_numpy())
    assert np.all(diff < fe_limit * r.fixed_effects["std_error"].to_numpy())


def test_own_pass_equals_the_cell_statistics(tmp_path):
    """The moment pass (sql/moment_*.sql: totals, per-level sums, level-pair counts; never
    the per-cell statistics) and the same estimates from cell statistics agree (1e-10),
    crossed with a categorical predictor, and nested."""
    path = tmp_path / "c.parquet"
    frame = _crossed(11, True, n=5000, R=200, C=60).with_columns(
        (pl.col("x") > 0.3).cast(pl.Utf8).alias("hi"))
    frame.write_parquet(path)
    for f in ["y ~ x + hi + (1 | u) + (1 | it)", "y ~ x + (1 | it/u)"]:
        own = mlpipe.fit(path, f, method="moments")
        cells = mlpipe.fit_statistics(mlpipe.compute_statistics(path, f), method="moments")
        assert own.fixed_effects["term"].to_list() == cells.fixed_effects["term"].to_list()
        np.testing.assert_allclose(own.random_effects["variance"].to_numpy(),
                                   cells.random_effects["variance"].to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(own.fixed_effects["estimate"].to_numpy(),
                                   cells.fixed_effects["estimate"].to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(own.vcov_matrix, cells.vcov_matrix, rtol=1e-9)
        assert own.ranef.sort("group", "level")["estimate"].to_numpy() == pytest.approx(
            cells.ranef.sort("group", "level")["estimate"].to_numpy(), rel=1e-8, abs=1e-10)


def test_moments_need_an_intercept(tmp_path):
    path = tmp_path / "c.parquet"
    _crossed(3, False, n=3000, R=60, C=40).write_parquet(path)
    with pytest.raises(InputError, match="needs an intercept"):
        mlpipe.fit(path, "y ~ 0 + x + (1 | u) + (1 | it)", method="moments")


def _dense_cov_u(ms, frame, columns, sigma2):
    """2 tr(Q_k V Q_l V) with the N × N matrices themselves (the Gaussian Cov of the
    U-statistics, U_e = N y'(I - 11'/N) y)."""
    n = frame.height
    Zs = []
    for k, col in enumerate(columns):
        index = {lab: i for i, lab in enumerate(ms.factors[k].labels)}
        Zs.append(np.eye(ms.factors[k].m)[[index[v] for v in frame[col]]])
    V = sigma2[-1] * np.eye(n) + sum(s * Z @ Z.T for s, Z in zip(sigma2, Zs))
    Qs = [np.eye(n) - Z @ np.linalg.pinv(Z.T @ Z) @ Z.T for Z in Zs]
    Qs.append(n * (np.eye(n) - np.ones((n, n)) / n))
    return np.array([[2 * np.trace(a @ V @ b @ V) for b in Qs] for a in Qs])


@pytest.mark.parametrize("design", ["crossed", "nested", "one factor", "three factors"])
def test_sampling_covariance_equals_the_dense_formula(tmp_path, monkeypatch, design):
    """The O(combinations) sums of `moment_covariance` (one or two factors; three through
    the level Gram matrix) equal 2 tr(Q_k V Q_l V) computed with dense N × N matrices
    (1e-10); with the co-occurrence terms estimated by probes
    instead (as on large designs) the sampling SEs within 1% on this small, strongly
    co-occurring crossed design."""
    from mlpipe import moments

    frame = _crossed(5, True, n=400, R=30, C=12)
    if design == "nested":  # items made of whole users: users nested in items
        frame = frame.with_columns(
            ("i" + (pl.col("u").str.slice(1).cast(pl.Int64) // 3).cast(pl.Utf8)).alias("it"))
    if design == "three factors":  # a third factor crossed with both
        frame = frame.with_columns(
            ("w" + (pl.col("x") * 1e6).cast(pl.Int64).mod(7).cast(pl.Utf8)).alias("w"))
    path = tmp_path / "c.parquet"
    frame.write_parquet(path)
    columns = {"one factor": ["u"], "three factors": ["u", "it", "w"]}.get(design, ["u", "it"])
    f = "y ~ x + " + " + ".join(f"(1 | {c})" for c in columns)
    ms = moments.compute_moment_statistics(path, f)
    mom = moments.moment_estimates(ms)
    out = moments.moment_covariance(ms, mom)
    dense = _dense_cov_u(ms, frame, columns, mom["sigma2"])
    np.testing.assert_allclose(out["cov_u"], dense, rtol=1e-10)
    assert out["terms"] == "exact"
    Ainv = np.linalg.inv(mom["A"])
    np.testing.assert_allclose(out["se"], np.sqrt(np.diag(Ainv @ dense @ Ainv.T)), rtol=1e-9)
    monkeypatch.setattr(moments, "EXACT_TERM_NNZ", 0)
    est = moments.moment_covariance(ms, mom)
    if design == "three factors":  # beyond the exact products' budget: not computed
        assert est is None
        return
    assert est["terms"] == ("exact" if design == "one factor" else "estimated")
    # nested, the centred co-occurrence matrix has rank ~ the items' count (10): a noisier
    # Hutchinson estimate (real nested designs take the exact route: one item per user)
    np.testing.assert_allclose(est["se"], out["se"], rtol=0.15 if design == "nested" else 0.01)


def test_refinement_approaches_reml_and_ml(tmp_path):
    """`refine` (stochastic EM from the moment estimates) lands on the exact REML / ML
    components within 4 of its claimed Monte Carlo SEs (+1e-5 relative), and at least 5×
    closer than the moment estimate where that is worst, on a Zipf-unbalanced crossed
    design; β̂ then equals the
    exact fit's to 0.02 SE."""
    from mlpipe.moments import compute_moment_statistics, fit_moments

    path = tmp_path / "c.parquet"
    _crossed(3, True, n=20000, R=400, C=400).write_parquet(path)
    f = "y ~ x + (1 | u) + (1 | it)"
    ms = compute_moment_statistics(path, f)
    plain = fit_moments(ms)
    for crit, method in [("REML", "REML"), ("ML", "ML")]:
        m = fit_moments(ms, refine_with=crit)
        r = mlpipe.fit(path, f, method=method, ddf=None)
        exact = dict(zip(r.random_effects["group"], r.random_effects["variance"]))
        exact["Residual"] = r.residual_variance
        ref = m.moments["refinement"]
        assert ref["criterion"] == crit and ref["converged"]
        for g, v in exact.items():
            assert abs(ref["sigma2"][g] - v) < 4 * ref["mc_se"][g] + 1e-5 * v, (crit, g)
        # the component the moments miss most (the Zipf items'): 5 times closer at least
        worst = max(exact, key=lambda g: abs(plain.moments["estimates"][g] / exact[g] - 1))
        assert abs(ref["sigma2"][worst] - exact[worst]) < 0.2 * abs(
            plain.moments["estimates"][worst] - exact[worst]), (crit, worst)
        diff = m.fixed_effects["estimate"].to_numpy() - r.fixed_effects["estimate"].to_numpy()
        assert np.all(np.abs(diff) < 0.02 * r.fixed_effects["std_error"].to_numpy())
        assert f"refined to approximate {crit} by stochastic EM" in " ".join(
            m.optimizer.messages)


def test_refine_on_the_command_line_and_in_result_json(tmp_path, capsys):
    path = tmp_path / "c.parquet"
    _crossed(4, False, n=4000, R=100, C=80).write_parquet(path)
    out = tmp_path / "o"
    assert main(["fit", str(path), "-f", "y ~ x + (1 | u) + (1 | it)", "--method", "moments",
                 "--refine", "reml", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fit by the method of moments, refined to approximate REML" in text
    assert "4 passes over the data: totals, a GROUP BY per factor and per pair" in text
    assert "Moment estimates' sampling SEs (Gaussian model): u " in text
    assert "Approximate REML variances (± Monte Carlo SE): u " in text
    saved = json.loads((out / "result.json").read_text())
    rec = saved["moments"]
    assert set(rec["variance_se"]) == {"u", "it", "Residual"}
    assert rec["refinement"]["criterion"] == "REML"
    var = dict(zip([r["group"] for r in saved["random_effects"]],
                   [r["variance"] for r in saved["random_effects"]]))
    assert var["u"] == pytest.approx(rec["refinement"]["sigma2"]["u"], rel=1e-12)
    assert "refine = \"reml\"" in (out / "config.toml").read_text()
    # the automatic switch refines toward the requested criterion; refine="none" does not
    stats = mlpipe.compute_statistics(path, "y ~ x + (1 | u) + (1 | it)")
    auto = mlpipe.fit_statistics(stats, method="ML", memory_limit="4KB")
    assert auto.moments["refinement"]["criterion"] == "ML"
    none = mlpipe.fit_statistics(stats, memory_limit="4KB", refine="none")
    assert none.method == "moments" and "refinement" not in none.moments
