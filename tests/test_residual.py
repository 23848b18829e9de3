"""Residual structures (mlpipe/residual.py): AR(1), continuous-time AR(1) and variances by
stratum, checked against a brute-force dense likelihood (V_i = Z_i D Z_i' + σ² Δ C(φ) Δ per
series, built row by row in numpy) on small random data, with one and with two nested
grouping factors, REML and ML; plus the statistics file, the comparison with independence
and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.cli import main
from mlpipe.compare import compare
from mlpipe.errors import DataError, FormulaError, InputError
from mlpipe.residual import parse_spec

DATA = Path(__file__).parent / "data"

LOG2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------- brute force

def _dense_criterion(frame: pl.DataFrame, *, y: str, X: np.ndarray, factors: list[dict],
                     sigma: float, kind: str | None, time: str | None, series: list[str],
                     phi: float, strata: str | None, ratios: dict, reml: bool) -> float:
    """−2 log-likelihood (REML: restricted) of the whole data as one dense system:
    V = Σ_f Z_f D_f Z_f' + σ² Δ C Δ with C block diagonal by series (φ^|rank or time gap|),
    β at its GLS estimate.  `factors`: [{"cols": [...], "Z": (n, q) array, "D": (q, q)}]."""
    n = frame.height
    V = np.zeros((n, n))
    for f in factors:
        key = frame.select(pl.concat_str([pl.col(c).cast(pl.Utf8) for c in f["cols"]],
                                         separator=":")).to_series().to_numpy()
        same = key[:, None] == key[None, :]
        V += same * (f["Z"] @ f["D"] @ f["Z"].T)
    C = np.eye(n)
    if kind is not None:
        skey = frame.select(pl.concat_str([pl.col(c).cast(pl.Utf8) for c in series],
                                          separator=":")).to_series().to_numpy()
        t = frame[time].to_numpy().astype(float)
        for s in np.unique(skey):
            idx = np.flatnonzero(skey == s)
            idx = idx[np.argsort(t[idx], kind="stable")]
            pos = np.arange(len(idx), dtype=float) if kind == "ar1" else t[idx]
            C[np.ix_(idx, idx)] = phi ** np.abs(pos[:, None] - pos[None, :])
    d = np.ones(n)
    if strata is not None:
        d = np.array([ratios[str(v)] for v in frame[strata].to_list()])
    V += sigma**2 * (d[:, None] * C * d[None, :])
    yv = frame[y].to_numpy().astype(float)
    L = np.linalg.cholesky(V)
    Xw = np.linalg.solve(L, X)
    yw = np.linalg.solve(L, yv)
    beta = np.linalg.lstsq(Xw, yw, rcond=None)[0]
    r = yw - Xw @ beta
    out = 2 * np.sum(np.log(np.diag(L))) + r @ r + n * LOG2PI
    if reml:
        out += np.linalg.slogdet(Xw.T @ Xw)[1] - X.shape[1] * LOG2PI
    return out


def _d_matrix(result, group: str, terms: list[str]) -> np.ndarray:
    re = result.random_effects.filter(pl.col("group") == group)
    sd = dict(zip(re["term"], re["std_dev"]))
    D = np.diag([sd[t] ** 2 for t in terms])
    for c in result.random_correlations.filter(pl.col("group") == group).iter_rows(named=True):
        i, j = terms.index(c["term1"]), terms.index(c["term2"])
        D[i, j] = D[j, i] = c["correlation"] * sd[c["term1"]] * sd[c["term2"]]
    return D


def _panel(seed: int, n_groups: int = 12, nested: bool = False) -> pl.DataFrame:
    """Unbalanced random series: subjects (in schools when `nested`) with 3-9 occasions at
    irregular integer times, an AR(1)-ish error, two strata of different noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        school = f"s{g % 3}"
        k = int(rng.integers(3, 10))
        times = np.sort(rng.choice(np.arange(0, 20), size=k, replace=False)).astype(float)
        b0, b1 = rng.normal(0, 1.0), rng.normal(0, 0.3)
        e = 0.0
        for j, t in enumerate(times):
            e = 0.6 * e + rng.normal(0, 1.0)
            stratum = "a" if rng.random() < 0.5 else "b"
            noise = e * (1.0 if stratum == "a" else 1.8)
            rows.append({"school": school, "subject": f"p{g:02d}", "t": t, "x": rng.normal(),
                         "stratum": stratum,
                         "y": 2.0 + 0.5 * t / 10 + 0.3 * (g % 3) + b0 + b1 * t / 10 + noise})
    frame = pl.DataFrame(rows)
    # shuffle: the pass must order rows by time itself
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)


