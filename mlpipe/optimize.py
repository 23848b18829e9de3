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
#: BFGS updates of the Hessian between finite-difference recomputations (a fresh one is
#: also taken when the active set changes or a step is cut back): each recomputation costs
#: one gradient per free parameter; measured, more updates saved 15-25% of the evaluations
#: with the same criteria (to ~1e-16 relative) on the nested, crossed and one-factor fits
NEWTON_BFGS_UPDATES = 20
#: Newton keeps the objective's information matrix as its Hessian while the gradient's
#: change over each step is within this fraction of the information's prediction (the mean
#: at the step's two ends).  Measured on InstEval, egsingle, penicillin, pastes, oxide and
#: scotssec: 3-8 evaluations against 5-16 with difference Hessians, the same criteria; on
#: the 10M-row crossed benchmark 6 against 14.  A component near 0 fails the test (its
#: information vanishes there) and the fit goes on with differences.
INFO_SECANT_TOL = 0.2


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
    boundary_checks: list[dict] = field(default_factory=list)  # see optimize()
    structure: list[dict] = field(default_factory=list)  # several factors: how they relate

    def to_dict(self) -> dict:
        return asdict(self)


def optimize(obj: Objective, *, maxeval: int = 10000, ftol_rel: float = 1e-12,
             xtol_abs: float = 1e-10, theta0: np.ndarray | None = None,
             method: str = "newton", guard: bool = True) -> OptSummary:
    """Minimize the deviance, then make sure a boundary answer is a minimum.

    The Cholesky parameterization has false stationary points on its boundary.  Where a
    diagonal θ_jj is 0 and the entries below it in column j are 0 too, the deviance is even
    in θ_jj (negating column j leaves T T' unchanged), so ∂d/∂θ_jj = 0 there *whatever* the
    curvature: a gradient-based method that lands on θ_jj = 0 (a projected step) never
    leaves, even when the point is a maximum along θ_jj.  Where the entries below are not
    0, negating them gives the same covariance with the opposite ∂d/∂θ_jj.  So at every
    boundary answer (`_boundary_check`): the projected gradient must not point inward, and
    the deviance must not decrease along small and moderate steps off the bound (from the
    point and from its sign-flipped twin); when it does, optimization restarts from the
    best such step.  Then, while a diagonal θ is still 0, bounded BOBYQA (derivative-free)
    from the moment estimate and from lme4's default start acts as an independent guard,
    and the lowest criterion wins.  Every check is recorded in `messages` and
    `boundary_checks`."""
    kw = dict(maxeval=maxeval, ftol_rel=ftol_rel, xtol_abs=xtol_abs, method=method)
    summary = _optimize_once(obj, theta0=theta0, **kw)
    first = summary
    for _ in range(2 * len(obj.theta_map) + 2):
        check = _boundary_check(obj, np.asarray(summary.final_theta), summary.final_objective)
        summary.boundary_checks.append(check["record"])
        if check["restart"] is None:
            break
        trial = _optimize_once(obj, theta0=check["restart"], **kw)
        if not trial.final_objective < summary.final_objective - _tol(summary.final_objective):
            break
        trial.messages = summary.messages + [
            f"restarted from {check['why']} at the boundary point "
            f"θ = {np.round(summary.final_theta, 6).tolist()} "
            f"(criterion {summary.final_objective:.6f})"]
        trial.boundary_checks = summary.boundary_checks
        summary = trial
    if guard and len(obj.theta_map) > 1 and _on_boundary(obj, summary.final_theta):
        summary = _bobyqa_guard(obj, summary, kw)
    summary.initial_theta, summary.initial_objective = (first.initial_theta,
                                                        first.initial_objective)
    summary.start = first.start
    summary.evaluations = obj.evaluations
    summary.gradient_evaluations = obj.gradient_evaluations
    return summary


def _tol(f: float) -> float:
    return 1e-10 * max(1.0, abs(f))


def _on_boundary(obj: Objective, theta) -> bool:
    x = np.asarray(theta, dtype=float)
    return bool(np.any(obj.theta_map.diagonal & (x <= 0)))


