"""Random effects on several grouping factors: nested, crossed, and both.

* lme4 references (tests/data/lme4/pastes_nested.json, penicillin_crossed.json and the cases
  of tests/data/multilevel/ made by its make_refs.R), REML and ML, with the core tolerances.
* Brute force: the deviance of the sparse blocked objective equals a dense marginal-likelihood
  computation from the raw rows for random θ, for each structure, on small random data.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlpipe
from conftest import (check_criterion, check_fixed_effects, dense_deviance, level_major_z,
                      listify)
from mlpipe.blocked import BlockedObjective
from mlpipe.stats import Statistics, compute_statistics

DATA = Path(__file__).parent / "data"
MULTI = DATA / "multilevel"
CORE = {"pastes_nested": DATA / "pastes.parquet", "penicillin_crossed": DATA / "penicillin.parquet"}
#: cases whose fit takes more than a few seconds: `make test-slow` runs them
SLOW = {"insteval_crossed", "insteval_nested_crossed"}
CASES = [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
         for c in sorted(CORE) + sorted(p.stem for p in MULTI.glob("*.json"))]


@cache
def reference(case: str) -> dict:
    path = DATA / "lme4" / f"{case}.json" if case in CORE else MULTI / f"{case}.json"
    return json.loads(path.read_text())


def data_file(case: str) -> Path:
    return CORE[case] if case in CORE else MULTI / f"{reference(case)['data']}.parquet"


@cache
def fitted(case: str, method: str):
    ref = reference(case)
    return mlpipe.fit(data_file(case), ref["formula"], method=method, ddf=None), \
        ref[method.lower()]


def _values(re: dict) -> np.ndarray:
    v = np.asarray(re["values"], dtype=float)
    return v.reshape(len(listify(re["levels"])), -1)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("case", CASES)
def test_against_lme4(case, method):
    res, ref = fitted(case, method)
    check_criterion(res, ref)
    # never worse than lme4: a lower lme4 criterion means mlpipe is wrong
    assert res.deviance <= ref["deviance_or_reml"] + 1e-6 * abs(ref["deviance_or_reml"])
    check_fixed_effects(res, ref)
    # variance components: per group, in lme4's order (the residual last)
    sd = {(r["group"], r["term"]): r["std_dev"] for r in res.random_effects.iter_rows(named=True)}
    cor = {}
    for r in res.random_correlations.iter_rows(named=True):
        cor[(r["group"], r["term1"], r["term2"])] = r["correlation"]
        cor[(r["group"], r["term2"], r["term1"])] = r["correlation"]
    # lme4 renames groups in VarCorr when a factor carries several terms (Dog.1, Dog.Side);
    # `reterms` (made by make_refs.R) gives the real factor of each term, in order
    names = list(dict.fromkeys(r["grp"] for r in ref["varcorr"] if r["grp"] != "Residual"))
    real = [t["group"] for t in ref.get("reterms", [])] or names
    rename = dict(zip(names, real))
    for row in ref["varcorr"]:
        grp = rename.get(row["grp"], row["grp"])
        if row["grp"] == "Residual":
            got = res.sigma
        elif row["var2"] is None:
            got = sd[(grp, row["var1"])]
        else:
            got = cor[(grp, row["var1"], row["var2"])]
        want = row["sdcor"]
        tol = 1e-3 * res.sigma if ref["singular"] else 1e-4 * res.sigma
        assert got == pytest.approx(want, rel=1e-3, abs=tol), row
    # conditional modes and SDs of every factor
    for re in ref["ranef"]:
        sub = res.ranef.filter(group=re["group"])
        terms = listify(re["terms"])
        levels = [str(v) for v in listify(re["levels"])]
        vals, sds = _values(re), np.asarray(re["cond_sd"], float).reshape(len(levels), -1)
        for t, term in enumerate(terms):
            mine = sub.filter(term=term)
            assert mine["level"].to_list() == levels
            est, csd = mine["estimate"].to_numpy(), mine["cond_sd"].to_numpy()
            # on the boundary (a variance at 0) the criterion is flat there: both fits only
            # agree to optimizer accuracy, in units of the residual SD
            floor = 1e-3 * res.sigma if ref["singular"] else 0.0
            np.testing.assert_allclose(est, vals[:, t], rtol=0,
                                       atol=max(1e-3 * sds[:, t].min(), floor))
            np.testing.assert_allclose(csd, sds[:, t], rtol=1e-3, atol=floor)


def test_summary_shows_every_factor_and_the_structure():
    res, _ = fitted("pastes_nested", "REML")
    text = res.summary()
    assert "Number of obs: 60, groups:  cask:batch, 30; batch, 10" in text
    assert "Random-effects structure: cask:batch (30 levels, 1 per level); batch (10 levels, " \
           "1 per level) contains cask:batch" in text
    assert res.optimizer.structure[1]["relations"] == {"cask:batch": "nested"}
    crossed, _ = fitted("penicillin_crossed", "REML")
    assert crossed.optimizer.structure[1]["relations"] == {"plate": "crossed"}


def test_statistics_round_trip_and_refit(tmp_path):
    """The per-cell statistics are saved with their factors and refit to the same answer."""
    res, _ = fitted("pastes_nested", "ML")
    res.stats.save(tmp_path / "s.parquet")
    back = Statistics.load(tmp_path / "s.parquet")
    assert [f.name for f in back.factors] == ["cask:batch", "batch"]
    for a, b in zip(res.stats.factors, back.factors):
        assert list(a.levels) == list(b.levels)
        np.testing.assert_array_equal(a.index, b.index)
    again = mlpipe.fit(stats=back, method="ML", ddf=None)
    assert again.deviance == pytest.approx(res.deviance, rel=1e-12)


def test_format_version_is_checked(tmp_path):
    res, _ = fitted("pastes_nested", "ML")
    path = tmp_path / "s.parquet"
    res.stats.save(path)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"mlpipe"])
    meta["format_version"] = 1
    pq.write_table(table.replace_schema_metadata({"mlpipe": json.dumps(meta)}), path)
    with pytest.raises(mlpipe.DataError, match="format version 1"):
        Statistics.load(path)


# ------------------------------------------------------------------ brute force

STRUCTURES = {
    # name: formula, and per factor (sorted by levels, largest first) its level key + columns
    "nested_slopes": "y ~ x + (x | school) + (x | school:class)",
    "three_levels": "y ~ x + (1 | school/class/pupil)",
    "crossed_slope": "y ~ x + (x | a) + (1 | b)",
    "nested_and_crossed": "y ~ x + (1 | class) + (1 | school) + (1 | hood)",
    "same_factor_twice": "y ~ x + (1 | school) + (0 + x | school) + (1 | b)",
}


def _simulate(rng, n=160):
    school = rng.integers(0, 5, n)
    klass = school * 10 + rng.integers(0, 3, n)  # nested in school
    pupil = klass * 10 + rng.integers(0, 4, n)  # nested in class
    a = rng.integers(0, 9, n)
    b = rng.integers(0, 4, n)  # crossed with a
    hood = rng.integers(0, 6, n)  # crossed with the schools
    x = rng.normal(size=n)
    y = 1 + x + rng.normal(size=5)[school] + rng.normal(size=50)[klass] * 0.5 \
        + rng.normal(size=9)[a] * x + rng.normal(size=6)[hood] + rng.normal(size=n)
    z = rng.normal(size=n)  # drawn last: the other columns stay as they were
    cols = {"y": y, "x": x, "school": school.astype(str), "class": klass, "pupil": pupil,
            "a": a, "b": [f"b{v}" for v in b], "hood": hood, "z": z}
    return cols


def _factor_keys(cols, f):
    return np.array([":".join(str(cols[c][i]) for c in f.columns) for i in range(len(cols["y"]))])


def _dense_zs(cols, obj, named):
    """Every factor's dense Z (rows × levels·q, level-major) in the objective's order; the
    objective orders a factor's levels as its columns sort (numbers numerically)."""
    zs = []
    for f in obj.factors:
        order = {lab: i for i, lab in enumerate(f.levels)}
        idx = np.array([order[k] for k in _factor_keys(cols, f)])
        zs.append(level_major_z(idx, [named[name] for name in f.names]))
    return zs


