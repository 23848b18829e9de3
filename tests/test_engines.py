"""The engines (mlpipe/engines): DuckDB, Polars and Dask build the same statistics and fits.

Real parts throughout: DuckDB, Polars, and a `dask.distributed.LocalCluster` of two worker
processes (one per module, shared by the tests; one test lets the engine start its own).
The data are reference datasets written as several Parquet (or CSV) files with their rows
shuffled, so groups and cells span files and the partials must be merged by key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.engines import EngineOptions, get_engine
from mlpipe.errors import DataError, InputError

from conftest import run_killing_a_worker, split  # noqa: E402  (and `cluster`)

DATA = Path(__file__).parent / "data"
CASES = {  # data, formula: one factor with a categorical and scale(), nested, crossed
    "one_factor": ("hsb82.parquet",
                   "mAch ~ scale(ses) * factor(sector) + minrty + (ses | school)"),
    "nested": ("multilevel/egsingle.parquet", "math ~ year + (year | schoolid/childid)"),
    "crossed": ("multilevel/scotssec.parquet",
                "attain ~ verbal + sex + (1 | primary) + (1 | second)"),
    "three_level": ("multilevel/oxide.parquet", "Thickness ~ 1 + (1 | Source/Lot/Wafer)"),
}


def statistics_arrays(st) -> dict[str, np.ndarray]:
    out = {k: np.asarray(getattr(st, k), float)
           for k in ("n_i", "ztz", "ztx", "zty", "yty_i", "xtx", "xty")}
    out["yty"] = np.array([st.yty])
    for k, f in enumerate(st.factors):
        out[f"index{k}"] = f.index.astype(float)
    return out


def assert_same_statistics(a, b, rtol: float) -> None:
    assert a.n == b.n and a.rows_read == b.rows_read and a.m == b.m
    assert list(a.levels) == list(b.levels)
    for f, g in zip(a.factors, b.factors):
        assert list(f.levels) == list(g.levels)
    assert a.factor_levels.keys() == b.factor_levels.keys()
    for key, lv in a.factor_levels.items():  # levels; scale()'s mean and SD
        if all(isinstance(v, float) for v in lv):
            np.testing.assert_allclose(b.factor_levels[key], lv, rtol=1e-12, atol=1e-15)
        else:
            assert b.factor_levels[key] == lv
    for key, x in statistics_arrays(a).items():
        y = statistics_arrays(b)[key]
        scale = np.max(np.abs(x)) or 1.0
        np.testing.assert_allclose(y, x, rtol=0, atol=rtol * scale, err_msg=key)


def assert_same_fit(a, b, rtol: float) -> None:
    assert abs(a.deviance - b.deviance) <= rtol * abs(a.deviance)
    np.testing.assert_allclose(b.fixed_effects["estimate"].to_numpy(),
                               a.fixed_effects["estimate"].to_numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(b.random_effects["variance"].to_numpy(),
                               a.random_effects["variance"].to_numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(b.theta, a.theta, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("case", list(CASES))
def test_dask_engine_equals_duckdb(case, cluster, tmp_path):
    """Shuffled into 7 files: the Dask engine's merged partials equal DuckDB's one pass
    (1e-12 relative on every statistic: only the order of the additions differs), and the
    fits agree to 1e-8."""
    src, formula = CASES[case]
    data = split(DATA / src, tmp_path / "parts", 7)
    duck = get_engine("duckdb").statistics(data, formula)
    dask = get_engine("dask", EngineOptions(scheduler=cluster.scheduler_address)
                      ).statistics(data, formula)
    assert_same_statistics(duck, dask, 1e-12)
    assert dask.source == os.path.abspath(data)
    assert_same_fit(mlpipe.fit(stats=duck, ddf=None), mlpipe.fit(stats=dask, ddf=None), 1e-8)


@pytest.mark.parametrize("case", list(CASES))
def test_polars_engine_equals_duckdb(case, tmp_path):
    """Polars' lazy pass over the shuffled files equals DuckDB's statistics to 1e-12
    relative (plain against compensated sums) and the fits to 1e-10."""
    src, formula = CASES[case]
    data = split(DATA / src, tmp_path / "parts", 5)
    duck = get_engine("duckdb").statistics(data, formula)
    pol = get_engine("polars").statistics(data, formula)
    assert_same_statistics(duck, pol, 1e-12)
    assert pol.source == os.path.abspath(data)
    assert_same_fit(mlpipe.fit(stats=duck, ddf=None), mlpipe.fit(stats=pol, ddf=None), 1e-10)


#: the formula language through the Polars compiler (sleepstudy with extra columns)
POLARS_FORMULAS = [
    "Reaction ~ factor(Days) + (1 | Subject)",
    "Reaction ~ relevel(factor(Days), 3) + (1 | Subject)",
    "log(Reaction) ~ Days + I(Days^2) + sqrt(Days + 1) + (Days || Subject)",
    "Reaction ~ pw(Days, 4) + pmin(Days, 5) + (pw(Days, 4) | Subject)",
    "Reaction ~ Days * flag + offset(Days / 10) + (1 | Subject) + (1 | week)",
    "Reaction ~ Days + scale(Days) : flag + (Days | Subject:flag)",
    "Reaction ~ Days + (1 | code)",
]


def _sleep_extra() -> pl.DataFrame:
    df = pl.read_parquet(DATA / "sleepstudy.parquet")
    rng = np.random.default_rng(1)
    return df.with_columns(
        flag=pl.Series(rng.random(df.height) < 0.5),  # a boolean: categorical
        week=(pl.col("Days") // 3).cast(pl.Int32),  # an integer grouping factor
        code=pl.col("Subject").cast(pl.Categorical),  # a categorical grouping factor
        wt=pl.Series(rng.uniform(0.5, 2.0, df.height)))


@pytest.mark.parametrize("formula", POLARS_FORMULAS)
def test_polars_formula_language_equals_duckdb(formula, tmp_path):
    df = _sleep_extra()
    path = tmp_path / "sleep.parquet"
    df.write_parquet(path)
    duck = get_engine("duckdb").statistics(path, formula)
    pol = get_engine("polars").statistics(path, formula)
    assert pol.fixed_names == duck.fixed_names and pol.random_names == duck.random_names
    assert_same_statistics(duck, pol, 1e-12)


def test_polars_weights_csv_and_data_in_memory(tmp_path):
    """Case weights; CSV files; a polars DataFrame or LazyFrame and a pyarrow
    Table in memory: all equal DuckDB's statistics of the same rows."""
    df = _sleep_extra().drop("code")
    formula = "Reaction ~ Days + (Days | Subject)"
    path = tmp_path / "sleep.parquet"
    df.write_parquet(path)
    duck = get_engine("duckdb").statistics(path, formula, weights="wt")
    assert_same_statistics(duck, get_engine("polars").statistics(path, formula, weights="wt"),
                           1e-12)
    assert get_engine("polars").statistics(path, formula, weights="wt").log_weights == \
        pytest.approx(duck.log_weights, rel=1e-12)
    csv = split(path, tmp_path / "csv", 3, csv=True)
    duck = get_engine("duckdb").statistics(csv, formula)
    assert_same_statistics(duck, get_engine("polars").statistics(csv, formula), 1e-12)
    frame = pl.read_csv(sorted(csv.glob("*.csv")))
    for data in (frame, frame.lazy(), frame.to_arrow()):
        got = get_engine("polars").statistics(data, formula)
        assert_same_statistics(duck, got, 1e-12)
        assert got.source == ""


