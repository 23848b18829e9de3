"""GLMMs by iterated passes: PIRLS over weighted working statistics (glmer's nAGQ = 0).

A GLMM has no fixed sufficient statistics, but one PIRLS iteration needs only the weighted
cross-products of [X Z z̃] per level at the current linear predictor η = Xβ + Zb + offset
(W the working weights, z̃ = η − offset + (y − μ)/(dμ/dη) the working response) and Σ log
p(y | η).  One pass computes them — as a DuckDB query over the data with β bound and the
conditional modes b joined per level (`SqlPasses`, sql/glmm_pass.sql), or over the
compressed patterns in memory (`PatternPasses`) — and returns them as an ordinary weighted
`Statistics` value: the penalized weighted least squares step at θ is the linear mixed
model's (`Objective(stats).decompose(θ)`: β̂, û, log|Λ'Z'WZΛ + I|).

    start     β, b = 0, θ = 1
    PQL       per pass: θ ← argmin r²(θ) + log|L_θ|² of the working model (in memory,
              L-BFGS-B on the exact gradient), then (β, b) at θ; until θ and β settle
    Laplace   θ ← argmin D(θ) by BOBYQA from PQL's answer, each D(θ) a PIRLS run (passes
              warm-started from the last (β, b)) to its fixed point (β̂(θ), û(θ)):
                  D(θ) = −2 Σ log p(y | η̂) + |û|² + log|Λ'Z'ŴZΛ + I|
              (β inside PIRLS: lme4's nAGQ = 0, its "fast mode")

Var(β̂) = (R_X'R_X)⁻¹ of the final working model (σ = 1), conditional SDs from L.  One
grouping factor; binomial (logit, cloglog; 0/1 or cbind) and Poisson (log, offset()).  The
rows never enter memory on the SQL path: each pass holds O(levels).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .errors import DataError, InputError

PASS_FAMILIES = {"binomial": ("logit", "cloglog"), "poisson": ("log",)}
PIRLS_TOL = 1e-9  # relative change of the penalized deviance between PIRLS passes
PIRLS_MAXITER = 50
PQL_MAXITER = 30
PQL_TOL = 1e-4  # largest change of θ and β between PQL passes that ends PQL


class _Passes:
    """What a pass provider shares: the model's names, counts and the pass counter."""

    family: str
    link: str
    passes: int = 0
    _last = None

    def working(self, beta: np.ndarray, b: np.ndarray, M: np.ndarray | None = None):
        """(weighted working `Statistics` at η(β, b), Σ log p(y | η) with its constants);
        with M (per level Λ H_i⁻¹ Λ', (m, q, q)) also the Laplace term's derivative sums
        s1 = Σ a·w'·x (m, p) and s2 = Σ a·w'·z (m, q), a = z'M z, w' = dw/dη (else None).
        The last pass again when its arguments did not change (no pass counted)."""
        last = self._last
        if last is not None and np.array_equal(last[0], beta) and np.array_equal(last[1], b) \
                and ((M is None and last[2] is None) or (M is not None and last[2] is not None
                                                         and np.array_equal(last[2], M))):
            return last[3]
        self.passes += 1
        out = self._pass(beta, b, M)
        self._last = (np.array(beta, copy=True), np.array(b, copy=True),
                      None if M is None else np.array(M, copy=True), out)
        return out

    def _pass(self, beta: np.ndarray, b: np.ndarray, M):
        raise NotImplementedError


def _statistics(per: dict, m: int, p: int, q: int, base: dict):
    """A weighted `Statistics` from per-level sums `per[(i, j)]` of w·c_i·c_j over the
    columns c = [x_0..x_{p-1}, z_0..z_{q-1}, z̃] (each (m,))."""
    from .stats import Statistics

    X = list(range(p))
    Z = list(range(p, p + q))
    y = p + q

    def s(i, j):
        return per[(min(i, j), max(i, j))]

    ztz = np.empty((q, q, m))
    ztx = np.empty((q, p, m))
    zty = np.empty((q, m))
    for a, za in enumerate(Z):
        zty[a] = s(za, y)
        for c, zc in enumerate(Z):
            ztz[a, c] = s(za, zc)
        for j, xj in enumerate(X):
            ztx[a, j] = s(za, xj)
    xtx = np.array([[float(np.sum(s(i, j))) for j in X] for i in X])
    xty = np.array([float(np.sum(s(i, y))) for i in X])
    return Statistics(ztz=ztz, ztx=ztx, zty=zty, yty_i=s(y, y), xtx=xtx, xty=xty,
                      yty=float(np.sum(s(y, y))), weights="(working weights)", **base)


