"""Stage 2b: the sufficient statistics of a linear mixed model, built by one DuckDB scan.

For one grouping factor with m levels, q random effects and p fixed effects the Gaussian
likelihood depends on the data only through

* per group i: n_i, Z_i'Z_i (q×q), Z_i'X_i (q×p), Z_i'y_i (q), y_i'y_i
* totals:      n, X'X (p×p), X'y (p), y'y

`Statistics` holds them (arrays of size O(m), never O(rows)); it can be saved to and loaded
from Parquet and merged with the statistics of further partitions of the same model.
Per-group arrays are stored "group last" — (q, q, m), (q, p, m), (q, m) — so the solver's
small-matrix algebra runs elementwise over contiguous arrays of length m.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import runlog
from ._malloc import reuse_freed_memory
from ._sql import (Source, connect, fetch_columns, first_line, quote_ident, render,
                   staging_prefix, sweep_stale)
from .centering import joined, materialize
from .design import Design, check_columns, check_weights, design_from_data
from .errors import DataError
from .formula import parse_formula
from .residual import ResidualStatistics, Spec, check_spec, parse_spec, read_components, \
    run_pass

FORMAT_VERSION = 2  # 2: several grouping factors (per-cell statistics, factor columns)


@dataclass
class Factor:
    """One grouping factor of a model with several: lme4's name, its columns, its Z columns
    (indices into `Statistics.random_names`, the model's distinct Z columns), their names
    and correlated blocks in the factor's own order, its level labels, and the level of
    every cell (`index`, (cells,) int64)."""

    name: str
    columns: list[str]
    z: list[int]
    names: list[str]
    blocks: list[tuple[int, int]]
    levels: np.ndarray
    index: np.ndarray

    @property
    def m(self) -> int:
        return len(self.levels)

    @property
    def q(self) -> int:
        return len(self.z)


@dataclass
class Statistics:
    formula: str
    response: str
    fixed_names: list[str]
    random_names: list[str]
    blocks: list[tuple[int, int]]  # (start, size) of each correlated block of Z's columns
    group: str
    levels: np.ndarray  # (m,) strings, sorted as the grouping column sorts (several
    #: factors: the cell numbers 0..m-1; a cell is told by its factors' levels)
    n_i: np.ndarray  # (m,)
    ztz: np.ndarray  # (q, q, m)
    ztx: np.ndarray  # (q, p, m)
    zty: np.ndarray  # (q, m)
    yty_i: np.ndarray  # (m,)
    xtx: np.ndarray  # (p, p)
    xty: np.ndarray  # (p,)
    yty: float
    n: int
    rows_read: int = 0
    rows_dropped: int = 0
    source: str = ""
    factor_levels: dict[str, list] = field(default_factory=dict)  # coding of categoricals
    group_type: str = ""  # DuckDB type of the grouping column (levels are its VARCHAR casts)
    timings: dict[str, float] = field(default_factory=dict)
    #: how many pieces of X and Z the pass found constant within cells and took out of its
    #: sums (FACTOR_SAMPLE_ROWS), for the run log; not saved
    constant_pieces: int = field(default=0, compare=False)
    #: several grouping factors (or one on a combination of columns): the per-cell arrays
    #: above (ztz, ..., n_i over the cells) and every factor's levels and cell index;
    #: empty for one factor on one column (then `group` and `levels` say it all)
    factors: list[Factor] = field(default_factory=list)
    group_types: dict[str, str] = field(default_factory=dict)  # DuckDB type per column
    #: the means of center()/group_mean() the statistics pass used (mlpipe/centering.py),
    #: for prediction on new data; None without them, and for merged statistics (each
    #: part was centred on its own means)
    centering: dict | None = None
    #: case weights (lme4's `weights =`): the column ("" for none) and Σ log w_i over the
    #: rows used; every cross-product above is then weighted (Σ w z z', Σ w x y, ...; the
    #: intercept's "count" is Σ w), `n` / `n_i` stay row counts
    weights: str = ""
    log_weights: float = 0.0
    #: a residual structure (serial correlation, variances by stratum): its lag statistics
    #: (mlpipe/residual.py); the arrays above are then whitened at `residual.psi` (the
    #: plain sums while it is None), and `log_weights` is −log|R/σ²| there
    residual: ResidualStatistics | None = None
    #: a statistics store's inputs (mlpipe/store.py): [{path, size, fingerprint}]
    inputs: list[dict] = field(default_factory=list)

    @property
    def response_ss(self) -> float:
        """y'y of the rows used, unweighted by any residual structure."""
        if self.residual is None:
            return float(self.yty)
        rs = self.residual
        return float(np.sum(rs.yty[(rs.kind == "F") | (rs.kind == "A")]))

    @property
    def general(self) -> bool:
        """True when the statistics are per cell of several factors (`factors`)."""
        return bool(self.factors)

    @property
    def groups(self) -> dict[str, int]:
        """lme4's `ngroups`: levels per factor."""
        if self.factors:
            return {f.name: f.m for f in self.factors}
        return {self.group: self.m}

    @property
    def m(self) -> int:
        return len(self.levels)

    @property
    def p(self) -> int:
        return len(self.fixed_names)

    @property
    def q(self) -> int:
        return len(self.random_names)

    # ------------------------------------------------------------------ merging
    def merge(self, other: Statistics) -> Statistics:
        """The statistics of the union of two disjoint sets of rows of the same model (e.g.
        two partitions, or yesterday's data and today's): `Statistics.combine([self, other])`."""
        return Statistics.combine([self, other])

    @staticmethod
    def combine(parts: list[Statistics], source: str | None = None) -> Statistics:
        """The statistics of the union of disjoint sets of rows of the same model (partitions
        of the data, a store and new files, the partials of the Dask engine): per-group
        (per-cell) sums add up, groups (cells) present in several parts are combined, levels
        sorted as the grouping columns sort.  All parts at once (one sort of the keys, one
        bincount per statistic).  Raises InputError when they were built for different
        models.  `source`: the merged source's name (default: the parts' joined by " + ")."""
        from .errors import InputError

        if not parts:
            raise InputError("no statistics to combine")
        first_part = parts[0]
        if len(parts) == 1:
            return first_part
        if any(st.residual is not None for st in parts):
            raise InputError("statistics with a residual correlation or variance structure "
                             "cannot be merged (a series split between parts loses its "
                             "lags); build them over all the rows at once")
        for other in parts[1:]:
            same = (first_part.formula == other.formula
                    and first_part.fixed_names == other.fixed_names
                    and first_part.random_names == other.random_names
                    and first_part.blocks == other.blocks
                    and first_part.factor_levels == other.factor_levels
                    and first_part.weights == other.weights
                    and [f.name for f in first_part.factors] == [f.name for f in other.factors])
            if not same:
                raise InputError("cannot merge statistics of different models (formula, "
                                 "columns or factor coding differ)")
        self = first_part
        types = self.group_types or {self.group: self.group_type}
        if all(st.m == 0 for st in parts):  # no part has a complete row: only the counts
            return dataclasses.replace(
                self, rows_read=sum(st.rows_read for st in parts),
                rows_dropped=sum(st.rows_dropped for st in parts), n=0,
                source=" + ".join(st.source for st in parts) if source is None else source)
        parts = [st for st in parts if st.m > 0] + [st for st in parts if st.m == 0]
        self = parts[0]
        if self.factors:
            keys = [_cell_keys(st) for st in parts]
        else:
            keys = [np.asarray(st.levels, dtype=object) for st in parts]
        allkeys = np.concatenate(keys)
        if not self.factors and types.get(self.group, "").upper().startswith(
                ("DOUBLE", "FLOAT", "REAL")):  # -0.0 and 0.0: one value, as DuckDB groups
            allkeys = np.where(allkeys == "-0.0", "0.0", allkeys).astype(object)
        uniq, inv = np.unique(allkeys.astype(str), return_inverse=True)
        inv = inv.reshape(-1)
        m = len(uniq)

        def add(arrays: list[np.ndarray]) -> np.ndarray:
            stacked = np.concatenate(arrays, axis=-1)
            out = np.zeros(stacked.shape[:-1] + (m,))
            flat = stacked.reshape(-1, stacked.shape[-1])
            res = out.reshape(-1, m)
            for r in range(flat.shape[0]):
                res[r] = np.bincount(inv, flat[r], minlength=m)
            return out

        n_i = add([st.n_i for st in parts])
        ztz, ztx = add([st.ztz for st in parts]), add([st.ztx for st in parts])
        zty, yty_i = add([st.zty for st in parts]), add([st.yty_i for st in parts])
        # the first occurrence of each merged key tells its labels
        first = np.full(m, -1)
        first[inv[::-1]] = np.arange(len(inv))[::-1]
        if self.factors:
            factors = []
            for k, f in enumerate(self.factors):
                labels = np.concatenate([st.factors[k].levels[st.factors[k].index]
                                         for st in parts])[first]
                lv_uniq, index = np.unique(labels.astype(str), return_inverse=True)
                lv_order = sort_order(lv_uniq, f.columns, types)
                rank = np.empty(len(lv_order), np.int64)
                rank[lv_order] = np.arange(len(lv_order))
                # the labels as the parts had them (their Python types), in sorted order
                lv_first = np.full(len(lv_uniq), -1)
                lv_first[index[::-1]] = np.arange(len(index))[::-1]
                lv = labels[lv_first[lv_order]]
                factors.append(Factor(f.name, f.columns, f.z, f.names, f.blocks,
                                      np.asarray(lv, dtype=object),
                                      rank[index.reshape(-1)].astype(np.int64)))
            order = np.lexsort([f.index for f in reversed(factors)])
            levels = np.arange(m)  # the cells' numbers (their labels are the factors')
        else:
            labels = allkeys[first]
            order = sort_order(uniq, [self.group], types)
            levels = labels[order]
            factors = []
        for f in factors:
            f.index = f.index[order]
        sum_of = lambda name: sum((getattr(st, name) for st in parts[1:]),  # noqa: E731
                                  getattr(self, name))
        return Statistics(
            self.formula, self.response, self.fixed_names, self.random_names, self.blocks,
            self.group, levels, n_i[order], ztz[..., order], ztx[..., order], zty[..., order],
            yty_i[order], sum_of("xtx"), sum_of("xty"), sum_of("yty"), sum_of("n"),
            sum_of("rows_read"), sum_of("rows_dropped"),
            " + ".join(st.source for st in parts) if source is None else source,
            self.factor_levels, self.group_type, factors=factors,
            centering=None, group_types=self.group_types, weights=self.weights,
            log_weights=sum_of("log_weights"))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to one Parquet file: a row per group, the totals in the file's metadata.

        The file is written next to its destination and renamed into place, so a failure
        never leaves a half-written file behind.
        """
        q, p = self.q, self.p
        cols: dict[str, object] = {"level": pa.array(np.arange(self.m) if self.factors
                                                     else self.levels.astype(str)),
                                   "n": self.n_i, "yty": self.yty_i}
        for a in range(q):
            cols[f"zty_{a}"] = self.zty[a]
            for b in range(q):
                cols[f"ztz_{a}_{b}"] = self.ztz[a, b]
            for j in range(p):
                cols[f"ztx_{a}_{j}"] = self.ztx[a, j]
        for k, f in enumerate(self.factors):
            cols[f"f{k}"] = f.index
            cols[f"l{k}"] = pa.array(f.levels[f.index].astype(str))
        if self.residual is not None:
            cols.update(self.residual.columns())
        meta = {
            "factors": [{"name": f.name, "columns": f.columns, "z": f.z, "names": f.names,
                         "blocks": f.blocks} for f in self.factors],
            "group_types": self.group_types,
            "format_version": FORMAT_VERSION, "formula": self.formula, "response": self.response,
            "fixed_names": self.fixed_names, "random_names": self.random_names,
            "blocks": self.blocks, "group": self.group, "xtx": self.xtx.tolist(),
            "xty": self.xty.tolist(), "yty": self.yty, "n": self.n, "rows_read": self.rows_read,
            "rows_dropped": self.rows_dropped, "source": self.source,
            "factor_levels": self.factor_levels, "group_type": self.group_type,
            "centering": self.centering,
            "weights": self.weights, "log_weights": self.log_weights,
            "residual": None if self.residual is None else self.residual.meta(),
            "response_ss": self.response_ss, "inputs": self.inputs,
        }
        table = pa.table(cols).replace_schema_metadata({"mlpipe": json.dumps(meta)})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)  # staging files of killed runs
        tmp = path.with_name(f"{staging_prefix(path)}{uuid.uuid4().hex[:8]}.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[b"mlpipe"])
        except FileNotFoundError:
            raise DataError(f"statistics file not found: {path}") from None
        except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path} is not an mlpipe statistics file ({first_line(exc)})") \
                from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(f"{path} has statistics format version {version}; this mlpipe "
                            f"reads version {FORMAT_VERSION} (rebuild it with mlpipe stats)")
        p, q = len(meta["fixed_names"]), len(meta["random_names"])
        col = lambda name: table.column(name).to_numpy().astype(float)  # noqa: E731
        m = table.num_rows
        ztz = np.empty((q, q, m))
        ztx = np.empty((q, p, m))
        zty = np.empty((q, m))
        for a in range(q):
            zty[a] = col(f"zty_{a}")
            for b in range(q):
                ztz[a, b] = col(f"ztz_{a}_{b}")
            for j in range(p):
                ztx[a, j] = col(f"ztx_{a}_{j}")
        return cls(meta["formula"], meta["response"], meta["fixed_names"], meta["random_names"],
                   [tuple(b) for b in meta["blocks"]], meta["group"],
                   np.arange(m) if meta["factors"] else
                   np.asarray(table.column("level").to_pylist(), dtype=object), col("n"), ztz,
                   ztx, zty, col("yty"), np.asarray(meta["xtx"]), np.asarray(meta["xty"]),
                   float(meta["yty"]), int(meta["n"]), int(meta["rows_read"]),
                   int(meta["rows_dropped"]), meta.get("source", ""),
                   meta.get("factor_levels", {}), meta.get("group_type", ""),
                   factors=[_load_factor(table, k, f) for k, f in enumerate(meta["factors"])],
                   centering=meta.get("centering"),
                   group_types=meta.get("group_types", {}), weights=meta.get("weights", ""),
                   log_weights=float(meta.get("log_weights", 0.0)),
                   residual=None if not meta.get("residual") else
                   ResidualStatistics.from_saved(meta["residual"], col, q, p, m),
                   inputs=list(meta.get("inputs") or []))


def _cell_keys(st: Statistics) -> np.ndarray:
    """One text key per cell: every factor's level label (a cell is their combination)."""
    parts = [f.levels[f.index].astype(str) for f in st.factors]
    out = parts[0].astype(object)
    for p in parts[1:]:
        out = out + "\x1f" + p.astype(object)
    return out


def _label_key(label, columns: list[str], types: dict[str, str]):
    """Sort key of a level label as the grouping columns sort (numbers numerically)."""
    from .design import is_numeric

    parts = _split_label(str(label), columns, types)
    if parts is None:  # ambiguous (':' inside several text columns): by the label's bytes
        return tuple((1, 0.0, str(label).encode()) for _ in columns)
    key = []
    for part, col in zip(parts, columns):
        if is_numeric(types.get(col, "")):
            try:
                key.append((0, float(part), ""))
                continue
            except ValueError:
                pass
        if types.get(col, "").upper().startswith("BOOLEAN"):
            key.append((0, float(part.lower() == "true"), ""))
            continue
        key.append((1, 0.0, part.encode()))
    return tuple(key)


INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT",
                 "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT")


