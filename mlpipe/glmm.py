"""Generalized linear mixed models (first step): binomial (logit, probit, cloglog; a 0/1
outcome or lme4's `cbind(successes, failures)`) and Poisson (log, with `offset()`), one
grouping factor with any random effects, by the Laplace approximation (lme4's nAGQ = 1).

The data are compressed once (`sql/glmm_patterns.sql`): the rows are grouped by level and
by the values of every model column (the covariate pattern), keeping per pattern the row
count, Σ successes / Σ trials (binomial) or Σ y (Poisson) and Σ of the log-likelihood's
constant (the binomial coefficients, −log y!).  That is exact — every row of a pattern has
the same linear predictor — and the fit iterates in memory over the patterns, never over
rows.  It pays when the patterns are few (categorical predictors, a cbind table); with
continuous predictors every row is its own pattern, and above `MAX_PATTERNS` (counted first,
approximately, in constant memory) `TooManyPatterns` sends the fit to the iterated passes
of mlpipe/glmm_passes.py.

Laplace (per evaluation, at (θ, β)): for each level the conditional mode û of the spherical
random effects u (b = Λu) maximizes Σ_p ℓ_p(x_p'β + z_p'Λu + offset_p) − ½|u|², found by
Newton's method batched over the levels (PIRLS); then

    log L(θ, β) ≈ Σ_p ℓ_p(η̂_p) − ½ Σ_i |û_i|² − ½ Σ_i log|Λ'Z_i'W_iZ_iΛ + I|

with W the working weights at û.  (θ, β) maximize it (BOBYQA, θ's diagonal ≥ 0), from a
GLM fit and θ = 1, as glmer's second stage.  Standard errors of β: the inverse of the
Hessian of −2 log L in (θ, β) by central differences, its β block (glmer's default,
`use.hessian = TRUE`).  Conditional SDs of b: from the inverse of Λ'Z'WZΛ + I at û.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import polars as pl

from .errors import DataError, InputError

FAMILIES = {"binomial": ("logit", "probit", "cloglog"), "poisson": ("log",),
            "negative_binomial": ("log",), "gamma": ("log", "inverse"),
            "ordinal": ("logit", "probit")}
#: families with one more parameter, estimated with (θ, β) on the log scale: the negative
#: binomial's θ, the gamma's shape ν (dispersion 1/ν)
EXTRA = ("negative_binomial", "gamma")
#: the ordinal family's thresholds α_1 < … < α_{K−1} ride at the end of the parameters as
#: (α_1, log(α_2 − α_1), …); its patterns are grouped by category (kept in `st`)
MAX_PATTERNS = 2_000_000
PIRLS_TOL = 1e-10
PIRLS_MAXITER = 100


# ---------------------------------------------------------------------- families

def _cdf_pdf_dpdf(link: str, x: np.ndarray):
    """F, f and f' of the cumulative link's latent distribution (logistic or normal), with
    F(±inf) = 1 / 0 and f(±inf) = f'(±inf) = 0."""
    with np.errstate(over="ignore", invalid="ignore"):
        if link == "logit":
            F = 1.0 / (1.0 + np.exp(-x))
            f = F * (1.0 - F)
            return F, f, f * (1.0 - 2.0 * F)
        from scipy.special import ndtr

        F = ndtr(x)
        f = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        f = np.where(np.isfinite(x), f, 0.0)
        return F, f, np.where(np.isfinite(x), -x * f, 0.0)


def _ordinal_parts(link: str, eta, cat, n, alpha):
    """ℓ, dℓ/dη and the observed weight −d²ℓ/dη² (as ordinal::clmm's Laplace) per pattern of
    category `cat` (0..K−1) at thresholds `alpha` (K−1,)."""
    cuts = np.concatenate([[-np.inf], alpha, [np.inf]])
    a, b = cuts[cat + 1] - eta, cuts[cat] - eta
    Fa, fa, da = _cdf_pdf_dpdf(link, a)
    Fb, fb, db = _cdf_pdf_dpdf(link, b)
    P = np.clip(Fa - Fb, 1e-300, None)
    g = (fa - fb) / P
    ll = n * np.log(P)
    return ll, -n * g, n * (g * g - (da - db) / P)


def _inverse_link(link: str, eta: np.ndarray):
    """μ, dμ/dη."""
    if link == "logit":
        mu = 1.0 / (1.0 + np.exp(-eta))
        return mu, mu * (1.0 - mu)
    if link == "probit":
        from scipy.special import ndtr

        return ndtr(eta), np.exp(-0.5 * eta * eta) / math.sqrt(2 * math.pi)
    if link == "cloglog":
        e = np.exp(eta)
        return -np.expm1(-e), e * np.exp(-e)
    if link == "log":
        mu = np.exp(eta)
        return mu, mu
    raise InputError(f"unknown link {link!r}")


def _loglik_parts(family: str, link: str, eta, sy, st, n, nb: float | None = None):
    """Per pattern: ℓ (without the constant), dℓ/dη and the working weight −E d²ℓ/dη²
    (the expected information, as PIRLS uses; equal to the observed one for canonical
    links).  `nb`: the negative binomial's θ (NB2: Var = μ + μ²/θ); its patterns are
    grouped by y too, so y = sy / n."""
    if family == "ordinal":  # cumulative link: P(Y ≤ c) = F(α_c − η); st = the category c
        return _ordinal_parts(link, eta, st.astype(np.int64), n, nb)
    if family == "gamma":  # st = Σ log y; the observed weights, as glmmTMB's
        from scipy.special import gammaln

        const = n * (nb * math.log(nb) - gammaln(nb)) + (nb - 1.0) * st
        if link == "inverse":  # μ = 1/η, defined for η > 0 only (elsewhere ℓ = −inf)
            ok = eta > 0
            pos = np.where(ok, eta, 1.0)
            ll = np.where(ok, const - nb * sy * pos + n * nb * np.log(pos), -np.inf)
            return ll, np.where(ok, nb * (n / pos - sy), 0.0), np.where(ok, n * nb / pos**2,
                                                                         1.0)
        e = sy * np.exp(-eta)
        ll = const - nb * e - n * nb * eta
        return ll, nb * (e - n), nb * e
    mu, dmu = _inverse_link(link, eta)
    if family == "negative_binomial":
        from scipy.special import gammaln

        y = sy / n
        lt = np.log(nb + mu)
        ll = n * (nb * (math.log(nb) - lt) + y * (eta - lt) + gammaln(y + nb)
                  - gammaln(nb))
        return ll, n * nb * (y - mu) / (nb + mu), n * mu * nb / (nb + mu)
    if family == "binomial":
        eps = 1e-300
        mu = np.clip(mu, eps, 1 - 1e-16)
        ll = sy * np.log(mu) + (st - sy) * np.log1p(-mu)
        var = mu * (1.0 - mu)
        score = (sy - st * mu) * dmu / var
        w = st * dmu * dmu / var
        return ll, score, w
    # poisson, log link
    ll = sy * eta - n * mu
    return ll, sy - n * mu, n * mu