class PatternPasses(_Passes):
    """Passes over compressed patterns (mlpipe/glmm.py's `Patterns`), in memory."""

    def __init__(self, pat):
        from .glmm import _loglik_parts

        if len(pat.factors) > 1:
            raise InputError("nAGQ = 0 takes one grouping factor so far")
        self.pat, self.family, self.link = pat, pat.family, pat.link
        self._parts = _loglik_parts
        self.passes = 0
        self.base = dict(formula=pat.formula, response="", fixed_names=list(pat.fixed_names),
                         random_names=list(pat.random_names), blocks=list(pat.blocks),
                         group=pat.group, levels=np.asarray(pat.levels, dtype=object),
                         n_i=np.bincount(pat.level, pat.n, minlength=pat.m), n=pat.nobs)

    def _pass(self, beta, b, M):
        pat = self.pat
        eta = self._eta(beta, b)
        ll, score, w = self._parts(pat.family, pat.link, eta, pat.sy, pat.st, pat.n)
        zt = eta - pat.offset + score / w
        cols = [pat.X[:, j] for j in range(pat.X.shape[1])] + \
            [pat.Z[:, a] for a in range(pat.Z.shape[1])] + [zt]
        m = pat.m
        per = {(i, j): np.bincount(pat.level, w * cols[i] * cols[j], minlength=m)
               for i in range(len(cols)) for j in range(i, len(cols))}
        p, q = pat.X.shape[1], pat.Z.shape[1]
        stats = _statistics(per, m, p, q, self.base)
        s1 = s2 = None
        if M is not None:
            a = np.einsum("pa,pab,pb->p", pat.Z, M[pat.level], pat.Z)
            aw = a * _dweight(self.family, self.link, eta, pat.st, pat.n)
            s1 = np.stack([np.bincount(pat.level, aw * pat.X[:, j], minlength=m)
                           for j in range(p)], axis=1)
            s2 = np.stack([np.bincount(pat.level, aw * pat.Z[:, c], minlength=m)
                           for c in range(q)], axis=1)
        return stats, float(np.sum(ll)) + pat.const, s1, s2


    def diagnostics(self, beta, b) -> tuple[int, float | None]:
        """(rows with a fitted probability of 0 or 1, the Pearson statistic of a Poisson
        fit) at (β, b)."""
        from .glmm import pattern_diagnostics

        self.passes += 1  # as the DuckDB passes count theirs
        return pattern_diagnostics(self.pat, self._eta(beta, b))

    def _eta(self, beta, b) -> np.ndarray:
        """The patterns' linear predictor X β + offset + z'b of their level."""
        pat = self.pat
        return pat.X @ beta + pat.offset + np.einsum("pq,pq->p", pat.Z, b[pat.level])