def sort_order(labels: np.ndarray, columns: list[str], types: dict[str, str]) -> np.ndarray:
    """The order that sorts distinct level labels (text) as the grouping columns sort:
    numbers numerically, booleans false first, text by its bytes — vectorized for one
    column, by `_label_key` for a combination of columns."""
    from .design import is_numeric

    labels = np.asarray(labels, dtype=str)
    if len(columns) == 1:
        dtype = types.get(columns[0], "").upper()
        if is_numeric(dtype):
            try:
                if dtype.startswith(INTEGER_TYPES):  # exact beyond 2^53 (not as floats)
                    try:
                        return np.argsort(labels.astype(np.int64), kind="stable")
                    except OverflowError:  # UBIGINT / HUGEINT beyond int64: Python ints
                        return np.array(sorted(range(len(labels)),
                                               key=lambda i: int(labels[i])), dtype=np.int64)
                return np.argsort(labels.astype(float), kind="stable")
            except ValueError:
                pass
        elif dtype.startswith("BOOLEAN"):
            return np.argsort(np.char.lower(labels) == "true", kind="stable")
        else:  # np.unique's order: by code point, which is UTF-8 byte order
            return np.argsort(labels, kind="stable")
    return np.array(sorted(range(len(labels)), key=lambda i: _label_key(
        labels[i], columns, types)), dtype=np.int64)


