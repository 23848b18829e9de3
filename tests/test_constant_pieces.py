"""The statistics pass takes pieces constant within cells (level-2 predictors, the dummies of
a level-2 factor, group means by a grouping column) out of its sums: Σ w·x = w Σ x per cell
(mlpipe/stats.py, FACTOR_SAMPLE_ROWS).  Real DuckDB over real Parquet: the statistics with
and without it agree to rounding, the probe proposes only what the data show, and a piece
the probe took for constant that varies within a cell further on sends the pass back to
every sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlpipe
import mlpipe.stats as S

DATA = Path(__file__).parent / "data"
HSB = str(DATA / "hsb82.parquet")
ARRAYS = ["ztz", "ztx", "zty", "n_i", "yty_i", "xtx", "xty"]


def _both(monkeypatch, data, formula, **kw):
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 100_000)
    fact = S.compute_statistics(data, formula, **kw)
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 0)
    plain = S.compute_statistics(data, formula, **kw)
    return fact, plain


def _assert_same(a, b, rtol=1e-13):
    for k in ARRAYS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.shape == y.shape, k
        scale = np.abs(y).max() if y.size else 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=k)
    assert a.yty == b.yty and a.n == b.n and a.rows_read == b.rows_read
    assert a.log_weights == pytest.approx(b.log_weights, rel=1e-14)


def test_level2_predictors_are_factored_out_on_hsb(monkeypatch):
    # sector's dummy and meanses are school-level; ses and the cross-level interaction's
    # ses piece are not
    f = "mAch ~ ses * sector + meanses + (ses | school)"
    fact, plain = _both(monkeypatch, HSB, f)
    assert fact.constant_pieces == 2 and plain.constant_pieces == 0
    _assert_same(fact, plain)


def test_level1_predictors_are_not_proposed(monkeypatch):
    fact, plain = _both(monkeypatch, HSB, "mAch ~ ses + cses + (1 | school)")
    assert fact.constant_pieces == 0
    _assert_same(fact, plain, rtol=0)


def test_group_means_and_centring_by_the_grouping_column(monkeypatch):
    f = ("mAch ~ center(ses, by = school) * sector + group_mean(ses, by = school) "
         "+ (1 | school)")
    fact, plain = _both(monkeypatch, HSB, f)
    assert fact.constant_pieces == 2  # sector, the school mean of ses
    _assert_same(fact, plain)


def _nested(path: Path, *, vary_after: int | None = None) -> str:
    """Pupils in classes in schools: w school-level, z class-level, x and wt row-level;
    `vary_after`: from that row on, w varies within schools."""
    rng = np.random.default_rng(7)
    schools, classes, pupils = 40, 4, 12
    n = schools * classes * pupils
    school = np.repeat(np.arange(schools), classes * pupils)
    klass = np.repeat(np.arange(schools * classes), pupils) % classes
    w = rng.normal(size=schools)[school]
    if vary_after is not None:
        w[vary_after:] += rng.normal(size=n - vary_after)
    z = rng.normal(size=schools * classes)[np.repeat(np.arange(schools * classes), pupils)]
    x = rng.normal(size=n)
    wt = rng.uniform(0.5, 2.0, size=n)
    y = (1 + 0.5 * x + w - 0.3 * x * w + 0.2 * z + rng.normal(size=schools)[school]
         + rng.normal(size=schools * classes)[np.repeat(np.arange(schools * classes), pupils)]
         + rng.normal(size=n))
    pq.write_table(pa.table({"school": [f"s{i}" for i in school], "class": klass, "x": x,
                             "w": w, "z": z, "wt": wt, "y": y}), path)
    return str(path)


def test_several_factors_and_weights(monkeypatch, tmp_path):
    data = _nested(tmp_path / "nested.parquet")
    f = "y ~ x * w + z + (x | school) + (1 | school:class)"
    fact, plain = _both(monkeypatch, data, f, weights="wt")
    assert fact.constant_pieces == 2  # w and z: constant within the cells (school, class)
    _assert_same(fact, plain)
    for fa, fb in zip(fact.factors, plain.factors):
        np.testing.assert_array_equal(fa.index, fb.index)


def test_a_piece_that_varies_later_sends_the_pass_back(monkeypatch, tmp_path):
    # the first 400 rows (the probe's sample here) show w constant within schools; the rows
    # after them do not: the pass finds it and computes every sum
    data = _nested(tmp_path / "later.parquet", vary_after=1000)
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 400)
    fact = S.compute_statistics(data, "y ~ x * w + (1 | school)")
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 0)
    plain = S.compute_statistics(data, "y ~ x * w + (1 | school)")
    assert fact.constant_pieces == 0
    _assert_same(fact, plain, rtol=0)


def test_the_fit_is_the_same(monkeypatch):
    f = "mAch ~ ses * sector + meanses + (ses | school)"
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 100_000)
    a = mlpipe.fit(HSB, f)
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 0)
    b = mlpipe.fit(HSB, f)
    assert a.reml_criterion == pytest.approx(b.reml_criterion, rel=1e-12)
    np.testing.assert_allclose(a.fixed_effects["estimate"].to_numpy(),
                               b.fixed_effects["estimate"].to_numpy(), rtol=1e-9)


def test_the_probe_reads_the_first_rows_whatever_the_join(tmp_path):
    # with group means joined (a LEFT JOIN, which does not keep row order) the probe still
    # reads the first rows in file order: the same proposal, and the same bits, at any
    # thread count.  The first rows' schools all have w = 1 (no evidence that w is a school
    # covariate); later schools' w differ.
    rng = np.random.default_rng(9)
    n, schools = 400_000, 4_000
    school = np.concatenate([rng.integers(0, 400, 100_000),
                             rng.integers(400, schools, n - 100_000)])
    wv = rng.normal(size=schools)
    wv[:400] = 1.0
    path = tmp_path / "probe.parquet"
    pq.write_table(pa.table({"school": school, "w": wv[school], "x": rng.normal(size=n),
                             "y": rng.normal(size=n)}), path, row_group_size=10_000)
    f = "y ~ center(x, by = school) * w + group_mean(x, by = school) + (1 | school)"
    runs = [S.compute_statistics(str(path), f, threads=t) for t in (1, 4, 8)]
    assert {r.constant_pieces for r in runs} == {1}  # the group mean, not w
    for r in runs[1:]:
        for k in ARRAYS:
            np.testing.assert_array_equal(getattr(r, k), getattr(runs[0], k), err_msg=k)


def test_weights_without_an_intercept(tmp_path):
    # the weights check reads Σ w, which no pair of model columns gives without an
    # intercept: the pass computes it anyway
    rng = np.random.default_rng(4)
    n = 600
    g = rng.integers(0, 30, n)
    x, w, wt = rng.normal(size=n), rng.normal(size=30)[g], rng.uniform(0.5, 2, n)
    y = x + w + rng.normal(size=n)
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"g": g, "x": x, "w": w, "wt": wt, "y": y}), path)
    st = S.compute_statistics(str(path), "y ~ 0 + x + w + (0 + w | g)", weights="wt")
    X = np.stack([x, w])
    np.testing.assert_allclose(st.xtx, (X * wt) @ X.T, rtol=1e-12)
    np.testing.assert_allclose(st.xty, (X * wt) @ y, rtol=1e-12)
    res = mlpipe.fit(str(path), "y ~ 0 + x + w + (0 + w | g)", weights="wt")
    assert np.isfinite(res.reml_criterion)


# ---------------------------------------------------------------------- the lag pass
RES_ARRAYS = ["ztz", "ztx", "zty", "yty_i", "xtx", "xty", "yty", "count"]


def _panel(tmp_path, subjects=400, occasions=6, seed=5, change=None):
    """A repeated-measures panel with a subject-level covariate w (and a time-varying x);
    `change` (subject, from occasion, new w): w changes within that subject's series."""
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(subjects), occasions)
    t = np.tile(np.arange(occasions, dtype=float), subjects)
    w = np.repeat(rng.normal(size=subjects), occasions)
    if change is not None:
        s, k, value = change
        w[(subject == s) & (t >= k)] = value
    x = rng.normal(size=len(t))
    y = 1 + 0.5 * t + 0.3 * w + x + np.repeat(rng.normal(size=subjects), occasions) \
        + rng.normal(size=len(t))
    order = rng.permutation(len(t))  # rows out of time order: the window sorts them
    path = tmp_path / "panel.parquet"
    pq.write_table(pa.table({"subject": subject[order], "t": t[order], "w": w[order],
                             "x": x[order], "y": y[order]}), path)
    return str(path)