# ---------------------------------------------------------------------- the patterns

class TooManyPatterns(InputError):
    """The compressed data would be too large for memory: fit by iterated passes instead
    (mlpipe/glmm_passes.py)."""

    def __init__(self, message: str, patterns: int):
        super().__init__(message)
        self.patterns = patterns


@dataclasses.dataclass
class Patterns:
    """The compressed data: per pattern its level index, X row, Z row, offset, row count,
    Σy (successes), Σ trials (binomial) and Σ of the log-likelihood constant."""

    family: str
    link: str
    formula: str
    fixed_names: list[str]
    random_names: list[str]
    blocks: list[tuple[int, int]]
    group: str
    levels: np.ndarray
    level: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    offset: np.ndarray
    n: np.ndarray
    sy: np.ndarray
    st: np.ndarray
    const: float
    nobs: int
    rows_dropped: int
    timings: dict = dataclasses.field(default_factory=dict)
    #: every grouping factor: (name, level labels, level of each pattern (P,), its Z columns
    #: (indices into Z's columns), its correlated blocks); `group`/`levels`/`level` are the
    #: first's
    factors: list = dataclasses.field(default_factory=list)
    z_names: list = dataclasses.field(default_factory=list)  # the names of Z's columns
    categories: list = dataclasses.field(default_factory=list)  # ordinal: in order
    factor_levels: dict = dataclasses.field(default_factory=dict)  # the coding (design)
    group_types: dict = dataclasses.field(default_factory=dict)  # DuckDB type per column
    source: str = ""  # the data's location, for prediction and residuals
    syy: np.ndarray | None = None  # Σ y² per pattern (the Pearson statistic)

    @property
    def m(self) -> int:
        return len(self.levels)


def response_formula(parsed, family: str):
    """(whether the response is lme4's cbind(successes, failures), the formula whose
    response is the successes) — refused for another family than the binomial."""
    cbind = parsed.response.kind == "call" and parsed.response.value == "cbind"
    if cbind and family != "binomial":
        raise InputError("a cbind(successes, failures) response needs --family binomial")
    return cbind, (dataclasses.replace(parsed, response=parsed.response.args[0]) if cbind
                   else parsed)


def outcome_sql(parsed, design, family: str, cbind: bool,
                ordinal_column: str | None = None) -> tuple[str, str, str]:
    """SQL of the outcome y, the trials t (binomial; Σ log y for the gamma) and the row's
    log-likelihood constant (log binomial coefficient, −log y!) — for the patterns' pass
    and the iterated passes alike."""
    from ._sql import quote_ident

    y = f"CAST({design.response.sql} AS DOUBLE)"
    if cbind:
        fail = f"CAST({parsed.response.args[1].sql()} AS DOUBLE)"
        trials = f"({y} + {fail})"
        return y, trials, f"(lgamma({trials} + 1) - lgamma({y} + 1) - lgamma({fail} + 1))"
    if family == "binomial":
        return y, "1.0", "0.0"
    if family == "gamma":  # Σ log y rides in the trials' column
        return y, f"ln(greatest({y}, 1e-300))", "0.0"
    if ordinal_column is not None:  # the category (a number), a pattern key
        return f"CAST(src.{quote_ident(ordinal_column)} AS DOUBLE)", "0.0", "0.0"
    return y, "1.0", f"(-lgamma({y} + 1))"  # poisson, negative binomial: −log y!


def check_outcome(family: str, what: str, *, cbind: bool, y_min: float, y_frac: float,
                  not_binary: bool, total_y: float, total_trials: float) -> None:
    """Refuse an outcome the family cannot model (the patterns' pass and the iterated
    passes alike): a gamma outcome ≤ 0, fractional counts, a 0/1 outcome with other values
    (`not_binary`), a constant binomial outcome, counts all 0 or negative."""
    if family == "gamma" and not y_min > 0:
        raise DataError(f"gamma outcome {what}: values must be > 0 (smallest {y_min:g})")
    if family in ("poisson", "negative_binomial", "binomial") and y_frac > 1e-9:
        raise DataError(f"{family} outcome {what}: values must be whole numbers (counts"
                        f"{', or 0/1' if family == 'binomial' else ''}); found a fraction")
    if family == "binomial" and not cbind and (y_min < 0 or not_binary):
        raise DataError(f"binomial outcome {what}: values must be 0 or 1 (or give "
                        f"cbind(successes, failures))")
    if family == "binomial" and total_y in (0.0, total_trials):
        raise DataError(f"binomial outcome {what} is constant (all "
                        f"{'failures' if total_y == 0 else 'successes'}) in the rows used")
    if family in ("poisson", "negative_binomial") and total_y == 0:
        raise DataError(f"{family} outcome {what} is 0 in every row used")
    if family in ("poisson", "negative_binomial") and y_min < 0:
        raise DataError(f"{family} outcome: counts must be non-negative")


