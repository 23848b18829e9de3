"""`mlpipe report`: the HTML page, its plots and numbers, and how it renders in a browser."""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import mlpipe
from mlpipe import report as rp
from mlpipe.errors import InputError

DATA = Path(__file__).parent / "data"
HSB = DATA / "hsb82.parquet"
NULL = "mAch ~ 1 + (1|school)"
RC = "mAch ~ cses + (cses|school)"
FULL = "mAch ~ meanses*cses + sector*cses + (cses | school)"
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
#: image counts below include the per-group residual-SD plot that mlpipe.predict adds to each
#: model whose data is readable (one per grouping factor); the page without mlpipe.predict
#: is `test_without_the_optional_modules`


def _fit(out: Path, formula: str, data: Path | str = HSB) -> Path:
    res = mlpipe.fit(str(HSB), formula)
    return res.write(out, config={"data": str(data), "formula": formula, "method": "REML",
                                  "out": str(out)})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fits")
    return {"null": _fit(base / "null", NULL), "rc": _fit(base / "rc", RC)}


@pytest.fixture(scope="module")
def page(dirs, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert rp.report([dirs["null"], dirs["rc"]], out) == out
    return out, out.read_text()


def _png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


# ---------------------------------------------------------------------- the page

def test_sections_and_images(page):
    path, text = page
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for needle in ("Model comparison", "Likelihood-ratio tests",
                   "Proportional reduction in variance",
                   "Fixed effects", "Variance components", "Fit criteria", "Variance decomposition",
                   "Intraclass correlation", "Conditional modes (caterpillar plot)",
                   "Normal Q-Q plot", "Scaled residuals", "Group-specific regression lines",
                   'id="model-1"', 'id="model-2"', "mAch ~ cses + (cses|school)"):
        assert needle in text, needle
    images = IMG.findall(text)
    # null: caterpillar + Q-Q + residual SDs; rc: the same + regression lines + the two
    # growth pictures (rule 2: a random slope on its only, innermost, factor)
    assert len(images) == 9
    for b64 in images:
        w, h = _png_size(b64)
        assert w > 200 and h > 200
    assert "Skipped" not in text
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_self_contained(page):
    _, text = page
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "http://" not in text and "https://" not in text


def test_numbers_on_the_page(page, dirs):
    _, text = page
    null = json.loads((dirs["null"] / "result.json").read_text())
    tau = null["random_effects"][0]["variance"]
    icc = tau / (tau + null["residual_variance"])
    assert f"<b>{icc:.3f}</b>" in text  # 0.180, hsb82's textbook ICC
    assert icc == pytest.approx(0.18, abs=0.005)
    rc = json.loads((dirs["rc"] / "result.json").read_text())
    assert f"{rc['fixed_effects'][1]['estimate']:.3f}" in text  # 2.193: cses
    # the residual-variance reduction null -> rc, (σ²₀ − σ²₁)/σ²₀
    red = (null["residual_variance"] - rc["residual_variance"]) / null["residual_variance"]
    assert f"{red:.3f}" in text  # proportions: three decimals in every row


def test_single_model_has_no_comparison(dirs, tmp_path):
    out = rp.report(dirs["null"], tmp_path / "one.html")
    text = out.read_text()
    assert "Model comparison" not in text and "Intraclass correlation" in text
    assert len(IMG.findall(text)) == 3
    assert "Group-specific regression lines" not in text  # no random slope


# ---------------------------------------------------------------------- the data passes

def _numpy_fitted(run: rp.ModelRun, df: pl.DataFrame) -> np.ndarray:
    """Xβ̂ + Zb̂ for the columns of the intercept / cses models, in plain numpy."""
    fe = {r["term"]: r["estimate"] for r in run.result["fixed_effects"]}
    wide = (run.ranef.pivot(on="term", index="level", values="estimate")
            .rename({"(Intercept)": "b0", "cses": "b1"}, strict=False))
    d = df.join(wide, left_on="school", right_on="level", how="left")
    fitted = fe["(Intercept)"] + d["b0"].to_numpy()
    if "cses" in fe:  # (cses | school): a random slope too
        fitted = fitted + (fe["cses"] + d["b1"].to_numpy()) * d["cses"].to_numpy()
    return fitted


def test_residuals_match_numpy(dirs):
    df = pl.read_parquet(HSB)
    for name in ("null", "rc"):
        run = rp.load_run(dirs[name])
        resid, nrows = rp.residual_sample(run, sample_rows=100_000)  # > n: every row
        assert nrows == df.height == len(resid)
        expect = (df["mAch"].to_numpy() - _numpy_fitted(run, df)) / run.result["sigma"]
        np.testing.assert_allclose(np.sort(resid), np.sort(expect), rtol=0, atol=1e-9)
        small, _ = rp.residual_sample(run, sample_rows=500)  # a bounded sample
        assert len(small) == 500 and np.all(np.isin(np.round(small, 9), np.round(expect, 9)))


def test_group_lines_are_intercept_plus_slope(dirs):
    run = rp.load_run(dirs["rc"])
    assert rp.slope_variables(run) == ["cses"]
    lines, pop, m, xcol = rp.group_lines(run, "cses", max_groups=50)
    assert m == 160 and xcol == "cses"
    assert 40 <= lines["level"].n_unique() <= 50
    fe = {r["term"]: r["estimate"] for r in run.result["fixed_effects"]}
    modes = run.ranef.pivot(on="term", index="level", values="estimate")
    rng = (pl.read_parquet(HSB).group_by("school")
           .agg(pl.col("cses").min().alias("lo"), pl.col("cses").max().alias("hi")))
    check = (lines.join(modes, on="level").join(rng, left_on="level", right_on="school"))
    a = fe["(Intercept)"] + check["(Intercept)"].to_numpy()
    b = fe["cses"] + check["cses"].to_numpy()
    np.testing.assert_allclose(check["yhat"].to_numpy(), a + b * check["x"].to_numpy(),
                               atol=1e-9)
    np.testing.assert_allclose(check["slope"].to_numpy(), b, atol=1e-12)
    # each line spans its group's observed range of cses
    span = check.group_by("level").agg(pl.col("x").min().alias("xmin"),
                                       pl.col("x").max().alias("xmax"),
                                       pl.col("lo").first(), pl.col("hi").first())
    np.testing.assert_allclose(span["xmin"].to_numpy(), span["lo"].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(span["xmax"].to_numpy(), span["hi"].to_numpy(), atol=1e-9)
    # the fixed-effects line over the overall range
    x = pop["x"].to_numpy()
    np.testing.assert_allclose(pop["yhat"].to_numpy(), fe["(Intercept)"] + fe["cses"] * x)


def test_group_lines_hold_group_covariates_against_lme4(tmp_path):
    """hsb_full: meanses and sector are constant within a school, so each school's line is
    exactly its fitted values; lme4's fitted values of the first rows (school 1224) lie on it."""
    run = rp.load_run(_fit(tmp_path / "full", FULL))
    lines, _, m, _ = rp.group_lines(run, "cses", max_groups=1000)
    assert lines["level"].n_unique() == m == 160
    first = pl.read_parquet(HSB).head(20)
    assert set(first["school"]) == {"1224"}
    line = lines.filter(pl.col("level") == "1224").sort("x")
    got = np.interp(first["cses"].to_numpy(), line["x"].to_numpy(), line["yhat"].to_numpy())
    lme4 = json.loads((DATA / "lme4" / "hsb_full.json").read_text())["reml"]["fitted_head"]
    np.testing.assert_allclose(got, lme4, rtol=0, atol=2e-3)


def test_column_names_that_could_clash(tmp_path):
    """Data columns named like the report's own SQL names (level, t, u0) still work."""
    df = pl.read_parquet(HSB).rename({"school": "level", "cses": "t", "meanses": "u0"})
    data = tmp_path / "renamed.parquet"
    df.write_parquet(data)
    formula = "mAch ~ u0 + t + (t | level)"
    res = mlpipe.fit(str(data), formula)
    out = res.write(tmp_path / "fit", config={"data": str(data), "formula": formula,
                                              "method": "REML", "out": str(tmp_path / "fit")})
    text = rp.report([out], tmp_path / "r.html").read_text()
    assert "Skipped" not in text and len(IMG.findall(text)) == 6  # with the growth pictures
    resid, _ = rp.residual_sample(rp.load_run(out), sample_rows=100_000)
    assert abs(resid.mean()) < 1e-9  # REML residuals of a model with an intercept sum to ~0


# ---------------------------------------------------------------------- several factors

CATERPILLAR = re.compile(r'alt="caterpillar plot of the conditional modes by ([^"]+)"')


def _fit_to(out: Path, data: Path, formula: str) -> Path:
    res = mlpipe.fit(str(data), formula)
    return res.write(out, config={"data": str(data), "formula": formula, "method": "REML",
                                  "out": str(out)})


@pytest.fixture(scope="module")
def crossed_slope(tmp_path_factory) -> Path:
    """y ~ x + (x|a) + (1|b) on simulated crossed data: a has the most levels."""
    base = tmp_path_factory.mktemp("crossed")
    rng = np.random.default_rng(3)
    n = 1200
    a, b, x = rng.integers(0, 30, n), rng.integers(0, 8, n), rng.normal(size=n)
    y = (1 + 0.5 * x + rng.normal(size=30)[a] + 0.5 * rng.normal(size=30)[a] * x
         + 0.7 * rng.normal(size=8)[b] + rng.normal(size=n))
    data = base / "crossed.parquet"
    pl.DataFrame({"y": y, "x": x, "a": a, "b": [f"b{i}" for i in b]}).write_parquet(data)
    return _fit_to(base / "fit", data, "y ~ x + (x|a) + (1|b)")


def test_several_factors_report(crossed_slope, tmp_path):
    """Nested (pastes) and crossed-with-slope models: every data pass works, one caterpillar
    plot per factor (most levels first), one residual-SD plot per factor, the lines for the
    factor with the random slope; the nested model's variance partition."""
    pastes = _fit_to(tmp_path / "pastes", DATA / "pastes.parquet",
                     "strength ~ 1 + (1|batch/cask)")
    text = rp.report([pastes, crossed_slope], tmp_path / "multi.html").read_text()
    assert "Skipped" not in text
    assert CATERPILLAR.findall(text) == ["cask:batch", "batch", "a", "b"]
    assert "<h4>cask:batch</h4>" in text and "<h4>b</h4>" in text
    assert "Group-specific regression lines" in text and "levels of a" in text
    assert "the conditional modes of the other factors (b) are left out" in text
    assert "Random intercepts on several grouping factors" in text
    # per model: caterpillars + Q-Q + a residual-SD plot per factor whose group sizes vary
    # (pastes is balanced: 2 rows per cask:batch, 6 per batch: notes instead); lines for the
    # slope, and the two growth pictures (the slope is on a, the innermost factor)
    assert len(IMG.findall(text)) == (2 + 1 + 0) + (2 + 1 + 2 + 1 + 2)
    assert "every cask:batch has 2 rows, so no plot against group size" in text
    assert "every batch has 6 rows, so no plot against group size" in text
    for b64 in IMG.findall(text):
        w, h = _png_size(b64)
        assert w > 200 and h > 200


def test_several_factors_data_passes_match_numpy(crossed_slope):
    run = rp.load_run(crossed_slope)
    df = pl.read_parquet(run.config["data"])
    fe = {r["term"]: r["estimate"] for r in run.result["fixed_effects"]}
    modes = {(g, lv, t): e for g, lv, t, e in
             run.ranef.select("group", "level", "term", "estimate").iter_rows()}
    a, b = df["a"].cast(pl.Utf8).to_list(), df["b"].to_list()
    x = df["x"].to_numpy()
    ua = np.array([modes[("a", v, "(Intercept)")] for v in a])
    va = np.array([modes[("a", v, "x")] for v in a])
    ub = np.array([modes[("b", v, "(Intercept)")] for v in b])
    fitted = fe["(Intercept)"] + ua + ub + (fe["x"] + va) * x
    resid, nrows = rp.residual_sample(run, sample_rows=100_000)
    assert nrows == df.height == len(resid)
    np.testing.assert_allclose(np.sort(resid),
                               np.sort((df["y"].to_numpy() - fitted) / run.result["sigma"]),
                               atol=1e-9)
    # the lines of a: its intercept and slope only (b's modes left out)
    assert rp.line_factor(run) == ("a", ["x"])
    lines, pop, m, _ = rp.group_lines(run, "x", max_groups=1000)
    assert m == 30 and lines["level"].n_unique() == 30
    la = lines["level"].to_list()
    expect = (fe["(Intercept)"] + np.array([modes[("a", v, "(Intercept)")] for v in la])
              + (fe["x"] + np.array([modes[("a", v, "x")] for v in la])) * lines["x"].to_numpy())
    np.testing.assert_allclose(lines["yhat"].to_numpy(), expect, atol=1e-9)
    np.testing.assert_allclose(pop["yhat"].to_numpy(),
                               fe["(Intercept)"] + fe["x"] * pop["x"].to_numpy(), atol=1e-9)


# ---------------------------------------------------------------------- degrading gracefully

def test_missing_data_and_no_data(dirs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dirs["rc"], moved)
    (moved / "config.toml").write_text(
        (moved / "config.toml").read_text().replace(str(HSB), "nowhere/hsb.parquet"))
    text = rp.report([moved], tmp_path / "moved.html").read_text()
    assert "Skipped: training data" in text and "Skipped (cses): training data" in text
    assert len(IMG.findall(text)) == 1  # the caterpillar plot needs no data
    text = rp.report([dirs["null"]], tmp_path / "nodata.html", data=False).read_text()
    assert "--no-data" in text and len(IMG.findall(text)) == 1


def test_relative_data_path_found_from_the_result_dir(dirs, tmp_path, monkeypatch):
    # config.toml records the path relative to where `mlpipe fit` ran; the report finds it
    # from the result directory's parents when run elsewhere
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(HSB, proj / "data" / "hsb82.parquet")
    shutil.copytree(dirs["null"], proj / "out" / "null")
    cfg = proj / "out" / "null" / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(HSB), "data/hsb82.parquet"))
    monkeypatch.chdir(tmp_path)
    text = rp.report([proj / "out" / "null"], "r.html").read_text()
    assert "Skipped" not in text and len(IMG.findall(text)) == 3


