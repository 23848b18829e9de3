"""Stage 4: minimize the profiled deviance over θ (lower bounds 0 on the diagonal of T).

The default ("newton") is a projected Newton method on the exact gradient of the objective
(`Objective.value_and_gradient`) with a finite-difference Hessian of that gradient, started
from the better of lme4's default θ and a moment estimate (`Objective.moment_start`):

* each iteration evaluates the gradient at θ and at θ + h e_j for the free coordinates j
  (the Hessian), takes the Newton step on the free coordinates (regularized if the Hessian
  is not positive definite), projects it onto the bounds and backtracks until the deviance
  decreases (Armijo);
* a diagonal θ at its bound 0 whose gradient pushes outward is held fixed (active set);
* it stops when the predicted decrease (half the Newton decrement) is below the deviance's
  floating-point resolution, or when no step can improve the deviance any more.

At 10⁵ groups one evaluation costs milliseconds, and from the moment estimate Newton needs a
handful of iterations where derivative-free BOBYQA needs 50-100 evaluations.  Should Newton
fail (a non-finite deviance, no convergence within its iteration limit, a gradient that does
not vanish at its answer), bounded BOBYQA (NLopt) takes over from the best point seen —
`optimize(obj, method="bobyqa")` uses BOBYQA alone.  A single θ is minimized by bounded
Brent search.

After the optimizer stops, diagonal θ entries near zero are snapped to the boundary when that
does not make the fit worse, and the gradient at the answer (analytic) checks convergence,
as lme4 does.
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
METHODS = ("newton", "bobyqa")
NEWTON_MAXITER = 100


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
    gradient_evaluations: int = 0
    start: str = "default"  # where θ started: "default", "moments" or "given"

    def to_dict(self) -> dict:
        return asdict(self)


def optimize(obj: Objective, *, maxeval: int = 10000, ftol_rel: float = 1e-12,
             xtol_abs: float = 1e-10, theta0: np.ndarray | None = None,
             method: str = "newton") -> OptSummary:
    """Minimize the deviance; then escape the spurious stationary points of the Cholesky
    parameterization: where a diagonal θ_jj is 0, negating the entries below it in column j
    gives the same covariance but the opposite ∂d/∂θ_jj, so a point held at the bound with
    an outward gradient may not be a minimum at all.  Optimization restarts from the flipped
    point while that lowers the deviance."""
    kw = dict(maxeval=maxeval, ftol_rel=ftol_rel, xtol_abs=xtol_abs, method=method)
    summary = _optimize_once(obj, theta0=theta0, **kw)
    for _ in range(len(obj.theta_map)):
        flipped = _flipped_boundary_point(obj, np.asarray(summary.final_theta))
        if flipped is None:
            break
        trial = _optimize_once(obj, theta0=flipped, **kw)
        if not trial.final_objective < summary.final_objective - 1e-10 * max(
                1.0, abs(summary.final_objective)):
            break
        trial.initial_theta, trial.initial_objective = (summary.initial_theta,
                                                        summary.initial_objective)
        trial.start = summary.start
        trial.messages.append(f"restarted from the sign-flipped equivalent of the boundary "
                              f"point θ = {np.round(summary.final_theta, 6).tolist()} "
                              f"(deviance {summary.final_objective:.6f})")
        summary = trial
    return summary


def _flipped_boundary_point(obj: Objective, x: np.ndarray) -> np.ndarray | None:
    """x with the below-diagonal entries of every zero-diagonal column of T negated, when
    that turns the gradient of some such θ_jj inward (else None)."""
    tm = obj.theta_map
    rows, cols = np.asarray(tm.rows), np.asarray(tm.cols)
    flipped = x.copy()
    zero_diag = [k for k in range(len(x)) if tm.diagonal[k] and x[k] == 0]
    changed = False
    for k in zero_diag:
        below = (cols == cols[k]) & (rows > rows[k]) & (x != 0)
        if below.any():
            flipped[below] = -flipped[below]
            changed = True
    if not changed:
        return None
    f, g = obj.value_and_gradient(flipped)
    if not np.isfinite(f) or not any(g[k] < 0 for k in zero_diag):
        return None
    return flipped


def _optimize_once(obj: Objective, *, maxeval: int, ftol_rel: float, xtol_abs: float,
                   theta0: np.ndarray | None, method: str) -> OptSummary:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    tm = obj.theta_map
    start = time.perf_counter()
    x0, f0, origin = _starting_value(obj, theta0)
    summary = OptSummary("LN_BOBYQA", x0.tolist(), f0, ftol_rel=ftol_rel, xtol_abs=xtol_abs,
                         maxeval=maxeval, reml=obj.reml, start=origin)
    if not np.isfinite(f0):
        summary.messages.append("the deviance at the initial θ is not finite")

    if len(tm) == 1:  # one θ (a single random intercept): Brent
        return _bounded_1d(obj, x0, summary, maxeval, start)

    if method == "newton" and np.isfinite(f0):
        summary.optimizer = "newton"
        x, fx, g, code = _newton(obj, x0, f0, ftol_rel=ftol_rel, maxeval=maxeval)
        if code in ("SUCCESS", "ROUNDOFF_LIMITED") and _gradient_ok(obj, x, fx, g):
            summary.return_code = code
            return _finish(obj, x, summary, start, converged=True, fx=fx, grad=g)
        summary.messages.append(f"newton stopped with {code}; BOBYQA continued from its "
                                f"best point")
        summary.optimizer = "newton+LN_BOBYQA"
        x0, f0 = x, fx
    return _bobyqa(obj, x0, f0, summary, start, maxeval, ftol_rel, xtol_abs)


def _starting_value(obj: Objective, theta0) -> tuple[np.ndarray, float, str]:
    """The given θ, else the better of lme4's default and the moment estimate."""
    tm = obj.theta_map
    if theta0 is not None:
        x0 = np.array(theta0, dtype=float)
        return x0, obj(x0), "given"
    x0 = np.array(tm.initial, dtype=float)
    f0 = obj(x0)
    if len(tm) == 1:  # Brent brackets the whole range anyway
        return x0, f0, "default"
    mom = obj.moment_start()
    if mom is not None:
        mom = np.maximum(mom, tm.lower)
        fm = obj(mom)
        if np.isfinite(fm) and not fm > f0:
            return mom, fm, "moments"
    return x0, f0, "default"