class SqlPasses(_Passes):
    """Passes over the data with DuckDB (sql/glmm_pass.sql): β bound as parameters, the
    modes b joined per level; O(levels) memory."""

    def __init__(self, data, formula: str, family: str, link: str | None = None, *,
                 options=None):
        from ._sql import Source, connect, quote_ident, render
        from .design import check_columns, design_from_data
        from .formula import parse_formula
        from .glmm import check_outcome, outcome_sql, response_formula

        family = family.lower()
        if family not in PASS_FAMILIES:
            raise InputError(f"GLMMs by iterated passes take the families "
                             f"{', '.join(PASS_FAMILIES)} so far, not {family!r}")
        link = (link or PASS_FAMILIES[family][0]).lower()
        if link not in PASS_FAMILIES[family]:
            raise InputError(f"GLMMs by iterated passes take the {family} links "
                             f"{', '.join(PASS_FAMILIES[family])} so far, not {link!r}")
        self.family, self.link, self.passes = family, link, 0
        parsed = parse_formula(formula)
        cbind, design_formula = response_formula(parsed, family)
        self.source = source = Source(data)
        self.con = con = connect(options=options)
        schema = source.schema(con, parsed.value_columns())
        check_columns(design_formula, schema)
        design = design_from_data(con, source, design_formula, schema)
        if design.group is None:
            raise InputError("GLMMs by iterated passes take one grouping factor (on one "
                             "column) so far")
        if design.aggregates is not None and design.aggregates.tables:
            raise InputError("center()/group_mean() are not supported in GLMMs yet")
        self.design = design
        y, trials, const = outcome_sql(parsed, design, family, cbind)
        p, q = len(design.fixed), len(design.random)
        self.p, self.q = p, q
        cols = [f"CAST({c.sql or '1.0'} AS DOUBLE) AS c{j}"
                for j, c in enumerate(design.fixed + design.random)]
        eta = " + ".join([f"c{j} * $beta{j}" for j in range(p)]
                         + [f"c{p + a} * md.b{a}" for a in range(q)] + ["off"])
        k = p + q  # the working response's column
        sums = ", ".join(f"fsum(w * {self._col(i, k)} * {self._col(j, k)}) AS s_{i}_{j}"
                         for i in range(k + 1) for j in range(i, k + 1))
        group = quote_ident(design.group)
        self.params = {**source.params, **design.params}
        from ._sql import used_params

        sql = render("glmm_levels", group=group, source=source.relation,
                     complete=design.complete_sql)
        con.execute(sql, used_params(sql, self.params))
        lv = con.sql("SELECT grp, CAST(grp AS VARCHAR) AS level FROM "
                     "__mlpipe_glmm_levels ORDER BY idx").to_arrow_table()
        self.levels = np.asarray(lv.column("level").to_pylist(), dtype=object)
        self._grp = lv.column("grp")  # the level keys as typed in the data, for the join
        self.m = len(self.levels)
        if self.m < 2:
            raise DataError(f"grouping factor {design.group} has fewer than 2 levels in the "
                            f"rows used")
        pieces = dict(group=group, columns=", ".join(cols),
                      offset=f"CAST({design.offset or '0.0'} AS DOUBLE)", y=y, trials=trials,
                      const=const, source=source.relation, complete=design.complete_sql,
                      eta=eta, family=_family_sql(family, link))
        frame = render("glmm_frame", quad="", **pieces)
        self.sql = render("glmm_pass", sums=sums, derivative="", frame=frame)
        self.sql_diag = render("glmm_diagnostics", frame=frame, variance=(
            "mu" if family == "poisson" else "t * mu * (1.0 - mu)"))
        # with the Laplace term's derivative sums: a = z'Mz (M per level, joined with the
        # modes as m_a_b), w' = dw/dη (canonical links)
        zc = [f"c{p + a}" for a in range(q)]
        quad = " + ".join([f"{zc[a]} * {zc[a]} * md.m_{a}_{a}" for a in range(q)]
                          + [f"2.0 * {zc[a]} * {zc[c]} * md.m_{a}_{c}" for a in range(q)
                             for c in range(a + 1, q)])
        dw = "exp(eta)" if family == "poisson" else \
            "t * mu * (1.0 - mu) * (1.0 - 2.0 * mu)" if link == "logit" else "NULL"
        deriv = ", ".join([f"fsum(aw * c{j}) AS d1_{j}" for j in range(p)]
                          + [f"fsum(aw * {zc[a]}) AS d2_{a}" for a in range(q)])
        self.sql_d = render("glmm_pass", sums=f"{sums}, {deriv}",
                            derivative=f", quad * ({dw}) AS aw",
                            frame=render("glmm_frame", quad=f", {quad} AS quad", **pieces))
        checks = (f"SELECT count(*), coalesce(fsum({y}), 0), coalesce(fsum({trials}), 0), "
                  f"coalesce(min({y}), 0), coalesce(max(abs({y} - round({y}))), 0), "
                  f"max({y}) FROM {source.relation} AS src WHERE {design.complete_sql}")
        rows = con.execute(checks, used_params(checks, self.params)).fetchone()
        total = con.execute(f"SELECT count(*) FROM {source.relation}", source.params).fetchone()
        self.nobs, sy, st = int(rows[0]), float(rows[1]), float(rows[2])
        ymin, yfrac = float(rows[3]), float(rows[4])
        self.rows_dropped = int(total[0]) - self.nobs
        check_outcome(family, parsed.response.deparse(), cbind=cbind, y_min=ymin,
                      y_frac=yfrac, not_binary=rows[5] is not None and float(rows[5]) > 1,
                      total_y=sy, total_trials=st)
        n_i = con.execute("SELECT n FROM __mlpipe_glmm_levels ORDER BY idx").fetchnumpy()["n"]
        self.base = dict(formula=parsed.text, response="", fixed_names=[c.name for c in
                                                                        design.fixed],
                         random_names=[c.name for c in design.random],
                         blocks=[(b.start, b.size) for b in design.blocks], group=design.group,
                         levels=self.levels, n_i=np.asarray(n_i, float), n=self.nobs,
                         factor_levels=dict(design.levels),
                         group_type=schema.get(design.group, ""))
        self.fixed_names = self.base["fixed_names"]
        self.random_names = self.base["random_names"]
        self.blocks = self.base["blocks"]
        self.group = design.group
        self.factor_levels = dict(design.levels)
        self.group_types = {design.group: schema.get(design.group, "")}
        self.location = source.location
        self.formula = parsed.text

    @staticmethod
    def _col(i: int, k: int) -> str:
        return "zt" if i == k else f"c{i}"

    def _run(self, sql: str, beta, b, M, fetch):
        """`sql` over the data with β bound and the modes b (and M) joined per level."""
        import duckdb
        import pyarrow as pa

        from ._sql import used_params

        cols = {"grp": self._grp, "idx": np.arange(self.m, dtype=np.int64),
                **{f"b{a}": np.ascontiguousarray(b[:, a]) for a in range(self.q)}}
        if M is not None:
            cols.update({f"m_{a}_{c}": np.ascontiguousarray(M[:, a, c])
                         for a in range(self.q) for c in range(a, self.q)})
        self.con.register("__mlpipe_glmm_modes", pa.table(cols))
        params = used_params(sql, {**self.params,
                                   **{f"beta{j}": float(v) for j, v in enumerate(beta)}})
        try:
            return fetch(self.con.execute(sql, params))
        except duckdb.Error as exc:
            raise self.source.error(exc, "the GLMM pass failed over") from None
        finally:
            self.con.unregister("__mlpipe_glmm_modes")

    def _pass(self, beta, b, M):
        tab = self._run(self.sql if M is None else self.sql_d, beta, b, M,
                        lambda res: res.fetchnumpy())
        idx = np.asarray(tab["idx"], np.int64)
        k = self.p + self.q
        per = {}
        for i in range(k + 1):
            for j in range(i, k + 1):
                col = np.zeros(self.m)
                col[idx] = np.asarray(tab[f"s_{i}_{j}"], float)
                per[(i, j)] = col
        ll = float(np.sum(tab["ll"]))
        s1 = s2 = None
        if M is not None:
            s1, s2 = np.zeros((self.m, self.p)), np.zeros((self.m, self.q))
            for j in range(self.p):
                s1[idx, j] = np.asarray(tab[f"d1_{j}"], float)
            for a in range(self.q):
                s2[idx, a] = np.asarray(tab[f"d2_{a}"], float)
        return _statistics(per, self.m, self.p, self.q, self.base), ll, s1, s2

    def diagnostics(self, beta, b) -> tuple[int, float]:
        """(rows with a fitted probability of 0 or 1, the Pearson statistic) at (β, b): one
        more pass."""
        self.passes += 1
        extreme, pearson = self._run(self.sql_diag, beta, b, None,
                                     lambda res: res.fetchall()[0])
        return int(extreme or 0), float(pearson or 0.0)

    def close(self):
        self.con.close()


