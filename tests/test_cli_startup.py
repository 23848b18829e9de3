"""The CLI's surface: a fast start (no heavy import for --help), --version, --reml/--ml, and
help text with defaults for every option of every command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import mlpipe
from mlpipe.cli import COMMAND_HELP, build_parser, main

HEAVY = ("numpy", "polars", "scipy", "duckdb", "pyarrow", "numba", "matplotlib")


def _modules_after(argv: list[str]) -> tuple[int, str, set[str]]:
    """Run the CLI in a fresh interpreter; its exit code, stdout and the imported modules."""
    code = ("import sys, json\nfrom mlpipe.cli import main\nrc = 0\n"
            f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\nsys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    modules = set(json.loads(out.stderr.strip().splitlines()[-1]))
    return out.returncode, out.stdout, modules


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["stats", "--help"],
                                  ["simulate", "--help"], ["compare", "--help"],
                                  ["report", "--help"], ["predict", "--help"], ["anova", "--help"],
                                  ["--version"]])
def test_help_imports_no_heavy_library(argv):
    rc, out, modules = _modules_after(argv)
    assert rc == 0 and out.strip()
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"`mlpipe {' '.join(argv)}` imported {heavy[:5]}"


def test_console_script_help_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "mlpipe.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for name in COMMAND_HELP:
        assert name in out.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlpipe {mlpipe.__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help_text():
    subs = _subparsers(build_parser())
    assert set(subs) == set(COMMAND_HELP)
    missing = [f"{name} {a.dest}" for name, p in subs.items() for a in p._actions
               if not (a.help and a.help.strip())]
    assert not missing, f"options without help text: {missing}"


def test_defaults_are_shown():
    subs = _subparsers(build_parser())
    flat = {k: " ".join(p.format_help().split()) for k, p in subs.items()}
    sim = flat["simulate"]
    assert "(default: 1000000)" in sim and "(default: 10000)" in sim
    rep = flat["report"]
    assert "(default: report.html)" in rep and "(default: 5000)" in rep
    fit = flat["fit"]
    assert "(default: satterthwaite)" in fit and "(default: 0.95)" in fit


def test_top_level_help_lists_commands_without_registering_their_options():
    subs = _subparsers(build_parser(set()))
    assert set(subs) == set(COMMAND_HELP)
    assert all(len(p._actions) == 1 for p in subs.values())  # just -h


def test_reml_and_ml_flags(tmp_path, capsys):
    data = str(mlpipe.__path__[0] + "/../tests/data/sleepstudy.parquet")
    f = "Reaction ~ Days + (Days | Subject)"
    for flag, method in (("--reml", "REML"), ("--ml", "ML"), (None, "REML")):
        out = tmp_path / (flag or "default").strip("-")
        argv = ["fit", data, "-f", f, "-q", "--ddf", "none", "--out", str(out)]
        assert main(argv + ([flag] if flag else [])) == 0
        assert json.loads((out / "result.json").read_text())["method"] == method
    assert main(["fit", data, "-f", f, "--reml", "--ml"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_one_factor_fit_does_not_load_the_several_factor_solver(tmp_path):
    """A one-factor fit below `objective.FUSED_MIN_LEVELS` groups never imports numba,
    qdldl's users or the blocked solver (their import is ~0.2-0.5 s of a small fit); a fit
    with two factors does."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    one = ["fit", str(data / "sleepstudy.parquet"), "--formula",
           "Reaction ~ Days + (Days | Subject)", "--out", str(tmp_path / "a"), "-q"]
    rc, _out, modules = _modules_after(one)
    assert rc == 0
    assert not {"numba", "mlpipe.blocked", "mlpipe._schur", "mlpipe._levels_jit"} & modules
    two = ["fit", str(data / "pastes.parquet"), "--formula", "strength ~ 1 + (1 | batch/cask)",
           "--out", str(tmp_path / "b"), "-q"]
    rc, _out, modules = _modules_after(two)
    assert rc == 0 and {"numba", "mlpipe.blocked"} <= modules
