"""Stage 6: predictions and residuals of a fitted model, by one more DuckDB pass over data.

    predict(result, data, out=None)        fitted values for new (or the training) rows
    residual_summary(result, data=None)    lme4's scaled-residual quantiles + per-group variance
    load_result_dir(path)                  what prediction needs, from `mlpipe fit --out DIR`

The linear predictor is compiled once, by `linear_predictor` (a `LinearPredictor`, rendered
into sql/predict.sql), for predictions, residuals and the report's data passes.  The fixed part
X·β is compiled to SQL exactly as for the fit (`design.build_design` with the factor levels
*of the fit*, β as bound parameters); each grouping factor's conditional modes b_k — one row
per level, O(levels) — are registered with DuckDB as a small relation and joined on that
factor's columns (their values typed as at fit time) to add Z_k·b_k.  A level of a factor the
model has not seen (or a null in one of its columns) drops that factor's term only — the
others still apply, as lme4's `predict(..., allow.new.levels = TRUE)`; rows with a null
predictor, or a factor level unknown to the model, get null predictions.  Raw rows never enter
Python unless a polars DataFrame is asked for (small data only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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

from . import centering
from ._sql import (Source, connect, first_line, quote_ident, read_error, render,
                   staging_prefix, sweep_stale)
from ._sql import used_params as _used
from .design import (Design, FactorDesign, build_design, coding_keys, complete_condition,
                     discover_levels, factor_columns, is_categorical, is_numeric, present_sql)
from .predict_cli import add_cli  # noqa: F401  (the CLI registration, kept light)
from .errors import DataError, FormulaError, InputError
from .formula import Formula, parse_formula

LEVELS = ("conditional", "population")
#: `predict(..., out=None)` returns at most this many rows (more: an error, use `out=`)
IN_MEMORY_MAX_ROWS = 10_000_000
#: `residual_summary` switches to approximate (t-digest) quartiles above this many rows
EXACT_QUANTILE_MAX_ROWS = 50_000_000
OUTPUT_COLUMNS = ("fitted_population", "fitted", "residual")


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
    #: DuckDB type of every grouping column at fit time (levels are their VARCHAR casts)
    group_types: dict[str, str] | None = None
    #: the means of center()/group_mean() the fit used (`Statistics.centering`)
    centering: dict | None = None
    #: what scales a Pearson residual: the case-weight column (r·√w) and the residual
    #: SD ratios of `--residual-variance-by` (r / δ_k), as lme4 / nlme scale them
    weights: str | None = None
    variance_by: str | None = None
    variance_ratios: dict | None = None
    #: a GLMM's family and link (predictions on the link scale, and the response scale)
    family: str | None = None
    link: str | None = None

    @classmethod
    def from_result(cls, result) -> FittedModel:
        """From an in-memory `FitResult`."""
        stats = getattr(result, "stats", None)
        levels = getattr(stats, "factor_levels", None) if stats is not None else None
        source = getattr(stats, "source", None) or None
        types = getattr(stats, "group_types", None) if stats is not None else None
        rs = getattr(result, "residual_structure", None) or {}
        if stats is None:  # a fit without Statistics (a GLMM) keeps its own coding
            levels = getattr(result, "factor_levels", None)
            types = getattr(result, "group_types", None)
        return cls(result.formula, dict(result.fixef), float(result.sigma), result.ranef_frame(),
                   dict(levels) if levels else None, source, int(result.nobs),
                   getattr(stats, "group_type", None) or None, dict(types) if types else None,
                   getattr(stats, "centering", None),
                   getattr(stats, "weights", None) or None, rs.get("variance_by"),
                   rs.get("variance_ratios"), getattr(result, "family", None),
                   getattr(result, "link", None))


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
    source, group_types = None, meta.get("group_types") or None
    centering, weights = None, None
    sp = d / "stats.parquet"  # written with the result since stats are kept: coding, source
    if sp.is_file():
        try:
            smeta = json.loads(pq.read_schema(sp).metadata[b"mlpipe"])
            levels = levels or smeta.get("factor_levels") or None
            source = smeta.get("source") or None
            group_type = group_type or smeta.get("group_type") or None
            group_types = group_types or smeta.get("group_types") or None
            centering = smeta.get("centering") or None
            weights = smeta.get("weights") or None
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
    rs = meta.get("correlation") if isinstance(meta.get("correlation"), dict) else {}
    return FittedModel(formula, fixed, sigma, ranef,
                       dict(levels) if isinstance(levels, dict) else None, source,
                       int(nobs) if nobs is not None else None, group_type,
                       dict(group_types) if isinstance(group_types, dict) else None,
                       centering if isinstance(centering, dict) else None, weights,
                       rs.get("variance_by"), rs.get("variance_ratios"), meta.get("family"),
                       meta.get("link"))


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

class Frame:
    """A data source (`Source`: a file/dir/glob/CSV, or data in memory) on a connection."""

    def __init__(self, data, con: duckdb.DuckDBPyConnection):
        src = Source(data)
        src.attach(con)
        self.relation, self.params, self.path = src.relation, src.params, src.path
        self._source = src
        self.con = con

    def schema(self, numeric: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
        """Column → type; `numeric` as in `Source.schema` (a CSV's mostly-numeric text
        columns are read as numbers, which may change the relation)."""
        schema = self._source.schema(self.con, numeric)
        self.relation, self.params = self._source.relation, self._source.params
        return schema


@dataclass
class LinearPredictor:
    """A fitted model's linear predictor compiled to SQL over the rows of one data source:
    `fitted_population` = X·β and `fitted` = X·β + Σ_k Z_k·b_k (k over the grouping
    factors), rendered into sql/predict.sql by `sql()`.  It is the one compilation that
    `predict`, `residual_summary` and the report's data passes share.

    Per input row the frame computes X·β (NULL when a fixed-effect predictor is missing or a
    factor level is unknown to the model), the response, the columns of Z and, per grouping
    column, the key its levels are matched on: the value cast to the column's type at fit
    time.  Each factor's conditional modes — one row per level, one column per term,
    O(levels) — are LEFT JOINed on that factor's keys (sql/predict_modes.sql).  A row whose
    level of a factor the model never saw, or with a null in one of that factor's columns,
    finds no match and only that factor's Z_k·b_k drops out (lme4's `allow.new.levels =
    TRUE`); the other factors still apply.  A missing or unknown random-effect variable of a
    factor whose level is known makes `fitted` NULL.
    """

    formula: Formula
    schema: dict[str, str]
    design: Design
    level: str
    factors: list[str]  # the factors joined, in the order of the conditional modes
    frame_columns: list[str]  # "expr AS __mlpipe_name", computed per input row
    internal: list[str]  # the __mlpipe_ names, excluded from predict's output
    joins: list[str]
    zb: str
    has_response: bool
    params: dict[str, object] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)  # to register with DuckDB

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        for name, table in self.tables.items():
            con.register(name, table)

    @property
    def matched(self) -> list[str]:
        """Per factor, the output column with the level label it matched (NULL: none)."""
        return [f"__mlpipe_level{k}" for k in range(len(self.factors))]

    def input_sql(self) -> str:
        """All input columns but those the output replaces (fitted, ...) and reserved names."""
        produced = OUTPUT_COLUMNS if self.has_response else OUTPUT_COLUMNS[:2]
        clash = [c for c in self.schema if c in produced or c.startswith("__mlpipe_")]
        if not clash:
            return "*"
        return f"* EXCLUDE ({', '.join(quote_ident(c) for c in clash)})"

    def sql(self, output: str, source: str, *, where: str = "TRUE", order: str = "",
            limit: str = "", number_rows: bool = False, response: bool = True,
            input: str | None = None) -> str:
        """sql/predict.sql over `source` (a table expression) for the rows passing `where`;
        `output` is the outer select list (`fitted`, `fitted_population`, `__mlpipe_y`,
        the `matched` levels and the input columns are available); `number_rows` adds the
        input row number `__mlpipe_row`; `response=False` leaves out `__mlpipe_y` (for
        sources without the response column); `input` replaces `input_sql()`."""
        columns = [c for c in self.frame_columns
                   if response or not c.endswith(" AS __mlpipe_y")]
        columns += ["row_number() OVER () AS __mlpipe_row"] if number_rows else []
        matched = "".join(f",\n        re{k}.__mlpipe_level AS {name}"
                          for k, name in enumerate(self.matched))
        return render("predict", output=output, zb=self.zb, matched=matched,
                      input=input or self.input_sql(),
                      frame_columns=",\n            ".join(columns), source=source,
                      where=where, joins="\n    ".join(self.joins), order=order, limit=limit)


def _variable_columns(formula: Formula, random: bool) -> list[str]:
    """The data columns of the fixed-effect (and, with `random`, random-effect) terms."""
    terms = list(formula.fixed)
    if random:
        terms += [t for r in formula.random for t in r.terms]
    offsets = [c for e in formula.offsets for c in e.columns()]  # offset(x): part of X·β
    return list(dict.fromkeys([c for t in terms for v in t for c in v.expr.columns()]
                              + offsets))


def _grouping_columns(formula: Formula) -> list[str]:
    """The distinct columns of all grouping factors, in order of appearance."""
    return list(dict.fromkeys(c for r in formula.random for c in r.group_columns))


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


def _key_type(model: FittedModel, column: str, columns: list[str]) -> str | None:
    """The DuckDB type a grouping column had at fit time (levels are its VARCHAR casts), when
    known and a plain type name; None means compare as text."""
    types = model.group_types or {}
    dtype = types.get(column) or (model.group_type if columns == [column] else None)
    if dtype and _SAFE_TYPE.fullmatch(dtype.upper()) \
            and not dtype.upper().startswith("VARCHAR"):
        return dtype.upper()
    return None


def _key_sql(expr: str, dtype: str | None) -> str:
    """A grouping key as the fit typed it: so 1.0 in new data finds level '1' of a BIGINT fit
    (and '1' in a CSV-typed VARCHAR finds it too)."""
    return f"TRY_CAST({expr} AS {dtype})" if dtype else f"CAST({expr} AS VARCHAR)"


def _factor_modes(model: FittedModel, factor: FactorDesign, several: bool) -> pl.DataFrame:
    """One factor's conditional modes wide: level (label), then one column per term."""
    modes = model.ranef
    if "group" in modes.columns:
        modes = modes.filter(pl.col("group").cast(pl.Utf8) == factor.name)
    elif several:
        raise DataError("the conditional modes have no group column, so they cannot be told "
                        "apart by grouping factor")
    terms = list(dict.fromkeys(modes["term"].to_list()))
    if sorted(terms) != sorted(factor.names):  # the solver may order a factor's terms
        raise DataError(f"the conditional modes of {factor.name} ({', '.join(terms) or 'none'}) "
                        f"do not match the model's random effects ({', '.join(factor.names)})")
    modes = modes.select(pl.col("level").cast(pl.Utf8), pl.col("term"),
                         pl.col("estimate").cast(pl.Float64))
    wide = modes.pivot(on="term", index="level", values="estimate", aggregate_function="first")
    return wide.select("level", *[pl.col(t).fill_null(0.0) for t in factor.names])


