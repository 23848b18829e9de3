"""The pipeline as glue: formula → statistics (SQL) → objective → optimizer → results.

Each stage is callable alone (`compute_statistics`, `Objective`, `optimize`, `FitResult`);
`fit` strings them together, the way `lmer()` strings lme4's four stages together.
"""

from __future__ import annotations

import math
import os
import time

from typing import TYPE_CHECKING

import numpy as np

from . import _dist, _preload, runlog
from ._lazy import lazy_import
from ._malloc import ordinary_pages, reuse_freed_memory
from .errors import DataError, InputError
from .stats import Statistics

if TYPE_CHECKING:
    from .results import FitResult

# the solver's stages, imported when first used: a fit imports them in the background while
# DuckDB scans (`_preload`), so their import time (~0.7 s: scipy, polars, nlopt) overlaps the
# pass over the data instead of preceding it
pl = lazy_import("polars")
_inference = lazy_import("mlpipe.inference")
_objective = lazy_import("mlpipe.objective")
_optimize = lazy_import("mlpipe.optimize")
_results = lazy_import("mlpipe.results")
#: what `fit` imports in the background during the scan (`_preload.during`)
SOLVER_MODULES = ("mlpipe.objective", "mlpipe.optimize", "mlpipe.results", "mlpipe.inference")

METHODS = ("REML", "ML")


def fit(data: str | os.PathLike[str] | None = None, formula: str | None = None, *,
        method: str = "REML", stats: Statistics | str | os.PathLike[str] | None = None,
        ddf: str | None = "satterthwaite", ci: str | None = None, level: float = 0.95,
        memory_limit: str | None = None, threads: int | None = None,
        temp_directory: str | None = None, weights: str | None = None,
        correlation: str | None = None, residual_variance_by: str | None = None,
        family: str | None = None, link: str | None = None, nagq: int = 1,
        engine: str | None = None, workers: int | None = None,
        scheduler: str | None = None, refine: str | None = None,
        keep_on_workers: bool = False) -> FitResult:
    """Fit a linear mixed model.

    Either `data` (Parquet file / directory / glob, or CSV; or data in memory: a polars
    DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table, RecordBatchReader or
    Dataset, a DuckDB relation) and an lme4 `formula`, or `stats` (a `Statistics` value or a
    saved statistics file) to refit without reading the data.
    `ddf`: denominator degrees of freedom of the fixed-effect t tests ("satterthwaite",
    "kenward-roger" or None); `ci`: confidence intervals ("wald", "profile" or None).
    `weights`: a column of case weights (lme4's `weights =`: Var(e_i) = σ² / w_i).
    `correlation`: serially correlated residuals within a series, "ar1(TIME | GROUP)" (nlme's
    corAR1 on rows ordered by TIME) or "car1(TIME | GROUP)" (corCAR1: φ^|Δt|);
    `residual_variance_by`: a column whose levels have their own residual SD (varIdent).
    `family` ("binomial", "poisson") and `link`: a generalized linear mixed model by the
    Laplace approximation (mlpipe/glmm.py; one grouping factor so far), or with `nagq` > 1
    adaptive Gauss-Hermite quadrature (one scalar random effect, as glmer's nAGQ).
    `engine`: what builds the statistics, "duckdb" (default), "polars" or "dask" (with
    `workers` processes of a LocalCluster, or the cluster at `scheduler`); see
    mlpipe/engines; `keep_on_workers` (Dask, one grouping factor): the per-group statistics
    stay on the workers and every evaluation of the criterion maps over them
    (mlpipe/engines/dask_solve.py).  `refine` ("reml", "ml" or "none"): whether a fit by
    the method of moments refines its components to approximate REML / ML
    (mlpipe/moments.py `refine`); by default `method="moments"` does not, and the automatic
    switch to moments (the exact solver does not fit) refines toward `method`.
    """
    from .engines import EngineOptions, get_engine

    eng = get_engine(engine, EngineOptions(threads=threads, memory_limit=memory_limit,
                                           temp_directory=temp_directory, workers=workers,
                                           scheduler=scheduler))
    if eng.name != "duckdb" and (
            (family is not None and str(family).lower() != "gaussian")
            or str(method).upper() == "MOMENTS"):
        raise InputError(f"the {eng.name} engine builds the statistics of linear mixed "
                         f"models; GLMMs and the method of moments run on --engine duckdb")
    if family is not None and str(family).lower() != "gaussian":
        return _fit_glmm(data, formula, family, link, nagq, stats=stats, weights=weights,
                         correlation=correlation, residual_variance_by=residual_variance_by,
                         method=method, ci=check_ci(ci), options=eng.options, level=level)
    method, ddf, ci = check_options(method, ddf, ci, level)  # before any work
    refine = check_refine(refine)
    if keep_on_workers:
        if eng.name != "dask":
            raise InputError("--keep-on-workers keeps the groups on Dask workers: use it "
                             "with --engine dask")
        if stats is not None or data is None or formula is None:
            raise InputError("--keep-on-workers fits DATA and a formula (saved statistics "
                             "are already on this machine: drop --keep-on-workers)")
        if correlation is not None or residual_variance_by is not None:
            raise InputError("--keep-on-workers does not fit residual structures: use "
                             "--engine duckdb")
        from .engines.dask_solve import fit_on_workers

        return fit_on_workers(eng, data, formula, method=method, ddf=ddf, ci=ci, level=level,
                              weights=weights)
    if stats is not None and data is not None:
        raise InputError("give DATA or saved statistics, not both")
    if stats is None and str(method).upper() == "MOMENTS" and data is not None \
            and formula is not None:  # its own pass: never the per-cell statistics
        from .moments import compute_moment_statistics

        if weights is not None or correlation is not None or residual_variance_by is not None:
            raise InputError("the method of moments takes no case weights or residual "
                             "structure")
        if ci == "profile":
            raise InputError("profile intervals need a likelihood: use --ci wald with the "
                             "method of moments")
        ms = compute_moment_statistics(data, formula, options=eng.options)
        runlog.stage("scan", ms.timings.get("scan"), rows=ms.n + ms.rows_dropped,
                     rows_used=ms.n, cells=sum(len(c) for _i, _j, c in ms.pairs.values()),
                     groups={f.name: f.m for f in ms.factors})
        return _fit_moments(ms, ci=ci, level=level, refine=refine)
    if stats is None:
        if data is None or formula is None:
            raise InputError("fit needs DATA and a formula, or saved statistics")
        with _preload.during(_solver_modules(formula)):  # imported during the scan
            stats = eng.statistics(data, formula, weights=weights, correlation=correlation,
                                   residual_variance_by=residual_variance_by)
    elif not isinstance(stats, Statistics):
        stats = Statistics.load(stats)
    if formula is not None and " ".join(formula.split()) != " ".join(stats.formula.split()):
        raise InputError(f"the statistics were built for {stats.formula!r}, not {formula!r}")
    if weights is not None and weights != stats.weights:
        built = f"weights {stats.weights!r}" if stats.weights else "no weights"
        raise InputError(f"the statistics were built with {built}, not weights {weights!r}")
    _check_residual_matches(stats, correlation, residual_variance_by)
    return fit_statistics(stats, method=method, ddf=ddf, ci=ci, level=level,
                          memory_limit=memory_limit, refine=refine)


