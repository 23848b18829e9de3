"""Stage 5: the fitted model as tidy tables, and its views (summary text, JSON, Parquet).

Computing is kept apart from rendering: `FitResult.build` reads everything off the
decomposition at the optimum; `summary()`, `to_dict()` and `write()` only format it.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import linalg

from ._levels import const_matmul, solve_lower, solve_lower_t
from ._sql import staging_prefix, sweep_stale
from .errors import InputError
from .objective import Decomposition, Objective
from .optimize import SINGULAR_TOL, OptSummary
from .stats import Statistics


#: the files `FitResult.write` may put in a result directory
RESULT_FILES = {"result.json", "ranef.parquet", "stats.parquet", "config.toml",
                "residuals_by_group.parquet", "run.json"}
#: run-specific values kept out of result.json (so identical inputs give identical bytes)
RUN_ONLY = ("seconds",)


@dataclass
class FitResult:
    """A fitted linear mixed model (what `mlpipe.fit` returns).

    Tables (polars DataFrames) and numbers, named as lme4 names them:

    * `fixed_effects` — term, estimate, std_error, t_value, df, p_value (df and p from
      Satterthwaite or Kenward–Roger, see `df_method`); `fixef` — {term: estimate}
    * `coef()` — lme4's `coef()`: per grouping factor, one row per level with every
      fixed-effect coefficient plus that level's random effect (a table per factor)
    * `ranef` — the conditional modes: group, level, term, estimate, cond_sd (long form)
    * `random_effects` (group, term, variance, std_dev), `random_correlations`
      (group, term1, term2, correlation), `residual_variance`, `sigma`
    * `vcov` — Var(β̂) as a table (one column per fixed effect, rows in the same order; the
      array is `vcov_matrix`); `correlation_of_fixed` — the same as correlations
    * `loglik`, `deviance`, `reml_criterion`, `aic`, `bic`, `npar`, `nobs`, `groups`
      ({factor: levels}), `converged`, `singular`, `theta`, `optimizer`
    * `confidence_intervals`, `icc`, `variance_partition`, `residuals` when computed

    `summary()` prints lme4's summary (`summary(correlation=True)` adds the correlation of
    the fixed effects); `write(dir)` writes result.json, ranef.parquet, stats.parquet.
    """

    formula: str
    method: str
    nobs: int
    groups: dict[str, int]
    fixed_effects: pl.DataFrame  # term, estimate, std_error, t_value, df, p_value
    vcov_matrix: np.ndarray  # Var(β̂), in the order of fixed_effects (the `vcov` table's)
    random_effects: pl.DataFrame  # group, term, variance, std_dev
    random_correlations: pl.DataFrame  # group, term1, term2, correlation
    residual_variance: float
    sigma: float
    loglik: float
    deviance: float
    reml_criterion: float | None
    aic: float
    bic: float
    npar: int
    converged: bool
    singular: bool
    optimizer: OptSummary
    #: group, level, term, estimate, cond_sd; a LazyFrame of the workers' files with
    #: keep_on_workers (see `ranef_frame`)
    ranef: pl.DataFrame | pl.LazyFrame
    theta: np.ndarray
    rows_dropped: int = 0
    stats: Statistics | None = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    df_method: str | None = None
    confidence_intervals: pl.DataFrame | None = None  # parameter, estimate, lower, upper, method
    ci_level: float | None = None
    icc: dict | None = None  # for a random-intercept-only model: icc, lower, upper, method
    residuals: object | None = None  # predict.ResidualSummary, from a second pass when asked
    #: random intercepts on several factors: each level's share of the total variance
    #: (the multilevel ICC: [{"group", "variance", "proportion"}], the residual last)
    variance_partition: list[dict] | None = None
    #: a residual structure (mlpipe/residual.py): structure, time, group, phi, series,
    #: variance_by, variance_ratios, optimizer — as result.json's "correlation"
    residual_structure: dict | None = None
    #: a GLMM (mlpipe/glmm.py): the family ("binomial", "poisson"), link and nAGQ (1 =
    #: Laplace); None for a linear mixed model
    family: str | None = None
    link: str | None = None
    nagq: int | None = None
    nb_theta: float | None = None  # the negative binomial's θ (Var = μ + μ²/θ)
    dispersion: float | None = None  # the gamma's φ = 1/shape (Var = φ μ²)
    #: an ordinal model's thresholds [{term "1|2", estimate, std_error}], clmm's
    thresholds: list | None = None
    #: coding of categorical predictors and grouping-column types of a fit without
    #: `Statistics` (a GLMM); otherwise read from `stats`
    factor_levels: dict | None = None
    group_types: dict | None = None
    #: a fit by the method of moments (mlpipe/moments.py): the moment estimates, their
    #: sampling SEs and covariance (one or two factors), the refinement's record
    moments: dict | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, stats: Statistics, obj: Objective, dec: Decomposition,
              opt: OptSummary, *, ranef=None, groups: dict | None = None) -> FitResult:
        """The result of a one-factor model.  `ranef` and `groups` for statistics whose
        groups are elsewhere (the Dask workers, mlpipe/engines/dask_solve.py): the modes
        they wrote (a LazyFrame) and the number of groups."""
        reml = obj.reml
        sigma = obj.sigma(dec)
        s2 = sigma**2
        p = stats.p
        fixed, vcov = _fixed_table(stats.fixed_names, dec.beta, dec.rx, s2)

        T = dec.T
        cov = s2 * T @ T.T
        rand, corrs = variance_tables([(stats.group, stats.random_names, cov, stats.blocks)])

        dev = obj.deviance_of(dec)
        npar = p + len(dec.theta) + 1
        theta = np.asarray(dec.theta)
        singular = bool(np.any(theta[obj.theta_map.diagonal] < SINGULAR_TOL))
        return cls(
            formula=stats.formula, method="REML" if reml else "ML", nobs=stats.n,
            groups=groups or {stats.group: stats.m}, fixed_effects=fixed, vcov_matrix=vcov,
            random_effects=rand, random_correlations=corrs, residual_variance=s2, sigma=sigma,
            loglik=-dev / 2, deviance=dev, reml_criterion=dev if reml else None,
            aic=dev + 2 * npar, bic=dev + npar * math.log(stats.n), npar=npar,
            converged=opt.converged, singular=singular, optimizer=opt,
            ranef=_conditional_modes(stats, dec, sigma) if ranef is None else ranef,
            theta=theta,
            rows_dropped=stats.rows_dropped, stats=stats)

    @classmethod
    def build_general(cls, stats: Statistics, obj, dec, opt: OptSummary) -> FitResult:
        """The result of a model with several grouping factors (`blocked.BlockedObjective`):
        one block of variance components, correlations and conditional modes per factor,
        factors in lme4's order (most levels first)."""
        reml = obj.reml
        sigma = obj.sigma(dec)
        s2 = sigma**2
        p = stats.p
        fixed, vcov = _fixed_table(stats.fixed_names, dec.beta, dec.rx, s2)
        modes = obj.conditional_modes(dec, sigma)
        rand, corrs = variance_tables([(f.name, f.names, s2 * T @ T.T, f.blocks)
                                       for f, T in zip(obj.factors, dec.T)])
        ranef_parts = [modes_table(f.name, f.levels, f.names, mode["b"], mode["cond_sd"])
                       for f, mode in zip(obj.factors, modes)]
        dev = obj.deviance_of(dec)
        theta = np.asarray(dec.theta)
        npar = p + len(theta) + 1
        singular = bool(np.any(theta[obj.theta_map.diagonal] < SINGULAR_TOL))
        opt.structure = obj.structure()
        partition = None
        rand_rows = rand.rows()
        if all(r[1] == "(Intercept)" for r in rand_rows):
            total = sum(r[2] for r in rand_rows) + s2
            partition = [{"group": g, "variance": v, "proportion": v / total}
                         for g, _t, v, _sd in rand_rows]
            partition.append({"group": "Residual", "variance": s2, "proportion": s2 / total})
        return cls(
            formula=stats.formula, method="REML" if reml else "ML", nobs=stats.n,
            groups={f.name: f.m for f in obj.factors}, fixed_effects=fixed, vcov_matrix=vcov,
            random_effects=rand, random_correlations=corrs, residual_variance=s2, sigma=sigma,
            loglik=-dev / 2, deviance=dev, reml_criterion=dev if reml else None,
            aic=dev + 2 * npar, bic=dev + npar * math.log(stats.n), npar=npar,
            converged=opt.converged, singular=singular, optimizer=opt,
            ranef=pl.concat(ranef_parts), theta=theta, rows_dropped=stats.rows_dropped,
            stats=stats, variance_partition=partition)

    # ------------------------------------------------------------------ accessors
    @property
    def fixef(self) -> dict[str, float]:
        """The fixed-effect estimates, {term: estimate} (lme4's `fixef()`)."""
        return dict(zip(self.fixed_effects["term"], self.fixed_effects["estimate"]))

    @property
    def coef(self) -> _Coef:
        """lme4's `coef()`: call it, `result.coef()`, for the per-level coefficients (see
        `coefficients`). Indexing it as a mapping (`result.coef["x"]`, the fixed effects
        before 0.2) still works but is deprecated: use `result.fixef`."""
        return _Coef(self)

    def ranef_frame(self) -> pl.DataFrame:
        """`ranef` as a DataFrame (the modes of a fit with `keep_on_workers` are a lazy scan
        of the files the workers wrote: collected here, O(groups) memory)."""
        if isinstance(self.ranef, pl.LazyFrame):
            return self.ranef.collect()
        return self.ranef

    def ranef_wide(self) -> dict[str, pl.DataFrame]:
        """lme4's `ranef()`: for each grouping factor, a table with one row per level
        (`level`, in the factor's order) and one column per random-effect term, the
        conditional modes (`ranef` is the same in long form, with the conditional SDs)."""
        out, ranef = {}, self.ranef_frame()
        for factor in self.groups:
            part = ranef.filter(pl.col("group") == factor)
            terms = list(dict.fromkeys(part["term"].to_list()))
            levels = part.filter(pl.col("term") == terms[0])["level"]
            cols = {"level": levels}
            for t in terms:
                modes = part.filter(pl.col("term") == t)
                cols[t] = modes["estimate"]
            out[factor] = pl.DataFrame(cols)
        return out

    def coefficients(self) -> dict[str, pl.DataFrame]:
        """lme4's `coef()`: for each grouping factor (lme4's order), a table with one row per
        level (`level`) and one column per coefficient — every fixed effect plus the level's
        conditional mode where the factor has a random effect of that name; a random-effect
        term with no fixed effect of its name comes first, with the random effect alone."""
        fixed = self.fixef
        out, ranef = {}, self.ranef_frame()
        for factor in self.groups:
            part = ranef.filter(pl.col("group") == factor)
            terms = list(dict.fromkeys(part["term"].to_list()))
            levels = part.filter(pl.col("term") == terms[0])["level"]
            names = [t for t in terms if t not in fixed] + list(fixed)
            cols = {"level": levels}
            for name in names:
                value = np.full(len(levels), fixed.get(name, 0.0))
                if name in terms:
                    value = value + part.filter(pl.col("term") == name)["estimate"].to_numpy()
                cols[name] = value
            out[factor] = pl.DataFrame(cols)
        return out

    @property
    def vcov(self) -> pl.DataFrame:
        """Var(β̂) (lme4's `vcov()`, unadjusted also under Kenward–Roger) as a table: one
        column per fixed effect, named by it; row i belongs to the i-th column (the model's
        order), so `np.asarray(result.vcov)` is the matrix (also `vcov_matrix`)."""
        return _named_matrix(self.fixed_effects["term"].to_list(), self.vcov_matrix)

    @property
    def correlation_of_fixed(self) -> pl.DataFrame:
        """The correlation matrix of β̂ (lme4's "Correlation of Fixed Effects"), as `vcov`."""
        return _named_matrix(self.fixed_effects["term"].to_list(),
                             _correlation(self.vcov_matrix))

    def anova(self, type: int | str = 3, ddf: str = "satterthwaite") -> pl.DataFrame:
        """lmerTest's `anova(m, type, ddf)`: an F test per fixed-effect term (type 3, 2 or 1;
        ddf "satterthwaite" or "kenward-roger"), columns term, Sum Sq, Mean Sq, NumDF, DenDF,
        F value, Pr(>F).  `mlpipe.anova.format_anova(table)` prints it as lmerTest does."""
        from .anova import anova

        return anova(self, type=type, ddf=ddf)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        def rows(df: pl.DataFrame) -> list[dict]:
            return [{k: _clean(v) for k, v in r.items()} for r in df.iter_rows(named=True)]

        out = {
            "formula": self.formula, "method": self.method, "nobs": self.nobs,
            "groups": self.groups, "fixed_effects": rows(self.fixed_effects),
            "df_method": self.df_method,
            "random_effects": rows(self.random_effects),
            "random_correlations": rows(self.random_correlations),
            "residual_variance": _clean(self.residual_variance), "sigma": self.sigma,
            "loglik": _clean(self.loglik), "deviance": _clean(self.deviance),
            "reml_criterion": self.reml_criterion, "aic": _clean(self.aic),
            "bic": _clean(self.bic),
            "npar": self.npar, "converged": self.converged, "singular": self.singular,
            "theta": self.theta.tolist(), "rows_dropped": self.rows_dropped,
            "factor_levels": self.stats.factor_levels if self.stats is not None
            else (self.factor_levels or {}),
            "group_type": self.stats.group_type if self.stats is not None else "",
            "optimizer": {k: _clean(v) for k, v in self.optimizer.to_dict().items()
                          if k not in RUN_ONLY},
            "icc": self.icc,
            "variance_partition": self.variance_partition,
        }
        if self.family is not None:
            out.update(family=self.family, link=self.link, nagq=self.nagq)
            if self.nb_theta is not None:
                out["nb_theta"] = self.nb_theta
            if self.dispersion is not None:
                out["dispersion"] = self.dispersion
            if self.thresholds is not None:
                out["thresholds"] = self.thresholds
        if self.stats is None and self.group_types:
            out["group_types"] = self.group_types
        if self.residual_structure is not None:
            out["correlation"] = {k: _clean(v) if not isinstance(v, dict) else v
                                  for k, v in self.residual_structure.items()}
        if self.residuals is not None:
            out["scaled_residuals"] = dict(self.residuals.quantiles)
        if self.moments is not None:
            out["moments"] = self.moments
        if self.confidence_intervals is not None:
            out["confidence_intervals"] = {"level": self.ci_level,
                                           "intervals": rows(self.confidence_intervals)}
        return out

    def write(self, out_dir: str | os.PathLike[str], *, config: dict | None = None) -> Path:
        """Write result.json, ranef.parquet, stats.parquet (and config.toml) into `out_dir`.

        Files are staged in a temporary folder beside `out_dir` and moved into place only
        when all of them were written, so an error never leaves half-written outputs.
        """
        from .config import dump_toml

        out = Path(out_dir)
        check_out_dir(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)  # staging folders of killed runs
        stage = Path(tempfile.mkdtemp(prefix=staging_prefix(out), dir=out.parent))
        try:
            (stage / "result.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            if isinstance(self.ranef, pl.LazyFrame):  # modes written by Dask workers
                self.ranef.sink_parquet(stage / "ranef.parquet")
            else:
                self.ranef.write_parquet(stage / "ranef.parquet")
            if self.stats is not None:  # O(groups): refits (ML, profiles) need no data reread
                self.stats.save(stage / "stats.parquet")
            if self.residuals is not None:
                self.residuals.by_group.write_parquet(stage / "residuals_by_group.parquet")
            if config is not None:
                (stage / "config.toml").write_text(dump_toml(config))
            (stage / "run.json").write_text(json.dumps(self.run_record(out), indent=2) + "\n")
            _install(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out

    def run_record(self, out: Path) -> dict:
        """What differs between two runs on identical inputs (timings, where it ran): run.json."""
        import platform
        import time

        from . import __version__

        return {"optimizer_seconds": _clean(self.optimizer.seconds),
                "timings": {k: _clean(v) for k, v in self.timings.items()},
                "out": os.path.abspath(out),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "mlpipe": __version__, "python": platform.python_version(),
                "host": platform.node(), "pid": os.getpid()}

    def summary(self, correlation: bool = False) -> str:
        """The printed summary, laid out as lme4's `summary()`; `correlation=True` adds the
        correlation of the fixed effects (lme4's `print(summary(m), correlation = TRUE)`)."""
        return render_summary(self, correlation=correlation)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        crit = (f"REML criterion {self.reml_criterion:.4f}" if self.method == "REML"
                else f"logLik {self.loglik:.4f}, AIC {self.aic:.4f}")
        groups = ", ".join(f"{g} ({n:,})" for g, n in self.groups.items())
        flags = "" if self.converged and not self.singular else \
            " [" + ", ".join((["not converged"] if not self.converged else [])
                             + (["singular"] if self.singular else [])) + "]"
        return (f"<mlpipe FitResult: {self.method}{flags}>\n"
                f"  formula: {self.formula}\n"
                f"  {crit}\n"
                f"  n = {self.nobs:,}; groups: {groups}\n"
                f"  fixed effects: {len(self.fixed_effects)}; "
                f"variance parameters: {len(self.theta) + 1}\n"
                f"  (.summary() for the full table)")

    def _repr_html_(self) -> str:
        """The notebook view: the header and the two tables of the summary."""
        esc = html.escape
        crit = (f"REML criterion at convergence: {self.reml_criterion:.4f}"
                if self.method == "REML" else
                f"logLik {self.loglik:.4f}, AIC {self.aic:.4f}, BIC {self.bic:.4f}")
        groups = "; ".join(f"{esc(g)}: {n:,}" for g, n in self.groups.items())

        def table(header, rows):
            head = "".join(f"<th>{esc(h)}</th>" for h in header)
            left = " style='text-align:left'"
            body = "".join("<tr>" + "".join(
                f"<td{left if i == 0 else ''}>{esc(str(c))}</td>"
                for i, c in enumerate(r)) + "</tr>" for r in rows)
            return (f"<table style='text-align:right'><thead><tr>{head}</tr></thead>"
                    f"<tbody>{body}</tbody></table>")

        fe = self.fixed_effects
        has_df = fe["df"].null_count() < fe.height
        fe_rows = [[r["term"], f"{r['estimate']:.4g}", f"{r['std_error']:.4g}"]
                   + ([_fmt_or_na(r["df"], ".1f")] if has_df else [])
                   + [f"{r['t_value']:.3f}"] + ([_p_text(r["p_value"])] if has_df else [])
                   for r in fe.iter_rows(named=True)]
        fe_head = ["", "Estimate", "Std. Error"] + (["df"] if has_df else []) + ["t value"] + \
            (["Pr(>|t|)"] if has_df else [])
        re_rows = [[r["group"], r["term"], f"{r['variance']:.4g}", f"{r['std_dev']:.4g}"]
                   for r in self.random_effects.iter_rows(named=True)]
        re_rows.append(["Residual", "", f"{self.residual_variance:.4g}", f"{self.sigma:.4g}"])
        notes = [n for n, on in (("boundary (singular) fit", self.singular),
                                 ("the optimizer did not converge", not self.converged)) if on]
        return (f"<div><b>Linear mixed model fit by {esc(self.method)} (mlpipe)</b><br>"
                f"<code>{esc(self.formula)}</code><br>{esc(crit)}<br>"
                f"Number of obs: {self.nobs:,}; groups: {groups}"
                + "".join(f"<br><b>{esc(n)}</b>" for n in notes)
                + "<p>Random effects:</p>"
                + table(["Groups", "Name", "Variance", "Std.Dev."], re_rows)
                + "<p>Fixed effects:</p>" + table(fe_head, fe_rows) + "</div>")


class _Coef(Mapping):
    """`result.coef`: callable as lme4's coef() (per-level coefficients); as a mapping it is
    the fixed effects, the meaning `result.coef` had before 0.2 (deprecated: `fixef`)."""

    def __init__(self, result: FitResult):
        self._result = result

    def __call__(self) -> dict[str, pl.DataFrame]:
        return self._result.coefficients()

    def _fixef(self) -> dict[str, float]:
        warnings.warn("result.coef as the fixed effects is deprecated: use result.fixef "
                      "(result.coef() is lme4's per-level coef())", DeprecationWarning,
                      stacklevel=3)
        return self._result.fixef

    def __getitem__(self, key):
        return self._fixef()[key]

    def __iter__(self):
        return iter(self._fixef())

    def __len__(self) -> int:
        return len(self._result.fixed_effects)

    def __repr__(self) -> str:
        return "<coef: call result.coef() for per-level coefficients; result.fixef: fixed>"


def variance_tables(factors) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`random_effects` (group, term, variance, std_dev) and `random_correlations` (group,
    term1, term2, correlation) from [(group, term names, covariance matrix, blocks)] — the
    correlations within each correlated block."""
    rand_rows, corr_rows = [], []
    for group, names, cov, blocks in factors:
        for a, name in enumerate(names):
            rand_rows.append((group, name, float(cov[a, a]), math.sqrt(cov[a, a])))
        for start, size in blocks:
            for a in range(start, start + size):
                for b in range(a + 1, start + size):
                    denom = math.sqrt(cov[a, a] * cov[b, b])
                    corr_rows.append((group, names[a], names[b],
                                      cov[a, b] / denom if denom > 0 else float("nan")))
    rand = pl.DataFrame(rand_rows, schema={"group": pl.Utf8, "term": pl.Utf8,
                                           "variance": pl.Float64, "std_dev": pl.Float64},
                        orient="row")
    corrs = pl.DataFrame(corr_rows, schema={"group": pl.Utf8, "term1": pl.Utf8,
                                            "term2": pl.Utf8, "correlation": pl.Float64},
                         orient="row")
    return rand, corrs


def modes_table(group: str, levels, names: list[str], b: np.ndarray,
                cond_sd: np.ndarray) -> pl.DataFrame:
    """One factor's conditional modes in long form (group, level, term, estimate, cond_sd)
    from (levels, terms) arrays."""
    lv = pl.Series("level", _level_text(levels), dtype=pl.Utf8)
    return pl.concat([pl.DataFrame({"level": lv, "estimate": b[:, a],
                                    "cond_sd": cond_sd[:, a]}).select(
        pl.lit(group).alias("group"), "level", pl.lit(name).alias("term"), "estimate",
        "cond_sd") for a, name in enumerate(names)])


def _level_text(levels) -> np.ndarray | pl.Series:
    """Level labels as text, as `np.asarray(levels).astype(str)` spells them: labels that
    are text already and integers go to polars as they are (10-25x faster at 2M levels
    than through numpy's fixed-width strings), anything else through numpy."""
    arr = np.asarray(levels)
    if arr.dtype.kind in "iu":
        return pl.Series(arr).cast(pl.Utf8)
    if arr.dtype == object:
        try:  # strict: refused unless every label is text already
            return pl.Series("level", arr, dtype=pl.Utf8, strict=True)
        except (pl.exceptions.ComputeError, TypeError, ValueError):
            pass
    return arr.astype(str)


def _named_matrix(names: list[str], m: np.ndarray) -> pl.DataFrame:
    cols = {}
    for j, name in enumerate(names):
        cols[name] = pl.Series(name, np.asarray(m)[:, j], dtype=pl.Float64)
    return pl.DataFrame(cols)


def _correlation(cov: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(d, d)


def _fmt_or_na(v, spec: str) -> str:
    return "NA" if v is None or not math.isfinite(v) else format(v, spec)


def _p_text(p) -> str:
    return "NA" if p is None else "< 2e-16" if p < 2e-16 else f"{p:.3g}"


def _fixed_table(names: list[str], beta: np.ndarray, rx: np.ndarray,
                 s2: float) -> tuple[pl.DataFrame, np.ndarray]:
    """The fixed-effects table (df and p empty until inference fills them) and Var(β̂)."""
    p = len(names)
    vcov = s2 * linalg.cho_solve((rx, False), np.eye(p))
    vcov = (vcov + vcov.T) / 2  # exactly symmetric (the solve is not, in the last bits)
    se = np.sqrt(np.diag(vcov))
    fixed = pl.DataFrame({
        "term": names, "estimate": beta, "std_error": se, "t_value": beta / se,
        "df": [None] * p, "p_value": [None] * p,
    }, schema={"term": pl.Utf8, "estimate": pl.Float64, "std_error": pl.Float64,
               "t_value": pl.Float64, "df": pl.Float64, "p_value": pl.Float64})
    return fixed, vcov


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False when the
    platform cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(stage: Path, out: Path) -> None:
    """Put the complete staged outputs in place of `out` in one step, so that a crash (even
    SIGKILL) leaves either the previous outputs or the new ones, never a mix: a new `out` is
    the staged folder renamed; an existing one is swapped with it atomically (files of
    `out` that are not mlpipe outputs are hard-linked into the stage first, so they stay).
    Where no atomic swap exists the files are moved one by one (each file still whole)."""
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        os.rename(stage, out)
        stage.mkdir()  # the caller removes it
        return
    for f in out.iterdir():
        if f.name not in RESULT_FILES and not (stage / f.name).exists():
            try:
                os.link(f, stage / f.name, follow_symlinks=False)
            except OSError:
                if f.is_dir() and not f.is_symlink():
                    shutil.copytree(f, stage / f.name, symlinks=True)
                else:
                    shutil.copy2(f, stage / f.name, follow_symlinks=False)
    os.chmod(stage, out.stat().st_mode & 0o7777)
    if _exchange(stage, out):
        return  # the stage now holds the previous outputs; the caller removes them
    written = {f.name for f in stage.iterdir()}
    for f in stage.iterdir():
        os.replace(f, out / f.name)
    for name in RESULT_FILES - written:  # no stale file of an earlier run stays
        (out / name).unlink(missing_ok=True)


def check_out_dir(out: Path) -> None:
    """An output directory must be a directory (or not exist yet)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.floating):
        return _clean(float(v))
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _conditional_modes(stats: Statistics, dec: Decomposition, sigma: float) -> pl.DataFrame:
    """b_i = T L_i⁻ᵀ (c_u,i − R_ZX,i β̂); Var(b_i | y) = σ² T (L_i L_i')⁻¹ T'."""
    L, T = dec.L, dec.T
    r = dec.cu - np.tensordot(dec.beta, dec.rzx, axes=(0, 1))  # (q, m)
    b = const_matmul(T, solve_lower_t(L, r))
    # B = L⁻¹ T' per group; Var(b_j) = σ² Σ_k B[k, j]²
    B = solve_lower(L, T.T[:, :, None])
    var = sigma**2 * np.einsum("kjm,kjm->jm", B, B)
    levels = pl.Series("level", stats.levels, dtype=pl.Utf8)  # converted once
    sd = np.sqrt(var)
    return pl.concat([
        pl.DataFrame({"level": levels, "estimate": b[j], "cond_sd": sd[j]}).select(
            pl.lit(stats.group).alias("group"), "level", pl.lit(name).alias("term"),
            "estimate", "cond_sd")
        for j, name in enumerate(stats.random_names)])


# ---------------------------------------------------------------------- the printed summary

def _table(header: list[str], rows: list[list[str]], align_left: int = 1) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    out = []
    for row in [header] + rows:
        cells = [str(c).ljust(w) if i < align_left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        out.append(" " + " ".join(cells).rstrip())
    return out


def _r_decimals(values: list[float], digits: int) -> int:
    """The decimals R's format(x, digits) gives a numeric vector: enough for every element to
    show `digits` significant digits, trailing zeros dropped."""
    need = 0
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    scale = max(finite, default=0.0)
    for v in values:
        # values at the boundary (numerically 0 next to the others) do not set the decimals
        if v is None or not math.isfinite(v) or abs(v) <= 1e-8 * scale:
            continue
        text = f"{v:.{digits}g}"
        if "e" in text:
            mant, exp = text.split("e")
            frac = len(mant.split(".")[1].rstrip("0")) if "." in mant else 0
            need = max(need, frac - int(exp))
        else:
            need = max(need, len(text.split(".")[1].rstrip("0")) if "." in text else 0)
    return min(need, 15)


def r_format(values: list[float], digits: int = 4) -> list[str]:
    """Numbers formatted together as R's format(x, digits = 4) does (lme4's VarCorr print)."""
    d = _r_decimals(values, digits)
    return [f"{v:.{d}f}" for v in values]


def residual_structure_text(rs: dict) -> list[str]:
    """The residual structure as nlme prints it (correlation, variance function)."""
    lines = []
    if rs.get("structure"):
        what = {"ar1": "AR(1) of consecutive rows", "car1": "continuous AR(1), phi^|dt|"}
        lines.append(f"Correlation structure: {what[rs['structure']]} within {rs['group']} "
                     f"by {rs['time']} ({rs['series']} series); Phi {rs['phi']:.6g}")
    if rs.get("variance_by"):
        ratios = rs["variance_ratios"]
        lines.append(f"Variance function: a residual SD per level of {rs['variance_by']} "
                     f"(ratio to the first; Residual is the first's):")
        lines += _table(list(ratios), [[f"{v:.6g}" for v in ratios.values()]], align_left=0)
    return lines


def structure_text(structure: list[dict]) -> str:
    """The factors, largest first, each with how it relates to the larger ones before it
    (`school (30 levels) contains school:class`, or crossed), as detected from the data."""
    parts = []
    for s in structure:
        inner = [k for k, v in s["relations"].items() if v == "nested"]
        crossed = [k for k, v in s["relations"].items() if v == "crossed"]
        text = f"{s['factor']} ({s['levels']} levels, {s['columns']} per level)"
        if inner:
            text += " contains " + ", ".join(inner)
        if crossed:
            text += (" and" if inner else "") + " crossed with " + ", ".join(crossed)
        parts.append(text)
    solver = structure[0].get("solver") if structure else None
    if solver and solver.get("cells"):
        parts.append(f"{solver['cells']:,} cells")
    if solver and solver["order"]:
        kind = "dense" if solver["dense"] else "sparse"
        parts.append(f"solver: Schur complement of order {solver['order']} ({kind}), "
                     f"{solver['update_terms']:,} update terms, about {solver['memory']}")
    return "; ".join(parts)


def r_abbreviate(names: list[str], minlength: int) -> list[str]:
    """R's abbreviate(names, minlength) (method "left.kept", use.classes = TRUE): lower-case
    vowels, then lower-case letters, then any characters are dropped from the right (never a
    word's first character) until `minlength` remains; clashes get a longer abbreviation."""
    def one(text: str, minlen: int) -> str:
        b = list(text.strip())
        if len(b) <= minlen:
            return "".join(b)
        nspace = sum(c.isspace() for c in b)

        def first(i):  # the first character of a word
            return b[i - 1].isspace()

        def last(i):  # the last character of a word
            return not b[i - 1].isspace() and (i + 1 == len(b) or b[i + 1].isspace())

        passes = [lambda c, i: c in "aeiou" and last(i), lambda c, i: c in "aeiou" and not first(i),
                  lambda c, i: c.islower() and last(i), lambda c, i: c.islower() and not first(i),
                  lambda c, i: not first(i) and not c.isspace()]
        for drop in passes:
            for i in range(len(b) - 1, 0, -1):
                if i < len(b) and drop(b[i], i):
                    del b[i]
                if len(b) - nspace <= minlen:
                    break
            if len(b) - nspace <= minlen:
                break
        if len(b) > minlen:
            b = [b[0]] + [c for c in b[1:] if not c.isspace()]
        return "".join(b)

    names = [n.strip() for n in names]
    out = [one(n, minlength) for n in names]
    todo = _duplicated(out)
    while any(todo):
        minlength += 1
        clash = {out[i] for i, d in enumerate(todo) if d}
        todo = [d or o in clash for d, o in zip(todo, out)]
        out = [one(n, minlength) if d else o for n, o, d in zip(names, out, todo)]
        todo = _duplicated(out)
        if minlength > max(len(n) for n in names):
            break
    return out


def _duplicated(xs: list[str]) -> list[bool]:
    seen: set[str] = set()
    flags = []
    for x in xs:
        flags.append(x in seen)
        seen.add(x)
    return flags


def correlation_text(names: list[str], corr: np.ndarray) -> list[str]:
    """lme4's "Correlation of Fixed Effects" block: the lower triangle rounded to 3 decimals,
    rows named abbreviate(names, 11), columns abbreviate(names, 6), left-aligned as R prints a
    character matrix."""
    p = len(names)
    if p < 2:
        return []
    rows, cols = r_abbreviate(names, 11), r_abbreviate(names, 6)
    cells = [[f"{round(float(corr[i, j]), 3):.3f}" for j in range(p)] for i in range(p)]
    width = max(len(c) for row in cells for c in row)
    cells = [[cells[i][j].rjust(width) if j < i else "" for j in range(p - 1)]
             for i in range(1, p)]
    rn = rows[1:]
    rw = max(len(n) for n in rn)
    widths = [max(len(cols[j]), *(len(r[j]) for r in cells)) for j in range(p - 1)]
    out = ["Correlation of Fixed Effects:",
           " " * rw + " " + " ".join(c.ljust(w) for c, w in zip(cols[:-1], widths))]
    for name, r in zip(rn, cells):
        out.append(name.ljust(rw) + " " + " ".join(c.ljust(w) for c, w in zip(r, widths)))
    return [line.rstrip() for line in out]


def _family_text(r: FitResult) -> str:
    """glmer's family label: binomial, poisson, Negative Binomial(θ)."""
    if r.nb_theta is not None:
        return f"Negative Binomial({r.nb_theta:.4g})"
    return "Gamma" if r.family == "gamma" else r.family


def moments_text(rec: dict) -> list[str]:
    """The summary's lines on a fit by the method of moments: the sampling SEs of the
    moment estimates (one or two factors), and of the refined ones their Monte Carlo SEs."""
    lines = []
    if "variance_se" in rec:
        how = ("" if rec["cooccurrence_terms"] == "exact"
               else "; the level co-occurrence terms estimated")
        lines.append("Moment estimates' sampling SEs (Gaussian model" + how + "): " + ", ".join(
            f"{g} {v:.4g} ± {rec['variance_se'][g]:.2g}" for g, v in rec["estimates"].items()))
    else:
        lines.append("Moment estimates' sampling SEs: not computed (three or more factors "
                     "with too many level co-occurrences for the exact products)")
    if "refinement" in rec:
        ref = rec["refinement"]
        lines.append(f"Approximate {ref['criterion']} variances (± Monte Carlo SE): " + ", ".join(
            f"{g} {v:.4g} ± {ref['mc_se'][g]:.2g}" for g, v in ref["sigma2"].items()))
    return lines


def render_summary(r: FitResult, correlation: bool = False) -> str:
    how = {"REML": "REML", "ML": "maximum likelihood",
           "moments": "the method of moments (fixed effects by GLS)"}[r.method]
    if r.moments and "refinement" in r.moments:
        how = (f"the method of moments, refined to approximate "
               f"{r.moments['refinement']['criterion']} (fixed effects by GLS)")
    if r.family is not None:
        approx = ("Laplace Approximation" if r.nagq in (None, 1) else
                  "Laplace Approximation, nAGQ = 0" if r.nagq == 0 else
                  f"Adaptive Gauss-Hermite Quadrature, nAGQ = {r.nagq}")
        lines = [f"Generalized linear mixed model fit by maximum likelihood ({approx}) "
                 f"(mlpipe)", f" Family: {_family_text(r)}  ( {r.link} )",
                 f"Formula: {r.formula}", ""]
        if r.nagq == 0 or getattr(r, "passes", None):  # how it was fitted: in memory or
            # by passes over the data, why, and how many passes
            lines[-1:-1] = [f"  {msg}" for msg in r.optimizer.messages[:2]]
    else:
        lines = [f"Linear mixed model fit by {how} (mlpipe)", f"Formula: {r.formula}", ""]
    if r.method == "moments":
        lines += r.optimizer.messages + ["(no likelihood: no logLik, AIC, BIC or LRT)"]
    elif r.method == "REML":
        lines.append(f"REML criterion at convergence: {r.reml_criterion:.4f}")
    else:
        lines += _table(["AIC", "BIC", "logLik", "deviance", "df.resid"],
                        [[f"{r.aic:.1f}", f"{r.bic:.1f}", f"{r.loglik:.1f}",
                          f"{r.deviance:.1f}", str(r.nobs - r.npar)]], align_left=0)
    if r.residuals is not None:
        lines += ["", str(r.residuals)]
    lines += ["", "Random effects:"]
    corr = {(c["group"], c["term1"], c["term2"]): c["correlation"]
            for c in r.random_correlations.iter_rows(named=True)}
    resid = [] if r.family is not None else [r.residual_variance]
    variances = r_format(r.random_effects["variance"].to_list() + resid)
    sds = r_format(r.random_effects["std_dev"].to_list() + ([] if r.family else [r.sigma]))
    rows = []
    before: list[str] = []  # the earlier terms of the current group
    for i, row in enumerate(r.random_effects.iter_rows(named=True)):
        first = i == 0 or row["group"] != r.random_effects["group"][i - 1]
        if first:
            before = []
        key = lambda t: (row["group"], t, row["term"])  # noqa: E731
        cors = [f"{corr[key(t)]:.2f}" if key(t) in corr else "" for t in before]
        while cors and cors[-1] == "":
            cors.pop()
        rows.append([row["group"] if first else "", row["term"], variances[i], sds[i],
                     " ".join(cors)])
        before.append(row["term"])
    if r.family is None:  # a GLMM's binomial / Poisson response has no residual variance
        rows.append(["Residual", "", variances[-1], sds[-1], ""])
    lines += _table(["Groups", "Name", "Variance", "Std.Dev.", "Corr"], rows, align_left=2)
    if r.residual_structure:
        lines += residual_structure_text(r.residual_structure)
    if r.moments is not None:
        lines += moments_text(r.moments)
    if r.icc is not None:
        lines.append(f"ICC: {r.icc['icc']:.4f} ({100 * r.icc['level']:g}% CI "
                     f"{r.icc['lower']:.4f} to {r.icc['upper']:.4f}, {r.icc['method']})")
    if r.variance_partition:
        lines.append("Variance partition (share of the total variance): " + ", ".join(
            f"{v['group']} {100 * v['proportion']:.1f}%" for v in r.variance_partition))
    groups = "; ".join(f"{g}, {n}" for g, n in r.groups.items())
    lines.append(f"Number of obs: {r.nobs}, groups:  {groups}")
    if r.rows_dropped:
        lines.append(f"({r.rows_dropped} rows with missing values dropped)")
    if r.optimizer.structure:
        lines.append("Random-effects structure: " + structure_text(r.optimizer.structure))
    lines += ["", "Fixed effects:"]
    has_df = r.fixed_effects["df"].null_count() < r.fixed_effects.height
    header = ["", "Estimate", "Std. Error"] + (["df"] if has_df else []) + ["t value"] + \
        (["Pr(>|t|)"] if has_df else [])
    if r.family is not None:  # z tests, as glmer's summary
        header = ["", "Estimate", "Std. Error", "z value", "Pr(>|z|)"]
    rows = []
    # as R's printCoefmat: estimates and SEs share the decimals the estimates need
    decimals = max(_r_decimals(r.fixed_effects["estimate"].to_list(), 5),
                   _r_decimals(r.fixed_effects["std_error"].to_list(), 4))
    for fe in r.fixed_effects.iter_rows(named=True):
        row = [fe["term"], f"{fe['estimate']:.{decimals}f}", f"{fe['std_error']:.{decimals}f}"]
        if has_df:
            row.append(f"{fe['df']:.1f}" if fe["df"] is not None else "NA")
        row.append(f"{fe['t_value']:.3f}")
        if has_df or r.family is not None:
            p = fe["p_value"]
            row.append("NA" if p is None else "< 2e-16" if p < 2e-16 else f"{p:.3g}")
        rows.append(row)
    lines += _table(header, rows)
    if r.df_method:
        lines.append(f"(degrees of freedom and p-values: {r.df_method})")
    if r.thresholds:
        lines += ["", "Threshold coefficients:"]
        lines += _table(["", "Estimate", "Std. Error"],
                        [[t["term"], f"{t['estimate']:.4f}", f"{t['std_error']:.4f}"]
                         for t in r.thresholds])
    if correlation and r.fixed_effects.height > 1:
        lines += [""] + correlation_text(r.fixed_effects["term"].to_list(),
                                         _correlation(r.vcov_matrix))
    if r.confidence_intervals is not None:
        ci = r.confidence_intervals
        method = ci["method"][0]
        note = " — profiles of the ML deviance, as lme4's; estimates are ML" \
            if method == "profile" else ""
        lines += ["", f"{method} confidence intervals ({100 * r.ci_level:g}%{note}):"]
        lines += _table(["", "estimate", "lower", "upper"],
                        [[c["parameter"], f"{c['estimate']:.4g}", f"{c['lower']:.4g}",
                          f"{c['upper']:.4g}"] for c in ci.iter_rows(named=True)])
    if r.family is not None and r.converged:  # a GLMM's diagnostics, in words
        notes = [m for m in r.optimizer.messages[1:] if not m.startswith("boundary")]
        if notes:
            lines += [""] + notes
    if r.singular:
        lines += ["", "boundary (singular) fit: a variance component is estimated as zero"]
    if not r.converged:
        lines += ["", "WARNING: the optimizer did not converge: "
                  + "; ".join([r.optimizer.return_code] + r.optimizer.messages)]
    return "\n".join(lines)
