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
