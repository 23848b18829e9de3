"""`--keep-on-workers` (mlpipe/engines/dask_solve.py): the per-group statistics stay on the
Dask workers and every evaluation maps over them; the fit equals the one-machine fit.

Real parts: DuckDB on the workers, a `LocalCluster` of two worker processes, Parquet files
whose rows are shuffled so every group spans several files (its pieces are merged on the
worker that holds its partition)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.errors import InputError

from conftest import run_killing_a_worker, split  # noqa: E402  (and `cluster`)

DATA = Path(__file__).parent / "data"


def modes(result) -> pl.DataFrame:
    return (result.ranef_frame().select(pl.col("level").cast(pl.Utf8), "term", "estimate",
                                        "cond_sd").sort("level", "term"))


CASES = {  # data, formula, method, options
    "slopes_reml": ("hsb82.parquet", "mAch ~ meanses*cses + sector*cses + (cses | school)",
                    "REML"),
    "sleep_ml": ("sleepstudy.parquet", "Reaction ~ Days + (Days | Subject)", "ML"),
    "uncorrelated": ("sleepstudy.parquet", "Reaction ~ Days + (Days || Subject)", "REML"),
    "intercept_factor": ("hsb82.parquet", "mAch ~ ses + factor(sector) + (1 | school)",
                         "REML"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_on_workers_equals_the_one_machine_fit(case, cluster, tmp_path):
    name, formula, method = CASES[case]
    data = split(DATA / name, tmp_path / "parts", 5)
    a = mlpipe.fit(data, formula, method=method, ci="wald")
    b = mlpipe.fit(data, formula, method=method, ci="wald", engine="dask",
                   scheduler=cluster.scheduler_address, keep_on_workers=True)
    assert b.stats is None and isinstance(b.ranef, pl.LazyFrame)  # nothing per group here
    assert b.groups == a.groups and b.nobs == a.nobs
    assert abs(b.deviance - a.deviance) <= 1e-10 * abs(a.deviance)
    for col, tol in (("estimate", 1e-7), ("std_error", 1e-7), ("t_value", 1e-7),
                     ("df", 1e-6)):
        np.testing.assert_allclose(b.fixed_effects[col].to_numpy(),
                                   a.fixed_effects[col].to_numpy(), rtol=tol, err_msg=col)
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.random_effects["variance"].to_numpy(),
                               a.random_effects["variance"].to_numpy(), rtol=1e-5)
    ma, mb = modes(a), modes(b)
    assert ma["level"].to_list() == mb["level"].to_list()
    np.testing.assert_allclose(mb["estimate"].to_numpy(), ma["estimate"].to_numpy(),
                               rtol=1e-5, atol=1e-6 * float(np.abs(ma["estimate"]).max()))
    np.testing.assert_allclose(mb["cond_sd"].to_numpy(), ma["cond_sd"].to_numpy(), rtol=1e-5)
    ca, cb = a.confidence_intervals, b.confidence_intervals
    assert ca["parameter"].to_list() == cb["parameter"].to_list()
    for col in ("lower", "upper"):
        np.testing.assert_allclose(cb[col].to_numpy(), ca[col].to_numpy(), rtol=1e-4,
                                   atol=1e-6)
    assert b.optimizer.converged == a.optimizer.converged


def test_written_result_predicts_as_the_one_machine_fit(cluster, tmp_path):
    """The result directory holds the workers' modes (no stats.parquet); `mlpipe predict`
    on it gives the one-machine fit's predictions."""
    formula = "Reaction ~ Days + (Days | Subject)"
    data = split(DATA / "sleepstudy.parquet", tmp_path / "parts", 3, seed=1)
    a = mlpipe.fit(data, formula)
    b = mlpipe.fit(data, formula, engine="dask", scheduler=cluster.scheduler_address,
                   keep_on_workers=True)
    a.write(tmp_path / "a")
    b.write(tmp_path / "b")
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert "ranef.parquet" in files and "stats.parquet" not in files
    rj = json.loads((tmp_path / "b" / "result.json").read_text())
    assert rj["groups"] == {"Subject": 18}
    assert pl.read_parquet(tmp_path / "b" / "ranef.parquet").height == 36
    from mlpipe.predict import predict

    predict(tmp_path / "a", DATA / "sleepstudy.parquet", tmp_path / "pa.parquet")
    predict(tmp_path / "b", DATA / "sleepstudy.parquet", tmp_path / "pb.parquet")
    ya = pl.read_parquet(tmp_path / "pa.parquet")["fitted"].to_numpy()
    yb = pl.read_parquet(tmp_path / "pb.parquet")["fitted"].to_numpy()
    np.testing.assert_allclose(yb, ya, rtol=1e-7)
    assert "Subject" in b.summary() and "Number of obs: 180, groups:  Subject, 18" in b.summary()


