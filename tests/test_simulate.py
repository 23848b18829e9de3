"""The simulator, and a fit of what it writes recovering the truth (plus the solver's
gradient and Newton optimizer checked on the same data)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import mlpipe
from mlpipe.cli import main as cli_main
from mlpipe.objective import Objective
from mlpipe.optimize import optimize
from mlpipe.simulate import compare_to_truth, simulate

ROWS, GROUPS, PARTS = 20_000, 400, 4


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    out = tmp_path_factory.mktemp("panel")
    truth = simulate(out, rows=ROWS, groups=GROUPS, partitions=PARTS, seed=7)
    return out, truth


@pytest.fixture(scope="module")
def fitted(panel):
    out, truth = panel
    return mlpipe.fit(out, truth["formula"])


def test_files_are_partitioned_by_group(panel):
    out, truth = panel
    files = sorted(out.glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{k:03d}.parquet" for k in range(PARTS)]
    assert json.loads((out / "truth.json").read_text()) == truth
    seen: set[int] = set()
    total = 0
    for f in files:
        t = pq.read_table(f)
        assert t.schema.names == ["g", "x", "w", "y"]
        assert str(t.schema.field("g").type) == "int64"
        g = t.column("g").to_numpy()
        groups = set(np.unique(g).tolist())
        assert not groups & seen  # every group's rows sit in exactly one partition
        seen |= groups
        total += t.num_rows
        # w is a level-2 covariate: constant within each group
        w = t.column("w").to_numpy()
        order = np.argsort(g, kind="stable")
        gs, ws = g[order], w[order]
        starts = np.r_[0, np.flatnonzero(np.diff(gs)) + 1]
        assert np.all(ws == np.repeat(ws[starts], np.diff(np.r_[starts, len(gs)])))
        assert np.all(np.diff(np.r_[starts, len(gs)]) >= 2)  # at least 2 rows per group
    assert total == ROWS
    assert seen == set(range(GROUPS))


def test_fit_recovers_the_truth(panel, fitted):
    _, truth = panel
    assert fitted.converged
    assert fitted.nobs == ROWS and fitted.groups == {"g": GROUPS}
    rows = compare_to_truth(fitted, truth)
    assert [r["parameter"] for r in rows] == ["(Intercept)", "x", "w", "x:w",
                                              "tau00", "tau01", "tau11", "sigma"]
    for r in rows:
        assert r["se"] > 0
        assert abs(r["z"]) <= 4, r


def test_analytic_gradient_matches_finite_differences(fitted):
    for reml in (True, False):
        obj = Objective(fitted.stats, reml=reml)
        for theta in (np.array([0.8, -0.2, 0.5]), np.asarray(fitted.theta) * 1.3):
            f, g = obj.value_and_gradient(theta)
            assert f == pytest.approx(obj(theta), rel=1e-12)
            fd = []
            for j in range(3):
                h = 1e-4 * max(abs(theta[j]), 0.1)
                e = np.zeros(3)
                e[j] = h
                fd.append((-obj(theta + 2 * e) + 8 * obj(theta + e) - 8 * obj(theta - e)
                           + obj(theta - 2 * e)) / (12 * h))
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6 * abs(f))


def test_newton_and_bobyqa_agree(fitted):
    newton = optimize(Objective(fitted.stats, reml=True))
    bobyqa = optimize(Objective(fitted.stats, reml=True), method="bobyqa")
    assert newton.converged and bobyqa.converged
    assert newton.optimizer == "newton"
    assert newton.final_objective <= bobyqa.final_objective + 1e-8
    np.testing.assert_allclose(newton.final_theta, bobyqa.final_theta, atol=1e-4)
    assert newton.evaluations < bobyqa.evaluations


def test_cli_simulate(tmp_path, capsys):
    assert cli_main(["simulate", str(tmp_path / "p"), "--rows", "300", "--groups", "30",
                     "--partitions", "3", "--seed", "2"]) == 0
    assert len(list((tmp_path / "p").glob("part-*.parquet"))) == 3
    assert "truth" in capsys.readouterr().out
    # too few rows for the groups is bad input, not a crash
    assert cli_main(["simulate", str(tmp_path / "q"), "--rows", "10", "--groups", "30"]) == 2