def _split_label(label: str, columns: list[str], types: dict[str, str]) -> list[str] | None:
    """The column values of a level label joined by ':' (a value may hold ':' itself): the
    columns before the first text column are split off from the left, those after the last
    from the right (numbers and booleans hold no ':'); None when two text columns make it
    ambiguous."""
    from .design import is_numeric

    k = len(columns)
    if k == 1:
        return [label]
    plain = [is_numeric(types.get(c, "")) or types.get(c, "").upper().startswith("BOOLEAN")
             for c in columns]
    text = [i for i, p in enumerate(plain) if not p]
    if len(text) > 1:
        parts = label.split(":")
        return parts if len(parts) == k else None
    first = text[0] if text else k - 1
    left = label.split(":", first)
    head, rest = left[:first], left[first] if len(left) > first else None
    if rest is None:
        return None
    tail = rest.rsplit(":", k - 1 - first) if k - 1 - first else [rest]
    parts = head + tail
    return parts if len(parts) == k else None


def _load_factor(table: pa.Table, k: int, meta: dict) -> Factor:
    index = table.column(f"f{k}").to_numpy().astype(np.int64)
    levels = np.empty(int(index.max()) + 1 if len(index) else 0, dtype=object)
    levels[index] = np.asarray(table.column(f"l{k}").to_pylist(), dtype=object)
    return Factor(meta["name"], list(meta["columns"]), list(meta["z"]), list(meta["names"]),
                  [tuple(b) for b in meta["blocks"]], levels, index)


# ---------------------------------------------------------------------- the statistics pass