# ---------------------------------------------------------------------- projected Newton

def _newton(obj: Objective, x: np.ndarray, fx: float, *, ftol_rel: float, maxeval: int,
            maxiter: int = NEWTON_MAXITER):
    """Projected Newton on the analytic gradient → (x, f, g, code).

    The Hessian is a finite difference of the gradient; after a full Newton step with an
    unchanged active set it is updated by BFGS instead of being recomputed (near the optimum
    the function is almost quadratic and the update keeps Newton's fast convergence at one
    gradient per iteration).
    """
    tm = obj.theta_map
    lower = tm.lower
    k = len(x)
    f, g = obj.value_and_gradient(x)
    if not np.isfinite(f) or not np.all(np.isfinite(g)):
        return x, fx, g, "FAILURE"
    evals0 = obj.evaluations
    H = None  # Hessian over `free` (FD, or BFGS-updated)
    free_prev = None
    updates = 0  # BFGS updates since the last finite-difference Hessian
    for _ in range(maxiter):
        if obj.evaluations - evals0 > maxeval:
            return x, f, g, "MAXEVAL_REACHED"
        # the active set: at the bound with the gradient pushing outward
        at_bound = (x <= lower) & (g > 0)
        free = np.flatnonzero(~at_bound)
        if len(free) == 0:
            return x, f, g, "SUCCESS"
        fresh = H is None or free_prev is None or not np.array_equal(free, free_prev) \
            or updates >= 5
        if fresh:
            updates = 0
            H = _hessian(obj, x, g, free)
            if H is None:
                return x, f, g, "FAILURE"
        gf = g[free]
        d_free = _newton_direction(H, gf)
        decrement = float(-gf @ d_free)  # g'H⁻¹g > 0 for a descent direction
        tol = max(ftol_rel * 1e-2, 1e-15) * max(1.0, abs(f))
        if decrement / 2 <= tol:
            # with a fresh Hessian, or one BFGS-updated after full steps from a fresh one
            return x, f, g, "SUCCESS"
        d = np.zeros(k)
        d[free] = d_free
        # backtracking on the projected path
        step = 1.0
        accepted = False
        for _ls in range(40):
            xn = np.maximum(x + step * d, lower)
            fn, gn = obj.value_and_gradient(xn)
            # Armijo along the projected path, with slack for rounding at this scale
            if np.isfinite(fn) and fn <= f - 1e-4 * float(g @ (x - xn)) + tol:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            if not fresh:  # the updated Hessian may be stale: retry with a fresh one
                H = None
                continue
            return x, f, g, "ROUNDOFF_LIMITED"
        if not np.all(np.isfinite(gn)):
            return x, f, g, "FAILURE"
        small_move = np.max(np.abs(xn - x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))
        sf, yf = (xn - x)[free], (gn - g)[free]
        projected = bool(np.any(xn[free] != (x + step * d)[free]))
        x, f, g = xn, fn, gn
        if small_move:
            return x, f, g, "SUCCESS"
        free_prev = free
        if step == 1.0 and not projected and float(sf @ yf) > 1e-12 * float(sf @ sf) * \
                max(1.0, float(np.max(np.abs(np.diag(H))))):
            Hs = H @ sf
            H = H - np.outer(Hs, Hs) / float(sf @ Hs) + np.outer(yf, yf) / float(sf @ yf)
            H = (H + H.T) / 2
            updates += 1
        else:
            H = None
    return x, f, g, "MAXITER_REACHED"


