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

import math
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from scipy import optimize, stats as sps

from .errors import InputError

INTERCEPT = "(Intercept)"
ICC_METHODS = ("profile", "wald")


@dataclass
class ICC:
    icc: float
    lower: float
    upper: float
    level: float
    method: str  # e.g. "profile-likelihood (REML)"
    tau00: float
    sigma2: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}

    def __str__(self) -> str:
        pct = f"{100 * self.level:g}%"
        return (f"ICC = {self.icc:.4f}  ({pct} CI {self.lower:.4f} to {self.upper:.4f}, "
                f"{self.method}); tau00 = {self.tau00:.4g}, sigma^2 = {self.sigma2:.4g}")


def is_random_intercept_only(result) -> bool:
    re = result.random_effects
    return re.height == 1 and re["term"][0] == INTERCEPT


def icc(result, level: float = 0.95, *, method: str = "profile") -> ICC:
    """The ICC of a random-intercept model with its confidence interval.

    `result` is a `FitResult` (with its statistics, as `fit` returns it), a config .toml
    or a result directory (refitted from its config.toml with the recorded method).
    """
    result = _fitted(result)
    if not is_random_intercept_only(result):
        terms = ", ".join(result.random_effects["term"].to_list())
        raise InputError(f"the ICC needs a model with one random intercept and no random "
                         f"slopes; {result.formula!r} has random terms {terms}")
    if not 0 < level < 1:
        raise InputError(f"level must be between 0 and 1, not {level!r}")
    if method not in ICC_METHODS:
        raise InputError(f"method must be one of {', '.join(ICC_METHODS)}, not {method!r}")
    if result.stats is None:
        raise InputError("the ICC interval needs the model's statistics; fit it with "
                         "mlpipe.fit or pass a config / result directory")
    from .objective import Objective

    tau00 = float(result.random_effects["variance"][0])
    sigma2 = float(result.residual_variance)
    obj = Objective(result.stats, reml=result.method == "REML")
    th = float(abs(np.asarray(result.theta)[0]))
    d_hat = obj(np.array([th]))
    to_icc = lambda t: t * t / (1.0 + t * t)  # noqa: E731
    point = tau00 / (tau00 + sigma2)

    if method == "profile":
        crit = float(sps.chi2.ppf(level, 1))
        f = lambda t: obj(np.array([t])) - d_hat - crit  # noqa: E731
        lo = 0.0 if f(0.0) <= 0 else optimize.brentq(f, 0.0, th, xtol=1e-12, rtol=1e-12)
        b = 2.0 * th + 1.0
        for _ in range(200):
            if f(b) > 0:
                break
            b *= 2.0
        else:
            return ICC(point, to_icc(lo), 1.0, level, f"profile-likelihood ({result.method})",
                       tau00, sigma2)
        hi = optimize.brentq(f, th, b, xtol=1e-12, rtol=1e-12)
        return ICC(point, to_icc(lo), to_icc(hi), level,
                   f"profile-likelihood ({result.method})", tau00, sigma2)

    if th < 1e-6:
        raise InputError("the Wald ICC interval is not defined for a zero random-intercept "
                         "variance; use method='profile'")
    h = 1e-3
    lt = math.log(th)
    dev = lambda x: obj(np.array([math.exp(x)]))  # noqa: E731
    d2 = (dev(lt + h) - 2.0 * d_hat + dev(lt - h)) / (h * h)
    if not d2 > 0:
        raise InputError("the deviance is not convex at the estimate; use method='profile'")
    se_logit = 2.0 * math.sqrt(2.0 / d2)
    z = float(sps.norm.ppf(0.5 + level / 2))
    expit = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return ICC(point, expit(2 * lt - z * se_logit), expit(2 * lt + z * se_logit), level,
               f"Wald on the logit scale ({result.method})", tau00, sigma2)


def icc_or_none(result, level: float = 0.95) -> dict | None:
    """`icc(result).to_dict()` for random-intercept models with statistics, else None."""
    if result.stats is None or not is_random_intercept_only(result):
        return None
    try:
        return icc(result, level).to_dict()
    except (InputError, ValueError, ArithmeticError):
        return None


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
