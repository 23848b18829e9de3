"""mlpipe: multilevel (linear mixed) models fitted from per-group sufficient statistics.

The pipeline, one module a stage:

    formula.py    lme4 formula  → terms
    design.py     terms + schema → SQL columns of X and Z
    stats.py      one DuckDB scan → per-group sufficient statistics (`Statistics`)
    objective.py  statistics + θ → profiled REML/ML deviance
    optimize.py   bounded BOBYQA over θ
    results.py    `FitResult`: tidy tables, summary, JSON/Parquet outputs
    model.py      `fit()`, the glue
"""

from .compare import Comparison, compare
from .errors import DataError, FormulaError, InputError, MlpipeError
from .formula import parse_formula
from .model import fit, fit_statistics
from .results import FitResult
from .stats import Statistics, compute_statistics
from .variance import icc, variance_explained

__all__ = ["fit", "fit_statistics", "compute_statistics", "parse_formula", "Statistics",
           "FitResult", "MlpipeError", "InputError", "FormulaError", "DataError", "compare",
           "Comparison", "icc", "variance_explained"]
__version__ = "0.1.0"
