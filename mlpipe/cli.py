"""The `mlpipe` command line.

    mlpipe fit DATA --formula F [--ml] [--out DIR]      fit, print the summary, write outputs
                                                       (--reml, the default, or --ml)
    mlpipe fit --config configs/x.toml                 the same from a config file
    mlpipe fit --stats S.parquet [--ml] [--out DIR]    refit from saved statistics
    mlpipe stats DATA --formula F --out S.parquet      the statistics pass alone
    mlpipe simulate OUT_DIR [--rows N --groups M]      a synthetic Parquet panel
    mlpipe compare A B ... [--out DIR]                 likelihood-ratio tests (lme4's anova)
    mlpipe anova RESULT_DIR [--type N] [--ddf M]       F tests per fixed term (lmerTest's anova)
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
import time
from pathlib import Path

from .config import (add_duckdb_options, add_engine_options, add_log_option,
                     add_residual_options,
                     add_weights_option)
from . import runlog
from .errors import InputError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has one (not for flags or options that default to
    the config's value) and keeps the descriptions' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n".join(super(_HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2, as for any other bad input
        raise InputError(message)


def _add_fit(sub) -> None:
    f = sub.add_parser("fit", help=COMMAND_HELP["fit"],
                       description="Fit a linear mixed model (lme4 formula) from DATA, a config "
                                   "or saved statistics; print the summary (lme4's layout) and "
                                   "write result.json, ranef.parquet, config.toml to --out.")
    f.add_argument("data", nargs="?", help="Parquet file, directory or glob, or CSV")
    f.add_argument("--formula", "-f", help='lme4 formula, e.g. "y ~ x + (1 | g)"')
    f.add_argument("--config", "-c", help="a TOML config (see configs/); options given here "
                                          "override it")
    f.add_argument("--stats", help="refit from a statistics file written by `mlpipe stats`")
    add_weights_option(f)
    add_residual_options(f)
    f.add_argument("--family", choices=["gaussian", "binomial", "poisson",
                                        "negative_binomial", "gamma", "ordinal"],
                   help="a generalized linear mixed model (Laplace approximation, one "
                        "grouping factor): binomial (0/1 or cbind(successes, failures)) or "
                        "poisson (with offset(log(exposure))), negative_binomial (theta "
                        "estimated, as glmer.nb), gamma (log link, dispersion by ML) or "
                        "ordinal (cumulative logit/probit, ordinal::clmm) "
                        "(default: gaussian, an LMM)")
    f.add_argument("--link", choices=["logit", "probit", "cloglog", "log", "inverse"],
                   help="the link of --family (default: logit for binomial and ordinal, log "
                        "for poisson, negative_binomial and gamma; inverse: gamma only)")
    f.add_argument("--nagq", type=int,
                   help="with --family: adaptive Gauss-Hermite quadrature points for a "
                        "single scalar random effect, as glmer's nAGQ (default: 1, Laplace; "
                        "0: the fast mode, theta by Laplace with beta inside PIRLS)")
    method = f.add_mutually_exclusive_group()
    method.add_argument("--reml", dest="method", action="store_const", const="REML",
                        help="restricted maximum likelihood (the default, as lme4's lmer)")
    method.add_argument("--ml", dest="method", action="store_const", const="ML",
                        help="maximum likelihood instead of REML (lmer's REML = FALSE)")
    method.add_argument("--moments", dest="method", action="store_const", const="moments",
                        help="random intercepts by the method of moments and fixed effects by "
                             "GLS at them, for crossed designs too large for the exact solver "
                             "(no likelihood); also taken automatically, with the reason "
                             "printed, when the exact solver's memory estimate exceeds the "
                             "limit")
    method.add_argument("--method", dest="method", type=str.upper,
                        choices=["REML", "ML", "MOMENTS"],
                        help="the same choice spelt as one option: reml, ml or moments")
    f.add_argument("--refine", choices=["reml", "ml", "none"],
                   help="a fit by the method of moments: refine its variance components to "
                        "approximate REML / ML by stochastic EM (default: none with "
                        "--moments; toward the requested method when the fit switched to "
                        "moments because the exact solver does not fit)")
    f.add_argument("--out", "-o", help="write result.json, ranef.parquet, config.toml here")
    f.add_argument("--ddf", choices=["satterthwaite", "kenward-roger", "none"],
                   help="denominator df for the fixed-effect tests (default: satterthwaite)")
    f.add_argument("--ci", choices=["wald", "profile", "none"],
                   help="confidence intervals for fixed effects and variance components "
                        "(default: none)")
    f.add_argument("--level", type=float, help="confidence level (default: 0.95)")
    f.add_argument("--residuals", action="store_true",
                   help="one more pass over the data: scaled residuals in the summary, "
                        "residuals_by_group.parquet in --out")
    f.add_argument("--correlation-of-fixed", action="store_true",
                   help="print lme4's \"Correlation of Fixed Effects\" in the summary")
    f.add_argument("--quiet", "-q", action="store_true", help="do not print the summary")
    add_log_option(f)
    add_duckdb_options(f)
    add_engine_options(f)
    f.add_argument("--keep-on-workers", action="store_true", default=None,
                   help="--engine dask, one grouping factor: keep the per-group statistics "
                        "on the workers; each evaluation of the criterion maps over them "
                        "(the client holds no per-group arrays)")


def _add_stats(sub) -> None:
    s = sub.add_parser("stats", help=COMMAND_HELP["stats"],
                       description="One pass over DATA builds the per-group sufficient "
                                   "statistics of a formula and saves them; `mlpipe fit "
                                   "--stats FILE` refits from them without rereading DATA.")
    s.add_argument("data", nargs="?", help="Parquet file, directory or glob, or CSV (default: "
                                           "the --config's data)")
    s.add_argument("--formula", "-f",
                   help='lme4 formula, e.g. "y ~ x + (1 | g)" (with --append-to: the store\'s)')
    s.add_argument("--config", "-c", help="take data, formula, weights, residual structure "
                                          "and [duckdb] options from a TOML config; options "
                                          "given here override it")
    s.add_argument("--out", "-o", help="statistics file (a store) to write (.parquet); it "
                                       "records DATA's files for later appends")
    s.add_argument("--append-to", metavar="STORE",
                   help="merge DATA's statistics into this store (written by --out): a "
                        "file the store already holds is refused, the store is replaced "
                        "atomically")
    add_weights_option(s)
    add_residual_options(s)
    add_log_option(s)
    add_duckdb_options(s)
    add_engine_options(s)


def _add_simulate(sub) -> None:
    sim = sub.add_parser("simulate", help=COMMAND_HELP["simulate"],
                         description="Write a synthetic two-level panel with known parameters "
                                     "(y ~ x * w + (x | g)) as partitioned Parquet, plus "
                                     "truth.json.")
    sim.add_argument("out", help="output directory (part-*.parquet, truth.json)")
    sim.add_argument("--rows", type=int, default=1_000_000, help="number of rows")
    sim.add_argument("--groups", type=int, default=10_000,
                     help="number of groups (at least 2, at least 2 rows each)")
    sim.add_argument("--partitions", type=int, default=8,
                     help="Parquet files to split the groups over")
    sim.add_argument("--seed", type=int, default=1, help="random seed")


def _add_compare(sub) -> None:
    from .compare import add_cli

    add_cli(sub)


def _add_anova(sub) -> None:
    from .anova import add_cli

    add_cli(sub)


def _add_report(sub) -> None:
    from .report import add_cli

    add_cli(sub)


def _add_predict(sub) -> None:
    from .predict_cli import add_cli

    add_cli(sub)


#: one line per command for `mlpipe --help`, which registers no command's options (so it
#: imports none of their modules)
COMMAND_HELP = {
    "fit": "fit a linear mixed model",
    "stats": "build and save the sufficient statistics",
    "simulate": "write a synthetic partitioned Parquet panel",
    "compare": "likelihood-ratio tests between nested models (lme4's anova)",
    "anova": "F tests for the fixed-effect terms (lmerTest's anova)",
    "report": "a self-contained HTML report of fitted models",
    "predict": "predictions (and residuals) of a fitted model for new data",
}
_REGISTER = {"fit": _add_fit, "stats": _add_stats, "simulate": _add_simulate,
             "compare": _add_compare, "anova": _add_anova, "report": _add_report,
             "predict": _add_predict}


def build_parser(commands: set[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. `commands`: the subcommands whose options are registered (None: all);
    the others are listed by name and one-line help only, so that `mlpipe --help` and
    `mlpipe fit ...` import nothing the other commands need."""
    from . import __version__

    parser = _Parser(prog="mlpipe", description="Multilevel models from sufficient statistics",
                     epilog="`mlpipe COMMAND --help` shows a command's options. Exit codes: "
                            "0 success, 2 bad input, 1 internal error.")
    parser.add_argument("--version", action="version", version=f"mlpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")
    for name, register in _REGISTER.items():
        if commands is None or name in commands:
            register(sub)
        else:
            sub.add_parser(name, help=COMMAND_HELP[name])
    return parser