def _hessian(obj: Objective, x: np.ndarray, g: np.ndarray, free: np.ndarray):
    """Forward differences of the analytic gradient over the free coordinates (symmetrized)."""
    lower = obj.theta_map.lower
    H = np.empty((len(free), len(free)))
    for col, j in enumerate(free):
        h = 1e-6 * max(1.0, abs(x[j]))
        xh = x.copy()
        xh[j] += h
        if not xh[j] >= lower[j]:  # pragma: no cover - forward steps never cross a lower bound
            return None
        fh, gh = obj.value_and_gradient(xh)
        if not np.isfinite(fh) or not np.all(np.isfinite(gh)):
            return None
        H[:, col] = (gh[free] - g[free]) / h
    return (H + H.T) / 2


def _newton_direction(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """−H⁻¹g, with H shifted to positive definite when it is not (Levenberg style)."""
    scale = max(float(np.max(np.abs(np.diag(H)))), 1e-300)
    shift = 0.0
    eye = np.eye(len(g))
    for _ in range(60):
        try:
            c = np.linalg.cholesky(H + shift * eye)
            y = np.linalg.solve(c, -g)
            return np.linalg.solve(c.T, y)
        except np.linalg.LinAlgError:
            shift = max(2 * shift, 1e-8 * scale)
    return -g / scale


def _gradient_ok(obj: Objective, x: np.ndarray, fx: float, g: np.ndarray) -> bool:
    if not np.isfinite(fx) or not np.all(np.isfinite(g)):
        return False
    return _projected_gmax(obj, x, g) <= 1e-6 * max(1.0, abs(fx))


def _projected_gmax(obj: Objective, x: np.ndarray, g: np.ndarray) -> float:
    tm = obj.theta_map
    at_bound = tm.diagonal & (x <= 0) & (g > 0)
    return float(np.max(np.abs(np.where(at_bound, 0.0, g)))) if len(g) else 0.0


# ---------------------------------------------------------------------- BOBYQA, Brent

def _bobyqa(obj: Objective, x0: np.ndarray, f0: float, summary: OptSummary, start: float,
            maxeval: int, ftol_rel: float, xtol_abs: float) -> OptSummary:
    """Bounded BOBYQA.  A step where the objective cannot be evaluated returns the initial
    deviance instead of inf (as MixedModels.jl does), which keeps BOBYQA's model sane."""
    tm = obj.theta_map
    fallback = f0 if np.isfinite(f0) else 1e300
    best = {"f": np.inf, "x": x0}

    def f(theta, grad):
        v = obj(theta)
        if v < best["f"]:
            best["f"], best["x"] = v, np.array(theta, dtype=float)
        return v if np.isfinite(v) else fallback

    if summary.optimizer == "newton":
        summary.optimizer = "LN_BOBYQA"
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(tm))
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
            converged: bool, fx: float | None = None,
            grad: np.ndarray | None = None) -> OptSummary:
    tm = obj.theta_map
    if fx is None or grad is None:
        fx, grad = obj.value_and_gradient(x)
    # snap near-zero diagonal entries to the boundary when the fit is no worse
    small = tm.diagonal & (x < SINGULAR_TOL) & (x != 0)
    if small.any():
        snapped = np.where(small, 0.0, x)
        fs, gs = obj.value_and_gradient(snapped)
        if fs <= fx + 1e-10:
            x, fx, grad = snapped, fs, gs
    gmax = _projected_gmax(obj, x, grad)
    summary.final_theta = x.tolist()
    summary.final_objective = float(fx)
    summary.evaluations = obj.evaluations
    summary.gradient_evaluations = obj.gradient_evaluations
    summary.seconds = time.perf_counter() - start
    summary.max_abs_gradient = gmax
    summary.converged = bool(converged and np.isfinite(fx))
    if not gmax <= 1e-6 * max(1.0, abs(fx)):
        summary.messages.append(f"the gradient at the optimum is {gmax:.2g}")
    return summary