CASES = [  # (id, formula, correlation, variance_by, nested)
    ("ar1_ri", "y ~ x + (1 | subject)", "ar1(t | subject)", None, False),
    ("ar1_rs", "y ~ x + t + (t | subject)", "ar1(t | subject)", None, False),
    ("car1_ri", "y ~ x + (1 | subject)", "car1(t | subject)", None, False),
    ("vi_ri", "y ~ x + (1 | subject)", None, "stratum", False),
    ("ar1_vi", "y ~ x + (1 | subject)", "ar1(t | subject)", "stratum", False),
    ("car1_vi", "y ~ t + (1 | subject)", "car1(t | subject)", "stratum", False),
    ("ar1_nested", "y ~ x + (1 | school/subject)", "ar1(t | school:subject)", None, True),
    ("car1_above", "y ~ x + (1 | school)", "car1(t | subject)", None, True),
]


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_criterion_equals_the_dense_likelihood_and_is_a_minimum(tmp_path, case, method):
    """mlpipe's criterion at its estimates equals the dense −2 log L there (1e-9 relative),
    and no small move of any variance parameter (σ, the SDs, φ, a ratio) lowers the dense
    criterion: the estimates are a minimum of the true likelihood, not of a shortcut."""
    _id, formula, corr, vby, nested = case
    frame = _panel(seed=len(_id) + (7 if method == "ML" else 0), nested=nested)
    path = tmp_path / "panel.parquet"
    frame.write_parquet(path)
    res = mlpipe.fit(path, formula, method=method, correlation=corr, residual_variance_by=vby,
                     ddf=None)
    assert res.converged
    rs = res.residual_structure
    fixed = res.fixed_effects["term"].to_list()
    cols = {"(Intercept)": np.ones(frame.height), "x": frame["x"].to_numpy(),
            "t": frame["t"].to_numpy()}
    X = np.column_stack([cols[t] for t in fixed])
    spec = parse_spec(corr, vby)
    groups = res.random_effects["group"].unique(maintain_order=True).to_list()

    def crit(scale_sd=None, dphi=0.0, dratio=0.0, dsigma=0.0):
        factors = []
        for g in groups:
            terms = res.random_effects.filter(pl.col("group") == g)["term"].to_list()
            D = _d_matrix(res, g, terms)
            if scale_sd is not None and scale_sd[0] == g:
                D = D * scale_sd[1] ** 2
            Z = np.column_stack([cols[t] for t in terms])
            factors.append({"cols": g.split(":"), "Z": Z, "D": D})
        phi = rs.get("phi", 0.0) + dphi
        ratios = dict(rs.get("variance_ratios") or {})
        if ratios:
            last = list(ratios)[-1]
            ratios[last] *= math.exp(dratio)
        return _dense_criterion(frame, y="y", X=X, factors=factors,
                                sigma=res.sigma * math.exp(dsigma), kind=spec.kind,
                                time=spec.time, series=list(spec.group), phi=phi,
                                strata=vby, ratios=ratios, reml=method == "REML")

    at = crit()
    assert -2 * res.loglik == pytest.approx(at, rel=1e-9)
    h = 1e-3
    moves = [dict(dsigma=h), dict(dsigma=-h)]
    moves += [dict(scale_sd=(g, math.exp(s))) for g in groups for s in (h, -h)]
    if spec.kind:
        phi = rs["phi"]
        low = -1.0 if spec.kind == "ar1" else 0.0
        moves += [dict(dphi=s) for s in (h, -h) if low < phi + s < 1]
    if vby:
        moves += [dict(dratio=h), dict(dratio=-h)]
    for mv in moves:
        if "scale_sd" in mv:  # an SD at zero (a boundary fit) cannot move down
            g = mv["scale_sd"][0]
            if res.random_effects.filter(pl.col("group") == g)["std_dev"].max() < 1e-6:
                continue
        assert crit(**mv) >= at - 1e-8 * abs(at), mv


