"""Stage 2c: the residual covariance — serial correlation within a series and variances by
stratum — exact from lag statistics.

lme4's residuals are independent with one variance, R = σ² I.  Repeated measures often are
not: `ar1(TIME | GROUP)` (nlme's `corAR1(form = ~ 1 | GROUP)` on data sorted by TIME) and
`car1(TIME | GROUP)` (nlme's `corCAR1(form = ~ TIME | GROUP)`: correlation φ^|Δt|) make
the residuals of one series a stationary AR(1) process; `variance_by = COL` (nlme's
`varIdent(form = ~ 1 | COL)`) gives each level k of COL its own residual SD σ·δ_k, δ = 1
for the first level in sorted order.  R = σ² Δ C(φ) Δ, block diagonal by series.

Why statistics suffice.  An AR(1) series is Markov: with ρ_t = φ^(gap before row t+1)
(the gap is 1 for ar1) the quadratic form of C⁻¹ is

    a'C⁻¹b = a₁b₁ + Σ_t [a_{t+1}b_{t+1} − ρ_t (a_t b_{t+1} + a_{t+1} b_t)
                         + ρ_t² a_t b_t] / (1 − ρ_t²)
    log|C| = Σ_t log(1 − ρ_t²)

and with Δ the rows are divided by their δ first.  So every cross-product the likelihood
needs — Z'R⁻¹Z, Z'R⁻¹X, y'R⁻¹y, ... per cell — is a fixed linear combination of
"components" that one pass computes with window functions (`sql/lag_moments.sql`), for any
φ and δ:

    F(k)          Σ over a series' first rows of stratum k of  c c'         weight 1/δ_k²
    A(d, k, k')   Σ over pairs with gap d, later row in stratum k, earlier in k', of  c c'
    B(d, k, k')   the same pairs' earlier rows  l l'                (l = the previous row)
    C(d, k, k')   l c' + c l'

with weights A: 1/((1−ρ_d²)δ_k²), B: ρ_d²/((1−ρ_d²)δ_k'²), C: −ρ_d/((1−ρ_d²)δ_kδ_k').
Whitened by those weights the statistics are those of an ordinary linear mixed model
(`at`), and log|R/σ²| enters the deviance as case weights' −Σ log w does (`log_weights`), so
the objective, the optimizer, the results and inference run unchanged at a given ψ.

The parameters ψ (φ on nlme's unconstrained scale — atanh for ar1, logit for car1 — and
log δ_k for the strata after the first) are estimated by minimizing the profiled criterion
min_θ d(θ; ψ) + log|R(ψ)| (REML or ML): bounded Brent for one parameter, BOBYQA for more,
each evaluation an optimization of θ warm-started at the previous one (`estimate`).  β's
standard errors and the t tests are then those at ψ̂ (nlme's too are conditional on the
variance parameters).

Each series must lie within one cell of the grouping factors (a series crossing levels
would couple two cells' random effects); the pass counts such pairs and refuses them, and
refuses times repeated within a series.  car1 supports at most `MAX_GAPS` distinct gaps
(rounded to 12 significant digits); the statistics grow with their number.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import DataError, FormulaError, InputError

KINDS = ("ar1", "car1")
MAX_GAPS = 100
#: the bounds of the unconstrained parameters: |atanh φ| ≤ 8 (|φ| ≤ 1 − 2e-7), |logit φ| ≤
#: 16, |log δ| ≤ 12
BOUND_AR1, BOUND_CAR1, BOUND_DELTA = 8.0, 16.0, 12.0

_SPEC = re.compile(r"^\s*(\w+)\s*\(\s*(.+?)\s*\|\s*(.+?)\s*\)\s*$")


@dataclass(frozen=True)
class Spec:
    """What the user asked for: a correlation structure (kind, time, the series' columns)
    and/or a column of variance strata."""

    kind: str | None = None
    time: str | None = None
    group: tuple[str, ...] = ()
    variance_by: str | None = None

    @property
    def columns(self) -> list[str]:
        cols = ([self.time] if self.time else []) + list(self.group)
        return cols + ([self.variance_by] if self.variance_by else [])

    @property
    def text(self) -> str:
        return f"{self.kind}({self.time} | {':'.join(self.group)})" if self.kind else ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "time": self.time, "group": list(self.group),
                "variance_by": self.variance_by}

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        return cls(d.get("kind"), d.get("time"), tuple(d.get("group") or ()),
                   d.get("variance_by"))


def parse_spec(correlation: str | None, variance_by: str | None = None) -> Spec | None:
    """`correlation` ("ar1(TIME | GROUP)", "car1(TIME | GROUP)"; GROUP may be `a:b`) and
    `variance_by` (a column) → a `Spec`, or None when neither is given."""
    if not correlation and not variance_by:
        return None
    kind = time = None
    group: tuple[str, ...] = ()
    if correlation:
        m = _SPEC.match(correlation)
        if not m or m.group(1) not in KINDS:
            raise FormulaError(f"correlation {correlation!r}: expected ar1(TIME | GROUP) or "
                               f"car1(TIME | GROUP)")
        kind, time = m.group(1), m.group(2).strip("` ")
        group = tuple(g.strip("` ") for g in m.group(3).split(":"))
        if not time or not all(group):
            raise FormulaError(f"correlation {correlation!r}: name a time column and a "
                               f"grouping column")
    if variance_by is not None and not str(variance_by).strip():
        raise InputError("residual variance by: name a column")
    return Spec(kind, time, group, variance_by.strip() if variance_by else None)


@dataclass
class ResidualStatistics:
    """The lag statistics of a residual structure: one set of arrays per component (leading
    axis K), laid out as `Statistics`' (cells last).  `psi` is where the owning Statistics'
    main arrays were whitened (None: not yet, they are the unweighted sums)."""

    spec: Spec
    strata: list[str]  # level labels of variance_by, reference first ([""] without one)
    gaps: np.ndarray  # (G,) the distinct gaps (ar1: [1.0])
    kind: np.ndarray  # (K,) "F", "A", "B", "C"
    gap: np.ndarray  # (K,) index into gaps, -1 for F
    k: np.ndarray  # (K,) stratum of the (later) row
    kp: np.ndarray  # (K,) stratum of the earlier row, -1 for F
    count: np.ndarray  # (K,) rows of F / pairs of A, B, C
    ztz: np.ndarray  # (K, q, q, m)
    ztx: np.ndarray  # (K, q, p, m)
    zty: np.ndarray  # (K, q, m)
    yty_i: np.ndarray  # (K, m)
    xtx: np.ndarray  # (K, p, p)
    xty: np.ndarray  # (K, p)
    yty: np.ndarray  # (K,)
    n_series: int
    psi: np.ndarray | None = None

    # ------------------------------------------------------------------ parameters
    @property
    def n_params(self) -> int:
        return (1 if self.spec.kind else 0) + len(self.strata) - 1

    def bounds(self) -> list[tuple[float, float]]:
        b = [(-BOUND_AR1, BOUND_AR1)] if self.spec.kind == "ar1" else \
            [(-BOUND_CAR1, BOUND_CAR1)] if self.spec.kind == "car1" else []
        return b + [(-BOUND_DELTA, BOUND_DELTA)] * (len(self.strata) - 1)

    def unpack(self, psi: np.ndarray) -> tuple[float, np.ndarray]:
        """ψ → (φ, δ per stratum)."""
        psi = np.asarray(psi, dtype=float)
        phi, rest = 0.0, psi
        if self.spec.kind == "ar1":
            phi, rest = math.tanh(psi[0]), psi[1:]
        elif self.spec.kind == "car1":
            phi, rest = 1.0 / (1.0 + math.exp(-psi[0])), psi[1:]
        return phi, np.exp(np.concatenate([[0.0], rest]))

    def weights(self, psi: np.ndarray) -> tuple[np.ndarray, float]:
        """The components' weights at ψ and log|R/σ²|."""
        phi, delta = self.unpack(psi)
        rho_g = self.gaps * 0 + phi if self.spec.kind == "ar1" else phi ** self.gaps
        one_m = (1.0 - rho_g) * (1.0 + rho_g)  # 1 − ρ², without cancellation near ρ = 0
        w = np.empty(len(self.kind))
        logdet = 0.0
        for c, kind in enumerate(self.kind):
            dk = delta[self.k[c]]
            if kind == "F":
                w[c] = 1.0 / dk**2
                logdet += self.count[c] * 2.0 * math.log(dk)
                continue
            g = self.gap[c]
            rho, om, dp = rho_g[g], one_m[g], delta[self.kp[c]]
            if kind == "A":
                w[c] = 1.0 / (om * dk**2)
                logdet += self.count[c] * (math.log(om) + 2.0 * math.log(dk))
            elif kind == "B":
                w[c] = rho**2 / (om * dp**2)
            else:
                w[c] = -rho / (om * dk * dp)
        return w, logdet

    def describe(self, psi: np.ndarray) -> dict:
        """What result.json records of the structure at ψ."""
        phi, delta = self.unpack(psi)
        out: dict = {}
        if self.spec.kind:
            out = {"structure": self.spec.kind, "time": self.spec.time,
                   "group": ":".join(self.spec.group), "phi": phi, "series": self.n_series}
            if self.spec.kind == "car1":
                out["distinct_gaps"] = len(self.gaps)
        if self.spec.variance_by:
            out["variance_by"] = self.spec.variance_by
            out["variance_ratios"] = dict(zip(self.strata, delta.tolist()))
        return out

    # ------------------------------------------------------------------ persistence
    def columns(self) -> dict[str, np.ndarray]:
        """Per-cell arrays as named columns (for Statistics.save)."""
        cols = {}
        K, q, p = self.ztz.shape[0], self.ztz.shape[1], self.ztx.shape[2]
        for c in range(K):
            cols[f"r{c}_yty"] = self.yty_i[c]
            for a in range(q):
                cols[f"r{c}_zty_{a}"] = self.zty[c, a]
                for b in range(q):
                    cols[f"r{c}_ztz_{a}_{b}"] = self.ztz[c, a, b]
                for j in range(p):
                    cols[f"r{c}_ztx_{a}_{j}"] = self.ztx[c, a, j]
        return cols

    def meta(self) -> dict:
        return {"spec": self.spec.to_dict(), "strata": self.strata,
                "gaps": self.gaps.tolist(), "kind": self.kind.tolist(),
                "gap": self.gap.tolist(), "k": self.k.tolist(), "kp": self.kp.tolist(),
                "count": self.count.tolist(), "xtx": self.xtx.tolist(),
                "xty": self.xty.tolist(), "yty": self.yty.tolist(),
                "n_series": self.n_series,
                "psi": None if self.psi is None else self.psi.tolist()}

    @classmethod
    def from_saved(cls, meta: dict, col, q: int, p: int, m: int) -> ResidualStatistics:
        K = len(meta["kind"])
        ztz, ztx = np.empty((K, q, q, m)), np.empty((K, q, p, m))
        zty, yty_i = np.empty((K, q, m)), np.empty((K, m))
        for c in range(K):
            yty_i[c] = col(f"r{c}_yty")
            for a in range(q):
                zty[c, a] = col(f"r{c}_zty_{a}")
                for b in range(q):
                    ztz[c, a, b] = col(f"r{c}_ztz_{a}_{b}")
                for j in range(p):
                    ztx[c, a, j] = col(f"r{c}_ztx_{a}_{j}")
        arr = lambda key, dt=float: np.asarray(meta[key], dtype=dt)  # noqa: E731
        return cls(Spec.from_dict(meta["spec"]), list(meta["strata"]), arr("gaps"),
                   np.asarray(meta["kind"], dtype=object), arr("gap", np.int64),
                   arr("k", np.int64), arr("kp", np.int64), arr("count"), ztz, ztx, zty, yty_i,
                   arr("xtx").reshape(K, p, p), arr("xty").reshape(K, p), arr("yty"),
                   int(meta["n_series"]),
                   None if meta.get("psi") is None else np.asarray(meta["psi"], dtype=float))


def at(stats, psi: np.ndarray):
    """The statistics whitened at ψ: an ordinary `Statistics` whose cross-products are those
    of R(ψ)^(-1/2)-transformed rows and whose `log_weights` is −log|R(ψ)/σ²|; it keeps the
    components (`residual`, with `psi`) so that it can be refitted or saved."""
    rs = stats.residual
    w, logdet = rs.weights(psi)
    comb = lambda a: np.tensordot(w, a, axes=1)  # noqa: E731
    return dataclasses.replace(
        stats, ztz=comb(rs.ztz), ztx=comb(rs.ztx), zty=comb(rs.zty), yty_i=comb(rs.yty_i),
        xtx=comb(rs.xtx), xty=comb(rs.xty), yty=float(comb(rs.yty)), log_weights=-logdet,
        residual=dataclasses.replace(rs, psi=np.asarray(psi, dtype=float)))


def start(rs: ResidualStatistics) -> np.ndarray:
    """ψ's starting value: φ = 0.2 (ar1; car1 at its median gap), δ = 1."""
    x = np.zeros(rs.n_params)
    if rs.spec.kind == "ar1":
        x[0] = math.atanh(0.2)
    elif rs.spec.kind == "car1":
        phi = 0.2 ** (1.0 / float(np.median(rs.gaps)))
        x[0] = math.log(phi / (1.0 - phi))
    return x


#: the correlations between consecutive observations (car1: a median gap apart) at which
#: the criterion is tried before ψ is optimized from the best of them: the profiled
#: criterion can have several minima in φ (Oxboys with car1: φ 0.35 and, on the boundary
#: of θ, 0.95), and Newton from one start can end in either
PHI_STARTS = (0.2, 0.5, 0.8, 0.95)


def start_candidates(rs: ResidualStatistics) -> list[np.ndarray]:
    """ψ's starting values to try: `start`, and for a correlation structure the same with φ
    at each of PHI_STARTS (ar1 also at −0.5: negative serial correlation); the other
    entries (varIdent's ratios) at their start."""
    x0 = start(rs)
    out = [x0]
    if rs.spec.kind not in ("ar1", "car1"):
        return out
    phis = PHI_STARTS + ((-0.5,) if rs.spec.kind == "ar1" else ())
    for phi in phis:
        x = x0.copy()
        if rs.spec.kind == "ar1":
            x[0] = math.atanh(phi)
        else:
            per_unit = phi ** (1.0 / float(np.median(rs.gaps)))
            x[0] = math.log(per_unit / (1.0 - per_unit))
        if not np.allclose(x, x0):
            out.append(x)
    return out


def estimate(stats, inner, *, xtol: float = 1e-9) -> tuple[np.ndarray, dict]:
    """ψ̂ minimizing `inner(stats_at_ψ, θ₀) → (criterion, θ̂)` (the profiled criterion over
    θ; `at` puts log|R| in it) → (ψ̂, the record: evaluations, method, criterion)."""
    rs = stats.residual
    best = {"f": np.inf, "theta": None, "psi": None}
    evals = [0]

    def f(psi) -> float:
        psi = np.atleast_1d(np.asarray(psi, dtype=float))
        evals[0] += 1
        crit, theta = inner(at(stats, psi), best["theta"])
        if not np.isfinite(crit):
            return 1e300
        if crit < best["f"]:
            best.update(f=crit, theta=theta, psi=psi.copy())
        return float(crit)

    bounds = rs.bounds()
    x0 = start(rs)
    if len(bounds) == 1:
        from scipy.optimize import minimize_scalar

        lo, hi = bounds[0]
        f(x0)
        res = minimize_scalar(lambda u: f([u]), bounds=(lo, hi), method="bounded",
                              options={"xatol": xtol, "maxiter": 500})
        method = "brent (bounded)"
        if not res.success:
            raise DataError(f"the residual structure's parameter did not converge "
                            f"({res.message})")
    else:
        import nlopt

        opt = nlopt.opt(nlopt.LN_BOBYQA, len(bounds))
        opt.set_lower_bounds([b[0] for b in bounds])
        opt.set_upper_bounds([b[1] for b in bounds])
        opt.set_min_objective(lambda x, grad: f(x))
        opt.set_ftol_rel(1e-14)
        opt.set_xtol_abs(xtol)
        opt.set_maxeval(2000)
        opt.set_initial_step(0.5)
        x = x0
        for _ in range(3):  # BOBYQA restarted from its answer until it stops moving
            before = best["f"]
            try:
                x = opt.optimize(x)
            except (nlopt.RoundoffLimited, ValueError):
                x = best["psi"]
            x = best["psi"]
            if not best["f"] < before - 1e-12 * max(1.0, abs(before)):
                break
        method = "LN_BOBYQA"
    return best["psi"], {"method": method, "evaluations": evals[0], "criterion": best["f"]}


# ---------------------------------------------------------------------- the lag pass

def check_spec(spec: Spec, schema: dict[str, str], *, weights: str | None) -> None:
    """The structure's columns exist; car1's time is numeric; no case weights with it."""
    from .design import is_numeric

    for col in spec.columns:
        if col not in schema:
            raise DataError(f"column {col!r} of the residual structure is not in the data")
    if spec.kind == "car1" and not is_numeric(schema[spec.time]):
        raise DataError(f"car1({spec.time} | ...): the time column {spec.time!r} must be "
                        f"numeric (it is {schema[spec.time]})")
    if weights:
        raise InputError("case weights cannot be combined with a residual correlation or "
                         "variance structure")


def _gap_sql(spec: Spec) -> str:
    if spec.kind != "car1":  # ar1: consecutive rows are at lag 1; no correlation: all "first"
        return "CASE WHEN prev_t IS NULL THEN NULL ELSE 1.0 END" if spec.kind else \
            "CAST(NULL AS DOUBLE)"
    d = "CAST(t - prev_t AS DOUBLE)"
    # 12 significant digits: gaps computed from decimal times (0.3 - 0.2 and 0.2 - 0.1) are
    # one gap
    return (f"CASE WHEN prev_t IS NULL THEN NULL WHEN t = prev_t THEN 0.0 "
            f"ELSE round({d}, 11 - CAST(floor(log10(abs({d}))) AS INTEGER)) END")


def run_pass(con, *, source: str, params: dict, spec: Spec, mom, groups: str,
             group_cols: list[str], complete: str, columns: str, factored=None,
             pieces_held=None) -> bool:
    """The statistics pass with a residual structure: lag_moments (the components per cell)
    and group_moments (the usual sums, from it).  `factored`: the sums with the pieces
    constant within cells taken out (`stats._LagFactored`, for ar1 / car1), tried first;
    `pieces_held(table)` tells whether they held, else the pass runs again with every sum
    → whether the factored sums were kept."""
    if factored is not None and spec.kind:
        _lag_moments(con, source=source, params=params, spec=spec, groups=groups,
                     group_cols=group_cols, complete=complete,
                     columns=",\n        ".join(factored.columns), sums=factored.sums,
                     outputs=factored.outputs, previous_extra=factored.previous)
        if pieces_held("lag_moments"):
            _group_moments(con, mom, group_cols)
            return True
    pairs = mom.pairs()
    sums = [mom.sum_sql(i, j) for i, j in pairs]
    for i, j in pairs:
        a, b = min(i, j), max(i, j)
        if a == 0:
            sums += [f"fsum(l{b}) AS b_{a}_{b}", f"fsum(l{b} + c{b}) AS x_{a}_{b}"]
        else:
            sums += [f"fsum(l{a} * l{b}) AS b_{a}_{b}",
                     f"fsum(l{a} * c{b} + c{a} * l{b}) AS x_{a}_{b}"]
    ks = sorted({k for pair in pairs for k in pair if k})
    names = [s.rsplit(" AS ", 1)[1] for s in sums]
    _lag_moments(con, source=source, params=params, spec=spec, groups=groups,
                 group_cols=group_cols, complete=complete, columns=columns, sums=sums,
                 outputs=names, previous_extra=[f"LAG(c{k}) OVER w AS l{k}" for k in ks],
                 lagged_names=[f"l{k}" for k in ks])
    _group_moments(con, mom, group_cols)
    return False


def _group_moments(con, mom, group_cols: list[str]) -> None:
    from ._sql import render

    summed = ",\n    ".join(f"fsum({mom.name(i, j)}) AS {mom.name(i, j)}" for i, j in mom.pairs())
    con.execute(render("lag_group_moments", group_by=", ".join(group_cols), sums=summed))


def _lag_moments(con, *, source: str, params: dict, spec: Spec, groups: str,
                 group_cols: list[str], complete: str, columns: str, sums: list[str],
                 outputs: list[str], previous_extra: list[str],
                 lagged_names: list[str] | None = None) -> None:
    """lag_moments.sql with these columns, lags (`previous_extra`), aggregates and outputs;
    without a correlation structure the lags are NULL (`lagged_names`)."""
    from ._sql import quote_ident, render

    if spec.kind:
        previous = ["LAG(t) OVER w AS prev_t", "LAG(stratum) OVER w AS prev_stratum"]
        previous += previous_extra
        previous += [f"LAG({g}) OVER w AS prev_{g}" for g in group_cols]
        series_by = ", ".join(f"__series{k}" for k in range(len(spec.group)))
        window = f"WINDOW w AS (PARTITION BY {series_by}, complete ORDER BY t)"
    else:  # variances by stratum only: no previous row, no window
        previous = ["CAST(NULL AS DOUBLE) AS prev_t", "CAST(NULL AS VARCHAR) AS prev_stratum"]
        previous += [f"CAST(NULL AS DOUBLE) AS {name}" for name in lagged_names or []]
        previous += [f"NULL AS prev_{g}" for g in group_cols]
        window = ""
    crossing = " OR ".join(f"{g} IS DISTINCT FROM prev_{g}" for g in group_cols)
    series = [f"src.{quote_ident(c)} AS __series{k}" for k, c in enumerate(spec.group)]
    time = f"src.{quote_ident(spec.time)}" if spec.time else "0"
    stratum = f"CAST(src.{quote_ident(spec.variance_by)} AS VARCHAR)" if spec.variance_by \
        else "''"
    group_by = ", ".join(group_cols)
    sql = render("lag_moments", group_by=group_by, crossing=crossing, sums=",\n    ".join(sums),
                 gap=_gap_sql(spec), previous=",\n            ".join(previous), groups=groups,
                 complete=complete, series=", ".join(series) or "0 AS __series0",
                 time=time, stratum=stratum, columns=columns, source=source, window=window,
                 strata_select="stratum, prev_stratum" if spec.variance_by else
                 "'' AS stratum, CASE WHEN gap IS NULL THEN NULL ELSE '' END AS prev_stratum",
                 strata_keys=", stratum, prev_stratum" if spec.variance_by else "",
                 outputs=", ".join(outputs))
    con.execute(sql, params)  # the caller names the source in a failure's message


def read_components(con, *, spec: Spec, mom, group_cols: list[str], cell_order: str,
                    schema: dict[str, str], m: int) -> ResidualStatistics:
    """The components of lag_moments, in the cell order of the usual statistics: one small
    query numbers the distinct (gap, stratum, previous stratum) keys (`sql/lag_keys.sql`)
    and gives their totals; the per-cell rows carry the key's number, so the arrays are
    filled by numpy indexing, without a Python step per cell."""
    from ._sql import render
    from .stats import _label_key

    pairs = mom.pairs()
    names = [mom.name(i, j) for i, j in pairs]
    lag_names = [f"{t}_{min(i, j)}_{max(i, j)}" for i, j in pairs for t in ("b", "x")]
    con.execute(render("lag_keys"))
    tot = con.execute(render("lag_totals", sums=", ".join(
        f"fsum(lm.{c}) AS {c}" for c in names + lag_names))).fetchnumpy()
    crossing, ties = int(np.sum(tot["crossing"])), int(np.sum(tot["ties"]))
    what = spec.text or f"variance by {spec.variance_by}"
    if crossing:
        raise DataError(f"{what}: {crossing} consecutive pairs of a series lie in different "
                        f"levels of a grouping factor; every series "
                        f"({':'.join(spec.group)}) must lie within one level of each "
                        f"grouping factor")
    if ties:
        raise DataError(f"{what}: {ties} repeated times within a series ({spec.time} must be "
                        f"unique within {':'.join(spec.group)})")
    key_gap = [None if g is None or _isnan(g) else float(g) for g in tot["gap"].tolist()]
    gaps = np.array(sorted({g for g in key_gap if g is not None}), dtype=float)
    if len(gaps) > MAX_GAPS:
        raise DataError(f"{what}: the gaps between consecutive times take {len(gaps)} "
                        f"distinct values; the exact statistics support at most {MAX_GAPS} "
                        f"(round the time column, or use ar1())")
    if spec.variance_by:
        typ = {spec.variance_by: schema.get(spec.variance_by, "")}
        strata = sorted(set(tot["stratum"].tolist()),
                        key=lambda x: _label_key(x, [spec.variance_by], typ))
    else:
        strata = [""]
    s_index = {s: i for i, s in enumerate(strata)}
    g_index = {g: i for i, g in enumerate(gaps.tolist())}

    # the components: F per stratum, (A, B, C) per (gap, stratum, previous stratum); per key
    # r its components (F, or A, B, C)
    kind, gap, k, kp = [], [], [], []
    R = len(key_gap)
    key_first = np.zeros(R, dtype=bool)
    key_c = np.zeros((R, 3), dtype=np.int64)  # F in column 0 for first rows
    comp: dict[tuple, int] = {}
    for r, (g, st, ps) in enumerate(zip(key_gap, tot["stratum"].tolist(),
                                        tot["prev_stratum"].tolist())):
        si = s_index[st]
        if g is None:
            keys = [(("F", si), "F", -1, si, -1)]
            key_first[r] = True
        else:
            gi, pi = g_index[g], s_index[ps]
            keys = [((kd, gi, si, pi), kd, gi, si, pi) for kd in "ABC"]
        for col, (key, kd, gi, si_, pi) in enumerate(keys):
            if key not in comp:
                comp[key] = len(kind)
                kind.append(kd), gap.append(gi), k.append(si_), kp.append(pi)
            key_c[r, col] = comp[key]
    K = len(kind)
    q, p = len(mom.z), len(mom.x)
    ztz, ztx = np.zeros((K, q, q, m)), np.zeros((K, q, p, m))
    zty, yty_i = np.zeros((K, q, m)), np.zeros((K, m))
    xtx, xty, yty = np.zeros((K, p, p)), np.zeros((K, p)), np.zeros(K)
    t_n = np.asarray(tot["n"], dtype=float)

    def value(src, n, prefix: str, i: int, j: int, rows) -> np.ndarray:
        """The sum `prefix`(i, j) at the rows (a mask or positions) of `src`; NULL → 0."""
        a, b = min(i, j), max(i, j)
        if (a, b) == (0, 0):  # n: the count; the pair's Σ(1·1 + 1·1) = 2n
            return n[rows] * (2.0 if prefix == "x" else 1.0)
        name = mom.name(a, b) if prefix == "s" else f"{prefix}_{a}_{b}"
        return np.nan_to_num(np.asarray(src[name], dtype=float)[rows], copy=False)

    parts = (("F", "s"), ("A", "s"), ("B", "b"), ("C", "x"))
    # per cell only the sums with Z (and y'y), streamed in batches: the (cell, key) rows are
    # 2-4 per cell.  Each part of a batch (first rows: F; the others: A, B, C) is split by
    # its component — usually one — and each (component, target entry) is then one
    # length-m vector of the arrays, filled by fancy indexing on the cells
    group = mom.group_pairs()
    cell_cols = [mom.name(i, j) for i, j in group if (i, j) != (0, 0)]
    cell_cols += [f"{t}_{i}_{j}" for i, j in group if (i, j) != (0, 0) for t in ("b", "x")]
    reader = con.sql(render(
        "lag_statistics", columns=", ".join(f"coalesce(lm.{c}, 0) AS {c}" for c in cell_cols),
        group_by=", ".join(group_cols), cell_order=cell_order)).to_arrow_reader(1 << 19)
    targets = [(zty, (a,), ia, mom.y) for a, ia in enumerate(mom.z)]
    targets += [(ztz, (a, b), ia, ib) for a, ia in enumerate(mom.z)
                for b, ib in enumerate(mom.z)]
    targets += [(ztx, (a, j), ia, ij) for a, ia in enumerate(mom.z) for j, ij in enumerate(mom.x)]
    targets += [(yty_i, (), mom.y, mom.y)]
    for batch in reader:
        rows = {name: batch.column(name).to_numpy(zero_copy_only=False)
                for name in batch.schema.names}
        idx = np.asarray(rows["idx"], dtype=np.int64)
        r_row = np.asarray(rows["r"], dtype=np.int64)
        n_row = np.asarray(rows["n"], dtype=float)
        first = key_first[r_row]
        at_rows = {"F": np.flatnonzero(first), "R": np.flatnonzero(~first)}
        for col, (kd, prefix) in enumerate(parts):
            pos = at_rows["F" if kd == "F" else "R"]
            comp_of = key_c[r_row[pos], max(col - 1, 0)]
            comps = np.unique(comp_of)
            for c in comps:
                sel = pos if len(comps) == 1 else pos[comp_of == c]
                cells = idx[sel]
                for arr, slot, i, j in targets:
                    arr[c][slot][cells] = value(rows, n_row, prefix, i, j, sel)
    # totals per component, from lag_totals (one row per key)
    t_sel = {"F": key_first, "A": ~key_first}
    t_cid = {"F": key_c[key_first, 0], "A": key_c[~key_first, 0],
             "B": key_c[~key_first, 1], "C": key_c[~key_first, 2]}

    def fill_total(arr, slot: tuple, i: int, j: int) -> None:
        for kd, prefix in parts:
            mask = t_sel["F" if kd == "F" else "A"]
            np.add.at(arr, (t_cid[kd],) + slot, value(tot, t_n, prefix, i, j, mask))

    for a, ia in enumerate(mom.x):
        fill_total(xty, (a,), ia, mom.y)
        for b, ib in enumerate(mom.x):
            fill_total(xtx, (a, b), ia, ib)
    fill_total(yty, (), mom.y, mom.y)
    count = np.zeros(K)
    for kd in ("F", "A", "B", "C"):
        mask = t_sel["F" if kd == "F" else "A"]
        np.add.at(count, t_cid[kd], t_n[mask])
    n_series = int(t_n[key_first].sum())
    return ResidualStatistics(spec, strata, gaps if spec.kind else np.zeros(0),
                              np.asarray(kind, dtype=object), np.asarray(gap, np.int64),
                              np.asarray(k, np.int64), np.asarray(kp, np.int64), count,
                              ztz, ztx, zty, yty_i, xtx, xty, yty, n_series)


def _isnan(v) -> bool:
    return isinstance(v, float) and v != v


# ---------------------------------------------------------------------- joint optimization

class _JointMap:
    """θ's map extended by ψ: ψ's entries are free (no bound; `weights` clips them to the
    structure's range), not diagonal, in no column of T."""

    def __init__(self, tm, psi0: np.ndarray):
        k = len(psi0)
        self.base = tm
        self.diagonal = np.concatenate([tm.diagonal, np.zeros(k, bool)])
        self.lower = np.concatenate([tm.lower, np.full(k, -np.inf)])
        self.initial = np.concatenate([tm.initial, psi0])
        self.rows = list(tm.rows) + [-1 - j for j in range(k)]
        self.cols = list(tm.cols) + [-1 - j for j in range(k)]

    def __len__(self) -> int:
        return len(self.diagonal)


class JointObjective:
    """The criterion as a function of (θ, ψ) together, for the optimizer of θ
    (mlpipe/optimize.py): one objective of the model whose statistics (`linear_parts`) are
    re-weighted in place at each ψ, from the same arrays computed once per component.  The
    gradient is the objective's exact one in θ and, in ψ, exact through the objective's
    adjoint of its statistics (`_psi_gradient`; the one-factor Objective) or a 4-point
    central difference of the criterion (the blocked objective: h = 1e-3, an evaluation's
    rounding, ~1e-13 relative, would swamp a smaller step's difference; the stencil's error
    is O(h⁴)).  Reweighting costs about one evaluation."""

    default_method = "newton"

    def __init__(self, stats, make, psi0: np.ndarray, h: float = 1e-3):
        rs = stats.residual
        self.rs, self.h = rs, h
        self._stats = stats
        self._psi = np.asarray(psi0, dtype=float).copy()
        self.base = make(at(stats, self._psi))
        # per live array, the components' values stacked (K, size): one matrix-vector
        # product re-weights it in place.  Filled one component at a time (one component's
        # arrays alive at once, not K of them and then their stack)
        self._stacked = None
        for c in range(len(rs.kind)):
            parts = self.base.linear_parts_of(dataclasses.replace(
                stats, ztz=rs.ztz[c], ztx=rs.ztx[c], zty=rs.zty[c], yty_i=rs.yty_i[c],
                xtx=rs.xtx[c], xty=rs.xty[c], yty=float(rs.yty[c]), residual=None))
            if self._stacked is None:
                self._stacked = [np.empty((len(rs.kind), part.size)) for part in parts]
            for stacked, part in zip(self._stacked, parts):
                stacked[c] = part.reshape(-1)
            del parts
        if not all(t.flags.c_contiguous for t in self.base.linear_parts()):
            raise ValueError("the objective's linear parts must be C-contiguous")
        self.kt = len(self.base.theta_map)
        self.theta_map = _JointMap(self.base.theta_map, self._psi)
        self.reml = self.base.reml
        self._bounds = np.array(rs.bounds(), dtype=float).reshape(-1, 2)

    @property
    def evaluations(self) -> int:
        return self.base.evaluations

    @property
    def gradient_evaluations(self) -> int:
        return self.base.gradient_evaluations

    def clip(self, psi: np.ndarray) -> np.ndarray:
        return np.clip(psi, self._bounds[:, 0], self._bounds[:, 1])

    def _set(self, psi: np.ndarray) -> None:
        psi = self.clip(np.asarray(psi, dtype=float))
        if np.array_equal(psi, self._psi):
            return
        w, logdet = self.rs.weights(psi)
        for stacked, target in zip(self._stacked, self.base.linear_parts()):
            np.dot(w, stacked, out=target.reshape(-1))  # the arrays are C-contiguous
        self.base.statistics_changed()
        self.base.stats = dataclasses.replace(self.base.stats, log_weights=-logdet)
        self._psi = psi

    def __call__(self, x: np.ndarray) -> float:
        x = np.asarray(x, dtype=float)
        self._set(x[self.kt:])
        return self.base(x[:self.kt])

    def value_and_gradient(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        x = np.asarray(x, dtype=float)
        theta, psi = x[:self.kt], x[self.kt:]
        self._set(psi)
        f, g = self.base.value_and_gradient(theta)
        if not np.isfinite(f):
            return np.inf, np.full(len(x), np.nan)
        gp = self._psi_gradient(theta, psi) if hasattr(self.base, "linear_parts_adjoint") \
            else None
        if gp is None:  # differences of the criterion itself

            def at(ps: np.ndarray) -> float:
                self._set(ps)
                return self.base(theta)

            gp = self._difference(at, psi)
            self._set(psi)
        return f, np.concatenate([g, gp])

    def _difference(self, fn, psi: np.ndarray) -> np.ndarray:
        """The 4-point central difference of fn in each entry of ψ (error O(h⁴))."""
        gp = np.empty(len(psi))
        for j in range(len(psi)):
            step = self.h * max(1.0, abs(psi[j]))
            at = []
            for mult in (2, 1, -1, -2):
                e = np.zeros(len(psi))
                e[j] = mult * step
                at.append(fn(psi + e))
            gp[j] = (-at[0] + 8 * at[1] - 8 * at[2] + at[3]) / (12 * step)
        return gp

    def _psi_gradient(self, theta: np.ndarray, psi: np.ndarray) -> np.ndarray | None:
        """∂d/∂ψ exactly: the statistics are Σ_c w_c(ψ) (component c), so ∂d/∂ψ_j =
        Σ_c ∂w_c/∂ψ_j ⟨∂d/∂stats, component c⟩ + ∂log|R/σ²|/∂ψ_j — the objective's adjoint
        (`linear_parts_adjoint`) against the stacked components, and the weights' derivative
        by a 4-point difference of the closed-form weights (error O(h⁴), no evaluation of
        the criterion).  None where the adjoint is undefined."""
        try:
            adj = self.base.linear_parts_adjoint(theta)
        except (np.linalg.LinAlgError, ValueError):
            return None
        d = sum(stacked @ a.reshape(-1) for stacked, a in zip(self._stacked, adj))

        def linear(ps: np.ndarray) -> float:  # the criterion's first order in the weights
            w, logdet = self.rs.weights(self.clip(ps))
            return float(w @ d) + logdet

        return self._difference(linear, psi)

    def gradient(self, x: np.ndarray) -> np.ndarray:
        return self.value_and_gradient(x)[1]

    def moment_point(self, psi: np.ndarray) -> tuple[float, np.ndarray | None]:
        """(the criterion, θ) at ψ with θ the base objective's moment estimate there (its
        `moment_start`, read off the statistics whitened at ψ), or (inf, None)."""
        self._set(psi)
        live = self.base.stats
        self.base.stats = at(self._stats, self._psi)  # the totals the estimate reads
        try:
            theta = self.base.moment_start()
        finally:
            self.base.stats = live
        if theta is None:
            return np.inf, None
        theta = np.maximum(np.asarray(theta, dtype=float), self.base.theta_map.lower)
        return float(self.base(theta)), theta

    def moment_start(self) -> np.ndarray | None:
        return None


def estimate_joint(stats, make, optimize) -> tuple[np.ndarray, dict]:
    """ψ̂ by the projected Newton method over (θ, ψ) together (`JointObjective`), from the
    best of ψ's starts (`start_candidates`): the first with θ̂ there (a fit of the joint
    objective's own base, which sits at ψ₀: no second objective is built), the others with
    θ's moment estimate there → (ψ̂, the record), or (None, record) when it did not
    converge."""
    rs = stats.residual
    starts = start_candidates(rs)
    joint = JointObjective(stats, make, starts[0])
    first = optimize(joint.base, method=joint.base.default_method, guard=False)
    best = (first.final_objective, np.asarray(first.final_theta, dtype=float), starts[0])
    for psi in starts[1:]:  # the other starts with θ's moment estimate there (cheap: an
        # optimization of θ at each cost ~13 s more at 1M subjects); Newton from the best
        f, theta = joint.moment_point(psi)
        if theta is not None and f < best[0]:
            best = (f, theta, psi)
    x0 = np.concatenate([best[1], best[2]])
    summary = optimize(joint, method="newton", theta0=x0, guard=False)
    x = np.asarray(summary.final_theta, dtype=float)
    psi = joint.clip(x[joint.kt:])
    record = {"method": f"joint {summary.optimizer}", "evaluations": summary.evaluations,
              "criterion": summary.final_objective, "converged": summary.converged,
              "theta": x[:joint.kt].tolist()}
    return (psi if summary.converged else None), record
