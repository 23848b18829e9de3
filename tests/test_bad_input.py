"""Bad input: a one-line message naming the problem, exit code 2, nothing half-written."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlpipe.cli import main

DATA = Path(__file__).parent / "data"
HSB = str(DATA / "hsb82.parquet")


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_input_error(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    code, err = run(capsys, *argv, "--out", str(out))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mlpipe: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    return lines[0]


def _write(tmp_path, name="d.parquet", **cols):
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_missing_file(capsys, tmp_path):
    assert_input_error(capsys, tmp_path, ["fit", str(tmp_path / "nope.parquet"),
                                          "-f", "y ~ 1 + (1|g)"], "not found", "nope.parquet")


def test_corrupt_parquet(capsys, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet PAR1")
    assert_input_error(capsys, tmp_path, ["fit", str(bad), "-f", "y ~ 1 + (1|g)"],
                       "cannot read", "bad.parquet")


def test_absent_column(capsys, tmp_path):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "mAch ~ nosuch + (1|school)"],
                       "'nosuch'", "not in the data")


def test_non_numeric_outcome(capsys, tmp_path):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "sector ~ cses + (1|school)"],
                       "outcome", "'sector'", "not numeric")


@pytest.mark.parametrize("formula,piece", [
    ("mAch ~ cses + (1|school", "end of formula"),
    ("mAch cses + (1|school)", "'~'"),
    ("mAch ~ cses + + (1|school)", "'+'"),
    ("mAch ~ foo(cses) + (1|school)", "foo()"),
    ("mAch ~ cses + (1|)", "')'"),
    ("mAch ~ cses $ (1|school)", "'$'"),
])
def test_malformed_formula(capsys, tmp_path, formula, piece):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", formula], piece)


def test_single_level_grouping_factor(capsys, tmp_path):
    path = _write(tmp_path, y=np.arange(10.0), x=np.arange(10.0) % 3, g=["a"] * 10)
    assert_input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x + (1|g)"],
                       "'g'", "at least 2")


def test_no_rows_left_after_nulls(capsys, tmp_path):
    path = _write(tmp_path, y=pa.array([1.0, None, 3.0]), x=pa.array([None, 2.0, None]),
                  g=["a", "b", "c"])
    assert_input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x + (1|g)"],
                       "no rows left", "3 rows read")


def test_rank_deficient_fixed_effects(capsys, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    path = _write(tmp_path, y=rng.normal(size=60), x=x, x2=2 * x + 1,
                  g=[f"g{i % 6}" for i in range(60)])
    assert_input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x + x2 + (1|g)"],
                       "rank deficient", "x2")


def test_more_random_effects_than_observations(capsys, tmp_path):
    rng = np.random.default_rng(0)
    path = _write(tmp_path, y=rng.normal(size=12), x=rng.normal(size=12),
                  g=[f"g{i // 2}" for i in range(12)])
    assert_input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x + (x|g)"],
                       "random effects", "12 observations")


def test_unknown_option_is_one_line(capsys, tmp_path):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "mAch ~ 1 + (1|school)",
                                          "--bogus"], "--bogus")


def test_column_names_with_quotes_and_sql_are_safe(capsys, tmp_path):
    """Hostile column names are quoted, never executed; backticks name them in formulas."""
    rng = np.random.default_rng(3)
    n = 80
    g = np.repeat(np.arange(8), 10)
    evil = 'x"); DROP TABLE t; --'
    y = 2 + 0.5 * rng.normal(size=n) + rng.normal(size=8)[g]
    path = _write(tmp_path, **{"we'ird y": y, evil: rng.normal(size=n),
                               "grp\"": [f"s{k}" for k in g]})
    formula = "`we'ird y` ~ `" + evil + "` + (1 | `grp\"`)"
    out = tmp_path / "ok"
    code = main(["fit", path, "-f", formula, "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    import json
    res = json.loads((out / "result.json").read_text())
    assert [fe["term"] for fe in res["fixed_effects"]] == ["(Intercept)", f"`{evil}`"]
    assert res["nobs"] == n and res["groups"] == {'grp"': 8}
    # and an unquoted hostile name is a formula error, not SQL
    assert_input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x; DROP TABLE t + (1|g)"],
                       "';'")


def test_cli_process_exit_codes(tmp_path):
    """The installed entry point: exit 2 and one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "mlpipe.cli", "fit", "missing.parquet",
                           "-f", "y ~ 1 + (1|g)"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mlpipe: error: data file not found: missing.parquet"


def test_non_finite_model_column(capsys, tmp_path):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "mAch ~ log(ses) + (1|school)"],
                       "log(ses)", "non-finite")