def _solver_modules(formula: str) -> tuple[str, ...]:
    """The modules the fit of `formula` imports after its scan (`SOLVER_MODULES`; with
    several grouping factors, or one on a combination of columns, the blocked objective's
    too — numba and the sparse solvers — and its compiled kernels, `blocked.warm_up`)."""
    from .formula import parse_formula

    try:
        random = parse_formula(formula).random
    except Exception:  # noqa: BLE001 - the scan reports a bad formula
        return SOLVER_MODULES
    several = len({r.group for r in random}) > 1 or any(len(r.group_columns) > 1
                                                        for r in random)
    return SOLVER_MODULES + (("mlpipe.blocked:warm_up",) if several else ())


def optimizer_progress(obj):
    """A progress line for the optimizer on a terminal: evaluations, current criterion."""
    from . import progress

    def poll():
        value = getattr(obj, "last_value", None)
        crit = "REML criterion" if getattr(obj, "reml", False) else "deviance"
        shown = f", {crit} {value:.6f}" if value is not None and np.isfinite(value) else ""
        return None, f"{obj.evaluations} evaluations{shown}"

    return progress.stage("optimizing", poll=poll)


def fit_config(cfg: dict, **overrides) -> FitResult:
    """Fit what a config names (data and formula, or saved statistics) with its options;
    `overrides` replace config keys (e.g. method="ML", ddf=None, ci=None)."""
    cfg = {**cfg, **overrides}
    if not cfg.get("stats") and not (cfg.get("data") and cfg.get("formula")):
        raise InputError("the config names neither DATA and a formula nor statistics")
    # with saved statistics only the memory limit applies (it bounds the solver)
    duck = cfg.get("duckdb") or {}
    if cfg.get("stats"):
        duck = {k: v for k, v in duck.items() if k == "memory_limit"}
    # saved statistics, when named, are fitted instead of the data (a config may name both:
    # the data for what rereads it, e.g. the report)
    return fit(None if cfg.get("stats") else cfg.get("data"), cfg.get("formula"),
               method=str(cfg.get("method", "REML")),
               stats=cfg.get("stats"), ddf=cfg.get("ddf", "satterthwaite"), ci=cfg.get("ci"),
               level=float(cfg.get("level", 0.95)), weights=cfg.get("weights"),
               correlation=cfg.get("correlation"),
               residual_variance_by=cfg.get("residual_variance_by"),
               family=cfg.get("family"), link=cfg.get("link"),
               nagq=int(cfg.get("nagq", 1)), engine=cfg.get("engine"),
               refine=cfg.get("refine"),
               **({} if cfg.get("stats") else dict(cfg.get("dask") or {})), **duck)


