"""Fixed-effect inference under case weights against R (tests/data/weights_inference/
make_refs.R): Satterthwaite against lmerTest, Kenward-Roger against pbkrtest's algorithm
with the weighted model's residual covariance (pbkrtest itself ignores prior weights), one
factor (sleepstudy) and crossed (Penicillin)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlpipe

DATA = Path(__file__).parent / "data"
CASES = ["sleep_weights", "penicillin_weights"]


def _list(v):
    return v if isinstance(v, list) else [v]


@pytest.mark.parametrize("ddf", ["satterthwaite", "kenward-roger"])
@pytest.mark.parametrize("case", CASES)
def test_inference_under_weights(case, ddf):
    ref = json.loads((DATA / "weights_inference" / f"{case}.json").read_text())
    res = mlpipe.fit(DATA / "formula_language" / f"{ref['data']}.parquet", ref["formula"],
                     weights=ref["weights"], ddf=ddf)
    assert res.reml_criterion == pytest.approx(ref["reml_criterion"], rel=1e-9)
    want = ref["Satterthwaite" if ddf == "satterthwaite" else "Kenward-Roger"]
    fe = res.fixed_effects
    assert fe["term"].to_list() == _list(want["term"])
    np.testing.assert_allclose(fe["df"].to_numpy(), _list(want["df"]), rtol=1e-5)
    np.testing.assert_allclose(fe["std_error"].to_numpy(), _list(want["se"]), rtol=1e-5)
    if ddf == "satterthwaite":
        np.testing.assert_allclose(fe["p_value"].to_numpy(), _list(want["p"]), rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_scaled_residuals_are_pearson_under_weights(case):
    """The summary's scaled residuals under weights are lme4's: Pearson residuals
    √w·(y − fitted) over σ (their quartiles, 1e-5 relative to the largest)."""
    from mlpipe.predict import residual_summary

    ref = json.loads((DATA / "weights_inference" / f"{case}.json").read_text())
    data = DATA / "formula_language" / f"{ref['data']}.parquet"
    res = mlpipe.fit(data, ref["formula"], weights=ref["weights"], ddf=None)
    q = residual_summary(res, data).quantiles
    got = [q[k] for k in ("Min", "1Q", "Median", "3Q", "Max")]
    np.testing.assert_allclose(got, ref["scaled_residuals"], rtol=0,
                               atol=1e-5 * max(abs(v) for v in ref["scaled_residuals"]))