def test_polars_hive_partitions_and_other_files_in_the_directory(tmp_path):
    """A key=value directory layout gives its key as a column (as DuckDB reads it), and a
    file that is not Parquet beside the data is left out, as DuckDB's **/*.parquet does."""
    df = pl.read_parquet(DATA / "hsb82.parquet")
    for sector in ("Public", "Catholic"):
        folder = tmp_path / "hive" / f"part={sector}"
        folder.mkdir(parents=True)
        df.filter(pl.col("sector") == sector).drop("sector").write_parquet(
            folder / "data.parquet")
    (tmp_path / "hive" / "truth.json").write_text("{}")
    formula = "mAch ~ ses * part + (ses | school)"
    duck = get_engine("duckdb").statistics(tmp_path / "hive", formula)
    assert_same_statistics(duck, get_engine("polars").statistics(tmp_path / "hive", formula),
                           1e-12)


def test_polars_engine_refusals_and_bad_input(tmp_path):
    eng = get_engine("polars")
    data = DATA / "hsb82.parquet"
    for formula, what in (("mAch ~ center(ses) + (1 | school)", "center"),
                          ("mAch ~ poly(ses, 2) + (1 | school)", "poly")):
        with pytest.raises(InputError, match=what):
            eng.statistics(data, formula)
    with pytest.raises(InputError, match="residual structures"):
        eng.statistics(data, "mAch ~ ses + (1 | school)", residual_variance_by="sector")
    with pytest.raises(DataError, match="not found"):
        eng.statistics(tmp_path / "missing.parquet", "mAch ~ ses + (1 | school)")
    with pytest.raises(InputError, match="not in the data"):
        eng.statistics(data, "mAch ~ nothere + (1 | school)")
    with pytest.raises(InputError, match="cannot read data of type"):
        eng.statistics({"a": 1}, "mAch ~ ses + (1 | school)")
    empty = pl.read_parquet(data).with_columns(pl.lit(None, dtype=pl.Float64).alias("mAch"))
    with pytest.raises(DataError, match="no rows left"):
        eng.statistics(empty, "mAch ~ ses + (1 | school)")


