"""A catalogue of bad (and odd-but-valid) input for every command, run through the real CLI.

Every "bad" case must keep the contract of README "Outputs (the CLI contract)": exit code 2,
exactly one line on stderr (`mlpipe: error: ...`) naming the problem (and the file or column
where there is one), no traceback, nothing written to --out.  Every "ok" case (odd column
names, quoted paths, new levels at predict) must succeed.

Speed: a fresh `python -m mlpipe.cli` spends ~1.2 s importing, so the cases run in one
driver subprocess that imports `mlpipe` and `mlpipe.cli` (what `python -m mlpipe.cli` has
imported when it calls `main()`) and then forks one child process per case; the child's
fds 1 and 2 go to files and its exit status is main()'s return value, as `sys.exit(main())`
makes it.  MLPIPE_CATALOGUE_SUBPROCESS=1 runs each case in its own `python -m mlpipe.cli`
instead (slow, same assertions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlpipe.cli import main

F1 = "y ~ x + (1 | g)"  # one grouping factor
F2 = "y ~ x + (1 | g) + (1 | h)"  # two crossed factors
FN = "y ~ x + (1 | g/h)"  # nested


@dataclass
class Case:
    id: str
    argv: list[str]  # "{T}" is replaced by the inputs directory, "{OUT}" by this case's --out
    needles: tuple[str, ...] = ()  # for bad input: strings the one stderr line must hold
    ok: bool = False  # odd but valid input: must succeed
    out: str = "res"  # the --out name inside this case's own directory
    check: object = None  # for ok cases: check(out_path) -> None
    forbid: tuple[str, ...] = ()  # for bad input: strings the line must not hold (false claims)


# ---------------------------------------------------------------------- the input files

def _good(n=120, seed=0, g_levels=8, h_levels=4):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, g_levels, n)
    h = rng.integers(0, h_levels, n)
    x = rng.normal(size=n)
    y = 2 + x + rng.normal(size=g_levels)[g] + 0.5 * rng.normal(size=h_levels)[h] \
        + rng.normal(size=n)
    return {"y": y, "x": x, "g": np.array([f"g{v}" for v in g]), "h": h}


def _pq(path: Path, cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(cols if isinstance(cols, pa.Table) else pa.table(cols), path)
    return path


def _make_inputs(t: Path) -> None:
    good = _good()
    _pq(t / "good.parquet", good)
    pl.DataFrame(good).write_csv(t / "good.csv")
    (t / "empty.csv").write_bytes(b"")
    (t / "header.csv").write_text("y,x,g,h\n")
    _pq(t / "empty.parquet", pa.table(good).slice(0, 0))
    lines = (t / "good.csv").read_text().splitlines()
    lines[50] += ",1.5,extra"  # a row with two fields too many
    (t / "extra_fields.csv").write_text("\n".join(lines) + "\n")
    lines = (t / "good.csv").read_text().splitlines()
    lines[30] = ",".join(lines[30].split(",")[:3])  # a row with a field too few
    (t / "fewer_fields.csv").write_text("\n".join(lines) + "\n")
    lines = (t / "good.csv").read_text().splitlines()
    lines[60] = '1.0,"2.0,g1,3'  # an unterminated quote
    (t / "open_quote.csv").write_text("\n".join(lines) + "\n")
    # a directory of files of different schemas: a column renamed, a column retyped
    half = pa.table(_good(seed=1))
    _pq(t / "renamed" / "a.parquet", half)
    _pq(t / "renamed" / "b.parquet", half.rename_columns(["y", "z", "g", "h"]))
    _pq(t / "retyped" / "a.parquet", half)
    _pq(t / "retyped" / "b.parquet", half.set_column(
        1, "x", pa.array([f"v{i}" for i in range(half.num_rows)])))
    # a truncated Parquet file among good ones
    _pq(t / "trunc" / "a.parquet", half)
    _pq(t / "trunc" / "b.parquet", pa.table(_good(seed=2)))
    data = (t / "trunc" / "b.parquet").read_bytes()
    (t / "trunc" / "b.parquet").write_bytes(data[: len(data) // 2])
    _pq(t / "trunc_one" / "c.parquet", pa.table(_good(seed=3)))
    data = (t / "trunc_one" / "c.parquet").read_bytes()
    (t / "trunc_one" / "c.parquet").write_bytes(data[: len(data) - 20])
    # column names that need quoting: spaces, quotes, unicode, SQL keywords
    odd = {"my y": good["y"], "größe": good["x"], "select": np.sin(good["x"]),
           "grp 1": good["g"], "from": good["h"], 'q"uote': good["x"] * 2 + 1}
    _pq(t / "odd.parquet", odd)
    pl.DataFrame(odd).write_csv(t / "odd.csv")
    # a path with quotes
    _pq(t / "it's a \"quoted\" dir" / "d.parquet", good)
    # outcomes at the ends of the double range, all-missing columns, a one-level factor
    n = 120
    _pq(t / "huge.parquet", {**good, "y": good["y"] * 1e300})
    _pq(t / "tiny.parquet", {**good, "y": good["y"] * 1e-300})
    _pq(t / "huge_x.parquet", {**good, "x": good["x"] * 1e200})
    _pq(t / "const.parquet", {**good, "y": np.full(n, 4.5)})
    _pq(t / "null_x.parquet", pa.table({**good, "x": pa.nulls(n, pa.float64())}))
    _pq(t / "null_y.parquet", pa.table({**good, "y": pa.nulls(n, pa.float64())}))
    _pq(t / "null_type.parquet", pa.table({**good, "x": pa.nulls(n)}))
    _pq(t / "null_g.parquet", pa.table({**good, "g": pa.nulls(n, pa.string())}))
    csv = (t / "good.csv").read_text().splitlines()
    (t / "null_x.csv").write_text("\n".join([csv[0]] + [",".join(
        ["" if k == 1 else v for k, v in enumerate(r.split(","))]) for r in csv[1:]]) + "\n")
    _pq(t / "one_level_h.parquet", {**good, "h": np.zeros(n, dtype=np.int64)})
    _pq(t / "one_level_g.parquet", {**good, "g": np.array(["only"] * n)})
    # new data for predict: new levels of g and h beside known ones, a missing column
    new = _good(n=20, seed=9)
    new["g"] = new["g"].astype(object)
    new["g"][:5] = "g_new"
    new["h"][5:10] = 99
    _pq(t / "new_levels.parquet", new)
    _pq(t / "no_x.parquet", {k: v for k, v in new.items() if k != "x"})
    # configs
    gp = t / "good.parquet"
    (t / "unknown_key.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\nformla = "x"\n')
    (t / "duck_key.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\n[duckdb]\nthread = 2\n')
    (t / "method.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\nmethod = "MLE"\n')
    (t / "ddf.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\nddf = "satterwaite"\n')
    (t / "ci.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\nci = "exact"\n')
    (t / "level.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\nlevel = 95\n')
    (t / "threads.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\n[duckdb]\nthreads = -4\n')
    (t / "memory.toml").write_text(f'data = "{gp}"\nformula = "{F1}"\n'
                                   '[duckdb]\nmemory_limit = "lots"\n')
    (t / "bad.toml").write_text('data = "unterminated\n')
    (t / "no_formula.toml").write_text(f'data = "{gp}"\n')
    # result directories for predict, compare and report
    for name, formula in (("r1", F1), ("r2", F2), ("r0", "y ~ 1 + (1 | g)")):
        assert main(["fit", str(gp), "-f", formula, "--out", str(t / name), "-q"]) == 0
    shutil.copytree(t / "r1", t / "r_corrupt")
    (t / "r_corrupt" / "result.json").write_text('{"formula": "y ~ x')
    shutil.copytree(t / "r1", t / "r_no_json")
    (t / "r_no_json" / "result.json").unlink()
    shutil.copytree(t / "r1", t / "r_no_ranef")
    (t / "r_no_ranef" / "ranef.parquet").unlink()
    shutil.copytree(t / "r1", t / "r_bad_ranef")
    (t / "r_bad_ranef" / "ranef.parquet").write_bytes(b"PAR1 nonsense PAR1")
    (t / "a_file").write_text("not a directory")


# ---------------------------------------------------------------------- ok-case checks

def _fit_ok(terms):
    def check(out: Path):
        res = json.loads((out / "result.json").read_text())
        assert [fe["term"] for fe in res["fixed_effects"]] == terms
        assert res["nobs"] == 120 and res["converged"]
    return check


def _predict_new_levels(factor_rows):
    """Rows new to every factor get the population prediction; known rows do not."""
    def check(out: Path):
        got = pl.read_parquet(out)
        assert got.height == 20
        new_all = got.filter(pl.col("g") == "g_new") if factor_rows == "g" else got.filter(
            (pl.col("g") == "g_new") | (pl.col("h") == 99))
        if factor_rows == "g":
            np.testing.assert_allclose(new_all["fitted"], new_all["fitted_population"],
                                       rtol=1e-12)
        else:  # a row new to one factor keeps the other factor's effect
            assert new_all.height == 10
            assert (new_all["fitted"] != new_all["fitted_population"]).all()
        known = got.filter((pl.col("g") != "g_new") & (pl.col("h") != 99))
        assert known.height == 10
        assert (known["fitted"] != known["fitted_population"]).all()
        assert got["fitted"].null_count() == 0
    return check


def _exists(out: Path):
    assert out.exists() and out.stat().st_size > 0


# ---------------------------------------------------------------------- the catalogue

G = "{T}/good.parquet"
R1, R2 = "{T}/r1", "{T}/r2"
QDIR = "{T}/it's a \"quoted\" dir"
EMPTY = "empty.csv: the file is empty"
HEADER = "header.csv: no data rows (header only)"
EXTRA = "extra_fields.csv, line 51: 6 fields where the header has 4"  # lines[50]: line 51
HUGE = ("values too large", "squares overflow double precision", "'y'")

CASES = [
    # --- empty files
    Case("fit-empty-csv-1f", ["fit", "{T}/empty.csv", "-f", F1], (EMPTY,)),
    Case("fit-empty-csv-2f", ["fit", "{T}/empty.csv", "-f", F2], (EMPTY,)),
    Case("stats-empty-csv", ["stats", "{T}/empty.csv", "-f", F1], (EMPTY,), out="s.parquet"),
    Case("fit-header-only-csv-1f", ["fit", "{T}/header.csv", "-f", F1], (HEADER,)),
    Case("fit-header-only-csv-2f", ["fit", "{T}/header.csv", "-f", F2], (HEADER,)),
    Case("stats-header-only-csv", ["stats", "{T}/header.csv", "-f", F2], (HEADER,),
         out="s.parquet"),
    Case("fit-empty-parquet-1f", ["fit", "{T}/empty.parquet", "-f", F1], ("no rows",)),
    Case("fit-empty-parquet-nested", ["fit", "{T}/empty.parquet", "-f", FN], ("no rows",)),
    Case("stats-empty-parquet", ["stats", "{T}/empty.parquet", "-f", F2], ("no rows",),
         out="s.parquet"),
    Case("predict-empty-csv", ["predict", R1, "{T}/empty.csv"], (EMPTY,), out="p.parquet"),
    Case("predict-header-only-csv", ["predict", R2, "{T}/header.csv"], (HEADER,),
         out="p.parquet"),
    # --- CSV rows that do not parse
    Case("fit-csv-extra-fields-1f", ["fit", "{T}/extra_fields.csv", "-f", F1], (EXTRA,)),
    Case("fit-csv-open-quote-2f", ["fit", "{T}/open_quote.csv", "-f", F2], ("open_quote.csv",)),
    Case("predict-csv-extra-fields", ["predict", R1, "{T}/extra_fields.csv"], (EXTRA,),
         out="p.parquet"),
    Case("stats-csv-fewer-fields", ["stats", "{T}/fewer_fields.csv", "-f", F2],
         ("fewer_fields.csv, line 31: 3 fields where the header has 4",), out="s.parquet"),
    # --- a directory of files with different schemas; a truncated Parquet file
    Case("fit-dir-renamed-column", ["fit", "{T}/renamed", "-f", F1], ("renamed",)),
    Case("fit-dir-retyped-column-2f", ["fit", "{T}/retyped", "-f", F2], ("b.parquet", '"x"')),
    Case("stats-dir-renamed-column", ["stats", "{T}/renamed", "-f", F2], ("renamed",),
         out="s.parquet"),
    Case("fit-dir-truncated-file-1f", ["fit", "{T}/trunc", "-f", F1], ("b.parquet",)),
    Case("fit-dir-truncated-file-nested", ["fit", "{T}/trunc", "-f", FN], ("b.parquet",)),
    Case("fit-truncated-footer", ["fit", "{T}/trunc_one/c.parquet", "-f", F1], ("c.parquet",)),
    Case("predict-dir-truncated-file", ["predict", R2, "{T}/trunc"], ("b.parquet",),
         out="p.parquet"),
    Case("predict-missing-column", ["predict", R1, "{T}/no_x.parquet"], ("'x'",),
         out="p.parquet"),
    # --- odd column names (backticked: must work) and quoted paths (must work)
    Case("fit-odd-names-1f", ["fit", "{T}/odd.parquet", "-f",
                              "`my y` ~ `größe` + `select` + (1 | `grp 1`)"], ok=True,
         check=_fit_ok(["(Intercept)", "`größe`", "select"])),
    Case("fit-odd-names-2f-csv", ["fit", "{T}/odd.csv", "-f",
                                  '`my y` ~ `q"uote` + (1 | `grp 1`) + (1 | `from`)'], ok=True,
         check=_fit_ok(["(Intercept)", '`q"uote`'])),
    Case("stats-odd-names", ["stats", "{T}/odd.parquet", "-f",
                             "`my y` ~ `größe` + (1 | `grp 1`/`from`)"], ok=True,
         out="s.parquet", check=_exists),
    Case("fit-quoted-path", ["fit", QDIR + "/d.parquet", "-f", F2], ok=True,
         out="it's \"out\"", check=_fit_ok(["(Intercept)", "x"])),
    Case("predict-quoted-path", ["predict", R2, QDIR + "/d.parquet"], ok=True,
         out="it's \"p\".parquet", check=_exists),
    Case("compare-quoted-path", ["compare", "{T}/r0", R1], ok=True, out="cmp \"it's\"",
         check=lambda out: json.loads((out / "comparison.json").read_text())["tests"]),
    # --- configs: unknown / mistyped keys, bad values
    Case("fit-config-unknown-key", ["fit", "-c", "{T}/unknown_key.toml"], ("formla",)),
    Case("fit-config-mistyped-duckdb-key", ["fit", "-c", "{T}/duck_key.toml"], ("[duckdb]",)),
    Case("fit-config-bad-method", ["fit", "-c", "{T}/method.toml"], ("method", "MLE")),
    Case("fit-config-bad-ddf", ["fit", "-c", "{T}/ddf.toml"], ("ddf", "satterwaite")),
    Case("fit-config-bad-ci", ["fit", "-c", "{T}/ci.toml"], ("ci", "exact")),
    Case("fit-config-level-95", ["fit", "-c", "{T}/level.toml"], ("level", "between 0 and 1")),
    Case("fit-config-threads-negative", ["fit", "-c", "{T}/threads.toml"], ("threads",)),
    Case("fit-config-memory-limit", ["fit", "-c", "{T}/memory.toml"], ("memory_limit", "lots")),
    Case("fit-config-not-toml", ["fit", "-c", "{T}/bad.toml"], ("bad.toml", "TOML")),
    Case("fit-config-no-formula", ["fit", "-c", "{T}/no_formula.toml"], ("formula",)),
    Case("compare-config-unknown-key", ["compare", "{T}/unknown_key.toml", R1], ("formla",)),
    # --- absurd option values
    Case("fit-threads-negative", ["fit", G, "-f", F1, "--threads", "-1"], ("threads",)),
    Case("fit-threads-zero-2f", ["fit", G, "-f", F2, "--threads", "0"], ("threads",)),
    Case("fit-threads-not-a-number", ["fit", G, "-f", F1, "--threads", "two"], ("threads",)),
    Case("fit-memory-limit-abc", ["fit", G, "-f", F1, "--memory-limit", "abc"],
         ("--memory-limit", "abc")),
    Case("fit-memory-limit-negative", ["fit", G, "-f", F2, "--memory-limit", "-5GB"],
         ("--memory-limit",)),
    Case("stats-memory-limit-abc", ["stats", G, "-f", F1, "--memory-limit", "abc"],
         ("--memory-limit", "abc"), out="s.parquet"),
    Case("stats-threads-negative", ["stats", G, "-f", F2, "--threads", "-1"], ("threads",),
         out="s.parquet"),
    Case("predict-threads-negative", ["predict", R1, G, "--threads", "-1"], ("threads",),
         out="p.parquet"),
    Case("predict-memory-limit-abc", ["predict", R2, G, "--memory-limit", "abc"],
         ("--memory-limit", "abc"), out="p.parquet"),
    Case("fit-level-2", ["fit", G, "-f", F1, "--level", "2"], ("level", "between 0 and 1")),
    Case("fit-level-negative-2f", ["fit", G, "-f", F2, "--level", "-0.5", "--ci", "wald"],
         ("between 0 and 1",)),
    Case("fit-level-nan", ["fit", G, "-f", F1, "--level", "nan", "--ci", "wald"],
         ("between 0 and 1",)),
    Case("report-sample-rows-negative", ["report", R1, "--sample-rows", "-5"], ("sample-rows",),
         out="r.html"),
    Case("report-max-groups-negative", ["report", R2, "--max-groups", "-1"], ("max-groups",),
         out="r.html"),
    Case("simulate-rows-negative", ["simulate", "{OUT}", "--rows", "-10"], ("rows",)),
    Case("simulate-groups-zero", ["simulate", "{OUT}", "--groups", "0"], ("groups",)),
    # --- outcomes: huge, tiny, constant; all-missing columns; one-level factors
    Case("fit-outcome-huge-1f", ["fit", "{T}/huge.parquet", "-f", F1], HUGE,
         forbid=("non-finite",)),
    Case("fit-outcome-huge-2f", ["fit", "{T}/huge.parquet", "-f", F2], HUGE,
         forbid=("non-finite",)),
    Case("fit-predictor-huge-nested", ["fit", "{T}/huge_x.parquet", "-f", FN],
         ("values too large", "squares overflow", "'x'"), forbid=("non-finite",)),
    Case("fit-predictor-infinite-log", ["fit", "{T}/good.parquet", "-f",
                                        "y ~ log(x - 100) + (1 | g)"],
         ("log(x - 100)", "non-finite"), forbid=("too large",)),
    Case("fit-outcome-tiny-1f", ["fit", "{T}/tiny.parquet", "-f", F1],
         ("'y'", "too small", "underflow"), forbid=("is constant",)),
    Case("fit-outcome-tiny-nested", ["fit", "{T}/tiny.parquet", "-f", FN],
         ("'y'", "too small", "underflow"), forbid=("is constant",)),
    Case("fit-outcome-constant-nested", ["fit", "{T}/const.parquet", "-f", FN],
         ("outcome 'y' is constant",)),
    Case("fit-all-null-x-1f", ["fit", "{T}/null_x.parquet", "-f", F1], ("no rows",)),
    Case("fit-all-null-y-2f", ["fit", "{T}/null_y.parquet", "-f", F2], ("no rows",)),
    Case("fit-all-null-untyped-x", ["fit", "{T}/null_type.parquet", "-f", F1], ("'x'",)),
    Case("fit-all-null-grouping", ["fit", "{T}/null_g.parquet", "-f", F2], ("no rows",)),
    Case("fit-all-empty-csv-column", ["fit", "{T}/null_x.csv", "-f", F1], ("'x'",)),
    Case("stats-all-null-x", ["stats", "{T}/null_x.parquet", "-f", F1], ("no rows",),
         out="s.parquet"),
    Case("fit-one-level-second-factor", ["fit", "{T}/one_level_h.parquet", "-f", F2],
         ("'h'", "at least 2")),
    Case("fit-one-level-nested-outer", ["fit", "{T}/one_level_g.parquet", "-f", FN],
         ("'g'", "at least 2")),
    # --- new levels at predict: population fallback, factor by factor
    Case("predict-new-levels-1f", ["predict", R1, "{T}/new_levels.parquet"], ok=True,
         out="p.parquet", check=_predict_new_levels("g")),
    Case("predict-new-levels-2f", ["predict", R2, "{T}/new_levels.parquet"], ok=True,
         out="p.parquet", check=_predict_new_levels("gh")),
    # --- result directories that are not
    Case("predict-result-dir-missing", ["predict", "{T}/nope", G], ("nope",), out="p.parquet"),
    Case("predict-result-dir-is-file", ["predict", "{T}/a_file", G], ("a_file",),
         out="p.parquet"),
    Case("predict-result-json-corrupt", ["predict", "{T}/r_corrupt", G], ("result.json",),
         out="p.parquet"),
    Case("predict-ranef-missing", ["predict", "{T}/r_no_ranef", G], ("ranef.parquet",),
         out="p.parquet"),
    Case("predict-ranef-corrupt", ["predict", "{T}/r_bad_ranef", G], ("ranef.parquet",),
         out="p.parquet"),
    Case("compare-missing-model", ["compare", R1, "{T}/nope"], ("nope",)),
    Case("compare-one-model", ["compare", R1], ("at least two",)),
    Case("compare-result-json-corrupt", ["compare", R1, "{T}/r_corrupt"], ("result.json",)),
    Case("compare-no-result-json", ["compare", R1, "{T}/r_no_json"], ("r_no_json",)),
    Case("compare-names-count", ["compare", "{T}/r0", R1, "--names", "a,b,c"], ("names",)),
    Case("report-result-json-corrupt", ["report", "{T}/r_corrupt"], ("result.json",),
         out="r.html"),
    Case("report-missing-dir", ["report", R1, "{T}/nope"], ("nope",), out="r.html"),
    Case("report-not-a-result-dir", ["report", "{T}/r_no_json"], ("r_no_json",),
         out="r.html"),
]

#: cases that break the contract today, with what they do (none at present; an entry makes
#: its case a strict xfail)
XFAIL: dict[str, str] = {}


# ---------------------------------------------------------------------- running the CLI

_DRIVER = textwrap.dedent("""
    import json, os, sys, traceback
    import mlpipe, mlpipe.cli              # what `python -m mlpipe.cli` has imported
    cases = json.load(sys.stdin)
    results = {}
    for case in cases:
        so, se = case["dir"] + ".stdout", case["dir"] + ".stderr"
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                flags = os.O_WRONLY | os.O_CREAT
                os.dup2(os.open(so, flags), 1); os.dup2(os.open(se, flags), 2)
                os.chdir(case["cwd"])
                sys.argv = ["mlpipe", *case["argv"]]
                try:
                    code = mlpipe.cli.main(case["argv"])
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[case["id"]] = os.waitstatus_to_exitcode(status)
    json.dump(results, sys.stdout)