def _dweight(family: str, link: str, eta, st, n):
    """dw/dη of the working weight (canonical links: w = t μ(1 − μ), or μ), per pattern."""
    if family == "poisson":
        return n * np.exp(eta)
    if link != "logit":
        raise InputError("the Laplace fit by passes (nAGQ = 1) takes the canonical links "
                         "(binomial logit, Poisson log) so far")
    mu = 1.0 / (1.0 + np.exp(-eta))
    return st * mu * (1.0 - mu) * (1.0 - 2.0 * mu)


def _family_sql(family: str, link: str) -> str:
    """SQL of mu, the working weight w, the score and the log-likelihood ll (constants
    apart) from eta, y and the trials t, as mlpipe.glmm._loglik_parts computes them."""
    if family == "poisson":
        return ("exp(eta) AS mu, exp(eta) AS w, y - exp(eta) AS score, "
                "y * eta - exp(eta) + cst AS ll")
    if link == "logit":  # softplus(η) = log(1 + e^η), stable
        mu = "1.0 / (1.0 + exp(-eta))"
        return (f"{mu} AS mu, t * {mu} * (1.0 - {mu}) AS w, y - t * {mu} AS score, "
                f"y * eta - t * (greatest(eta, 0.0) + ln(1.0 + exp(-abs(eta)))) + cst AS ll")
    # cloglog: μ = 1 − exp(−e^η), dμ/dη = e^η exp(−e^η); μ clipped as _loglik_parts does
    mu = "least(greatest(1.0 - exp(-exp(eta)), 1e-300), 1.0 - 1e-16)"
    dmu = "exp(eta - exp(eta))"
    var = f"({mu}) * (1.0 - ({mu}))"
    return (f"{mu} AS mu, t * ({dmu}) * ({dmu}) / ({var}) AS w, "
            f"(y - t * ({mu})) * ({dmu}) / ({var}) AS score, "
            f"y * ln({mu}) + (t - y) * ln(1.0 - ({mu})) + cst AS ll")


# ---------------------------------------------------------------------- the fit

class _State:
    """The current (β, b, u) and the working statistics at them."""

    def __init__(self, q: int, m: int, p: int):
        self.beta = np.zeros(p)
        self.b = np.zeros((m, q))
        self.u2 = 0.0


def _pwls(stats, theta):
    """The penalized weighted least squares step of the working model at θ → (β̂, b̂ (m, q),
    |û|², log|L|², the decomposition)."""
    from ._levels import const_matmul, solve_lower_t
    from .objective import Objective

    obj = Objective(stats, reml=False)
    dec = obj.decompose(theta)
    r = dec.cu - np.tensordot(dec.beta, dec.rzx, axes=(0, 1))  # (q, m)
    u = solve_lower_t(dec.L, r)
    b = const_matmul(dec.T, u)
    return dec.beta, b.T.copy(), float(np.sum(u * u)), float(dec.logdet_l), dec, obj


