"""The `mlpipe` command line.

    mlpipe fit DATA --formula F [--ml] [--out DIR]      fit, print the summary, write outputs
    mlpipe fit --config configs/x.toml                 the same from a config file
    mlpipe fit --stats S.parquet [--ml] [--out DIR]    refit from saved statistics
    mlpipe stats DATA --formula F --out S.parquet      the statistics pass alone
    mlpipe simulate OUT_DIR [--rows N --groups M]      a synthetic Parquet panel
    mlpipe compare A B ... [--out DIR]                 likelihood-ratio tests (lme4's anova)
    mlpipe report RESULT_DIR... --out FILE.html        a self-contained HTML report
    mlpipe predict RESULT_DIR DATA --out F.parquet     predictions (population / conditional;
                                                       F.csv writes CSV)

Exit codes: 0 success, 2 bad input (one line on stderr, nothing half-written), 1 internal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .errors import InputError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for any other bad input
        raise InputError(message)


def _add_duckdb_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-limit", help="DuckDB memory limit, e.g. 4GB (spills beyond it)")
    p.add_argument("--threads", type=int, help="DuckDB worker threads")
    p.add_argument("--temp-directory", help="where DuckDB spills when over the memory limit")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlpipe", description="Multilevel models from sufficient statistics")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="fit a linear mixed model")
    f.add_argument("data", nargs="?", help="Parquet file, directory or glob, or CSV")
    f.add_argument("--formula", "-f", help='lme4 formula, e.g. "y ~ x + (1 | g)"')
    f.add_argument("--config", "-c", help="a TOML config (see configs/)")
    f.add_argument("--stats", help="refit from a statistics file written by `mlpipe stats`")
    f.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    f.add_argument("--out", "-o", help="write result.json, ranef.parquet, config.toml here")
    f.add_argument("--ddf", choices=["satterthwaite", "kenward-roger", "none"],
                   help="denominator df for the fixed-effect tests (default satterthwaite)")
    f.add_argument("--ci", choices=["wald", "profile", "none"],
                   help="confidence intervals for fixed effects and variance components")
    f.add_argument("--level", type=float, help="confidence level (default 0.95)")
    f.add_argument("--residuals", action="store_true",
                   help="one more pass over the data: scaled residuals in the summary, "
                        "residuals_by_group.parquet in --out")
    f.add_argument("--quiet", "-q", action="store_true", help="do not print the summary")
    _add_duckdb_options(f)

    s = sub.add_parser("stats", help="build and save the sufficient statistics")
    s.add_argument("data")
    s.add_argument("--formula", "-f", required=True)
    s.add_argument("--out", "-o", required=True, help="statistics file (.parquet)")
    _add_duckdb_options(s)

    sim = sub.add_parser("simulate", help="write a synthetic partitioned Parquet panel")
    sim.add_argument("out", help="output directory")
    sim.add_argument("--rows", type=int, default=1_000_000)
    sim.add_argument("--groups", type=int, default=10_000)
    sim.add_argument("--partitions", type=int, default=8)
    sim.add_argument("--seed", type=int, default=1)

    from .compare import add_cli as add_compare_cli

    add_compare_cli(sub)

    from .report import add_cli as add_report_cli

    add_report_cli(sub)

    from .predict import add_cli as add_predict_cli

    add_predict_cli(sub)
    return parser


def _resolve_fit(args: argparse.Namespace) -> dict:
    from .config import load_config

    cfg: dict = load_config(args.config) if args.config else {}
    if args.data:
        cfg["data"] = args.data
    if args.formula:
        cfg["formula"] = args.formula
    if args.stats:
        cfg["stats"] = args.stats
    if args.ml:
        cfg["method"] = "ML"
    if args.out:
        cfg["out"] = args.out
    if args.residuals:
        cfg["residuals"] = True
    for key in ("ddf", "ci", "level"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    duck = dict(cfg.get("duckdb", {}))
    for key in ("memory_limit", "threads", "temp_directory"):
        if getattr(args, key) is not None:
            duck[key] = getattr(args, key)
    if duck:
        cfg["duckdb"] = duck
    cfg["method"] = str(cfg.get("method", "REML")).upper()
    if not cfg.get("stats") and not (cfg.get("data") and cfg.get("formula")):
        raise InputError("fit needs DATA and --formula, --stats, or a --config naming them")
    return cfg


def cmd_fit(args: argparse.Namespace) -> int:
    from .model import fit_config

    cfg = _resolve_fit(args)
    if cfg.get("out"):
        from .results import check_out_dir

        check_out_dir(Path(cfg["out"]))  # before the work, not after it
    result = fit_config(cfg)
    if cfg.get("residuals"):
        from .predict import residual_summary

        # a new result with the residuals: a returned fit is never mutated
        result = dataclasses.replace(result, residuals=residual_summary(
            result, **cfg.get("duckdb", {})))
    if not args.quiet:
        print(result.summary())
    if cfg.get("out"):
        # the recorded config names its files by absolute path, so it works from anywhere
        resolved = {k: (os.path.abspath(v) if k in ("data", "stats", "out") and v else v)
                    for k, v in cfg.items()}
        result.write(cfg["out"], config=resolved)
        if not args.quiet:
            files = sorted(p.name for p in Path(cfg["out"]).iterdir() if not p.name.startswith("."))
            print(f"\nwrote {cfg['out']}/: {', '.join(files)}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import compute_statistics

    stats = compute_statistics(args.data, args.formula, memory_limit=args.memory_limit,
                               threads=args.threads, temp_directory=args.temp_directory)
    stats.save(args.out)
    if stats.general:
        what = (f"{stats.m} cells of " + ", ".join(f"{f.name} ({f.m} levels)"
                                                   for f in stats.factors))
    else:
        what = f"{stats.m} groups of {stats.group!r}"
    print(f"wrote statistics for {what} ({stats.n} rows used, {stats.rows_dropped} dropped) "
          f"to {args.out}")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate

    truth = simulate(args.out, rows=args.rows, groups=args.groups,
                     partitions=args.partitions, seed=args.seed)
    print(f"wrote {args.rows} rows in {args.groups} groups to {args.out}; truth: {truth}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import cmd_report as run

    return run(args)


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import cmd_predict as run

    return run(args)


def _check_duckdb_args(args: argparse.Namespace) -> None:
    """--threads and --memory-limit of any command, checked before the work."""
    from .config import check_duckdb_options

    duck = {k: getattr(args, k, None) for k in ("threads", "memory_limit")}
    check_duckdb_options(duck, {"threads": "--threads", "memory_limit": "--memory-limit"})


COMMANDS = {"fit": cmd_fit, "stats": cmd_stats, "simulate": cmd_simulate,
            "compare": cmd_compare, "report": cmd_report, "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_duckdb_args(args)
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"mlpipe: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:  # e.g. `mlpipe fit ... | head`
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:  # an output path that cannot be written, a missing input file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mlpipe: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("mlpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if os.environ.get("MLPIPE_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"mlpipe: internal error: {type(exc).__name__}: {msg} "
              f"(set MLPIPE_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