def pat_n(tab) -> np.ndarray:
    """The row count of every pattern of a fetched pattern table."""
    return np.asarray(tab["n"], float)


def compress(data, formula: str, family: str, *, link: str | None = None,
             options=None) -> Patterns:
    """One pass: the model's rows grouped by level and covariate pattern (`options`: the
    pass's `engines.EngineOptions`)."""
    import duckdb

    from ._sql import Source, connect, quote_ident, render
    from .design import check_columns, design_from_data
    from .formula import parse_formula

    t0 = time.perf_counter()
    family = family.lower()
    if family not in FAMILIES:
        raise InputError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    link = (link or FAMILIES[family][0]).lower()
    if link not in FAMILIES[family]:
        raise InputError(f"the {family} family takes the link {' or '.join(FAMILIES[family])}, "
                         f"not {link!r}")
    parsed = parse_formula(formula)
    cbind, design_formula = response_formula(parsed, family)
    ordinal = family == "ordinal"
    extra_cols: tuple[str, ...] = ()
    if ordinal:  # the response is a column of ordered categories; X has no intercept
        if parsed.response.kind != "col":
            raise InputError("an ordinal response must be a column (its ordered categories)")
        from .formula import Expr

        extra_cols = (parsed.response.value,)
        design_formula = dataclasses.replace(parsed, response=Expr("num", "0"))
    source = Source(data)
    con = connect(options=options)
    try:
        schema = source.schema(con, parsed.value_columns())
        check_columns(design_formula, schema)
        if ordinal:
            from .design import is_numeric

            col = extra_cols[0]
            if col not in schema:
                raise DataError(f"column {col!r} named in the formula is not in the data")
            if not is_numeric(schema[col]):
                raise DataError(f"ordinal outcome {col!r} is text ({schema[col]}): give its "
                                f"categories as ordered numbers (e.g. 1 to 5); the order of "
                                f"text labels (or of an Enum, which arrives as text) is not "
                                f"known")
        design = design_from_data(con, source, design_formula, schema, extra=extra_cols)
        if ordinal:
            design.fixed = [c for c in design.fixed if c.sql is not None]  # no intercept
        if design.aggregates is not None and design.aggregates.tables:
            raise InputError("center()/group_mean() are not supported in GLMMs yet")
        y, trials, const = outcome_sql(parsed, design, family, cbind,
                                       extra_cols[0] if ordinal else None)
        cols = [f"CAST({c.sql or '1.0'} AS DOUBLE) AS x{j}" for j, c in enumerate(design.fixed)]
        cols += [f"CAST({c.sql or '1.0'} AS DOUBLE) AS z{j}" for j, c in enumerate(design.random)]
        cols.append(f"CAST({design.offset or '0.0'} AS DOUBLE) AS off")
        keys = [f"x{j}" for j in range(len(design.fixed))] + \
            [f"z{j}" for j in range(len(design.random))] + ["off"]
        if family in ("negative_binomial", "ordinal"):  # likelihood not linear in y: key
            keys.append("y")
        allcols = list(dict.fromkeys(c for fd in design.factors for c in fd.columns))
        gcols = [f"src.{quote_ident(c)} AS g{k}" for k, c in enumerate(allcols)]
        gkeys = [f"g{k}" for k in range(len(allcols))]
        label = ", ".join(
            " || ':' || ".join(f"CAST(g{allcols.index(c)} AS VARCHAR)" for c in fd.columns)
            + f" AS label{k}" for k, fd in enumerate(design.factors))
        complete = design.complete_sql
        sql = render("glmm_patterns", groups=", ".join(gcols), columns=", ".join(cols),
                     sum_y="0.0" if ordinal else "fsum(y)",
                     sum_yy="0.0" if ordinal else "fsum(y * y)",
                     y_min="0.0" if ordinal else "min(y)",
                     y_frac="0.0" if ordinal else "max(abs(y - round(y)))",
                     y=y, trials=trials, const=const, source=source.relation,
                     complete=complete, keys=", ".join(gkeys + keys), label=label,
                     gkeys=", ".join(gkeys), pattern_keys=", ".join(keys))
        try:
            count = con.execute(render("glmm_count", keys=", ".join(gkeys + keys),
                                       groups=", ".join(gcols), columns=", ".join(cols), y=y,
                                       source=source.relation, complete=complete),
                                {**source.params, **design.params}).fetchone()
            if count[0] > MAX_PATTERNS:
                raise TooManyPatterns(
                    f"about {count[0]:,} distinct (level, covariate pattern) combinations "
                    f"(a HyperLogLog estimate): more than "
                    f"the {MAX_PATTERNS:,} the in-memory GLMM path takes (continuous "
                    f"predictors make every row a pattern)", int(count[0]))
            tab = con.execute(sql, {**source.params, **design.params}).fetchnumpy()
            tot = con.execute(render("glmm_rows", source=source.relation, complete=complete),
                              source.params).fetchone()
        except duckdb.Error as exc:
            raise source.error(exc, "the GLMM pass failed over") from None
    finally:
        con.close()
    if len(tab["n"]) == 0:
        raise DataError("no rows left after dropping rows with missing values")
    sy, st = np.asarray(tab["sy"], float), np.asarray(tab["st"], float)
    y_min = float(np.min(tab["ymin"])) if len(tab["ymin"]) else 0.0
    y_frac = float(np.max(tab["yfrac"])) if len(tab["yfrac"]) else 0.0
    what = parsed.response.deparse()
    check_outcome(family, what, cbind=cbind, y_min=y_min, y_frac=y_frac,
                  not_binary=bool(np.any(sy > pat_n(tab))), total_y=float(sy.sum()),
                  total_trials=float(st.sum()))
    categories: list = []
    if ordinal:  # categories in numeric order; each pattern's category index in `st`
        from .formula import r_number

        values = np.asarray(tab["y"], dtype=float)
        codes = np.unique(values)
        if len(codes) < 3:
            raise DataError(f"an ordinal outcome needs at least 3 categories; "
                            f"{extra_cols[0]!r} has {len(codes)} (use --family binomial)")
        categories = [r_number(float(c)) for c in codes]
        st = np.searchsorted(codes, values).astype(float)
    if family == "binomial" and (np.any(sy < 0) or np.any(sy > st)):
        raise DataError("binomial outcome: successes must lie between 0 and the trials "
                        "(a 0/1 outcome, or cbind(successes, failures) with failures >= 0)")
    p, q = len(design.fixed), len(design.random)
    X = np.column_stack([np.asarray(tab[f"x{j}"], float) for j in range(p)])
    Z = np.column_stack([np.asarray(tab[f"z{j}"], float) for j in range(q)])
    # the levels sort as the grouping columns sort (numbers numerically), as R's factors
    from .stats import _label_key

    types = {c: schema.get(c, "") for c in allcols}
    factors = []
    for k, fd in enumerate(design.factors):
        labels = np.asarray(tab[f"label{k}"], dtype=object)
        lv, level = np.unique(labels.astype(str), return_inverse=True)
        order = sorted(range(len(lv)), key=lambda i: _label_key(lv[i], list(fd.columns),
                                                                types))
        rank = np.empty(len(lv), np.int64)
        rank[order] = np.arange(len(lv))
        factors.append((fd.name, np.asarray(lv[order], dtype=object), rank[level],
                        list(fd.z), [(b.start, b.size) for b in fd.blocks]))
    for name, labels, *_rest in factors:
        if len(labels) < 2:
            raise DataError(f"grouping factor {name} has fewer than 2 levels in the rows used")
    first = factors[0]
    return Patterns(family, link, parsed.text, [c.name for c in design.fixed],
                    [design.random[j].name for j in first[3]], first[4],
                    first[0], first[1], first[2], X, Z[:, first[3]] if len(factors) == 1
                    else Z,
                    np.asarray(tab["off"], float), np.asarray(tab["n"], float), sy, st,
                    float(np.sum(tab["sc"])), int(tot[1]), int(tot[0]) - int(tot[1]),
                    {"prepare": 0.0, "scan": time.perf_counter() - t0}, factors=factors,
                    z_names=[c.name for c in design.random], categories=categories,
                    factor_levels=dict(design.levels), group_types=types,
                    source=source.location, syy=np.asarray(tab["syy"], float))