def fit_statistics(stats: Statistics, *, method: str = "REML",
                   ddf: str | None = "satterthwaite", ci: str | None = None,
                   level: float = 0.95, memory_limit: str | None = None,
                   refine: str | None = None) -> FitResult:
    """Fit from sufficient statistics alone.  `memory_limit` (as DuckDB spells it, e.g.
    "4GB") bounds the solver of models with several grouping factors: a structure whose
    estimated solver memory exceeds it (or the machine's memory) is refused up front, and
    random-intercept models are then fitted by the method of moments (`refine`: see
    `fit`)."""
    method, ddf, ci = check_options(method, ddf, ci, level)
    refine = check_refine(refine)
    validate(stats)
    if method == "moments":
        return _fit_moments(stats, ci=ci, level=level, refine=refine)
    check_general_options(stats, ddf, ci)
    with ordinary_pages():  # the build's and the results' large arrays: mlpipe/_malloc.py
        return _fit_exact(stats, method=method, ddf=ddf, ci=ci, level=level,
                          memory_limit=memory_limit, refine=refine)


def _fit_exact(stats: Statistics, *, method: str, ddf: str | None, ci: str | None,
               level: float, memory_limit: str | None, refine: str | None) -> FitResult:
    """`fit_statistics` by REML or ML (the options checked): the residual structure's ψ̂
    first when there is one, the optimizer, the results and the inference.  The stages
    that evaluate the objective again and again (ψ̂, the optimizer, the inference) keep
    their freed temporaries for reuse (`reuse_freed_memory`); the objective's build and the
    results do not, so their one-off garbage does not stay in the heap beside them."""
    reml = method == "REML"
    t0 = time.perf_counter()
    structure, theta0 = None, None
    if stats.residual is not None:  # ψ̂ (with θ), then the fit of θ at ψ̂ from there
        with reuse_freed_memory():
            stats, structure, theta0 = _estimate_residual(stats, ci, reml=reml,
                                                          memory_limit=memory_limit)
    try:
        obj = make_objective(stats, reml=reml, memory_limit=memory_limit)
    except InputError as exc:  # too large for the exact solver: moments, if they apply
        if not (str(exc).startswith("the random-effects structure needs about")
                and _moments_apply(stats)):
            raise
        return _fit_moments(stats, ci=ci, level=level,
                            refine=method.lower() if refine is None else refine,
                            reason=f"{method} not attempted: {exc}".split("; simplify")[0]
                            + "; fitted by the method of moments instead")
    with optimizer_progress(obj), reuse_freed_memory():
        summary = _optimize.optimize(obj, method=obj.default_method, theta0=theta0)
        dec = obj.decompose(np.asarray(summary.final_theta))
    build = _results.FitResult.build_general if stats.general else _results.FitResult.build
    result = build(stats, obj, dec, summary)
    if structure is not None:
        result.residual_structure = structure
        k = stats.residual.n_params
        result.npar += k
        result.aic += 2 * k
        result.bic += k * np.log(stats.n)
    t1 = time.perf_counter()
    runlog.stage("solve", t1 - t0, evaluations=summary.evaluations,
                 converged=summary.converged, criterion=summary.final_objective)
    with reuse_freed_memory():
        add_inference(result, ddf=ddf, ci=ci, level=level, obj=obj)
    result.timings = {**stats.timings, "solve": t1 - t0,
                      "inference": time.perf_counter() - t1}
    runlog.stage("inference", result.timings["inference"], ddf=result.df_method)
    return result


