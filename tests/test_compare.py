"""Likelihood-ratio comparisons (mlpipe.compare) against lme4's anova() on the HSB models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from scipy import stats as sps

import mlpipe
from conftest import DATA, reference
from mlpipe.compare import MODEL_KEYS, add_cli, compare, run
from mlpipe.config import load_config
from mlpipe.errors import InputError

HSB = DATA / "hsb82.parquet"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REL = 1e-5


@pytest.fixture(scope="module")
def fits() -> dict[str, mlpipe.FitResult]:
    """The three HSB models of the two reference comparisons, by REML, fitted once."""
    return {case: mlpipe.fit(HSB, reference(f"hsb_{case}")["formula"], method="REML")
            for case in ("null", "ancova", "rc")}


@pytest.fixture(scope="module")
def lrt() -> dict[str, dict]:
    return {"null_ancova": reference("hsb_null_vs_ancova_lrt"),
            "ri_rc": reference("hsb_ri_vs_rc_lrt")}


def _check_test(row: dict, ref: dict) -> None:
    assert row["df"] == ref["df"]
    assert row["chisq"] == pytest.approx(ref["chisq"], rel=REL)
    assert row["p_value"] == pytest.approx(ref["p"], rel=REL)


# ---------------------------------------------------------------------- fixed effects differ

def test_null_vs_ancova_refits_with_ml(fits, lrt):
    ref = lrt["null_ancova"]
    assert ref["f0"] == fits["null"].formula and ref["f1"] == fits["ancova"].formula
    cmp = compare([fits["null"], fits["ancova"]], names=["null", "ancova"])
    assert cmp.refit_ml
    (row,) = cmp.tests.iter_rows(named=True)
    assert (row["model_a"], row["model_b"], row["refit_ml"]) == ("null", "ancova", True)
    _check_test(row, ref["ml"])
    assert row["p_value_mixture"] is None  # the fixed effects differ: no boundary test
    # the naive REML comparison (not valid across fixed effects) is not what is reported
    assert row["chisq"] != pytest.approx(ref["reml"]["chisq"], rel=1e-3)
    models = cmp.models
    assert models["method"].to_list() == ["ML", "ML"]
    assert models["npar"].to_list() == [3, 4]
    for col, key in (("loglik", "loglik"), ("aic", "aic"), ("bic", "bic")):
        assert models[col].to_list() == pytest.approx(ref["ml"][key], rel=1e-8)
    assert models["deviance"].to_list() == pytest.approx([-2 * x for x in ref["ml"]["loglik"]],
                                                         rel=1e-8)
    # the REML inputs are untouched
    assert fits["null"].method == "REML" and fits["ancova"].method == "REML"


def test_models_are_ordered_by_npar(fits, lrt):
    cmp = compare([fits["ancova"], fits["null"]])
    assert cmp.models["name"].to_list() == ["model2", "model1"]
    assert cmp.models["formula"].to_list() == [lrt["null_ancova"]["f0"], lrt["null_ancova"]["f1"]]
    _check_test(next(cmp.tests.iter_rows(named=True)), lrt["null_ancova"]["ml"])


# ---------------------------------------------------------------------- random parts differ

def test_ri_vs_rc_compares_reml_fits_directly(fits, lrt):
    ref = lrt["ri_rc"]
    cmp = compare([fits["rc"], fits["ancova"]], names=["rc", "ri"])
    assert not cmp.refit_ml
    assert cmp.models["name"].to_list() == ["ri", "rc"]
    assert cmp.models["method"].to_list() == ["REML", "REML"]
    (row,) = cmp.tests.iter_rows(named=True)
    assert row["refit_ml"] is False
    _check_test(row, ref["reml"])
    assert cmp.models["loglik"].to_list() == pytest.approx(ref["reml"]["loglik"], rel=1e-8)
    for col in ("aic", "bic"):
        want = [reference(c)["reml"][col] for c in ("hsb_ancova", "hsb_rc")]
        assert cmp.models[col].to_list() == pytest.approx(want, rel=1e-8)
    # boundary test: one new variance (cses) and its covariance → ½χ²₁ + ½χ²₂
    mix = 0.5 * sps.chi2.sf(ref["reml"]["chisq"], 1) + 0.5 * sps.chi2.sf(ref["reml"]["chisq"], 2)
    assert row["p_value_mixture"] == pytest.approx(mix, rel=REL)
    assert row["p_value_mixture"] < row["p_value"]


def test_ri_vs_rc_with_an_ml_model_refits_the_reml_one(fits, lrt):
    ref = lrt["ri_rc"]
    ri_ml = mlpipe.fit_statistics(fits["ancova"].stats, method="ML")
    cmp = compare([ri_ml, fits["rc"]], names=["ri", "rc"])
    assert cmp.refit_ml
    (row,) = cmp.tests.iter_rows(named=True)
    assert row["refit_ml"] is True
    _check_test(row, ref["ml"])
    for col, key in (("loglik", "loglik"), ("aic", "aic"), ("bic", "bic")):
        assert cmp.models[col].to_list() == pytest.approx(ref["ml"][key], rel=1e-8)
    mix = 0.5 * sps.chi2.sf(ref["ml"]["chisq"], 1) + 0.5 * sps.chi2.sf(ref["ml"]["chisq"], 2)
    assert row["p_value_mixture"] == pytest.approx(mix, rel=REL)


def test_ml_flag_forces_the_refit(fits, lrt):
    cmp = compare([fits["ancova"], fits["rc"]], ml=True)
    assert cmp.refit_ml
    _check_test(next(cmp.tests.iter_rows(named=True)), lrt["ri_rc"]["ml"])


def test_three_models_give_consecutive_tests(fits, lrt):
    cmp = compare([fits["rc"], fits["null"], fits["ancova"]], names=["rc", "null", "ri"])
    assert cmp.models["name"].to_list() == ["null", "ri", "rc"]
    rows = list(cmp.tests.iter_rows(named=True))
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("null", "ri"), ("ri", "rc")]
    _check_test(rows[0], lrt["null_ancova"]["ml"])
    _check_test(rows[1], lrt["ri_rc"]["ml"])
    assert rows[0]["p_value_mixture"] is None and rows[1]["p_value_mixture"] is not None
    assert rows[0]["nested"] and rows[1]["nested"]


def test_non_nested_models_are_flagged(fits):
    means = mlpipe.fit_statistics(
        mlpipe.compute_statistics(HSB, reference("hsb_means")["formula"]), method="ML")
    cmp = compare([fits["ancova"], means], names=["ancova", "means"])
    (row,) = cmp.tests.iter_rows(named=True)
    assert row["df"] == 0 and row["p_value"] is None and row["nested"] is False
    assert row["chisq"] is None and row["p_value_mixture"] is None  # not tested at all
    assert "ancova is not nested in means (by their terms): no likelihood-ratio test" \
        in cmp.summary()


def test_non_nested_pair_with_more_parameters_is_not_tested(fits):
    """means (meanses) has fewer parameters than rc (cses, random slope) but is not nested
    in it: lme4's anova would print a χ² on 2 df; compare gives none, and says so."""
    means = mlpipe.fit_statistics(
        mlpipe.compute_statistics(HSB, reference("hsb_means")["formula"]), method="ML")
    cmp = compare([means, fits["rc"], fits["null"]], names=["means", "rc", "null"])
    rows = {(r["model_a"], r["model_b"]): r for r in cmp.tests.iter_rows(named=True)}
    bad = rows[("means", "rc")]
    assert bad["df"] == 2 and not bad["nested"]
    assert bad["chisq"] is None and bad["p_value"] is None
    good = rows[("null", "means")]
    assert good["nested"] and good["p_value"] is not None
    text = cmp.summary()
    assert "means is not nested in rc (by their terms): no likelihood-ratio test" in text
    rc_line = next(line for line in text.splitlines() if line.startswith("rc "))
    assert "*" not in rc_line and "e-" not in rc_line


