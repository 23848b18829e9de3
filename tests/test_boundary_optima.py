"""Near-boundary optima of 2x2 random-effects covariances (tests/data/boundary).

The Cholesky parameterization has false stationary points on its boundary: θ_22 = 0 (the
second diagonal entry of T), i.e. a correlation of exactly ±1.  An optimizer that stops there
reports a "singular" fit with a criterion above lme4's.  These tests would catch that:

1. lme4 references (tests/data/boundary/make_refs.R: bobyqa / Nelder_Mead, polished) for
   (x | g) and (0 + z1 + z2 | g) models whose optimum is interior but close to the boundary
   (|correlation| 0.78-0.99, smallest diagonal θ 0.008-0.32; each JSON records both):

   - bdf_iq, bdf_ses, bdf_factors   mlmRev::bdf, (IQ.verb | schoolNR), |cor| 0.96-0.98;
                                     bdf_factors with categorical fixed predictors; on bdf_iq
                                     lme4's own default optimizer stops near the boundary
   - bdf_noint_slopes               0 + IQ.verb + aritPOST, two random slopes, no intercept
   - bdf_noint_perf_ml_singular     0 + IQ.verb + IQ.perf: REML interior on a flat
                                     likelihood, ML genuinely singular
   - chick_diet                     ChickWeight, Time * Diet + (Time | Chick), cor -0.98
   - milk_noint_diet                nlme::Milk, 0 + Diet + Time + (Time | Cow)
   - sim_*                          simulated in make_refs.R: 100 groups of 1-4 rows,
                                     (x | g) and (0 + z1 + z2 | g) with and without a fixed
                                     intercept; sim_rs_ml_singular is singular under ML.
                                     mlpipe before the optimizer fix (f2a99b1) stopped at
                                     θ_22 = 0 on sim_rs (ML), sim_rs_b (ML),
                                     sim_slopes_noint (REML) and sim_slopes_int (both)

   mlpipe (REML and ML) must match: criterion within 1e-6 relative and never above lme4's by
   more than that, fixed effects within 1e-3 × SE, SEs, SDs and correlations within 1e-3
   relative (1e-4 absolute near 0), conditional modes as in test_accuracy_extra.py, and
   an interior reference must give an interior mlpipe θ.

2. A property test: small simulated random-slope data sets; an independent optimizer (NLopt
   LN_BOBYQA from four starts, among them [1, 0, 1] and a random one) must never find a
   criterion lower than `optimize()`'s by more than 1e-7 relative.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import nlopt
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlpipe
from conftest import (check_conditional_modes, check_criterion, check_fixed_effects,
                      check_variance_components, listify)
from mlpipe.objective import Objective, ThetaMap
from mlpipe.optimize import optimize
from mlpipe.stats import compute_statistics

BOUNDARY = Path(__file__).parent / "data" / "boundary"
CASE_NAMES = sorted(p.stem for p in BOUNDARY.glob("*.json"))
CASES = [(c, m) for c in CASE_NAMES for m in ("REML", "ML")]

CRIT_REL = 1e-6
#: absolute tolerance for SDs (× σ) and correlations of a singular reference block, as in
#: test_accuracy_extra.py: on the boundary the criterion is flat
SINGULAR_ABS = 1e-3


def test_references_present():
    assert len(CASE_NAMES) >= 10, f"expected the boundary references, found {CASE_NAMES}"
    for case in CASE_NAMES:
        assert (BOUNDARY / f"{reference(case)['data']}.parquet").exists(), case


@cache
def reference(case: str) -> dict:
    return json.loads((BOUNDARY / f"{case}.json").read_text())


@cache
def fitted(case: str, method: str) -> tuple[mlpipe.FitResult, dict]:
    ref = reference(case)
    res = mlpipe.fit(BOUNDARY / f"{ref['data']}.parquet", ref["formula"], method=method,
                     ddf=None)
    return res, ref[method.lower()]


# ------------------------------------------------------------------------------------------
# 1. lme4 references


@pytest.mark.parametrize("case,method", CASES)
def test_criterion(case, method):
    res, ref = fitted(case, method)
    check_criterion(res, ref)


@pytest.mark.parametrize("case,method", CASES)
def test_criterion_not_above_lme4(case, method):
    """The bug this file guards against: a false boundary optimum above lme4's criterion."""
    res, ref = fitted(case, method)
    want = ref["deviance_or_reml"]
    assert res.deviance <= want + CRIT_REL * abs(want), (
        f"{case}: {reference(case)['formula']} {method}: mlpipe {res.deviance:.8f} "
        f"> lme4 {want:.8f} (theta {np.round(res.theta, 6).tolist()}, lme4 {ref['theta']})")


@pytest.mark.parametrize("case,method", CASES)
def test_interior_stays_interior(case, method):
    """An interior lme4 optimum: mlpipe's smallest diagonal θ is not 0 but lme4's value."""
    res, ref = fitted(case, method)
    diag = ThetaMap(res.stats.blocks, res.stats.q).diagonal
    got = float(np.min(np.asarray(res.theta)[diag]))
    if ref["singular"]:
        assert got < 1e-4 * max(1.0, float(np.max(np.asarray(res.theta)[diag])))
    else:
        assert got == pytest.approx(ref["min_diag_theta"], rel=1e-2)