def test_ar1_by_rank_ignores_gaps_and_car1_uses_them(tmp_path):
    """ar1 puts consecutive rows at lag 1 whatever the gap; car1 with equal gaps is the
    same model (φ_car1 = φ_ar1^(1/gap)), with unequal gaps a different one."""
    frame = _panel(seed=3)
    even = frame.with_columns((pl.col("t").rank("ordinal").over("subject") * 2).alias("t2"))
    path = tmp_path / "p.parquet"
    even.write_parquet(path)
    a = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="ar1(t | subject)", ddf=None)
    b = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="ar1(t2 | subject)", ddf=None)
    c = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="car1(t2 | subject)", ddf=None)
    d = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="car1(t | subject)", ddf=None)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)
    assert c.loglik == pytest.approx(a.loglik, rel=1e-9)
    assert c.residual_structure["phi"] ** 2 == pytest.approx(a.residual_structure["phi"],
                                                             rel=1e-5)
    assert c.residual_structure["distinct_gaps"] == 1
    assert d.residual_structure["distinct_gaps"] > 3
    assert abs(d.loglik - a.loglik) > 1e-3


def test_saved_statistics_refit_and_compare_with_independence(tmp_path):
    """The statistics file keeps the lag statistics: a refit from it equals the fit, by ML
    too; compare tests AR(1) against independence by LRT on 1 df."""
    frame = _panel(seed=5)
    path = tmp_path / "p.parquet"
    frame.write_parquet(path)
    stats = mlpipe.compute_statistics(path, "y ~ x + (1 | subject)",
                                      correlation="ar1(t | subject)")
    stats.save(tmp_path / "s.parquet")
    direct = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="ar1(t | subject)")
    again = mlpipe.fit(stats=tmp_path / "s.parquet")
    assert again.loglik == pytest.approx(direct.loglik, rel=1e-12)
    assert again.residual_structure["phi"] == pytest.approx(direct.residual_structure["phi"],
                                                            rel=1e-7)
    direct.write(tmp_path / "ar1")
    ml = mlpipe.fit(stats=tmp_path / "ar1" / "stats.parquet", method="ML")
    ml_direct = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="ar1(t | subject)",
                           method="ML")
    assert ml.loglik == pytest.approx(ml_direct.loglik, rel=1e-12)
    indep = mlpipe.fit(path, "y ~ x + (1 | subject)")
    indep.write(tmp_path / "indep")
    cmp = compare([tmp_path / "indep", tmp_path / "ar1"])
    t = cmp.tests.row(0, named=True)
    assert t["nested"] and t["df"] == 1 and not t["refit_ml"]
    assert t["chisq"] == pytest.approx(2 * (direct.loglik - indep.loglik), rel=1e-9)
    assert t["p_value_mixture"] is None  # φ is not a variance on its boundary
    saved = json.loads((tmp_path / "ar1" / "result.json").read_text())
    assert saved["correlation"]["structure"] == "ar1"
    assert saved["correlation"]["phi"] == pytest.approx(direct.residual_structure["phi"])
    assert saved["npar"] == indep.npar + 1