def _pirls(src: _Passes, theta, st: _State):
    """PIRLS at θ from st's (β, b) to the fixed point → D(θ) (−2 × the Laplace
    log-likelihood, nAGQ = 0) and the last decomposition; st is updated in place."""
    stats, ll, _s1, _s2 = src.working(st.beta, st.b)
    beta, b, u2, _logdet, _dec, _obj = _pwls(stats, theta)
    st.u2 = _u2(theta, st.b, stats)  # the same modes b are another u at this θ
    pdev_old = -2 * ll + st.u2
    for _ in range(PIRLS_MAXITER):
        new_stats, new_ll, _s1, _s2 = src.working(beta, b)
        pdev = -2 * new_ll + u2
        halvings = 0
        while not pdev <= pdev_old + 1e-10 * abs(pdev_old) and halvings < 10:
            beta, b = (beta + st.beta) / 2, (b + st.b) / 2  # step halving, as lme4's PIRLS
            u2 = _u2(theta, b, stats)
            new_stats, new_ll, _s1, _s2 = src.working(beta, b)
            pdev = -2 * new_ll + u2
            halvings += 1
        st.beta, st.b, st.u2 = beta, b, u2
        stats, ll = new_stats, new_ll
        beta, b, u2, logdet, _dec, _obj = _pwls(stats, theta)
        if abs(pdev_old - pdev) <= PIRLS_TOL * abs(pdev):  # log|L|² at the last weights:
            return pdev + logdet, stats, ll  # _pwls just decomposed them
        pdev_old = pdev
    return np.inf, stats, ll


def _mean_eta(src: _Passes, stats) -> float:
    """The link of the outcome's mean: a start for the intercept (from a pass at η = 0,
    whose working response is (y − μ₀)/w₀ with μ₀, w₀ known)."""
    n, szt, sw = stats.n, float(stats.xty[0]), float(stats.xtx[0, 0])
    if src.family == "poisson":  # η = 0: μ = 1, w = 1, z̃ = y − 1 → ȳ = 1 + mean z̃
        ybar = 1.0 + szt / max(sw, 1e-300)
        return math.log(max(ybar, 1e-8))
    # binomial, logit at η = 0: μ = 1/2, w = t/4, z̃ = 4(y/t − 1/2)·... → p̄ = 1/2 + Σwz̃/(4Σw)
    pbar = min(max(0.5 + szt / max(4 * sw, 1e-300), 1e-6), 1 - 1e-6)
    if src.link == "cloglog":
        return math.log(-math.log1p(-pbar))
    return math.log(pbar / (1 - pbar)) if n else 0.0


def _u2(theta, b, stats) -> float:
    """|u|² of modes b = Λu (per level), Λ = T at θ."""
    from .objective import ThetaMap

    T = ThetaMap(stats.blocks, stats.q).T(theta)
    try:
        u = np.linalg.solve(T, b.T)
    except np.linalg.LinAlgError:
        u = np.linalg.lstsq(T, b.T, rcond=None)[0]
    return float(np.sum(u * u))


class Laplace1:
    """The Laplace deviance of (θ, β) — glmer's nAGQ = 1 — and its exact gradient, each
    evaluation a PIRLS run over u at fixed (θ, β) by passes (warm-started from the last
    modes):

        D(θ, β) = −2 Σ log p(y | η̂) + |û|² + Σ_i log|H_i|,  H_i = Λ'Z_i'W_iZ_iΛ + I

    With F = −2Σℓ + |u|² stationary in u at û, a_r = z_r'ΛH_i⁻¹Λ'z_r and w' = dw/dη
    (canonical links), the pass's s1_i = Σ a w' x and s2_i = Σ a w' z give

        ∂D/∂β   = −2 X'score + Σ_i s1_i − Σ_i (Z_i'W_iX_i)' ΛH_i⁻¹Λ' s2_i
        ∂D/∂θ_k = −2 Σ_i u_i'E_k'c_i + 2 Σ_i tr(H_i⁻¹Λ'A_iE_k) + Σ_i s2_i'E_k u_i
                  + Σ_i s2_i'ΛH_i⁻¹(E_k'c_i − Λ'A_iE_k u_i)

    (c_i = Z_i'score, A_i = Z_i'W_iZ_i, E_k = ∂Λ/∂θ_k; dû/dβ and dû/dθ from the
    stationarity of F).  M = ΛH⁻¹Λ' is joined from the previous PIRLS iterate."""

    def __init__(self, src: _Passes, tm, p: int, m: int, q: int):
        self.src, self.tm, self.p, self.m, self.q = src, tm, p, m, q
        self.u = np.zeros((m, q))
        self.M = np.zeros((m, q, q))
        self.evaluations = 0

    def split(self, x):
        k = len(self.tm)
        return np.asarray(x[:k], float), np.asarray(x[k:], float)

    def value_and_gradient(self, x):
        theta, beta = self.split(x)
        if np.any(theta[self.tm.diagonal] < 0):
            return np.inf, np.zeros(len(x))
        self.evaluations += 1
        T = self.tm.T(theta)
        u, u_prev, pdev_prev, halvings = self.u.copy(), None, np.inf, 0
        for _ in range(PIRLS_MAXITER):
            b = u @ T.T
            stats, ll, s1, s2 = self.src.working(beta, b, self.M)
            pdev = -2 * ll + float(np.sum(u * u))
            if u_prev is not None and not pdev <= pdev_prev + 1e-10 * abs(pdev_prev) \
                    and halvings < 10:
                u, halvings = (u + u_prev) / 2, halvings + 1  # step halving, as lme4's
                continue
            halvings = 0
            A = np.moveaxis(stats.ztz, -1, 0)
            ZX = np.moveaxis(stats.ztx, -1, 0)
            c = stats.zty.T - ZX @ beta - np.einsum("mab,mb->ma", A, b)  # Z_i'score
            H = np.einsum("ba,mbc,cd->mad", T, A, T) + np.eye(self.q)
            Hinv = np.linalg.inv(H)
            self.M = np.einsum("ab,mbc,dc->mad", T, Hinv, T)
            if u_prev is not None and abs(pdev_prev - pdev) <= PIRLS_TOL * abs(pdev):
                break
            u_prev, pdev_prev = u, pdev
            u = u + np.einsum("mab,mb->ma", Hinv, c @ T - u)
        else:
            return np.inf, np.zeros(len(x))
        self.u = u
        sign, logdet = np.linalg.slogdet(H)
        value = pdev + float(np.sum(logdet))
        # the gradient
        xscore = stats.xty - stats.xtx @ beta - np.einsum("maj,ma->j", ZX, b)
        g_beta = -2 * xscore + s1.sum(axis=0) - np.einsum("maj,mab,mb->j", ZX, self.M, s2)
        TA = np.einsum("ba,mbc->mac", T, A)  # T'A_i
        PTA = Hinv @ TA  # H⁻¹T'A_i
        Y = np.einsum("ma,ab,mbc->mc", s2, T, Hinv)  # s2_i'T H_i⁻¹
        g_theta = np.empty(len(self.tm))
        for k, (r, cc) in enumerate(zip(self.tm.rows, self.tm.cols)):
            g_theta[k] = (-2 * np.sum(u[:, cc] * c[:, r]) + 2 * np.sum(PTA[:, cc, r])
                          + np.sum(s2[:, r] * u[:, cc]) + np.sum(Y[:, cc] * c[:, r])
                          - np.sum(np.einsum("ma,ma->m", Y, TA[:, :, r]) * u[:, cc]))
        self._last = (stats, Hinv, b)
        return value, np.concatenate([g_theta, g_beta])