def _fit_glmm(data, formula, family, link, nagq, *, stats, weights, correlation,
              residual_variance_by, method, ci, options, level: float = 0.95) -> FitResult:
    """A GLMM (mlpipe/glmm.py): the data compressed to covariate patterns, the Laplace fit."""
    from .glmm import compress, fit_glmm

    if stats is not None or data is None or formula is None:
        raise InputError("a GLMM needs DATA and a formula (saved statistics are Gaussian)")
    if weights is not None or correlation is not None or residual_variance_by is not None:
        raise InputError("GLMMs take no case weights or residual structure yet")
    if str(method).upper() not in ("REML", "ML"):
        raise InputError(f"method {method!r}: GLMMs are fitted by maximum likelihood")
    if ci == "profile":
        raise InputError("profile intervals for GLMMs are not done yet: use --ci wald")
    from .glmm import TooManyPatterns

    nagq = int(nagq)
    if nagq < 0:
        raise InputError(f"--nagq must be a whole number >= 0, not {nagq}")
    try:
        pat = compress(data, formula, family, link=link, options=options)
    except TooManyPatterns as exc:  # continuous predictors at scale: PIRLS by passes
        return _fit_glmm_passes(data, formula, family, link, nagq, options, ci, level,
                                reason=str(exc))
    runlog.stage("scan", pat.timings["scan"], rows=pat.nobs + pat.rows_dropped,
                 rows_used=pat.nobs, cells=len(pat.n),
                 groups={f[0]: len(f[1]) for f in pat.factors})
    if nagq == 0:
        from .glmm_passes import PatternPasses, fit_passes

        t0 = time.perf_counter()
        result = fit_passes(PatternPasses(pat), messages=[
            f"{len(pat.n):,} covariate patterns of {pat.nobs:,} rows (the data compressed "
            f"once: exact); the passes run over them in memory"])
        result.rows_dropped = pat.rows_dropped
        result.timings = {**pat.timings, "solve": time.perf_counter() - t0, "inference": 0.0}
    else:
        result = fit_glmm(pat, nagq=nagq)
    runlog.stage("solve", result.timings["solve"], family=result.family,
                 evaluations=result.optimizer.evaluations)
    if ci == "wald":
        _wald_intervals(result, level)
    return result


def _fit_glmm_passes(data, formula, family, link, nagq, options, ci, level, *,
                     reason: str):
    """A GLMM too large to compress: Laplace (nAGQ = 1) or nAGQ = 0 by iterated DuckDB passes
    (mlpipe/glmm_passes.py)."""
    from .glmm_passes import SqlPasses, fit_passes

    if nagq > 1:
        raise InputError(f"{reason}; adaptive quadrature (--nagq {nagq}) needs the in-memory "
                         f"path: round continuous predictors or use --nagq 0 or 1")
    if nagq == 1 and (link or "").lower() not in ("", "logit", "log"):
        raise InputError(f"{reason}; the Laplace fit by passes takes the canonical links "
                         f"(logit, log) so far: use --nagq 0 with --link {link}")
    t0 = time.perf_counter()
    src = SqlPasses(data, formula, family, link, options=options)
    try:
        t1 = time.perf_counter()
        runlog.stage("prepare", t1 - t0)
        result = fit_passes(src, nagq=nagq,
                            messages=[f"{reason}: fitted by iterated passes over the data"])
    finally:
        src.close()
    result.timings = {"prepare": t1 - t0, "scan": 0.0, "solve": time.perf_counter() - t1,
                      "inference": 0.0}
    runlog.stage("solve", result.timings["solve"], family=result.family, passes=src.passes,
                 evaluations=result.optimizer.evaluations)
    if ci == "wald":
        _wald_intervals(result, level)
    return result


def _moments_apply(stats: Statistics) -> bool:
    """Random intercepts only, no weights, no residual structure (mlpipe/moments.py)."""
    factors = stats.factors if stats.general else []
    return (not stats.weights and stats.residual is None
            and (all(f.names == ["(Intercept)"] for f in factors) if stats.general
                 else stats.random_names == ["(Intercept)"]))