class _Moments:
    """Numbers the distinct SQL columns of [X Z y] and names the pairwise sums."""

    def __init__(self, design: Design):
        self.exprs: list[str] = []  # index k+1 <-> exprs[k]; index 0 is the constant 1
        #: the SQL of the pieces whose product each column is (index -> pieces; 0 has none)
        self.pieces: dict[int, tuple[str, ...]] = {0: ()}
        #: case weights: every sum is Σ w·a·b, the constant's Σ w is s_0_0 (n stays count(*))
        self.weighted = design.weights_sql is not None
        self.x = [self.index(c.sql, c.pieces) for c in design.fixed]
        self.z = [self.index(c.sql, c.pieces) for c in design.random]
        # offset(x): known coefficient 1, so the statistics are those of y - offset
        y_sql = design.response.sql if design.offset is None \
            else f"({design.response.sql} - ({design.offset}))"
        self.y = self.index(y_sql)
        #: a name for each non-constant column, for messages
        self.labels = {c.name: k for c, k in
                       zip(design.fixed + design.random + [design.response],
                           self.x + self.z + [self.y]) if k}

    def index(self, sql: str | None, pieces: tuple[str, ...] = ()) -> int:
        if sql is None:
            return 0
        if sql not in self.exprs:
            self.exprs.append(sql)
            self.pieces[len(self.exprs)] = tuple(pieces) or (sql,)
        return self.exprs.index(sql) + 1

    def name(self, i: int, j: int) -> str:
        i, j = min(i, j), max(i, j)
        return "n" if (i, j) == (0, 0) and not self.weighted else f"s_{i}_{j}"

    def _products(self, left: list[int], right: list[int]) -> set[tuple[int, int]]:
        out = {(min(a, b), max(a, b)) for a in left for b in right}
        return out if self.weighted else out - {(0, 0)}

    def group_pairs(self) -> list[tuple[int, int]]:
        """The sums read back per group: Z with [Z X y], and y'y."""
        return sorted(self._products(self.z, self.z + self.x + [self.y])
                      | self._products([self.y], [self.y]))

    def pairs(self) -> list[tuple[int, int]]:
        """Every sum the scan computes: the per-group ones and those of the totals X'X, X'y
        (and Σ w with case weights, which `assemble` checks, with or without an intercept)."""
        return sorted(set(self.group_pairs()) | self._products(self.x, self.x + [self.y])
                      | ({(0, 0)} if self.weighted else set()))

    def sum_sql(self, i: int, j: int) -> str:
        a, b = min(i, j), max(i, j)
        body = f"c{b}" if a == 0 else f"c{a} * c{b}"
        if self.weighted:
            body = "cw" if (a, b) == (0, 0) else f"cw * {body}"
        return f"fsum({body}) AS {self.name(a, b)}"  # compensated: see _run_moments


# Pieces constant within cells.  A level-2 predictor w (and the dummies of a level-2
# factor, a group_mean() by a grouping column) takes one value in every cell, so each sum of
# a product with it is that value times a sum without it: Σ w·x = w Σ x, Σ (x·w)(x·w) =
# w² Σ x², and y ~ x * w + (x | g) needs 5 compensated sums per cell instead of 14 (the
# 10M-row scan of make bench 0.64 -> 0.4 s).  Whether a piece is constant is measured, never
# assumed: a probe of the first FACTOR_SAMPLE_ROWS rows proposes the pieces that take one
# value in each of its cells of several rows (at least FACTOR_MIN_CELLS of them) and differ
# between cells, the pass keeps every proposed piece's min and max per cell, and a cell
# where they differ makes the pass run again with every sum (`_run_moments`).
FACTOR_SAMPLE_ROWS = 100_000
FACTOR_MIN_CELLS = 20


def _split_pieces(mom: _Moments, constant: list[str]):
    """Every column of `mom` as (its varying pieces' numbers, its constant pieces' SQL
    names v<j>) → (the distinct varying pieces' SQL, column → split): column k is
    C_k·V_k."""
    varying: list[str] = []
    split = {}
    for k, ps in mom.pieces.items():
        for p in ps:
            if p not in constant and p not in varying:
                varying.append(p)
        split[k] = (tuple(sorted(varying.index(p) for p in ps if p not in constant)),
                    [f"v{constant.index(p)}" for p in ps if p in constant])
    return varying, split


def _piece_columns(varying: list[str], constant: list[str]) -> list[str]:
    """The pieces as SQL columns: p<k> varying, q<j> constant (DOUBLE: a dummy's 1.0 / 0.0
    is a DECIMAL literal, and min() would keep the type)."""
    return ([f"{sql} AS p{k}" for k, sql in enumerate(varying)]
            + [f"CAST({sql} AS DOUBLE) AS q{j}" for j, sql in enumerate(constant)])


def _piece_range(j: int) -> str:
    """A constant piece's min and max in the group (+ 0.0: -0.0 → 0.0, min of ±0 is either)."""
    return f"min(q{j}) + 0.0 AS v{j}, max(q{j}) + 0.0 AS u{j}"


class _Factored:
    """The scan's sums with `constant` pieces (SQL, constant within every cell) taken out of
    the products: `columns` the pieces as SQL columns (p<k> varying, q<j> constant), `sums`
    the aggregates (the compensated sums of products of varying pieces, min and max of each
    constant one), `outputs` each sum of `_Moments.pairs` from them and `pieces_constant`,
    whether every constant piece took one value in the cell."""

    def __init__(self, mom: _Moments, constant: list[str], weight_sql: str | None):
        self.constant = list(constant)
        varying, split = _split_pieces(mom, self.constant)
        sums: dict[tuple[int, ...], str] = {}  # a product of varying pieces -> its sum
        self.outputs = []
        for i, j in mom.pairs():
            (vi, ci), (vj, cj) = split[i], split[j]
            key = tuple(sorted(vi + vj))
            base = "n" if key == () and not mom.weighted else sums.setdefault(key, f"r{len(sums)}")
            self.outputs.append(f"{' * '.join(ci + cj + [base])} AS {mom.name(i, j)}")
        self.outputs.append(" AND ".join(f"v{j} = u{j}" for j in range(len(self.constant)))
                            + " AS pieces_constant")  # one boolean per cell, checked after
        prod = lambda key: " * ".join((["cw"] if mom.weighted else [])  # noqa: E731
                                      + [f"p{k}" for k in key])
        self.sums = ([f"fsum({prod(key)}) AS {name}" for key, name in sums.items()]
                     + [_piece_range(j) for j in range(len(self.constant))])
        self.columns = _piece_columns(varying, self.constant)
        if weight_sql is not None:
            self.columns.append(f"{weight_sql} AS cw")


