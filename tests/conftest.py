"""Shared fixtures: the reference data shipped in tests/data and a cache of fitted models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlpipe

DATA = Path(__file__).parent / "data"
REFS = DATA / "lme4"

#: the two-level reference cases and their data files
TWO_LEVEL = ["dyestuff_null", "sleepstudy_rs", "sleepstudy_diag", "hsb_null", "hsb_ancova",
             "hsb_means", "hsb_int_anc", "hsb_rc", "hsb_full"]
DATA_FILE = {"dyestuff": "dyestuff.parquet", "sleepstudy": "sleepstudy.parquet",
             "hsb82": "hsb82.parquet", "oxboys": "oxboys.parquet"}


def reference(case: str) -> dict:
    return json.loads((REFS / f"{case}.json").read_text())


def listify(x):
    """A reference JSON value as a list (R writes a one-element vector as a scalar)."""
    return x if isinstance(x, list) else [x]


def check_fixed_effects(res: mlpipe.FitResult, ref: dict) -> None:
    """Estimates within 1e-3 × SE and SEs within 1e-3 relative of one lme4 reference block."""
    fe = res.fixed_effects
    se_ref = np.array(listify(ref["fixed"]["se"]))
    np.testing.assert_allclose(fe["estimate"].to_numpy(), listify(ref["fixed"]["estimate"]),
                               rtol=0, atol=1e-3 * se_ref.min())
    np.testing.assert_allclose(fe["std_error"].to_numpy(), se_ref, rtol=1e-3)


def check_criterion(res: mlpipe.FitResult, ref: dict) -> None:
    """Fit criteria and sizes against one lme4 reference block (REML or ML)."""
    assert res.converged
    assert res.deviance == pytest.approx(ref["deviance_or_reml"], rel=1e-6)
    assert res.loglik == pytest.approx(ref["loglik"], rel=1e-6)
    assert res.aic == pytest.approx(ref["aic"], rel=1e-6)
    assert res.bic == pytest.approx(ref["bic"], rel=1e-6)
    assert res.nobs == ref["nobs"]
    assert res.groups == ref["ngroups"]
    assert res.singular == ref["singular"]


_cache: dict[tuple[str, str], mlpipe.FitResult] = {}


def fitted(case: str, method: str) -> tuple[mlpipe.FitResult, dict]:
    """Fit a reference case once per test session."""
    ref = reference(case)
    key = (case, method)
    if key not in _cache:
        _cache[key] = mlpipe.fit(DATA / DATA_FILE[ref["data"]], ref["formula"], method=method)
    return _cache[key], ref[method.lower()]


@pytest.fixture
def data_dir() -> Path:
    return DATA


# ---------------------------------------------------------------- one-factor reference pairing
# lme4's random-effect terms paired with mlpipe's by position (a naming difference is checked
# separately and so neither hides nor fakes a numeric one)

def term_map(res, ref) -> dict[str, str]:
    """lme4's random-effect term name -> mlpipe's, paired by position."""
    (re,) = ref["ranef"]
    mine = res.random_effects["term"].to_list()
    theirs = listify(re["terms"])
    return dict(zip(theirs, mine)) if len(mine) == len(theirs) else {t: t for t in theirs}


def varcorr_pairs(res, ref) -> list[tuple[dict, float | None]]:
    """(reference varcorr row, mlpipe's value or None when mlpipe has no such term)."""
    tm = term_map(res, ref)
    sd = {r["term"]: r["std_dev"] for r in res.random_effects.iter_rows(named=True)}
    cor = {}
    for r in res.random_correlations.iter_rows(named=True):
        cor[(r["term1"], r["term2"])] = cor[(r["term2"], r["term1"])] = r["correlation"]
    out = []
    for row in ref["varcorr"]:
        if row["grp"] == "Residual":
            got = res.sigma
        elif row["var2"] is None:
            got = sd.get(tm.get(row["var1"]))
        else:
            got = cor.get((tm.get(row["var1"]), tm.get(row["var2"])))
        out.append((row, got))
    return out


def ranef_table(res, ref) -> dict[str, dict[str, tuple[float, float]]]:
    """lme4's term name -> level (as text) -> mlpipe's (conditional mode, conditional SD)."""
    back = {v: k for k, v in term_map(res, ref).items()}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for r in res.ranef.iter_rows(named=True):
        term = back.get(r["term"], r["term"])
        out.setdefault(term, {})[str(r["level"])] = (r["estimate"], r["cond_sd"])
    return out


# ---------------------------------------------------------------- brute force

def dense_deviance(y, X, Zs, Ts, reml: bool) -> float:
    """The profiled deviance from raw rows, marginal form: V = I + Σ_k Z_k (I ⊗ T_k T_k') Z_k'
    (relative to σ²), GLS for β, σ profiled. Z_k is level-major (a level's columns together)."""
    n, p = X.shape
    V = np.eye(n)
    for Zk, Tk in zip(Zs, Ts):
        V += Zk @ np.kron(np.eye(Zk.shape[1] // Tk.shape[0]), Tk @ Tk.T) @ Zk.T
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    logdet_v = np.linalg.slogdet(V)[1]
    if reml:
        s2 = r @ Vi @ r / (n - p)
        return (n - p) * (1 + np.log(2 * np.pi * s2)) + logdet_v + np.linalg.slogdet(XtViX)[1]
    s2 = r @ Vi @ r / n
    return n * (1 + np.log(2 * np.pi * s2)) + logdet_v


def level_major_z(levels, cols) -> np.ndarray:
    """Raw-row Z of one factor: per level (in sorted order), its columns."""
    uniq = np.unique(levels)
    Z = np.zeros((len(levels), len(uniq) * len(cols)))
    for i, lv in enumerate(uniq):
        rows = levels == lv
        for a, c in enumerate(cols):
            Z[rows, i * len(cols) + a] = c[rows]
    return Z


def check_variance_components(res, ref, singular_abs: float = 1e-3) -> None:
    """SDs and correlations of a one-factor fit against lme4's (paired by position): 1e-3
    relative, 1e-4 absolute; on a singular fit `singular_abs` (in residual SDs for SDs)."""
    n_ref_terms = sum(1 for r in ref["varcorr"] if r["grp"] != "Residual" and r["var2"] is None)
    assert res.random_effects.height == n_ref_terms
    atol = singular_abs * ref["sigma"] if ref["singular"] else 1e-4
    for row, got in varcorr_pairs(res, ref):
        assert got is not None, f"mlpipe has no component {row['var1']} / {row['var2']}"
        tol = singular_abs if (ref["singular"] and row["var2"] is not None) else atol
        assert got == pytest.approx(row["sdcor"], rel=1e-3, abs=tol), row


def check_conditional_modes(res, ref) -> None:
    """Conditional modes within 1e-3 conditional SD and conditional SDs within 1e-3 relative
    of lme4's; a zero conditional SD (variance on the boundary) must give a zero mode."""
    (re,) = ref["ranef"]
    terms = listify(re["terms"])
    values, cond_sd = np.array(re["values"]), np.array(re["cond_sd"])
    tab = ranef_table(res, ref)
    assert sorted(tab) == sorted(terms)
    for k, term in enumerate(terms):
        assert set(tab[term]) == set(re["levels"]), term
        got = np.array([tab[term][lev] for lev in re["levels"]])
        atol = max(1e-3 * cond_sd[:, k].min(), 1e-9 * ref["sigma"])
        np.testing.assert_allclose(got[:, 0], values[:, k], rtol=0, atol=atol, err_msg=term)
        np.testing.assert_allclose(got[:, 1], cond_sd[:, k], rtol=1e-3,
                                   atol=1e-9 * ref["sigma"], err_msg=term)



def split(src: Path, out: Path, parts: int, seed: int = 0, csv: bool = False) -> Path:
    """`src`'s rows shuffled into `parts` Parquet (or CSV) files under `out`: groups and cells
    span files, so partial statistics must be merged by key."""
    import polars as pl

    df = pl.read_parquet(src)
    df = df[np.random.default_rng(seed).permutation(df.height)]
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, df.height, parts + 1).astype(int)
    for k in range(parts):
        part = df[bounds[k]:bounds[k + 1]]
        if csv:
            part.write_csv(out / f"part-{k:02d}.csv")
        else:
            part.write_parquet(out / f"part-{k:02d}.parquet")
    return out


@pytest.fixture(scope="module")
def cluster():
    """A real `dask.distributed.LocalCluster` of two worker processes, one per test module."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, worker_dashboard_address=None) as c:
        yield c


def run_killing_a_worker(work, busy, *, timeout: float = 120):
    """Start a fresh `LocalCluster` of two worker processes, run `work(address)` in a
    thread, SIGKILL one worker as soon as `busy(client)` is true (polled), and return what
    `work` returned (its exception re-raised) — the worker-loss tests' harness."""
    import os
    import signal
    import threading
    import time

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, worker_dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        out: dict = {}

        def run():
            try:
                out["value"] = work(cluster.scheduler_address)
            except Exception as exc:  # re-raised below
                out["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + timeout
        seen = False
        while time.time() < deadline and not seen and t.is_alive():
            seen = busy(client)
            time.sleep(0.002)
        assert seen, "the work never reached the point where a worker is killed"
        os.kill(pids[0], signal.SIGKILL)
        t.join(2 * timeout)
        assert not t.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]
