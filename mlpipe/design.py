"""Stage 2a: from a parsed formula and the data's schema to the model's columns as SQL.

A `Design` lists the columns of X (fixed effects) and Z (random effects of one grouping
factor), each as an R-style name and a SQL expression, plus the bound parameters those
expressions use (factor levels).  Nothing here reads rows except `discover_levels`, which asks
DuckDB for the distinct levels of the categorical columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import duckdb

from ._sql import Source, quote_ident, render
from .errors import DataError, FormulaError
from .formula import Expr, Formula, Term, Variable

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
    """One column of X or Z: its R-style name and SQL (None is the constant 1)."""

    name: str
    sql: str | None


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

    @property
    def complete_sql(self) -> str:
        """The WHERE clause that keeps rows with no null (or NaN) in any used column."""
        return complete_condition(self.formula.columns(), self.schema)


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
    for e in exprs:
        if e.kind == "col":
            if not (is_numeric(schema[e.value]) or is_categorical(schema[e.value])):
                raise DataError(f"column {e.value!r} has type {schema[e.value]}, "
                                f"which is neither numeric nor categorical")
            continue
        for col in e.columns():
            if not is_numeric(schema[col]) and col != e.by:
                raise DataError(f"{e.deparse()} uses column {col!r}, which is not numeric "
                                f"(type {schema[col]})")


def discover_levels(con: duckdb.DuckDBPyConnection, source: Source, formula: Formula,
                    schema: dict[str, str]) -> dict[str, list]:
    """Sorted distinct levels of each categorical predictor, over the complete rows only."""
    cats = [v.column for t in _all_terms(formula) for v in t
            if v.column is not None and is_categorical(schema[v.column])]
    cats = list(dict.fromkeys(cats))
    if not cats:
        return {}
    lists = ", ".join(f"list_sort(list(DISTINCT {quote_ident(c)}))" for c in cats)
    complete = complete_condition(formula.columns(), schema)
    sql = render("levels", lists=lists, source=source.relation, complete=complete)
    try:
        row = con.execute(sql, source.params).fetchone()
    except duckdb.Error as exc:
        raise source.error(exc) from None
    return {c: (list(v) if v is not None else []) for c, v in zip(cats, row)}


def _all_terms(formula: Formula) -> list[Term]:
    return list(formula.fixed) + [t for r in formula.random for t in r.terms]


class _Coder:
    """Turns terms into columns, with treatment coding of categorical variables."""

    def __init__(self, schema: dict[str, str], levels: dict[str, list],
                 aggregates: Aggregates):
        self.schema = schema
        self.aggregates = aggregates
        self.levels = levels
        self.params: dict[str, object] = {}
        self._param_of: dict[tuple[str, object], str] = {}

    def level_sql(self, col: str, level) -> str:
        key = (col, level)
        if key not in self._param_of:
            name = f"lv{len(self._param_of)}"
            self._param_of[key] = name
            self.params[name] = level
        return f"CASE WHEN {quote_ident(col)} = ${self._param_of[key]} THEN 1.0 ELSE 0.0 END"

    def variable_columns(self, var: Variable, full: bool) -> list[tuple[str, str]]:
        col = var.column
        if col is None or not is_categorical(self.schema[col]):
            return [(var.label, var.expr.sql(self.aggregates.refs))]
        levels = self.levels[col]
        if len(levels) < 2 and not full:
            raise DataError(f"categorical predictor {col!r} has fewer than 2 levels "
                            f"in the complete rows")
        keep = levels if full else levels[1:]
        return [(var.label + _level_label(lv), self.level_sql(col, lv)) for lv in keep]

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
            cols.append(Column(name, sql))
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
    if isinstance(level, bool):
        return "TRUE" if level else "FALSE"
    return str(level)


def build_design(formula: Formula, schema: dict[str, str], levels: dict[str, list]) -> Design:
    """Compile the formula's terms to SQL columns of X and Z."""
    if not formula.random:
        raise FormulaError(f"formula {formula.text!r} has no random-effects term such as "
                           f"(1 | group); fit a mixed model or use ordinary regression")
    aggregates = Aggregates(formula)
    coder = _Coder(schema, levels, aggregates)
    response = Column(formula.response.deparse(), formula.response.sql(aggregates.refs))
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
                      dict(schema), factors)
    return Design(formula, response, fixed, random, [], None, coder.params, levels,
                  aggregates, dict(schema), factors)
