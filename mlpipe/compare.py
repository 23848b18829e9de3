"""Likelihood-ratio comparison of nested models, the way lme4's `anova()` does it.

    cmp = compare([null, ancova])            # FitResults, config .toml files or result dirs
    print(cmp.summary())                     # R's anova table
    cmp.write("out/null_vs_ancova")          # comparison.json

Rules (after lme4's `anova.merMod`):

* All models must be fitted to the same rows (same number of observations and response).
* If the fixed-effects terms differ between any two models, or any model was fitted by ML,
  every REML model is refitted by ML — from its sufficient statistics, without rereading the
  data — because restricted likelihoods of different fixed-effects designs are not
  comparable.  `refit_ml` says so.  If all models are REML and differ only in their random
  part, the REML fits are compared as they are — restricted likelihoods with the same X are
  comparable, and REML variance estimates are less biased.  (lme4's default `refit=TRUE`
  refits unconditionally; this case is its `refit=FALSE`.  `ml=True` forces the refit.)
* Models are ordered by their number of parameters; each is tested against the one before:
  χ² = 2 max(0, ℓ_b − ℓ_a) on df = npar_b − npar_a degrees of freedom.  Only nested pairs
  are tested: a pair whose fixed and random terms are not subsets of the next model's (or
  with df = 0) has `nested` false and no χ², df-based p value or mixture (None), and the
  summary says so (`not_nested_note`, the same sentence in `mlpipe report`).  lme4's anova
  prints a test for such pairs too; it is not a valid likelihood-ratio test.
* When two consecutive models have the same fixed effects and the larger adds exactly one
  random-effect term (a variance, plus any covariances with terms of its block), the null
  value of that variance lies on the boundary of the parameter space and the naive χ²_df
  reference is conservative.  `p_value_mixture` is the p value under the asymptotic
  50:50 mixture of χ²_{df−1} and χ²_df (Self & Liang 1987; Stram & Lee 1994); it is
  None otherwise (with several new variances the null distribution is a more complex
  χ̄² mixture).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import _dist
from ._lazy import lazy_import
from .errors import InputError

pl = lazy_import("polars")

MODEL_KEYS = ("name", "formula", "method", "npar", "loglik", "deviance", "aic", "bic")
TEST_KEYS = ("model_a", "model_b", "chisq", "df", "p_value", "refit_ml", "p_value_mixture",
             "nested")


# ---------------------------------------------------------------------- one model, any source

@dataclass
class Model:
    """What a comparison needs of one fitted model, from a FitResult or result.json."""

    name: str
    formula: str
    method: str
    nobs: int
    npar: int
    loglik: float
    deviance: float
    aic: float
    bic: float
    fixed_terms: tuple[str, ...]
    random_effects: pl.DataFrame  # group, term, variance, std_dev
    residual_variance: float
    result: object | None = None  # the FitResult, when there is one
    config: dict | None = None  # the config it was (or can be) fitted from
    directory: Path | None = None  # the result directory it was read from
    refitted: bool = False
    #: the residual structure (result.json's "correlation"), None for independent residuals
    residual_structure: dict | None = None

    @property
    def response(self) -> str:
        return self.formula.split("~", 1)[0].strip()

    @property
    def random_terms(self) -> frozenset[tuple[str, str]]:
        return frozenset(zip(self.random_effects["group"].to_list(),
                             self.random_effects["term"].to_list()))

    @property
    def residual_terms(self) -> frozenset[tuple[str, str]]:
        """The residual structure as pseudo-terms, for nesting: independence is nested in
        ar1/car1 and in variances by stratum, each in their combination."""
        return residual_terms(self.residual_structure)

    @classmethod
    def from_result(cls, result, name: str, **kw) -> Model:
        return cls(name=name, formula=result.formula, method=result.method, nobs=result.nobs,
                   npar=result.npar, loglik=result.loglik, deviance=result.deviance,
                   aic=result.aic, bic=result.bic,
                   fixed_terms=tuple(result.fixed_effects["term"].to_list()),
                   random_effects=result.random_effects.select("group", "term", "variance",
                                                                "std_dev"),
                   residual_variance=float(result.residual_variance), result=result,
                   residual_structure=getattr(result, "residual_structure", None), **kw)

    def refit(self, method: str = "ML"):
        """This model fitted by `method`: from its statistics if it has them, else from the
        statistics file or data named by its config."""
        from .model import fit, fit_config, fit_statistics

        res = self.result
        if res is not None and getattr(res, "stats", None) is not None:
            return fit_statistics(res.stats, method=method, ddf=None)
        if self.directory is not None and (self.directory / "stats.parquet").is_file():
            return fit(stats=self.directory / "stats.parquet", method=method, ddf=None)
        cfg = self.config
        where = f"result directory {self.directory}" if self.directory else f"model {self.name}"
        if not cfg:
            raise InputError(f"cannot refit {where} by {method}: it has no statistics and no "
                             f"config.toml naming its data")
        if not cfg.get("stats") and not (cfg.get("data") and cfg.get("formula")):
            raise InputError(f"cannot refit {where} by {method}: its config names no data and "
                             f"formula")
        return fit_config(cfg, method=method, ddf=None, ci=None)


def _response_sum_of_squares(r: Model) -> float | None:
    """y'y of the rows a model was fitted to, from its statistics when they are at hand."""
    stats = getattr(r.result, "stats", None)
    if stats is not None:
        return stats.response_ss
    if r.directory is not None and (r.directory / "stats.parquet").is_file():
        try:
            import pyarrow.parquet as pq

            meta = json.loads(pq.read_schema(r.directory / "stats.parquet").metadata[b"mlpipe"])
            return float(meta.get("response_ss", meta["yty"]))
        except (OSError, KeyError, TypeError, ValueError):
            return None
    return None