@pytest.mark.parametrize("case,method", CASES)
def test_fixed_effects(case, method):
    res, ref = fitted(case, method)
    assert res.fixed_effects["term"].to_list() == listify(ref["fixed"]["term"])
    check_fixed_effects(res, ref)


@pytest.mark.parametrize("case,method", CASES)
def test_variance_components(case, method):
    res, ref = fitted(case, method)
    check_variance_components(res, ref, SINGULAR_ABS)


@pytest.mark.parametrize("case,method", CASES)
def test_conditional_modes(case, method):
    res, ref = fitted(case, method)
    check_conditional_modes(res, ref)


# ------------------------------------------------------------------------------------------
# 2. property test: no independent optimizer beats optimize()

DESIGNS = {
    "rs": "y ~ x + (x | g)",
    "slopes_noint": "y ~ 0 + z1 + z2 + (0 + z1 + z2 | g)",
    "slopes_int": "y ~ z1 + z2 + (0 + z1 + z2 | g)",
}
SEEDS = range(25)
PROPERTY_REL = 1e-7


def _simulate(seed: int) -> tuple[pa.Table, str]:
    """A small data set with two strongly correlated random effects: 40-120 groups of 1-4
    rows (few rows per group make optima near the boundary likely)."""
    rng = np.random.default_rng(seed)
    design = list(DESIGNS)[seed % len(DESIGNS)]
    ng = int(rng.integers(40, 121))
    n = rng.integers(1, 5, ng)
    g = np.repeat(np.arange(ng), n)
    N = int(n.sum())
    rho = rng.uniform(0.6, 0.95) * rng.choice([-1.0, 1.0])
    sds = np.array([1.0, rng.uniform(0.2, 1.0)])
    cov = np.outer(sds, sds) * np.array([[1.0, rho], [rho, 1.0]])
    u = rng.multivariate_normal(np.zeros(2), cov, size=ng)
    z1 = rng.normal(rng.choice([0.0, 0.0, 2.0]), 1.0, N)
    z2 = rng.normal(0.0, 1.0, N)
    e = rng.normal(0.0, rng.uniform(0.5, 1.5), N)
    groups = np.array([f"g{i:03d}" for i in range(ng)])[g]
    if design == "rs":
        y = 1.0 + 0.5 * z1 + u[g, 0] + u[g, 1] * z1 + e
        cols = {"g": groups, "x": z1, "y": y}
    else:
        y = (2.0 if design == "slopes_int" else 0.0) + 0.5 * z1 - 0.3 * z2 \
            + u[g, 0] * z1 + u[g, 1] * z2 + e
        cols = {"g": groups, "z1": z1, "z2": z2, "y": y}
    return pa.table(cols), DESIGNS[design]


def _independent_bobyqa(obj: Objective, x0: np.ndarray) -> float:
    """Plain bounded NLopt BOBYQA on the deviance; the lowest value it evaluated."""
    best = [np.inf]
    f0 = obj(x0)
    fallback = f0 if np.isfinite(f0) else 1e300

    def f(theta, grad):
        v = obj(np.asarray(theta, dtype=float))
        best[0] = min(best[0], v)
        return v if np.isfinite(v) else fallback

    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_min_objective(f)
    opt.set_lower_bounds(obj.theta_map.lower)
    opt.set_ftol_rel(1e-12)
    opt.set_xtol_abs(1e-10)
    opt.set_maxeval(4000)
    try:
        opt.optimize(np.maximum(x0, obj.theta_map.lower))
    except nlopt.RoundoffLimited:
        pass
    return best[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_no_lower_criterion_elsewhere(seed, tmp_path):
    table, formula = _simulate(seed)
    path = tmp_path / f"sim{seed}.parquet"
    pq.write_table(table, path)
    stats = compute_statistics(path, formula)
    rng = np.random.default_rng(1000 + seed)
    for reml in (True, False):
        obj = Objective(stats, reml=reml)
        summary = optimize(obj)
        fbest = summary.final_objective
        assert np.isfinite(fbest)
        assert fbest == pytest.approx(obj(np.asarray(summary.final_theta)), rel=1e-12)
        starts = {
            "[1, 0, 1]": np.array([1.0, 0.0, 1.0]),
            "random": np.array([rng.uniform(0.1, 2.0), rng.normal(0.0, 1.0),
                                rng.uniform(0.1, 2.0)]),
            "near cor +1": np.array([1.0, 0.99, 0.05]),
            "near cor -1": np.array([1.0, -0.99, 0.05]),
        }
        for name, x0 in starts.items():
            f = _independent_bobyqa(obj, x0)
            assert f >= fbest - PROPERTY_REL * abs(fbest), (
                f"seed {seed} {formula} {'REML' if reml else 'ML'}: BOBYQA from {name} "
                f"reached {f:.10f} < optimize() {fbest:.10f} "
                f"(θ {np.round(summary.final_theta, 6).tolist()}, "
                f"messages {summary.messages})")
