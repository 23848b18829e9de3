"""SQL injection attempts through every user-supplied string that reaches DuckDB.

Column names (quotes, semicolons, `"; DROP TABLE ...`), backticked formula terms, factor
levels, file paths with quotes and config / option values each carry an injected
`COPY (SELECT 1) TO '<marker>'`.  Every attempt must either work (the text is a quoted
identifier or a bound value) or fail with one line and exit 2 — and no marker file may ever
appear.  Most attempts run `mlpipe.cli.main` in-process (real DuckDB, real files); a few run
the `mlpipe` command in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlpipe.cli import main

ATTEMPTS: list[str] = []  # every injection tried, counted by test_count_of_attempts


def payload(tmp: Path, tag: str) -> tuple[str, Path]:
    """An injected statement that would create `tmp/pwned_<tag>.csv` if it ever ran."""
    marker = tmp / f"pwned_{tag}.csv"
    ATTEMPTS.append(tag)
    return f"COPY (SELECT 1) TO '{marker}'", marker


def weird_names(tmp: Path) -> dict[str, str]:
    inj = {k: payload(tmp, k)[0] for k in ("col_y", "col_x", "col_g", "col_f")}
    return {
        "y": f'y"; {inj["col_y"]}; --',
        "x": f"x'); {inj['col_x']}; DROP TABLE group_moments; --",
        "g": f'g" FROM x; {inj["col_g"]}; SELECT "',
        "f": f"f;\"'; {inj['col_f']} --",
    }


@pytest.fixture()
def weird(tmp_path):
    """Parquet data whose column names and text levels are injection attempts."""
    names = weird_names(tmp_path)
    lev_inj, _ = payload(tmp_path, "level")
    rng = np.random.default_rng(3)
    n, m = 600, 30
    g = rng.integers(0, m, n)
    x = rng.normal(size=n)
    levels = np.array(["a'b", f"'); {lev_inj}; --", 'q"uote'])
    f = levels[rng.integers(0, 3, n)]
    y = 1 + 0.5 * x + (f == "a'b") * 0.3 + rng.normal(size=m)[g] + rng.normal(size=n)
    path = tmp_path / "da'ta\"; x.parquet"
    pq.write_table(pa.table({names["y"]: y, names["x"]: x, names["g"]: g.astype(str),
                             names["f"]: f}), path)
    return path, names


def tick(name: str) -> str:
    return "`" + name.replace("`", "``") + "`" if "`" in name else f"`{name}`"


def assert_no_marker(tmp: Path) -> None:
    found = sorted(p.name for p in tmp.rglob("pwned_*"))
    assert not found, f"injected SQL ran: {found}"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def ok_or_one_line_exit_2(code: int, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlpipe: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err


def test_injection_through_column_names_levels_and_paths(weird, tmp_path, capsys):
    path, nm = weird
    terms = [tick(nm["x"]), tick(nm["f"])]
    formula = f"{tick(nm['y'])} ~ {' + '.join(terms)} + (1 + {tick(nm['x'])} | {tick(nm['g'])})"
    out = tmp_path / "out 'dir\"; x"
    code, err = run(capsys, "fit", path, "--formula", formula, "--out", out, "-q")
    assert code == 0, err  # quoted identifiers and bound paths: the fit works
    res = json.loads((out / "result.json").read_text())
    assert res["nobs"] == 600 and res["groups"] == {nm["g"]: 30}
    terms = {r["term"] for r in res["fixed_effects"]}
    assert tick(nm["x"]) in terms and len(terms) == 4, terms  # 1, x, 2 levels of f
    # without the text factor
    code, err = run(capsys, "fit", path, "--formula",
                    f"{tick(nm['y'])} ~ {tick(nm['x'])} + (1 | {tick(nm['g'])})",
                    "--out", tmp_path / "o2", "-q")
    assert code == 0, err
    # predictions and the statistics pass with quoted output paths
    pred = tmp_path / "pred 'x\"; y.parquet"
    code, err = run(capsys, "predict", out, path, "--out", pred)
    assert code == 0, err
    assert pq.read_table(pred).num_rows == 600
    pred_csv = tmp_path / "pred 'x\"; y.csv"
    code, err = run(capsys, "predict", out, path, "--out", pred_csv)
    assert code == 0, err
    st = tmp_path / "st 'x\"; y.parquet"
    code, err = run(capsys, "stats", path, "--formula", formula, "--out", st)
    assert code == 0, err
    code, err = run(capsys, "fit", "--stats", st, "--ml", "-q")
    assert code == 0, err
    # comparing and reporting result dirs at quoted paths (the report rereads the data)
    code, err = run(capsys, "compare", tmp_path / "o2", out, "--out", tmp_path / "cmp 'x\"", "-q")
    assert code == 0, err
    code, err = run(capsys, "report", out, tmp_path / "o2", "--out", tmp_path / "r 'x\".html")
    assert code == 0, err
    assert (tmp_path / "r 'x\".html").stat().st_size > 0
    # centering by a weird grouping column, a factor of the text column with weird levels
    f2 = (f"{tick(nm['y'])} ~ center({tick(nm['x'])}, by = {tick(nm['g'])}) "
          f"+ (1 | {tick(nm['g'])})")
    code, err = run(capsys, "fit", path, "--formula", f2, "-q")
    ok_or_one_line_exit_2(code, err)
    assert_no_marker(tmp_path)


def test_injection_through_the_formula(weird, tmp_path, capsys):
    path, nm = weird
    y, x, g = tick(nm["y"]), tick(nm["x"]), tick(nm["g"])
    formulas = []
    for k, tmpl in enumerate([
        "{y} ~ {x} + (1 | {g})); {inj}; --",
        "{y} ~ {x} + (1 | {g}) ; {inj}",
        "{y} ~ log({x}); {inj} + (1 | {g})",
        "{y} ~ `{x_raw}\"; {inj}; --` + (1 | {g})",
        "{y} ~ I({x} + 1)'); {inj}; --') + (1 | {g})",
        "{y} ~ {x} + (1 | `nothere\"; {inj}; --`)",
        "{y} ~ center({x}, by = `nothere'; {inj}; --`) + (1 | {g})",
    ]):
        inj, _ = payload(tmp_path, f"formula{k}")
        formulas.append(tmpl.format(y=y, x=x, g=g, x_raw=nm["x"], inj=inj))
    for formula in formulas:
        code, err = run(capsys, "fit", path, "--formula", formula, "--out",
                        tmp_path / "never", "-q")
        assert code == 2, (formula, err)
        ok_or_one_line_exit_2(code, err)
        assert not (tmp_path / "never").exists()
    assert_no_marker(tmp_path)


def test_injection_through_options_and_config(tmp_path, capsys):
    data = Path(__file__).parent / "data" / "hsb82.parquet"
    formula = "mAch ~ ses + (1 | school)"
    options = []
    for k, (opt, tmpl) in enumerate([
        ("--memory-limit", "1GB'; {inj}; --"),
        ("--memory-limit", "1GB\"; {inj}; SELECT '"),
        ("--temp-directory", "{tmp}/t'; {inj}; --"),
    ]):
        inj, _ = payload(tmp_path, f"option{k}")
        options.append((opt, tmpl.format(inj=inj, tmp=tmp_path)))
    for opt, value in options:
        code, err = run(capsys, "fit", data, "--formula", formula, opt, value, "-q")
        ok_or_one_line_exit_2(code, err)
        if opt == "--memory-limit":
            assert code == 2 and "memory" in err.lower(), err
    for k, key in enumerate(["memory_limit", "temp_directory"]):
        inj, _ = payload(tmp_path, f"config{k}")
        value = f"1GB'; {inj}; --" if key == "memory_limit" else f"{tmp_path}/t'; {inj}; --"
        cfg = tmp_path / f"c{k}.toml"
        cfg.write_text(f'data = "{data}"\nformula = "{formula}"\n\n[duckdb]\n'
                       f'{key} = "{value}"\n')
        code, err = run(capsys, "fit", "--config", cfg, "-q")
        ok_or_one_line_exit_2(code, err)
    assert_no_marker(tmp_path)


def test_injection_in_real_subprocesses(weird, tmp_path):
    """The command itself, as a job runs it: a quoted path, a weird column, a config value."""
    path, nm = weird
    inj, _ = payload(tmp_path, "subprocess_cfg")
    cfg = tmp_path / "job.toml"
    cfg.write_text(f'data = "{Path(__file__).parent / "data" / "hsb82.parquet"}"\n'
                   f'formula = "mAch ~ ses + (1 | school)"\n\n[duckdb]\n'
                   f"memory_limit = \"1GB'; {inj}; --\"\n")
    proc = subprocess.run([sys.executable, "-m", "mlpipe.cli", "fit", "--config", str(cfg),
                           "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    inj, _ = payload(tmp_path, "subprocess_col")
    formula = (f"{tick(nm['y'])} ~ {tick(nm['x'])} + `{nm['x']}\"; {inj}; --` "
               f"+ (1 | {tick(nm['g'])})")
    proc = subprocess.run([sys.executable, "-m", "mlpipe.cli", "fit", str(path), "--formula",
                           formula, "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_no_marker(tmp_path)


def test_count_of_attempts():
    """Runs last in this file: how many injections the tests above tried."""
    if len(ATTEMPTS) < 10:
        pytest.skip("run the whole file to count the attempts")
    assert len(ATTEMPTS) >= 20, ATTEMPTS


# ---------------------------------------------------------------------- killed mid-run

import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

FORMULA = "y ~ x + w + (x | g)"


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """2M rows in 100k groups: the scan, the optimizer and the writing each take a while."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(13)
    n, m = 2_000_000, 100_000
    g = rng.integers(0, m, n)
    x, w = rng.normal(size=n), rng.normal(size=n)
    y = (1 + 0.5 * x - 0.2 * w + rng.normal(size=m)[g] + 0.3 * rng.normal(size=m)[g] * x
         + rng.normal(size=n))
    path = d / "big.parquet"
    pq.write_table(pa.table({"g": g, "x": x, "w": w, "y": y}), path)
    return path


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "mlpipe.cli", *map(str, argv)]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every visible file of a result dir (or the one file) → its bytes."""
    if path.is_dir():
        return {f.name: f.read_bytes() for f in sorted(path.iterdir())
                if not f.name.startswith(".") and f.name != "run.json"}
    return {path.name: path.read_bytes()} if path.exists() else {}


def parses(path: Path) -> None:
    """Every visible file that exists reads completely."""
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
    for f in files:
        if f.name.startswith("."):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".parquet":
            pq.read_table(f)
        elif f.suffix == ".toml":
            import tomllib

            tomllib.loads(f.read_text())


def kill_runs(argv: list[str], dest: Path, delays: list[float], watch: str | None = None,
              last: bool = False) -> dict[str, int]:
    """Start `argv`, SIGKILL it after each delay (from the start, or with `watch` from when a
    staging name `.NAME.*` of `dest` appears beside it) and check `dest` holds the outputs
    of before or of a complete run — all of one of them, each file whole — never a mix.
    Returns how the kills landed."""
    before = snapshot(dest)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    outcome = {"old": 0, "new": 0, "finished first": 0}
    new = None
    for delay in delays:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        start = time.perf_counter()
        if watch:
            while proc.poll() is None and not any(
                    p.name.startswith(f".{dest.name}.") for p in dest.parent.iterdir()):
                time.sleep(0.002)
            start = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - start < delay:
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        else:
            outcome["finished first"] += 1
        proc.wait()
        proc.stderr.close()
        parses(dest)
        now = snapshot(dest)
        if now == before:
            outcome["old"] += 1
        else:
            if new is None:
                new = now
            assert now == new, f"a mix of outputs after a kill at {delay} s"
            assert set(now) == set(before) or not before, sorted(now)
            assert new is not None
            outcome["new"] += 1
    if not last:
        return outcome
    # the next complete run removes what the killed ones left behind
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    leftovers = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    assert not leftovers, leftovers
    return outcome


KILLS: dict[str, dict] = {}


def _timed_run(argv: list) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def kill_everything(big: Path, tmp: Path, fit_delays, fit_writing, other_delays, other_writing,
                    slow: bool = False) -> dict[str, dict]:
    """Kill fit, predict and stats runs at the given points; returns how the kills landed.

    The timed points (`fit_delays`, `other_delays`) are fractions of how long a complete run
    of the same command took just before, so they land in the import, the scan, the solve
    and the writing however fast the machine (and mlpipe's start-up) is; the `*_writing`
    points are seconds after a staging name appears."""
    out = tmp / "res"
    # the previous outputs: an ML fit (the killed runs fit REML: other numbers, same files)
    t_fit = _timed_run(cli("fit", big, "--formula", FORMULA, "--ml", "--threads", 1, "--out",
                           out, "-q"))
    argv = cli("fit", big, "--formula", FORMULA, "--threads", 1, "--out", out, "-q")
    res = {"fit": kill_runs(argv, out, [f * t_fit for f in fit_delays])}
    res["fit while writing"] = kill_runs(argv, out, fit_writing, watch="stage", last=slow)
    pred = tmp / "pred.parquet"  # previous: population predictions; killed: conditional
    t_pred = _timed_run(cli("predict", out, big, "--population", "--threads", 1, "--out",
                            pred))
    argv = cli("predict", out, big, "--threads", 1, "--out", pred)
    res["predict"] = kill_runs(argv, pred, [f * t_pred for f in other_delays])
    res["predict while writing"] = kill_runs(argv, pred, other_writing, watch="tmp")
    st = tmp / "s.parquet"  # no previous file: nothing may appear
    argv = cli("stats", big, "--formula", FORMULA, "--threads", 1, "--out", st)
    t_stats = _timed_run(argv + ["--out", str(tmp / "s_timing.parquet")])
    res["stats"] = kill_runs(argv, st, [f * t_stats for f in other_delays])
    res["stats while writing"] = kill_runs(argv, st, other_writing, watch="tmp", last=True)
    KILLS.update(res)
    print({k: v for k, v in res.items()})
    return res


def _points(res: dict) -> tuple[int, int]:
    """(kill points, runs that finished before their kill time)."""
    return (sum(v["old"] + v["new"] for v in res.values()),
            sum(v["finished first"] for v in res.values()))


def test_killed_runs_leave_old_or_new_outputs(big, tmp_path):
    """Quick: 4 kill points (at half a complete fit's time — in the scan or the solve — and
    while the staged outputs of fit, predict and stats are written)."""
    res = kill_everything(big, tmp_path, [0.5], [0.02], [], [0.0])
    points, finished = _points(res)
    assert points == 4 and finished <= 1


@pytest.mark.slow
def test_killed_runs_at_many_points(big, tmp_path):
    res = kill_everything(big, tmp_path, [0.25 + 0.03 * k for k in range(24)],
                          [0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2],
                          [0.3, 0.45, 0.6, 0.75, 0.85, 0.95], [0.0, 0.02, 0.05, 0.1, 0.2],
                          slow=True)
    points, finished = _points(res)
    assert points == 24 + 8 + 2 * (6 + 5) and finished < points // 4
    assert sum(v["old"] for v in res.values()) > 0  # some kills landed before the swap
