"""The Polars engine: the statistics pass through Polars' lazy API.

The model's columns come from the same term representation DuckDB's SQL is compiled from
(`design.Column.parts`: numeric expressions of the formula's `Expr` tree, indicators of
categorical levels, pw() segments), compiled here to Polars expressions instead:

    scan_parquet / scan_csv (or the frame given)      the rows
      .filter(complete)                               no null / NaN in a model column
      .with_columns(c1 .. ck)                         the distinct columns of [X Z y]
      .group_by(grouping columns).agg(n, Σ ci·cj)     per group (cell), streaming
    -> sorted by the grouping columns, totals by summing the groups, and the same
       `Statistics` value as DuckDB's (mlpipe.stats.assemble)

Categorical levels and scale()'s constants come from Polars too (a first, light query over
those columns).  Not compiled to Polars (refused, naming the engine to use): poly(),
center() / group_mean(), residual structures.  Polars' sums are plain floating-point sums:
equal to DuckDB's compensated ones to ~1e-15 relative, but not bit-identical across thread
counts (use the DuckDB engine for byte-identical reruns); Polars takes its thread count from
POLARS_MAX_THREADS when it is first imported.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

from ..errors import DataError, FormulaError, InputError
from .base import Engine

#: Polars dtype name -> the DuckDB type name the checks of mlpipe/design.py read
_TYPES = {"Float64": "DOUBLE", "Float32": "FLOAT", "Int64": "BIGINT", "Int32": "INTEGER",
          "Int16": "SMALLINT", "Int8": "TINYINT", "UInt64": "UBIGINT", "UInt32": "UINTEGER",
          "UInt16": "USMALLINT", "UInt8": "UTINYINT", "String": "VARCHAR", "Utf8": "VARCHAR",
          "Boolean": "BOOLEAN", "Categorical": "VARCHAR", "Enum": "ENUM", "Date": "DATE",
          "Datetime": "TIMESTAMP", "Decimal": "DECIMAL", "Int128": "HUGEINT", "Time": "TIME_NS",
          "Duration": "INTERVAL"}


@functools.lru_cache(maxsize=1)
def _polars_of() -> dict:
    """DuckDB type name -> Polars dtype (CSV columns typed as DuckDB's sniffer types them)."""
    import polars as pl

    return {"DOUBLE": pl.Float64, "FLOAT": pl.Float32, "REAL": pl.Float32,
            "BIGINT": pl.Int64, "INTEGER": pl.Int32, "SMALLINT": pl.Int16,
            "TINYINT": pl.Int8, "UBIGINT": pl.UInt64, "UINTEGER": pl.UInt32,
            "USMALLINT": pl.UInt16, "UTINYINT": pl.UInt8, "HUGEINT": pl.Int128,
            "VARCHAR": pl.String, "BOOLEAN": pl.Boolean, "DATE": pl.Date,
            "TIMESTAMP": pl.Datetime, "DECIMAL": pl.Float64}


class PolarsEngine(Engine):
    name = "polars"

    def statistics(self, data, formula, *, weights=None, correlation=None,
                   residual_variance_by=None, coding=None):
        import numpy as np
        import polars as pl

        from .. import runlog
        from ..design import (build_design, check_columns, check_weights, coding_from_levels,
                              level_keys, model_columns)
        from ..formula import parse_formula
        from ..stats import _cell_columns, _Moments, assemble

        parsed = parse_formula(formula)
        self.refuse(parsed, correlation, residual_variance_by, poly=True)
        t0 = time.perf_counter()
        lf, location = _frame(data, parsed.value_columns() + ([weights] if weights else []))
        try:
            schema = {k: _duck_type(v) for k, v in lf.collect_schema().items()}
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"cannot read {location or 'the data'}: {_first(exc)}") from None
        check_columns(parsed, schema)
        check_weights(weights, schema)
        complete = _complete(model_columns(parsed, weights), schema)
        rows = lf.filter(complete)

        keys, calls = level_keys(parsed, schema)
        found = {}
        if keys:
            cols = list(dict.fromkeys(keys.values()))
            got = _collect(rows.select([pl.col(c).unique().sort().implode() for c in cols]),
                           location)
            found = {c: [v for v in got[c][0].to_list()] for c in cols}
        levels = coding_from_levels(keys, calls, found) if keys else {}
        if coding is not None:
            from ..design import _check_coding

            _check_coding(levels, coding, _Named(location))
            levels = dict(coding)
        else:
            levels.update(_scale_constants(parsed, lf, location, schema))
        design = build_design(parsed, schema, levels, weights=weights)
        mom = _Moments(design)
        t1 = time.perf_counter()
        runlog.stage("prepare", t1 - t0)

        exprs = _model_exprs(design, mom)
        pre = "__mlpipe_"  # internal names: never a data column's
        cw = pl.col(weights).cast(pl.Float64) if weights else None
        frame = rows.with_columns([e.alias(f"{pre}c{k}") for k, e in exprs.items()]
                                  + ([cw.alias(f"{pre}cw")] if weights else []))
        group_cols = [design.group] if design.group is not None else _cell_columns(design)
        aggs = [pl.len().alias(f"{pre}n")]
        for i, j in mom.pairs():
            name = mom.name(i, j)
            if name == "n":
                continue
            body = [pl.col(f"{pre}c{k}") for k in (i, j) if k != 0]
            prod = pl.lit(1.0) if not body else body[0] if len(body) == 1 else body[0] * body[1]
            if weights:
                w = pl.col(f"{pre}cw")
                prod = w if (i, j) == (0, 0) else w * prod
            aggs.append(prod.sum().alias(pre + name))
        if weights:
            aggs += [pl.col(f"{pre}cw").clip(lower_bound=1e-300).log().sum()
                     .alias(f"{pre}slogw"), pl.col(f"{pre}cw").min().alias(f"{pre}wmin")]
        from .. import progress

        with progress.stage(f"statistics pass over {location or 'the data'} (Polars)"):
            per = _collect(frame.group_by(group_cols).agg(aggs).sort(group_cols), location)
        rows_read = int(_collect(lf.select(pl.len()), location).item())

        names = [mom.name(i, j) for i, j in mom.pairs()]
        count = int(per[f"{pre}n"].sum()) if per.height else 0
        totals = {(i, j): float(np.sum(per[pre + nm].to_numpy())) if per.height else None
                  for (i, j), nm in zip(mom.pairs(), names)}
        per_group = {nm: per[pre + nm].to_numpy() for nm in dict.fromkeys(names + ["n"])}
        factor_labels = []
        if design.group is not None:
            per_group["level"] = _labels(per.select(design.group))
        else:
            for k, f in enumerate(design.factors):
                cols = list(f.columns)
                lv = per.select(cols).unique().sort(cols).with_row_index(f"{pre}idx")
                factor_labels.append(_labels(lv.select(cols)))
                per_group[f"f{k}"] = per.join(lv, on=cols, how="left", nulls_equal=True,
                                              maintain_order="left")[f"{pre}idx"].to_numpy()
        log_w = float(per[f"{pre}slogw"].sum()) if weights and per.height else 0.0
        wmin = per[f"{pre}wmin"].min() if weights and per.height else None
        stats = assemble(design, mom, per_group, factor_labels, totals, count=count,
                         rows_read=rows_read, log_weights=log_w, wmin=wmin, location=location)
        stats.timings = {"prepare": t1 - t0, "scan": time.perf_counter() - t1}
        runlog.stage("scan", stats.timings["scan"], **runlog.statistics_fields(stats))
        return stats