def _wald_intervals(result: FitResult, level: float) -> None:
    """Normal-theory intervals β ± z·SE of the fixed effects (fits without a likelihood
    profile or t df: moments, GLMMs), as `confint(method = "Wald")`."""
    se = result.fixed_effects["std_error"].to_numpy()
    beta = result.fixed_effects["estimate"].to_numpy()
    z = _dist.norm_ppf(0.5 + level / 2)
    result.confidence_intervals = pl.DataFrame({
        "parameter": result.fixed_effects["term"], "estimate": beta,
        "lower": beta - z * se, "upper": beta + z * se, "method": "Wald"})
    result.ci_level = level


def check_refine(refine: str | None) -> str | None:
    """None (the default: see `fit`), "reml", "ml" or "none"."""
    if refine is None:
        return None
    r = str(refine).lower()
    if r not in ("reml", "ml", "none"):
        raise InputError(f"refine must be reml, ml or none, not {refine!r}")
    return r


def _fit_moments(stats, *, ci: str | None, level: float, refine: str | None = None,
                 reason: str | None = None) -> FitResult:
    """The method of moments with GLS fixed effects (mlpipe/moments.py): t statistics
    without df (there is no likelihood for Satterthwaite), Wald intervals on request (of
    the unrefined variance components too, `_moment_intervals`).  `refine`: "reml" /
    "ml" refines the components."""
    from .moments import fit_moments

    if ci == "profile":
        raise InputError("profile intervals need a likelihood: use --ci wald with the method "
                         "of moments")
    t0 = time.perf_counter()
    result = fit_moments(stats, reason=reason,
                         refine_with={"reml": "REML", "ml": "ML"}.get(refine or "none"))
    if ci == "wald":
        _wald_intervals(result, level)
        _moment_intervals(result, level)
    result.timings = {**(stats.timings or {}), "solve": time.perf_counter() - t0,
                      "inference": 0.0}
    runlog.stage("solve", result.timings["solve"], method="moments",
                 evaluations=result.optimizer.evaluations)
    return result


def _moment_intervals(result: FitResult, level: float) -> None:
    """Wald intervals of the variance components of a fit by moments, without refinement
    (the refined components have no sampling variance yet): σ̂²_k ± z·SE on the variance
    scale (SE: the Gaussian-model sampling SE, mlpipe/moments.py `moment_covariance`),
    the lower end cut at 0, as SDs with lme4's names (sd_(Intercept)|g, sigma)."""
    rec = result.moments or {}
    if "variance_se" not in rec or "refinement" in rec:
        return
    z = _dist.norm_ppf(0.5 + level / 2)
    rows = []
    for g, v in rec["estimates"].items():
        se = rec["variance_se"][g]
        rows.append({"parameter": "sigma" if g == "Residual" else f"sd_(Intercept)|{g}",
                     "estimate": math.sqrt(v), "lower": math.sqrt(max(v - z * se, 0.0)),
                     "upper": math.sqrt(v + z * se), "method": "Wald (moments)"})
    result.confidence_intervals = pl.concat([pl.DataFrame(rows), result.confidence_intervals],
                                            how="vertical_relaxed")


def _estimate_residual(stats: Statistics, ci: str | None, *, reml: bool,
                       memory_limit: str | None) -> tuple[Statistics, dict, np.ndarray]:
    """ψ̂ of the residual structure (mlpipe/residual.py) → (the statistics whitened at ψ̂,
    what result.json records of it, θ̂ there)."""
    from . import residual

    if ci == "profile":
        raise InputError("profile confidence intervals are not available with a residual "
                         "correlation or variance structure; use --ci wald")

    def make(st: Statistics):
        return make_objective(st, reml=reml, memory_limit=memory_limit)

    def inner(st: Statistics, theta0):
        obj = make(st)
        # the BOBYQA guard of boundary answers runs once, in the fit at ψ̂
        summary = _optimize.optimize(obj, method=obj.default_method, theta0=theta0, guard=False)
        return summary.final_objective, np.asarray(summary.final_theta)

    # θ and ψ together (Newton), from θ̂ at ψ's start; should that fail, ψ by a search
    # over the profiled criterion (each value an optimization of θ)
    psi, record = residual.estimate_joint(stats, make, _optimize.optimize)
    theta = np.asarray(record.pop("theta"))
    if psi is None:
        psi, fallback = residual.estimate(stats, inner)
        record, theta = {**fallback, "joint": record}, None
    whitened = residual.at(stats, psi)
    return whitened, {**whitened.residual.describe(psi), "optimizer": record}, theta