def test_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me")
    code, err = run(capsys, "fit", HSB, "-f", "mAch ~ 1 + (1|school)", "--out", str(target))
    assert code == 2 and "not a directory" in err and err.count("\n") == 1
    assert target.read_text() == "keep me"


def test_data_with_stats_and_formula_mismatch(capsys, tmp_path):
    s = tmp_path / "s.parquet"
    assert main(["stats", HSB, "-f", "mAch ~ 1 + (1|school)", "--out", str(s)]) == 0
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "mAch ~ 1 + (1|school)",
                                          "--stats", str(s)], "not both")
    assert_input_error(capsys, tmp_path, ["fit", "-f", "mAch ~ cses + (1|school)",
                                          "--stats", str(s)], "built for")


@pytest.mark.parametrize("argv,needle", [
    (["--ci", "wald", "--level", "2"], "between 0 and 1"),
    (["--ml", "--ddf", "kenward-roger"], "REML"),
])
def test_bad_options_fail_before_the_work(capsys, tmp_path, argv, needle):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "mAch ~ 1 + (1|school)", *argv],
                       needle)


def test_bad_config_types(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{HSB}"\nformula = "mAch ~ 1 + (1|school)"\n'
                   '[duckdb]\nthreads = "two"\n')
    assert_input_error(capsys, tmp_path, ["fit", "--config", str(cfg)], "threads")


def test_unwritable_output_is_an_input_error(capsys, tmp_path):
    code, err = run(capsys, "stats", HSB, "-f", "mAch ~ 1 + (1|school)",
                    "--out", "/proc/no/such/dir/s.parquet")
    assert code == 2 and err.startswith("mlpipe: error:") and err.count("\n") == 1


def test_infinite_literal(capsys, tmp_path):
    assert_input_error(capsys, tmp_path, ["fit", HSB, "-f", "mAch ~ I(cses*1e999) + (1|school)"],
                       "not finite")


# ---------------------------------------------------------------------- CSV files DuckDB misreads

def _csv(path: Path, n: int = 60, bad: dict[int, str] | None = None) -> Path:
    """A CSV with header y,x,g and n rows; `bad` replaces data row k (line k + 2)."""
    rng = np.random.default_rng(3)
    rows = [f"{rng.normal():.6f},{rng.normal():.6f},g{k % 6}" for k in range(n)]
    for k, line in (bad or {}).items():
        rows[k] = line
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["y,x,g", *rows]) + "\n")
    return path


def test_csv_row_with_extra_field_after_the_sniffer_sample(capsys, tmp_path):
    """A bad row beyond DuckDB's sniffing sample fails in the scan: same message."""
    path = _csv(tmp_path / "late.csv", n=30_000, bad={25_000: "1.0,2.0,g1,9,9"})
    assert_input_error(capsys, tmp_path, ["stats", str(path), "-f", "y ~ x + (1|g)"],
                       "late.csv, line 25002: 5 fields where the header has 3")


def test_csv_directory_first_file_empty(capsys, tmp_path):
    d = tmp_path / "parts"
    (d / "a.csv").parent.mkdir()
    (d / "a.csv").write_text("\n\n")  # blank lines only: empty too
    _csv(d / "b.csv")
    assert_input_error(capsys, tmp_path, ["fit", str(d), "-f", "y ~ x + (1|g)"],
                       "a.csv: the file is empty")


def test_csv_directory_header_only_files(capsys, tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for name in ("a.csv", "b.csv"):
        (d / name).write_text("y,x,g\n")
    assert_input_error(capsys, tmp_path, ["fit", str(d), "-f", "y ~ x + (1|g)"],
                       "no data rows in any of its 2 CSV files (header only)")


def test_csv_glob_with_an_empty_and_a_header_only_file_among_good_ones(capsys, tmp_path):
    """Files that add no rows do not stop a glob whose first file has the data."""
    d = tmp_path / "parts"
    _csv(d / "a.csv")
    (d / "b.csv").write_text("")
    (d / "c.csv").write_text("y,x,g\n")
    code, err = run(capsys, "fit", str(d / "*.csv"), "-f", "y ~ x + (1|g)", "-q")
    assert code == 0, err


def test_huge_values_name_the_overflow(capsys, tmp_path):
    y = np.random.default_rng(1).normal(size=40)
    path = _write(tmp_path, y=y * 1e200, x=np.arange(40.0), g=np.arange(40) % 5)
    line = assert_input_error(capsys, tmp_path, ["fit", path, "-f", "y ~ x + (1|g)"],
                              "values too large", "squares overflow", "'y'", "e+200")
    assert "non-finite" not in line
