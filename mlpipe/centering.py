"""The means of center() / center(x, by = g) / group_mean(x, by = g): computed once by the
statistics pass, stored with the fit, reused by prediction.

At fit time (`materialize`) the pre-aggregations of `design.Aggregates` — the grand mean of
each centred expression, and per `by` column the mean of each expression in every group —
are computed over the model's complete rows into temporary tables (compensated `favg`, as
every sum of the scan), joined to the rows of the statistics pass, and read back: O(groups
of the `by` columns), kept in `Statistics.centering` and saved in the metadata of
`stats.parquet`:

    {"grand": {EXPR_SQL: mean, ...},
     "by": [{"column": G, "type": DUCKDB_TYPE, "keys": [G's values as VARCHAR, sorted],
             "means": {EXPR_SQL: [mean per key], ...}}, ...]}

At prediction (`prediction_source`) the stored means are joined to the new rows instead of
being recomputed: `center(x)` subtracts the training grand mean; a group the training data
had gets its training group mean; a group it did not have gets the mean of its own rows in
the new data (over the rows with a value in every model column the new data has) — the
HLM convention for group-mean centring of a new unit.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from ._sql import quote_ident
from .design import Aggregates, Design, complete_condition
from .errors import FormulaError

_SAFE_TYPE = re.compile(r"[A-Z][A-Z0-9_]*(\(\d+(, ?\d+)?\))?")


def _typed(expr: str, dtype: str | None) -> str:
    """A `by` key compared as the fit typed it (text when the type is unknown or text)."""
    if dtype and _SAFE_TYPE.fullmatch(dtype.upper()) and not dtype.upper().startswith("VARCHAR"):
        return f"TRY_CAST({expr} AS {dtype.upper()})"
    return f"CAST({expr} AS VARCHAR)"


def _select(source: str, joins: list[str], cols: list[str], row: str = "") -> str:
    return (f"(SELECT __mlpipe_src.*{row}, {', '.join(cols)} FROM {source} AS __mlpipe_src "
            f"{' '.join(joins)})")


def materialize(con: duckdb.DuckDBPyConnection, source, design: Design
                ) -> tuple[str, dict | None]:
    """(the statistics pass's source, the stored means): without center()/group_mean() the
    source itself and None; otherwise the source with the means joined as columns
    (`joined`), from temporary tables computed here (one scan per `by` column and one for
    grand means, as the pre-aggregation always took)."""
    agg: Aggregates | None = design.aggregates
    if agg is None or not agg.tables:
        return source.relation, None
    complete = design.complete_sql
    stored: dict = {"grand": {}, "by": []}
    for k, (by, means) in enumerate(agg.tables.items()):
        t = f"__mlpipe_means{k}"
        avg = ", ".join(f"favg({sql}) AS {alias}" for alias, sql in means)
        if by is None:
            sql = (f"CREATE OR REPLACE TEMP TABLE {t} AS SELECT {avg} FROM {source.relation} "
                   f"WHERE {complete}")
        else:
            key = quote_ident(by)
            sql = (f"CREATE OR REPLACE TEMP TABLE {t} AS SELECT {key} AS __mlpipe_key, {avg} "
                   f"FROM {source.relation} WHERE {complete} GROUP BY {key}")
        try:
            con.execute(sql, source.params)
            aliases = ", ".join(alias for alias, _ in means)
            if by is None:
                row = con.execute(f"SELECT {aliases} FROM {t}").fetchone()
                for (_alias, arg), value in zip(means, row):
                    stored["grand"][arg] = None if value is None else float(value)
            else:
                rows = con.execute(f"SELECT CAST(__mlpipe_key AS VARCHAR), {aliases} FROM {t} "
                                   f"ORDER BY __mlpipe_key").fetchall()
                entry = {"column": by, "type": design.schema.get(by, ""),
                         "keys": [r[0] for r in rows], "means": {}}
                for j, (_alias, arg) in enumerate(means):
                    entry["means"][arg] = [None if r[j + 1] is None else float(r[j + 1])
                                           for r in rows]
                stored["by"].append(entry)
        except duckdb.Error as exc:
            raise source.error(exc, "statistics pass failed over") from None
    return joined(source.relation, design), stored


def joined(relation: str, design: Design) -> str:
    """`relation` with the means `materialize` computed joined to every row as columns (the
    relation itself without center()/group_mean()): the statistics pass's source over the
    input, or over its first rows (the probe of `stats._constant_pieces`)."""
    agg: Aggregates | None = design.aggregates
    if agg is None or not agg.tables:
        return relation
    joins, cols = [], []
    for k, (by, means) in enumerate(agg.tables.items()):
        t = f"__mlpipe_means{k}"
        cols += [f"{t}.{alias} AS {alias}" for alias, _ in means]
        joins.append(f"CROSS JOIN {t}" if by is None else
                     f"LEFT JOIN {t} ON {t}.__mlpipe_key = __mlpipe_src.{quote_ident(by)}")
    return _select(relation, joins, cols)


def prediction_source(formula, design: Design, centering: dict | None, relation: str,
                      schema: dict[str, str], con: duckdb.DuckDBPyConnection, *,
                      number_rows: bool = False) -> tuple[str, list[str]]:
    """(a table expression over `relation` carrying the means as columns, the `__mlpipe_`
    columns it adds besides the row number).  With `number_rows`, `__mlpipe_row` numbers the
    input rows before any join (input order).  The stored means are registered with `con`
    as small tables; new groups get their own means from `relation`'s rows."""
    agg = design.aggregates
    row = ", row_number() OVER () AS __mlpipe_row" if number_rows else ""
    if agg is None or not agg.tables:
        if not number_rows:
            return relation, []
        return f"(SELECT *{row} FROM {relation})", []
    if not centering:
        raise FormulaError(f"the means of center()/group_mean() the fit used are not stored "
                           f"with this model (fitted by an older mlpipe, or from merged "
                           f"statistics); refit it to predict (formula {formula.text!r})")
    by_stored = {e["column"]: e for e in centering.get("by", [])}
    grand = centering.get("grand", {})
    # the rows the new groups' own means are taken over: a value in every model column the
    # new data has (the training means were over the complete rows)
    complete = complete_condition([c for c in design.formula.columns() if c in schema], schema)
    numbered = f"(SELECT *{row} FROM {relation})" if number_rows else relation
    joins, cols, added = [], [], []
    for k, (by, means) in enumerate(agg.tables.items()):
        for alias, arg in means:
            added.append(alias)
            missing = (arg not in grand) if by is None else \
                (by not in by_stored or arg not in by_stored[by]["means"])
            if missing:
                raise FormulaError(f"the stored means of this model do not cover "
                                   f"{arg} (by {by or 'all rows'}); refit it to predict")
        if by is None:
            cols += [f"CAST({_literal(grand[arg])} AS DOUBLE) AS {alias}" for alias, arg in means]
            continue
        entry = by_stored[by]
        table = f"mlpipe_means{k}"
        data = {"__mlpipe_key": pa.array(entry["keys"], pa.string())}
        for alias, arg in means:
            data[alias] = pa.array(entry["means"][arg], pa.float64())
        con.register(table, pa.table(data))
        key = f"__mlpipe_src.{quote_ident(by)}"
        stored, fresh = f"__mlpipe_s{k}", f"__mlpipe_f{k}"
        joins.append(f"LEFT JOIN (SELECT * EXCLUDE (__mlpipe_key), "
                     f"{_typed('__mlpipe_key', entry['type'])} AS __mlpipe_key FROM "
                     f"{quote_ident(table)}) AS {stored} ON {stored}.__mlpipe_key = "
                     f"{_typed(key, entry['type'])}")
        avg = ", ".join(f"favg({sql}) AS {alias}" for alias, sql in means)
        joins.append(f"LEFT JOIN (SELECT {quote_ident(by)} AS __mlpipe_key, {avg} FROM "
                     f"{relation} WHERE {complete} GROUP BY {quote_ident(by)}) AS {fresh} "
                     f"ON {fresh}.__mlpipe_key = {key}")
        # a known group: its training mean (also when it is NULL there); else its own mean
        cols += [f"CASE WHEN {stored}.__mlpipe_key IS NOT NULL THEN {stored}.{alias} "
                 f"ELSE {fresh}.{alias} END AS {alias}" for alias, _ in means]
    return _select(numbered, joins, cols), added


def _literal(value) -> str:
    return "NULL" if value is None else f"'{float(value)!r}'"