def fit_laplace(src: _Passes, theta0, beta0, b0):
    """(θ̂, β̂) of the Laplace deviance by L-BFGS-B on its exact gradient from a start
    (PQL's); returns the objective (its last evaluation at the answer) and the answer."""
    from scipy.optimize import minimize

    from .objective import ThetaMap

    base = src.base
    p, q, m = len(base["fixed_names"]), len(base["random_names"]), len(base["levels"])
    tm = ThetaMap(base["blocks"], q)
    obj = Laplace1(src, tm, p, m, q)
    T0 = tm.T(theta0)
    try:
        obj.u = np.linalg.solve(T0, b0.T).T
    except np.linalg.LinAlgError:
        obj.u = np.zeros((m, q))
    x0 = np.concatenate([theta0, beta0])
    # scaled parameters z = s·x, s² ~ the curvature: O(levels) for θ, the working model's
    # X'WX diagonal for β (a predictor in centimetres otherwise stalls L-BFGS far from the
    # optimum: grouseticks' cHEIGHT stopped it with a gradient of 118)
    stats = src.working(beta0, b0)[0]
    s = np.concatenate([np.full(len(theta0), math.sqrt(max(m, 1))),
                        np.sqrt(np.maximum(np.diag(stats.xtx), 1e-12))])

    def scaled(z):
        value, grad = obj.value_and_gradient(z / s)
        return value, grad / s

    bounds = [(0.0, None) if d else (None, None) for d in tm.diagonal] + [(None, None)] * p
    res = minimize(scaled, x0 * s, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 500})
    x = np.asarray(res.x, float) / s
    value, grad = obj.value_and_gradient(x)
    return obj, x, value, grad, res