# ---------------------------------------------------------------------- the Laplace fit

def split_parameters(pat: Patterns, k: int, x) -> tuple[np.ndarray, np.ndarray, object]:
    """The optimizer's vector → (θ, β, the family's own parameter): for the negative
    binomial and the gamma the last entry is log θ_NB / log ν (returned as θ_NB / ν), for
    ordinal models the last K−1 are the thresholds (α_1, log(α_2 − α_1), …) → α; else None."""
    x = np.asarray(x, float)
    if pat.family in EXTRA:
        return x[:k], x[k:-1], float(np.exp(np.clip(x[-1], -30, 30)))
    if pat.family == "ordinal":
        K1 = len(pat.categories) - 1
        t = x[len(x) - K1:]
        alpha = np.cumsum(np.concatenate([t[:1], np.exp(np.clip(t[1:], -30, 30))]))
        return x[:k], x[k:len(x) - K1], alpha
    return x[:k], x[k:], None


def _level_hessians(level: np.ndarray, w: np.ndarray, ZL: np.ndarray, m: int) -> np.ndarray:
    """Per level Λ'Z_i'W_iZ_iΛ + I, (m, q, q), from the patterns' rows of ZΛ and weights."""
    q = ZL.shape[1]
    H = np.zeros((m, q, q))
    for a in range(q):
        for b in range(a + 1):
            h = np.bincount(level, w * ZL[:, a] * ZL[:, b], minlength=m)
            H[:, a, b] = h
            H[:, b, a] = h
    H[:, range(q), range(q)] += 1.0
    return H