def _command_of(argv: list[str]) -> set[str]:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return {word} if word in _REGISTER else set()
    return set()


def _resolve_fit(args: argparse.Namespace) -> dict:
    from .config import load_config

    cfg: dict = load_config(args.config) if args.config else {}
    if args.data and args.stats:
        raise InputError("give DATA or saved statistics, not both")
    if args.data:
        cfg["data"] = args.data
    if args.formula:
        cfg["formula"] = args.formula
    if args.stats:  # saved statistics are fitted instead of the config's data (which the
        cfg["stats"] = args.stats  # report may still read); the model is checked
    if args.weights:
        cfg["weights"] = args.weights
    if args.correlation:
        cfg["correlation"] = args.correlation
    if args.residual_variance_by:
        cfg["residual_variance_by"] = args.residual_variance_by
    for key in ("family", "link", "nagq", "refine"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.method:
        cfg["method"] = args.method
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
    if args.engine:
        cfg["engine"] = args.engine
    dask = dict(cfg.get("dask", {}))
    for key in ("workers", "scheduler", "keep_on_workers"):
        if getattr(args, key, None) is not None:
            dask[key] = getattr(args, key)
    if dask:
        cfg["dask"] = dask
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

        t0 = time.perf_counter()
        # a new result with the residuals: a returned fit is never mutated
        from .engines import EngineOptions

        result = dataclasses.replace(result, residuals=residual_summary(
            result, options=EngineOptions.from_config(cfg)))
        runlog.stage("residuals", time.perf_counter() - t0)
    if not args.quiet:
        print(result.summary(correlation=args.correlation_of_fixed))
    if cfg.get("out"):
        # the recorded config names its files by absolute path, so it works from anywhere
        resolved = {k: (os.path.abspath(v) if k in ("data", "stats", "out") and v else v)
                    for k, v in cfg.items()}
        t0 = time.perf_counter()
        result.write(cfg["out"], config=resolved)
        runlog.stage("write", time.perf_counter() - t0, out=os.path.abspath(cfg["out"]))
        if not args.quiet:
            files = sorted(p.name for p in Path(cfg["out"]).iterdir() if not p.name.startswith("."))
            print(f"\nwrote {cfg['out']}/: {', '.join(files)}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from . import store

    if args.config:
        from .config import load_config

        cfg = load_config(args.config)
        for key in ("data", "formula", "weights", "correlation", "residual_variance_by"):
            if getattr(args, key) is None and cfg.get(key) is not None:
                setattr(args, key, cfg[key])
        for key, value in {**(cfg.get("duckdb") or {}), **(cfg.get("dask") or {}),
                           "engine": cfg.get("engine")}.items():
            if key != "keep_on_workers" and getattr(args, key) is None:  # a fit's option
                setattr(args, key, value)
    if not args.data:
        raise InputError("mlpipe stats needs DATA (or a --config naming it)")
    from .engines import EngineOptions, get_engine

    engine = get_engine(args.engine, EngineOptions(
        memory_limit=args.memory_limit, threads=args.threads,
        temp_directory=args.temp_directory, workers=args.workers, scheduler=args.scheduler))
    if args.append_to:
        if args.out:
            raise InputError("give --out (a new store) or --append-to (an existing one), "
                             "not both")
        if args.weights or args.correlation or args.residual_variance_by:
            raise InputError("--append-to takes the store's model: no --weights, "
                             "--correlation or --residual-variance-by")
        stats = store.append(args.data, args.append_to, formula=args.formula, engine=engine)
        target = args.append_to
    else:
        if not args.formula or not args.out:
            raise InputError("mlpipe stats needs --formula and --out (or --append-to STORE)")
        stats = store.create(args.data, args.formula, args.out, weights=args.weights,
                             correlation=args.correlation,
                             residual_variance_by=args.residual_variance_by, engine=engine)
        target = args.out
    runlog.stage("write", None, out=os.path.abspath(target), inputs=len(stats.inputs))
    if stats.general:
        what = (f"{stats.m} cells of " + ", ".join(f"{f.name} ({f.m} levels)"
                                                   for f in stats.factors))
    else:
        what = f"{stats.m} groups of {stats.group!r}"
    print(f"wrote statistics for {what} ({stats.n} rows used, {stats.rows_dropped} dropped; "
          f"{len(stats.inputs)} input files) to {target}")
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


def cmd_anova(args: argparse.Namespace) -> int:
    from .anova import cmd_anova as run

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
            "compare": cmd_compare, "anova": cmd_anova, "report": cmd_report,
            "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(_command_of(argv)).parse_args(argv)
        _check_duckdb_args(args)
        from . import progress

        progress.enable()  # progress lines on a terminal only (mlpipe/progress.py)
        log = getattr(args, "log_json", None)
        if log is None:
            return COMMANDS[args.command](args)
        from .runlog import logging_to

        with logging_to(log):
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