def _both_lag(monkeypatch, data, formula, correlation, rows=100_000):
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", rows)
    fact = S.compute_statistics(data, formula, correlation=correlation)
    monkeypatch.setattr(S, "FACTOR_SAMPLE_ROWS", 0)
    plain = S.compute_statistics(data, formula, correlation=correlation)
    return fact, plain


def _assert_same_residual(a, b, rtol=1e-13):
    _assert_same(a, b, rtol)
    for k in RES_ARRAYS:
        x, y = np.asarray(getattr(a.residual, k)), np.asarray(getattr(b.residual, k))
        assert x.shape == y.shape, k
        scale = np.abs(y).max() if y.size else 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=k)


@pytest.mark.parametrize("correlation", ["ar1(t | subject)", "car1(t | subject)"])
def test_level2_predictors_leave_the_lag_pass(tmp_path, monkeypatch, correlation):
    """w (one value per subject) and its interaction with t: the lag components with and
    without the factoring agree to rounding, and so do the fits."""
    data = _panel(tmp_path)
    f = "y ~ t * w + x + (t | subject)"
    fact, plain = _both_lag(monkeypatch, data, f, correlation)
    assert fact.constant_pieces == 1 and plain.constant_pieces == 0
    _assert_same_residual(fact, plain)
    a = mlpipe.fit(stats=fact, correlation=correlation, ddf=None)
    b = mlpipe.fit(stats=plain, correlation=correlation, ddf=None)
    assert abs(a.deviance - b.deviance) <= 1e-11 * abs(b.deviance)


@pytest.mark.parametrize("change", [(399, 0, 7.0), (399, 3, 7.0), (399, 1, 7.0)],
                         ids=["another-value-for-a-whole-series", "a-change-within-a-series",
                              "a-change-after-the-first-row"])
def test_a_lag_piece_that_varies_beyond_the_probe_sends_the_pass_back(tmp_path, monkeypatch,
                                                                      change):
    """The probe sees the first 600 rows; w then changes for the last subject: between
    series of one cell nothing is wrong (each series keeps its value: the factoring holds),
    within a series the previous row's w differs from the row's and the pass runs again
    with every sum — the same statistics either way.  A change after a series' first row
    leaves every aggregated group (first rows; the rest, at lag 1) with one value: only the
    check of each row's lagged value against its own sees it."""
    data = _panel(tmp_path, change=change)
    # the rows are shuffled: sort them so that the probe's first rows miss the last subject
    tbl = pq.read_table(data).sort_by([("subject", "ascending"), ("t", "ascending")])
    pq.write_table(tbl, data)
    f = "y ~ t + w + (t | subject)"
    fact, plain = _both_lag(monkeypatch, data, f, "ar1(t | subject)", rows=600)
    within = change[1] > 0
    assert fact.constant_pieces == (0 if within else 1)
    _assert_same_residual(fact, plain)
