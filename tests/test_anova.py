"""F tests for the fixed-effect terms against lmerTest's anova(m, type, ddf).

References: tests/data/anova/*.json, made by tests/data/anova/make_refs.R (lmerTest 3.1-3,
pbkrtest 0.5.2) on the Parquet files next to them: a 10-level factor with a random slope
(sleepstudy, factor(Days)), factor x covariate and factor x factor interactions (cake), nested
grouping factors with a factor x covariate interaction (Oats, (1 | Block/Variety)), two
grouping factors with one term (Machines), and HSB's cross-level model (numeric x numeric and
factor x numeric interactions, a random slope); every table type III, II and I with Satterthwaite
and, where the JSON has it, Kenward-Roger; lmerTest's type III hypothesis matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe.anova import COLUMNS, anova, fstat_ddf, hypotheses, format_anova
from mlpipe.cli import main
from mlpipe.errors import InputError

DATA = Path(__file__).parent / "data" / "anova"
REFS = sorted(DATA.glob("*.json"))
TYPES = {"I": 1, "II": 2, "III": 3}
_FITS: dict[str, object] = {}


def _ref(path: Path) -> dict:
    return json.loads(path.read_text())


def _fit(ref: dict):
    if ref["name"] not in _FITS:
        _FITS[ref["name"]] = mlpipe.fit(DATA / ref["data"], ref["formula"], method="REML",
                                        ddf=None)
    return _FITS[ref["name"]]


def _cases():
    for path in REFS:
        ref = _ref(path)
        for k, tab in enumerate(ref["tables"]):
            yield pytest.param(path, k, id=f"{ref['name']}-{tab['type']}-{tab['ddf']}")


def test_references_cover_the_brief():
    names = {p.stem for p in REFS}
    assert {"sleep_factor_days", "cake_recipe_temp", "oats_nested", "machines_nested"} <= names
    kr = [t for p in REFS for t in _ref(p)["tables"] if t["ddf"] == "Kenward-Roger"]
    assert any(r["numdf"] > 1 for t in kr for r in t["rows"])  # multi-df Kenward-Roger


@pytest.mark.parametrize("path, k", list(_cases()))
def test_anova_matches_lmertest(path, k):
    ref = _ref(path)
    tab = ref["tables"][k]
    res = _fit(ref)
    assert res.fixed_effects["term"].to_list() == ref["fixed_names"]
    out = res.anova(type=TYPES[tab["type"]], ddf=tab["ddf"].lower())
    assert out.columns == ["term", *COLUMNS]
    assert out["term"].to_list() == [r["term"] for r in tab["rows"]]
    for row, r in zip(out.iter_rows(named=True), tab["rows"]):
        assert row["NumDF"] == r["numdf"]
        for mine, theirs in (("F value", "f_value"), ("DenDF", "dendf"), ("Sum Sq", "sum_sq"),
                             ("Mean Sq", "mean_sq")):
            assert row[mine] == pytest.approx(r[theirs], rel=1e-4), (row["term"], mine)
        assert row["Pr(>F)"] == pytest.approx(r["p_value"], abs=1e-4), row["term"]


@pytest.mark.parametrize("path", REFS, ids=[p.stem for p in REFS])
def test_type3_hypotheses_are_lmertests(path):
    ref = _ref(path)
    mine = hypotheses(_fit(ref), 3)
    assert list(mine) == [h["term"] for h in ref["hypotheses_type3"]]
    p = len(ref["fixed_names"])
    for h in ref["hypotheses_type3"]:
        L = np.array(h["L"], dtype=float).reshape(-1, p)
        assert mine[h["term"]].shape == L.shape, h["term"]
        np.testing.assert_allclose(mine[h["term"]], L, atol=1e-12)


def test_fstat_ddf_is_lmertests():
    assert fstat_ddf([7.5]) == 7.5
    assert fstat_ddf([10.0, 10.0]) == 10.0
    assert fstat_ddf([1.5, 30.0]) == 2.0
    nu = np.array([8.0, 20.0, 40.0])
    e = np.sum(nu / (nu - 2))
    assert fstat_ddf(nu) == pytest.approx(2 * e / (e - 3))


def test_anova_default_is_type3_satterthwaite_and_prints_lmertest_layout():
    ref = _ref(DATA / "oats_nested.json")
    res = _fit(ref)
    default = res.anova()
    assert default.equals(anova(res, type="III", ddf="Satterthwaite"))
    text = format_anova(default)
    lines = text.splitlines()
    assert lines[0] == "Type III Analysis of Variance Table with Satterthwaite's method"
    assert lines[1].split() == " ".join(COLUMNS).split()
    assert [ln.split()[0] for ln in lines[2:5]] == ["Variety", "nitro", "Variety:nitro"]
    assert "***" in lines[3] and lines[-1].startswith("Signif. codes")


def test_anova_refusals():
    ref = _ref(DATA / "cake_recipe_temp.json")
    res = _fit(ref)
    with pytest.raises(InputError, match="type"):
        res.anova(type=4)
    with pytest.raises(InputError, match="ddf"):
        res.anova(ddf="containment")
    ml = mlpipe.fit(DATA / ref["data"], ref["formula"], method="ML", ddf=None)
    with pytest.raises(InputError, match="REML"):
        ml.anova(ddf="kenward-roger")
    assert isinstance(ml.anova(), pl.DataFrame)  # Satterthwaite is defined for ML fits too


def test_cli_anova(tmp_path, capsys):
    ref = _ref(DATA / "cake_recipe_temp.json")
    out = tmp_path / "fit"
    assert main(["fit", str(DATA / ref["data"]), "--formula", ref["formula"], "--out",
                 str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["anova", str(out), "--type", "3", "--ddf", "kenward-roger"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == ("Type III Analysis of Variance Table with Kenward-Roger's "
                                    "method")
    tab = next(t for t in ref["tables"] if t["type"] == "III" and t["ddf"] == "Kenward-Roger")
    for line, r in zip(text.splitlines()[2:], tab["rows"]):
        cells = line.split()
        assert cells[0] == r["term"]
        assert float(cells[5]) == pytest.approx(r["f_value"], rel=1e-3)
    assert main(["anova", str(tmp_path / "missing")]) == 2
    assert "not a result directory" in capsys.readouterr().err
    assert main(["anova", str(out), "--type", "4"]) == 2