def test_cli_engine_polars(tmp_path):
    """`mlpipe fit --engine polars` and `mlpipe stats --engine polars`: the same fit."""
    data = DATA / "hsb82.parquet"
    formula = "mAch ~ ses * sector + (ses | school)"
    base = [sys.executable, "-m", "mlpipe"]
    out = {}
    for name, extra in (("duckdb", []), ("polars", ["--engine", "polars"])):
        proc = subprocess.run(base + ["fit", str(data), "-f", formula, "-q", "--out",
                                      str(tmp_path / name)] + extra,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert out["polars"]["deviance"] == pytest.approx(out["duckdb"]["deviance"], rel=1e-10)
    proc = subprocess.run(base + ["stats", str(data), "-f", formula, "--engine", "polars",
                                  "--out", str(tmp_path / "st.parquet")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    refit = mlpipe.fit(stats=tmp_path / "st.parquet")
    assert refit.deviance == pytest.approx(out["duckdb"]["deviance"], rel=1e-10)


@pytest.mark.parametrize("case", ["one_factor", "nested"])
def test_dask_splits_one_big_file_by_row_groups(case, cluster, tmp_path):
    """One Parquet file of many row groups becomes runs of row groups, one task each
    (read by pyarrow on the workers, the model's columns only); the merged partials equal
    DuckDB's one pass to 1e-12 and the fits to 1e-8."""
    import pyarrow.parquet as pq

    from mlpipe.engines.dask_engine import TASKS_PER_WORKER, split_parts

    src, formula = CASES[case]
    table = pl.read_parquet(DATA / src).to_arrow()
    one = tmp_path / "one.parquet"
    pq.write_table(table, one, row_group_size=max(1, table.num_rows // 37))
    groups = pq.ParquetFile(one).metadata.num_row_groups
    parts = split_parts([str(one)], 2)
    assert len(parts) == 2 * TASKS_PER_WORKER or len(parts) == groups
    assert sorted(g for _f, run in parts for g in run) == list(range(groups))
    duck = get_engine("duckdb").statistics(one, formula)
    from mlpipe import runlog

    with runlog.logging_to(tmp_path / "log.jsonl"):
        dask = get_engine("dask", EngineOptions(scheduler=cluster.scheduler_address)
                          ).statistics(one, formula)
    scan = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
            if json.loads(line)["stage"] == "scan"]
    assert scan[0]["tasks"] == len(parts)
    assert_same_statistics(duck, dask, 1e-12)
    assert_same_fit(mlpipe.fit(stats=duck, ddf=None), mlpipe.fit(stats=dask, ddf=None), 1e-8)
    # many files: one task per file, unsplit
    assert split_parts([str(one)] * 8, 2) == [str(one)] * 8


def test_dask_fit_through_the_api_and_an_empty_partition(cluster, tmp_path):
    """mlpipe.fit(..., engine="dask"): a file whose rows all lack the outcome adds nothing;
    Satterthwaite df as DuckDB's."""
    data = split(DATA / "hsb82.parquet", tmp_path / "parts", 4)
    empty = pl.read_parquet(DATA / "hsb82.parquet").head(50).with_columns(
        pl.lit(None, dtype=pl.Float64).alias("mAch"))
    empty.write_parquet(data / "part-99.parquet")
    formula = "mAch ~ ses + sector + (ses | school)"
    a = mlpipe.fit(data, formula)
    b = mlpipe.fit(data, formula, engine="dask", scheduler=cluster.scheduler_address)
    assert b.nobs == a.nobs == 7185 and b.rows_dropped == a.rows_dropped == 50
    assert_same_fit(a, b, 1e-8)
    np.testing.assert_allclose(b.fixed_effects["df"].to_numpy(),
                               a.fixed_effects["df"].to_numpy(), rtol=1e-6)


def test_dask_csv_files_and_a_bad_row_in_a_later_file(cluster, tmp_path):
    """CSV partitions work; a bad value deep in the third file is reported by the worker
    that read it, naming the file, line and column (and the client exits cleanly)."""
    data = split(DATA / "hsb82.parquet", tmp_path / "csv", 3, csv=True)
    formula = "mAch ~ ses + (1 | school)"
    opts = EngineOptions(scheduler=cluster.scheduler_address)
    a = mlpipe.fit(data, formula, ddf=None)
    b = mlpipe.fit(data, formula, ddf=None, engine="dask", scheduler=cluster.scheduler_address)
    assert_same_fit(a, b, 1e-8)
    bad = data / "part-02.csv"
    lines = bad.read_text().splitlines()
    head = lines[0].split(",")
    row = lines[2000].split(",")
    row[head.index("ses")] = "n/a?"
    lines[2000] = ",".join(row)
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        get_engine("dask", opts).statistics(data, formula)
    msg = str(err.value)
    assert "part-02.csv" in msg and "ses" in msg and "\n" not in msg


def test_dask_engine_refusals(tmp_path):
    """What the Dask engine does not distribute is refused before any cluster starts."""
    data = DATA / "hsb82.parquet"
    eng = get_engine("dask", EngineOptions(workers=2))
    with pytest.raises(InputError, match="center"):
        eng.statistics(data, "mAch ~ center(ses) + (1 | school)")
    with pytest.raises(InputError, match="residual structures"):
        eng.statistics(data, "mAch ~ ses + (1 | school)", correlation="ar1(ses | school)")
    with pytest.raises(InputError, match="give a path"):
        eng.statistics(pl.read_parquet(data), "mAch ~ ses + (1 | school)")
    with pytest.raises(InputError, match="Dask engine only"):
        get_engine("duckdb", EngineOptions(workers=2))
    with pytest.raises(InputError, match="unknown engine"):
        get_engine("spark")
    with pytest.raises(InputError, match="GLMMs"):
        mlpipe.fit(DATA / "glmm" / "cbpp.parquet", "cbind(incidence, size - incidence) ~ "
                   "period + (1 | herd)", family="binomial", engine="dask")
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        get_engine("dask", EngineOptions(scheduler="tcp://127.0.0.1:9")).statistics(
            data, "mAch ~ ses + (1 | school)")


def test_dask_survives_a_worker_killed_mid_run(tmp_path):
    """SIGKILL one of the two workers while its tasks run: Dask reruns them on the other
    (the nanny restarts the dead one) and the fit equals DuckDB's."""
    data = split(DATA / "multilevel" / "egsingle.parquet", tmp_path / "parts", 40)
    formula = "math ~ year + (year | schoolid/childid)"
    expected = get_engine("duckdb").statistics(data, formula)
    stats = run_killing_a_worker(
        lambda address: get_engine("dask", EngineOptions(scheduler=address)).statistics(
            data, formula),
        lambda client: any(client.processing().values()))
    assert_same_statistics(expected, stats, 1e-12)


def test_cli_engine_dask_with_its_own_local_cluster(tmp_path):
    """`mlpipe fit --engine dask --workers 2` starts (and stops) a LocalCluster of two
    processes; result.json equals the DuckDB run's to 1e-8; the engine is an option of
    configs too."""
    data = split(DATA / "hsb82.parquet", tmp_path / "parts", 3)
    formula = "mAch ~ ses * sector + (ses | school)"
    cmd = [sys.executable, "-m", "mlpipe", "fit", str(data), "-f", formula, "-q"]
    runs = {}
    for name, extra in (("duckdb", []), ("dask", ["--engine", "dask", "--workers", "2"])):
        proc = subprocess.run(cmd + ["--out", str(tmp_path / name)] + extra,
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    a, b = runs["duckdb"], runs["dask"]
    assert abs(a["deviance"] - b["deviance"]) <= 1e-8 * abs(a["deviance"])
    for x, y in zip(a["fixed_effects"], b["fixed_effects"]):
        assert abs(x["estimate"] - y["estimate"]) <= 1e-8 * max(1.0, abs(x["estimate"]))
    cfg = tmp_path / "dask.toml"
    cfg.write_text(f'data = "{data}"\nformula = "{formula}"\nengine = "dask"\n'
                   f'[dask]\nworkers = 2\n')
    proc = subprocess.run([sys.executable, "-m", "mlpipe", "fit", "--config", str(cfg), "-q",
                           "--out", str(tmp_path / "cfg")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    c = json.loads((tmp_path / "cfg" / "result.json").read_text())
    assert abs(c["deviance"] - a["deviance"]) <= 1e-8 * abs(a["deviance"])
    proc = subprocess.run(cmd + ["--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Dask engine only" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- reviewed edge cases

def _two_files(tmp_path, a: pl.DataFrame, b: pl.DataFrame, csv: bool = False) -> Path:
    d = tmp_path / "two"
    d.mkdir()
    for k, df in enumerate((a, b)):
        if csv:
            df.write_csv(d / f"p{k}.csv")
        else:
            df.write_parquet(d / f"p{k}.parquet")
    return d


def test_merge_of_labels_holding_colons_and_huge_integers(tmp_path):
    """Levels of a two-column factor whose text column holds ':' merge and sort by their
    column values (they raised a TypeError); BIGINT levels beyond 2^53 sort exactly."""
    from mlpipe.stats import Statistics, compute_statistics

    a = pl.DataFrame({"y": [1.0, 2, 3, 4], "g": ["a:b", "a:b", "c", "c"], "h": [9, 10, 9, 10]})
    b = pl.DataFrame({"y": [5.0, 6, 7, 8], "g": ["a:b", "c", "c", "a:b"], "h": [9, 9, 10, 10]})
    d = _two_files(tmp_path, a, b)
    f = "y ~ 1 + (1 | g:h)"
    whole = compute_statistics(d, f)
    merged = Statistics.combine([compute_statistics(p, f) for p in sorted(d.glob("*.parquet"))])
    assert list(merged.factors[0].levels) == list(whole.factors[0].levels) == \
        ["a:b:9", "a:b:10", "c:9", "c:10"]
    np.testing.assert_array_equal(merged.n_i, whole.n_i)
    big = -(2**63)
    c = pl.DataFrame({"y": [1.0, 2.0], "g": [big + 1, 5]}, schema={"y": pl.Float64,
                                                                   "g": pl.Int64})
    e = pl.DataFrame({"y": [3.0, 4.0], "g": [big, 5]}, schema={"y": pl.Float64, "g": pl.Int64})
    d2 = tmp_path / "big"
    d2.mkdir()
    c.write_parquet(d2 / "p0.parquet")
    e.write_parquet(d2 / "p1.parquet")
    merged = Statistics.combine([compute_statistics(p, "y ~ 1 + (1 | g)")
                                 for p in sorted(d2.glob("*.parquet"))])
    assert list(merged.levels) == list(compute_statistics(d2, "y ~ 1 + (1 | g)").levels) == \
        [str(big), str(big + 1), "5"]


def test_polars_internal_names_never_collide_with_data_columns():
    """Grouping columns named c1, n or idx (the engine's internal names before) group as
    DuckDB groups them."""
    r = np.random.default_rng(0)
    d = pl.DataFrame({"y": r.normal(size=120), "x": r.normal(size=120),
                      "c1": r.integers(0, 5, 120), "n": r.integers(0, 4, 120),
                      "idx": r.integers(0, 3, 120), "h": r.integers(0, 2, 120)})
    for formula in ("y ~ x + (1 | c1)", "y ~ x + (1 | n)", "y ~ x + (1 | idx) + (1 | h)"):
        assert_same_statistics(get_engine("duckdb").statistics(d, formula),
                               get_engine("polars").statistics(d, formula), 1e-12)


def test_polars_reads_files_as_duckdb_types_them(tmp_path):
    """CSV: a bad value in a numeric column is refused naming file, line and column (it
    made the column a factor), a column empty in one file stays numeric, a header-only file
    adds nothing; Parquet: files with int32/float32 beside int64/float64 are upcast; level
    labels are DuckDB's (1e-07, not 1e-7)."""
    r = np.random.default_rng(1)
    base = pl.DataFrame({"y": r.normal(size=40), "x": r.normal(size=40),
                         "g": r.integers(0, 4, 40)})
    empty_x = base.head(10).with_columns(pl.lit(None, dtype=pl.Float64).alias("x"))
    d = _two_files(tmp_path, base, empty_x, csv=True)
    (d / "p2.csv").write_text("y,x,g\n")
    f = "y ~ x + (1 | g)"
    assert_same_statistics(get_engine("duckdb").statistics(d, f),
                           get_engine("polars").statistics(d, f), 1e-12)
    lines = (d / "p0.csv").read_text().splitlines()
    lines[6] = lines[6].split(",")[0] + ",NA," + lines[6].split(",")[2]
    (d / "p0.csv").write_text("\n".join(lines) + "\n")
    for eng in ("duckdb", "polars"):
        with pytest.raises(DataError, match=r"p0.csv, line 7, column 'x': value 'NA'"):
            get_engine(eng).statistics(d, f)
    narrow = base.with_columns(pl.col("g").cast(pl.Int32), pl.col("x").cast(pl.Float32))
    d2 = tmp_path / "widths"
    d2.mkdir()
    base.write_parquet(d2 / "a.parquet")
    narrow.write_parquet(d2 / "b.parquet")
    assert_same_statistics(get_engine("duckdb").statistics(d2, f),
                           get_engine("polars").statistics(d2, f), 1e-12)
    tiny = pl.DataFrame({"y": [1.0, 2, 3, 4], "g": [1e-7, 1e-7, 2.0, 2.0]})
    assert list(get_engine("polars").statistics(tiny, "y ~ 1 + (1 | g)").levels) == \
        list(get_engine("duckdb").statistics(tiny, "y ~ 1 + (1 | g)").levels) == \
        ["1e-07", "2.0"]


def test_dask_reads_every_file_with_the_whole_inputs_types(cluster, tmp_path):
    """CSV ids that look numeric in one file and are text in another: the workers read
    every file as the client typed the whole input (they sniffed each file: BIGINT in one,
    and the statistics could not be merged); all files without complete rows give the
    one-line error; a bad scheduler address and too little memory per worker are refused."""
    r = np.random.default_rng(3)
    a = pl.DataFrame({"y": r.normal(size=60), "x": r.normal(size=60),
                      "s": r.choice(["1", "2", "10"], 60), "g": r.integers(0, 5, 60)})
    b = pl.DataFrame({"y": r.normal(size=200), "x": r.normal(size=200),
                      "s": r.choice(["a", "b", "1"], 200), "g": r.integers(0, 5, 200)})
    d = _two_files(tmp_path, a, b, csv=True)
    opts = EngineOptions(scheduler=cluster.scheduler_address)
    for f in ("y ~ x + (1 | s)", "y ~ x + s + (1 | g)"):
        duck = get_engine("duckdb").statistics(d, f)
        dask = get_engine("dask", opts).statistics(d, f)
        assert duck.group_types == dask.group_types
        assert_same_statistics(duck, dask, 1e-12)
    e = tmp_path / "empty"
    e.mkdir()
    for k in range(2):
        pl.DataFrame({"y": [1.0, 2.0], "x": [None, None], "g": [1, 2]},
                     schema_overrides={"x": pl.Float64}).write_parquet(e / f"p{k}.parquet")
    with pytest.raises(DataError, match="no rows left"):
        get_engine("dask", opts).statistics(e, "y ~ x + (1 | g)")
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        get_engine("dask", EngineOptions(scheduler="nonsense")).statistics(d, "y ~ x + (1 | g)")
    with pytest.raises(InputError, match="at least 512 MB"):
        get_engine("dask", EngineOptions(workers=2, memory_limit="100MB")).statistics(
            d, "y ~ x + (1 | g)")