def _check_residual_matches(stats: Statistics, correlation: str | None,
                            variance_by: str | None) -> None:
    """Options given with saved statistics must be those the statistics were built with."""
    from .residual import parse_spec

    if correlation is None and variance_by is None:
        return
    asked = parse_spec(correlation, variance_by)
    built = stats.residual.spec if stats.residual is not None else None
    if asked != built:
        raise InputError(f"the statistics were built with residual structure "
                         f"{built.to_dict() if built else None}, not {asked.to_dict()}")


def make_objective(stats: Statistics, *, reml: bool, memory_limit: str | None = None):
    """The objective, with storage chosen by structure: one factor on one column → the
    uniform block-diagonal `Objective` (batched per group); several factors (or one on a
    combination of columns) → the two-stage `BlockedObjective` over their cells."""
    if stats.general:
        from .blocked import BlockedObjective  # numba and the sparse solvers: only here

        return BlockedObjective(stats, reml=reml, memory_limit=memory_limit)
    return _objective.Objective(stats, reml=reml)


def check_general_options(stats: Statistics, ddf: str | None, ci: str | None) -> None:
    """Options a model with several grouping factors cannot have, refused before any work:
    Kenward-Roger above KR_MAX_RANDOM_EFFECTS random effects."""
    from .inference import KR_MAX_RANDOM_EFFECTS

    if not stats.general:
        return
    q_total = sum(f.m * f.q for f in stats.factors)
    if ddf == "kenward-roger" and q_total > KR_MAX_RANDOM_EFFECTS:
        raise InputError(f"Kenward-Roger is limited to {KR_MAX_RANDOM_EFFECTS} random effects "
                         f"for several grouping factors; this model has {q_total}: use --ddf "
                         f"satterthwaite")


def add_inference(result: FitResult, *, ddf: str | None, ci: str | None,
                  level: float = 0.95, obj=None) -> None:
    """Fill df / p-values (and confidence intervals) of a fitted result.

    One factor: Satterthwaite and Kenward-Roger by per-group Woodbury algebra.  Several
    factors (`obj`, the fit's `BlockedObjective`): Satterthwaite from its exact gradients
    (lmerTest's definition), Kenward-Roger by Q-dimensional Woodbury algebra, Wald
    intervals with lme4's unadjusted vcov (as confint(method = "Wald")).  Profile intervals
    as lme4's for both."""
    from .inference import kenward_roger_general

    stats, reml = result.stats, result.method == "REML"
    general = stats.general
    if general and obj is None:
        obj = make_objective(stats, reml=reml)
    beta = result.fixed_effects["estimate"].to_numpy()
    if ddf is not None:
        if ddf == "kenward-roger":
            res = kenward_roger_general(obj, result.theta, result.sigma, beta) if general \
                else _inference.kenward_roger(stats, result.theta, result.sigma, beta)
        elif general:
            res = _inference.satterthwaite_general(obj, result.theta, result.sigma, beta)
        else:
            res = _inference.satterthwaite(stats, result.theta, result.sigma, beta, reml=reml,
                                           obj=obj)
        set_ddf(result, res)
    if ci == "wald":
        se = np.sqrt(np.diag(result.vcov)) if general \
            else result.fixed_effects["std_error"].to_numpy()
        result.confidence_intervals = _inference.wald_intervals(
            stats, result.theta, result.sigma, beta, se, reml=reml, level=level)
    elif ci == "profile":
        result.confidence_intervals = _inference.profile_intervals(stats, level=level)
    result.ci_level = level if ci else None
    if not general and result.residual_structure is None:
        result.icc = _inference.icc_or_none(result, level)


def set_ddf(result: FitResult, res) -> None:
    """A `DdfResult`'s SEs, t values, df and p-values into the fixed-effects table."""
    result.fixed_effects = result.fixed_effects.with_columns(
        pl.Series("std_error", res.std_error), pl.Series("t_value", res.t_value),
        pl.Series("df", res.df), pl.Series("p_value", res.p_value))
    result.df_method = res.method