def test_cli_and_config(tmp_path, capsys):
    frame = _panel(seed=6)
    path = tmp_path / "p.parquet"
    frame.write_parquet(path)
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'data = "{path}"\nformula = "y ~ x + (1 | subject)"\n'
                   f'correlation = "car1(t | subject)"\nresidual_variance_by = "stratum"\n')
    assert main(["fit", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "Correlation structure: continuous AR(1)" in printed
    assert "Variance function: a residual SD per level of stratum" in printed
    assert main(["fit", str(path), "-f", "y ~ x + (1 | subject)", "-q",
                 "--correlation", "ar1(t | nope)"]) == 2
    assert "'nope' of the residual structure is not in the data" in capsys.readouterr().err
    py = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="car1(t | subject)",
                    residual_variance_by="stratum")
    saved = json.loads((tmp_path / "o" / "result.json").read_text())
    assert saved["loglik"] == pytest.approx(py.loglik, rel=1e-12)
    assert saved["correlation"]["variance_ratios"]["a"] == 1.0


def _bad(tmp_path, frame, formula, **kw):
    path = tmp_path / "b.parquet"
    frame.write_parquet(path)
    return lambda: mlpipe.fit(path, formula, **kw)


def test_refusals(tmp_path):
    frame = _panel(seed=8, nested=True)
    with pytest.raises(FormulaError, match="expected ar1"):
        _bad(tmp_path, frame, "y ~ x + (1 | subject)", correlation="ma2(t | subject)")()
    with pytest.raises(DataError, match="'tt' of the residual structure is not in the data"):
        _bad(tmp_path, frame, "y ~ x + (1 | subject)", correlation="ar1(tt | subject)")()
    with pytest.raises(DataError, match="must lie within one level"):
        _bad(tmp_path, frame, "y ~ x + (1 | subject)", correlation="ar1(t | school)")()
    dup = pl.concat([frame, frame.head(3)])
    with pytest.raises(DataError, match="3 repeated times within a series"):
        _bad(tmp_path, dup, "y ~ x + (1 | subject)", correlation="ar1(t | subject)")()
    with pytest.raises(DataError, match="time column 'stratum' must be numeric"):
        _bad(tmp_path, frame, "y ~ x + (1 | subject)", correlation="car1(stratum | subject)")()
    big = _panel(seed=8, n_groups=40)  # ~240 rows: ~200 distinct gaps
    wild = big.with_columns(pl.col("t") + pl.Series(np.linspace(0, 0.5, big.height)))
    with pytest.raises(DataError, match="distinct values; the exact statistics support"):
        _bad(tmp_path, wild, "y ~ x + (1 | subject)", correlation="car1(t | subject)")()
    weighted = frame.with_columns(w=pl.lit(1.0))
    with pytest.raises(InputError, match="case weights cannot be combined"):
        _bad(tmp_path, weighted, "y ~ x + (1 | subject)", correlation="ar1(t | subject)",
             weights="w")()
    with pytest.raises(InputError, match="profile confidence intervals are not available"):
        _bad(tmp_path, frame, "y ~ x + (1 | subject)", correlation="ar1(t | subject)",
             ci="profile")()
    path = tmp_path / "b.parquet"
    s = mlpipe.compute_statistics(path, "y ~ x + (1 | subject)", correlation="ar1(t | subject)")
    with pytest.raises(InputError, match="cannot be merged"):
        s.merge(s)
    s.save(tmp_path / "s.parquet")
    with pytest.raises(InputError, match="built with residual structure"):
        mlpipe.fit(stats=tmp_path / "s.parquet", correlation="car1(t | subject)")


def test_rows_missing_a_structure_column_are_dropped(tmp_path):
    """A null time, series or stratum drops the row (as any model column's null does), and
    the lags run over the remaining rows of the series."""
    frame = _panel(seed=9)
    holes = frame.with_columns(
        pl.when(pl.arange(0, frame.height) % 7 == 0).then(None).otherwise(pl.col("t"))
        .alias("t"))
    path = tmp_path / "h.parquet"
    holes.write_parquet(path)
    res = mlpipe.fit(path, "y ~ x + (1 | subject)", correlation="ar1(t | subject)")
    kept = holes.drop_nulls("t")
    path2 = tmp_path / "k.parquet"
    kept.write_parquet(path2)
    ref = mlpipe.fit(path2, "y ~ x + (1 | subject)", correlation="ar1(t | subject)")
    assert res.rows_dropped == holes.height - kept.height
    assert res.loglik == pytest.approx(ref.loglik, rel=1e-12)


def test_scaled_residuals_divide_by_the_stratum_sd(tmp_path):
    """Under a variance per stratum the summary's scaled residuals are nlme's Pearson
    residuals (y − fitted) / (σ δ_k): their quartiles against numpy on the predictions."""
    from mlpipe.predict import predict, residual_summary

    frame = _panel(seed=12)
    path = tmp_path / "p.parquet"
    frame.write_parquet(path)
    res = mlpipe.fit(path, "y ~ x + (1 | subject)", residual_variance_by="stratum",
                     correlation="ar1(t | subject)", ddf=None)
    ratios = res.residual_structure["variance_ratios"]
    assert ratios["b"] > 1.3  # the simulated noise is 1.8 times larger in b
    q = residual_summary(res, path).quantiles
    out = tmp_path / "pred.parquet"
    predict(res, path, out)
    pred = pl.read_parquet(out)
    r = (pred["y"] - pred["fitted"]).to_numpy() / res.sigma
    r = r / np.array([ratios[s] for s in pred["stratum"].to_list()])
    want = np.percentile(r, [0, 25, 50, 75, 100])
    got = [q[k] for k in ("Min", "1Q", "Median", "3Q", "Max")]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [
    ("sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)", "ar1(Days | Subject)", None),
    ("sleepstudy.parquet", "Reaction ~ Days + (1 | Subject)", "car1(Days | Subject)", None),
    ("orthodont.parquet", "distance ~ age * Sex + (1 | Subject)", "ar1(age | Subject)", "Sex"),
    ("oxboys.parquet", "height ~ age + (0 + age | Subject)", None, "Occasion"),
])
@pytest.mark.parametrize("reml", [True, False])
def test_the_exact_psi_gradient_equals_differences_of_the_criterion(case, reml):
    """JointObjective's ∂d/∂ψ from the objective's adjoint of the statistics equals the
    4-point difference of the criterion in ψ (the fallback), at random (θ, ψ)."""
    from mlpipe.engines import get_engine
    from mlpipe.model import make_objective
    from mlpipe.objective import Objective
    from mlpipe.residual import JointObjective, start

    name, formula, cor, by = case
    data = DATA / name if (DATA / name).exists() else DATA / "nlme" / name
    st = get_engine("duckdb").statistics(data, formula, correlation=cor,
                                         residual_variance_by=by)
    joint = JointObjective(st, lambda s: make_objective(s, reml=reml), start(st.residual))
    assert isinstance(joint.base, Objective)
    rng = np.random.default_rng(3)
    k = st.residual.n_params
    for _ in range(3):
        theta = joint.base.theta_map.initial * (0.5 + rng.random(len(joint.base.theta_map)))
        x = np.concatenate([theta, 0.6 * rng.normal(size=k)])
        f, g = joint.value_and_gradient(x)
        psi = x[-k:]
        diff = np.empty(k)
        for j in range(k):  # central differences of the criterion itself
            h = 1e-4 * max(1.0, abs(psi[j]))
            e = np.zeros(len(x))
            e[len(x) - k + j] = h
            diff[j] = (joint(x + e) - joint(x - e)) / (2 * h)
        assert np.isfinite(f)
        np.testing.assert_allclose(g[-k:], diff, rtol=1e-6, atol=1e-6 * abs(f))