def fit_passes(src: _Passes, *, nagq: int = 0, messages: list[str] | None = None):
    """The nAGQ = 0 or 1 (Laplace) fit over the passes of `src` (see the module docstring)
    → FitResult."""
    import nlopt
    from scipy.optimize import minimize

    from .objective import ThetaMap

    t0 = time.perf_counter()
    base = src.base
    p, q = len(base["fixed_names"]), len(base["random_names"])
    m = len(base["levels"])
    tm = ThetaMap(base["blocks"], q)
    st = _State(q, m, p)
    # the GLM: PIRLS at θ = 0 (no random effects) from β = 0, the intercept at the mean
    if "(Intercept)" in base["fixed_names"]:
        stats0 = src.working(st.beta, st.b)[0]
        st.beta[base["fixed_names"].index("(Intercept)")] = _mean_eta(src, stats0)
    glm = _pirls(src, np.zeros(len(tm.initial)), st)[0]
    if not np.isfinite(glm):
        raise DataError("the GLM start (no random effects) did not converge: check the "
                        "outcome and the predictors' scales")
    theta = tm.initial.copy()
    # PQL: the working model's criterion with σ = 1 (r² + log|L|²) minimized in memory per pass
    pql_passes = 0
    for it in range(PQL_MAXITER):
        stats = src.working(st.beta, st.b)[0]
        pql_passes += 1
        from .objective import Objective

        obj = Objective(stats, reml=False)

        def f(th):
            try:
                parts = obj.parts(th)
            except Exception:  # noqa: BLE001 - undefined at this θ
                return np.inf, np.zeros(len(th))
            return parts.r2 + parts.logdet_l, parts.d_r2 + parts.d_logdet_l

        # a diagonal bound just above 0: at exactly 0 the objective drops the column and
        # its derivative reads 0 (a false stationary point for a gradient method)
        res = minimize(f, np.maximum(theta, np.where(tm.diagonal, 1e-6, -np.inf)), jac=True,
                       method="L-BFGS-B",
                       bounds=[(1e-6, None) if d else (None, None) for d in tm.diagonal])
        new_theta = np.asarray(res.x, float)
        beta, b, u2, _logdet, _dec, _obj = _pwls(stats, new_theta)
        moved = max(np.max(np.abs(new_theta - theta)), np.max(np.abs(beta - st.beta)))
        theta, st.beta, st.b, st.u2 = new_theta, beta, b, u2
        if moved < PQL_TOL:  # close enough: the Laplace search finishes the job
            break
    theta_pql = theta.copy()
    if nagq == 1:
        return _laplace_result(src, theta, st, tm, messages, pql_passes, t0)
    # Laplace over θ (nAGQ = 0): each value a PIRLS run warm-started from the last
    evals = [0]
    best = {"f": np.inf, "theta": theta.copy()}

    def D(th):
        th = np.asarray(th, float)
        if np.any(th[tm.diagonal] < 0):
            return np.inf
        evals[0] += 1
        keep = (st.beta.copy(), st.b.copy(), st.u2)
        with np.errstate(all="ignore"):
            try:
                value, _s, _l = _pirls(src, th, st)
            except (np.linalg.LinAlgError, FloatingPointError, ValueError):
                value = np.inf
        if not np.isfinite(value):
            st.beta, st.b, st.u2 = keep
            return np.inf
        if value < best["f"]:
            best.update(f=value, theta=th.copy())
        return value

    D(theta)
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(theta))
    opt.set_lower_bounds(np.where(np.isfinite(tm.lower), tm.lower, -1e10))
    opt.set_min_objective(lambda x, grad: D(x))
    opt.set_ftol_rel(1e-10)
    opt.set_xtol_abs(1e-7)
    opt.set_maxeval(500)
    opt.set_initial_step(np.maximum(0.05 * np.abs(theta), 0.02))
    try:
        opt.optimize(theta)
    except (nlopt.RoundoffLimited, ValueError):
        pass
    theta = best["theta"]
    dev, stats, ll = _pirls(src, theta, st)
    if not np.isfinite(dev):
        raise DataError("PIRLS did not converge at the estimates: check the outcome and "
                        "the predictors' scales")
    beta, b, u2, logdet, dec, obj = _pwls(stats, theta)
    # Var(β̂) = (R_X'R_X)⁻¹ of the working model (σ = 1); Var(b | y) = T (L L')⁻¹ T'
    vcov = np.linalg.inv(dec.xtx_adj)
    from ._levels import solve_lower

    B = solve_lower(dec.L, dec.T.T[:, :, None])
    cond_sd = np.sqrt(np.einsum("kjm,kjm->jm", B, B)).T  # (m, q)
    how = (f"nAGQ = 0 (theta by the Laplace approximation, beta inside PIRLS) over "
           f"{src.passes} passes ({pql_passes} of PQL, then {evals[0]} Laplace evaluations by "
           f"BOBYQA from PQL's theta {np.round(theta_pql, 6).tolist()})")
    return _result(src, theta, beta, b, cond_sd, vcov, dev, 0, how, theta_pql, evals[0],
                   messages, t0)


def _hessian_of(obj, x, grad, tm, k: int) -> np.ndarray:
    """The Hessian of the Laplace deviance at x by central differences of its gradient
    (forward ones were 1% off in the SEs; forward at a zero variance)."""
    n = len(x)
    H = np.empty((n, n))
    for i in range(n):
        h = 1e-5 * max(1.0, abs(x[i]))
        e = np.zeros(n)
        e[i] = h
        lo = x - e
        if i < k and tm.diagonal[i] and lo[i] < 0:
            H[i] = (obj.value_and_gradient(x + e)[1] - grad) / h
        else:
            H[i] = (obj.value_and_gradient(x + e)[1] - obj.value_and_gradient(lo)[1]) / (2 * h)
    return (H + H.T) / 2


