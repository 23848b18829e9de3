"""Identical inputs give byte-identical result.json, ranef.parquet and stats.parquet, whatever
the number of DuckDB threads.

Run-specific values (the optimizer's seconds, the timings, where and when it ran) are in
run.json, not in result.json.  Every floating-point sum of the scan (the per-group and
per-cell cross-products, the totals, the means of center() / group_mean(), the residual
summaries) is DuckDB's compensated fsum(), so the sums do not depend on how the rows are
split among threads: asserted here bit for bit at threads 1, 2, 4, 8 and DuckDB's default.
This is a tested property, not a proof (a compensated sum can in principle still differ in
the last bit near a rounding tie); `--threads 1` is the strict guarantee (README, "Outputs").
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
from mlpipe.stats import compute_statistics

HSB = Path(__file__).parent / "data" / "hsb82.parquet"
FILES = ("result.json", "ranef.parquet", "stats.parquet")
FORMULA = "mAch ~ meanses*cses + (cses | school)"
#: center() and group_mean(): their means are sums of the scan too
CENTRED = "mAch ~ group_mean(ses, by=school) + center(ses) + sector + (cses | school)"


def fit(capsys, out: Path, *extra, formula: str = FORMULA) -> None:
    code = main(["fit", str(HSB), "--formula", formula, "--out", str(out), "-q",
                 *map(str, extra)])
    assert code == 0, capsys.readouterr().err


def _bytes(d: Path, names=FILES) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in names}


def test_two_runs_give_identical_bytes(tmp_path, capsys):
    fit(capsys, tmp_path / "a", "--threads", 1)
    fit(capsys, tmp_path / "b", "--threads", 1)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    res = json.loads((tmp_path / "a" / "result.json").read_text())
    assert "seconds" not in res["optimizer"]
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["optimizer_seconds"] >= 0 and {"scan", "solve"} <= set(run["timings"])


@pytest.mark.parametrize("formula", [FORMULA, CENTRED], ids=["plain", "centred"])
def test_identical_bytes_at_any_thread_count(tmp_path, capsys, formula):
    """Default threads, --threads 1, 2, 4 (and the default again): the same bytes; with
    --residuals also the same residuals_by_group.parquet and scaled residuals."""
    names = FILES + ("residuals_by_group.parquet",)
    runs = {}
    for k, threads in enumerate((None, 1, 2, 4, None)):
        out = tmp_path / f"t{threads}_{k}"
        fit(capsys, out, "--residuals", *(("--threads", threads) if threads else ()),
            formula=formula)
        runs[(threads, k)] = _bytes(out, names)
    first = runs[(None, 0)]
    for key, got in runs.items():
        for name in names:
            assert got[name] == first[name], (key, name)


def test_rerun_in_place_and_in_a_subprocess(tmp_path, capsys):
    """The same result dir written again (by the command, in a subprocess, with another
    thread count) is unchanged."""
    fit(capsys, tmp_path / "a", "--threads", 1)
    before = _bytes(tmp_path / "a")
    subprocess.run([sys.executable, "-m", "mlpipe.cli", "fit", str(HSB), "--formula", FORMULA,
                    "--threads", "2", "--out", str(tmp_path / "a"), "-q"],
                   check=True, capture_output=True, timeout=120)
    assert _bytes(tmp_path / "a") == before


@pytest.fixture(scope="module")
def rows3m(tmp_path_factory):
    rng = np.random.default_rng(5)
    n, m = 3_000_000, 20_000
    g = rng.integers(0, m, n)
    h = rng.integers(0, 5, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=m)[g] + 0.3 * rng.normal(size=5)[h] + rng.normal(size=n)
    path = tmp_path_factory.mktemp("r3m") / "r.parquet"
    pq.write_table(pa.table({"g": g, "h": h, "x": x, "y": y}), path, row_group_size=100_000)
    return path


def _arrays(st):
    return np.concatenate([st.n_i, st.ztz.ravel(), st.ztx.ravel(), st.zty.ravel(), st.yty_i,
                           st.xtx.ravel(), st.xty, [st.yty, st.n]])


@pytest.mark.parametrize("formula", [
    "y ~ x + (x | g)",
    "y ~ center(x) + group_mean(x, by=g) + (center(x, by=g) | g)",
    "y ~ x + (x | g) + (1 | h)",  # per-cell statistics of two crossed factors
], ids=["one-factor", "centred", "crossed"])
def test_statistics_bit_identical_by_thread_count(rows3m, formula):
    """3M rows in 30 row groups: the statistics at threads 1, 2, 4, 8 are equal bit for bit
    (np.array_equal), per group, per cell and in total."""
    one = _arrays(compute_statistics(rows3m, formula, threads=1))
    assert np.isfinite(one).all()
    for threads in (2, 4, 8):
        other = _arrays(compute_statistics(rows3m, formula, threads=threads))
        assert np.array_equal(other, one), (threads, np.abs(other - one).max())