def test_without_the_optional_modules(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "_optional", lambda name: None)
    text = rp.report([dirs["null"], dirs["rc"]], tmp_path / "own.html").read_text()
    assert "mlpipe.compare is not available" in text
    assert "mlpipe.variance is not available" in text
    assert "mlpipe.predict is not available" in text
    assert "Likelihood-ratio tests" in text and "Intraclass correlation" in text
    assert len(IMG.findall(text)) == 7


def test_uses_mlpipe_predict_when_present(dirs, tmp_path, monkeypatch):
    """residual_summary's exact quantiles and per-group variances go on the page; the Q-Q
    plot still comes from the report's bounded sample."""
    import types

    calls = []

    def residual_summary(result, data, **duckdb_options):
        calls.append((result, data, duckdb_options))
        return types.SimpleNamespace(
            quantiles={"Min": -3.5, "1Q": -0.5, "Median": 0.0, "3Q": 0.5, "Max": 3.25},
            sigma=2.0, n=7185, exact=True, group="school",
            by_group=pl.DataFrame({"group": ["school"] * 3, "level": ["a", "b", "c"],
                                   "n": [10, 20, 1], "mean_residual": [0.0, 0.0, 0.0],
                                   "residual_variance": [4.0, 16.0, None]}))

    fake = types.SimpleNamespace(residual_summary=residual_summary)
    real = rp._optional
    monkeypatch.setattr(rp, "_optional", lambda name: fake if name == "predict" else real(name))
    text = rp.report([dirs["null"]], tmp_path / "p.html").read_text()
    assert calls and Path(calls[0][1]).exists() and Path(calls[0][0]) == dirs["null"]
    assert "Scaled residuals (all 7,185 rows)" in text and "3.250" in text
    assert "2 groups with two or more rows" in text and "median 1.50" in text
    assert len(IMG.findall(text)) == 3