def _factor_order(model: FittedModel, factors: list[FactorDesign]) -> list[FactorDesign]:
    """The factors in the order of the conditional modes (lme4's: most levels first)."""
    if "group" not in model.ranef.columns:
        return factors
    seen = list(dict.fromkeys(model.ranef["group"].cast(pl.Utf8).to_list()))
    return sorted(factors, key=lambda f: seen.index(f.name) if f.name in seen else len(seen))


def _prediction_design(model: FittedModel, formula: Formula, schema: dict[str, str],
                       levels: dict[str, list], level: str, path: str, *,
                       training: bool = False) -> Design:
    """The checks of a prediction's data against the model (columns present, typed as at
    fit time) and the design of the fit rebuilt over it with the fit's coding (strict: an
    unknown level gives NULL indicators) — what every engine's predictor compiles."""
    if formula.aggregates() and not training and not model.centering:
        raise FormulaError(f"the means of center()/group_mean() the fit used are not stored "
                           f"with this model (fitted by an older mlpipe, or from merged "
                           f"statistics); refit it to predict (formula {formula.text!r})")
    conditional = level == "conditional"
    variables = _variable_columns(formula, conditional)
    gcols = _grouping_columns(formula)
    needed = list(dict.fromkeys(variables + (gcols if conditional else [])))
    missing = [c for c in needed if c not in schema]
    if missing:
        fixed_only = missing[0] in _variable_columns(formula, False)
        what = "predictor" if fixed_only else "grouping/random-effect"
        hint = "" if fixed_only else " (or predict at the population level: --population)"
        raise DataError(f"{what} column {missing[0]!r} is not in {path}{hint}")
    # grouping columns and center()/group_mean()'s `by` may have any type: they are matched
    keys = set(gcols) | {a.by for a in formula.aggregates() if a.by is not None}
    # factor(x) / relevel() / C(): any type; an unknown value gives a NULL dummy (strict)
    keys |= set(factor_columns(formula)) - set(_bare_columns(formula))
    for col in [c for c in variables if c not in keys or c in _bare_columns(formula)]:
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
                                             + coding_keys(formula)
                                             if c in levels}, strict=True)
    names = [c.name for c in design.fixed]
    if names != list(model.fixed):
        raise DataError(f"the model's fixed effects ({', '.join(model.fixed)}) cannot be "
                        f"rebuilt from {path} (it gives {', '.join(names)}); check the column "
                        f"types")
    return design