def test_cli_keep_on_workers(cluster, tmp_path):
    data = split(DATA / "hsb82.parquet", tmp_path / "parts", 4, seed=2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlpipe", "fit", str(data), "--formula",
           "mAch ~ ses + (1 | school)", "--engine", "dask", "--scheduler",
           cluster.scheduler_address, "--keep-on-workers", "--out", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = mlpipe.fit(DATA / "hsb82.parquet", "mAch ~ ses + (1 | school)")
    rj = json.loads((out / "result.json").read_text())
    assert abs(rj["deviance"] - ref.deviance) <= 1e-10 * ref.deviance
    assert rj["groups"] == {"school": 160}


def test_keep_on_workers_refusals(cluster, tmp_path):
    data = split(DATA / "sleepstudy.parquet", tmp_path / "parts", 2)
    dask = dict(engine="dask", scheduler=cluster.scheduler_address, keep_on_workers=True)
    with pytest.raises(InputError, match="use it with --engine dask"):
        mlpipe.fit(data, "Reaction ~ Days + (1 | Subject)", keep_on_workers=True)
    with pytest.raises(InputError, match="Kenward-Roger"):
        mlpipe.fit(data, "Reaction ~ Days + (1 | Subject)", ddf="kenward-roger", **dask)
    with pytest.raises(InputError, match="profile intervals"):
        mlpipe.fit(data, "Reaction ~ Days + (1 | Subject)", ci="profile", **dask)
    with pytest.raises(InputError, match="one grouping factor"):
        mlpipe.fit(data, "Reaction ~ Days + (1 | Subject) + (1 | Days)", **dask)
    with pytest.raises(InputError, match="residual structures"):
        mlpipe.fit(data, "Reaction ~ Days + (1 | Subject)",
                   correlation="ar1(Days | Subject)", **dask)
    empty = tmp_path / "empty"
    empty.mkdir()
    pl.DataFrame({"y": [None, None, None], "g": [1, 2, 3]},
                 schema={"y": pl.Float64, "g": pl.Int64}).write_parquet(empty / "a.parquet")
    from mlpipe.errors import DataError

    with pytest.raises(DataError, match="no rows left"):
        mlpipe.fit(empty, "y ~ 1 + (1 | g)", **dask)
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x.parquet"\nformula = "y ~ 1 + (1|g)"\n[dask]\n'
                   'keep_on_workers = "yes"\n')
    from mlpipe.config import load_config

    with pytest.raises(InputError, match=r"\[dask\] keep_on_workers must be true or false"):
        load_config(bad)


def test_a_worker_killed_mid_optimization_is_survived(tmp_path):
    """SIGKILL a worker while the optimizer's map rounds run: Dask recomputes the lost
    partitions from the scan's tasks on the other worker (the nanny restarts the dead one)
    and the fit equals the one-machine fit."""
    rng = np.random.default_rng(7)
    m, per = 4000, 25
    g = np.repeat(np.arange(m), per)
    x = rng.normal(size=m * per)
    y = 1 + 0.5 * x + rng.normal(size=m)[g] + 0.3 * rng.normal(size=m)[g] * x \
        + rng.normal(size=m * per)
    df = pl.DataFrame({"g": g, "x": x, "y": y})
    src = tmp_path / "all.parquet"
    df.write_parquet(src)
    data = split(src, tmp_path / "parts", 6)
    formula = "y ~ x + (x | g)"
    expected = mlpipe.fit(data, formula)

    def evaluating(client) -> bool:  # an evaluation round (Partition method calls) runs
        return any(str(k).startswith(("('_call", "_call"))
                   for keys in client.processing().values() for k in keys)

    b = run_killing_a_worker(
        lambda address: mlpipe.fit(data, formula, engine="dask", keep_on_workers=True,
                                   scheduler=address), evaluating)
    assert abs(b.deviance - expected.deviance) <= 1e-10 * abs(expected.deviance)
    np.testing.assert_allclose(b.fixed_effects["estimate"].to_numpy(),
                               expected.fixed_effects["estimate"].to_numpy(), rtol=1e-7)