class Laplace:
    """−2 × the Laplace log-likelihood as a function of (θ, β), with û kept warm; with
    `nagq` > 1 (one scalar random effect only) the adaptive Gauss–Hermite quadrature of
    glmer's nAGQ: per level, nodes û + √2 σ̂ z_k with σ̂ = 1/√(Λ'Z'WZΛ + 1) (`nagq` = 1 is
    the Laplace approximation exactly)."""

    def __init__(self, pat: Patterns, nagq: int = 1):
        from .objective import ThetaMap

        self.nagq = int(nagq)
        if self.nagq > 1:
            self.nodes, self.weights = np.polynomial.hermite.hermgauss(self.nagq)
        self.pat = pat
        self.tm = ThetaMap(pat.blocks, len(pat.random_names))
        self.k = len(self.tm)
        self.u = np.zeros((pat.m, len(pat.random_names)))
        self.evaluations = 0
        self.nb = None

    def split(self, x):
        """(θ, β), the family's own parameter set on `nb` (`split_parameters`)."""
        theta, beta, self.nb = split_parameters(self.pat, self.k, x)
        return theta, beta

    def modes(self, theta, beta, u0=None):
        """û per level (m, q), η̂, the working weights and the Cholesky factors of
        Λ'Z_i'W_iZ_iΛ + I; None when PIRLS fails."""
        pat = self.pat
        lam = self.tm.T(theta)
        ZL = pat.Z @ lam  # (patterns, q)
        xb = pat.X @ beta + pat.offset
        u = (self.u if u0 is None else u0).copy()
        m, q = u.shape

        def objective(u):
            eta = xb + np.einsum("pq,pq->p", ZL, u[pat.level])
            ll, score, w = _loglik_parts(pat.family, pat.link, eta, pat.sy, pat.st, pat.n,
                                         self.nb)
            per = np.bincount(pat.level, ll, minlength=m) - 0.5 * np.sum(u * u, axis=1)
            return per, eta, score, w

        per, eta, score, w = objective(u)
        for _ in range(PIRLS_MAXITER):
            g = np.stack([np.bincount(pat.level, ZL[:, a] * score, minlength=m)
                          for a in range(q)], axis=1) - u
            H = _level_hessians(pat.level, w, ZL, m)
            step = np.linalg.solve(H, g[:, :, None])[:, :, 0]
            t = np.ones(m)
            for _half in range(30):  # step halving, per level
                new_u = u + t[:, None] * step
                new_per, new_eta, new_score, new_w = objective(new_u)
                bad = new_per < per - 1e-12 * np.abs(per)
                if not bad.any():
                    break
                t = np.where(bad, t / 2, t)
            u, per, eta, score, w = new_u, new_per, new_eta, new_score, new_w
            if np.max(np.abs(t[:, None] * step)) < PIRLS_TOL:
                break
        else:
            return None
        return u, eta, w, _level_hessians(pat.level, w, ZL, m), per

    def __call__(self, x) -> float:
        self.evaluations += 1
        theta, beta = self.split(x)
        if np.any(theta[self.tm.diagonal] < 0):
            return np.inf
        with np.errstate(all="ignore"):
            res = self.modes(theta, beta)
        if res is None:
            return np.inf
        u, _eta, _w, H, per = res
        self.u = u
        if self.nagq > 1:
            value = -2 * (self._agq(theta, beta, u, H) + self.pat.const)
            return value if np.isfinite(value) else np.inf
        try:
            logdet = 2 * np.sum(np.log(np.diagonal(np.linalg.cholesky(H), axis1=1, axis2=2)))
        except np.linalg.LinAlgError:
            return np.inf
        value = -2 * (float(np.sum(per)) + self.pat.const) + logdet
        return value if np.isfinite(value) else np.inf

    def _agq(self, theta, beta, u, H) -> float:
        """Σ_i log ∫ exp(Σ_p ℓ_p(η(u)) − u²/2) du / √(2π), by adaptive Gauss–Hermite."""
        pat = self.pat
        lam = float(self.tm.T(theta)[0, 0])
        zl = pat.Z[:, 0] * lam
        xb = pat.X @ beta + pat.offset
        sd = 1.0 / np.sqrt(H[:, 0, 0])  # (m,)
        m = pat.m
        terms = np.empty((len(self.nodes), m))
        for k, (z, w) in enumerate(zip(self.nodes, self.weights)):
            uk = u[:, 0] + math.sqrt(2.0) * sd * z
            eta = xb + zl * uk[pat.level]
            ll, _score, _w = _loglik_parts(pat.family, pat.link, eta, pat.sy, pat.st, pat.n,
                                           self.nb)
            h = np.bincount(pat.level, ll, minlength=m) - 0.5 * uk * uk
            terms[k] = math.log(w) + h + z * z
        top = terms.max(axis=0)
        lse = top + np.log(np.exp(terms - top).sum(axis=0))
        return float(np.sum(lse + np.log(math.sqrt(2.0) * sd) - 0.5 * math.log(2 * math.pi)))


class SparseLaplace:
    """The Laplace deviance of several grouping factors (crossed or nested): the modes of
    all the factors' spherical random effects at once, by Newton's method with sparse
    H = Λ'Z'WZΛ + I (scipy's sparse LU; log|H| from its diagonal), Z the patterns' sparse
    model matrix of every factor's levels.  θ: the factors' blocks in formula order."""

    def __init__(self, pat: Patterns):
        import scipy.sparse as sp

        from .objective import ThetaMap

        self.pat, self.nagq = pat, 1
        P = len(pat.n)
        self.q = [len(f[3]) for f in pat.factors]
        self.m = [len(f[1]) for f in pat.factors]
        self.off = np.concatenate([[0], np.cumsum([q * m for q, m in zip(self.q, self.m)])])
        self.Q = int(self.off[-1])
        self.toff = np.concatenate([[0], np.cumsum(self.q)]).astype(int)
        blocks = [(int(self.toff[k]) + s0, n) for k, f in enumerate(pat.factors)
                  for s0, n in f[4]]
        self.tm = ThetaMap(blocks, int(self.toff[-1]))
        self.k = len(self.tm)
        rows, cols, vals = [], [], []
        for k, (_name, _lab, level, zc, _b) in enumerate(pat.factors):
            for a, j in enumerate(zc):
                rows.append(np.arange(P))
                cols.append(self.off[k] + level * self.q[k] + a)
                vals.append(pat.Z[:, j])
        self.Zs = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                       np.concatenate(cols))), shape=(P, self.Q))
        self.u = np.zeros(self.Q)
        self.evaluations = 0
        self.nb = None

    def split(self, x):
        """(θ, β), the family's own parameter set on `nb` (`split_parameters`)."""
        theta, beta, self.nb = split_parameters(self.pat, self.k, x)
        return theta, beta

    def T_blocks(self, theta):
        T = self.tm.T(theta)
        return [T[self.toff[k]:self.toff[k + 1], self.toff[k]:self.toff[k + 1]]
                for k in range(len(self.q))]

    def lam(self, theta):
        import scipy.sparse as sp

        return sp.block_diag([sp.kron(sp.identity(m), sp.csr_matrix(T))
                              for m, T in zip(self.m, self.T_blocks(theta))]).tocsr()

    def modes(self, theta, beta, u0=None):
        """û (Q,), η̂, the weights, the LU of H at û, Σℓ − ½|û|²; None if PIRLS fails."""
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        pat = self.pat
        ZL = (self.Zs @ self.lam(theta)).tocsr()
        xb = pat.X @ beta + pat.offset
        u = (self.u if u0 is None else u0).copy()
        eye = sp.identity(self.Q, format="csc")

        def objective(u):
            eta = xb + ZL @ u
            ll, score, w = _loglik_parts(pat.family, pat.link, eta, pat.sy, pat.st, pat.n,
                                         self.nb)
            return float(np.sum(ll) - 0.5 * u @ u), eta, score, w

        val, eta, score, w = objective(u)
        for _ in range(PIRLS_MAXITER):
            g = ZL.T @ score - u
            H = (ZL.T @ sp.diags(w) @ ZL + eye).tocsc()
            step = splu(H).solve(g)
            t = 1.0
            for _half in range(30):
                new = objective(u + t * step)
                if new[0] >= val - 1e-12 * abs(val):
                    break
                t /= 2
            u = u + t * step
            val, eta, score, w = new
            if np.max(np.abs(t * step)) < PIRLS_TOL:
                break
        else:
            return None
        lu = splu((ZL.T @ sp.diags(w) @ ZL + eye).tocsc())
        return u, eta, w, lu, val

    def __call__(self, x) -> float:
        self.evaluations += 1
        theta, beta = self.split(x)
        if np.any(theta[self.tm.diagonal] < 0):
            return np.inf
        with np.errstate(all="ignore"):
            try:
                res = self.modes(theta, beta)
            except RuntimeError:  # a singular LU
                return np.inf
        if res is None:
            return np.inf
        u, _eta, _w, lu, val = res
        self.u = u
        logdet = float(np.sum(np.log(np.abs(lu.U.diagonal()))))
        value = -2 * (val + self.pat.const) + logdet
        return value if np.isfinite(value) else np.inf


