"""`mlpipe predict`'s options, registered without importing mlpipe/predict.py (DuckDB,
polars, pyarrow: ~0.5 s), so that `mlpipe predict --help` starts fast; the command itself
runs `predict.cmd_predict`."""

from __future__ import annotations

import argparse

from .config import add_duckdb_options


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `mlpipe predict RESULT_DIR DATA --out FILE.parquet [--population]`."""
    p = subparsers.add_parser(
        "predict", help="predictions (and residuals) of a fitted model for new data",
        description="Predict from a result directory written by `mlpipe fit --out DIR`: "
                    "conditional (X·β + Z·b; unseen groups fall back to X·β) or population "
                    "(X·β) predictions for every row of DATA, written to a Parquet (.parquet) "
                    "or CSV (.csv) file.")
    p.add_argument("result_dir", help="the --out DIR of `mlpipe fit` (result.json, "
                                      "ranef.parquet)")
    p.add_argument("data", help="Parquet file, directory or glob, or CSV")
    p.add_argument("--out", "-o", required=True,
                   help="the output file: .parquet (Parquet) or .csv (CSV)")
    p.add_argument("--population", action="store_true",
                   help="population-level predictions X·β (ignore the random effects)")
    p.add_argument("--any-order", action="store_true",
                   help="do not restore input row order (saves a sort on large data)")
    p.add_argument("--engine", choices=["duckdb", "polars"],
                   help="what reads DATA and computes the predictions (default: duckdb)")
    add_duckdb_options(p)
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from .predict import cmd_predict

    return cmd_predict(args)