# ---------------------------------------------------------------------- outputs

def test_write_comparison_json(fits, lrt, tmp_path):
    cmp = compare([fits["null"], fits["ancova"]], names=["null", "ancova"])
    path = cmp.write(tmp_path / "cmp")
    assert path == tmp_path / "cmp" / "comparison.json"
    assert [p.name for p in path.parent.iterdir()] == ["comparison.json"]  # no temp left
    d = json.loads(path.read_text())
    assert {"models", "tests"} <= set(d)
    for m in d["models"]:
        assert set(m) == set(MODEL_KEYS)
    (t,) = d["tests"]
    assert {"model_a", "model_b", "chisq", "df", "p_value", "refit_ml"} <= set(t)
    assert t["chisq"] == pytest.approx(lrt["null_ancova"]["ml"]["chisq"], rel=REL)
    assert t["refit_ml"] is True and t["df"] == 1
    assert [m["aic"] for m in d["models"]] == pytest.approx(lrt["null_ancova"]["ml"]["aic"],
                                                            rel=1e-8)
    cmp.write(tmp_path / "cmp")  # overwrites in place
    assert json.loads(path.read_text()) == d


def test_summary_looks_like_anova(fits):
    text = compare([fits["null"], fits["ancova"]], names=["null", "ancova"]).summary()
    assert text.splitlines()[0] == "refitting model(s) with ML (instead of REML)"
    assert "npar" in text and "Pr(>Chisq)" in text and "< 2.2e-16 ***" in text
    assert "null: mAch ~ 1 + (1|school)" in text
    text = compare([fits["ancova"], fits["rc"]], names=["ri", "rc"]).summary()
    assert "Pr(mix)" in text and "refitting" not in text


