"""mlpipe: multilevel (linear mixed) models fitted from per-group sufficient statistics.

The pipeline, one module a stage:

    formula.py    lme4 formula  → terms
    design.py     terms + schema → SQL columns of X and Z
    stats.py      one DuckDB scan → per-group sufficient statistics (`Statistics`)
    objective.py  statistics + θ → profiled REML/ML deviance
    optimize.py   bounded BOBYQA over θ
    results.py    `FitResult`: tidy tables, summary, JSON/Parquet outputs
    model.py      `fit()`, the glue

The public names below are imported lazily (PEP 562): `import mlpipe` costs nothing until a
name is used, so the command line starts fast. Submodules (`mlpipe.predict`, `mlpipe.report`,
...) are importable as attributes too.
"""

from __future__ import annotations

import importlib

from .compare import Comparison, compare  # cheap (its polars is lazy); also names the function
from .errors import DataError, FormulaError, InputError, MlpipeError

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "fit": "model", "fit_statistics": "model",
    "compute_statistics": "stats", "Statistics": "stats",
    "parse_formula": "formula",
    "FitResult": "results",
    "icc": "variance", "variance_explained": "variance",
}
_SUBMODULES = {"anova", "blocked", "cli", "compare", "config", "design", "errors", "formula",
               "inference", "model", "objective", "optimize", "predict", "report", "results",
               "glmm", "moments", "residual", "runlog", "simulate", "stats", "store",
               "variance"}

__all__ = ["fit", "fit_statistics", "compute_statistics", "parse_formula", "Statistics",
           "FitResult", "MlpipeError", "InputError", "FormulaError", "DataError", "compare",
           "Comparison", "icc", "variance_explained", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'mlpipe' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