def _labels(keys):
    """Level labels of key columns (a polars DataFrame of a level per row) as DuckDB writes
    them — its CAST(... AS VARCHAR), joined by ':' — so that statistics built by either
    engine name their levels alike (Polars' own casts differ for floats and timestamps)."""
    import duckdb
    import numpy as np

    cols = keys.columns
    con = duckdb.connect()
    try:
        con.register("__mlpipe_keys", keys.to_arrow())
        label = " || ':' || ".join(f'CAST("{c.replace(chr(34), chr(34) * 2)}" AS VARCHAR)'
                                   for c in cols)
        out = con.execute(f"SELECT {label} AS label FROM __mlpipe_keys").fetchnumpy()["label"]
    finally:
        con.close()
    return np.asarray(out, dtype=object)


class _Named:
    """What `design._check_coding` reads of a source: its location."""

    def __init__(self, location: str):
        self.location = location or "the data"


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _collect(lf, location: str):
    import polars as pl

    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read {location or 'the data'}: {_first(exc)}") from None


def _duck_type(dtype) -> str:
    name = type(dtype).__name__ if not isinstance(dtype, type) else dtype.__name__
    if name == "Decimal" and getattr(dtype, "precision", None) is not None:
        return f"DECIMAL({dtype.precision},{dtype.scale})"
    return _TYPES.get(name, name.upper())