def _boundary_check(obj: Objective, x: np.ndarray, fx: float) -> dict:
    """One-sided optimality at a boundary point x (diagonal θ entries at 0).

    For each such θ_jj: its derivative into the interior (at x and at the twin with the
    entries below it negated, which has the same deviance), and the deviance change along
    steps θ_jj = δ off the bound (δ = 10⁻³ … 1 relative to the largest diagonal θ), from
    both points.  → {"record": what was checked, "restart": the best point that lowers the
    deviance (or None), "why": how it was found}."""
    tm = obj.theta_map
    rows, cols = np.asarray(tm.rows), np.asarray(tm.cols)
    zero = [k for k in range(len(x)) if tm.diagonal[k] and x[k] <= 0]
    record = {"theta": x.tolist(), "criterion": float(fx), "at_bound": zero, "entries": [],
              "passed": True}
    if not zero:
        return {"record": record, "restart": None, "why": ""}
    scale = max(1.0, float(np.max(np.where(tm.diagonal, np.abs(x), 0.0))))
    tol = _tol(fx)
    best_f, best_x, why = fx - tol, None, ""
    for k in zero:
        below = (cols == cols[k]) & (rows > rows[k])
        twins = [("the point", x)]
        if np.any(x[below] != 0):
            flipped = x.copy()
            flipped[below] = -flipped[below]
            twins.append(("its sign-flipped twin", flipped))
        entry = {"index": k, "gradient": [], "steps": [], "passed": True}
        for name, base in twins:
            _, g = obj.value_and_gradient(base)
            entry["gradient"].append(float(g[k]))
            if np.isfinite(g[k]) and g[k] < -1e-6 * max(1.0, abs(fx)):
                entry["passed"] = False
            for delta in (1e-3, 1e-2, 1e-1, 0.5, 1.0):
                xs = base.copy()
                xs[k] = delta * scale
                fs, gs = obj.value_and_gradient(xs)
                entry["steps"].append([name, delta * scale, float(fs - fx), float(gs[k])])
                if not np.isfinite(fs):
                    continue
                if fs < best_f:
                    best_f, best_x = fs, xs
                    why = f"a step θ[{k}] = {delta * scale:.3g} off the bound from {name}"
                if fs < fx - tol:
                    entry["passed"] = False
                elif delta <= 1e-2 and gs[k] < -1e-9 * max(1.0, abs(fx)) and best_x is None:
                    # the deviance still decreases into the interior here: a descent
                    # direction off the bound too flat for the step itself to show it
                    entry["passed"] = False
                    best_x, why = xs, (f"a descent direction at θ[{k}] = {delta * scale:.3g} "
                                       f"off the bound from {name}")
        if entry["passed"] is False and best_x is None:
            # an inward derivative without a lower step found: a tiny step along it
            for name, base in twins:
                xs = base.copy()
                xs[k] = 1e-6 * scale
                fs = obj(xs)
                if np.isfinite(fs) and fs < best_f:
                    best_f, best_x, why = fs, xs, f"the inward gradient from {name}"
        record["entries"].append(entry)
        record["passed"] = record["passed"] and entry["passed"]
    return {"record": record, "restart": best_x, "why": why}