def check_options(method: str, ddf: str | None, ci: str | None, level: float):
    """Validated (method, ddf, ci); raises InputError naming the bad option."""
    method, ddf, ci = _check_method(method), check_ddf(ddf), check_ci(ci)
    if ddf == "kenward-roger" and method != "REML":
        raise InputError("Kenward-Roger degrees of freedom need a REML fit")
    if isinstance(level, bool) or not isinstance(level, (int, float)) \
            or not 0 < float(level) < 1:
        raise InputError(f"confidence level must be between 0 and 1, not {level!r}")
    return method, ddf, ci


def check_ddf(ddf: str | None) -> str | None:
    """The ddf option's canonical name ("satterthwaite", "kenward-roger") or None."""
    if ddf is None:
        return None
    key = str(ddf).lower().replace("_", "-").replace(" ", "-")
    if key in ("none", "no", "false"):
        return None
    if key in ("kr", "kenward"):
        key = "kenward-roger"
    if key not in ("satterthwaite", "kenward-roger"):
        raise InputError(f"ddf must be satterthwaite, kenward-roger or none, not {ddf!r}")
    return key


def check_ci(ci: str | None) -> str | None:
    if ci is None or str(ci).lower() in ("none", "no", "false"):
        return None
    if str(ci).lower() not in ("wald", "profile"):
        raise InputError(f"ci must be wald, profile or none, not {ci!r}")
    return str(ci).lower()


def _check_method(method: str) -> str:
    m = str(method).upper()
    if m == "MOMENTS":
        return "moments"
    if m not in METHODS:
        raise InputError(f"method must be REML, ML or moments, not {method!r}")
    return m


def validate(stats: Statistics, *, groups: int | None = None,
             within: float | None = None) -> None:
    """lme4's checks on the model's dimensions and the fixed-effects design.  `groups` and
    `within` for statistics whose groups are elsewhere (the Dask workers: `stats` holds the
    totals): the number of groups and the response's sum of squares within them (None when
    Z has no intercept)."""
    _validate_factors(stats, groups)
    if stats.n <= stats.p:
        raise DataError(f"{stats.p} fixed effects for {stats.n} observations")
    _check_response_varies(stats, within, groups is not None)
    dependent = rank_deficient_columns(stats.xtx)
    if dependent:
        names = ", ".join(stats.fixed_names[j] for j in dependent)
        one = len(dependent) == 1
        raise DataError(f"fixed-effects design is rank deficient: {names} "
                        f"{'is a linear combination' if one else 'are linear combinations'} "
                        f"of other columns; drop {'it' if one else 'them'}")


#: relative tolerance of "constant": the sum of squares about the mean(s) below this fraction
#: of y'y (DuckDB's sums of 1e7 copies of a constant leave ~3e-13; an outcome that varies
#: less than this keeps no significant digit in y'y − (Σy)²/n anyway)
CONSTANT_RTOL = 1e-11


def _response_sums(stats: Statistics) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per group (one factor) or per cell (several): n, Σy and y'y, when the statistics
    hold Σy (an intercept in Z); otherwise None."""
    if "(Intercept)" not in stats.random_names:
        return None
    a = stats.random_names.index("(Intercept)")
    return stats.ztz[a, a], stats.zty[a], stats.yty_i  # ztz[a, a]: n_i (Σ w_i if weighted)


def _total_sum_y(stats: Statistics) -> float | None:
    """Σy over the rows used: from X'y (an intercept in X) or from Z'y (one in Z)."""
    if "(Intercept)" in stats.fixed_names:
        return float(stats.xty[stats.fixed_names.index("(Intercept)")])
    sums = _response_sums(stats)
    return None if sums is None else float(sums[1].sum())


def _constant(ss_about_mean: float, raw_ss: float) -> bool:
    return ss_about_mean <= CONSTANT_RTOL * raw_ss


def _check_response_varies(stats: Statistics, within: float | None = None,
                           elsewhere: bool = False) -> None:
    """lme4 refuses a constant response; a response constant within every level of a
    grouping factor (e.g. the factor is the outcome itself) leaves no residual variance to
    estimate.  Both read off n, Σy and y'y (in total, per level)."""
    total = _total_sum_y(stats)
    if total is None:  # neither X nor Z has an intercept: Σy is not in the statistics
        return
    yty, n = float(stats.yty), float(stats.n)
    if stats.weights:  # weighted sums: Σ w in place of n
        k = stats.fixed_names.index("(Intercept)") if "(Intercept)" in stats.fixed_names \
            else None
        n = float(stats.xtx[k, k]) if k is not None else float(_response_sums(stats)[0].sum())
    if total != 0 and not yty > np.finfo(float).tiny * n:
        raise DataError(f"outcome {stats.response!r} is too small in magnitude (mean "
                        f"{total / n:.3g}): its squares underflow double precision; rescale it")
    if _constant(yty - total * total / n, yty):
        raise DataError(f"outcome {stats.response!r} is constant in the rows used (every "
                        f"value is {total / n:.6g}); a mixed model needs a varying outcome")
    if elsewhere:  # the groups' sums are on the workers: their within-group total
        if within is not None and _constant(within, yty):
            _constant_within(stats, stats.group, [stats.group])
        return
    sums = _response_sums(stats)
    if sums is None:
        return
    n_c, sy_c, yty_c = sums
    factors = [(f.name, f.index, f.columns, f.m) for f in stats.factors
               if "(Intercept)" in [stats.random_names[z] for z in f.z]] if stats.general \
        else [(stats.group, np.arange(stats.m), [stats.group], stats.m)]
    for name, index, columns, m in factors:
        within = within_sum_of_squares(*(np.bincount(index, v, minlength=m)
                                         for v in (n_c, sy_c, yty_c)))
        if _constant(within, yty):
            _constant_within(stats, name, columns)