def _compile(model: FittedModel, formula: Formula, schema: dict[str, str],
             levels: dict[str, list], level: str, path: str, *,
             training: bool = False) -> LinearPredictor:
    design = _prediction_design(model, formula, schema, levels, level, path,
                                training=training)
    conditional = level == "conditional"
    gcols = _grouping_columns(formula)
    params: dict[str, object] = dict(design.params)

    known: dict[str, str] = {}  # column -> "col IN ($kl0, ...)"
    # center(x, by = g) reads g only through the means joined to the row (training data)
    by_only = {a.by for a in formula.aggregates() if a.by is not None} \
        - set(_bare_columns(formula))

    def ok_sql(cols: list[str]) -> str:
        conds = []
        for c in cols:
            if c in by_only:
                continue
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
    if design.offset is not None:  # offset(x): known coefficient 1, added back
        xb = f"{xb} + ({design.offset})"
    frame = [f"CASE WHEN {ok_sql(_variable_columns(formula, False))} THEN {xb} END "
             f"AS __mlpipe_xb"]
    internal = ["__mlpipe_xb"]

    response_cols = formula.response.columns()
    has_response = all(c in schema and is_numeric(schema[c]) for c in response_cols)
    if has_response:
        frame.append(f"{design.response.sql} AS __mlpipe_y")
        internal.append("__mlpipe_y")

    pred = LinearPredictor(formula, schema, design, level, [], frame, internal, [], "0.0",
                           has_response, params)
    if conditional:
        _compile_random(pred, model, gcols, ok_sql)
    return pred


