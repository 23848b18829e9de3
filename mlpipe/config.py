"""Run configuration: TOML files in `configs/`, overridden by command-line options.

A config names the data, the formula and the options of one fit:

    data = "data/hsb82.parquet"
    formula = "mAch ~ meanses*cses + sector*cses + (cses | school)"
    method = "REML"
    out = "out/hsb_full"

    engine = "duckdb"          # or "polars", "dask"

    [duckdb]
    memory_limit = "4GB"
    threads = 2

    [dask]                     # --engine dask only
    workers = 2                # a LocalCluster of 2 worker processes, or
    # scheduler = "tcp://scheduler:8786"   a running cluster
    # keep_on_workers = true   one grouping factor: the groups stay on the workers

Relative paths are taken from the current directory, like paths given on the command line.
Every run writes the resolved config (`config.toml`) next to its outputs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import InputError

KEYS = {"data", "formula", "method", "out", "stats", "name", "ddf", "ci", "level", "residuals",
        "weights", "correlation", "residual_variance_by", "family", "link", "nagq",
        "duckdb", "engine", "dask", "refine"}
DASK_KEYS = {"workers": int, "scheduler": str, "keep_on_workers": bool}
DUCKDB_KEYS = {"memory_limit", "threads", "temp_directory"}
TYPES = {"data": str, "formula": str, "method": str, "out": str, "stats": str, "name": str,
         "ddf": str, "ci": str, "level": (int, float), "residuals": bool, "weights": str,
         "correlation": str, "residual_variance_by": str, "family": str, "link": str,
         "nagq": int, "engine": str, "refine": str}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false",
              (int, float): "a number"}


def load_config(path: str | Path) -> dict:
    p = Path(path)
    try:
        cfg = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config {path} is not valid TOML: {exc}") from None
    unknown = set(cfg) - KEYS
    if unknown:
        raise InputError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(KEYS))})")
    duck = cfg.get("duckdb", {})
    if not isinstance(duck, dict) or set(duck) - DUCKDB_KEYS:
        raise InputError(f"config {path}: [duckdb] takes only {', '.join(sorted(DUCKDB_KEYS))}")
    for key, value in cfg.items():
        want = TYPES.get(key)
        if want and not (isinstance(value, want) and not (want is not bool and
                                                           isinstance(value, bool))):
            raise InputError(f"config {path}: {key} must be {TYPE_NAMES[want]}, "
                             f"not {value!r}")
    for key, value in duck.items():
        want = int if key == "threads" else str
        if not isinstance(value, want) or isinstance(value, bool):
            raise InputError(f"config {path}: [duckdb] {key} must be {TYPE_NAMES[want]}, "
                             f"not {value!r}")
    check_duckdb_options(duck, {k: f"config {path}: [duckdb] {k}" for k in DUCKDB_KEYS})
    dask = cfg.get("dask", {})
    if not isinstance(dask, dict) or set(dask) - set(DASK_KEYS):
        raise InputError(f"config {path}: [dask] takes only {', '.join(sorted(DASK_KEYS))}")
    for key, want in DASK_KEYS.items():
        if key in dask and (not isinstance(dask[key], want)
                            or (want is not bool and isinstance(dask[key], bool))):
            raise InputError(f"config {path}: [dask] {key} must be {TYPE_NAMES[want]}, "
                             f"not {dask[key]!r}")
    cfg.setdefault("name", p.stem)
    return cfg


def add_duckdb_options(p) -> None:
    """The DuckDB resource options of every command that reads data (an argparse parser)."""
    p.add_argument("--memory-limit", help="DuckDB memory limit, e.g. 4GB (spills beyond it; "
                                          "default: DuckDB's, 80%% of RAM)")
    p.add_argument("--threads", type=int, help="DuckDB worker threads (default: all cores)")
    p.add_argument("--temp-directory", help="where DuckDB spills when over the memory limit "
                                            "(default: DuckDB's)")


def add_engine_options(p) -> None:
    """--engine and the Dask engine's --workers / --scheduler (mlpipe/engines)."""
    p.add_argument("--engine", choices=["duckdb", "polars", "dask"],
                   help="what builds the statistics: embedded DuckDB (default), Polars' "
                        "lazy API, or DuckDB on every input file as a Dask task")
    p.add_argument("--workers", type=int, metavar="N",
                   help="--engine dask: worker processes of the LocalCluster started for "
                        "the pass (default: one per CPU)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="--engine dask: use the running cluster at ADDRESS "
                        "(tcp://host:8786) instead of a LocalCluster")


def add_weights_option(p) -> None:
    """--weights COL (case weights) of the commands that build statistics."""
    p.add_argument("--weights", "-w", metavar="COL",
                   help="column of case weights (lme4's weights =: Var(e_i) = sigma^2 / w_i; "
                        "rows with a null weight are dropped)")


def add_log_option(p) -> None:
    """--log-json FILE: one JSON line per stage (mlpipe/runlog.py)."""
    p.add_argument("--log-json", metavar="FILE",
                   help="append one JSON line per stage (stage, seconds, rows, cells, groups, "
                        "peak memory) to FILE, for the scheduler running the job")


def add_residual_options(p) -> None:
    """--correlation and --residual-variance-by (the residual structure, mlpipe/residual.py)
    of the commands that build statistics."""
    p.add_argument("--correlation", metavar="SPEC",
                   help='serially correlated residuals within a series: "ar1(TIME | GROUP)" '
                        "(consecutive rows by TIME at lag 1, nlme's corAR1) or "
                        '"car1(TIME | GROUP)" (correlation phi^|dt|, nlme\'s corCAR1); '
                        "GROUP may be a:b (default: independent residuals)")
    p.add_argument("--residual-variance-by", metavar="COL",
                   help="a residual SD per level of COL, relative to the first level "
                        "(nlme's varIdent(~ 1 | COL); default: one residual variance)")


def check_duckdb_options(duck: dict, labels: dict[str, str]) -> None:
    """Refuse a thread count below 1 and a memory limit DuckDB cannot read, naming the
    option as `labels` spells it (before any work: DuckDB would otherwise take 0 threads as
    its default, or fail later with a message that does not name the option)."""
    threads = duck.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InputError(f"{labels['threads']} must be a positive integer, not {threads!r}")
    limit = duck.get("memory_limit")
    if limit is not None:
        import duckdb

        try:
            duckdb.connect(":memory:", config={"memory_limit": str(limit)}).close()
        except duckdb.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(f"{labels['memory_limit']} {limit!r} is not a memory size such as "
                             f"4GB or 512MB ({reason})") from None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dump_toml(cfg: dict) -> str:
    """A small TOML writer for flat configs with one level of tables."""
    lines, tables = [], []
    for k, v in cfg.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