class _LagFactored:
    """The lag pass's sums with `constant` pieces (SQL, constant within every cell: a
    level-2 predictor, as `_Factored` for the plain pass) taken out: along a series
    within a cell the previous row's constant is the row's own, so with column k = C_k·V_k
    (C_k its constant pieces, V_k the varying ones) s_i_j = C_iC_j Σ V_iV_j, b_i_j =
    C_iC_j Σ LV_iLV_j and x_i_j = C_iC_j Σ (LV_iV_j + V_iLV_j) (LV = LAG(V); the lag of no
    piece is 1 where the row has a previous one).  `columns` the pieces (p<k> varying, q<j>
    constant), `previous` their lags, `sums` the distinct sums and each constant piece's
    min, max and lag mismatches, `outputs` every sum of the plain pass from them and
    `pieces_constant`, whether the constants held in the group (checked after the pass)."""

    def __init__(self, mom: _Moments, constant: list[str]):
        self.constant = list(constant)
        varying, split = _split_pieces(mom, self.constant)
        sums: dict[tuple, tuple[str, str]] = {}  # (kind, key) -> (name, aggregate)

        def agg(kind: str, key, body: str) -> str:
            if (kind, key) not in sums:
                sums[(kind, key)] = (f"r{len(sums)}", body)
            return sums[(kind, key)][0]

        prod = lambda vs, lag: " * ".join(f"{'lp' if lag else 'p'}{v}" for v in vs) \
            or ("lone" if lag else "1.0")  # noqa: E731
        self.outputs = []
        for i, j in mom.pairs():
            a, b = min(i, j), max(i, j)
            (va, ca), (vb, cb) = split[a], split[b]
            const = ca + cb
            vs = tuple(sorted(va + vb))
            s_base = "n" if not vs else agg("s", vs, f"fsum({prod(vs, False)})")
            b_base = agg("b", vs, f"fsum({prod(va, True)} * {prod(vb, True)})")
            xk = tuple(sorted([va, vb]))
            x_base = agg("x", xk, f"fsum({prod(va, True)} * {prod(vb, False)} + "
                                  f"{prod(va, False)} * {prod(vb, True)})")
            for base, name in ((s_base, mom.name(a, b)), (b_base, f"b_{a}_{b}"),
                               (x_base, f"x_{a}_{b}")):
                self.outputs.append(f"{' * '.join(const + [base])} AS {name}")
        n_c = len(self.constant)
        self.outputs.append(" AND ".join(f"v{j} = u{j} AND m{j} = 0" for j in range(n_c))
                            + " AS pieces_constant")
        self.sums = [f"{body} AS {name}" for name, body in sums.values()] + [
            f"{_piece_range(j)}, count(*) FILTER (WHERE lq{j} IS DISTINCT FROM q{j} "
            f"AND lq{j} IS NOT NULL) AS m{j}" for j in range(n_c)]
        self.columns = _piece_columns(varying, self.constant)
        self.previous = (["LAG(1.0) OVER w AS lone"]
                         + [f"LAG(p{k}) OVER w AS lp{k}" for k in range(len(varying))]
                         + [f"LAG(q{j}) OVER w AS lq{j}" for j in range(n_c)])


def _constant_pieces(con: duckdb.DuckDBPyConnection, sample: str, params: dict,
                     mom: _Moments, groups: str, group_by: str, complete: str) -> list[str]:
    """The pieces of X and Z that `sample` (the first FACTOR_SAMPLE_ROWS rows of the input,
    with the means of center()/group_mean() joined) shows constant within cells (see
    FACTOR_SAMPLE_ROWS): a proposal, checked by the pass itself."""
    cand = list(dict.fromkeys(p for k, ps in mom.pieces.items() if k != mom.y for p in ps))
    if not cand:
        return []
    cols = ", ".join(f"CAST({p} AS DOUBLE) AS q{j}" for j, p in enumerate(cand))
    aggs = ", ".join(f"min(q{j}) AS v{j}, max(q{j}) AS u{j}" for j in range(len(cand)))
    checks = ", ".join(f"count(*) FILTER (WHERE n > 1 AND v{j} IS DISTINCT FROM u{j}), "
                       f"min(v{j}) < max(v{j})" for j in range(len(cand)))
    sql = (f"SELECT count(*) FILTER (WHERE n > 1), {checks} FROM ("
           f"SELECT {group_by}, count(*) AS n, {aggs} FROM ("
           f"SELECT {groups}, {cols} FROM {sample} AS src WHERE {complete}) AS rows "
           f"GROUP BY {group_by}) AS cells")
    try:
        multi, *res = con.execute(sql, params).fetchone()
    except duckdb.Error:  # the pass itself reports what is wrong with the data
        return []
    if not multi or multi < FACTOR_MIN_CELLS:
        return []
    return [p for j, p in enumerate(cand) if res[2 * j] == 0 and res[2 * j + 1]]


def compute_statistics(data: str | os.PathLike[str], formula: str, *,
                       memory_limit: str | None = None, threads: int | None = None,
                       temp_directory: str | None = None,
                       weights: str | None = None, correlation: str | None = None,
                       residual_variance_by: str | None = None,
                       coding: dict[str, list] | None = None,
                       partial: bool = False, types: dict[str, str] | None = None
                       ) -> Statistics:
    """One streaming DuckDB pass over `data` → the model's `Statistics`.  `weights` names a
    column of case weights (lme4's prior weights: Var(e_i) = σ² / w_i); `correlation`
    ("ar1(TIME | GROUP)", "car1(TIME | GROUP)") and `residual_variance_by` (a column) a
    residual structure (mlpipe/residual.py), whose lag statistics the pass adds.  `coding`:
    the levels of the categorical predictors to use (a store's, mlpipe/store.py) instead of
    those of `data`; a level `data` has beyond them is refused.  `partial`: `data` is one
    part of the input (an engine's task): statistics of no cells (its rows counted as
    dropped) when it has no complete rows, instead of the error the whole input gets;
    `types`: the whole input's DuckDB types of the model columns, to read this part with."""
    import time

    t0 = time.perf_counter()
    parsed = parse_formula(formula)
    spec = parse_spec(correlation, residual_variance_by)
    extra = tuple(spec.columns) if spec else ()
    source = Source(data)
    source.allow_empty = partial
    con = connect(memory_limit=memory_limit, threads=threads, temp_directory=temp_directory)
    try:
        # the cells' arrays (~1 GB for millions of cells: the intercept's count alone is in
        # Z'Z, Z'X and n) are first touched in this block; with NumPy's huge-page advice
        # every fault waits for the kernel's compaction (the 9.75M-cell crossed pass: 6.7-7.0
        # s against 4.5 s), see mlpipe/_malloc.py
        with reuse_freed_memory():
            if types:
                source.attach(con)
                source.cast(types)
            schema = source.schema(con, parsed.value_columns() + ([weights] if weights else [])
                                   + ([spec.time] if spec and spec.kind == "car1" else []))
            check_columns(parsed, schema)
            check_weights(weights, schema)
            if spec:
                check_spec(spec, schema, weights=weights)
            design = design_from_data(con, source, parsed, schema, weights=weights, extra=extra,
                                      coding=coding)
            t1 = time.perf_counter()
            runlog.stage("prepare", t1 - t0)
            stats = _run_moments(con, source, design, spec, partial=partial)
            stats.timings = {"prepare": t1 - t0, "scan": time.perf_counter() - t1}
            runlog.stage("scan", stats.timings["scan"], **runlog.statistics_fields(stats),
                         constant_pieces=stats.constant_pieces)
    finally:
        con.close()
    return stats