def _compile_random(pred: LinearPredictor, model: FittedModel, gcols: list[str],
                    ok_sql) -> None:
    """Add Σ_k Z_k·b_k: per grouping column its typed key, per Z column its value, per
    factor the join of its conditional modes and its term of the sum."""
    design, frame, internal = pred.design, pred.frame_columns, pred.internal
    types = {c: _key_type(model, c, gcols) for c in gcols}
    for j, c in enumerate(gcols):
        frame.append(f"{_key_sql(quote_ident(c), types[c])} AS __mlpipe_g{j}")
        internal.append(f"__mlpipe_g{j}")
    for i, col in enumerate(design.random):
        if col.sql is not None:
            frame.append(f"{col.sql} AS __mlpipe_z{i}")
            internal.append(f"__mlpipe_z{i}")
    several = len(design.factors) > 1
    parts = []
    for k, factor in enumerate(_factor_order(model, design.factors)):
        wide = _factor_modes(model, factor, several)
        if wide["level"].is_duplicated().any():
            raise DataError(f"the conditional modes of {factor.name} list a level twice")
        alias, table = f"re{k}", f"mlpipe_modes{k}"
        cols = {"__mlpipe_level": wide["level"].to_arrow()}
        idx = [gcols.index(c) for c in factor.columns]
        split = wide["level"].str.split(":") if len(idx) > 1 else None
        if split is None or bool((split.list.len() == len(idx)).all()):
            # join on the typed key: the label's parts, cast as the fit typed the columns
            for n, j in enumerate(idx):
                part = wide["level"] if split is None else split.list.get(n)
                cols[f"__mlpipe_p{j}"] = part.to_arrow()
            keys = "".join(f", {_key_sql(f'__mlpipe_p{j}', types[gcols[j]])} AS __mlpipe_g{j}"
                           for j in idx)
            on = " AND ".join(f"frame.__mlpipe_g{j} = {alias}.__mlpipe_g{j}" for j in idx)
        else:
            # a value contains ':' so the label cannot be split: match the label itself,
            # built from the row as the statistics pass built it
            label = " || ':' || ".join(
                f"CAST({_key_sql(quote_ident(gcols[j]), types[gcols[j]])} AS VARCHAR)"
                for j in idx)
            frame.append(f"{label} AS __mlpipe_l{k}")
            internal.append(f"__mlpipe_l{k}")
            keys, on = "", f"frame.__mlpipe_l{k} = {alias}.__mlpipe_level"
        for a, name in enumerate(factor.names):
            cols[f"__mlpipe_b{a}"] = wide[name].to_arrow()
        pred.tables[table] = pa.table(cols)
        pred.joins.append(render("predict_modes", keys=keys, table=quote_ident(table),
                                 alias=alias, on=on))
        terms = []
        for a, zi in enumerate(factor.z):
            b = f"{alias}.__mlpipe_b{a}"
            terms.append(b if design.random[zi].sql is None else f"frame.__mlpipe_z{zi} * {b}")
        random_cols = [c for rt in pred.formula.random if rt.group == factor.name
                       for v in rt.variables() for c in v.expr.columns()]
        zok = ok_sql(list(dict.fromkeys(random_cols)))
        # unseen level / null key: this factor adds 0; its variable missing or unknown: NULL
        if zok == "TRUE":
            parts.append(f"(CASE WHEN {alias}.__mlpipe_level IS NULL THEN 0.0 "
                         f"ELSE {' + '.join(terms)} END)")
        else:
            frame.append(f"{zok} AS __mlpipe_zok{k}")
            internal.append(f"__mlpipe_zok{k}")
            parts.append(f"(CASE WHEN {alias}.__mlpipe_level IS NULL THEN 0.0 "
                         f"WHEN frame.__mlpipe_zok{k} THEN {' + '.join(terms)} END)")
        pred.factors.append(factor.name)
    pred.internal += pred.matched
    pred.zb = " + ".join(parts) or "0.0"


def _prediction_formula(model: FittedModel) -> tuple[FittedModel, Formula]:
    """The model and the formula its linear predictor is built from: a binomial GLMM's
    cbind(successes, failures) response reduced to its first column (the predictor needs
    neither), an ordinal model's intercept fixed at 0 (its thresholds take its place)."""
    formula = parse_formula(model.formula)
    if formula.response.kind == "call" and formula.response.value == "cbind":
        formula = dataclasses.replace(formula, response=formula.response.args[0])
    if model.family == "ordinal" and formula.intercept and "(Intercept)" not in model.fixed:
        model = dataclasses.replace(model, fixed={"(Intercept)": 0.0, **model.fixed})
    return model, formula


def linear_predictor(model: FittedModel, frame: Frame, con: duckdb.DuckDBPyConnection, *,
                     level: str = "conditional", training: bool = False) -> LinearPredictor:
    """Compile `model`'s linear predictor over `frame` and register its conditional modes
    with `con`.  `training=True`: `frame` is the training data (then center() /
    group_mean() means are recomputed from its rows: use `design.aggregates.source`)."""
    if level not in LEVELS:
        raise InputError(f"level must be 'conditional' or 'population', not {level!r}")
    model, formula = _prediction_formula(model)
    schema = frame.schema(formula.value_columns())
    levels = _fit_levels(model, con, formula, schema)
    pred = _compile(model, formula, schema, levels, level, frame.path, training=training)
    pred.register(con)
    return pred


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
            keep_order: bool = True, engine: str | None = None
            ) -> pl.DataFrame | PredictionFile:
    """Predictions of a fitted model for the rows of `data`, by one DuckDB pass.

    `result` is a `FitResult`, a result directory (`mlpipe fit --out DIR`) or a
    `FittedModel`; `data` a Parquet file / directory / glob or CSV, or data in memory (as
    for `mlpipe.fit`).  The output has every input column plus
    `fitted_population` (X·β), `fitted` (X·β + Z·b for `level="conditional"`, the default;
    X·β for `level="population"`) and, when the response is in `data`, `residual`
    (response − fitted).  With `out`, the rows are written to that file (atomically) as
    Parquet (`.parquet`) or CSV (`.csv`) — its suffix says which — and a `PredictionFile` is
    returned; otherwise a polars DataFrame (small data only).

    Conditional predictions join each grouping factor's O(levels) table of conditional
    modes on that factor's columns; a level of one factor the model never saw (or a null in
    one of its columns) drops only that factor's Z_k·b_k.  A join does not keep row order,
    so with `keep_order` (default) rows are sorted back into input order, which for very
    large data costs a sort (DuckDB spills under `memory_limit`);
    `keep_order=False` skips it.

    `engine="polars"`: the same predictions through Polars' lazy API (`_predict_polars`:
    the design compiled to Polars expressions from the same term representation, the
    modes joined in input order, the output sunk by the streaming engine); "duckdb" (or
    None) is the default.
    """
    if level not in LEVELS:
        raise InputError(f"level must be 'conditional' or 'population', not {level!r}")
    fmt = output_format(out) if out is not None else None  # before any work
    name = "duckdb" if engine is None else str(engine).lower()
    if name not in ("duckdb", "polars"):
        raise InputError(f"predict runs on --engine duckdb or polars, not {engine!r}")
    model = as_model(result)
    if name == "polars":
        return _predict_polars(model, data, out, fmt, level)
    from .engines import EngineOptions

    con = connect(options=EngineOptions(threads=threads, memory_limit=memory_limit,
                                        temp_directory=temp_directory))
    try:
        frame = Frame(data, con)
        pred = linear_predictor(model, frame, con, level=level)
        numbered = level == "conditional" and keep_order
        internal = pred.internal + (["__mlpipe_row"] if numbered else [])
        output = f"* EXCLUDE ({', '.join(internal)})"
        if model.family == "ordinal":  # fitted is η: P(Y ≤ c) = F(α_c − η), no one mean
            pass
        elif model.family:  # a GLMM: fitted is on the link scale
            mu = inverse_link_sql(model.link, "fitted")
            output += f", {mu} AS fitted_response"
            cbind = "cbind(" in model.formula.split("~", 1)[0]
            if pred.has_response and not cbind:
                output += f", __mlpipe_y - {mu} AS residual"
        elif pred.has_response:
            output += ", __mlpipe_y - fitted AS residual"
        source, means, inputs = frame.relation, [], None
        if pred.formula.aggregates():
            # center()/group_mean(): the fit's stored means joined to the rows (new groups:
            # their own means); rows numbered before that join
            source, means = centering.prediction_source(
                pred.formula, pred.design, model.centering, frame.relation, pred.schema, con,
                number_rows=numbered)
            inputs = _exclude(pred.input_sql(), means)
        sql = pred.sql(output, source, number_rows=numbered and not means,
                       order="ORDER BY __mlpipe_row" if numbered else "",
                       limit="" if out is not None else "LIMIT $mlpipe_limit", input=inputs)
        params = {**frame.params, **pred.params}
        if out is None:
            # small data only: stop after IN_MEMORY_MAX_ROWS + 1 rows instead of exhausting RAM
            params["mlpipe_limit"] = IN_MEMORY_MAX_ROWS + 1
            df = _fetch(con, sql, params, frame.path)
            if df.height > IN_MEMORY_MAX_ROWS:
                raise InputError(f"{frame.path} has more than {IN_MEMORY_MAX_ROWS} rows, too "
                                 f"many to return as a DataFrame; pass out= (--out) to write "
                                 f"Parquet")
            return df
        return _write(con, sql, params, frame.path, out, fmt)
    finally:
        con.close()