def _bobyqa_guard(obj: Objective, summary: OptSummary, kw: dict) -> OptSummary:
    """Bounded BOBYQA from the moment estimate and from lme4's default θ; a lower criterion
    than the boundary answer replaces it (polished by the main optimizer)."""
    tm = obj.theta_map
    starts = [("default", np.array(tm.initial, dtype=float))]
    mom = obj.moment_start()
    if mom is not None:
        starts.insert(0, ("moments", np.maximum(mom, tm.lower)))
    tried = []
    best = summary
    for name, x0 in starts:
        f0 = obj(x0)
        if not np.isfinite(f0):
            continue
        trial = OptSummary("LN_BOBYQA", x0.tolist(), f0, reml=obj.reml, start=name)
        trial = _bobyqa(obj, x0, f0, trial, time.perf_counter(), kw["maxeval"],
                        kw["ftol_rel"], kw["xtol_abs"])
        tried.append({"start": name, "criterion": trial.final_objective,
                      "theta": trial.final_theta})
        if trial.final_objective < best.final_objective - _tol(best.final_objective):
            polished = _optimize_once(obj, theta0=np.asarray(trial.final_theta), **kw)
            if polished.final_objective <= trial.final_objective:
                trial = polished
            trial.messages = summary.messages + [
                f"the boundary answer θ = {np.round(summary.final_theta, 6).tolist()} "
                f"(criterion {summary.final_objective:.6f}) was beaten by BOBYQA from the "
                f"{name} start (criterion {trial.final_objective:.6f})"]
            trial.optimizer = f"{summary.optimizer}; guard LN_BOBYQA"
            best = trial
    best.boundary_checks = summary.boundary_checks + [{"guard": tried}]
    if best is not summary:
        check = _boundary_check(obj, np.asarray(best.final_theta), best.final_objective)
        best.boundary_checks.append(check["record"])
    return best


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

    The Hessian is the objective's information matrix where it has one and it is cheaper
    than differences (`value_gradient_information`, `information_pays`: no extra
    evaluations, taken afresh at every iterate while it keeps describing the curvature, see
    `INFO_SECANT_TOL`), otherwise a finite difference
    of the gradient; after a full Newton step with an unchanged active set the difference
    Hessian is updated by BFGS instead of being recomputed (near the optimum the function is
    almost quadratic and the update keeps Newton's fast convergence at one gradient per
    iteration).
    """
    tm = obj.theta_map
    lower = tm.lower
    k = len(x)
    vgi = getattr(obj, "value_gradient_information", None)
    use_info = vgi is not None and getattr(obj, "information_pays", False)

    def evaluate(x):
        if use_info:
            return vgi(x)
        return (*obj.value_and_gradient(x), None)

    f, g, info = evaluate(x)
    if not np.isfinite(f) or not np.all(np.isfinite(g)):
        return x, fx, g, "FAILURE"
    use_info = info is not None
    evals0 = obj.evaluations
    H = None  # Hessian over `free` (information, FD, or BFGS-updated FD)
    free_prev = None
    updates = 0  # BFGS updates since the last finite-difference Hessian
    for _ in range(maxiter):
        if obj.evaluations - evals0 > maxeval:
            return x, f, g, "MAXEVAL_REACHED"
        # the active set: at the bound with the gradient pushing outward, or exactly 0 there
        # (the even direction of a zero diagonal: held, and left to the boundary check)
        at_bound = (x <= lower) & (g >= 0)
        free = np.flatnonzero(~at_bound)
        if len(free) == 0:
            return x, f, g, "SUCCESS"
        fresh = use_info or H is None or free_prev is None \
            or not np.array_equal(free, free_prev) or updates >= NEWTON_BFGS_UPDATES
        if fresh:
            updates = 0
            H = info[np.ix_(free, free)] if use_info else _hessian(obj, x, g, free)
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
            fn, gn, info_n = evaluate(xn)
            # Armijo along the projected path, with slack for rounding at this scale
            if np.isfinite(fn) and fn <= f - 1e-4 * float(g @ (x - xn)) + tol:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            if not fresh or use_info:  # an updated Hessian or the information may be off:
                H = None  # retry with a fresh one, by differences
                use_info = False
                continue
            return x, f, g, "ROUNDOFF_LIMITED"
        if not np.all(np.isfinite(gn)):
            return x, f, g, "FAILURE"
        small_move = np.max(np.abs(xn - x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))
        sf, yf = (xn - x)[free], (gn - g)[free]
        projected = bool(np.any(xn[free] != (x + step * d)[free]))
        if use_info:
            # the gradient's change along the step against the mean of the information at
            # its two ends: far off (a variance near 0, where the information vanishes and
            # the curvature does not) → finite differences from here on
            use_info = info_n is not None and np.linalg.norm(
                yf - (H + info_n[np.ix_(free, free)]) @ sf / 2) \
                <= INFO_SECANT_TOL * np.linalg.norm(yf)
            H = None
        x, f, g, info = xn, fn, gn, info_n
        if small_move:
            return x, f, g, "SUCCESS"
        free_prev = free
        if H is not None and step == 1.0 and not projected and float(sf @ yf) > \
                1e-12 * float(sf @ sf) * max(1.0, float(np.max(np.abs(np.diag(H))))):
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
    x = _polish_1d(obj, np.array([float(res.x)]))
    # the bounded search never evaluates exactly at the boundary: compare with it
    if obj(np.array([0.0])) <= obj(x):
        x = np.array([0.0])
    summary.return_code = "SUCCESS" if res.success else str(res.message)
    return _finish(obj, x, summary, start, converged=bool(res.success))


def _polish_1d(obj: Objective, x: np.ndarray, steps: int = 6) -> np.ndarray:
    """Secant steps on the analytic derivative from Brent's answer.  Function values pin a
    minimum down only to ~sqrt(machine epsilon) relative (the criterion is flat there:
    statistics equal to 1e-16 gave θ 2e-8 apart); the derivative's root is found to
    rounding.  A step is kept when the derivative shrinks and the criterion does not rise
    beyond rounding."""
    if not x[0] > 0:
        return x
    try:
        f0, g0 = obj.value_and_gradient(x)
        h = 1e-6 * max(abs(x[0]), 1e-3)
        x1 = x + h
        f1, g1 = obj.value_and_gradient(x1)
    except (AttributeError, NotImplementedError):
        return x
    # near the minimum the criterion is flat to rounding: a point is better when its
    # derivative is smaller and its value no higher beyond rounding
    slack = 1e-13 * max(1.0, abs(f0))
    best, fbest, gbest = (x1, f1, abs(g1[0])) if abs(g1[0]) < abs(g0[0]) and f1 <= f0 + slack \
        else (x, f0, abs(g0[0]))
    for _ in range(steps):
        dg = float(g1[0] - g0[0])
        dx = float(x1[0] - x[0])
        if not (np.isfinite(dg) and dx != 0 and dg / dx > 0):  # not convex here: stop
            break
        x2 = x1 - g1 * (x1 - x) / dg
        if not x2[0] > 0 or abs(x2[0] - x1[0]) > 0.1 * max(abs(x1[0]), 1e-3):
            break
        f2, g2 = obj.value_and_gradient(x2)
        if abs(g2[0]) < gbest and f2 <= fbest + slack:
            best, fbest, gbest = x2, min(f2, fbest), abs(g2[0])
        if abs(x2[0] - x1[0]) <= 1e-14 * max(abs(x2[0]), 1e-8):
            break
        x, g0, x1, g1 = x1, g1, x2, g2
    return np.array(best, dtype=float)


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