# ---------------------------------------------------------------------- other sources

def _config(tmp_path: Path, case: str) -> Path:
    """The shipped config of `case`, pointed at the test data and a temporary out dir."""
    cfg = load_config(CONFIGS / f"{case}.toml")
    text = (CONFIGS / f"{case}.toml").read_text()
    text = text.replace(f'data = "{cfg["data"]}"', f'data = "{HSB.as_posix()}"')
    text = text.replace(f'out = "{cfg["out"]}"', f'out = "{(tmp_path / case).as_posix()}"')
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    return path


def test_result_dirs_are_refitted_from_their_config(fits, lrt, tmp_path):
    dirs = []
    for case in ("null", "ancova"):
        res = fits[case]
        cfg = {"data": str(HSB), "formula": res.formula, "method": "REML", "name": case}
        dirs.append(res.write(tmp_path / f"hsb_{case}", config=cfg))
    cmp = compare(dirs)
    assert cmp.models["name"].to_list() == ["hsb_null", "hsb_ancova"]
    _check_test(next(cmp.tests.iter_rows(named=True)), lrt["null_ancova"]["ml"])
    # without config.toml the saved statistics are enough for the ML refit ...
    (dirs[0] / "config.toml").unlink()
    _check_test(next(compare(dirs).tests.iter_rows(named=True)), lrt["null_ancova"]["ml"])
    # ... and with neither, a REML result cannot be refitted by ML
    (dirs[0] / "stats.parquet").unlink()
    with pytest.raises(InputError, match="cannot refit"):
        compare(dirs)


def test_result_dirs_of_reml_fits_differing_in_random_part_need_no_refit(fits, lrt, tmp_path):
    dirs = [fits[c].write(tmp_path / c) for c in ("ancova", "rc")]  # no config.toml
    cmp = compare(dirs)
    assert not cmp.refit_ml
    _check_test(next(cmp.tests.iter_rows(named=True)), lrt["ri_rc"]["reml"])


def test_cli_run_on_two_configs(lrt, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mlpipe")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cmp"
    args = parser.parse_args(["compare", str(_config(tmp_path, "hsb_null")),
                              str(_config(tmp_path, "hsb_ancova")), "--out", str(out)])
    assert args.func is run
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "hsb_null" in printed and "comparison.json" in printed
    d = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in d["models"]] == ["hsb_null", "hsb_ancova"]
    assert all(set(m) == set(MODEL_KEYS) for m in d["models"])
    (t,) = d["tests"]
    assert (t["model_a"], t["model_b"], t["df"], t["refit_ml"]) == ("hsb_null", "hsb_ancova",
                                                                    1, True)
    assert t["chisq"] == pytest.approx(lrt["null_ancova"]["ml"]["chisq"], rel=REL)
    assert t["p_value"] == pytest.approx(lrt["null_ancova"]["ml"]["p"], rel=REL)


@pytest.mark.parametrize("case", ["hsb_null", "hsb_ancova", "hsb_means", "hsb_int_anc",
                                  "hsb_rc", "hsb_full"])
def test_shipped_configs_match_the_reference_models(case):
    cfg = load_config(CONFIGS / f"{case}.toml")
    want = reference(case)["formula"]
    if case == "hsb_full":  # the demo config predates the references; spacing differs
        assert cfg["formula"].replace(" ", "") == want.replace(" ", "")
    else:
        assert cfg["formula"] == want
    assert cfg["out"] == f"out/{case}"
    assert cfg["method"] == "REML"


# ---------------------------------------------------------------------- bad input

def test_bad_input(fits, tmp_path):
    with pytest.raises(InputError, match="at least two"):
        compare([fits["null"]])
    with pytest.raises(InputError, match="unique"):
        compare([fits["null"], fits["ancova"]], names=["a", "a"])
    dyestuff = mlpipe.fit(DATA / "dyestuff.parquet", reference("dyestuff_null")["formula"])
    with pytest.raises(InputError, match="same rows"):
        compare([fits["null"], dyestuff])
    with pytest.raises(InputError, match="result directory"):
        compare([fits["null"], tmp_path])


def test_fits_to_different_data_are_refused(fits, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"mAch": rng.normal(size=7185), "cses": rng.normal(size=7185),
                             "school": np.repeat(np.arange(160), 45)[:7185]}), other)
    mine = mlpipe.fit(other, "mAch ~ 1 + (1|school)")
    with pytest.raises(InputError, match="different data"):
        compare([fits["null"], mine])