def _laplace_result(src, theta, st, tm, messages, pql_passes, t0):
    """nAGQ = 1 from PQL's answer: `fit_laplace`, SEs from the Hessian of D in (θ, β) by
    central differences of the exact gradient (glmer's default, use.hessian, takes them of
    the deviance)."""
    before = src.passes
    obj, x, dev, _grad, res = fit_laplace(src, theta, st.beta, st.b)
    if not np.isfinite(dev):
        raise DataError("PIRLS did not converge at the estimates: check the outcome and "
                        "the predictors' scales")
    k = len(theta)
    Hs = _hessian_of(obj, x, _grad, tm, k)
    # Newton steps on that Hessian where L-BFGS-B left a gradient (the Hessian is kept: the
    # steps are small against the SEs)
    for _ in range(3):
        try:
            step = -np.linalg.solve(Hs, _grad)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)) or float(-_grad @ step) <= 1e-10 * max(1.0, abs(dev)):
            break
        xn = x + step
        if np.any(xn[:k][tm.diagonal] < 0):
            break
        dn, gn = obj.value_and_gradient(xn)
        if not dn < dev:
            break
        x, dev, _grad = xn, dn, gn
    obj.value_and_gradient(x)  # the modes at the answer again
    theta, beta = obj.split(x)
    try:
        vcov = 2 * np.linalg.inv(Hs)[k:, k:]
        if not np.all(np.isfinite(vcov)) or np.any(np.diag(vcov) <= 0):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        vcov = np.full((len(beta), len(beta)), np.nan)
    T = tm.T(theta)
    b = obj.u @ T.T
    cond_sd = np.sqrt(np.clip(np.einsum("maa->ma", obj.M), 0, None))
    how = (f"Laplace (nAGQ = 1) over {src.passes} passes ({pql_passes} of PQL from the GLM, "
           f"then {obj.evaluations} evaluations of the deviance and its exact gradient by "
           f"L-BFGS-B, {src.passes - before} passes with the Hessian's; {res.message})")
    return _result(src, theta, beta, b, cond_sd, vcov, dev, 1, how, theta, obj.evaluations,
                   messages, t0)


def _result(src, theta, beta, b, cond_sd, vcov, dev, nagq, how, theta_start, evaluations,
            messages, t0):
    """The FitResult of a fit by passes."""
    import polars as pl
    from scipy.special import ndtr

    from .objective import ThetaMap
    from .optimize import SINGULAR_TOL, OptSummary
    from .results import FitResult, modes_table, variance_tables

    base = src.base
    p, m = len(base["fixed_names"]), len(base["levels"])
    tm = ThetaMap(base["blocks"], len(base["random_names"]))
    se = np.sqrt(np.diag(vcov))
    z = beta / se
    fixed = pl.DataFrame({"term": base["fixed_names"], "estimate": beta, "std_error": se,
                          "t_value": z, "df": [None] * p, "p_value": 2 * ndtr(-np.abs(z))},
                         schema={"term": pl.Utf8, "estimate": pl.Float64,
                                 "std_error": pl.Float64, "t_value": pl.Float64,
                                 "df": pl.Float64, "p_value": pl.Float64})
    T = tm.T(theta)
    group = base["group"]
    rand, corrs = variance_tables([(group, base["random_names"], T @ T.T, base["blocks"])])
    ranef = modes_table(group, base["levels"], base["random_names"], b, cond_sd)
    k = len(theta)
    npar = p + k
    nobs = int(base["n"])
    singular = bool(np.any(theta[tm.diagonal] < SINGULAR_TOL))
    msgs = list(messages or [])
    msgs.append(how)
    from .glmm import diagnostic_messages

    extreme, pearson = src.diagnostics(beta, b)
    msgs += diagnostic_messages(src.family, extreme_rows=extreme, pearson=pearson,
                                df=nobs - npar, singular=singular)
    ok = bool(np.all(np.isfinite(se)))
    if not ok:
        msgs.append("the Hessian of the deviance is not positive definite: no SEs")
    summary = OptSummary("PQL, then " + ("LN_BOBYQA on the nAGQ=0 Laplace deviance"
                                         if nagq == 0 else "L-BFGS-B on the Laplace deviance"),
                         list(np.asarray(theta_start, float)), float("nan"), theta.tolist(),
                         float(dev), evaluations=evaluations, return_code="SUCCESS",
                         converged=ok, reml=False, seconds=time.perf_counter() - t0,
                         messages=msgs, start="pql")
    result = FitResult(
        formula=base["formula"], method="ML", nobs=nobs, groups={group: m},
        fixed_effects=fixed, vcov_matrix=vcov, random_effects=rand, random_correlations=corrs,
        residual_variance=float("nan"), sigma=1.0, loglik=-dev / 2, deviance=float(dev),
        reml_criterion=None, aic=dev + 2 * npar, bic=dev + npar * math.log(nobs), npar=npar,
        converged=ok, singular=singular, optimizer=summary, ranef=ranef, theta=theta,
        rows_dropped=int(getattr(src, "rows_dropped", 0)), stats=None)
    result.family, result.link, result.nagq = src.family, src.link, nagq
    result.factor_levels = dict(base.get("factor_levels") or {})
    result.group_types = getattr(src, "group_types", {group: base.get("group_type", "")})
    result.passes = src.passes
    return result