def _frame(data, numeric: list[str] = ()):
    """The data as a LazyFrame, and its location ("" in memory).  CSV files are typed as
    DuckDB's sniffer types them (`Source.schema`: a numeric column with a bad value is
    refused naming its file, line and column, a column empty in one file stays numeric) and
    scanned with the delimiter it found; Parquet files whose integer or float widths differ
    are upcast, as DuckDB reads them.  Categorical and Enum columns are read as text (DuckDB
    reads a Polars Enum as text too, so levels sort alike)."""
    import polars as pl

    from .._sql import IN_MEMORY_TYPES, Source, connect, describe_type

    if isinstance(data, pl.LazyFrame):
        return _as_text(data), ""
    if isinstance(data, pl.DataFrame):
        return _as_text(data.lazy()), ""
    if not isinstance(data, (str, os.PathLike)):
        mod = type(data).__module__.split(".")[0]
        try:
            if mod == "pandas":
                return _as_text(pl.from_pandas(data).lazy()), ""
            if mod == "pyarrow":
                if hasattr(data, "to_batches") and hasattr(data, "schema") \
                        and not hasattr(data, "num_rows"):
                    return _as_text(pl.scan_pyarrow_dataset(data)), ""
                return _as_text(pl.from_arrow(data).lazy()), ""
            if mod == "duckdb":
                return _as_text(data.pl().lazy()), ""
        except Exception as exc:  # a conversion Polars cannot make
            raise InputError(f"cannot read data of type {describe_type(data)} with the "
                             f"polars engine: {_first(exc)}") from None
        raise InputError(f"cannot read data of type {describe_type(data)}: give a file path "
                         f"(Parquet or CSV file, directory or glob), {IN_MEMORY_TYPES}")
    source = Source(data)  # checks that the path exists and finds its files
    files = source.files()
    if source.csv:
        con = connect()
        try:
            schema = source.schema(con, list(numeric))  # DuckDB's checks and types
            delim = con.execute("SELECT Delimiter FROM sniff_csv(?)", [files[0]]).fetchone()[0]
        finally:
            con.close()
        overrides = {c: _polars_of().get(t.split("(")[0].upper(), pl.String)
                     for c, t in schema.items()}
        return (pl.scan_csv(files, separator=delim or ",", schema_overrides=overrides,
                            infer_schema_length=None), source.location)
    # the glob DuckDB reads (a directory: its **/*.parquet, other files left out), with
    # hive partitions (key=value folders) as columns when the paths have them, as DuckDB
    hive = any("=" in part for f in files
               for part in Path(os.path.relpath(f, source.path)).parts[:-1]) \
        if os.path.isdir(source.path) else any("=" in Path(f).parent.name for f in files)
    cast = pl.ScanCastOptions(integer_cast="upcast", float_cast="upcast")
    return (_as_text(pl.scan_parquet(str(source.params["source"]), hive_partitioning=hive,
                                     cast_options=cast)), source.location)


def _as_text(lf):
    """Categorical and Enum columns as text."""
    import polars as pl

    try:
        schema = lf.collect_schema()
    except pl.exceptions.PolarsError:
        return lf  # reported by the caller
    cats = [c for c, t in schema.items() if isinstance(t, (pl.Categorical, pl.Enum))]
    return lf.with_columns([pl.col(c).cast(pl.String) for c in cats]) if cats else lf


def _complete(columns: list[str], schema: dict[str, str]):
    """True where every one of `columns` has a value (not null, and not NaN in a
    floating-point column): the rows the model uses, as design.complete_condition."""
    import polars as pl

    from ..design import FLOAT_TYPES

    cond = pl.lit(True)
    for c in columns:
        part = pl.col(c).is_not_null()
        if schema.get(c, "").upper().startswith(FLOAT_TYPES):
            part = part & pl.col(c).is_not_nan()
        cond = cond & part
    return cond


def _scale_constants(formula, rows, location: str, schema: dict) -> dict[str, list]:
    """scale(x)'s [mean, SD] over every row of `rows` (the whole data) with a value of x,
    as R and compute_prepass (in Polars)."""

    calls = [c for c in formula.prepass() if c.value == "scale"]
    if not calls:
        return {}
    exprs = []
    for k, call in enumerate(calls):
        if call.args[0].aggregates() or call.args[0].prepass():
            raise FormulaError(f"{call.deparse()}: center()/group_mean()/scale()/poly() "
                               f"cannot be nested in it")
        x = compile_expr(call.args[0], {}).filter(_complete(call.args[0].columns(), schema))
        exprs += [x.mean().alias(f"m{k}"), x.std(ddof=1).alias(f"s{k}"), x.count().alias(f"n{k}")]
    got = _collect(rows.select(exprs), location)
    out = {}
    for k, call in enumerate(calls):
        mean, sd, n = got[f"m{k}"][0], got[f"s{k}"][0], got[f"n{k}"][0]
        if mean is None:
            continue
        if n < 2 or not (sd or 0) > 0:
            raise DataError(f"{call.deparse()}: the column is constant in the rows used "
                            f"(its SD is 0)")
        out[call.deparse()] = [float(mean), float(sd)]
    return out


