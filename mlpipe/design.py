"""Stage 2a: from a parsed formula and the data's schema to the model's columns as SQL.

A `Design` lists the columns of X (fixed effects) and Z (random effects of one grouping
factor), each as an R-style name and a SQL expression, plus the bound parameters those
expressions use (factor levels).  Nothing here reads rows except `discover_levels`, which asks
DuckDB for the distinct levels of the categorical columns.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import duckdb

from ._sql import Source, quote_ident, render
from .errors import DataError, FormulaError
from .formula import Expr, Formula, Term, Variable, r_number

NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                 "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "REAL", "DECIMAL")
CATEGORICAL_TYPES = ("VARCHAR", "BOOLEAN", "ENUM")


FLOAT_TYPES = ("FLOAT", "DOUBLE", "REAL")


def present_sql(column: str, dtype: str) -> str:
    """SQL that is true where `column` has a value: not NULL and, for floating-point columns,
    not NaN (R reads NaN as NA, and lme4 drops such rows). `isnan` misses some NaN bit
    patterns written by numpy, so NaN is tested as "neither finite nor infinite"."""
    q = quote_ident(column)
    if dtype.upper().startswith(FLOAT_TYPES):
        return f"({q} IS NOT NULL AND (isfinite({q}) OR isinf({q})))"
    return f"{q} IS NOT NULL"


def complete_condition(columns: list[str], schema: dict[str, str]) -> str:
    """The WHERE clause that keeps rows with a value in every one of `columns`."""
    return " AND ".join(present_sql(c, schema.get(c, "")) for c in columns) or "TRUE"


def is_numeric(dtype: str) -> bool:
    return dtype.upper().startswith(NUMERIC_TYPES)


def is_categorical(dtype: str) -> bool:
    return dtype.upper().startswith(CATEGORICAL_TYPES)


@dataclass(frozen=True)
class Column:
    """One column of X or Z: its R-style name and SQL (None is the constant 1), and the
    same column as the term representation every engine compiles (`parts`: the product of
    its pieces, () the constant 1).  A piece is ("expr", Expr) — a numeric expression —,
    ("level", column, level, known) — the indicator of a categorical level (`known`: the
    levels outside which it is null, in prediction) —, ("poly", Expr, j) — poly()'s j-th
    column — or ("pw", Expr, j) — pw()'s j-th segment."""

    name: str
    sql: str | None
    parts: tuple = ()
    #: the SQL of each piece of the product (`sql` is their " * " join); () when the column
    #: is one piece (or the constant 1)
    pieces: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReBlock:
    """A correlated block of random effects: columns [start, start + size) of Z."""

    start: int
    size: int


@dataclass(frozen=True)
class FactorDesign:
    """The random effects on one grouping factor: lme4's name (`school:class`), the columns
    whose combination it is, its Z columns (as indices into `Design.random`, the distinct Z
    columns of the model) and their correlated blocks (in the factor's own column order)."""

    name: str
    columns: tuple[str, ...]
    z: tuple[int, ...]
    names: tuple[str, ...]
    blocks: tuple[ReBlock, ...]


@dataclass
class Design:
    formula: Formula
    response: Column
    fixed: list[Column]
    random: list[Column]  # the distinct columns of Z (one factor: its columns, in order)
    blocks: list[ReBlock]  # one factor: its correlated blocks; several: empty
    group: str | None  # one factor: its grouping column; several: None
    params: dict[str, object] = field(default_factory=dict)
    levels: dict[str, list] = field(default_factory=dict)
    aggregates: Aggregates | None = None
    schema: dict[str, str] = field(default_factory=dict)
    factors: list[FactorDesign] = field(default_factory=list)
    #: Σ offset(x) terms as SQL (known coefficient 1), None without offset()
    offset: str | None = None
    #: the case-weight column (lme4's `weights =`) and its SQL, None without weights
    weights: str | None = None
    weights_sql: str | None = None
    #: further columns whose nulls drop a row (the residual structure's)
    extra_columns: tuple[str, ...] = ()

    @property
    def complete_sql(self) -> str:
        """The WHERE clause that keeps rows with no null (or NaN) in any used column."""
        return complete_condition(model_columns(self.formula, self.weights, self.extra_columns),
                                  self.schema)