#: Numerical Recipes' erfcc: the polynomial's coefficients (highest first), then the
#: constant of the exponent — the probit's normal CDF in SQL and in Polars
_ERFCC = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
          0.09678418, 0.37409196, 1.00002368, -1.26551223)


def inverse_link_sql(link: str, eta: str) -> str:
    """SQL of a GLMM's inverse link at `eta`: the response-scale prediction (probability or
    mean count).  DuckDB has no normal CDF: the probit's is 1 − erfc(η/√2)/2 by Numerical
    Recipes' erfcc (relative error below 1.2e-7)."""
    if link == "logit":
        return f"(1.0 / (1.0 + exp(-({eta}))))"
    if link == "cloglog":
        return f"(1.0 - exp(-exp({eta})))"
    if link == "log":
        return f"exp({eta})"
    if link == "inverse":  # the gamma's canonical link
        return f"(1.0 / ({eta}))"
    if link == "probit":
        z = f"(abs({eta}) / sqrt(2.0))"
        t = f"(1.0 / (1.0 + 0.5 * {z}))"
        poly = repr(_ERFCC[0])
        for c in _ERFCC[1:-1]:
            poly = f"({c!r} + {t} * {poly})"
        erfc = f"({t} * exp(-{z} * {z} - {-_ERFCC[-1]!r} + {t} * {poly}))"
        return f"(CASE WHEN ({eta}) >= 0 THEN 1.0 - 0.5 * {erfc} ELSE 0.5 * {erfc} END)"
    raise InputError(f"no inverse link for {link!r}")


def _exclude(select: str, columns: list[str]) -> str:
    """`*` or `* EXCLUDE (...)` with `columns` excluded as well."""
    if not columns:
        return select
    names = [select[len("* EXCLUDE ("):-1]] if select != "*" else []
    return f"* EXCLUDE ({', '.join(names + columns)})"


def _fetch(con, sql: str, params: dict, path: str) -> pl.DataFrame:
    try:
        return con.sql(sql, params=_used(sql, params)).pl()
    except duckdb.Error as exc:
        raise DataError(read_error(path, exc, "cannot predict for")) from None


#: output file suffix -> format written by `predict(..., out=)`
OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}


def output_format(out: str | os.PathLike[str]) -> str:
    """The format of a predictions file, from its suffix: `parquet` or `csv`; any other
    suffix (or a directory) is an InputError."""
    dest = Path(out)
    if dest.is_dir():
        raise InputError(f"--out {out} is a directory; give a .parquet or .csv file name")
    fmt = OUTPUT_FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise InputError(f"--out {out}: unknown output format {dest.suffix or '(no suffix)'!r}"
                         f"; give a .parquet or .csv file name")
    return fmt


def _write(con, sql: str, params: dict, path: str, out, fmt: str | None = None
           ) -> PredictionFile:
    def write(tmp: Path, fmt: str) -> None:
        # DuckDB's COPY ... TO: streams, spills under memory_limit
        rel = con.sql(sql, params=_used(sql, params))
        try:
            if fmt == "csv":
                rel.to_csv(str(tmp), header=True)
            else:
                rel.to_parquet(str(tmp))
        except duckdb.Error as exc:
            raise DataError(read_error(path, exc, "cannot predict for")) from None

    return _staged(out, fmt or output_format(out), write)