def test_residual_quantiles_from_mlpipe_predict(dirs):
    """With the real module: its exact quantiles over every row agree with a numpy pass."""
    df = pl.read_parquet(HSB)
    run = rp.load_run(dirs["rc"])
    resid = (df["mAch"].to_numpy() - _numpy_fitted(run, df)) / run.result["sigma"]
    html = rp.residual_html(run, data=True, sample_rows=1000)
    assert "Scaled residuals (all 7,185 rows)" in html
    assert f"<td class=\"n\">{resid.min():.3f}</td>" in html
    assert "(160 groups with two or more rows)" in html


def test_bad_input(dirs, tmp_path):
    with pytest.raises(InputError, match="not a result directory"):
        rp.report([tmp_path], tmp_path / "x.html")
    with pytest.raises(InputError, match="not found"):
        rp.report([tmp_path / "nope"], tmp_path / "x.html")
    with pytest.raises(InputError, match="is a directory"):
        rp.report([dirs["null"]], tmp_path)
    assert not list(tmp_path.glob("*.html"))


def test_cli(dirs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mlpipe")
    rp.add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.html"
    args = parser.parse_args(["report", str(dirs["null"]), str(dirs["rc"]), "--out", str(out),
                              "--sample-rows", "300", "--max-groups", "10"])
    assert args.func(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "a reservoir sample of 300 of the 7,185 rows" in text
    assert "10 of 160 levels of school" in text


# ---------------------------------------------------------------------- a real browser

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
                 "chrome", "headless_shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


PROBE = """<script>
window.addEventListener("load", function () {
  var out = [];
  document.querySelectorAll("img").forEach(function (im) {
    out.push([im.naturalWidth, im.naturalHeight, im.getBoundingClientRect().width]);
  });
  var pre = document.createElement("pre");
  pre.id = "img-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_renders_in_headless_chromium(page, tmp_path):
    _, text = page
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,900", "--virtual-time-budget=10000", "--dump-dom",
           probed.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="img-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"probe missing from the DOM: {proc.stdout[:500]} {proc.stderr[-1000:]}"
    sizes = json.loads(found.group(1))
    assert len(sizes) == 9
    for natural_w, natural_h, shown_w in sizes:
        assert natural_w > 200 and natural_h > 200 and shown_w > 100
    assert "Model comparison" in proc.stdout


def _model_dir(base: Path, name: str, formula: str, ml: bool = False) -> Path:
    res = mlpipe.fit(str(HSB), formula, method="ML" if ml else "REML")
    return res.write(base / name, config={"data": str(HSB), "formula": formula,
                                          "method": res.method, "out": str(base / name)})


@pytest.mark.parametrize("own", [False, True], ids=["mlpipe.compare", "own table"])
def test_comparison_tests_only_nested_pairs(tmp_path, monkeypatch, own):
    """means (meanses) and ancova (cses) are not nested: no χ² or p for that pair, and the
    sentence the CLI prints; null -> means is tested. Both with mlpipe.compare and with the
    report's own table (mlpipe.compare missing)."""
    from mlpipe.compare import not_nested_note

    d = {name: _model_dir(tmp_path, name, f, ml=True) for name, f in
         (("null", NULL), ("means", "mAch ~ meanses + (1|school)"),
          ("ancova", "mAch ~ cses + (1|school)"))}
    if own:
        real = rp._optional
        monkeypatch.setattr(rp, "_optional",
                            lambda name: None if name == "compare" else real(name))
    text = rp.report([d["null"], d["means"], d["ancova"]], tmp_path / "c.html",
                     data=False).read_text()
    section = text[text.index('<section id="comparison">'):]
    section = section[:section.index("</section>")]
    note = not_nested_note("means", "ancova")
    assert note.replace("'", "&#x27;") in section
    assert section.count("is not nested in") == 1  # null -> means is nested: tested
    rows = re.findall(r"<tr>(.*?)</tr>", section.split("Likelihood-ratio tests")[1], re.S)
    cells = [c for c in (re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows) if c]
    bad = next(c for c in cells if "means" in c[0] and "ancova" in "".join(c[:2]))
    assert bad.count("—") >= 2  # no χ², no p
    good = next(c for c in cells if "null" in "".join(c[:2]) and "means" in "".join(c[:2]))
    assert "—" not in good


def test_model_table_decimals_are_consistent(dirs, tmp_path):
    """logLik, deviance, AIC and BIC share one number of decimals in every row."""
    text = rp.report([dirs["null"], dirs["rc"]], tmp_path / "d.html", data=False).read_text()
    section = text[text.index('<section id="comparison">'):]
    models = section[section.index("<h3>Models</h3>"):section.index("</table>")]
    for row in re.findall(r"<tr>(.*?)</tr>", models, re.S)[1:]:
        nums = re.findall(r'<td class="n">([-\d.]+)</td>', row)[-4:]
        assert len(nums) == 4
        assert len({len(n.split(".")[1]) if "." in n else 0 for n in nums}) == 1, nums


# ---------------------------------------------------------------------- growth curves

SLEEP = DATA / "sleepstudy.parquet"
SLEEP_F = "Reaction ~ Days + (Days | Subject)"
AR1 = "ar1(Days | Subject)"
SPAGHETTI = 'alt="spaghetti plot of observed and fitted trajectories"'
AVERAGE = 'alt="average trajectory with its 95% confidence band"'


def _img_of(text: str, alt: str) -> str:
    return re.search(alt + r' src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text).group(1)


def _md5_first(labels, k: int) -> list[str]:
    """The k labels with the smallest MD5 hash (hex), as the report's SQL picks subjects."""
    import hashlib

    return sorted(labels, key=lambda s: (hashlib.md5(s.encode()).hexdigest(), s))[:k]


@pytest.fixture(scope="module")
def sleep_ar1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("growth") / "ar1"
    res = mlpipe.fit(str(SLEEP), SLEEP_F, correlation=AR1)
    return res.write(out, config={"data": str(SLEEP), "formula": SLEEP_F, "correlation": AR1,
                                  "method": "REML", "out": str(out)})


def test_growth_section_of_an_ar1_fit(sleep_ar1, tmp_path):
    """An ar1 fit is a growth model by its correlation (rule 1): the section, both pictures
    with their captions; the same subjects and the same pictures on two renders."""
    run = rp.load_run(sleep_ar1)
    g = rp.growth_model(run)
    assert (g.rule, g.time, g.subject, g.name) == ("correlation", "Days", ("Subject",),
                                                   "Subject")
    texts = [rp.report([sleep_ar1], tmp_path / f"g{i}.html").read_text() for i in range(2)]
    text = texts[0]
    assert "Skipped" not in text
    assert "<h3>Growth curves</h3>" in text and "rule 1, a residual correlation structure" in text
    assert "ar1(Days | Subject) residual correlation gives the time (Days)" in text
    assert text.count(SPAGHETTI) == 1 and text.count(AVERAGE) == 1
    assert "trajectories of all 18 subjects (Subject)" in text
    assert "observed mean of Reaction per Days (10 values) (180 rows)" in text
    for alt in (SPAGHETTI, AVERAGE):
        w, h = _png_size(_img_of(text, alt))
        assert w > 200 and h > 200
        assert _img_of(texts[1], alt) == _img_of(text, alt)  # deterministic pictures
    a, b = rp.growth_curves(run), rp.growth_curves(run)
    assert a["sampled"] == b["sampled"] and len(a["sampled"]) <= rp.GROWTH_SUBJECTS
    assert a["subjects"] == 18 and sorted(a["sampled"]) == sorted(
        pl.read_parquet(SLEEP)["Subject"].cast(pl.Utf8).unique().to_list())
    # a smaller sample: the subjects with the smallest MD5 hash, only their rows fetched
    five = rp.growth_curves(run, subjects=5)
    assert five["sampled"] == _md5_first(a["sampled"], 5) == a["sampled"][:5]
    assert five["trajectories"].height == 5 * 10 and five["subjects"] == 18
    assert set(five["trajectories"]["subject"]) == set(five["sampled"])


def test_growth_curves_values(sleep_ar1):
    """What is drawn: the observed values and X·β̂ + Z·b̂ of the sampled subjects; the
    average line β̂₀ + β̂₁·Days (result.json) on the grid, its band from Var(β̂) — at
    Days = 0 the intercept's standard error, elsewhere a refit's vcov — and the observed
    means per day."""
    run = rp.load_run(sleep_ar1)
    c = rp.growth_curves(run)
    fe = {r["term"]: r for r in run.result["fixed_effects"]}
    b0, b1 = fe["(Intercept)"]["estimate"], fe["Days"]["estimate"]
    # the spaghetti: observed and conditional fit at each subject's own rows
    df = pl.read_parquet(SLEEP).with_columns(pl.col("Subject").cast(pl.Utf8),
                                             pl.col("Days").cast(pl.Float64))
    modes = (run.ranef.pivot(on="term", index="level", values="estimate")
             .rename({"(Intercept)": "u0", "Days": "u1"}))
    t = (c["trajectories"].join(df, left_on=["subject", "time"], right_on=["Subject", "Days"])
         .join(modes, left_on="subject", right_on="level"))
    assert t.height == c["trajectories"].height == 180
    np.testing.assert_allclose(t["observed"].to_numpy(), t["Reaction"].to_numpy(), atol=1e-12)
    fitted = b0 + t["u0"].to_numpy() + (b1 + t["u1"].to_numpy()) * t["time"].to_numpy()
    np.testing.assert_allclose(t["fitted"].to_numpy(), fitted, atol=1e-9)
    # the average trajectory at two grid points (Days = 0, and the middle of the range)
    grid, line, se = c["grid"], c["line"], c["se"]
    assert len(grid) == rp.GROWTH_POINTS and grid[0] == 0.0 and grid[-1] == 9.0
    for i in (0, rp.GROWTH_POINTS // 2):
        assert line[i] == pytest.approx(b0 + b1 * grid[i], abs=1e-9)
    assert se[0] == pytest.approx(fe["(Intercept)"]["std_error"], rel=1e-6)
    assert c["vcov_source"] == "the saved statistics at the fit's estimates"
    vcov = mlpipe.fit(str(SLEEP), SLEEP_F, correlation=AR1).vcov_matrix  # a full refit
    i = rp.GROWTH_POINTS // 2
    x = np.array([1.0, grid[i]])
    assert se[i] == pytest.approx(float(np.sqrt(x @ vcov @ x)), rel=1e-5)
    np.testing.assert_allclose(c["upper"] - line, rp.Z95 * se)
    np.testing.assert_allclose(line - c["lower"], rp.Z95 * se)
    # the observed means, one per day
    expect = df.group_by("Days").agg(pl.col("Reaction").mean()).sort("Days")
    assert c["binning"] == "time"
    np.testing.assert_allclose(c["means"]["time"].to_numpy(), expect["Days"].to_numpy())
    np.testing.assert_allclose(c["means"]["mean"].to_numpy(), expect["Reaction"].to_numpy())


def test_growth_by_slope_samples_thirty_subjects(tmp_path):
    """Rule 2 (a random slope on the innermost factor, no correlation) on 120 subjects
    measured at irregular times: 30 subjects drawn, by MD5 hash, only their rows; the
    observed means in quantile bins; the section says which rule applied."""
    rng = np.random.default_rng(11)
    m, k = 120, 6
    sid = np.repeat(np.arange(m), k)
    time = np.round(np.tile(np.arange(k), m) + rng.uniform(-0.4, 0.4, m * k), 3)
    y = (10 + rng.normal(size=m)[sid] + (2 + 0.5 * rng.normal(size=m)[sid]) * time
         + rng.normal(size=m * k))
    data = tmp_path / "growth.parquet"
    pl.DataFrame({"y": y, "t": time, "id": [f"s{i}" for i in sid]}).write_parquet(data)
    out = _fit_to(tmp_path / "fit", data, "y ~ t + (t | id)")
    run = rp.load_run(out)
    g = rp.growth_model(run)
    assert (g.rule, g.time, g.subject) == ("slope", "t", ("id",))
    c = rp.growth_curves(run)
    labels = [f"s{i}" for i in range(m)]
    assert c["subjects"] == m and c["sampled"] == _md5_first(labels, rp.GROWTH_SUBJECTS)
    assert c["trajectories"].height == rp.GROWTH_SUBJECTS * k
    assert set(c["trajectories"]["subject"]) == set(c["sampled"])
    assert rp.growth_curves(run)["sampled"] == c["sampled"]
    assert c["binning"] == "quantile" and 2 <= c["means"].height <= rp.GROWTH_BINS
    assert c["means"]["n"].sum() == m * k
    fe = {r["term"]: r["estimate"] for r in run.result["fixed_effects"]}
    np.testing.assert_allclose(c["line"], fe["(Intercept)"] + fe["t"] * c["grid"], atol=1e-9)
    text = rp.report([out], tmp_path / "r.html").read_text()
    assert "rule 2, a random slope on the innermost grouping factor" in text
    assert f"trajectories of 30 of {m} subjects (id)" in text
    assert SPAGHETTI in text and AVERAGE in text and "Skipped" not in text


def test_no_growth_section_without_slope_or_correlation(dirs, crossed_slope, tmp_path):
    """A random-intercept model is no growth model, nor one whose slope is on a factor that
    is not the innermost; a growth model under --no-data keeps its section, with a note."""
    run = rp.load_run(dirs["null"])
    assert rp.growth_model(run) is None
    text = rp.report([dirs["null"]], tmp_path / "null.html").read_text()
    assert "Growth curves" not in text and SPAGHETTI not in text and AVERAGE not in text
    data = rp.load_run(crossed_slope).config["data"]  # a: 30 levels, b: 8
    outer = _fit_to(tmp_path / "outer", Path(data), "y ~ x + (1|a) + (x|b)")
    assert rp.growth_model(rp.load_run(outer)) is None
    text = rp.report([outer], tmp_path / "outer.html").read_text()
    assert "Group-specific regression lines" in text and "Growth curves" not in text
    text = rp.report([dirs["rc"]], tmp_path / "nodata.html", data=False).read_text()
    assert "<h3>Growth curves</h3>" in text and SPAGHETTI not in text
    assert "Skipped: data passes were turned off (--no-data)." in text


def test_glmm_section_with_calibration(tmp_path):
    """A GLMM's report section: its tables, the caterpillar plot and the calibration plot —
    observed against fitted probability in 10 bins of the fitted value, computed in one
    pass: the bins' trials add up to the data's, and their weighted observed mean is the
    overall proportion."""
    import polars as pl

    from mlpipe.report import calibration, load_run

    data = Path(__file__).parent / "data" / "glmm" / "cbpp.parquet"
    res = mlpipe.fit(data, "cbind(incidence, failures) ~ period + (1 | herd)",
                     family="binomial")
    res.write(tmp_path / "g", config={"data": str(data)})
    cal = calibration(load_run(tmp_path / "g"))
    frame = pl.read_parquet(data)
    assert cal.height == 10
    assert cal["n"].sum() == pytest.approx(frame["size"].sum())
    assert float((cal["observed"] * cal["n"]).sum() / cal["n"].sum()) == pytest.approx(
        frame["incidence"].sum() / frame["size"].sum(), rel=1e-12)
    assert list(cal["fitted"]) == sorted(cal["fitted"])  # bins in order of the fitted value
    out = tmp_path / "r.html"
    mlpipe.report.report([tmp_path / "g"], out)
    html = out.read_text()
    assert "Calibration: observed against fitted" in html and "Generalized linear" in html