def model_columns(formula: Formula, weights: str | None = None,
                  extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The columns whose nulls drop a row: the formula's, the weights column and `extra`
    (the residual structure's time, series and strata columns)."""
    cols = formula.columns() + ([weights] if weights else []) + list(extra)
    return list(dict.fromkeys(cols))


class Aggregates:
    """center(x), center(x, by=g) and group_mean(x, by=g): grand and group means computed by
    a pre-aggregation over the model's complete rows and joined to every row: `source()` wraps
    the data source in a relation that carries them as extra columns."""

    def __init__(self, formula: Formula):
        self.refs: dict[Expr, str] = {}
        self.tables: dict[str | None, list[tuple[str, str]]] = {}  # by -> [(alias, arg sql)]
        for k, call in enumerate(formula.aggregates()):
            arg = call.args[0]
            if arg.aggregates():
                raise FormulaError(f"{call.deparse()}: center()/group_mean() cannot be nested")
            alias = f"__mlpipe_a{k}"
            by = call.by
            self.tables.setdefault(by, []).append((alias, arg.sql()))
            self.refs[call] = f"({arg.sql()} - {alias})" if call.value == "center" else alias

    def table_name(self, by: str | None) -> str:
        return "__mlpipe_all" if by is None else f"__mlpipe_by{list(self.tables).index(by)}"

    def source(self, source: str, complete: str) -> str:
        """The data source, with the means as columns when the formula has any (a subquery
        whose pre-aggregations read the source's complete rows)."""
        if not self.tables:
            return source
        ctes, joins, cols = [], [], []
        for by, means in self.tables.items():
            t = self.table_name(by)
            # favg: fsum / count, compensated (order-independent in practice, as the scan's
            # sums: mlpipe/stats.py); NULL over no rows, as avg
            avg = ", ".join(f"favg({sql}) AS {alias}" for alias, sql in means)
            cols += [f"{t}.{alias} AS {alias}" for alias, _ in means]
            if by is None:
                ctes.append(f"{t} AS (SELECT {avg} FROM {source} WHERE {complete})")
                joins.append(f"CROSS JOIN {t}")
            else:
                key = quote_ident(by)
                ctes.append(f"{t} AS (SELECT {key} AS __mlpipe_key, {avg} FROM {source} "
                            f"WHERE {complete} GROUP BY {key})")
                joins.append(f"LEFT JOIN {t} ON {t}.__mlpipe_key = __mlpipe_src.{key}")
        return (f"(WITH {', '.join(ctes)} SELECT __mlpipe_src.*, {', '.join(cols)} "
                f"FROM {source} AS __mlpipe_src {' '.join(joins)})")


def check_columns(formula: Formula, schema: dict[str, str]) -> None:
    """Every column the formula names exists; the response and numeric terms are numeric."""
    for col in formula.columns():
        if col not in schema:
            known = ", ".join(list(schema)[:12]) + (", ..." if len(schema) > 12 else "")
            raise FormulaError(f"column {col!r} named in the formula is not in the data "
                               f"(columns: {known})")
    for col in formula.response.columns():
        if not is_numeric(schema[col]):
            raise DataError(f"outcome column {col!r} is not numeric (type {schema[col]})")
    exprs = [v.expr for t in formula.fixed for v in t]
    exprs += [v.expr for r in formula.random for v in r.variables()]
    for e in exprs + list(formula.offsets):
        if e.categorical:  # factor(x) / relevel() / C(): any numeric or categorical column
            col = e.factor_column
            if not (is_numeric(schema[col]) or is_categorical(schema[col])):
                raise DataError(f"{e.deparse()}: column {col!r} has type {schema[col]}, "
                                f"which is neither numeric nor categorical")
            continue
        if e.kind == "col" and e not in formula.offsets:
            if not (is_numeric(schema[e.value]) or is_categorical(schema[e.value])):
                raise DataError(f"column {e.value!r} has type {schema[e.value]}, "
                                f"which is neither numeric nor categorical")
            continue
        for col in e.columns():
            if not is_numeric(schema[col]) and col != e.by:
                raise DataError(f"{e.deparse()} uses column {col!r}, which is not numeric "
                                f"(type {schema[col]})")


def check_weights(weights: str | None, schema: dict[str, str]) -> None:
    """The case-weight column exists and is numeric."""
    if weights is None:
        return
    if not isinstance(weights, str) or not weights:
        raise FormulaError("weights must name a column")
    if weights not in schema:
        raise FormulaError(f"weights column {weights!r} is not in the data")
    if not is_numeric(schema[weights]):
        raise DataError(f"weights column {weights!r} is not numeric (type {schema[weights]})")


def discover_levels(con: duckdb.DuckDBPyConnection, source: Source, formula: Formula,
                    schema: dict[str, str], weights: str | None = None,
                    extra: tuple[str, ...] = ()) -> dict[str, list]:
    """Sorted distinct levels of each categorical predictor, over the complete rows only:
    under the column's name for a bare categorical column, under the label for factor(x),
    relevel(x, r), C(x, ref = r) (numbers sort numerically; the reference level first)."""
    keys, calls = level_keys(formula, schema)
    if not keys:
        return {}
    cols = list(dict.fromkeys(keys.values()))
    lists = ", ".join(f"list_sort(list(DISTINCT {quote_ident(c)}))" for c in cols)
    complete = complete_condition(model_columns(formula, weights, extra), schema)
    sql = render("levels", lists=lists, source=source.relation, complete=complete)
    try:
        row = con.execute(sql, source.params).fetchall()[0]  # all: no open result left
    except duckdb.Error as exc:
        raise source.error(exc) from None
    found = {c: (list(v) if v is not None else []) for c, v in zip(cols, row)}
    return coding_from_levels(keys, calls, found)


def level_keys(formula: Formula, schema: dict[str, str]) -> tuple[dict[str, str],
                                                                   dict[str, Expr]]:
    """The model's categorical variables: coding key -> data column (a bare categorical
    column is its own key, factor(x) / relevel() / C() are keyed by their label), and the
    calls by label.  Every engine asks its data for the sorted distinct levels of those
    columns over the complete rows and hands them to `coding_from_levels`."""
    keys: dict[str, str] = {}  # key -> column
    calls: dict[str, Expr] = {}
    for t in _all_terms(formula):
        for v in t:
            if v.factor_call:
                keys.setdefault(v.label, v.expr.factor_column)
                calls[v.label] = v.expr
            elif v.column is not None and is_categorical(schema[v.column]):
                keys.setdefault(v.column, v.column)
    for key in calls:
        if key in schema and key in keys.values():
            raise FormulaError(f"column {key!r} has the name of the term {key}; rename it")
    return keys, calls


def coding_from_levels(keys: dict[str, str], calls: dict[str, Expr],
                       found: dict[str, list]) -> dict[str, list]:
    """The coding (levels per key, reference level first) from each column's sorted
    distinct levels `found`."""
    out = {}
    for key, col in keys.items():
        levels = found[col]
        if key in calls:
            levels = _with_reference(calls[key], levels)
        out[key] = levels
    return out


def coding_keys(formula: Formula) -> list[str]:
    """The keys of the model's coding (`levels`) that are not column names: the labels of
    factor() / relevel() / C() variables and of scale() / poly() calls."""
    keys = [v.label for t in _all_terms(formula) for v in t if v.factor_call]
    return list(dict.fromkeys(keys + [c.deparse() for c in formula.prepass()]))


def factor_columns(formula: Formula) -> list[str]:
    """The columns under factor() / relevel() / C() (categorical whatever their type)."""
    return list(dict.fromkeys(v.expr.factor_column for t in _all_terms(formula) for v in t
                              if v.factor_call))


def _with_reference(call: Expr, levels: list) -> list:
    """The levels of factor()/relevel()/C() with their reference level first: relevel's
    reference is a level's label or (a number) its position, as R's; C's is a level's label
    or a level's value."""
    inner = call.args[0]
    if inner.categorical:
        levels = _with_reference(inner, levels)
    ref = call.reference
    if ref is None:
        return levels
    labels = [_level_label(lv) for lv in levels]
    if ref.kind == "str":
        pos = labels.index(ref.value) if ref.value in labels else None
    elif call.value == "relevel":
        k = float(ref.value)
        pos = int(k) - 1 if k.is_integer() and 1 <= k <= len(levels) else None
    else:
        value = float(ref.value)
        pos = next((i for i, lv in enumerate(levels) if not isinstance(lv, (bool, str))
                    and float(lv) == value), None)
        if pos is None and ref.value in labels:
            pos = labels.index(ref.value)
    if pos is None:
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        what = "position" if call.value == "relevel" and ref.kind == "num" else "level"
        raise DataError(f"{call.deparse()}: reference {what} {ref.deparse()} is not a level of "
                        f"{call.factor_column!r} in the rows used (levels: {shown})")
    return [levels[pos]] + levels[:pos] + levels[pos + 1:]


def compute_prepass(con: duckdb.DuckDBPyConnection, source: Source, formula: Formula,
                    schema: dict[str, str], weights: str | None = None,
                    extra: tuple[str, ...] = ()) -> dict[str, list]:
    """The constants of scale(x) ([mean, SD]) and poly(x, k) ([alpha_1..k, norm2_1..k+2],
    R's `attr(, "coefs")`) over every row with a value of x — as R, which evaluates the
    formula's variables on the whole data before it drops the rows missing another variable
    (the response, a predictor): one query of two scans (the means, then the centred power
    sums, all compensated fsum()), stored with the fit under the call's label so prediction
    reuses them.  (`weights`, `extra`: unused, kept for the callers' signature.)"""
    calls = formula.prepass()
    if not calls:
        return {}
    for call in calls:
        if call.args[0].aggregates() or call.args[0].prepass():
            raise FormulaError(f"{call.deparse()}: center()/group_mean()/scale()/poly() "
                               f"cannot be nested in it")
    exprs = list(dict.fromkeys(c.args[0] for c in calls))
    args = list(dict.fromkeys(e.sql() for e in exprs))
    present = {e.sql(): complete_condition(e.columns(), schema) for e in exprs}
    power = {a: 2 for a in args}
    for call in calls:
        if call.value == "poly":
            a = call.args[0].sql()
            power[a] = max(power[a], 2 * _poly_degree(call))
    means = ", ".join(f"favg({a}) FILTER (WHERE {present[a]}) AS m{k}, "
                      f"count(*) FILTER (WHERE {present[a]}) AS n{k}"
                      for k, a in enumerate(args))
    sums = ", ".join(f"fsum(power({a} - __mlpipe_m.m{k}, {r})) FILTER (WHERE {present[a]}) "
                     f"AS s{k}_{r}" for k, a in enumerate(args)
                     for r in range(1, power[a] + 1))
    firsts = ", ".join(f"any_value(__mlpipe_m.n{k}), any_value(__mlpipe_m.m{k})"
                       for k in range(len(args)))
    sql = (f"WITH __mlpipe_m AS (SELECT {means} FROM {source.relation}) SELECT "
           f"{firsts}, {sums} FROM {source.relation} CROSS JOIN __mlpipe_m")
    try:
        row = con.execute(sql, source.params).fetchall()[0]  # all: no open result left
    except duckdb.Error as exc:
        raise source.error(exc) from None
    head, rest = row[:2 * len(args)], iter(row[2 * len(args):])
    count = {a: int(head[2 * k] or 0) for k, a in enumerate(args)}
    mean = {a: head[2 * k + 1] for k, a in enumerate(args)}
    moments = {a: [float(count[a])] + [float(next(rest) or 0.0) for _ in range(power[a])]
               for a in args}
    out: dict[str, list] = {}
    for call in calls:
        a = call.args[0].sql()
        n = count[a]
        if n == 0 or mean[a] is None:
            continue  # no rows: the statistics pass says so
        mom = moments[a]
        if call.value == "scale":
            if n < 2 or not mom[2] > 0:
                raise DataError(f"{call.deparse()}: the column is constant in the data "
                                f"(its SD is 0)")
            out[call.deparse()] = [float(mean[a]), math.sqrt(mom[2] / (n - 1))]
        else:
            out[call.deparse()] = _poly_coefs(call, float(mean[a]), mom)
    return out


def _poly_degree(call: Expr) -> int:
    k = call.args[1]
    return int(float((k.args[0] if k.kind == "kw" else k).value))


def _poly_coefs(call: Expr, mean: float, mom: list[float]) -> list[float]:
    """R's poly() coefficients from the centred power sums M_r = Σ (x - x̄)^r: the monic
    orthogonal polynomials P_j in u = x - x̄ by the three-term recurrence, norm2_j = Σ P_j²
    and alpha_j = x̄ + Σ u P_j² / Σ P_j² as polynomial-coefficient algebra on the moments."""
    import numpy as np

    k = _poly_degree(call)
    moments = np.asarray(mom)

    def inner(a: np.ndarray, b: np.ndarray, shift: int = 0) -> float:
        return float(sum(a[i] * b[j] * moments[i + j + shift]
                         for i in range(len(a)) for j in range(len(b)) if a[i] and b[j]))

    prev, cur = None, np.array([1.0])
    norm2, alpha = [1.0], []
    for j in range(k + 1):
        nj = inner(cur, cur)
        norm2.append(nj)
        if j == k:
            break
        aj = inner(cur, cur, 1) / nj
        alpha.append(aj + mean)
        nxt = np.concatenate([[0.0], cur]) - aj * np.concatenate([cur, [0.0]])
        if prev is not None:
            nxt[:len(prev)] -= nj / norm2[-2] * prev
        prev, cur = cur, nxt
    n, spread2 = moments[0], moments[2] / moments[0]
    if not norm2[-1] > 1e-10 * n * spread2 ** k:
        raise DataError(f"{call.deparse()}: 'degree' must be less than the number of unique "
                        f"points of {call.args[0].deparse()}")
    return alpha + norm2


def _prepass_sql(call: Expr, constants: dict[str, list]) -> str:
    """SQL of scale(x) / the columns of poly(x, k) (comma-free: one per degree) from the
    stored constants."""
    key = call.deparse()
    if key not in constants:
        raise FormulaError(f"{key}: its constants (from the pre-pass over the training rows) "
                           f"are not stored with the model; refit with this mlpipe version")
    c = constants[key]
    x = call.args[0].sql()
    if call.value == "scale":
        return f"(({x} - CAST({c[0]!r} AS DOUBLE)) / CAST({c[1]!r} AS DOUBLE))"
    raise AssertionError(call.value)


def poly_columns(call: Expr, constants: dict[str, list]) -> list[str]:
    """The k columns of poly(x, k): R's predict-time recurrence with the stored alpha and
    norm2, Z_1 = x - α_1, Z_{i+1} = (x - α_{i+1}) Z_i - (norm2_{i+1} / norm2_i) Z_{i-1},
    each divided by sqrt(norm2_{i+1})."""
    key = call.deparse()
    if key not in constants:
        raise FormulaError(f"{key}: its constants (from the pre-pass over the training rows) "
                           f"are not stored with the model; refit with this mlpipe version")
    k = _poly_degree(call)
    c = constants[key]
    alpha, norm2 = c[:k], c[k:]  # norm2 as R's: 1, n, ...
    x = call.args[0].sql()
    lit = lambda v: f"CAST({float(v)!r} AS DOUBLE)"  # noqa: E731
    z = ["1.0", f"({x} - {lit(alpha[0])})"]
    for i in range(1, k):
        z.append(f"(({x} - {lit(alpha[i])}) * {z[i]} - {lit(norm2[i + 1] / norm2[i])} * "
                 f"{z[i - 1]})")
    return [f"({z[j]} / {lit(math.sqrt(norm2[j + 1]))})" for j in range(1, k + 1)]


def _all_terms(formula: Formula) -> list[Term]:
    return list(formula.fixed) + [t for r in formula.random for t in r.terms]


class _Coder:
    """Turns terms into columns, with treatment coding of categorical variables.

    `strict` (prediction on new data): a factor(x) / relevel() / C() dummy is NULL, not 0,
    for a value that is not one of the model's levels, so the row's prediction is NULL."""

    def __init__(self, schema: dict[str, str], levels: dict[str, list],
                 aggregates: Aggregates, strict: bool = False):
        self.schema = schema
        self.aggregates = aggregates
        self.levels = levels
        self.strict = strict
        self.params: dict[str, object] = {}
        self._param_of: dict[tuple[str, object], str] = {}

    def param(self, col: str, level) -> str:
        key = (col, type(level).__name__, level)
        if key not in self._param_of:
            name = f"lv{len(self._param_of)}"
            self._param_of[key] = name
            self.params[name] = level
        return f"${self._param_of[key]}"

    def level_sql(self, col: str, level, known: list | None = None) -> str:
        q = quote_ident(col)
        if known is not None:
            ins = ", ".join(self.param(col, lv) for lv in known)
            return (f"CASE WHEN {q} = {self.param(col, level)} THEN 1.0 "
                    f"WHEN {q} IN ({ins}) THEN 0.0 END")
        return f"CASE WHEN {q} = {self.param(col, level)} THEN 1.0 ELSE 0.0 END"

    def variable_columns(self, var: Variable, full: bool) -> list[tuple[str, str, tuple]]:
        """(name, SQL, piece) of each column of one variable (see `Column.parts`)."""
        col = var.column
        if var.factor_call:
            col, key = var.expr.factor_column, var.label
        elif col is None or not is_categorical(self.schema[col]):
            if var.expr.kind == "call" and var.expr.value == "poly":
                sqls = poly_columns(var.expr, self.levels)
                return [(f"{var.label}{j + 1}", sql, ("poly", var.expr, j))
                        for j, sql in enumerate(sqls)]
            if var.expr.kind == "call" and var.expr.value == "pw":  # the two segments
                t, knot = (a.sql(self.aggregates.refs) for a in var.expr.args)
                return [(f"{var.label}1", f"least({t}, {knot})", ("pw", var.expr, 0)),
                        (f"{var.label}2", f"greatest({t} - {knot}, 0.0)", ("pw", var.expr, 1))]
            return [(var.label, var.expr.sql(self.aggregates.refs), ("expr", var.expr))]
        else:
            key = col
        levels = self.levels[key]
        if len(levels) < 2 and not full:
            raise DataError(f"categorical predictor {key if var.factor_call else repr(key)} "
                            f"has fewer than 2 levels "
                            f"in the complete rows")
        keep = levels if full else levels[1:]
        known = levels if self.strict and var.factor_call else None
        return [(var.label + _level_label(lv), self.level_sql(col, lv, known),
                 ("level", col, lv, None if known is None else tuple(known))) for lv in keep]

    def term_columns(self, term: Term, present: set[frozenset]) -> list[Column]:
        """Columns of one term; a factor gets full dummy coding when the term without it is
        absent from the model (R's marginality rule), otherwise treatment contrasts."""
        parts = []
        for var in term:
            rest = frozenset(v for v in term if v is not var)
            parts.append(self.variable_columns(var, full=rest not in present))
        cols = []
        # R varies the first variable fastest
        for combo in itertools.product(*reversed(parts)):
            combo = combo[::-1]
            name = ":".join(c[0] for c in combo)
            sql = " * ".join(c[1] for c in combo) if len(combo) > 1 else combo[0][1]
            cols.append(Column(name, sql, tuple(c[2] for c in combo),
                               tuple(c[1] for c in combo) if len(combo) > 1 else ()))
        return cols

    def columns(self, terms, intercept: bool) -> list[Column]:
        present = {frozenset(t) for t in terms}
        if intercept:
            present.add(frozenset())
        cols = [Column("(Intercept)", None)] if intercept else []
        for t in terms:
            cols += self.term_columns(t, present)
        return cols


def _level_label(level) -> str:
    """A level as R's as.character labels it (TRUE/FALSE, numbers to 15 significant
    digits: 1, 0.5, 1e+05)."""
    if isinstance(level, bool):
        return "TRUE" if level else "FALSE"
    if isinstance(level, float):
        return r_number(level)
    return str(level)


def design_from_data(con: duckdb.DuckDBPyConnection, source: Source, formula: Formula,
                     schema: dict[str, str], *, weights: str | None = None,
                     extra: tuple[str, ...] = (), coding: dict[str, list] | None = None
                     ) -> Design:
    """The model's `Design` over `source`: the categorical levels of its complete rows (or
    `coding`, a fit's or a store's, which those levels must stay within) and the pre-pass
    constants of scale() / poly(), then the compiled columns — the one preparation the
    statistics, moment and GLMM passes share."""
    levels = discover_levels(con, source, formula, schema, weights, extra)
    if coding is not None:
        _check_coding(levels, coding, source)
        levels = dict(coding)
    else:
        levels.update(compute_prepass(con, source, formula, schema, weights, extra))
    return build_design(formula, schema, levels, weights=weights, extra_columns=extra)


def _check_coding(found: dict[str, list], coding: dict[str, list], source: Source) -> None:
    """The categorical levels of new data must be among those of the coding given."""
    for key, levels in found.items():
        known = coding.get(key)
        if known is None:
            continue
        new = [lv for lv in levels if lv not in known]
        if new:
            raise DataError(f"{source.location}: level {new[0]!r} of {key!r} is not in the "
                            f"statistics' coding ({len(known)} levels: "
                            f"{', '.join(map(repr, known[:6]))}{', ...' if len(known) > 6 else ''})"
                            f"; rebuild the statistics over all inputs")


def build_design(formula: Formula, schema: dict[str, str], levels: dict[str, list], *,
                 weights: str | None = None, strict: bool = False,
                 extra_columns: tuple[str, ...] = ()) -> Design:
    """Compile the formula's terms to SQL columns of X and Z.  `levels` is the coding of
    the model's variables: the levels of categorical ones (see `discover_levels`) and the
    pre-pass constants of scale() / poly() (`compute_prepass`), keyed by column or label;
    `weights` the case-weight column; `strict` for prediction (see `_Coder`)."""
    if not formula.random:
        raise FormulaError(f"formula {formula.text!r} has no random-effects term such as "
                           f"(1 | group); fit a mixed model or use ordinary regression")
    aggregates = Aggregates(formula)
    for call in formula.prepass():
        if call.value == "scale":
            aggregates.refs[call] = _prepass_sql(call, levels)
    coder = _Coder(schema, levels, aggregates, strict)
    response = Column(formula.response.deparse(), formula.response.sql(aggregates.refs),
                      (("expr", formula.response),))
    offset = " + ".join(e.sql(aggregates.refs) for e in formula.offsets) or None
    extra = {"offset": offset, "weights": weights, "extra_columns": tuple(extra_columns),
             "weights_sql": f"CAST({quote_ident(weights)} AS DOUBLE)" if weights else None}
    fixed = coder.columns(formula.fixed, formula.intercept)
    if not fixed:
        raise FormulaError(f"formula {formula.text!r} has no fixed effects; keep the intercept "
                           f"or add a predictor")
    random: list[Column] = []  # distinct Z columns (by SQL) over all factors
    factors: list[FactorDesign] = []
    for group in formula.grouping_factors:
        own: list[Column] = []
        blocks: list[ReBlock] = []
        for rt in (r for r in formula.random if r.group == group):
            cols = coder.columns(rt.terms, rt.intercept)
            for c in cols:
                if any(c.name == r.name for r in own):
                    raise FormulaError(f"random effect {c.name!r} for {rt.group!r} appears "
                                       f"in two random terms")
            blocks.append(ReBlock(len(own), len(cols)))
            own += cols
        z = []
        for c in own:
            if c.sql not in [r.sql for r in random]:
                random.append(c)
            z.append([r.sql for r in random].index(c.sql))
        factors.append(FactorDesign(group, formula.factor_columns(group), tuple(z),
                                    tuple(c.name for c in own), tuple(blocks)))
    if len(factors) == 1:
        f = factors[0]
        return Design(formula, response, fixed, random, list(f.blocks), f.columns[0]
                      if len(f.columns) == 1 else None, coder.params, levels, aggregates,
                      dict(schema), factors, **extra)
    return Design(formula, response, fixed, random, [], None, coder.params, levels,
                  aggregates, dict(schema), factors, **extra)