def _staged(out, fmt: str, write) -> PredictionFile:
    """`write(tmp, fmt)` into a staging file beside `out`, its rows and null `fitted`
    counted, then moved into place (never a half-written `out`)."""
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)  # staging files of killed runs
    tmp = dest.with_name(f"{staging_prefix(dest)}{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp, fmt)
        if fmt == "csv":
            con = connect()
            try:
                rows, nulls = _csv_counts(con, tmp, "fitted")
            finally:
                con.close()
        else:
            rows, nulls = _parquet_counts(tmp, "fitted")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return PredictionFile(dest, int(rows), int(nulls))


def _csv_counts(con, path: Path, column: str) -> tuple[int, int]:
    """Rows of the CSV just written and nulls (empty fields) in one column."""
    q = quote_ident(column)
    return con.execute(f"SELECT count(*), count(*) - count({q}) FROM read_csv($p, header = "
                       f"true, all_varchar = true)", {"p": str(path)}).fetchall()[0]


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
    """Scaled conditional residuals (lme4's summary) and the residual variance per level of
    every grouping factor."""

    quantiles: dict[str, float]  # Min, 1Q, Median, 3Q, Max of (y − Xβ − Σ Z_k b_k) / σ
    sigma: float
    n: int
    group: str  # the first grouping factor (most levels); all of them: `groups`
    #: per factor (lme4's name in `group`, the factors in `groups` order) and level (the
    #: labels of `ranef`): n, mean_residual, residual_variance (unscaled)
    by_group: pl.DataFrame
    exact: bool = True
    groups: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        cells = [(k, f"{v:.4f}") for k, v in self.quantiles.items()]
        width = max(max(len(k), len(v)) for k, v in cells)
        head = " ".join(k.rjust(width) for k, _ in cells)
        vals = " ".join(v.rjust(width) for _, v in cells)
        note = "" if self.exact else "\n(quartiles approximate)"
        return f"Scaled residuals:\n{head}\n{vals}{note}"


def _pearson_scale(model: FittedModel) -> tuple[str, dict]:
    """SQL of the factor that makes a residual a Pearson residual (times σ): √w under case
    weights (lme4's residuals(type = "pearson")), 1/δ_k under a variance per stratum (nlme's),
    1 otherwise; and its bound parameters."""
    parts, params = [], {}
    if model.weights:
        parts.append(f"sqrt(CAST({quote_ident(model.weights)} AS DOUBLE))")
    if model.variance_by and model.variance_ratios:
        cases = []
        for i, (level, ratio) in enumerate(model.variance_ratios.items()):
            params[f"mlpipe_vb{i}"] = str(level)
            cases.append(f"WHEN $mlpipe_vb{i} THEN {1.0 / float(ratio)!r}")
        parts.append(f"(CASE CAST({quote_ident(model.variance_by)} AS VARCHAR) "
                     f"{' '.join(cases)} END)")
    return (" * ".join(parts) or "1.0"), params


def residual_summary(result, data=None, *, memory_limit: str | None = None,
                     threads: int | None = None, temp_directory: str | None = None,
                     exact: bool | None = None, options=None) -> ResidualSummary:
    """One more pass over the training data: conditional residuals r = y − Xβ − Σ_k Z_k b_k
    of the rows the model used (no null in any model column), the quantiles of the scaled
    Pearson residuals (r·√w/σ under case weights, r/(σδ_k) under a variance per stratum,
    else r/σ: Min, 1Q, Median, 3Q, Max, as lme4's summary, quantile type 7) and, for every
    level of every grouping factor, n, mean and variance of r.

    `data` defaults to the training data recorded with the fit.  Quartiles are exact
    (`quantile_cont`) unless `exact=False`, or by default for more than
    EXACT_QUANTILE_MAX_ROWS rows (then DuckDB's t-digest `approx_quantile`).  `options`
    (an `engines.EngineOptions`) replaces memory_limit / threads / temp_directory.
    """
    model = as_model(result)
    if data is None:
        data = model.source
        if not data:
            raise InputError("residual_summary needs the training data (it is not recorded "
                             "with this result)")
    if exact is None:
        exact = model.nobs is None or model.nobs <= EXACT_QUANTILE_MAX_ROWS
    from .engines import EngineOptions

    con = connect(options=options or EngineOptions(
        threads=threads, memory_limit=memory_limit, temp_directory=temp_directory))
    try:
        frame = Frame(data, con)
        # the training data: center() / group_mean() means are recomputed from its rows
        pred = linear_predictor(model, frame, con, training=True)
        if not pred.has_response:
            cols = ", ".join(pred.formula.response.columns())
            raise DataError(f"response column {cols} is not in {frame.path} (or not numeric)")
        extra = [c for c in (model.weights, model.variance_by) if c]
        complete = complete_condition(pred.formula.columns() + extra, pred.schema)
        scale, scale_params = _pearson_scale(model)
        predicted = pred.sql(", ".join(["__mlpipe_y - fitted AS r",
                                        f"(__mlpipe_y - fitted) * {scale} AS rp"]
                                       + pred.matched),
                             pred.design.aggregates.source(frame.relation, complete),
                             where=complete)
        sql = render("residuals", predicted=predicted, levels=", ".join(pred.matched),
                     quantile="quantile_cont" if exact else "approx_quantile")
        table = _fetch(con, sql, {**frame.params, **pred.params, **scale_params}, frame.path)
    finally:
        con.close()
    overall = table.filter(pl.col("factor").is_null())
    n = int(overall["n"][0]) if overall.height else 0
    if n == 0 or overall["quantiles"][0] is None:
        raise DataError(f"no complete rows in {frame.path} to compute residuals from")
    q = np.asarray(overall["quantiles"][0].to_list(), dtype=float) / model.sigma
    quantiles = dict(zip(("Min", "1Q", "Median", "3Q", "Max"), q.tolist()))
    name = dict(zip(pred.matched, pred.factors))
    by = (table.filter(pl.col("factor").is_not_null()).drop("quantiles")
          .with_columns(pl.col("factor").replace_strict(name).alias("group")))
    ranef = model.ranef
    keys = ranef.select((pl.col("group").cast(pl.Utf8) if "group" in ranef.columns
                         else pl.lit(pred.factors[0])).alias("group"),
                        pl.col("level").cast(pl.Utf8)).unique(maintain_order=True)
    order = keys.with_columns(pl.col("group").replace_strict(
        {f: i for i, f in enumerate(pred.factors)}, default=len(pred.factors),
        return_dtype=pl.Int64).alias("_f")).with_row_index("_i")
    by = (by.join(order, on=["group", "level"], how="left")
          .sort("_f", "_i", "level", nulls_last=True)
          .select("group", "level", pl.col("n").cast(pl.Int64), "mean_residual",
                  "residual_variance"))
    return ResidualSummary(quantiles, model.sigma, n, pred.factors[0], by, exact,
                           list(pred.factors))


# ---------------------------------------------------------------------- the Polars engine

def _predict_polars(model: FittedModel, data, out, fmt: str | None,
                    level: str) -> pl.DataFrame | PredictionFile:
    """`predict` through Polars' lazy API: the checks and the design of `_prediction_design`,
    each model column compiled from its term representation (`polars_engine.compile_column`,
    as the Polars statistics pass), each factor's conditional modes LEFT JOINed on its keys
    typed as at fit time (`maintain_order="left"`: input order, no sort), the result
    collected (small data) or sunk to a staged file by the streaming engine.  Semantics as
    DuckDB's (`LinearPredictor`): an unseen level or null key drops that factor's Z_k·b_k,
    a missing predictor or unknown level gives a null prediction."""
    from .engines.polars_engine import (_complete, _duck_type, _frame, compile_column,
                                        compile_expr)

    model, formula = _prediction_formula(model)
    if formula.aggregates():
        raise InputError("the polars engine does not predict center() / group_mean() "
                         "models (their stored means are joined by SQL): use --engine duckdb")
    if any(c.value == "poly" for c in formula.prepass()):
        raise InputError("the polars engine does not compute poly(): use --engine duckdb")
    lf, location = _frame(data, formula.value_columns())
    where = location or "the data"
    try:
        schema = {k: _duck_type(v) for k, v in lf.collect_schema().items()}
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read {where}: {first_line(str(exc))}") from None
    if model.factor_levels:
        levels = model.factor_levels
    else:
        con = connect()
        try:
            levels = _fit_levels(model, con, formula, schema)
        finally:
            con.close()
    design = _prediction_design(model, formula, schema, levels, level, where)
    coding = design.levels
    pre = "__mlpipe_"

    def ok(cols: list[str]):
        """As `_compile`'s ok_sql: a known level of a categorical, a value otherwise."""
        cond = _complete([c for c in cols if c not in levels], schema)
        for c in cols:
            if c in levels:
                cond = cond & (pl.col(c).is_in(list(levels[c])) if levels[c] else pl.lit(False))
        return cond

    xb = None
    for col in design.fixed:
        term = pl.lit(float(model.fixed[col.name])) * compile_column(col.parts, coding)
        xb = term if xb is None else xb + term
    for e in formula.offsets:  # offset(x): known coefficient 1
        xb = xb + compile_expr(e, coding)
    xb = pl.when(ok(_variable_columns(formula, False))).then(xb).otherwise(None)
    frame = lf.with_columns(xb.alias(f"{pre}xb"))
    fitted = pl.col(f"{pre}xb")
    if level == "conditional":
        gcols = _grouping_columns(formula)
        several = len(design.factors) > 1
        frame = frame.with_columns([_polars_key(pl.col(c), _key_type(model, c, gcols))
                                    .alias(f"{pre}g{j}") for j, c in enumerate(gcols)])
        for k, factor in enumerate(_factor_order(model, design.factors)):
            wide = _factor_modes(model, factor, several)
            if wide["level"].is_duplicated().any():
                raise DataError(f"the conditional modes of {factor.name} list a level twice")
            idx = [gcols.index(c) for c in factor.columns]
            modes = wide.select(pl.col("level").alias(f"{pre}level{k}"),
                                *[pl.col(n).alias(f"{pre}b{k}_{a}")
                                  for a, n in enumerate(factor.names)])
            split = modes[f"{pre}level{k}"].str.split(":") if len(idx) > 1 else None
            if split is None or bool((split.list.len() == len(idx)).all()):
                keys = [f"{pre}g{j}" for j in idx]
                modes = modes.with_columns([
                    _polars_key((pl.col(f"{pre}level{k}") if split is None else
                                 pl.col(f"{pre}level{k}").str.split(":").list.get(n)),
                                _key_type(model, gcols[j], gcols), text=True).alias(f"{pre}g{j}")
                    for n, j in enumerate(idx)])
                frame = frame.join(modes.lazy(), on=keys, how="left", maintain_order="left")
            else:  # a value contains ':': match the label built from the row
                label = pl.concat_str([pl.col(f"{pre}g{j}").cast(pl.String) for j in idx],
                                      separator=":")
                frame = frame.with_columns(label.alias(f"{pre}l{k}")).join(
                    modes.with_columns(pl.col(f"{pre}level{k}").alias(f"{pre}l{k}")).lazy(),
                    on=f"{pre}l{k}", how="left", maintain_order="left")
            terms = None
            for a, zi in enumerate(factor.z):
                b = pl.col(f"{pre}b{k}_{a}")
                col = design.random[zi]
                t = b if col.sql is None else compile_column(col.parts, coding) * b
                terms = t if terms is None else terms + t
            random_cols = [c for rt in formula.random if rt.group == factor.name
                           for v in rt.variables() for c in v.expr.columns()]
            part = pl.when(pl.col(f"{pre}level{k}").is_null()).then(0.0) \
                .when(ok(list(dict.fromkeys(random_cols)))).then(terms).otherwise(None)
            fitted = fitted + part
    has_response = all(c in schema and is_numeric(schema[c])
                       for c in formula.response.columns())
    produced = OUTPUT_COLUMNS if has_response else OUTPUT_COLUMNS[:2]
    inputs = [c for c in schema if c not in produced and not c.startswith(pre)]
    outputs = [pl.col(f"{pre}xb").alias("fitted_population"), fitted.alias("fitted")]
    extra = []  # as predict's SQL: fitted_response of a GLMM, residual with a response
    if model.family and model.family != "ordinal":  # ordinal: fitted is η, no one mean
        mu = _inverse_link_polars(model.link, pl.col("fitted"))
        extra.append(mu.alias("fitted_response"))
        if has_response and "cbind(" not in model.formula.split("~", 1)[0]:
            extra.append((pl.col(f"{pre}y") - mu).alias("residual"))
    elif not model.family and has_response:
        extra.append((pl.col(f"{pre}y") - pl.col("fitted")).alias("residual"))
    y = compile_column(design.response.parts, coding) if has_response else pl.lit(None)
    result = (frame.with_columns(y.alias(f"{pre}y"))
              .select(*inputs, *outputs, f"{pre}y").with_columns(extra).drop(f"{pre}y"))
    try:
        if out is None:
            df = result.head(IN_MEMORY_MAX_ROWS + 1).collect(engine="streaming")
            if df.height > IN_MEMORY_MAX_ROWS:
                raise InputError(f"{where} has more than {IN_MEMORY_MAX_ROWS} rows, too many "
                                 f"to return as a DataFrame; pass out= (--out) to write "
                                 f"Parquet")
            return df
        return _staged(out, fmt, lambda tmp, fmt: result.sink_csv(tmp) if fmt == "csv"
                       else result.sink_parquet(tmp))
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot predict for {where}: {first_line(str(exc))}") from None


#: DuckDB type name (as the fit typed a grouping column) -> Polars dtype name
_KEY_DTYPES = {"BIGINT": "Int64", "INTEGER": "Int32", "SMALLINT": "Int16", "TINYINT": "Int8",
               "UBIGINT": "UInt64", "UINTEGER": "UInt32", "USMALLINT": "UInt16",
               "UTINYINT": "UInt8", "HUGEINT": "Int128", "DOUBLE": "Float64",
               "FLOAT": "Float32", "REAL": "Float32", "DATE": "Date", "BOOLEAN": "Boolean"}


def _polars_key(expr, dtype: str | None, text: bool = False):
    """A grouping key as the fit typed it (as `_key_sql`): the value cast to that type
    (null when it does not cast), or its text when the type is text or not one of
    _KEY_DTYPES.  `text`: `expr` is a level label (text) to parse."""
    target = _KEY_DTYPES.get((dtype or "").split("(")[0])
    if target is None:
        return expr.cast(pl.String)
    if target == "Boolean":
        return (expr.cast(pl.String).str.to_lowercase() == "true") if text else \
            expr.cast(pl.Boolean, strict=False)
    if target == "Date" and text:
        return expr.str.to_date(strict=False)
    return expr.cast(getattr(pl, target), strict=False)


def _inverse_link_polars(link: str, eta):
    """`inverse_link_sql` in Polars (the probit by the same erfcc, for equal predictions)."""
    if link == "logit":
        return 1.0 / (1.0 + (-eta).exp())
    if link == "cloglog":
        return 1.0 - (-(eta.exp())).exp()
    if link == "log":
        return eta.exp()
    if link == "inverse":
        return 1.0 / eta
    if link == "probit":
        z = eta.abs() / math.sqrt(2.0)
        t = 1.0 / (1.0 + 0.5 * z)
        poly = pl.lit(_ERFCC[0])
        for c in _ERFCC[1:-1]:
            poly = c + t * poly
        erfc = t * (-z * z + _ERFCC[-1] + t * poly).exp()
        return pl.when(eta >= 0).then(1.0 - 0.5 * erfc).otherwise(0.5 * erfc)
    raise InputError(f"no inverse link for {link!r}")


# ---------------------------------------------------------------------- command line

def cmd_predict(args: argparse.Namespace) -> int:
    """Run `mlpipe predict`; returns the exit code (0)."""
    model = load_result_dir(args.result_dir)
    level = "population" if args.population else "conditional"
    written = predict(model, args.data, args.out, level=level,
                      memory_limit=args.memory_limit, threads=args.threads,
                      temp_directory=args.temp_directory, keep_order=not args.any_order,
                      engine=args.engine)
    nulls = (f" ({written.null_predictions} with a missing or unknown predictor: null)"
             if written.null_predictions else "")
    print(f"wrote {level} predictions for {written.rows} rows{nulls} to {written.path}")
    return 0

