"""SQL plumbing: the template files in `sql/`, identifier quoting, the data source.

Identifiers are only ever quoted by `quote_ident`; values (paths, factor levels) are always
bound parameters (`$name`).  Templates are plain `.sql` files with `{placeholders}` that are
filled with quoted identifiers or compiled expressions, never with user-supplied values.
"""

from __future__ import annotations

import csv
import functools
import glob as _glob
import gzip
import os
import re
import uuid
from pathlib import Path

from ._lazy import lazy_import
from .errors import DataError, InputError

# bound at first use: modules that need only quote_ident / render (the formula parser, and
# through it the registration of `mlpipe anova`) do not import DuckDB
duckdb = lazy_import("duckdb")

def _sql_dir() -> Path:
    """`mlpipe/sql` in an installed wheel; the repository's top-level `sql/` in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "sql"
    return installed if installed.is_dir() else here.parent / "sql"


SQL_DIR = _sql_dir()


def quote_ident(name: str) -> str:
    """Quote an identifier for DuckDB: wrap in double quotes, double any inner quote."""
    if "\x00" in name:
        raise DataError(f"column name {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


@functools.cache
def template(name: str) -> str:
    """The text of `sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text()


def render(name: str, **parts: str) -> str:
    """Fill a template's `{placeholders}` with already-quoted identifiers / expressions."""
    return template(name).format(**parts)


def connect(*, memory_limit: str | None = None, threads: int | None = None,
            temp_directory: str | None = None, options=None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the resource options applied: loose, or as an
    `engines.EngineOptions` (`options`, which then supplies all three)."""
    if options is not None:
        memory_limit, threads, temp_directory = (options.memory_limit, options.threads,
                                                 options.temp_directory)
    config: dict[str, object] = {}
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = int(threads)
    if temp_directory:
        config["temp_directory"] = temp_directory
    try:
        con = duckdb.connect(config=config)
    except duckdb.Error as exc:
        raise DataError(f"bad DuckDB option: {first_line(exc)}") from None
    # DuckDB draws a progress bar on stderr for queries over ~2 s, even when stderr is a
    # log file of a scheduled job, where it is only noise
    con.execute("SET enable_progress_bar = false")
    # jemalloc keeps the pages a query freed (a hash aggregate over millions of cells: ~0.7
    # GB beyond the table it built) until they decay, seconds later; its background threads
    # return them within a fraction of a second, while the cells are fetched into NumPy
    # (the 9.75M-cell crossed pass: peak 2,386-2,462 MB with them, 2,827-3,052 MB without)
    con.execute("SET allocator_background_threads = true")
    return con


def fetch_columns(con: duckdb.DuckDBPyConnection, sql: str, rows: int,
                  batch: int = 1 << 20, out: dict | None = None) -> dict[str, object]:
    """A query's result of `rows` rows (numeric, no nulls) as numpy columns, read batch by
    batch through Arrow into arrays allocated once: neither DuckDB's numpy conversion
    (fetchnumpy: ~2x slower) nor a whole Arrow table and its per-column concatenation
    beside the result (a crossed design's millions of cells are ~1 GB a copy).  `out`:
    arrays (of `rows`, writable) to read columns into by name — their final place, no copy
    afterwards; the others are allocated."""
    import numpy as np

    reader = con.sql(sql).to_arrow_reader(batch)
    given = out or {}
    out = {f.name: given[f.name] if f.name in given else
           np.empty(rows, dtype=f.type.to_pandas_dtype()) for f in reader.schema}
    at = 0
    for rb in reader:
        k = rb.num_rows
        for name, col in zip(rb.schema.names, rb.columns):
            out[name][at:at + k] = col.to_numpy(zero_copy_only=False)
        at += k
    if at != rows:
        raise RuntimeError(f"expected {rows} rows from the query, read {at}")
    return out


def used_params(sql: str, params: dict) -> dict:
    """The parameters the SQL refers to (DuckDB refuses unused ones: e.g. the level
    parameters of Z's columns at population level)."""
    return {k: v for k, v in params.items() if re.search(rf"\${re.escape(k)}\b", sql)}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


#: what `Source` accepts besides paths, for messages
IN_MEMORY_TYPES = ("a polars DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table, "
                   "RecordBatchReader or Dataset, or a DuckDB relation")


def _in_memory(data) -> tuple[str, object, bool] | None:
    """(description, object DuckDB scans, read-once) for in-memory data, None for anything
    else.  Tables (polars, pandas, arrow) and pyarrow datasets are registered as they are:
    DuckDB scans Arrow memory without copying and may scan it any number of times.  A
    stream that can be read only once (a RecordBatchReader, a polars LazyFrame executed in
    streaming mode, a DuckDB relation of another connection) is read once into a DuckDB
    temporary table, which spills to disk under the memory limit."""
    import sys

    import pyarrow as pa

    pl = sys.modules.get("polars")
    if pl is not None and isinstance(data, pl.DataFrame):
        return "the polars DataFrame", data.to_arrow(), False
    if pl is not None and isinstance(data, pl.LazyFrame):
        return "the polars LazyFrame", _lazy_reader(data), True
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(data, pd.DataFrame):
        return "the pandas DataFrame", pa.Table.from_pandas(data, preserve_index=False), False
    if isinstance(data, pa.Table):
        return "the pyarrow Table", data, False
    if isinstance(data, pa.RecordBatch):
        return "the pyarrow RecordBatch", pa.Table.from_batches([data]), False
    if isinstance(data, pa.RecordBatchReader):
        return "the pyarrow RecordBatchReader", data, True
    pds = sys.modules.get("pyarrow.dataset")
    if pds is not None and isinstance(data, pds.Dataset):
        return "the pyarrow Dataset", data, False
    if isinstance(data, duckdb.DuckDBPyRelation):
        try:
            return "the DuckDB relation", data.to_arrow_reader(1 << 17), True
        except duckdb.Error as exc:
            raise DataError(f"cannot read the DuckDB relation: {first_line(exc)}") from None
    return None


def _lazy_reader(lf):
    """A polars LazyFrame as a RecordBatchReader: its query executed once, in streaming mode
    (`collect_batches`), batch by batch."""
    import pyarrow as pa

    try:
        schema = lf.limit(0).collect().to_arrow().schema
        batches = lf.collect_batches()
    except Exception as exc:  # noqa: BLE001 - polars raises many unrelated types
        raise DataError(f"cannot evaluate the polars LazyFrame: {first_line(exc)}") from None

    def stream():
        for df in batches:
            table = df.to_arrow()
            if table.schema != schema:
                table = table.cast(schema)
            yield from table.to_batches()

    return pa.RecordBatchReader.from_batches(schema, stream())


def describe_type(data) -> str:
    t = type(data)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class Source:
    """A readable data source: a Parquet file, a directory of Parquet files, a glob, or CSV —
    or data in memory (see `IN_MEMORY_TYPES`), registered with DuckDB as a view by `attach`.

    `relation` is the SQL table expression (with a bound `$source` parameter for files) and
    `params` holds the value to bind.  `schema(con)` attaches in-memory data to `con`
    first, so every query after it may name `relation`.
    """

    def __init__(self, data):
        self._memory = None
        if not isinstance(data, (str, os.PathLike)):
            found = _in_memory(data)
            if found is None:
                raise InputError(f"cannot read data of type {describe_type(data)}: give a "
                                 f"file path (Parquet or CSV file, directory or glob), "
                                 f"{IN_MEMORY_TYPES}")
            self.path, obj, once = found
            self.location = ""  # nothing to reread later (residuals need the data given)
            self.csv = False
            self._view = f"__mlpipe_data_{uuid.uuid4().hex[:12]}"
            self._memory, self._once, self._attached = obj, once, None
            self.relation, self.params = quote_ident(self._view), {}
            self._checked = True
            return
        path = str(data)
        self.path = path
        #: where the data is, independent of the current directory (recorded with results)
        self.location = os.path.abspath(path)
        has_glob = any(ch in path for ch in "*?[")
        if has_glob:
            if not _glob.glob(path, recursive=True):
                raise DataError(f"no files match {path}")
            pattern, probe = path, path
        elif os.path.isdir(path):
            pattern = os.path.join(path, "**", "*.parquet")
            if not _glob.glob(pattern, recursive=True):
                pattern = os.path.join(path, "**", "*.csv")
                if not _glob.glob(pattern, recursive=True):
                    raise DataError(f"directory {path} holds no .parquet or .csv files")
            probe = pattern
        elif os.path.isfile(path):
            pattern, probe = path, path
        else:
            raise DataError(f"data file not found: {path}")
        lower = probe.lower()
        self.csv = lower.endswith((".csv", ".csv.gz", ".tsv", ".txt"))
        if self.csv:
            self.relation = "read_csv($source, header = true)"
        else:  # DuckDB detects hive partitioning (key=value folders) by itself
            self.relation = "read_parquet($source)"
        self.params: dict[str, object] = {"source": pattern}
        self._checked = False  # the CSV checks of `schema()` ran

    def schema(self, con: duckdb.DuckDBPyConnection,
               numeric: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
        """Column name → DuckDB type name; reading it validates that the data can be opened.

        `numeric`: the columns the model uses as numbers or factors (outcome, predictors).  A
        CSV column among them that DuckDB's type sniffer read as text although most of its
        values are numbers is a numeric column with bad values: it is read as DOUBLE, and
        its first value that is not a number is refused naming the file, line and column
        (rather than making thousands of factor levels of it)."""
        self.attach(con)
        try:
            rows = con.execute(render("describe", source=self.relation), self.params).fetchall()
        except duckdb.Error as exc:
            raise DataError(f"cannot read {self.path}: {first_line(exc)}") from None
        schema = {r[0]: r[1] for r in rows}
        if self.csv and not self._checked:
            self._check_csv(con, schema)
            self._checked = True
        if self.csv and not getattr(self, "_typed", False):  # cast(): the types are given
            text = [c for c in dict.fromkeys(numeric) if schema.get(c) == "VARCHAR"]
            if text:
                self._numeric_text_columns(con, text)
                schema.update({c: "DOUBLE" for c in self.params.get("types", {})})
        return schema

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def attach(self, con: duckdb.DuckDBPyConnection) -> None:
        """Register in-memory data with `con` as the view `relation` names (no-op for files
        and when already attached to `con`).  Read-once streams are read into a temporary
        table here, once: they cannot be attached to a second connection."""
        if self._memory is None or self._attached is con:
            return
        if self._once and self._attached is not None:
            raise InputError(f"{self.path} was already read; it can be read only once")
        try:
            if self._once:
                stream = f"{self._view}_stream"
                con.register(stream, self._memory)
                try:
                    con.execute(f"CREATE TEMP TABLE {quote_ident(self._view)} AS "
                                f"SELECT * FROM {quote_ident(stream)}")
                finally:
                    con.unregister(stream)
            else:
                con.register(self._view, self._memory)
        except duckdb.Error as exc:
            msg = first_line(exc)
            if "already been consumed" in msg:
                raise InputError(f"{self.path} was already read (a stream can be read only "
                                 f"once; pass a table, e.g. reader.read_all())") from None
            raise DataError(f"cannot read {self.path}: {msg}") from None
        self._attached = con

    def files(self) -> list[str]:
        """The files the source reads, sorted (as DuckDB reads a glob)."""
        pattern = str(self.params["source"])
        if os.path.isfile(pattern):
            return [pattern]
        return sorted(_glob.glob(pattern, recursive=True))

    def _check_csv(self, con: duckdb.DuckDBPyConnection, schema: dict[str, str]) -> None:
        """Refuse, naming the file, a CSV source that DuckDB would read as something else: an
        empty file (DuckDB: one column `column0`), rows with more or fewer fields than the
        header (DuckDB's sniffer gives up and reads each line as one text column, or skips
        lines), no data rows at all (header only)."""
        files = self.files()
        single = len(files) == 1
        head = _head_lines(files[0]) if files else None
        if len(schema) == 1:
            blank = [f for f in files if _head_lines(f) == []]
            if blank and (single or blank[0] == files[0]):
                raise DataError(f"{self.path if single else blank[0]}: the file is empty")
            self._check_fields(con, head[0] if head else next(iter(schema)))
        try:
            rows = con.execute(f"SELECT 1 FROM {self.relation} LIMIT 1", self.params).fetchall()
        except duckdb.Error as exc:
            raise self.error(exc) from None
        if rows:
            return
        if not single:
            raise DataError(f"{self.path}: no data rows in any of its {len(files)} CSV files "
                            f"(header only)")
        if head is not None and len(head) > 1:  # lines after the header, none read as rows
            self._check_fields(con, head[0])
            raise DataError(f"{self.path}: no data rows could be read (DuckDB did not "
                            f"recognise the CSV dialect)")
        if getattr(self, "allow_empty", False):  # one part of an input: may hold no rows
            return
        raise DataError(f"{self.path}: no data rows (header only)")

    def _check_fields(self, con: duckdb.DuckDBPyConnection, header: str) -> None:
        """`header` is the first line of the CSV (or the one column DuckDB read): when it
        splits into several fields at a usual delimiter, read the file strictly with that
        dialect; a row with another number of fields than the header is refused with its
        line (DuckDB's sniffer gives up on such a file instead of saying so)."""
        for delim in (",", ";", "\t", "|"):
            fields = next(csv.reader([header], delimiter=delim), [])
            if len(fields) > 1:
                break
        else:
            return
        columns = {f"c{k}": "VARCHAR" for k in range(len(fields))}
        strict = ("read_csv($source, header = true, auto_detect = false, delim = $delim, "
                  "quote = '\"', escape = '\"', columns = $columns)")
        try:
            con.execute(f"SELECT count(*) FROM {strict}",
                        {"source": self.params["source"], "delim": delim,
                         "columns": columns}).fetchall()
        except duckdb.Error as exc:
            if _CSV_FIELDS.search(str(exc)):
                raise self.error(exc) from None

    def _numeric_text_columns(self, con: duckdb.DuckDBPyConnection, text: list[str]) -> None:
        """Read the mostly-numeric ones of the CSV text columns `text` as DOUBLE, and make
        DuckDB convert them now, so that a bad value fails here with its line."""
        counts = ", ".join(f"count({quote_ident(c)}), "
                           f"count(TRY_CAST({quote_ident(c)} AS DOUBLE))" for c in text)
        try:
            row = con.execute(f"SELECT {counts} FROM {self.relation}", self.params).fetchall()[0]
        except duckdb.Error as exc:
            raise self.error(exc) from None
        numeric = [c for k, c in enumerate(text) if 0 < row[2 * k] <= 2 * row[2 * k + 1]]
        if not numeric:
            return
        self.params = {**self.params, "types": {c: "DOUBLE" for c in numeric}}
        self.relation = "read_csv($source, header = true, types = $types)"
        check = ", ".join(f"count({quote_ident(c)})" for c in numeric)
        try:
            con.execute(f"SELECT {check} FROM {self.relation}", self.params).fetchall()[0]
        except duckdb.Error as exc:
            raise self.error(exc) from None

    def cast(self, types: dict[str, str]) -> None:
        """Read `types`' columns as those DuckDB types (one part of an input read with the
        whole input's schema: a file whose own sniffed or stored types differ — a CSV column
        empty there, ids that look numeric in one file — reads as the others)."""
        if not types:
            return
        casts = ", ".join(f"CAST({quote_ident(c)} AS {t}) AS {quote_ident(c)}"
                          for c, t in types.items())
        self.relation = f"(SELECT * REPLACE ({casts}) FROM {self.relation})"
        self._typed = True

    def error(self, exc: BaseException, what: str = "cannot read") -> DataError:
        """A one-line DataError for a DuckDB error raised while reading this source: a CSV
        value that does not convert to its column's type is named with its line."""
        return DataError(read_error(self.path, exc, what))


def _head_lines(path: str, size: int = 1 << 16) -> list[str] | None:
    """The non-blank lines of a (small) file, or of its first `size` bytes (a .gz: once
    decompressed); None when it cannot be read.  Only the first line of a truncated head
    is trusted to be whole; [] is an empty (or all-blank) file."""
    try:
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(size)
    except (OSError, EOFError):
        return None
    return [line for line in head.decode("utf-8", "replace").splitlines() if line.strip()]


_CSV_LINE = re.compile(r"CSV Error on Line: (\d+)")
_CSV_FIELDS = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
_CSV_ORIGINAL = re.compile(r"Original Line: ?(.*)")
_CSV_DELIM = re.compile(r"^\s*delimiter = (.) \(", re.M)
_CSV_FILE = re.compile(r"^\s*file = (.+?)\s*$", re.M)
_CSV_CONVERT = re.compile(r'converting column "((?:[^"]|"")*)"\. Could not convert string '
                          r'"(.*?)" to \'(\w+)\'', re.S)


def read_error(path: str, exc: BaseException, what: str = "cannot read") -> str:
    """The message of a DuckDB error raised while reading `path`: for a CSV conversion
    error `PATH, line N, column 'x': value 'abc' is not a DOUBLE`; otherwise
    `WHAT PATH: <DuckDB's first line>`."""
    text = str(exc)
    line, conv = _CSV_LINE.search(text), _CSV_CONVERT.search(text)
    fields = _CSV_FIELDS.search(text)
    named = _CSV_FILE.search(text)
    if line and named and not os.path.isfile(path):  # a glob or directory: the file at fault
        path = named.group(1)
    if line and fields:  # a row with more or fewer fields than the header
        found = int(fields.group(2))
        original, delim = _CSV_ORIGINAL.search(text), _CSV_DELIM.search(text)
        if original and delim:  # DuckDB stops counting at the first field too many
            found = len(next(csv.reader([original.group(1)], delimiter=delim.group(1)), []))
        return (f"{path}, line {line.group(1)}: {found} fields where the header has "
                f"{fields.group(1)}")
    if line and conv:
        col, value, dtype = conv.group(1), conv.group(2), conv.group(3)
        kind = "a number" if dtype in ("DOUBLE", "FLOAT", "BIGINT", "INTEGER") else dtype
        return (f"{path}, line {line.group(1)}, column {col!r}: value {value!r} is not "
                f"{kind}")
    return f"{what} {path}: {first_line(exc)}"


# ---------------------------------------------------------------------- staged outputs
# Outputs are written under a hidden staging name beside their destination and renamed into
# place.  A killed run (SIGKILL, power loss) cannot remove its staging file; the staging name
# carries the writer's pid, so the next write to the same destination removes the leftovers
# of writers that no longer run.

def staging_prefix(dest: str | os.PathLike[str]) -> str:
    """`.NAME.PID.` — the start of the staging names of this process for `dest`."""
    return f".{Path(dest).name}.{os.getpid()}."


def sweep_stale(dest: str | os.PathLike[str]) -> None:
    """Remove staging files / folders `.NAME.PID.*` of `dest` left by dead processes."""
    import shutil

    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    head = f".{dest.name}."
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(head):
            continue
        pid = name[len(head):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
