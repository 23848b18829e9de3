"""SQL plumbing: the template files in `sql/`, identifier quoting, the data source.

Identifiers are only ever quoted by `quote_ident`; values (paths, factor levels) are always
bound parameters (`$name`).  Templates are plain `.sql` files with `{placeholders}` that are
filled with quoted identifiers or compiled expressions, never with user-supplied values.
"""

from __future__ import annotations

import functools
import glob as _glob
import os
from pathlib import Path

import duckdb

from .errors import DataError

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
            temp_directory: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the resource options applied."""
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
    return con


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Source:
    """A readable data source: a Parquet file, a directory of Parquet files, a glob, or CSV.

    `relation` is the SQL table expression (with a bound `$source` parameter) and `params`
    holds the value to bind.
    """

    def __init__(self, data: str | os.PathLike[str]):
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
        if lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
            self.relation = "read_csv($source, header = true)"
        else:  # DuckDB detects hive partitioning (key=value folders) by itself
            self.relation = "read_parquet($source)"
        self.params = {"source": pattern}

    def schema(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """Column name → DuckDB type name; reading it validates that the data can be opened."""
        try:
            rows = con.execute(render("describe", source=self.relation), self.params).fetchall()
        except duckdb.Error as exc:
            raise DataError(f"cannot read {self.path}: {first_line(exc)}") from None
        return {r[0]: r[1] for r in rows}