def test_psi_starts_cover_the_correlation_range():
    """The joint fit tries φ at PHI_STARTS (per median gap for car1; ar1 also at −0.5)
    before Newton: Oxboys with car1 has a second minimum at φ 0.95 that Newton from the
    single start reached on some machines (the nlme test oxboys_car1_quad)."""
    from mlpipe.residual import PHI_STARTS, start_candidates
    from mlpipe.stats import compute_statistics

    data = Path(__file__).parent / "data" / "nlme" / "oxboys.parquet"
    f = "height ~ age + (1 | Subject)"
    rs = compute_statistics(data, f, correlation="car1(age | Subject)").residual
    gap = float(np.median(rs.gaps))
    per_gap = [(1 / (1 + math.exp(-x[0]))) ** gap for x in start_candidates(rs)]
    assert per_gap == pytest.approx([0.2, *PHI_STARTS[1:]], rel=1e-9)
    rs = compute_statistics(data, f, correlation="ar1(age | Subject)").residual
    phis = [math.tanh(x[0]) for x in start_candidates(rs)]
    assert phis == pytest.approx([0.2, *PHI_STARTS[1:], -0.5], rel=1e-9)
    rs = compute_statistics(data, f, residual_variance_by="Occasion").residual
    assert len(start_candidates(rs)) == 1