def within_sum_of_squares(n: np.ndarray, sy: np.ndarray, yty: np.ndarray) -> float:
    """Σ_l (y'y_l − (Σy)_l² / n_l): the response's sum of squares within levels, from each
    level's n (Σ w if weighted), Σy and y'y."""
    return float(np.sum(yty - sy * sy / np.where(n > 0, n, 1)))


def group_sum_of_squares(stats: Statistics) -> float | None:
    """`within_sum_of_squares` over the groups of one-factor statistics (None when Z has no
    intercept, so the statistics hold no per-group Σy)."""
    sums = _response_sums(stats)
    return None if sums is None else within_sum_of_squares(*sums)


def _constant_within(stats: Statistics, name: str, columns: list[str]):
    what = (f"the grouping factor {name!r} is the outcome"
            if stats.response in columns else f"grouping factor {name!r}")
    raise DataError(f"{what}: outcome {stats.response!r} is constant within every "
                    f"level of {name!r}, so the residual variance is not "
                    f"identifiable; group by another column")


def _validate_factors(stats: Statistics, groups: int | None = None) -> None:
    """lme4's dimension checks: every factor has 2 or more levels and fewer levels than
    observations, and there are fewer random effects than observations."""
    factors = [(f.name, f.m, f.q) for f in stats.factors] if stats.general \
        else [(stats.group, stats.m if groups is None else groups, stats.q)]
    for name, m, _q in factors:
        if m < 2:
            raise DataError(f"grouping factor {name!r} has {m} level; a random effect "
                            f"needs at least 2")
        if m >= stats.n:
            raise DataError(f"grouping factor {name!r} has {m} levels for {stats.n} "
                            f"observations; it must have fewer levels than observations")
    total = sum(m * q for _name, m, q in factors)
    if total >= stats.n:
        per = f" ({factors[0][2]} per level of {factors[0][0]!r})" if len(factors) == 1 else ""
        raise DataError(f"{total} random effects{per} for {stats.n} observations: the random "
                        f"effects are not identifiable; simplify the random part")


def rank_deficient_columns(xtx: np.ndarray, tol: float = 1e-9) -> list[int]:
    """Columns of X that are (numerically) linear combinations of the columns before them."""
    d = np.sqrt(np.clip(np.diag(xtx), 0, None))
    keep: list[int] = []
    dependent: list[int] = []
    for j in range(len(d)):
        if d[j] == 0:
            dependent.append(j)
            continue
        idx = keep + [j]
        sub = xtx[np.ix_(idx, idx)] / np.outer(d[idx], d[idx])
        # the squared norm of the part of column j not explained by the kept columns
        if keep:
            a = sub[:-1, :-1]
            b = sub[:-1, -1]
            resid = 1.0 - b @ np.linalg.solve(a, b)
        else:
            resid = 1.0
        if resid < tol:
            dependent.append(j)
        else:
            keep.append(j)
    return dependent