# Reproducibility (issue 13).  Every floating-point sum of the scan is DuckDB's compensated
# (Kahan) fsum(), not sum(): a plain DOUBLE sum depends on how DuckDB splits the rows among
# threads and merges the per-thread partial sums (measured on 3M rows: ~1e-14 relative apart
# at threads 2 and 4), the compensated sum carries the rounding error of every addition and
# merge along, so the rounded result is the same whatever the split in practice (tested at
# threads 1, 2, 4, 8; not a proof: near a rounding tie the last bit could still differ).
# The totals are fsum() of the per-group sums too (the groups come out of the hash
# aggregate in a varying order; an ordered aggregate, fsum(... ORDER BY group), cost 1.2 s
# on 950k cells against 0.02 s and was not adopted).  center() / group_mean()
# means are favg() (fsum / count).  Measured cost on 10M rows (2 cores): the scan ~1.5x
# (0.38 -> 0.57 s), fsum 1.7-1.8x sum in a bare GROUP BY; exact alternatives (HUGEINT fixed
# point 2.8-7x, a two-level exact float split +50-130%) were measured and not adopted.
def _run_moments(con: duckdb.DuckDBPyConnection, source: Source, design: Design,
                 spec: Spec | None = None, partial: bool = False) -> Statistics:
    mom = _Moments(design)
    pairs = mom.pairs()
    column_list = [f"{sql} AS c{k + 1}" for k, sql in enumerate(mom.exprs)] or ["1 AS c_unused"]
    sum_list = [mom.sum_sql(i, j) for i, j in pairs]
    names = [mom.name(i, j) for i, j in pairs]
    weight_sums: list[str] = []
    weight_names: list[str] = []
    if mom.weighted:  # Σ log w (lme4's deviance gains -Σ log w) and the smallest weight
        column_list.append(f"{design.weights_sql} AS cw")
        weight_sums = ["fsum(ln(greatest(cw, 1e-300))) AS slogw", "min(cw) AS wmin"]
        weight_names = ["slogw", "wmin"]
    columns = ",\n        ".join(column_list)
    params = {**source.params, **design.params}
    if design.group is not None:
        groups, group_by = f"src.{quote_ident(design.group)} AS grp", "grp"
    else:
        gcols = _cell_columns(design)
        groups = ", ".join(f"src.{quote_ident(c)} AS g{k}" for k, c in enumerate(gcols))
        group_by = ", ".join(f"g{k}" for k in range(len(gcols)))
    centred, centering = materialize(con, source, design)  # + center()/group_mean() means
    constant = []  # the lag pass factors only ar1 / car1 without weights (`_LagFactored`)
    if FACTOR_SAMPLE_ROWS and (spec is None or (spec.kind and not mom.weighted)):
        # the first rows in file order, the means joined after: a join does not keep the
        # order, and a sample taken after it would vary with the thread count
        sample = joined(f"(SELECT * FROM {source.relation} LIMIT {FACTOR_SAMPLE_ROWS})", design)
        constant = _constant_pieces(con, sample, params, mom, groups, group_by,
                                    design.complete_sql)

    def pieces_held(table: str) -> bool:  # every proposed piece took one value per group
        return not con.execute(f"SELECT count(*) FROM {table} WHERE complete AND NOT "
                               f"coalesce(pieces_constant, false)").fetchone()[0]

    factored = None
    if spec is not None:  # the lag pass (mlpipe/residual.py) builds group_moments too
        factored = _LagFactored(mom, constant) if constant else None
        try:
            if not run_pass(con, source=centred, params=params, spec=spec, mom=mom,
                            groups=groups, group_cols=[g.strip() for g in group_by.split(",")],
                            complete=design.complete_sql, columns=columns, factored=factored,
                            pieces_held=pieces_held):
                factored = None
        except duckdb.Error as exc:
            raise source.error(exc, "statistics pass failed over") from None
    else:
        keys = [g.strip() for g in group_by.split(",")]
        plain = dict(sums=sum_list + weight_sums, columns=column_list,
                     outputs=names + weight_names)
        tries = [plain]
        if constant:
            factored = _Factored(mom, constant, design.weights_sql)
            tries.insert(0, dict(sums=factored.sums + weight_sums, columns=factored.columns,
                                 outputs=factored.outputs + weight_names))
        for parts in tries:
            sql = render("group_moments", groups=groups, group_by=group_by,
                         first_key=keys[0], keys_if_complete=", ".join(
                             f"CASE WHEN complete THEN {k} END AS {k}" for k in keys),
                         source=centred, complete=design.complete_sql,
                         sums=",\n        ".join(parts["sums"]),
                         columns=",\n                ".join(parts["columns"]),
                         outputs=", ".join(parts["outputs"]))
            try:
                with scan_progress(con, source):
                    con.execute(sql, params)
            except duckdb.Error as exc:
                raise source.error(exc, "statistics pass failed over") from None
            if parts is plain or pieces_held("group_moments"):
                break
            factored = None  # a proposed piece varies within a cell: every sum, again

    # the totals first: with spec None, DuckDB's copy of the cells goes once they are read
    tot_sql = render("totals", sums=", ".join(
        ["sum(n)"]  # n: an integer count
        + [f"fsum({mom.name(i, j)})" for i, j in pairs]
        + (["fsum(slogw)", "min(wmin)"] if mom.weighted else [])))
    total_rows, count, *sums = con.execute(tot_sql).fetchone()
    if mom.weighted:
        *sums, log_weights, wmin = sums
    else:
        log_weights, wmin = 0.0, None
    totals = dict(zip(pairs, sums))
    factor_labels: list = []
    arrays = None  # several factors: the cells are fetched into the statistics' arrays
    if design.group is not None:
        z_cols = ", ".join(mom.name(i, j) for i, j in mom.group_pairs())
        per_group = con.execute(render("group_statistics", columns=z_cols)).fetchnumpy()
    else:
        arrays, per_group, factor_labels, order_by = _fetch_cells(con, design, mom)
    residual = None
    if spec is None:  # DuckDB's copy of the cells is read: freed before the arrays are built
        con.execute("DROP TABLE group_moments")
    elif len(per_group["n"]) and count:
        residual = read_components(con, spec=spec, mom=mom,
                                   group_cols=[g.strip() for g in group_by.split(",")],
                                   cell_order=group_by, schema=design.schema,
                                   m=len(per_group["n"]))
    if design.group is None:
        _order_cells(per_group, order_by)
    stats = assemble(design, mom, per_group, factor_labels, totals, count=count,
                     rows_read=total_rows, log_weights=log_weights, wmin=wmin,
                     location=source.location, centering=centering, residual=residual,
                     partial=partial, arrays=arrays,
                     non_finite=lambda bad: _non_finite(con, source, design, mom, bad))
    stats.constant_pieces = len(factored.constant) if factored else 0
    return stats