def _model_exprs(design, mom) -> dict:
    """Polars expressions of the distinct model columns c1..ck (as `_Moments` numbers them
    from the SQL), compiled from the columns' term representation."""
    out = {}
    for col in design.fixed + design.random:
        k = mom.index(col.sql)
        if k and k not in out:
            out[k] = compile_column(col.parts, design.levels)
    y = compile_column(design.response.parts, design.levels)
    if design.formula.offsets:
        for e in design.formula.offsets:
            y = y - compile_expr(e, design.levels)
    out[mom.y] = y
    return out


def compile_column(parts: tuple, levels: dict):
    """One model column (the product of its pieces, see `design.Column.parts`) as a Polars
    expression."""
    import polars as pl

    out = None
    for piece in parts:
        kind = piece[0]
        if kind == "expr":
            e = compile_expr(piece[1], levels)
        elif kind == "level":
            _, col, level, known = piece
            hit = pl.col(col) == pl.lit(level)
            if known is None:
                e = hit.cast(pl.Float64)
            else:
                e = pl.when(hit).then(1.0).when(pl.col(col).is_in(list(known))).then(0.0) \
                    .otherwise(None)
        elif kind == "pw":
            t, knot = (compile_expr(a, levels) for a in piece[1].args)
            e = pl.min_horizontal(t, knot) if piece[2] == 0 else \
                pl.max_horizontal(t - knot, pl.lit(0.0))
        else:
            raise InputError(f"the polars engine does not compute {piece[1].deparse()}: use "
                             f"--engine duckdb")
        out = e if out is None else out * e
    return pl.lit(1.0) if out is None else out


def compile_expr(e, levels: dict):
    """A formula's numeric expression (`formula.Expr`, as `Expr.sql` compiles it to SQL) as
    a Polars expression; scale() from its stored constants in `levels`."""
    import polars as pl

    from ..formula import BINARY_FUNCTIONS, NUMERIC_FUNCTIONS

    if e.kind == "col":
        return pl.col(e.value).cast(pl.Float64)
    if e.kind == "pi":
        return pl.lit(math.pi)
    if e.kind == "num":
        value = float(e.value)
        if not math.isfinite(value):
            raise FormulaError(f"number {e.value} in the formula is not finite")
        return pl.lit(value)
    if e.kind in ("str", "kw"):
        raise FormulaError(f"{e.deparse()} is not a number")
    if e.kind == "neg":
        return -compile_expr(e.args[0], levels)
    if e.kind == "paren":
        return compile_expr(e.args[0], levels)
    if e.kind == "op":
        a, b = (compile_expr(x, levels) for x in e.args)
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[e.value] if e.value != "^" \
            else a.pow(b)
    if e.value == "I":
        return compile_expr(e.args[0], levels)
    if e.value == "scale":
        key = e.deparse()
        if key not in levels:
            raise FormulaError(f"{key}: its constants are not stored with the model")
        mean, sd = levels[key]
        return (compile_expr(e.args[0], levels) - pl.lit(float(mean))) / pl.lit(float(sd))
    if e.value in BINARY_FUNCTIONS:
        a, b = (compile_expr(x, levels) for x in e.args)
        return pl.min_horizontal(a, b) if e.value == "pmin" else pl.max_horizontal(a, b)
    if e.value in NUMERIC_FUNCTIONS:
        x = compile_expr(e.args[0], levels)
        return {"log": lambda: x.log(), "exp": lambda: x.exp(), "sqrt": lambda: x.sqrt(),
                "abs": lambda: x.abs(), "log10": lambda: x.log10(), "log2": lambda: x.log(2.0),
                "sin": lambda: x.sin(), "cos": lambda: x.cos(), "tan": lambda: x.tan()
                }[e.value]()
    # factor()/C() in arithmetic, pw() or cbind() as a number, center() ...: Expr.sql's errors
    e.sql()
    raise FormulaError(f"the polars engine does not compute {e.deparse()}: use --engine duckdb")