def load_model(source, name: str | None = None) -> Model:
    """A `Model` from a FitResult, a `Model`, a config .toml (fitted) or a result directory."""
    from .results import FitResult

    if isinstance(source, Model):
        return source
    if isinstance(source, FitResult):
        return Model.from_result(source, name or "model")
    path = Path(source)
    if path.is_dir():
        return _load_result_dir(path, name)
    if path.suffix == ".toml" and path.is_file():
        return _fit_config(path, name)
    if path.name == "result.json" and path.is_file():
        return _load_result_dir(path.parent, name)
    raise InputError(f"{source}: not a FitResult, a config .toml or a result directory "
                     f"containing result.json")


def _fit_config(path: Path, name: str | None) -> Model:
    from .config import load_config
    from .model import fit_config

    cfg = load_config(path)
    if not cfg.get("stats") and not (cfg.get("data") and cfg.get("formula")):
        raise InputError(f"config {path} names neither data and formula nor statistics")
    result = fit_config(cfg, ddf=None, ci=None)  # the comparison needs only the likelihood
    return Model.from_result(result, name or cfg["name"], config=cfg)


def _num(v) -> float:
    """A number of result.json (null — a fit without likelihood — is NaN)."""
    return float("nan") if v is None else float(v)


def _load_result_dir(path: Path, name: str | None) -> Model:
    from .config import load_config

    rj = path / "result.json"
    try:
        d = json.loads(rj.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is not a result directory: it has no result.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{rj} is not valid JSON: {exc}") from None
    try:
        cfg = load_config(path / "config.toml") if (path / "config.toml").is_file() else None
        re = pl.DataFrame(d["random_effects"],
                          schema={"group": pl.Utf8, "term": pl.Utf8, "variance": pl.Float64,
                                  "std_dev": pl.Float64})
        return Model(name=name or path.resolve().name, formula=d["formula"],
                     method=d["method"], nobs=int(d["nobs"]), npar=int(d["npar"]),
                     loglik=_num(d["loglik"]), deviance=_num(d["deviance"]),
                     aic=_num(d["aic"]), bic=_num(d["bic"]),
                     fixed_terms=tuple(r["term"] for r in d["fixed_effects"]),
                     random_effects=re, residual_variance=_num(d["residual_variance"]),
                     config=cfg, directory=path, residual_structure=d.get("correlation"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{rj} is not an mlpipe result ({type(exc).__name__}: {exc})") \
            from None


# ---------------------------------------------------------------------- the comparison

@dataclass
class Comparison:
    """The result of `compare`: `models` (name, formula, method, npar, loglik, deviance,
    aic, bic; in test order), `tests` (one row per consecutive pair: model_a, model_b,
    chisq, df, p_value, refit_ml, p_value_mixture, nested — chisq and p None when the pair is
    not nested), `refit_ml`; `summary()` prints lme4's anova table, `write(dir)` writes
    comparison.json."""

    models: pl.DataFrame  # name, formula, method, npar, loglik, deviance, aic, bic
    tests: pl.DataFrame  # model_a, model_b, chisq, df, p_value, refit_ml, p_value_mixture,
    #                      nested
    refit_ml: bool
    fits: list[Model] = field(default_factory=list, repr=False)  # in table order

    def to_dict(self) -> dict:
        return {"models": [{k: _clean(r[k]) for k in MODEL_KEYS}
                           for r in self.models.iter_rows(named=True)],
                "tests": [{k: _clean(r[k]) for k in TEST_KEYS}
                          for r in self.tests.iter_rows(named=True)],
                "refit_ml": self.refit_ml}

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write OUT_DIR/comparison.json (a temporary file renamed into place)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / "comparison.json"
        fd, tmp = tempfile.mkstemp(prefix=".comparison.", suffix=".json.tmp", dir=out)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def summary(self) -> str:
        return render_comparison(self)

    def __str__(self) -> str:
        return self.summary()


def compare(models, names: list[str] | None = None, *, ml: bool = False) -> Comparison:
    """Likelihood-ratio tests between nested models (lme4's `anova(m1, m2, ...)`).

    `models`: FitResults, config .toml files (fitted with `mlpipe.fit`) or result
    directories (read from result.json; refitted from their config.toml when an ML refit
    is needed).  `names` label them (default: config name, directory name or modelN).
    `ml=True` refits REML models by ML even when only the random part differs.
    """
    models = list(models)
    if len(models) < 2:
        raise InputError("compare needs at least two models")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(models):
            raise InputError(f"{len(names)} names for {len(models)} models")
        if len(set(names)) != len(names):
            raise InputError("model names must be unique")
    recs = [load_model(m, names[i] if names else None) for i, m in enumerate(models)]
    if names is None:
        _default_names(recs, models)

    moments = [r.name for r in recs if r.method == "moments"]
    if moments:
        raise InputError(f"{', '.join(moments)}: fitted by the method of moments, which has no "
                         f"likelihood: no likelihood-ratio test (refit by REML or ML)")
    if len({r.nobs for r in recs}) > 1:
        counts = ", ".join(f"{r.name}: {r.nobs}" for r in recs)
        raise InputError(f"models were not all fitted to the same rows ({counts} "
                         f"observations); refit them on the same complete cases")
    if len({r.response for r in recs}) > 1:
        raise InputError("models have different responses: "
                         + ", ".join(f"{r.name}: {r.response}" for r in recs))
    sums = {r.name: _response_sum_of_squares(r) for r in recs}
    known = [v for v in sums.values() if v is not None]
    if known and max(known) - min(known) > 1e-9 * max(abs(v) for v in known):
        raise InputError("models were fitted to different data (the sums of squares of their "
                         "responses differ); compare fits of the same rows")

    fixed_differ = len({frozenset(r.fixed_terms) for r in recs}) > 1
    any_ml = any(r.method == "ML" for r in recs)
    refit = any(r.method == "REML" for r in recs) and (fixed_differ or any_ml or ml)
    if refit:
        recs = [_as_ml(r) for r in recs]

    order = sorted(range(len(recs)), key=lambda i: recs[i].npar)  # stable, like anova
    recs = [recs[i] for i in order]
    models_df = pl.DataFrame(
        [{"name": r.name, "formula": r.formula, "method": r.method, "npar": r.npar,
          "loglik": r.loglik, "deviance": r.deviance, "aic": r.aic, "bic": r.bic}
         for r in recs],
        schema={"name": pl.Utf8, "formula": pl.Utf8, "method": pl.Utf8, "npar": pl.Int64,
                "loglik": pl.Float64, "deviance": pl.Float64, "aic": pl.Float64,
                "bic": pl.Float64})
    rows = [_test(a, b) for a, b in zip(recs, recs[1:])]
    tests_df = pl.DataFrame(rows, schema={
        "model_a": pl.Utf8, "model_b": pl.Utf8, "chisq": pl.Float64, "df": pl.Int64,
        "p_value": pl.Float64, "refit_ml": pl.Boolean, "p_value_mixture": pl.Float64,
        "nested": pl.Boolean},
        orient="row")
    return Comparison(models_df, tests_df, refit, recs)


def _default_names(recs: list[Model], sources: list) -> None:
    from .results import FitResult

    for i, (r, s) in enumerate(zip(recs, sources)):
        if isinstance(s, FitResult):
            r.name = f"model{i + 1}"
    seen: dict[str, int] = {}
    for r in recs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}_{seen[r.name]}"
        else:
            seen[r.name] = 1


def _as_ml(r: Model) -> Model:
    if r.method == "ML":
        return r
    res = r.refit("ML")
    return Model.from_result(res, r.name, config=r.config, directory=r.directory,
                             refitted=True)


def is_nested(fixed_a, random_a, fixed_b, random_b, df: int, residual_a=frozenset(),
              residual_b=frozenset()) -> bool:
    """Whether model a (fewer parameters) is nested in model b by their terms: a's fixed
    and random terms (and residual structure, `residual_terms`) are subsets of b's, and b
    has more parameters (df > 0)."""
    return df > 0 and frozenset(fixed_a) <= frozenset(fixed_b) and \
        frozenset(random_a) <= frozenset(random_b) and \
        frozenset(residual_a) <= frozenset(residual_b)


def residual_terms(structure: dict | None) -> frozenset[tuple[str, str]]:
    """result.json's "correlation" as pseudo-terms ("Residual", what)."""
    if not structure:
        return frozenset()
    out = set()
    if structure.get("structure"):
        out.add(("Residual", f"{structure['structure']}({structure.get('time')} | "
                             f"{structure.get('group')})"))
    if structure.get("variance_by"):
        out.add(("Residual", f"variance by {structure['variance_by']}"))
    return frozenset(out)


def not_nested_note(a: str, b: str) -> str:
    """The warning for a pair that is not tested (printed by `compare` and `report`)."""
    return f"{a} is not nested in {b} (by their terms): no likelihood-ratio test"


def _test(a: Model, b: Model) -> tuple:
    df = b.npar - a.npar
    fa, fb = frozenset(a.fixed_terms), frozenset(b.fixed_terms)
    nested = is_nested(fa, a.random_terms, fb, b.random_terms, df, a.residual_terms,
                       b.residual_terms)
    if not nested:
        return (a.name, b.name, None, df, None, a.refitted or b.refitted, None, False)
    chisq = 2.0 * max(0.0, b.loglik - a.loglik)
    p = float(_dist.chi2_sf(chisq, df))
    mix = None
    if df > 0 and fa == fb and a.residual_terms == b.residual_terms \
            and a.random_terms < b.random_terms \
            and len(b.random_terms - a.random_terms) == 1:
        mix = 0.5 * float(_dist.chi2_sf(chisq, df)) + \
            0.5 * (float(_dist.chi2_sf(chisq, df - 1)) if df > 1 else float(chisq <= 0))
    return (a.name, b.name, chisq, df, p, a.refitted or b.refitted, mix, nested)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------------- R's anova table

def _sig(x: float, digits: int = 5) -> str:
    """`x` to `digits` significant digits without exponent (R's print of an anova table)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}" if math.isfinite(x) else "NA"
    int_digits = max(1, int(math.floor(math.log10(abs(x)))) + 1)
    return f"{x:.{max(0, digits - int_digits)}f}"


def _pval(p: float | None) -> str:
    if p is None:
        return ""
    return "< 2.2e-16" if p < 2.2e-16 else f"{p:.4g}"


def _stars(p: float | None) -> str:
    if p is None:
        return ""
    for cut, s in ((0.001, "***"), (0.01, "**"), (0.05, "*"), (0.1, ".")):
        if p < cut:
            return s
    return ""


def render_comparison(c: Comparison) -> str:
    lines = []
    if c.refit_ml:
        lines.append("refitting model(s) with ML (instead of REML)")
    lines.append("Models:")
    lines += [f"{r['name']}: {r['formula']}" for r in c.models.iter_rows(named=True)]
    tests = {r["model_b"]: r for r in c.tests.iter_rows(named=True)}
    has_mix = c.tests["p_value_mixture"].null_count() < c.tests.height
    header = ["", "npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)", ""]
    if has_mix:
        header += ["Pr(mix)", ""]
    rows = []
    for r in c.models.iter_rows(named=True):
        t = tests.get(r["name"])
        row = [r["name"], str(r["npar"]), _sig(r["aic"]), _sig(r["bic"]), _sig(r["loglik"]),
               _sig(r["deviance"])]
        if t is None:
            row += ["", "", "", ""] + (["", ""] if has_mix else [])
        elif not t["nested"]:
            row += ["", str(t["df"]), "", ""] + (["", ""] if has_mix else [])
        else:
            row += [f"{t['chisq']:.4g}", str(t["df"]), _pval(t["p_value"]),
                    _stars(t["p_value"])]
            if has_mix:
                row += [_pval(t["p_value_mixture"]), _stars(t["p_value_mixture"])]
        rows.append(row)
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        cells = [(x.ljust(w) if i == 0 or h == "" else x.rjust(w))
                 for i, (x, w, h) in enumerate(zip(row, widths, header))]
        lines.append(" ".join(cells).rstrip())
    lines += ["---", "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"]
    if has_mix:
        lines.append("Pr(mix): boundary test of the added variance, 50:50 mixture of "
                     "chi2(df-1) and chi2(df)")
    for t in c.tests.iter_rows(named=True):
        if not t["nested"]:
            lines.append(not_nested_note(t["model_a"], t["model_b"]))
    if not c.refit_ml and any(r["method"] == "REML" for r in c.models.iter_rows(named=True)):
        lines.append("REML fits compared directly: the models differ only in random effects"
                     + (" or the residual structure" if any(r.residual_structure
                                                           for r in c.fits) else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `mlpipe compare A B ... [--out DIR]`; `args.func` is `run`."""
    p = subparsers.add_parser(
        "compare", help="likelihood-ratio tests between nested models (lme4's anova)",
        description="Compare nested models given as config .toml files (fitted first) or "
                    "result directories (read from result.json).")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="config .toml file or result directory (at least two)")
    p.add_argument("--names", help="comma-separated model labels, in the order given")
    p.add_argument("--ml", action="store_true",
                   help="refit REML models by ML even if only random effects differ")
    p.add_argument("--out", "-o", help="write comparison.json into this directory")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if len(args.models) < 2:
        raise InputError("compare needs at least two models")
    names = [n.strip() for n in args.names.split(",")] if getattr(args, "names", None) else None
    cmp = compare(args.models, names, ml=bool(getattr(args, "ml", False)))
    quiet = bool(getattr(args, "quiet", False))
    if not quiet:
        print(cmp.summary())
    if getattr(args, "out", None):
        path = cmp.write(args.out)
        if not quiet:
            print(f"\nwrote {path}")
    return 0