#: above this many random effects the conditional SDs of several factors are not computed
#: (each needs a column of H⁻¹)
COND_SD_MAX = 20_000


def _random_effects(obj, pat: Patterns, theta, beta):
    """Per factor: name, level labels, T, the conditional modes b (m, q), their conditional
    SDs (m, q), the terms' names and blocks — at the modes the last evaluation left."""
    if isinstance(obj, Laplace):
        u, _eta, _w, H, _per = obj.modes(theta, beta)
        lam = obj.tm.T(theta)
        cond_var = np.einsum("ab,mbc,dc->mad", lam, np.linalg.inv(H), lam)
        cond_sd = np.sqrt(np.clip(np.einsum("maa->ma", cond_var), 0, None))
        yield (pat.group, pat.levels, lam, u @ lam.T, cond_sd, pat.random_names, pat.blocks)
        return
    u, _eta, _w, lu, _val = obj.modes(theta, beta)
    Lam = obj.lam(theta)
    b = Lam @ u
    if obj.Q <= COND_SD_MAX:  # diag(Λ H⁻¹ Λ'), a column of H⁻¹Λ' at a time, in blocks
        Ld = Lam.toarray()
        var = np.empty(obj.Q)
        for s0 in range(0, obj.Q, 512):
            cols = lu.solve(np.ascontiguousarray(Ld[s0:s0 + 512].T))
            var[s0:s0 + 512] = np.einsum("ij,ji->i", Ld[s0:s0 + 512], cols)
        sd_all = np.sqrt(np.clip(var, 0, None))
    else:
        sd_all = np.full(obj.Q, np.nan)
    for k, (name, labels, _level, zc, blocks) in enumerate(pat.factors):
        m, q = obj.m[k], obj.q[k]
        sl = slice(int(obj.off[k]), int(obj.off[k + 1]))
        yield (name, labels, obj.T_blocks(theta)[k], b[sl].reshape(m, q),
               sd_all[sl].reshape(m, q), [pat.z_names[j] for j in zc], blocks)


#: Pearson χ² / residual df above this: a Poisson fit is called overdispersed
OVERDISPERSION = 1.5


def _diagnostics(obj, pat: Patterns, theta, beta, npar: int, *, singular: bool) -> list[str]:
    """What a user must hear about a GLMM fit, in words: fitted probabilities 0 or 1
    (separation), Poisson overdispersion (Pearson χ²/df), a singular fit."""
    if pat.family not in ("binomial", "poisson"):
        return diagnostic_messages(pat.family, singular=singular)
    if isinstance(obj, Laplace):
        u = obj.modes(theta, beta)
        eta = None if u is None else u[1]
    else:
        res = obj.modes(theta, beta)
        eta = None if res is None else res[1]
    if eta is None:
        return diagnostic_messages(pat.family, singular=singular) + [
            "PIRLS did not converge at the estimates"]
    extreme, chi2 = pattern_diagnostics(pat, eta)
    return diagnostic_messages(pat.family, extreme_rows=extreme, pearson=chi2,
                               df=pat.nobs - npar, singular=singular)


def pattern_diagnostics(pat: Patterns, eta: np.ndarray) -> tuple[int, float | None]:
    """At the patterns' linear predictor: the rows whose fitted probability is numerically
    0 or 1, and (Poisson) the Pearson χ² = Σ (y − μ)² / μ over the rows, from Σy, Σy², n per
    pattern."""
    mu, _d = _inverse_link(pat.link, eta)
    extreme = int(pat.n[(mu < 1e-8) | (mu > 1 - 1e-8)].sum())
    if pat.family != "poisson":
        return extreme, None
    return extreme, float(np.sum((pat.syy - 2 * mu * pat.sy + pat.n * mu * mu) / mu))


def diagnostic_messages(family: str, *, extreme_rows: int = 0, pearson: float | None = None,
                        df: int = 0, singular: bool = False) -> list[str]:
    """The diagnostics in words (shared by the in-memory fit and the fit by passes):
    a singular fit, fitted probabilities 0 or 1 for `extreme_rows` rows (binomial), the
    Pearson χ² over its residual df above OVERDISPERSION (Poisson)."""
    out = []
    if singular:
        out.append("boundary (singular) fit: a random-effect variance is estimated as 0")
    if family == "binomial" and extreme_rows:
        out.append(f"fitted probabilities numerically 0 or 1 for {extreme_rows:,} rows: "
                   f"complete or quasi-complete separation (a predictor or level with only 0s "
                   f"or only 1s); some estimates may be infinite")
    if family == "poisson" and pearson is not None and df > 0 and pearson / df > OVERDISPERSION:
        out.append(f"overdispersion: Pearson chi-squared / residual df = {pearson / df:.2f} "
                   f"(> {OVERDISPERSION}); consider --family negative_binomial or an "
                   f"observation-level random effect")
    return out


