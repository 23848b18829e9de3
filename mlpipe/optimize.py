"""Stage 4: minimize the profiled deviance over θ with bounded BOBYQA (NLopt).

The objective is defensive: a step where it cannot be evaluated returns the initial deviance
instead of inf (as MixedModels.jl does), which keeps BOBYQA's quadratic model sane.  After the
optimizer stops, diagonal θ entries near zero are snapped to the boundary when that does not
make the fit worse, and a finite-difference gradient checks convergence (as lme4 does).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import nlopt
import numpy as np

from .objective import Objective

NLOPT_CODES = {1: "SUCCESS", 2: "STOPVAL_REACHED", 3: "FTOL_REACHED", 4: "XTOL_REACHED",
               5: "MAXEVAL_REACHED", 6: "MAXTIME_REACHED", -1: "FAILURE",
               -2: "INVALID_ARGS", -3: "OUT_OF_MEMORY", -4: "ROUNDOFF_LIMITED", -5: "FORCED_STOP"}
SINGULAR_TOL = 1e-4  # lme4's isSingular() tolerance on diagonal θ


@dataclass
class OptSummary:
    """The optimizer record saved with every fit."""

    optimizer: str
    initial_theta: list[float]
    initial_objective: float
    final_theta: list[float] = field(default_factory=list)
    final_objective: float = float("nan")
    evaluations: int = 0
    return_code: str = ""
    ftol_rel: float = 1e-12
    xtol_abs: float = 1e-10
    maxeval: int = 10000
    reml: bool = True
    seconds: float = 0.0
    max_abs_gradient: float = float("nan")
    converged: bool = False
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def optimize(obj: Objective, *, maxeval: int = 10000, ftol_rel: float = 1e-12,
             xtol_abs: float = 1e-10, theta0: np.ndarray | None = None) -> OptSummary:
    tm = obj.theta_map
    x0 = np.array(tm.initial if theta0 is None else theta0, dtype=float)
    start = time.perf_counter()
    f0 = obj(x0)
    summary = OptSummary("LN_BOBYQA", x0.tolist(), f0, ftol_rel=ftol_rel, xtol_abs=xtol_abs,
                         maxeval=maxeval, reml=obj.reml)
    if not np.isfinite(f0):
        summary.messages.append("the deviance at the initial θ is not finite")
    fallback = f0 if np.isfinite(f0) else 1e300

    best = {"f": np.inf, "x": x0}

    def f(theta, grad):
        v = obj(theta)
        if v < best["f"]:
            best["f"], best["x"] = v, np.array(theta, dtype=float)
        return v if np.isfinite(v) else fallback

    n = len(tm)
    if n == 1:  # BOBYQA needs at least two parameters
        return _bounded_1d(obj, x0, summary, maxeval, start)
    opt = nlopt.opt(nlopt.LN_BOBYQA, n)
    opt.set_min_objective(f)
    opt.set_lower_bounds(tm.lower)
    opt.set_ftol_rel(ftol_rel)
    opt.set_xtol_abs(xtol_abs)
    opt.set_maxeval(maxeval)
    opt.set_initial_step(np.where(tm.diagonal, 0.25, 0.1))
    try:
        x = opt.optimize(x0)
        code = opt.last_optimize_result()
    except nlopt.RoundoffLimited:  # converged as far as floating point allows
        x, code = best["x"], -4
    summary.return_code = NLOPT_CODES.get(code, str(code))
    x = np.asarray(x, dtype=float)
    return _finish(obj, x, summary, start, converged=code in (1, 2, 3, 4, -4))


def _bounded_1d(obj: Objective, x0: np.ndarray, summary: OptSummary, maxeval: int,
                start: float) -> OptSummary:
    """One θ (a single random intercept): bounded Brent search on [0, upper]."""
    from scipy.optimize import minimize_scalar

    summary.optimizer = "brent (bounded)"
    upper = 10.0
    while obj(np.array([upper])) < obj(np.array([upper / 2])) and upper < 1e8:
        upper *= 10.0
    res = minimize_scalar(lambda t: obj(np.array([t])), bounds=(0.0, upper), method="bounded",
                          options={"xatol": 1e-10, "maxiter": maxeval})
    x = np.array([float(res.x)])
    # the bounded search never evaluates exactly at the boundary: compare with it
    if obj(np.array([0.0])) <= obj(x):
        x = np.array([0.0])
    summary.return_code = "SUCCESS" if res.success else str(res.message)
    return _finish(obj, x, summary, start, converged=bool(res.success))


def _finish(obj: Objective, x: np.ndarray, summary: OptSummary, start: float, *,
            converged: bool) -> OptSummary:
    tm = obj.theta_map
    fx = obj(x)
    # snap near-zero diagonal entries to the boundary when the fit is no worse
    small = tm.diagonal & (x < SINGULAR_TOL) & (x != 0)
    if small.any():
        snapped = np.where(small, 0.0, x)
        fs = obj(snapped)
        if fs <= fx + 1e-10:
            x, fx = snapped, fs
    grad = _gradient(obj, x)
    at_bound = tm.diagonal & (x <= 0) & (grad > 0)
    gmax = float(np.max(np.abs(np.where(at_bound, 0.0, grad)))) if len(grad) else 0.0
    summary.final_theta = x.tolist()
    summary.final_objective = float(fx)
    summary.evaluations = obj.evaluations
    summary.seconds = time.perf_counter() - start
    summary.max_abs_gradient = gmax
    summary.converged = bool(converged and np.isfinite(fx))
    if gmax > 1e-6 * max(1.0, abs(fx)):
        summary.messages.append(f"finite-difference gradient at the optimum is {gmax:.2g}")
    return summary


def _gradient(obj: Objective, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    tm = obj.theta_map
    g = np.empty(len(x))
    f0 = obj(x)
    for k in range(len(x)):
        e = np.zeros(len(x))
        step = h * max(1.0, abs(x[k]))
        e[k] = step
        if tm.diagonal[k] and x[k] - step < 0:
            g[k] = (obj(x + e) - f0) / step
        else:
            g[k] = (obj(x + e) - obj(x - e)) / (2 * step)
    return g
