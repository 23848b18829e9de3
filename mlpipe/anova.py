"""F tests for the fixed-effect terms: lmerTest's `anova(m, type, ddf)`.

For every term of the fixed part a hypothesis matrix L (one row per tested direction, one
column per fixed effect) is built as lmerTest builds it, and tested as lmerTest's `contestMD`
tests it:

* **contrasts** — type III (the default; lmerTest's `get_contrasts_type3`): the coefficients
  of the full dummy coding of each term (`~ 0 + term`, every level) in the treatment-coded X,
  L = zapsmall(t(ginv(X) rdX)), its columns of a term made orthogonal to those of the terms
  containing it (highest order first, lmerTest's containment rule: all variables within, the
  same numeric variables), the rows of X's columns kept.  Type I: the rows of t(L) of the
  Doolittle decomposition of X'X (lmerTest's `doolittle`); type II: type I after moving each
  term and the terms containing it last, a plain selection (marginal) for terms contained in
  none.  A one-term model gets type I's contrasts for every type, as lmerTest's.
* **Satterthwaite** (`contestMD`): F = (Lβ)'(LVL')⁻¹(Lβ)/q through the eigen-decomposition
  LVL' = PDP' (q the eigenvalues above √ε·max); each direction m has ν_m = 2d_m²/(g_m'Ag_m),
  g_m the gradient of its variance in the variance parameters (`inference.SatterthwaiteParts`:
  Var(β̂), its Jacobian and A, lmerTest's vcov_beta, Jac_list and vcov_varpar), combined as
  `get_Fstat_ddf`: E = Σ ν_m/(ν_m − 2), ddf = 2E/(E − q) (2 when some ν_m ≤ 2; the mean when
  all are equal).  q = 1: the t test's df.
* **Kenward–Roger** (pbkrtest's `KRmodcomp` with a restriction matrix, as lmerTest calls it):
  Φ, Φ_A, P_r and W from `inference.KenwardRogerParts`; Θ = L'(LΦL')⁻¹L, A1 = Σ W_rs tr(ΘΦP_rΦ)
  tr(ΘΦP_sΦ), A2 = Σ W_rs tr(ΘΦP_rΦΘΦP_sΦ), then pbkrtest's ρ, ddf = 4 + (q + 2)/(qρ − 1) and
  scaling λ = ddf(1 − A2/q)/(ddf − 2); F = λ·(Lβ)'(LΦ_AL')⁻¹(Lβ)/q.

Sum Sq and Mean Sq are lmerTest's: Mean Sq = σ²·F (the unscaled F for Kenward–Roger),
Sum Sq = NumDF·Mean Sq.  The type III contrasts are computed from the model's structure alone
(the coding evaluated on a grid of every level combination with random numeric values): they
equal lmerTest's whenever each term's full dummy coding lies in the span of X (every model
whose terms are marginal, R's usual hierarchy); otherwise lmerTest's L depends on the data and
the test is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import _dist
from ._lazy import lazy_import
from .errors import InputError
from .formula import Formula, parse_formula

# bound at first use, so that registering `mlpipe anova`'s options imports neither
np = lazy_import("numpy")
pl = lazy_import("polars")

COLUMNS = ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
TYPES = {"1": 1, "i": 1, "2": 2, "ii": 2, "3": 3, "iii": 3}
DDF = {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger"}
#: the grid of level combinations that evaluates the coding (type III) is refused above this
MAX_GRID_ROWS = 2_000_000


# ---------------------------------------------------------------------- the model's columns

@dataclass
class _Var:
    label: str
    levels: list | None  # categorical: its levels, reference first; else None
    ncol: int  # numeric columns (poly(x, k): k)
    data_class: str  # R's dataClasses: "factor", "logical", "numeric", "nmatrix.k"


@dataclass
class _Structure:
    """The fixed part as R's terms object sees it: term labels, their variables, and per
    column of X its term (-1 the intercept) and the level / column index of each variable."""

    intercept: bool
    terms: list[tuple[_Var, ...]]
    labels: list[str]
    columns: list[tuple[int, tuple[int, ...]]]
    names: list[str]

    def cols_of(self, t: int) -> list[int]:
        return [j for j, (term, _) in enumerate(self.columns) if term == t]


def _variable(v, factor_levels: dict) -> _Var:
    e = v.expr
    if v.factor_call:
        return _Var(v.label, list(factor_levels[v.label]), 1, "factor")
    if v.column is not None and v.column in factor_levels:
        levels = list(factor_levels[v.column])
        logical = all(isinstance(lv, bool) for lv in levels)
        return _Var(v.label, levels, 1, "logical" if logical else "factor")
    if e.kind == "call" and e.value == "poly":
        k = len(factor_levels[v.label]) // 2 - 1  # alpha_1..k, norm2_1..k+2
        return _Var(v.label, None, k, f"nmatrix.{k}")
    if e.kind == "call" and e.value == "scale":
        return _Var(v.label, None, 1, "nmatrix.1")
    return _Var(v.label, None, 1, "numeric")


def _term_columns(term: tuple[_Var, ...], full: list[bool]) -> list[tuple[tuple[int, ...], str]]:
    """(index per variable, R's name) of a term's columns, the first variable fastest."""
    from .design import _level_label  # (design imports DuckDB)

    parts = []
    for var, f in zip(term, full):
        if var.levels is None:
            parts.append([(j, var.label + (str(j + 1) if var.data_class != "numeric"
                                           and var.data_class != "nmatrix.1" else ""))
                          for j in range(var.ncol)])
        else:
            keep = range(len(var.levels)) if f else range(1, len(var.levels))
            parts.append([(i, var.label + _level_label(var.levels[i])) for i in keep])
    out = []
    import itertools

    for combo in itertools.product(*reversed(parts)):
        combo = combo[::-1]
        out.append((tuple(c[0] for c in combo), ":".join(c[1] for c in combo)))
    return out


def model_structure(stats) -> _Structure:
    formula: Formula = parse_formula(stats.formula)
    terms = [tuple(_variable(v, stats.factor_levels) for v in t) for t in formula.fixed]
    labels = [":".join(v.label for v in t) for t in terms]
    present = {frozenset(v.label for v in t) for t in terms}
    if formula.intercept:
        present.add(frozenset())
    columns, names = [], []
    if formula.intercept:
        columns.append((-1, ()))
        names.append("(Intercept)")
    for k, t in enumerate(terms):
        labels_t = [v.label for v in t]
        full = [frozenset(x for x in labels_t if x != v.label) not in present for v in t]
        for idx, name in _term_columns(t, full):
            columns.append((k, idx))
            names.append(name)
    if names != list(stats.fixed_names):
        raise InputError(f"anova: the fixed-effect columns {stats.fixed_names} do not follow "
                         f"from the formula's terms ({names}); cannot map them to terms")
    return _Structure(formula.intercept, terms, labels, columns, names)


def containment(s: _Structure) -> dict[int, list[int]]:
    """lmerTest's `containment`: term j contains term t when t's variables are a proper
    subset of j's and both have the same numeric variables (dataClass "numeric")."""
    out = {}
    for t, term in enumerate(s.terms):
        vt = {v.label for v in term}
        nt = {v.label for v in term if v.data_class == "numeric"}
        out[t] = [j for j, other in enumerate(s.terms)
                  if vt < {v.label for v in other}
                  and nt == {v.label for v in other if v.data_class == "numeric"}]
    return out


# ---------------------------------------------------------------------- R's helpers

def zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """R's zapsmall: round to `digits` significant digits of the largest absolute value."""
    x = np.asarray(x, dtype=float)
    mx = float(np.max(np.abs(x))) if x.size else 0.0
    if not mx > 0:
        return np.round(x, digits)
    return np.round(x, max(0, digits - int(math.ceil(math.log10(mx)))))


def doolittle(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """lmerTest's `doolittle(x)$L` (unit lower triangular factor of the LU decomposition, an
    entry zero when its pivot is below eps; entries below eps zeroed)."""
    n = len(x)
    L = np.eye(n)
    U = np.zeros((n, n))
    for i in range(n):
        U[i, :] = x[i, :] - L[i, :i] @ U[:i, :]
        for j in range(i + 1, n):
            v = x[j, i] - L[j, :i] @ U[:i, i]
            L[j, i] = 0.0 if abs(U[i, i]) < eps else v / U[i, i]
    L[np.abs(L) < eps] = 0.0
    return L


def _drop_zero_rows(L: np.ndarray) -> np.ndarray:
    return L[np.sum(np.abs(L), axis=1) > 1e-8]


# ---------------------------------------------------------------------- contrasts

def contrasts_type1(s: _Structure, xtx: np.ndarray) -> dict[str, np.ndarray]:
    p = len(s.names)
    Lt = np.ones((1, 1)) if p == 1 else doolittle(xtx).T
    return {lab: Lt[s.cols_of(t)] for t, lab in enumerate(s.labels)}


def contrasts_type2(s: _Structure, xtx: np.ndarray) -> dict[str, np.ndarray]:
    if len(s.names) <= 1 or len(s.terms) <= 1:
        return contrasts_type1(s, xtx)
    contained = containment(s)
    p = len(s.names)
    out = {}
    for t, lab in enumerate(s.labels):
        if not contained[t]:  # marginal: the term's rows of the identity
            out[lab] = np.eye(p)[s.cols_of(t)]
            continue
        cols = [j for k in [t] + contained[t] for j in s.cols_of(k)]
        order = [j for j in range(p) if j not in cols] + cols
        Lc = doolittle(xtx[np.ix_(order, order)]).T
        rows = [i for i, j in enumerate(order) if s.columns[j][0] == t]
        back = np.empty(p, dtype=int)
        back[order] = np.arange(p)
        out[lab] = Lc[np.ix_(rows, back)]
    return out


def _grid(s: _Structure, reps: int, seed: int = 20240607):
    """Every combination of the categorical variables' levels, `reps` rows each, random
    numeric columns: per variable label its level indices or its (rows, ncol) values."""
    cats = {}
    nums = {}
    for term in s.terms:
        for v in term:
            if v.levels is not None:
                cats.setdefault(v.label, len(v.levels))
            else:
                nums.setdefault(v.label, v.ncol)
    cells = int(np.prod(list(cats.values()), dtype=float)) if cats else 1
    rows = cells * reps
    if rows > MAX_GRID_ROWS:
        raise InputError(f"anova: the categorical variables have {cells:,} level combinations; "
                         f"type III contrasts are limited to {MAX_GRID_ROWS:,} grid rows")
    values = {}
    if cats:
        mesh = np.meshgrid(*[np.arange(k) for k in cats.values()], indexing="ij")
        for lab, m in zip(cats, mesh):
            values[lab] = np.repeat(m.ravel(), reps)
    rng = np.random.default_rng(seed)
    for lab, k in nums.items():
        values[lab] = rng.standard_normal((rows, k))
    return values, rows


def _eval_columns(spec: list[tuple[int, tuple[int, ...]]], s: _Structure, values: dict,
                  rows: int) -> np.ndarray:
    out = np.ones((rows, len(spec)))
    for j, (t, idx) in enumerate(spec):
        if t < 0:
            continue
        for v, i in zip(s.terms[t], idx):
            out[:, j] *= (values[v.label] == i) if v.levels is not None else values[v.label][:, i]
    return out


def contrasts_type3(s: _Structure, xtx: np.ndarray) -> dict[str, np.ndarray]:
    """lmerTest's get_contrasts_type3 (extract_contrasts_type3 on the treatment-coded X)."""
    p = len(s.names)
    if p <= 1 or len(s.terms) <= 1:
        return contrasts_type1(s, xtx)
    # rdX: per term its full dummy coding (~ 0 + term), after the intercept
    rd = [(-1, ())] if s.intercept else []
    for t, term in enumerate(s.terms):
        rd += [(t, idx) for idx, _ in _term_columns(term, [True] * len(term))]
    values, rows = _grid(s, reps=p + 2)
    X = _eval_columns(s.columns, s, values, rows)
    R = _eval_columns(rd, s, values, rows)
    C, *_ = np.linalg.lstsq(X, R, rcond=None)
    resid = np.linalg.norm(X @ C - R) / max(np.linalg.norm(R), 1.0)
    if resid > 1e-8:
        raise InputError("anova: type III contrasts of this model depend on the data (a "
                         "term's full dummy coding is not in the span of X: the model is not "
                         "hierarchical); lmerTest's are then not reproducible from the "
                         "statistics; use type 1 or 2")
    L = zapsmall(C.T)  # rows: rdX columns; columns: X columns
    contained = containment(s)
    order = sorted(range(len(s.terms)), key=lambda t: -len(s.terms[t]))  # stable
    for t in order:
        if contained[t]:
            cols = s.cols_of(t)
            xc = L[:, [j for k in contained[t] for j in s.cols_of(k)]]
            beta, *_ = np.linalg.lstsq(xc, L[:, cols], rcond=None)
            L[:, cols] = zapsmall(L[:, cols] - xc @ beta)
    keep = [rd.index(c) for c in s.columns]  # L[colnames(X), ]
    L = L[keep]
    return {lab: _drop_zero_rows(L[:, s.cols_of(t)].T) for t, lab in enumerate(s.labels)}


# ---------------------------------------------------------------------- the tests

def fstat_ddf(nu: np.ndarray, tol: float = 1e-8) -> float:
    """lmerTest's get_Fstat_ddf."""
    nu = np.asarray(nu, dtype=float)
    if len(nu) == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(np.mean(nu))
    if np.any(nu <= 2):
        return 2.0
    e = float(np.sum(nu / (nu - 2)))
    return 2 * e / (e - len(nu))


def _row(F: float, ndf: float, ddf: float, sigma: float, scale: float = 1.0) -> dict:
    ms = F * sigma**2
    F = F * scale
    return {"Sum Sq": ms * ndf, "Mean Sq": ms, "NumDF": float(ndf), "DenDF": float(ddf),
            "F value": F, "Pr(>F)": float(_dist.f_sf(F, ndf, ddf))}


def contest_satterthwaite(L: np.ndarray, beta: np.ndarray, parts, sigma: float,
                       eps: float = math.sqrt(2.0**-52)) -> dict | None:  # √(machine ε)
    """lmerTest's contestMD (Satterthwaite) for the hypothesis Lβ = 0."""
    if len(L) == 0:
        return None
    if len(L) == 1:
        t2 = float(L[0] @ beta) ** 2 / float(L[0] @ parts.cov @ L[0])
        return _row(t2, 1, float(parts.df(L)[0]), sigma)
    d, P = np.linalg.eigh(L @ parts.cov @ L.T)
    d, P = d[::-1], P[:, ::-1]  # R's eigen: decreasing
    q = int(np.sum(d > max(eps * d[0], 0.0)))
    if q == 0:
        return None
    PtL = P[:, :q].T @ L
    nu = parts.df(PtL)
    F = float(np.sum((PtL @ beta) ** 2 / d[:q])) / q
    return _row(F, q, fstat_ddf(nu) if q > 1 else float(nu[0]), sigma)


def contest_kenward_roger(L: np.ndarray, beta: np.ndarray, kr, sigma: float) -> dict | None:
    """pbkrtest's KRmodcomp(model, L) (.KR_adjust), as lmerTest's contestMD reports it."""
    if len(L) == 0:
        return None
    q = int(np.linalg.matrix_rank(L))
    if q < len(L):  # pbkrtest's force_full_rank
        Qm, _ = np.linalg.qr(L.T)
        L = Qm[:, :q].T
    phi = kr.phi
    theta = L.T @ np.linalg.solve(L @ phi @ L.T, L)
    u = [theta @ phi @ Pr @ phi for Pr in kr.P]
    a1 = a2 = 0.0
    n = len(u)
    for i in range(n):
        for j in range(i, n):
            e = 1.0 if i == j else 2.0
            a1 += e * kr.W[i, j] * np.trace(u[i]) * np.trace(u[j])
            a2 += e * kr.W[i, j] * np.sum(u[i] * u[j].T)
    B = (a1 + 6 * a2) / (2 * q)
    g = ((q + 1) * a1 - (q + 4) * a2) / ((q + 2) * a2)
    den = 3 * q + 2 * (1 - g)
    c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
    v0 = 1 + c1 * B
    v1 = 1 - c2 * B
    v2 = 1 - c3 * B
    v0 = 0.0 if abs(v0) < 1e-10 else v0
    ratio = (1 - a2 / q) / v1 if v1 != 0 else 0.0  # pbkrtest's .divZero
    rho = 1 / q * ratio**2 * v0 / v2
    ddf = 4 + (q + 2) / (q * rho - 1)
    scale = 1.0 if abs(ddf - 2) < 0.01 else ddf * (1 - a2 / q) / (ddf - 2)
    lb = L @ beta
    F = float(lb @ np.linalg.solve(L @ kr.phi_a @ L.T, lb)) / q
    return _row(F, q, ddf, sigma, scale)


def hypotheses(result, type: int | str = 3) -> dict[str, np.ndarray]:
    """lmerTest's hypothesis matrices of the table (attr(anova(m), "hypotheses"))."""
    t = check_type(type)
    stats = _stats_of(result)
    s = model_structure(stats)
    if t in (1, 2) and stats.weights:
        raise InputError("anova: types I and II use X'X, which case weights change (lmerTest's "
                         "use the unweighted model matrix); use type 3")
    if not s.terms:
        return {}
    return {1: contrasts_type1, 2: contrasts_type2, 3: contrasts_type3}[t](s, stats.xtx)


def check_type(type) -> int:
    key = str(type).strip().lower()
    if key not in TYPES:
        raise InputError(f"anova type must be 1, 2 or 3 (I, II, III), not {type!r}")
    return TYPES[key]


def check_ddf(ddf) -> str:
    key = str(ddf).strip().lower().replace("_", "-").replace(" ", "-")
    key = {"kr": "kenward-roger", "kenward": "kenward-roger"}.get(key, key)
    if key not in DDF:
        raise InputError(f"anova ddf must be satterthwaite or kenward-roger, not {ddf!r}")
    return key


def _stats_of(result):
    if getattr(result, "stats", None) is None:
        raise InputError("anova needs the model's statistics; fit it with mlpipe.fit or refit "
                         "from its result directory's stats.parquet")
    return result.stats


def anova(result, type: int | str = 3, ddf: str = "satterthwaite") -> pl.DataFrame:
    """lmerTest's anova(m, type, ddf) of a fitted model: one row per fixed-effect term with
    Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F).  The heading is in `anova_heading`."""
    from .inference import (_objective, kenward_roger_adjusted, kenward_roger_general_adjusted,
                            satterthwaite_general_parts, satterthwaite_parts)

    t, method = check_type(type), check_ddf(ddf)
    stats = _stats_of(result)
    Ls = hypotheses(result, t)
    reml = result.method == "REML"
    theta, sigma = np.asarray(result.theta, dtype=float), float(result.sigma)
    beta = result.fixed_effects["estimate"].to_numpy()
    if method == "kenward-roger":
        if not reml:
            raise InputError("Kenward-Roger's method is only available for REML model fits")
        parts = (kenward_roger_general_adjusted(_objective(stats, True), theta, sigma)
                 if stats.general else kenward_roger_adjusted(stats, theta, sigma))
        rows = {lab: contest_kenward_roger(L, beta, parts, sigma) for lab, L in Ls.items()}
    else:
        parts = (satterthwaite_general_parts(_objective(stats, reml), theta, sigma)
                 if stats.general else satterthwaite_parts(stats, theta, sigma, reml=reml))
        rows = {lab: contest_satterthwaite(L, beta, parts, sigma) for lab, L in Ls.items()}
    empty = dict.fromkeys(COLUMNS, None)
    table = pl.DataFrame([{"term": lab, **(r if r is not None else empty)}
                          for lab, r in rows.items()],
                         schema={"term": pl.Utf8, **dict.fromkeys(COLUMNS, pl.Float64)})
    return table


def anova_heading(type: int | str = 3, ddf: str = "satterthwaite") -> str:
    roman = {1: "I", 2: "II", 3: "III"}[check_type(type)]
    return f"Type {roman} Analysis of Variance Table with {DDF[check_ddf(ddf)]}'s method"


def _stars(p) -> str:
    if p is None or not math.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else \
        "." if p < 0.1 else ""


def format_anova(table: pl.DataFrame, type: int | str = 3, ddf: str = "satterthwaite") -> str:
    """The table as lmerTest prints it (5 significant digits per column, p-values to 4, the
    significance stars and their legend)."""
    from .results import r_format

    def col(name: str, digits: int = 5) -> list[str]:
        vals = table[name].to_list()
        fin = [v for v in vals if v is not None and math.isfinite(v)]
        txt = iter(r_format(fin, digits)) if fin else iter(())
        return ["NA" if v is None or not math.isfinite(v) else next(txt) for v in vals]

    def ptxt(p) -> str:
        if p is None or not math.isfinite(p):
            return "NA"
        return "<2e-16" if p < 2.2e-16 else f"{p:.4g}"

    body = [table["term"].to_list(), col("Sum Sq"), col("Mean Sq"),
            [("NA" if v is None else f"{v:g}") for v in table["NumDF"].to_list()],
            col("DenDF"), col("F value"), [ptxt(p) for p in table["Pr(>F)"].to_list()],
            [_stars(p) for p in table["Pr(>F)"].to_list()]]
    header = ["", *COLUMNS, ""]
    widths = [max(len(h), *(len(x) for x in c)) if c else len(h)
              for h, c in zip(header, body)]
    lines = [anova_heading(type, ddf)]
    fmt = lambda cells: " ".join(  # noqa: E731
        c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines.append(fmt(header).rstrip())
    for i in range(table.height):
        lines.append(fmt([c[i] for c in body]).rstrip())
    if any(_stars(p) for p in table["Pr(>F)"].to_list()):
        lines += ["---", "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- the CLI

def add_cli(sub) -> None:
    a = sub.add_parser("anova", help="F tests for the fixed-effect terms (lmerTest's anova)",
                       description="lmerTest's anova(m): an F test per fixed-effect term, "
                                   "type III (or I, II) with Satterthwaite or Kenward-Roger "
                                   "denominator df.  The model is refitted from the result "
                                   "directory's stats.parquet (or its config.toml's data).")
    a.add_argument("result", help="a result directory written by mlpipe fit --out")
    a.add_argument("--type", default="3", choices=["1", "2", "3", "I", "II", "III"],
                   help="type of the tests (lmerTest's default 3)")
    a.add_argument("--ddf", default="satterthwaite", choices=list(DDF),
                   help="denominator degrees of freedom")


def cmd_anova(args) -> int:
    from pathlib import Path

    from .compare import load_model

    check_type(args.type)
    check_ddf(args.ddf)
    path = Path(args.result)
    if not path.is_dir():
        raise InputError(f"{path} is not a result directory")
    model = load_model(path)
    result = model.refit(model.method)
    print(format_anova(anova(result, args.type, args.ddf), args.type, args.ddf))
    return 0