def _glm_start(pat: Patterns) -> np.ndarray:
    """β of the GLM without random effects (IRLS on the patterns); 0 for ordinal."""
    if pat.family == "ordinal":
        return np.zeros(pat.X.shape[1])
    if pat.family == "gamma":  # least squares of the patterns' mean log y (log link) or
        w = pat.n  # of their 1 / mean y (inverse link), weighted by n
        target = pat.n / pat.sy if pat.link == "inverse" else pat.st / pat.n
        return np.linalg.lstsq(pat.X * np.sqrt(w)[:, None], target * np.sqrt(w),
                               rcond=None)[0]
    beta = np.zeros(pat.X.shape[1])
    family = "poisson" if pat.family == "negative_binomial" else pat.family
    for _ in range(100):
        eta = pat.X @ beta + pat.offset
        _ll, score, w = _loglik_parts(family, pat.link, eta, pat.sy, pat.st, pat.n)
        step = np.linalg.solve(pat.X.T @ (w[:, None] * pat.X), pat.X.T @ score)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def _hessian(f, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    n = len(x)
    H = np.empty((n, n))
    f0 = f(x)
    steps = h * np.maximum(1.0, np.abs(x))
    for i in range(n):
        ei = np.zeros(n)
        ei[i] = steps[i]
        H[i, i] = (f(x + ei) - 2 * f0 + f(x - ei)) / steps[i] ** 2
        for j in range(i):
            ej = np.zeros(n)
            ej[j] = steps[j]
            H[i, j] = H[j, i] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej)
                                 + f(x - ei - ej)) / (4 * steps[i] * steps[j])
    return H


