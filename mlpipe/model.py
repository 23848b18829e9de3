"""The pipeline as glue: formula → statistics (SQL) → objective → optimizer → results.

Each stage is callable alone (`compute_statistics`, `Objective`, `optimize`, `FitResult`);
`fit` strings them together, the way `lmer()` strings lme4's four stages together.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .errors import DataError, InputError
from .objective import Objective
from .optimize import optimize
from .results import FitResult
from .stats import Statistics, compute_statistics

METHODS = ("REML", "ML")


def fit(data: str | os.PathLike[str] | None = None, formula: str | None = None, *,
        method: str = "REML", stats: Statistics | str | os.PathLike[str] | None = None,
        memory_limit: str | None = None, threads: int | None = None,
        temp_directory: str | None = None) -> FitResult:
    """Fit a linear mixed model.

    Either `data` (Parquet file / directory / glob, or CSV) and an lme4 `formula`, or `stats`
    (a `Statistics` value or a saved statistics file) to refit without reading the data.
    """
    method = _check_method(method)
    if stats is None:
        if data is None or formula is None:
            raise InputError("fit needs DATA and a formula, or saved statistics")
        stats = compute_statistics(data, formula, memory_limit=memory_limit, threads=threads,
                                   temp_directory=temp_directory)
    elif not isinstance(stats, Statistics):
        stats = Statistics.load(stats)
    if formula is not None and stats is not None and formula != stats.formula and data is None:
        raise InputError(f"the statistics were built for {stats.formula!r}, not {formula!r}")
    return fit_statistics(stats, method=method)


def fit_statistics(stats: Statistics, *, method: str = "REML") -> FitResult:
    """Fit from sufficient statistics alone."""
    method = _check_method(method)
    validate(stats)
    t0 = time.perf_counter()
    obj = Objective(stats, reml=method == "REML")
    summary = optimize(obj)
    dec = obj.decompose(np.asarray(summary.final_theta))
    result = FitResult.build(stats, obj, dec, summary)
    result.timings = {**stats.timings, "solve": time.perf_counter() - t0}
    return result


def _check_method(method: str) -> str:
    m = str(method).upper()
    if m not in METHODS:
        raise InputError(f"method must be REML or ML, not {method!r}")
    return m


def validate(stats: Statistics) -> None:
    """lme4's checks on the model's dimensions and the fixed-effects design."""
    if stats.m < 2:
        raise DataError(f"grouping factor {stats.group!r} has {stats.m} level; "
                        f"a random effect needs at least 2")
    if stats.m >= stats.n:
        raise DataError(f"grouping factor {stats.group!r} has {stats.m} levels for "
                        f"{stats.n} observations; it must have fewer levels than observations")
    if stats.q * stats.m >= stats.n:
        raise DataError(f"{stats.q * stats.m} random effects ({stats.q} per level of "
                        f"{stats.group!r}) for {stats.n} observations: the random effects are "
                        f"not identifiable; simplify the random part")
    if stats.n <= stats.p:
        raise DataError(f"{stats.p} fixed effects for {stats.n} observations")
    dependent = rank_deficient_columns(stats.xtx)
    if dependent:
        names = ", ".join(stats.fixed_names[j] for j in dependent)
        raise DataError(f"fixed-effects design is rank deficient: {names} "
                        f"{'is a linear combination' if len(dependent) == 1 else 'are linear combinations'} "
                        f"of other columns; drop {'it' if len(dependent) == 1 else 'them'}")


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