def _fetch_cells(con: duckdb.DuckDBPyConnection, design: Design, mom: _Moments):
    """Several factors: the cells of group_moments fetched into the `Statistics` arrays, in
    the order DuckDB's hash aggregate left them → (arrays, per_group, factor labels, the
    cells' order for `_order_cells`).  `per_group` holds every factor's level index ("f0",
    ...), the count and the sums, and the rank of each grouping column that is no factor of
    its own ("r0", ...) where needed; the order is the name of a factor on all the grouping
    columns in their order (its level index is each cell's place), else, per grouping
    column, (the column holding its rank, its number of distinct values, whether that
    column is a rank fetched for the order alone).
    No ORDER BY: sorting the millions of cells of a crossed design with their sums took
    DuckDB 1-2 s and ~400 MB; their keys' counting sorts take a fraction of that."""
    gcols = _cell_columns(design)
    joins, index_cols = [], []
    ranks: dict[int, tuple[str, int]] = {}  # grouping column -> (its rank's column, levels)
    full = None
    factor_labels = []
    for k, f in enumerate(design.factors):
        cols = [f"g{gcols.index(c)}" for c in f.columns]
        con.execute(render("factor_levels", table=f"lv{k}", keys=", ".join(cols),
                           distinct="" if len(set(cols)) == len(gcols) else "DISTINCT",
                           label=" || ':' || ".join(f"CAST({c} AS VARCHAR)" for c in cols)))
        factor_labels.append(np.asarray(con.execute(
            f"SELECT label FROM lv{k} ORDER BY idx").fetchnumpy()["label"], dtype=object))
        joins.append(f"JOIN lv{k} ON " + " AND ".join(f"gm.{c} = lv{k}.{c}" for c in cols))
        index_cols.append(f"lv{k}.idx AS f{k}")
        if len(cols) == 1:
            ranks.setdefault(gcols.index(f.columns[0]),
                             (f"f{k}", len(factor_labels[-1]), False))
        if cols == [f"g{j}" for j in range(len(gcols))]:
            full = f"f{k}"
    if full is None:  # a rank for each grouping column that is no factor of its own
        for j in range(len(gcols)):
            if j not in ranks:
                con.execute(render("factor_levels", table=f"rk{j}", keys=f"g{j}",
                                   distinct="DISTINCT", label="NULL"))
                joins.append(f"JOIN rk{j} ON gm.g{j} = rk{j}.g{j}")
                index_cols.append(f"rk{j}.idx AS r{j}")
                ranks[j] = (f"r{j}", con.execute(f"SELECT count(*) FROM rk{j}").fetchone()[0],
                            True)
    cells = con.execute("SELECT count(*) FROM group_moments WHERE complete").fetchall()[0][0]
    arrays, places = cell_arrays(mom, cells)  # the cells' sums land in place
    per_group = fetch_columns(con, render(
        "cell_statistics", joins="\n".join(joins), factor_columns=", ".join(index_cols),
        columns=", ".join(f"gm.{mom.name(i, j)}" for i, j in mom.group_pairs())),
        cells, out=places)
    order_by = full if full is not None else [ranks[j] for j in range(len(gcols))]
    return arrays, per_group, factor_labels, order_by


def _order_cells(per_group: dict, order_by) -> None:
    """Put the fetched cells (`_fetch_cells`, with its `order_by`) in order of their grouping
    columns (ORDER BY g0, g1, ...: the statistics' cell order), every column in place; the
    rank columns are dropped."""
    from ._levels_jit import lex_order, reorder

    if isinstance(order_by, str):  # a factor's level index is each cell's place
        position = per_group[order_by]
        kw = {"position": position}
    else:
        kw = {"order": lex_order([per_group[name] for name, _, _ in order_by],
                                 [m for _, m, _ in order_by])}
        for name, _, rank_only in order_by:
            if rank_only:
                del per_group[name]
        position = None
    tmp: dict = {}  # a scratch array per dtype
    for col in per_group.values():
        if col is not position:
            if col.dtype not in tmp:
                tmp[col.dtype] = np.empty_like(col)
            reorder(col, tmp=tmp[col.dtype], **kw)
    if position is not None:  # last: the others were placed by it
        position[:] = np.arange(len(position))


def _places(mom: _Moments):
    """Where each per-group column goes in the `Statistics` arrays: (column name, array,
    index) for Z'y, Z'Z (both triangles: a column has two places), Z'X, n and y'y."""
    for a, ia in enumerate(mom.z):
        yield mom.name(ia, mom.y), "zty", (a,)
        for b, ib in enumerate(mom.z):
            yield mom.name(ia, ib), "ztz", (a, b)
        for j, ij in enumerate(mom.x):
            yield mom.name(ia, ij), "ztx", (a, j)
    yield "n", "n_i", ()
    yield mom.name(mom.y, mom.y), "yty_i", ()


def cell_arrays(mom: _Moments, m: int) -> tuple[dict, dict]:
    """The per-group arrays of `Statistics` for m groups (cells), allocated, and each
    per-group column's first place in them by name (`fetch_columns`' `out`): a column
    fetched there is in place, and `assemble` copies it only to its other place."""
    q, p = len(mom.z), len(mom.x)
    arrays = {"ztz": np.empty((q, q, m)), "ztx": np.empty((q, p, m)), "zty": np.empty((q, m)),
              "n_i": np.empty(m), "yty_i": np.empty(m)}
    places: dict[str, np.ndarray] = {}
    for name, key, idx in _places(mom):
        places.setdefault(name, arrays[key][idx])
    return arrays, places


