"""Stage 6: predictions and residuals of a fitted model, by one more DuckDB pass over data.

    predict(result, data, out=None)        fitted values for new (or the training) rows
    residual_summary(result, data=None)    lme4's scaled-residual quantiles + per-group variance
    load_result_dir(path)                  what prediction needs, from `mlpipe fit --out DIR`

The fixed part X·β is compiled to SQL exactly as for the fit (`design.build_design` with the
factor levels *of the fit*, β as bound parameters); the conditional modes b — one row per
group, O(groups) — are registered with DuckDB as a small relation and joined on the grouping
factor to add Z·b.  Rows of groups the model has not seen (or whose group is null) fall back to
the population prediction, as lme4's `predict(..., allow.new.levels = TRUE)`; rows with a null
predictor, or a factor level unknown to the model, get null predictions.  Raw rows never enter
Python unless a polars DataFrame is asked for (small data only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ._sql import Source, connect, first_line, quote_ident, render
from .design import (Design, build_design, complete_condition, discover_levels, is_categorical,
                     is_numeric, present_sql)
from .errors import DataError, FormulaError, InputError
from .formula import Formula, parse_formula

LEVELS = ("conditional", "population")
#: `predict(..., out=None)` returns at most this many rows (more: an error, use `out=`)
IN_MEMORY_MAX_ROWS = 10_000_000
#: `residual_summary` switches to approximate (t-digest) quartiles above this many rows
EXACT_QUANTILE_MAX_ROWS = 50_000_000
OUTPUT_COLUMNS = ("fitted_population", "fitted", "residual")
_RANEF_VIEW = "mlpipe_ranef"
_INPUT_VIEW = "mlpipe_input"


# ---------------------------------------------------------------------- what prediction needs

@dataclass
class FittedModel:
    """The parts of a fit that prediction needs: formula, β, σ, conditional modes, coding."""

    formula: str
    fixed: dict[str, float]  # term -> estimate, in the order of X's columns
    sigma: float
    ranef: pl.DataFrame  # group, level, term, estimate (cond_sd, ...)
    factor_levels: dict[str, list] | None = None  # levels of categoricals at fit time
    source: str | None = None  # the training data, when known
    nobs: int | None = None
    group_type: str | None = None  # DuckDB type of the grouping column at fit time

    @classmethod
    def from_result(cls, result) -> FittedModel:
        """From an in-memory `FitResult`."""
        stats = getattr(result, "stats", None)
        levels = getattr(stats, "factor_levels", None) if stats is not None else None
        source = getattr(stats, "source", None) or None
        return cls(result.formula, dict(result.coef), float(result.sigma), result.ranef,
                   dict(levels) if levels else None, source, int(result.nobs),
                   getattr(stats, "group_type", None) or None)


def load_result_dir(path: str | os.PathLike[str]) -> FittedModel:
    """Read `result.json` and `ranef.parquet` (written by `mlpipe fit --out DIR`)."""
    d = Path(path)
    if not d.exists():
        raise InputError(f"result directory not found: {path}")
    if not d.is_dir():
        raise InputError(f"{path} is not a directory (expected the --out DIR of mlpipe fit)")
    rj, rp = d / "result.json", d / "ranef.parquet"
    for f in (rj, rp):
        if not f.is_file():
            raise DataError(f"{path} is not an mlpipe result directory: {f.name} is missing")
    try:
        meta = json.loads(rj.read_text())
        formula = str(meta["formula"])
        fixed = {str(r["term"]): float(r["estimate"]) for r in meta["fixed_effects"]}
        sigma = float(meta["sigma"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{rj} is not a valid mlpipe result ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    try:
        ranef = pl.read_parquet(rp)
    except Exception as exc:  # noqa: BLE001 - polars raises several unrelated types
        raise DataError(f"cannot read {rp}: {first_line(exc)}") from None
    missing = {"level", "term", "estimate"} - set(ranef.columns)
    if missing:
        raise DataError(f"{rp} lacks column(s) {', '.join(sorted(missing))}")
    levels = meta.get("factor_levels") or None
    group_type = meta.get("group_type") or None
    source = None
    sp = d / "stats.parquet"  # written with the result since stats are kept: coding, source
    if sp.is_file():
        try:
            smeta = json.loads(pq.read_schema(sp).metadata[b"mlpipe"])
            levels = levels or smeta.get("factor_levels") or None
            source = smeta.get("source") or None
            group_type = group_type or smeta.get("group_type") or None
        except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
            pass
    cfg = d / "config.toml"
    if source is None and cfg.is_file():
        try:
            data = tomllib.loads(cfg.read_text()).get("data")
            source = str(data) if data else None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            source = None
    nobs = meta.get("nobs")
    return FittedModel(formula, fixed, sigma, ranef,
                       dict(levels) if isinstance(levels, dict) else None, source,
                       int(nobs) if nobs is not None else None, group_type)


def as_model(result) -> FittedModel:
    """A `FitResult`, a `FittedModel`, or the path of a result directory."""
    if isinstance(result, FittedModel):
        return result
    if isinstance(result, (str, os.PathLike)):
        return load_result_dir(result)
    if hasattr(result, "coef") and hasattr(result, "ranef"):
        return FittedModel.from_result(result)
    raise InputError(f"expected a FitResult or a result directory, not {type(result).__name__}")


# ---------------------------------------------------------------------- compiling the model

class _Frame:
    """A data source (file/dir/glob/CSV via `Source`, or an in-memory polars/arrow table)."""

    def __init__(self, data, con: duckdb.DuckDBPyConnection):
        if isinstance(data, (pl.DataFrame, pa.Table)):
            table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
            con.register(_INPUT_VIEW, table)
            self.relation, self.params, self.path = quote_ident(_INPUT_VIEW), {}, "<table>"
        else:
            src = Source(data)
            self.relation, self.params, self.path = src.relation, src.params, src.path
        self._source = None if isinstance(data, (pl.DataFrame, pa.Table)) else src
        self.con = con

    def schema(self) -> dict[str, str]:
        if self._source is not None:
            return self._source.schema(self.con)
        rows = self.con.execute(render("describe", source=self.relation)).fetchall()
        return {r[0]: r[1] for r in rows}


@dataclass
class _Compiled:
    """The SQL pieces of the prediction query and their bound parameters."""

    design: Design
    frame_columns: list[str]  # "expr AS __mlpipe_name"
    internal: list[str]  # the __mlpipe_ names, excluded from the output
    zb: str
    join: str
    has_response: bool
    params: dict[str, object] = field(default_factory=dict)


def _predictor_columns(formula: Formula, random: bool) -> list[str]:
    terms = list(formula.fixed)
    if random:
        terms += [t for r in formula.random for t in r.terms]
    cols = [c for t in terms for v in t for c in v.expr.columns()]
    if random:
        cols += formula.grouping_factors
    return list(dict.fromkeys(cols))


def _bare_columns(formula: Formula) -> list[str]:
    """Columns used as bare variables in some term (the only ones that may be categorical)."""
    terms = list(formula.fixed) + [t for r in formula.random for t in r.terms]
    return list(dict.fromkeys(v.column for t in terms for v in t if v.column is not None))


def _fit_levels(model: FittedModel, con, formula: Formula,
                schema: dict[str, str]) -> dict[str, list]:
    """The factor levels used at fit time: stored with the model, or (older results)
    rediscovered from the training data."""
    if model.factor_levels:
        return model.factor_levels
    cats = [c for c in _bare_columns(formula) if c in schema and is_categorical(schema[c])]
    if not cats:
        return {}
    if model.source:
        try:
            train = Source(model.source)
            tschema = train.schema(con)
            if all(c in tschema for c in formula.columns()):
                return discover_levels(con, train, formula, tschema)
        except InputError:
            pass
    raise InputError(f"the model's factor levels ({', '.join(cats)}) are not stored with it "
                     f"and its training data cannot be read; refit with this mlpipe version")


_SAFE_TYPE = re.compile(r"[A-Z][A-Z0-9_]*(\(\d+(, ?\d+)?\))?")


def _group_key_sql(group: str, group_type: str | None) -> str:
    """The grouping key as the fit wrote its levels: the value cast to the grouping column's
    type at fit time, then to VARCHAR (so 1.0 in new data finds level '1' of a BIGINT fit)."""
    q = quote_ident(group)
    if group_type and _SAFE_TYPE.fullmatch(group_type.upper()) \
            and not group_type.upper().startswith("VARCHAR"):
        return f"CAST(TRY_CAST({q} AS {group_type.upper()}) AS VARCHAR)"
    return f"CAST({q} AS VARCHAR)"


def _compile(model: FittedModel, formula: Formula, schema: dict[str, str],
             levels: dict[str, list], level: str, path: str, *,
             training: bool = False) -> _Compiled:
    if formula.aggregates() and not training:
        raise FormulaError(f"prediction on new data from a model with center()/group_mean() "
                           f"is not supported yet (formula {formula.text!r})")
    conditional = level == "conditional"
    needed = _predictor_columns(formula, conditional)
    missing = [c for c in needed if c not in schema]
    if missing:
        fixed_only = missing[0] in _predictor_columns(formula, False)
        what = "predictor" if fixed_only else "grouping/random-effect"
        hint = "" if fixed_only else " (or predict at the population level: --population)"
        raise DataError(f"{what} column {missing[0]!r} is not in {path}{hint}")
    group = formula.grouping_factors[0] if formula.grouping_factors else None
    for col in needed:
        if col == group:
            continue
        if col in levels:
            if not is_categorical(schema[col]):
                raise DataError(f"column {col!r} was categorical when the model was fitted "
                                f"but has type {schema[col]} in {path}")
            as_bool = schema[col].upper().startswith("BOOLEAN")
            if levels[col] and isinstance(levels[col][0], bool) != as_bool:
                raise DataError(f"column {col!r} has type {schema[col]} in {path} but the "
                                f"model's levels are {levels[col][:3]!r}")
        elif not is_numeric(schema[col]):
            raise DataError(f"column {col!r} was numeric when the model was fitted but has "
                            f"type {schema[col]} in {path}")
    # the schema the design is built from: categoricals as at fit time; columns this
    # prediction does not use (random-only variables at population level) stand in as numeric
    dschema = {c: ("VARCHAR" if c in levels else schema.get(c, "DOUBLE"))
               for c in formula.columns()}
    dschema.update({c: t for c, t in schema.items() if c not in dschema})
    design = build_design(formula, dschema, {c: levels[c] for c in _bare_columns(formula)
                                             if c in levels})
    names = [c.name for c in design.fixed]
    if names != list(model.fixed):
        raise DataError(f"the model's fixed effects ({', '.join(model.fixed)}) cannot be "
                        f"rebuilt from {path} (it gives {', '.join(names)}); check the column "
                        f"types")
    params: dict[str, object] = dict(design.params)

    known: dict[str, str] = {}  # column -> "col IN ($kl0, ...)"

    def ok_sql(cols: list[str]) -> str:
        conds = []
        for c in cols:
            if c in levels:
                if c not in known:
                    names_ = []
                    for lv in levels[c]:
                        pname = f"kl{len(params)}"
                        params[pname] = lv
                        names_.append(f"${pname}")
                    known[c] = (f"{quote_ident(c)} IN ({', '.join(names_)})" if names_
                                else "FALSE")
                conds.append(known[c])
            else:
                conds.append(present_sql(c, schema.get(c, "")))
        return " AND ".join(conds) or "TRUE"

    fixed_terms = []
    for j, col in enumerate(design.fixed):
        params[f"beta{j}"] = float(model.fixed[col.name])
        fixed_terms.append(f"$beta{j}" if col.sql is None else f"$beta{j} * ({col.sql})")
    xb = " + ".join(fixed_terms)
    fixed_cols = _predictor_columns(formula, False)
    frame = [f"CASE WHEN {ok_sql(fixed_cols)} THEN {xb} END AS __mlpipe_xb"]
    internal = ["__mlpipe_xb"]

    response_cols = formula.response.columns()
    has_response = all(c in schema and is_numeric(schema[c]) for c in response_cols)
    if has_response:
        frame.append(f"{design.response.sql} AS __mlpipe_y")
        internal.append("__mlpipe_y")

    zb, join = "0.0", ""
    if conditional:
        frame.append(f"{_group_key_sql(group, model.group_type)} AS __mlpipe_key")
        internal.append("__mlpipe_key")
        random_cols = [c for rt in formula.random for v in rt.variables()
                       for c in v.expr.columns()]
        frame.append(f"{ok_sql(list(dict.fromkeys(random_cols)))} AS __mlpipe_zok")
        internal.append("__mlpipe_zok")
        parts = []
        for k, col in enumerate(design.random):
            b = f"re.__mlpipe_b{k}"
            if col.sql is None:
                parts.append(b)
                continue
            frame.append(f"{col.sql} AS __mlpipe_z{k}")
            internal.append(f"__mlpipe_z{k}")
            parts.append(f"frame.__mlpipe_z{k} * {b}")
        # unseen / missing group: Z·b = 0; a random-effect variable missing or unknown: NULL
        zb = (f"(CASE WHEN re.__mlpipe_level IS NULL THEN 0.0 "
              f"WHEN frame.__mlpipe_zok THEN {' + '.join(parts)} END)")
        join = (f"LEFT JOIN {quote_ident(_RANEF_VIEW)} AS re "
                f"ON frame.__mlpipe_key = re.__mlpipe_level")
    return _Compiled(design, frame, internal, zb, join, has_response, params)


def _ranef_table(model: FittedModel, design: Design) -> pa.Table:
    """Conditional modes as one row per level: __mlpipe_level, __mlpipe_b0, ... (O(groups))."""
    rnames = [c.name for c in design.random]
    modes = model.ranef
    group = design.group
    if "group" in modes.columns:
        modes = modes.filter(pl.col("group") == group)
    terms = list(dict.fromkeys(modes["term"].to_list()))
    if terms != rnames:
        raise DataError(f"the conditional modes ({', '.join(terms) or 'none'}) do not match the "
                        f"model's random effects ({', '.join(rnames)})")
    modes = modes.select(pl.col("level").cast(pl.Utf8), pl.col("term"),
                         pl.col("estimate").cast(pl.Float64))
    wide = modes.pivot(on="term", index="level", values="estimate", aggregate_function="first")
    cols = {"__mlpipe_level": wide["level"].to_arrow()}
    for k, name in enumerate(rnames):
        cols[f"__mlpipe_b{k}"] = wide[name].fill_null(0.0).to_arrow()
    return pa.table(cols)


def _input_sql(schema: dict[str, str], comp: _Compiled) -> str:
    """All input columns but those the output replaces (fitted, ...) and reserved names."""
    produced = OUTPUT_COLUMNS if comp.has_response else OUTPUT_COLUMNS[:2]
    clash = [c for c in schema if c in produced or c.startswith("__mlpipe_")]
    if not clash:
        return "*"
    return f"* EXCLUDE ({', '.join(quote_ident(c) for c in clash)})"


def _prepare(model: FittedModel, frame: _Frame, level: str, con, *, training: bool = False):
    formula = parse_formula(model.formula)
    if len(formula.grouping_factors) != 1:
        raise FormulaError(f"prediction needs exactly one grouping factor ({model.formula!r})")
    schema = frame.schema()
    levels = _fit_levels(model, con, formula, schema)
    comp = _compile(model, formula, schema, levels, level, frame.path, training=training)
    if level == "conditional":
        con.register(_RANEF_VIEW, _ranef_table(model, comp.design))
    return formula, schema, comp


# ---------------------------------------------------------------------- predict

@dataclass
class PredictionFile:
    """What `predict(..., out=FILE)` wrote."""

    path: Path
    rows: int
    null_predictions: int  # rows whose `fitted` is null (a predictor missing or unknown)


def predict(result, data, out: str | os.PathLike[str] | None = None, *,
            level: str = "conditional", memory_limit: str | None = None,
            threads: int | None = None, temp_directory: str | None = None,
            keep_order: bool = True) -> pl.DataFrame | PredictionFile:
    """Predictions of a fitted model for the rows of `data`, by one DuckDB pass.

    `result` is a `FitResult`, a result directory (`mlpipe fit --out DIR`) or a
    `FittedModel`; `data` a Parquet file / directory / glob or CSV (or, for small data, a
    polars DataFrame / arrow table).  The output has every input column plus
    `fitted_population` (X·β), `fitted` (X·β + Z·b for `level="conditional"`, the default;
    X·β for `level="population"`) and, when the response is in `data`, `residual`
    (response − fitted).  With `out`, the rows are written to that Parquet file (atomically)
    and a `PredictionFile` is returned; otherwise a polars DataFrame (small data only).

    Conditional predictions join the O(groups) table of conditional modes; a join does not
    keep row order, so with `keep_order` (default) rows are sorted back into input order,
    which for very large data costs a sort (DuckDB spills under `memory_limit`);
    `keep_order=False` skips it.
    """
    if level not in LEVELS:
        raise InputError(f"level must be 'conditional' or 'population', not {level!r}")
    model = as_model(result)
    con = connect(memory_limit=memory_limit, threads=threads, temp_directory=temp_directory)
    try:
        frame = _Frame(data, con)
        formula, schema, comp = _prepare(model, frame, level, con)
        order = ""
        if level == "conditional" and keep_order:
            comp.frame_columns.append("row_number() OVER () AS __mlpipe_row")
            comp.internal.append("__mlpipe_row")
            order = "ORDER BY __mlpipe_row"
        output = f"* EXCLUDE ({', '.join(comp.internal)})"
        if comp.has_response:
            output += ", __mlpipe_y - fitted AS residual"
        sql = render("predict", output=output, zb=comp.zb, input=_input_sql(schema, comp),
                     frame_columns=",\n            ".join(comp.frame_columns),
                     source=frame.relation, where="TRUE", join=comp.join, order=order,
                     limit="" if out is not None else "LIMIT $mlpipe_limit")
        params = {**frame.params, **comp.params}
        if out is None:
            # small data only: stop after IN_MEMORY_MAX_ROWS + 1 rows instead of exhausting RAM
            params["mlpipe_limit"] = IN_MEMORY_MAX_ROWS + 1
            df = _fetch(con, sql, params, frame.path)
            if df.height > IN_MEMORY_MAX_ROWS:
                raise InputError(f"{frame.path} has more than {IN_MEMORY_MAX_ROWS} rows, too "
                                 f"many to return as a DataFrame; pass out= (--out) to write "
                                 f"Parquet")
            return df
        return _write(con, sql, params, frame.path, out)
    finally:
        con.close()


def _used(sql: str, params: dict) -> dict:
    """The parameters the SQL refers to (DuckDB refuses unused ones: e.g. the level
    parameters of Z's columns at population level)."""
    return {k: v for k, v in params.items() if re.search(rf"\${re.escape(k)}\b", sql)}


def _fetch(con, sql: str, params: dict, path: str) -> pl.DataFrame:
    try:
        return con.sql(sql, params=_used(sql, params)).pl()
    except duckdb.Error as exc:
        raise DataError(f"cannot predict for {path}: {first_line(exc)}") from None


def _write(con, sql: str, params: dict, path: str, out) -> PredictionFile:
    dest = Path(out)
    if dest.is_dir():
        raise InputError(f"--out {out} is a directory; give a .parquet file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:  # DuckDB's COPY ... TO (FORMAT parquet): streams, spills under memory_limit
            con.sql(sql, params=_used(sql, params)).to_parquet(str(tmp))
        except duckdb.Error as exc:
            raise DataError(f"cannot predict for {path}: {first_line(exc)}") from None
        rows, nulls = _parquet_counts(tmp, "fitted")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return PredictionFile(dest, int(rows), int(nulls))


def _parquet_counts(path: Path, column: str) -> tuple[int, int]:
    """Rows of a Parquet file and nulls in one column, from its footer (no data read)."""
    meta = pq.ParquetFile(path).metadata
    j = meta.schema.names.index(column)
    nulls = 0
    for i in range(meta.num_row_groups):
        st = meta.row_group(i).column(j).statistics
        nulls += st.null_count if st is not None and st.has_null_count else 0
    return meta.num_rows, nulls


# ---------------------------------------------------------------------- residuals

@dataclass
class ResidualSummary:
    """Scaled conditional residuals (lme4's summary) and the residual variance per group."""

    quantiles: dict[str, float]  # Min, 1Q, Median, 3Q, Max of (y − Xβ − Zb) / σ
    sigma: float
    n: int
    group: str
    by_group: pl.DataFrame  # group, level, n, mean_residual, residual_variance (unscaled)
    exact: bool = True

    def __str__(self) -> str:
        cells = [(k, f"{v:.4f}") for k, v in self.quantiles.items()]
        width = max(max(len(k), len(v)) for k, v in cells)
        head = " ".join(k.rjust(width) for k, _ in cells)
        vals = " ".join(v.rjust(width) for _, v in cells)
        note = "" if self.exact else "\n(quartiles approximate)"
        return f"Scaled residuals:\n{head}\n{vals}{note}"


def residual_summary(result, data=None, *, memory_limit: str | None = None,
                     threads: int | None = None, temp_directory: str | None = None,
                     exact: bool | None = None) -> ResidualSummary:
    """One more pass over the training data: conditional residuals r = y − Xβ − Zb of the rows
    the model used (no null in any model column), their scaled quantiles (r/σ: Min, 1Q,
    Median, 3Q, Max, as lme4's summary, quantile type 7) and per group n, mean and variance.

    `data` defaults to the training data recorded with the fit.  Quartiles are exact
    (`quantile_cont`) unless `exact=False`, or by default for more than
    EXACT_QUANTILE_MAX_ROWS rows (then DuckDB's t-digest `approx_quantile`).
    """
    model = as_model(result)
    if data is None:
        data = model.source
        if not data:
            raise InputError("residual_summary needs the training data (it is not recorded "
                             "with this result)")
    if exact is None:
        exact = model.nobs is None or model.nobs <= EXACT_QUANTILE_MAX_ROWS
    con = connect(memory_limit=memory_limit, threads=threads, temp_directory=temp_directory)
    try:
        frame = _Frame(data, con)
        # the training data: center() / group_mean() means are recomputed from its rows
        formula, schema, comp = _prepare(model, frame, "conditional", con, training=True)
        if not comp.has_response:
            cols = ", ".join(formula.response.columns())
            raise DataError(f"response column {cols} is not in {frame.path} (or not numeric)")
        complete = complete_condition(formula.columns(), schema)
        predicted = render("predict", output="__mlpipe_key AS level, __mlpipe_y - fitted AS r",
                           zb=comp.zb, input=_input_sql(schema, comp),
                           frame_columns=",\n            ".join(comp.frame_columns),
                           source=comp.design.aggregates.source(frame.relation, complete),
                           where=complete, join=comp.join, order="", limit="")
        sql = render("residuals", predicted=predicted,
                     quantile="quantile_cont" if exact else "approx_quantile")
        table = _fetch(con, sql, {**frame.params, **comp.params}, frame.path)
    finally:
        con.close()
    overall = table.filter(pl.col("level").is_null())
    n = int(overall["n"][0]) if overall.height else 0
    if n == 0 or overall["quantiles"][0] is None:
        raise DataError(f"no complete rows in {frame.path} to compute residuals from")
    q = np.asarray(overall["quantiles"][0].to_list(), dtype=float) / model.sigma
    quantiles = dict(zip(("Min", "1Q", "Median", "3Q", "Max"), q.tolist()))
    by = table.filter(pl.col("level").is_not_null()).drop("quantiles")
    order = pl.DataFrame({"level": list(dict.fromkeys(model.ranef["level"].cast(pl.Utf8)
                                                      .to_list()))}).with_row_index("_i")
    by = (by.join(order, on="level", how="left").sort("_i", "level", nulls_last=True)
          .drop("_i").with_columns(pl.lit(comp.design.group).alias("group"))
          .select("group", "level", pl.col("n").cast(pl.Int64), "mean_residual",
                  "residual_variance"))
    return ResidualSummary(quantiles, model.sigma, n, comp.design.group, by, exact)


# ---------------------------------------------------------------------- command line

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `mlpipe predict RESULT_DIR DATA --out FILE.parquet [--population]`."""
    p = subparsers.add_parser(
        "predict", help="predictions (and residuals) of a fitted model for new data",
        description="Predict from a result directory written by `mlpipe fit --out DIR`: "
                    "conditional (X·β + Z·b; unseen groups fall back to X·β) or population "
                    "(X·β) predictions for every row of DATA, written to a Parquet file.")
    p.add_argument("result_dir", help="the --out DIR of `mlpipe fit` (result.json, "
                                      "ranef.parquet)")
    p.add_argument("data", help="Parquet file, directory or glob, or CSV")
    p.add_argument("--out", "-o", required=True, help="the output Parquet file")
    p.add_argument("--population", action="store_true",
                   help="population-level predictions X·β (ignore the random effects)")
    p.add_argument("--any-order", action="store_true",
                   help="do not restore input row order (saves a sort on large data)")
    p.add_argument("--memory-limit", help="DuckDB memory limit, e.g. 4GB (spills beyond it)")
    p.add_argument("--threads", type=int, help="DuckDB worker threads")
    p.add_argument("--temp-directory", help="where DuckDB spills when over the memory limit")
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    """Run `mlpipe predict`; returns the exit code (0)."""
    model = load_result_dir(args.result_dir)
    level = "population" if args.population else "conditional"
    written = predict(model, args.data, args.out, level=level,
                      memory_limit=args.memory_limit, threads=args.threads,
                      temp_directory=args.temp_directory, keep_order=not args.any_order)
    nulls = (f" ({written.null_predictions} with a missing or unknown predictor: null)"
             if written.null_predictions else "")
    print(f"wrote {level} predictions for {written.rows} rows{nulls} to {written.path}")
    return 0