def fit_glmm(pat: Patterns, nagq: int = 1):
    """The Laplace (`nagq` = 1) or adaptive Gauss–Hermite (`nagq` > 1, one scalar random
    effect) fit of compressed data → a FitResult (family, link, nagq set).  The
    log-likelihood keeps every constant at any nagq (so Laplace and quadrature values are
    comparable); glmer's nAGQ > 1 logLik is on another scale (cbpp: −50.0 against its
    Laplace −92.0) and is not reproduced."""
    import nlopt

    from .optimize import SINGULAR_TOL, OptSummary
    from .results import FitResult, modes_table, variance_tables

    t0 = time.perf_counter()
    nagq = int(nagq)
    if nagq < 1:
        raise InputError("nAGQ must be a whole number >= 0 (0: mlpipe.glmm_passes)")
    several = len(pat.factors) > 1
    if nagq > 1 and (several or len(pat.random_names) != 1):
        raise InputError("adaptive Gauss-Hermite quadrature (--nagq > 1) needs a single "
                         "scalar random effect, as glmer's")
    obj = SparseLaplace(pat) if several else Laplace(pat, nagq)
    k = obj.k
    beta0 = _glm_start(pat)
    nb = pat.family == "negative_binomial"
    # log θ_NB from θ_NB = 1; the gamma's log ν from the spread of log y about the start
    extra = np.zeros(0)
    ordinal = pat.family == "ordinal"
    if ordinal:  # thresholds from the cumulative proportions, as a GLM without covariates
        counts = np.bincount(pat.st.astype(np.int64), pat.n, minlength=len(pat.categories))
        cum = np.clip(np.cumsum(counts)[:-1] / counts.sum(), 1e-6, 1 - 1e-6)
        from scipy.special import logit, ndtri

        alpha0 = logit(cum) if pat.link == "logit" else ndtri(cum)
        alpha0 = np.maximum.accumulate(alpha0 + 1e-3 * np.arange(len(alpha0)))
        extra = np.concatenate([alpha0[:1], np.log(np.maximum(np.diff(alpha0), 1e-3))])
    elif nb:
        extra = np.array([0.0])
    elif pat.family == "gamma":  # log y about log μ at the start
        eta0 = pat.X @ beta0
        log_mu = -np.log(np.maximum(eta0, 1e-12)) if pat.link == "inverse" else eta0
        resid = pat.st / pat.n - log_mu
        extra = np.array([-math.log(max(float(np.average(resid ** 2, weights=pat.n)), 1e-3))])
    theta0, scale = obj.tm.initial, 1.0
    if pat.link == "inverse":  # θ = 1 is an SD of 1 on the η scale; 1/μ may be ~0.01:
        # start (and step) at a tenth of the typical |η| (else η < 0: μ = 1/η undefined)
        scale = 0.1 * float(np.average(np.abs(pat.X @ beta0), weights=pat.n))
        theta0 = theta0 * scale
    start = "glm"
    if not several and pat.family in ("binomial", "poisson"):
        # the fast mode's answer (nAGQ = 0: θ by Laplace with β inside PIRLS, over the
        # patterns in memory) as the start, as glmer's first stage; the GLM's if it fails
        from .glmm_passes import PatternPasses, fit_passes

        try:
            with np.errstate(all="ignore"):
                fast = fit_passes(PatternPasses(pat), nagq=0)
            if np.all(np.isfinite(fast.theta)) and np.isfinite(fast.deviance):
                theta0 = np.asarray(fast.theta, float)
                beta0 = fast.fixed_effects["estimate"].to_numpy()
                start = "nAGQ=0"
        except (InputError, np.linalg.LinAlgError, FloatingPointError, ValueError):
            pass
    x0 = np.concatenate([theta0, beta0, extra])
    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    lower = np.concatenate([obj.tm.lower, np.full(len(beta0) + len(extra), -np.inf)])
    opt.set_lower_bounds(lower)
    opt.set_min_objective(lambda x, grad: obj(x))
    opt.set_ftol_rel(1e-12)
    opt.set_xtol_abs(1e-8)
    opt.set_maxeval(20000)
    opt.set_initial_step(np.concatenate([np.where(obj.tm.diagonal, 0.25, 0.1) * scale,
                                         np.maximum(0.1 * scale, 0.1 * np.abs(beta0)),
                                         np.full(len(extra), 0.5)]))
    x = x0
    best = obj(x0)
    for _ in range(3):  # restart from the answer until it stops moving
        try:
            x_new = opt.optimize(x)
        except nlopt.RoundoffLimited:
            x_new = x
        f_new = obj(x_new)
        moved = f_new < best - 1e-10 * abs(best)
        if f_new <= best:
            x, best = x_new, f_new
        if not moved:
            break
    dev = float(obj(x))
    if not np.isfinite(dev):
        raise DataError("the GLMM's likelihood could not be evaluated at any parameters tried "
                        "(PIRLS failed): check the outcome and the predictors' scales")
    theta, beta = obj.split(x)
    alpha = np.array(obj.nb, dtype=float) if ordinal else None
    nb_theta = obj.nb if nb else None
    shape = obj.nb if pat.family == "gamma" else None
    # Var(β): the β block of the inverse Hessian of −2 log L in (θ, β) (glmer's default; for
    # the negative binomial at its θ, as glmer.nb's final glmer fit)
    if nb:
        log_nb = float(x[-1])
        Hs = _hessian(lambda xr: obj(np.append(xr, log_nb)), x[:-1])
    else:
        Hs = _hessian(obj, x)
    try:
        cov_all = 2 * np.linalg.inv(Hs)
        vcov = cov_all[k:k + len(beta), k:k + len(beta)]
        if not np.all(np.isfinite(vcov)) or np.any(np.diag(vcov) <= 0):
            raise np.linalg.LinAlgError
        hessian_ok = True
    except np.linalg.LinAlgError:
        hessian_ok = False
        vcov = np.full((len(beta), len(beta)), np.nan)
    thresholds = None
    if ordinal:  # α = cumsum(t_1, e^t_2, …): the delta method from the parameters' covariance
        K1 = len(alpha)
        t = x[len(x) - K1:]
        J = np.tril(np.ones((K1, K1))) * np.concatenate([[1.0], np.exp(t[1:])])[None, :]
        cov_t = cov_all[len(x) - K1:, len(x) - K1:] if hessian_ok else np.full((K1, K1),
                                                                               np.nan)
        se_a = np.sqrt(np.clip(np.diag(J @ cov_t @ J.T), 0, None))
        cats = pat.categories
        thresholds = [{"term": f"{cats[c]}|{cats[c + 1]}", "estimate": float(alpha[c]),
                       "std_error": float(se_a[c])} for c in range(K1)]
    obj(x)  # û at the answer again (the Hessian moved it)
    se = np.sqrt(np.diag(vcov))
    z = beta / se
    from scipy.special import ndtr

    p_value = 2 * ndtr(-np.abs(z))
    fixed = pl.DataFrame({"term": pat.fixed_names, "estimate": beta, "std_error": se,
                          "t_value": z, "df": [None] * len(beta), "p_value": p_value},
                         schema={"term": pl.Utf8, "estimate": pl.Float64,
                                 "std_error": pl.Float64, "t_value": pl.Float64,
                                 "df": pl.Float64, "p_value": pl.Float64})
    effects = list(_random_effects(obj, pat, theta, beta))
    rand, corrs = variance_tables([(name, names, T @ T.T, blocks)
                                   for name, _lab, T, _b, _sd, names, blocks in effects])
    ranef = pl.concat([modes_table(name, labels, names, b, cond_sd)
                       for name, labels, _T, b, cond_sd, names, _bl in effects])
    npar = len(beta) + k + len(extra)
    diagnostics = _diagnostics(obj, pat, theta, beta, npar, singular=bool(
        np.any(theta[obj.tm.diagonal] < SINGULAR_TOL)))
    loglik = -dev / 2
    how = "Laplace approximation (nAGQ = 1)" if nagq == 1 else \
        f"adaptive Gauss-Hermite quadrature (nAGQ = {nagq})"
    messages = [f"{how}; {len(pat.n):,} covariate patterns of {pat.nobs:,} rows (the data "
                f"compressed once: exact); started from "
                + ("the fast mode's fit (nAGQ = 0)" if start == "nAGQ=0" else "a GLM fit")]
    if not hessian_ok:
        messages.append("the Hessian of the deviance is not positive definite: no SEs")
    messages += diagnostics
    summary = OptSummary("LN_BOBYQA", x0.tolist(), float(obj(x0)), x.tolist(), dev,
                         evaluations=obj.evaluations, return_code="SUCCESS",
                         converged=hessian_ok, reml=False, seconds=time.perf_counter() - t0,
                         messages=messages, start=start)
    singular = bool(np.any(theta[obj.tm.diagonal] < SINGULAR_TOL))
    res = FitResult(
        formula=pat.formula, method="ML", nobs=pat.nobs,
        groups={f[0]: len(f[1]) for f in pat.factors},
        fixed_effects=fixed, vcov_matrix=vcov, random_effects=rand, random_correlations=corrs,
        residual_variance=float("nan"), sigma=1.0, loglik=loglik, deviance=dev,
        reml_criterion=None, aic=dev + 2 * npar, bic=dev + npar * math.log(pat.nobs),
        npar=npar, converged=hessian_ok, singular=singular, optimizer=summary, ranef=ranef,
        theta=theta, rows_dropped=pat.rows_dropped, stats=None)
    res.family, res.link, res.nagq = pat.family, pat.link, nagq
    res.nb_theta = nb_theta
    res.thresholds = thresholds
    res.dispersion = None if shape is None else 1.0 / shape
    res.factor_levels, res.group_types = pat.factor_levels, pat.group_types
    if not np.isfinite(res.residual_variance):
        res.residual_variance = float("nan")
    res.timings = {**pat.timings, "solve": time.perf_counter() - t0, "inference": 0.0}
    return res