def assemble(design: Design, mom: _Moments, per_group: dict, factor_labels: list,
             totals: dict, *, count, rows_read, log_weights, wmin, location: str,
             centering=None, residual=None, partial: bool = False, non_finite=None,
             arrays: dict | None = None) -> Statistics:
    """The `Statistics` value from an engine's sums: `per_group` the per-group (per-cell)
    sums named as `_Moments.name` gives them, in level (cell) order, with "n" and "level"
    (one factor) or "f0", "f1", ... (every factor's level index of each cell);
    `factor_labels` every factor's level labels; `totals` the sums over the complete rows
    by pair (i, j); `count` their number; `non_finite(bad)` the error for model columns
    whose sums are not finite.  `per_group` is consumed: its columns are removed as they
    are copied into the statistics' arrays — `arrays` (`cell_arrays`) when the columns were
    fetched into them already."""
    total_rows = rows_read
    if not mom.weighted:
        totals = {**totals, (0, 0): count}
    m = len(per_group["n"])
    n = int(count or 0)
    empty_part = (m == 0 or n == 0) and partial  # no complete rows: only its count
    if empty_part:
        totals = {pair: 0.0 for pair in totals}
    if (m == 0 or n == 0) and not empty_part:
        raise DataError(f"no rows left after dropping rows with missing values "
                        f"({total_rows} rows read, all dropped)")
    if any(v is None for v in totals.values()):
        raise DataError("a model column is entirely missing")
    if mom.weighted and not empty_part and not (wmin is not None and float(wmin) > 0
                             and np.isfinite(float(log_weights))
                             and np.isfinite(float(totals[(0, 0)]))):
        raise DataError(f"weights column {design.weights!r} must be positive and finite in "
                        f"the rows used (smallest value {wmin})")
    bad = [name for name, k in mom.labels.items()
           if not np.isfinite(float(totals[(k, k)]))]
    if bad:
        raise (non_finite(bad) if non_finite else DataError(
            f"model column(s) {', '.join(bad)} take non-finite values in the rows used"))

    # each per-group column is dropped from `per_group` at its last use, so that (with
    # millions of cells) the columns and the arrays built from them are not all held twice
    places = list(_places(mom))
    uses = Counter(name for name, _key, _idx in places)
    arrays = cell_arrays(mom, m)[0] if arrays is None else arrays
    for name, key, idx in places:
        col = np.asarray(per_group[name], dtype=float)
        dst = arrays[key][idx]
        if not np.may_share_memory(col, dst):  # fetched in place already (`cell_arrays`)
            dst[...] = col
        uses[name] -= 1
        if uses[name] == 0:
            del per_group[name]
    ztz, ztx, zty, n_i, yty_i = (arrays[k] for k in ("ztz", "ztx", "zty", "n_i", "yty_i"))
    tot = lambda i, j: float(totals[(min(i, j), max(i, j))])  # noqa: E731
    xtx = np.array([[tot(i, j) for j in mom.x] for i in mom.x])
    xty = np.array([tot(i, mom.y) for i in mom.x])
    factors = []
    if design.group is None:
        for k, f in enumerate(design.factors):
            index = np.asarray(per_group[f"f{k}"], dtype=np.int64)
            labels = factor_labels[k]
            factors.append(Factor(f.name, list(f.columns), list(f.z), list(f.names),
                                  [(b.start, b.size) for b in f.blocks], labels, index))
    return Statistics(
        formula=design.formula.text, response=design.response.name,
        fixed_names=[c.name for c in design.fixed], random_names=[c.name for c in design.random],
        blocks=[(b.start, b.size) for b in design.blocks], group=design.group or "",
        levels=(np.asarray(per_group["level"], dtype=object) if design.group is not None
                else np.arange(len(n_i))), n_i=n_i,
        ztz=ztz, ztx=ztx, zty=zty, yty_i=yty_i, xtx=xtx, xty=xty,
        yty=tot(mom.y, mom.y), n=n, rows_read=int(total_rows), rows_dropped=int(total_rows) - n,
        source=location, factor_levels=design.levels,
        group_type=design.schema.get(design.group, "") if design.group else "",
        factors=factors,
        centering=centering,
        group_types={c: design.schema.get(c, "") for c in _cell_columns(design)},
        weights=design.weights or "", log_weights=float(log_weights or 0.0),
        residual=residual)


def scan_progress(con: duckdb.DuckDBPyConnection, source: Source):
    """A progress line for a DuckDB pass over `source` on a terminal (mlpipe/progress.py):
    DuckDB's own estimate of the query's progress, read from a second thread."""
    from . import progress

    if progress.active():  # tracked only while the progress bar is on; never printed
        con.execute("SET enable_progress_bar = true")
        con.execute("SET enable_progress_bar_print = false")
    name = source.path if source.location else "the data"
    return progress.stage(f"statistics pass over {name}", total=100.0,
                          poll=lambda: (max(con.query_progress(), 0.0), ""))


_SQRT_MAX = float(np.sqrt(np.finfo(float).max))  # ~1.34e154: larger values square to inf


def _non_finite(con: duckdb.DuckDBPyConnection, source: Source, design: Design,
                mom: _Moments, bad: list[str]) -> DataError:
    """The error for model columns whose sums of squares are not finite: the values
    themselves are infinite or NaN (log(0), division by 0), or they are finite but too large
    for their squares (|v| > ~1.3e154) or the sum of the squares (over the rows used) to be
    represented.  One more pass over those columns, only on this error path."""
    ks = [mom.labels[name] for name in bad]
    checks = ", ".join(f"count(*) FILTER (WHERE NOT isfinite(c{k})), max(abs(c{k}))"
                       for k in ks)
    columns = ", ".join(f"{mom.exprs[k - 1]} AS c{k}" for k in ks)
    sql = (f"SELECT {checks} FROM (SELECT {columns} FROM "
           f"{design.aggregates.source(source.relation, design.complete_sql)} AS src "
           f"WHERE {design.complete_sql})")
    try:
        row = con.execute(sql, {**source.params, **design.params}).fetchone()
    except duckdb.Error:
        row = None
    if row is not None:
        for j, name in enumerate(bad):
            infinite, largest = row[2 * j], row[2 * j + 1]
            if infinite or largest is None:
                continue
            what = ("squares overflow" if float(largest) > _SQRT_MAX
                    else "the sum of the squares overflows")
            return DataError(f"values too large: {what} double precision in model column "
                             f"{name!r} (largest |value| {float(largest):.3g}, the limit is "
                             f"about 1.3e154); rescale it")
    return DataError(f"model column(s) {', '.join(bad)} take non-finite values in the rows "
                     f"used (e.g. log or sqrt of a non-positive number, or division by 0)")


def _cell_columns(design: Design) -> list[str]:
    """The distinct grouping columns of all factors, in order of appearance."""
    return list(dict.fromkeys(c for f in design.factors for c in f.columns))

