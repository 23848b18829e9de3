"""Variance decompositions of fitted two-level models: the ICC and proportional reduction.

* `icc(result)` — the intraclass correlation of a random-intercept model,
  ICC = τ₀₀ / (τ₀₀ + σ²), with a confidence interval.
* `variance_explained(base, model)` — Raudenbush & Bryk's proportional reduction in
  variance of each component from a baseline model (usually the null model) to a richer one.

The ICC interval
----------------
With one random intercept lme4's relative covariance factor is the scalar θ = τ₀₀^½ / σ, so

    ICC = σ²θ² / (σ²θ² + σ²) = θ² / (1 + θ²),

a monotone function of θ alone.  The objective in `objective.py` is already the deviance
*profiled* over β and σ, so the profile deviance of the ICC is exactly d(θ(ICC)): the
profile-likelihood interval is the set of θ with d(θ) − d(θ̂) ≤ χ²₁(level), found by two
root searches on the objective built from the saved statistics (no data are reread) and
mapped through θ²/(1+θ²).  It is transformation-invariant, respects the [0, 1) range (the
lower end is 0 when d(0) − d(θ̂) is below the cut-off) and uses the fit's own criterion —
the restricted likelihood for REML fits, the likelihood for ML fits.  This is the default
(`method="profile"`).

`method="wald"` gives the delta-method alternative on the logit scale: logit(ICC) = 2 log θ,
Var(log θ̂) = 2 / (∂²d/∂(log θ)²) from a central second difference of the same profiled
deviance, and the interval expit(2 log θ̂ ± z·2·se(log θ̂)).  It is not defined at θ̂ = 0.
"""

from __future__ import annotations


import polars as pl

from .errors import InputError

from .inference import ICC, ICC_METHODS, INTERCEPT, icc_of, icc_or_none, \
    is_random_intercept_only  # noqa: F401  (the ICC is computed with the fit, below api)


def icc(result, level: float = 0.95, *, method: str = "profile") -> ICC:
    """The ICC of a random-intercept model with its confidence interval.

    `result` is a `FitResult` (with its statistics, as `fit` returns it), a config .toml
    or a result directory (refitted from its config.toml with the recorded method).
    """
    return icc_of(_fitted(result), level, method=method)


def variance_explained(base, model) -> pl.DataFrame:
    """Proportional reduction in variance from `base` to `model` (Raudenbush & Bryk).

    Level 1: (σ²_base − σ²_model) / σ²_base.  Level 2, for every random-effect term of both
    models: (τ_base − τ_model) / τ_base.  Negative values mean the variance grew (as τ₀₀ does
    when a group-mean-centred level-1 predictor is added).  Both models must be fitted to the
    same rows with the same method.  Arguments are FitResults, configs or result directories.
    """
    from .compare import load_model

    b, m = load_model(base), load_model(model)
    if b.method != m.method:
        raise InputError(f"compare variances of fits by the same method, not {b.method} "
                         f"and {m.method}")
    if b.nobs != m.nobs:
        raise InputError(f"the models were fitted to different rows ({b.nobs} and {m.nobs} "
                         f"observations)")
    rows = [(1, "Residual", b.residual_variance, m.residual_variance)]
    mv = {(r["group"], r["term"]): r["variance"] for r in m.random_effects.iter_rows(named=True)}
    for r in b.random_effects.iter_rows(named=True):
        key = (r["group"], r["term"])
        if key in mv:
            rows.append((2, r["term"], r["variance"], mv[key]))
    out = pl.DataFrame(rows, schema={"level": pl.Int64, "term": pl.Utf8,
                                     "base_variance": pl.Float64, "model_variance": pl.Float64},
                       orient="row")
    return out.with_columns(
        ((pl.col("base_variance") - pl.col("model_variance")) / pl.col("base_variance"))
        .alias("proportion_reduction"))


def _fitted(x):
    """A FitResult with statistics from a FitResult, config or result directory."""
    from .results import FitResult

    if isinstance(x, FitResult):
        return x
    from .compare import load_model

    rec = load_model(x)
    return rec.result if rec.result is not None and rec.result.stats is not None \
        else rec.refit(rec.method)