""")


def _resolve(case: Case, t: Path, d: Path) -> list[str]:
    out = d / case.out
    argv = [a.replace("{T}", str(t)).replace("{OUT}", str(out)) for a in case.argv]
    if "{OUT}" not in " ".join(case.argv):
        argv += ["--out", str(out)]
    if argv[0] in ("fit", "compare"):
        argv.append("-q")
    return argv


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    t = tmp_path_factory.mktemp("inputs")
    _make_inputs(t)
    runs = tmp_path_factory.mktemp("runs")
    jobs = []
    for case in CASES:
        d = runs / case.id
        d.mkdir()
        jobs.append({"id": case.id, "argv": _resolve(case, t, d), "dir": str(d),
                     "cwd": str(t)})
    env = {**os.environ, "MLPIPE_DEBUG": ""}
    env.pop("MLPIPE_DEBUG")
    if os.environ.get("MLPIPE_CATALOGUE_SUBPROCESS"):
        def one(job):
            p = subprocess.run([sys.executable, "-m", "mlpipe.cli", *job["argv"]], cwd=job["cwd"],
                               capture_output=True, text=True, env=env, timeout=300)
            Path(job["dir"] + ".stdout").write_text(p.stdout)
            Path(job["dir"] + ".stderr").write_text(p.stderr)
            return job["id"], p.returncode
        with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
            codes = dict(pool.map(one, jobs))
    else:
        # two drivers, half the cases each
        procs = [subprocess.Popen([sys.executable, "-c", _DRIVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        for k, p in enumerate(procs):
            p.stdin.write(json.dumps(jobs[k::2]))
            p.stdin.close()
        codes = {}
        for p in procs:
            codes.update(json.loads(p.stdout.read()))
            assert p.wait(timeout=600) == 0
    out = {}
    for case, job in zip(CASES, jobs):
        out[case.id] = (codes[case.id], Path(job["dir"] + ".stdout").read_text(),
                        Path(job["dir"] + ".stderr").read_text(), Path(job["dir"]))
    return out


def _param(case: Case):
    reason = XFAIL.get(case.id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_catalogue(results, case):
    code, stdout, stderr, d = results[case.id]
    assert "Traceback" not in stderr, stderr
    if case.ok:
        assert code == 0, stderr
        case.check(d / case.out)
        return
    assert code == 2, f"exit {code}: {stderr.strip()}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mlpipe: error: "), lines[0]
    for needle in case.needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for claim in case.forbid:
        assert claim not in lines[0], lines[0]
    assert list(d.iterdir()) == [], f"left behind: {[p.name for p in d.iterdir()]}"


def test_catalogue_counts():
    """The catalogue covers every command and both kinds of model."""
    by_command = {}
    for c in CASES:
        by_command.setdefault(c.argv[0], []).append(c)
    assert set(by_command) >= {"fit", "stats", "predict", "compare", "report"}
    assert len(CASES) == len({c.id for c in CASES})