def _random_thetas(tm, seed: int, count: int = 3):
    """θs with diagonal entries in [0.2, 1.5] and off-diagonal ones in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield np.where(tm.diagonal, rng.uniform(0.2, 1.5, len(tm)),
                       rng.uniform(-0.5, 0.5, len(tm)))


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_blocked_deviance_matches_dense(tmp_path, structure, reml):
    rng = np.random.default_rng(sorted(STRUCTURES).index(structure))
    cols = _simulate(rng)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(cols), path)
    stats = compute_statistics(path, STRUCTURES[structure])
    assert stats.general
    obj = BlockedObjective(stats, reml=reml)
    n = len(cols["y"])
    X = np.column_stack([np.ones(n), cols["x"]])
    Zs = _dense_zs(cols, obj, {"(Intercept)": np.ones(n), "x": cols["x"]})
    for _ in range(3):
        theta = rng.uniform(0.2, 1.5, size=len(obj.theta_map))
        theta[~obj.theta_map.diagonal] = rng.normal(size=(~obj.theta_map.diagonal).sum())
        dense = dense_deviance(np.asarray(cols["y"]), X, Zs, obj.T_blocks(theta), reml)
        assert obj(theta) == pytest.approx(dense, rel=1e-10)


def test_variance_partition_of_random_intercepts():
    """The multilevel ICC: each level's variance over the total, from lme4's variances."""
    res, ref = fitted("pastes_nested", "REML")
    var = {r["grp"]: r["vcov"] for r in ref["varcorr"]}
    total = sum(var.values())
    got = {v["group"]: v["proportion"] for v in res.variance_partition}
    for grp, v in var.items():
        assert got[grp] == pytest.approx(v / total, rel=1e-3)
    assert ("Variance partition (share of the total variance): cask:batch 78.3%, "
            "batch 15.4%, Residual 6.3%") in res.summary()


def test_solver_memory_is_estimated_printed_and_bounded():
    """The solver's size is estimated before it is built, printed in the summary, and a
    structure above --memory-limit is refused with a one-line input error."""
    res, _ = fitted("penicillin_crossed", "REML")
    solver = res.optimizer.structure[0]["solver"]
    assert solver["order"] == 6 and solver["dense"]
    assert solver["update_terms"] == 24 * 6 * 6  # every plate meets all 6 samples
    assert "solver: Schur complement of order 6 (dense), 864 update terms" in res.summary()
    # 144 entries of B (24 plates x 6 samples; q1 = 1): 48 bytes each, and the dense
    # 6x6 Schur complement three times (S, its factor, its inverse); no update index arrays
    assert solver["bytes"] == 144 * 48 + 3 * 8 * 36
    # random intercepts only: the method of moments instead, saying why
    moments = mlpipe.fit(stats=res.stats, ddf=None, memory_limit="4KB")
    assert moments.method == "moments"
    assert "more than the memory limit 4KB" in moments.optimizer.messages[0]
    # with a random slope the moments do not apply: refused
    slope, _ = fitted("scotssec_crossed_slope", "REML")
    with pytest.raises(mlpipe.InputError, match="more than the memory limit 4KB"):
        mlpipe.fit(stats=slope.stats, ddf=None, memory_limit="4KB")


@pytest.mark.parametrize("formula", ["y ~ x + (x | school) + (1 | school:class)",
                                     "y ~ x + (x | a) + (1 | b)", "y ~ x + (x | a)"])
def test_statistics_merge_of_two_partitions_equals_one_pass(tmp_path, formula):
    """Statistics of two row partitions merged equal those of one pass over all rows, and
    fit to the same criterion (cells in both partitions combine; levels re-sort, numbers
    numerically)."""
    cols = _simulate(np.random.default_rng(3), n=300)
    table = pa.table(cols)
    pq.write_table(table, tmp_path / "all.parquet")
    pq.write_table(table.slice(0, 170), tmp_path / "a.parquet")
    pq.write_table(table.slice(170), tmp_path / "b.parquet")
    whole = compute_statistics(tmp_path / "all.parquet", formula)
    merged = compute_statistics(tmp_path / "a.parquet", formula).merge(
        compute_statistics(tmp_path / "b.parquet", formula))
    assert merged.n == whole.n and merged.m == whole.m
    np.testing.assert_allclose(merged.ztz, whole.ztz, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.ztx, whole.ztx, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.xtx, whole.xtx, rtol=1e-12)
    for f, g in zip(merged.factors, whole.factors):
        assert list(f.levels) == list(g.levels)
        np.testing.assert_array_equal(f.index, g.index)
    if not whole.factors:
        assert list(merged.levels) == list(whole.levels)
    a = mlpipe.fit(stats=merged, ddf=None)
    b = mlpipe.fit(stats=whole, ddf=None)
    assert a.deviance == pytest.approx(b.deviance, rel=1e-10)


def test_merge_refuses_different_models(tmp_path):
    cols = _simulate(np.random.default_rng(4))
    pq.write_table(pa.table(cols), tmp_path / "d.parquet")
    one = compute_statistics(tmp_path / "d.parquet", "y ~ x + (1 | a) + (1 | b)")
    two = compute_statistics(tmp_path / "d.parquet", "y ~ x + (x | a) + (1 | b)")
    with pytest.raises(mlpipe.InputError, match="different models"):
        one.merge(two)


@pytest.mark.parametrize("formula", [
    "y ~ x + (x | a) + (1 | b)",  # q1 = 2
    "y ~ x + (1 | class) + (1 | school) + (1 | hood)",  # q1 = 1, two factors in S
    "y ~ x + (1 + x + z | a) + (x | b)",  # q1 = 3 (the kernels' general loop)
])
@pytest.mark.parametrize("tile", [1, 3])
def test_dense_schur_tiles_give_the_same_fit(tmp_path, monkeypatch, formula, tile):
    """The dense Schur update S -= B̃B̃' and Ω₂₂B̃ run tile by tile of S, in parallel: with
    tiles of 1 or 3 rows (many tiles, every tile pair) the deviance, gradient and Ω entries
    equal the one-tile run's and the brute-force dense deviance."""
    import mlpipe._schur as schur

    cols = _simulate(np.random.default_rng(5))
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(cols), path)
    st = compute_statistics(path, formula)
    one = BlockedObjective(st)
    monkeypatch.setattr(schur, "TILE", tile)
    tiled = BlockedObjective(st)
    assert one._st.dense and one._st.cut.shape[1] == 2
    assert tiled._st.cut.shape[1] - 1 == -(-tiled._st.R // tile) >= 2
    n = len(cols["y"])
    X = np.column_stack([np.ones(n), cols["x"]])
    Zs = _dense_zs(cols, one, {"(Intercept)": np.ones(n), "x": cols["x"], "z": cols["z"]})
    for theta in _random_thetas(one.theta_map, 2):
        f1, g1 = one.value_and_gradient(theta)
        ft, gt = tiled.value_and_gradient(theta)
        assert ft == pytest.approx(f1, rel=1e-12)
        assert ft == pytest.approx(dense_deviance(np.asarray(cols["y"]), X, Zs,
                                                  one.T_blocks(theta), True), rel=1e-10)
        np.testing.assert_allclose(gt, g1, rtol=1e-9, atol=1e-10 * abs(f1))
        for o1, ot in zip(one.pair_omegas(one.decompose(theta).solver),
                          tiled.pair_omegas(tiled.decompose(theta).solver)):
            np.testing.assert_allclose(ot, o1, rtol=1e-10, atol=1e-13)


SCHUR_CASES = ["pastes_nested", "penicillin_crossed", "egsingle_growth",
               "tvbo_nested_crossed", "scotssec_crossed_slope"]


@pytest.mark.parametrize("case", SCHUR_CASES)
def test_sparse_and_dense_schur_paths_agree(case, monkeypatch):
    """The Schur complement onto the smaller factors is factored densely (LAPACK) or as a
    sparse LDL' with its selected inverse (QDLDL) depending on its size; both give the same
    deviance, gradient, entries of Ω and conditional modes at random θ (the references are
    small enough for the dense path, so the sparse one is forced here)."""
    import mlpipe._schur as schur

    st = compute_statistics(data_file(case), reference(case)["formula"])
    obj_dense = BlockedObjective(st)
    monkeypatch.setattr(schur, "DENSE_SMALL", 0)
    monkeypatch.setattr(schur, "DENSE_MAX", 0)
    obj_sparse = BlockedObjective(st)
    assert obj_dense._st.dense and not obj_sparse._st.dense
    for theta in _random_thetas(obj_dense.theta_map, 1):
        fd, gd = obj_dense.value_and_gradient(theta)
        fs, gs = obj_sparse.value_and_gradient(theta)
        assert np.isfinite(fd) and fs == pytest.approx(fd, rel=1e-11)
        np.testing.assert_allclose(gs, gd, rtol=1e-7, atol=1e-8 * abs(fd))
        dd, ds = obj_dense.decompose(theta), obj_sparse.decompose(theta)
        np.testing.assert_allclose(ds.u, dd.u, rtol=1e-8, atol=1e-10)
        for od, os_ in zip(obj_dense.pair_omegas(dd.solver), obj_sparse.pair_omegas(ds.solver)):
            np.testing.assert_allclose(os_, od, rtol=1e-8, atol=1e-11)


def test_a_decomposition_is_not_changed_by_later_evaluations(tmp_path):
    """A kept decomposition owns its factorization: evaluating the objective at another θ
    afterwards leaves its conditional SDs unchanged (sparse Schur path: 700 classes, so the
    Schur complement of order 700 is factored by QDLDL)."""
    rng = np.random.default_rng(4)
    c = np.repeat(np.arange(700), 6)
    s = np.tile(np.repeat(np.arange(3), 2), 700)
    y = rng.normal(size=700)[c] + rng.normal(size=2100)[c * 3 + s] + rng.normal(size=4200)
    pq.write_table(pa.table({"y": y, "c": c, "s": s}), tmp_path / "d.parquet")
    st = compute_statistics(tmp_path / "d.parquet", "y ~ 1 + (1 | c) + (1 | c:s)")
    obj = BlockedObjective(st)
    assert not obj._st.dense
    dec = obj.decompose(np.array([1.0, 1.0]))
    before = [m["cond_sd"].copy() for m in obj.conditional_modes(dec, 1.0)]
    obj(np.array([0.1, 3.0]))
    obj.value_and_gradient(np.array([2.0, 0.5]))
    after = [m["cond_sd"] for m in obj.conditional_modes(dec, 1.0)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_sparse_factor_estimate_counts_the_fill_of_crossed_factors():
    """The sparse path's factor is estimated as filled when the rest's levels are linked
    like a crossed design (many entries per row), as the pattern's size along a tree."""
    from mlpipe._schur import FILL_DEGREE, factor_entries

    R = 84_000
    assert factor_entries(R, 74_000_000) == R * (R + 1) // 2  # crossed: fills in
    assert factor_entries(R, 3 * R) == 3 * R  # nested: a few entries per row
    assert factor_entries(R, R + FILL_DEGREE * R // 2) == R + FILL_DEGREE * R // 2
    assert factor_entries(100, 10**6) == 100 * 101 // 2  # never more than the triangle


def test_solver_estimate_of_a_nested_structure_counts_distinct_blocks():
    """(t|school) + (t|school:child) with 200k children in 2,000 schools: 800k update terms,
    all landing in the schools' own 2x2 blocks, so the sparse factor is small — the estimate
    must not take the update terms (with their repeats) for its pattern (it did, and refused
    a 20M-row nested fit as needing 26 GB).  Crossed levels keep their many distinct terms."""
    from mlpipe._schur import estimate

    rng = np.random.default_rng(3)
    children, schools = 200_000, 2_000
    school_of = np.arange(children) % schools
    blocks = np.ones((2, 2, children))
    nested = [(0, 0, np.arange(children), np.arange(children), blocks),
              (1, 0, school_of, np.arange(children), blocks),
              (1, 1, np.arange(schools), np.arange(schools), np.ones((2, 2, schools)))]
    est = estimate([2, 2], [children, schools], nested)
    assert est["update_terms"] == 4 * children
    assert not est["dense"]
    assert est["bytes"] < 100e6  # 39 MB; with the repeats taken for the pattern, 294 MB
    # crossed: every level of factor 0 meets 20 random levels of a 2,000-level factor
    k = 20
    rows = rng.integers(0, schools, size=(children, k)).ravel()
    cols = np.repeat(np.arange(children), k)
    crossed = [(0, 0, np.arange(children), np.arange(children), np.ones((1, 1, children))),
               (1, 0, rows, cols, np.ones((1, 1, len(rows)))),
               (1, 1, np.arange(schools), np.arange(schools), np.ones((1, 1, schools)))]
    est = estimate([1, 1], [children, schools], crossed)
    assert est["dense"]  # 2,000 levels linked 80M times: S fills


def test_pair_levels_equal_numpy_unique():
    """The counting-sort pairing of two level indices gives np.unique's pairs and inverse."""
    from mlpipe._levels_jit import level_order, pair_levels

    rng = np.random.default_rng(3)
    for mj, mk, n in [(7, 5, 200), (1, 300, 50), (400, 3, 1000)]:
        ij, ik = rng.integers(0, mj, n), rng.integers(0, mk, n)
        uniq, inv = np.unique(ij * mk + ik, return_inverse=True)
        rows, cols, inverse = pair_levels(ij, ik, mj, mk)
        np.testing.assert_array_equal(rows, uniq // mk)
        np.testing.assert_array_equal(cols, uniq % mk)
        np.testing.assert_array_equal(inverse, inv.reshape(-1))
        np.testing.assert_array_equal(level_order(ij, mj), np.argsort(ij, kind="stable"))


def test_fits_in_several_threads_equal_one_at_a_time():
    """The solver's parallel kernels (numba prange) are entered by one fit at a time: fits
    of a crossed model in three Python threads at once give the sequential fit's numbers."""
    import threading

    st = compute_statistics(data_file("penicillin_crossed"),
                            reference("penicillin_crossed")["formula"])
    alone = mlpipe.fit(stats=st, ddf=None)
    out, errors = [], []

    def work():
        try:
            for _ in range(3):
                out.append(mlpipe.fit(stats=st, ddf=None))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 9
    for res in out:
        assert res.deviance == alone.deviance
        np.testing.assert_array_equal(res.optimizer.final_theta, alone.optimizer.final_theta)


# ---------------------------------------------------------------------- Newton's information

INFORMATION_CASES = [
    # (data, formula, largest relative error against the difference Hessian at the optimum)
    ("penicillin.parquet", "diameter ~ 1 + (1|plate) + (1|sample)", 1e-4),
    ("pastes.parquet", "strength ~ 1 + (1|batch/cask)", 1e-4),
    ("multilevel/insteval.parquet", "y ~ service + (1 | s) + (1 | d) + (1 | dept)", 2e-2),
    ("multilevel/egsingle.parquet",
     "math ~ year + (year|schoolid) + (year|schoolid:childid)", 5e-2),
]


@pytest.mark.parametrize("path, formula, tol", INFORMATION_CASES,
                         ids=[c[0].split("/")[-1].split(".")[0] for c in INFORMATION_CASES])
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_information_approximates_the_hessian_at_the_optimum(path, formula, tol, reml):
    """The average information (σ² profiled) against the Hessian by differences of the
    exact gradient at the optimum; and the same deviance and gradient as
    `value_and_gradient`."""
    from mlpipe import optimize

    st = compute_statistics(DATA / path, formula)
    obj = BlockedObjective(st, reml=reml)
    x = np.asarray(optimize.optimize(obj).final_theta)
    f, g, info = obj.value_gradient_information(x)
    f2, g2 = obj.value_and_gradient(x)
    assert f == f2
    np.testing.assert_allclose(g, g2, rtol=0, atol=1e-12 * abs(f))
    hess = optimize._hessian(obj, x, g, np.arange(len(x)))
    # under ML the projected (REML) form is an approximation of ML's own information
    tol = tol if reml else max(tol, 1e-2)
    assert np.linalg.norm(info - hess) <= tol * np.linalg.norm(hess)
    assert np.all(np.linalg.eigvalsh(info) > 0)


@pytest.mark.parametrize("path, formula, reml", [
    ("multilevel/insteval.parquet", "y ~ service + (1 | s) + (1 | d) + (1 | dept)", True),
    ("multilevel/egsingle.parquet",
     "math ~ year + (year|schoolid) + (year|schoolid:childid)", False),
    ("multilevel/scotssec.parquet", "attain ~ verbal + sex + (1|primary) + (1|second)", True),
    # a variance near 0: the information fails the secant test and differences take over
    ("multilevel/pixel.parquet", "pixel ~ day + I(day^2) + (day|Dog) + (1|Dog:Side)", False),
    ("multilevel/insteval.parquet", "y ~ service + (1 | s) + (1 | d/dept)", False),
], ids=["insteval", "egsingle-ml", "scotssec", "pixel-ml", "insteval-nested-ml"])
def test_newton_with_the_information_reaches_the_same_optimum(path, formula, reml):
    """Newton with the information as its Hessian against Newton with difference Hessians
    alone (`information_pays` off): the same criterion to
    1e-11 relative (pixel's flat optimum: the criterion's round-off, ~1e-12 relative, is
    what the last steps meet), and on the models away from the boundary fewer evaluations."""
    from mlpipe import optimize

    st = compute_statistics(DATA / path, formula)
    with_info = optimize.optimize(BlockedObjective(st, reml=reml))
    plain = BlockedObjective(st, reml=reml)
    assert with_info.evaluations and plain.information_pays  # these models: dense blocks
    plain.information_pays = False  # `_newton` falls back to differences
    without = optimize.optimize(plain)
    assert with_info.converged and without.converged
    assert abs(with_info.final_objective - without.final_objective) <= \
        1e-11 * abs(without.final_objective)
    if "pixel" not in path and "d/dept" not in formula:
        assert with_info.evaluations < without.evaluations


def test_nested_newton_with_the_information_takes_fewer_evaluations(monkeypatch):
    """Children nested in many schools (a sparse Schur complement of order 2 × 5,000): Newton
    with the information reaches the optimum of Newton with difference Hessians, in fewer
    evaluations (a difference Hessian costs one gradient per entry of θ); a structure whose
    information would keep more than INFO_KEPT_BYTES takes the differences."""
    from mlpipe import optimize

    rng = np.random.default_rng(3)
    school = np.repeat(np.arange(5000), 6)
    child = np.arange(len(school)) // 3
    t = np.tile(np.arange(3.0), len(school) // 3)
    y = rng.normal(size=5000)[school] + 0.3 * rng.normal(size=5000)[school] * t \
        + rng.normal(size=len(t) // 3)[child] + t + rng.normal(size=len(t))
    st = compute_statistics(pa.table({"y": y, "t": t, "school": school, "child": child}),
                            "y ~ t + (t | school) + (1 | child)")
    nested = BlockedObjective(st)
    assert not nested.size["dense"] and nested.information_pays
    # what the information keeps (Λ'Z'ZŴ per θ entry, Ŵ): above INFO_KEPT_BYTES, differences
    from mlpipe import blocked

    kept = 8 * sum(nested.Q + nested.factors[k].m * nested.factors[k].q
                   for k, _r, _c in nested.params)
    # Q = 2·5000 (school) + 10,000 (child); 3 entries on school, 1 on child
    assert kept == 8 * (4 * 20000 + 3 * 10000 + 10000)
    monkeypatch.setattr(blocked, "INFO_KEPT_BYTES", kept - 1)
    plain = BlockedObjective(st)
    assert not plain.information_pays
    a, b = optimize.optimize(nested), optimize.optimize(plain)
    assert a.converged and b.converged
    assert abs(a.final_objective - b.final_objective) <= 1e-11 * abs(b.final_objective)
    assert a.evaluations < b.evaluations


def test_the_warm_up_statistics_are_the_pass_of_its_rows():
    # blocked.warm_statistics sums its 48 rows with NumPy (no second DuckDB database beside
    # the scan); the statistics pass over the same rows gives the same value
    from mlpipe.blocked import warm_statistics

    rng = np.random.default_rng(0)
    n = 48
    y, x = rng.normal(size=n), rng.normal(size=n)
    table = pa.table({"y": y, "x": x, "g": np.arange(n) % 8, "h": np.arange(n) % 3})
    ref = compute_statistics(table, "y ~ x + (x | g) + (1 | h)", threads=1)
    got = warm_statistics()
    for k in ("n_i", "ztz", "ztx", "zty", "yty_i", "xtx", "xty", "levels"):
        np.testing.assert_allclose(getattr(got, k), getattr(ref, k), rtol=1e-13, atol=1e-13,
                                   err_msg=k)
    assert got.yty == pytest.approx(ref.yty, rel=1e-13)
    assert (got.n, got.formula, got.random_names, got.fixed_names) == (
        ref.n, ref.formula, ref.random_names, ref.fixed_names)
    for a, b in zip(got.factors, ref.factors, strict=True):
        assert (a.name, a.columns, a.z, a.names, a.blocks) == (b.name, b.columns, b.z, b.names,
                                                                b.blocks)
        np.testing.assert_array_equal(a.index, b.index)
        assert list(a.levels) == list(b.levels)


@pytest.mark.parametrize("formula, keys", [
    ("y ~ x + (x | a) + (1 | c)", ["a", "c"]),
    ("y ~ x + (1 | a) + (1 | a:b)", ["a", "b"]),
    ("y ~ x + (1 | a) + (1 | a:b) + (1 | c)", ["a", "b", "c"]),
    ("y ~ x + (1 | b:a) + (1 | c)", ["b", "a", "c"]),
    ("y ~ x + (1 | c) + (x || a) + (1 | b)", ["c", "a", "b"]),
])
def test_cells_are_in_the_order_of_their_grouping_columns(tmp_path, formula, keys):
    # the cells come out of DuckDB's hash aggregate unsorted and are put in order by
    # counting sorts of their level indices (stats._order_cells): the same order as
    # ORDER BY the grouping columns, whatever the factors' structure
    import duckdb

    rng = np.random.default_rng(3)
    n = 5000
    path = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"a": rng.integers(0, 30, n).astype(str),
                             "b": rng.integers(0, 7, n), "c": rng.integers(-25, 25, n),
                             "x": rng.normal(size=n), "y": rng.normal(size=n)}), path)
    st = compute_statistics(str(path), formula)
    cols = ", ".join(keys)
    n_i, sy = duckdb.sql(f"SELECT count(*), sum(y) FROM read_parquet('{path}') "
                         f"GROUP BY {cols} ORDER BY {cols}").fetchnumpy().values()
    np.testing.assert_array_equal(st.n_i, n_i)
    np.testing.assert_allclose(st.zty[0], sy, rtol=1e-12, atol=1e-12)
    for f in st.factors:  # every factor's index covers its levels
        assert f.index.min() == 0 and f.index.max() == f.m - 1
