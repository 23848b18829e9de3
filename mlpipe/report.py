"""`mlpipe report`: one self-contained HTML page for one or more fitted models.

    mlpipe report out/hsb_null out/hsb_rc --out report.html

For each result directory (result.json, ranef.parquet, config.toml, as `mlpipe fit --out`
writes them) the page shows the summary tables, a caterpillar plot of the conditional modes
of every grouping factor, the variance decomposition, a Q-Q plot of the scaled residuals and,
for a random slope on a numeric variable, the group-specific regression lines (of the first
factor, most levels first, with such a slope) and, for growth models (`growth_model`: a
residual correlation structure, or a random slope on the innermost factor), the observed and
fitted trajectories of a sample of subjects and the average trajectory with its confidence
band.  With several directories it adds the model-comparison table and the proportional
reduction in variance between consecutive models.

Everything the page needs is inside the file: the plots are PNGs drawn with matplotlib's
Agg canvas (no pyplot, no global backend switch) and embedded as base64 data URIs; the CSS
is inline; there are no scripts and no external links.

The data-dependent parts read the training data named in config.toml again with DuckDB
(a relative path is looked up from the current directory, then from the result directory
and its parents), through the model's linear predictor as mlpipe.predict compiles it
(`linear_predictor`: X·β + Σ_k Z_k·b_k, sql/predict.sql): the residual Q-Q plot from a
bounded reservoir sample (`sample_rows` rows), the regression lines from one grouped pass
(per group: the slope variable's range and the means of the other predictors), the growth
curves from three (`growth_curves`: the rows of at most GROWTH_SUBJECTS subjects picked by
the MD5 hash of their key, a grid of X·β̂ with the rows of X, the observed means by time; the
band's Var(β̂) from the saved statistics at the fit's estimates, `fixed_vcov`), and, through
the optional helpers, `mlpipe.predict.residual_summary` (exact scaled-residual quantiles,
per-group residual variance), `mlpipe.variance.icc` (the ICC's interval, from a refit of the
statistics) and `mlpipe.compare.compare` (ML refits when the fixed effects differ).  Memory
stays O(groups + sample_rows + GROWTH_SUBJECTS × GROWTH_SUBJECT_ROWS) whatever the data's
size.  `data=False` (`--no-data`) skips all of them.  A helper module that is missing or
fails, or data that cannot be read (moved, or a fit from saved statistics), costs only its
section, replaced by a note.
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import importlib
import io
import json
import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._lazy import lazy_import
from .errors import InputError, MlpipeError

duckdb = lazy_import("duckdb")
np = lazy_import("numpy")
pl = lazy_import("polars")

#: default size of the residual sample (rows drawn by reservoir sampling)
SAMPLE_ROWS = 5000
#: at most this many groups are drawn in the group-specific regression lines
MAX_LINE_GROUPS = 50
#: the caterpillar plot labels its levels up to this many levels
MAX_LABELLED_LEVELS = 60
#: above this many levels the caterpillar plot shows an evenly spaced subset (extremes kept)
MAX_PLOTTED_LEVELS = 5000
#: points along the slope variable's range for each group's line (curves for I(x^2) etc.)
LINE_POINTS = 25
#: at most this many subjects are drawn in a growth model's spaghetti plot
GROWTH_SUBJECTS = 30
#: a drawn subject's series longer than this many rows is thinned evenly along time
GROWTH_SUBJECT_ROWS = 500
#: points along the time's range for the average trajectory
GROWTH_POINTS = 50
#: observed means per distinct time up to this many distinct times, else per quantile bin
GROWTH_MAX_TIMES = 25
#: quantile bins of time for the observed means (many distinct times)
GROWTH_BINS = 12
Z95 = 1.959963984540054


# ---------------------------------------------------------------------- loading result dirs

@dataclass
class ModelRun:
    """One result directory as written by `mlpipe fit --out`."""

    path: Path
    name: str
    result: dict
    ranef: pl.DataFrame | None
    config: dict
    notes: list[str] = field(default_factory=list)

    @property
    def group(self) -> str | None:
        """The first grouping factor (the one with most levels)."""
        groups = self.result.get("groups") or {}
        return next(iter(groups), None)

    @property
    def factors(self) -> list[str]:
        """The grouping factors, most levels first (result.json's `groups`)."""
        return list(self.result.get("groups") or {})

    def factor_terms(self, factor: str | None) -> list[str]:
        """The random-effect terms of one grouping factor."""
        return [r["term"] for r in self.result.get("random_effects", [])
                if factor is None or r.get("group", factor) == factor]

    def factor_ranef(self, factor: str | None) -> pl.DataFrame:
        """The conditional modes of one grouping factor (all of them without a group
        column, as in results of one factor)."""
        if self.ranef is None:
            return pl.DataFrame()
        if factor is None or "group" not in self.ranef.columns:
            return self.ranef
        return self.ranef.filter(pl.col("group").cast(pl.Utf8) == factor)

    @property
    def random_terms(self) -> list[str]:
        return [r["term"] for r in self.result.get("random_effects", [])]

    @property
    def fixed_terms(self) -> list[str]:
        return [r["term"] for r in self.result.get("fixed_effects", [])]

    @property
    def npar(self) -> int:
        if self.result.get("npar") is not None:
            return int(self.result["npar"])
        return len(self.fixed_terms) + len(self.result.get("theta") or self.random_terms) + 1

    @property
    def intercept_only(self) -> bool:
        """Random intercepts only (one variance component besides the residual)."""
        return self.random_terms == ["(Intercept)"]


def load_run(path: str | os.PathLike[str]) -> ModelRun:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"result directory not found: {path}")
    rfile = p / "result.json"
    if not rfile.is_file():
        raise InputError(f"{path} is not a result directory (no result.json); "
                         f"write one with `mlpipe fit ... --out DIR`")
    try:
        result = json.loads(rfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{rfile} is not valid JSON: {exc}") from None
    if not isinstance(result, dict) or "formula" not in result:
        raise InputError(f"{rfile} is not an mlpipe result (no formula)")
    notes: list[str] = []
    ranef = None
    if (p / "ranef.parquet").is_file():
        try:
            ranef = pl.read_parquet(p / "ranef.parquet")
        except Exception as exc:  # noqa: BLE001 - a broken file only loses its plot
            notes.append(f"ranef.parquet could not be read ({_first_line(exc)})")
    else:
        notes.append("no ranef.parquet in the result directory")
    config: dict = {}
    if (p / "config.toml").is_file():
        try:
            config = tomllib.loads((p / "config.toml").read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            notes.append(f"config.toml could not be read ({_first_line(exc)})")
    name = str(config.get("name") or p.resolve().name)
    return ModelRun(p, name, result, ranef, config, notes)


# ---------------------------------------------------------------------- optional helpers

def _optional(module: str):
    """`mlpipe.<module>` if it is installed, else None (the report then does without it)."""
    try:
        return importlib.import_module(f"mlpipe.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"mlpipe.{module}", "mlpipe"):
            return None
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------- numbers and HTML

def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "—" if math.isnan(v) else ("∞" if v > 0 else "−∞")
        if v == 0:
            return "0"
        if abs(v) >= 1e12 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return _fixed(v, digits)
    return str(v)


def _fixed(v: float, digits: int) -> str:
    """`digits` significant digits (all the integer digits), fixed notation."""
    mag = int(math.floor(math.log10(abs(v))))
    decimals = max(digits - 1 - mag, 0)
    return f"{v:.{decimals}f}"


def _fmt_block(values: list[Any], digits: int = 6) -> list[str]:
    """Numbers shown together (a row or column of likelihoods, two variances side by side)
    with one number of decimals: `digits` significant digits of the largest of them."""
    finite = [abs(float(v)) for v in values
              if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
              and math.isfinite(float(v)) and v != 0]
    if not finite or max(finite) >= 1e12 or max(finite) < 1e-3:
        return [_fmt(v, digits) for v in values]
    decimals = max(digits - 1 - int(math.floor(math.log10(max(finite)))), 0)
    return [_fmt(v, digits) if v is None or isinstance(v, bool) or not math.isfinite(float(v))
            else f"{float(v):.{decimals}f}" for v in values]


def _fmt_share(v: Any) -> str:
    """A proportion with three decimals (every row alike)."""
    if v is None or not math.isfinite(float(v)):
        return _fmt(None)
    return f"{float(v):.3f}"


def _not_nested_note(a: str, b: str) -> str:
    compare = _optional("compare")
    if compare is not None and hasattr(compare, "not_nested_note"):
        return compare.not_nested_note(a, b)
    return f"{a} is not nested in {b} (by their terms): no likelihood-ratio test"


def _nested(a: ModelRun, b: ModelRun) -> bool:
    """a (fewer parameters) nested in b by its fixed and random (factor, term) terms and its
    residual structure (compare.is_nested)."""
    from .compare import is_nested, residual_terms

    def rand(r: ModelRun) -> frozenset:
        return frozenset((e.get("group"), e["term"]) for e in r.result.get("random_effects", []))
    return is_nested(a.fixed_terms, rand(a), b.fixed_terms, rand(b), b.npar - a.npar,
                     residual_terms(a.result.get("correlation")),
                     residual_terms(b.result.get("correlation")))


def _fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    p = float(p)
    if p < 2.2e-16:
        return "&lt;2.2e-16"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[Any]], *, cls: str = "",
           raw_cols: frozenset[int] = frozenset(), caption: str | None = None) -> str:
    """An HTML table; cells are escaped unless their column index is in `raw_cols`."""
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if caption:
        out.append(f"<caption>{_e(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            text = c if i in raw_cols else _e(c)
            cells.append('<td class="n">' + text + "</td>" if _NUMERIC.match(text)
                         else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


_NUMERIC = re.compile(r"^(?:[-−+]?(?:\d[\d,]*\.?\d*(?:e[-+]?\d+)?|∞)|—|&lt;[\d.e+-]+)$")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _frame_table(obj: Any) -> str:
    """Render a table of unknown shape (polars/pandas frame, list of dicts, dict of lists)."""
    if obj is None:
        return _note("(empty)")
    if hasattr(obj, "to_dicts"):  # polars
        rows = obj.to_dicts()
        header = list(obj.columns)
    elif hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas
        rows = obj.to_dict(orient="records")
        header = [str(c) for c in obj.columns]
    elif isinstance(obj, dict):
        header = list(obj)
        n = max((len(v) for v in obj.values()), default=0)
        rows = [{k: obj[k][i] for k in header} for i in range(n)]
    else:
        rows = list(obj)
        header = list(dict.fromkeys(k for r in rows for k in r))
    if not rows:
        return _note("(no rows)")
    body = []
    for r in rows:
        line = []
        for h in header:
            v = r.get(h)
            line.append(_fmt_p(v) if _is_p_col(h) and isinstance(v, (float, int))
                        and not isinstance(v, bool) else _e(_fmt(v)))
        body.append(line)
    return _table(header, body, raw_cols=frozenset(range(len(header))))


def _is_p_col(name: str) -> bool:
    n = name.lower().replace("_", "").replace(" ", "")
    return n in {"p", "pvalue", "pr(>chisq)", "pr(>|t|)", "pchisq", "prchisq"}


# ---------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def caterpillar_plot(ranef: pl.DataFrame, terms: list[str], group: str) -> tuple[str, list[str]]:
    """Conditional modes ± 1.96 conditional SD, one panel per term, levels sorted by mode."""
    notes: list[str] = []
    terms = [t for t in terms if ranef.filter(pl.col("term") == t).height > 0]
    m = max(ranef.filter(pl.col("term") == t).height for t in terms)
    labelled = m <= MAX_LABELLED_LEVELS
    height = max(3.0, 0.17 * m + 1.2) if labelled else 6.0
    fig = _figure(min(4.6 * len(terms), 14.0) if len(terms) > 1 else 7.5, height)
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    for ax, term in zip(axes, terms):
        d = ranef.filter(pl.col("term") == term).sort("estimate")
        est = d["estimate"].cast(pl.Float64).to_numpy()
        sd = d["cond_sd"].cast(pl.Float64).fill_nan(0.0).fill_null(0.0).to_numpy() \
            if "cond_sd" in d.columns else np.zeros_like(est)
        levels = d["level"].cast(pl.Utf8).to_list()
        y = np.arange(len(est))
        if len(est) > MAX_PLOTTED_LEVELS:
            keep = np.unique(np.linspace(0, len(est) - 1, MAX_PLOTTED_LEVELS).round().astype(int))
            notes.append(f"{term}: {len(keep)} of {len(est)} levels drawn (evenly spaced in "
                         f"the sorted order, both extremes kept)")
            est, sd, y = est[keep], sd[keep], y[keep]
            levels = [levels[i] for i in keep]
        lo, hi = est - Z95 * sd, est + Z95 * sd
        ax.axvline(0.0, color="0.5", lw=0.8, ls=":")
        ax.hlines(y, lo, hi, color="#4a7ab5", lw=1.0 if labelled else 0.5, alpha=0.8)
        ax.plot(est, y, "o", color="#1f3f73", ms=3.5 if labelled else 1.5)
        ax.set_title(term, fontsize=10)
        ax.set_ylim(y.min() - 1, y.max() + 1) if len(y) else None
        if labelled:
            ax.set_yticks(y, levels, fontsize=7)
        else:
            ax.set_yticks([])
        ax.set_xlabel("conditional mode ± 1.96 conditional SD", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="0.92")
    axes[0].set_ylabel(f"{group} ({m} levels, sorted by estimate)", fontsize=9)
    return _img(fig, f"caterpillar plot of the conditional modes by {group}"), notes


def qq_plot(resid: np.ndarray, title: str) -> str:
    from . import _dist

    r = np.sort(np.asarray(resid, dtype=float))
    n = len(r)
    theo = _dist.norm_ppf((np.arange(1, n + 1) - 0.5) / n)
    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot()
    lim = [min(theo[0], r[0]), max(theo[-1], r[-1])]
    ax.plot(lim, lim, color="#c0392b", lw=1, label="y = x (standard normal)")
    q1, q3 = np.quantile(r, [0.25, 0.75])
    t1, t3 = _dist.norm_ppf([0.25, 0.75])
    slope = (q3 - q1) / (t3 - t1)
    ax.plot(lim, [q1 + slope * (v - t1) for v in lim], color="0.4", lw=0.8, ls="--",
            label="line through the quartiles")
    ax.plot(theo, r, "o", ms=2.0, color="#1f3f73", alpha=0.5, mec="none")
    ax.set_xlabel("standard normal quantiles")
    ax.set_ylabel("scaled residual quantiles")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(color="0.93")
    return _img(fig, "normal Q-Q plot of the scaled residuals")


def lines_plot(lines: pl.DataFrame, population: pl.DataFrame | None, x_label: str,
               y_label: str, title: str) -> str:
    """`lines`: level, x, yhat, slope (colour); `population`: x, yhat."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    slopes = lines.group_by("level").agg(pl.col("slope").first())
    norm = Normalize(float(slopes["slope"].min()), float(slopes["slope"].max()) or 1.0)
    cmap = colormaps["viridis"]
    for level, d in lines.sort("x").group_by("level", maintain_order=True):
        s = d["slope"][0]
        ax.plot(d["x"].to_numpy(), d["yhat"].to_numpy(), color=cmap(norm(s)), lw=0.9,
                alpha=0.85)
    if population is not None and population.height:
        p = population.sort("x")
        ax.plot(p["x"].to_numpy(), p["yhat"].to_numpy(), color="black", lw=2.4, ls="--",
                label="fixed effects only")
        ax.legend(fontsize=8, loc="best")
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="group-specific slope", shrink=0.85)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"fitted {y_label}")
    ax.set_title(title, fontsize=10)
    ax.grid(color="0.93")
    return _img(fig, "group-specific regression lines")


def _subject_colours(n: int) -> list:
    """n distinguishable colours (tab20 then tab20b, cycled beyond 40)."""
    from matplotlib import colormaps

    base = [colormaps["tab20"](i) for i in range(20)] + \
        [colormaps["tab20b"](i) for i in range(20)]
    base = base[0::2] + base[1::2]  # the darker shades first: neighbours differ most
    return [base[i % len(base)] for i in range(n)]


def spaghetti_plot(curves: dict, y_label: str, title: str) -> str:
    """`curves` as `growth_curves` returns them: per sampled subject, one colour, the
    observed values as points joined by a thin line and the conditional fit as a thick
    line, both in time order."""
    from matplotlib.lines import Line2D

    g = curves["growth"]
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    traj = curves["trajectories"]
    colours = _subject_colours(len(curves["sampled"]))
    for colour, subject in zip(colours, curves["sampled"]):
        d = traj.filter(pl.col("subject") == subject)
        t = d["time"].to_numpy()
        ax.plot(t, d["observed"].to_numpy(), "-o", color=colour, lw=0.6, ms=2.6, alpha=0.7,
                mec="none")
        ax.plot(t, d["fitted"].to_numpy(), "-", color=colour, lw=1.8, alpha=0.95)
    ax.legend(handles=[Line2D([], [], color="0.35", ls="-", marker="o", lw=0.6, ms=3,
                              label="observed"),
                       Line2D([], [], color="0.35", lw=1.8,
                              label="fitted (fixed + random effects)")],
              fontsize=8, loc="best")
    ax.set_xlabel(g.time)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(color="0.93")
    return _img(fig, "spaghetti plot of observed and fitted trajectories")


def average_plot(curves: dict, y_label: str, title: str) -> str:
    """The average trajectory X·β̂ with its 95% band over the observed means by time."""
    g = curves["growth"]
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    ax.fill_between(curves["grid"], curves["lower"], curves["upper"], color="#4a7ab5",
                    alpha=0.25, lw=0, label="95% confidence band")
    ax.plot(curves["grid"], curves["line"], color="#1f3f73", lw=2.2,
            label="average trajectory (fixed effects)")
    m = curves["means"]
    if m.height:
        what = f"per {g.time}" if curves["binning"] == "time" \
            else f"per quantile bin of {g.time}"
        ax.plot(m["time"].to_numpy(), m["mean"].to_numpy(), "o", color="#d35400", ms=5,
                mec="white", mew=0.8, label=f"observed mean {what}")
    ax.set_xlabel(g.time)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(color="0.93")
    return _img(fig, "average trajectory with its 95% confidence band")


# ---------------------------------------------------------------------- data passes (DuckDB)

class _NoData(Exception):
    """The training data is not available; the message says why."""


def resolve_data(run: ModelRun) -> str:
    """The training data path of a run: as written, else relative to the result dir or any
    of its parents (config.toml records the path relative to where `mlpipe fit` ran)."""
    data = run.config.get("data")
    if not data:
        if run.config.get("stats"):
            raise _NoData("the model was fitted from saved statistics; config.toml names no data")
        raise _NoData("config.toml names no training data")
    data = str(data)

    def exists(p: str) -> bool:
        return bool(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") \
            else os.path.exists(p)

    if exists(data) or os.path.isabs(data):
        if not exists(data):
            raise _NoData(f"training data {data} not found")
        return data
    base = run.path.resolve()
    for d in [base, *base.parents]:
        cand = str(d / data)
        if exists(cand):
            return cand
    raise _NoData(f"training data {data!r} not found from the current directory or "
                  f"{run.path}")


@dataclass
class _Model:
    """The fitted model's linear predictor over its training data: mlpipe.predict's
    `LinearPredictor`, the one compilation of X·β + Σ_k Z_k·b_k (with the conditional modes
    of every factor registered on `con`)."""

    con: Any
    frame: Any  # mlpipe.predict.Frame
    pred: Any  # mlpipe.predict.LinearPredictor
    sigma: float
    params: dict[str, object]

    @property
    def complete(self) -> str:
        """The rows the model used: no null (or NaN) in any model column."""
        from .design import complete_condition

        return complete_condition(self.pred.formula.columns(), self.pred.schema)

    @property
    def source(self) -> str:
        """The training rows, with the means of center() / group_mean() as columns."""
        return self.pred.design.aggregates.source(self.frame.relation, self.complete)

    def close(self) -> None:
        self.con.close()

    def execute(self, sql: str):
        """Run `sql` with exactly the bound parameters it names (DuckDB rejects extras)."""
        used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", sql))
        return self.con.execute(sql, {k: v for k, v in self.params.items() if k in used})

    def polars(self, sql: str) -> pl.DataFrame:
        """`execute`, the result as a polars DataFrame (only what the report draws)."""
        used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", sql))
        return self.con.sql(sql, params={k: v for k, v in self.params.items()
                                         if k in used}).pl()


def _compile(run: ModelRun) -> _Model:
    """Connect, and compile the model's linear predictor over its training data
    (mlpipe.predict.linear_predictor: the data checked against the formula, the fit's factor
    coding, β bound, every factor's conditional modes registered)."""
    import dataclasses

    from ._sql import connect
    from .predict import Frame, linear_predictor, load_result_dir

    if run.ranef is None:
        raise _NoData("the conditional modes (ranef.parquet) are missing")
    data = resolve_data(run)
    model = dataclasses.replace(load_result_dir(run.path), ranef=run.ranef, source=data)
    from .engines import EngineOptions

    con = connect(options=EngineOptions.from_config(run.config))
    try:
        frame = Frame(data, con)
        pred = linear_predictor(model, frame, con, training=True)
        if not pred.has_response:
            raise _NoData(f"the response ({pred.formula.response.deparse()}) is not a numeric "
                          f"column of {data}")
        sigma = float(run.result.get("sigma") or math.sqrt(run.result["residual_variance"]))
        params = {**frame.params, **pred.params, "mlpipe_sigma": sigma}
        return _Model(con, frame, pred, sigma, params)
    except BaseException:
        con.close()
        raise


def residual_sample(run: ModelRun, sample_rows: int = SAMPLE_ROWS) -> tuple[np.ndarray, int]:
    """Scaled conditional residuals (y − Xβ̂ − Σ_k Z_k b̂_k)/σ̂ of a reservoir sample of the
    rows the model used, and the number of rows the sample was drawn from (one DuckDB
    pass)."""
    from ._sql import first_line, render

    sample = int(sample_rows)
    if sample < 1:
        raise ValueError("sample_rows must be positive")
    model = _compile(run)
    try:
        rows = render("report_residual_sample", source=model.source, complete=model.complete,
                      sample=str(sample))
        sql = model.pred.sql("(__mlpipe_y - fitted) / $mlpipe_sigma AS resid",
                             f"({rows}) AS __mlpipe_sample")
        try:
            resid = model.execute(sql).fetchnumpy()["resid"]
        except duckdb.Error as exc:
            raise _NoData(f"cannot compute residuals from the data: {first_line(exc)}") from None
        return np.asarray(resid, dtype=float), int(run.result.get("nobs") or len(resid))
    finally:
        model.close()


def line_factor(run: ModelRun, schema: dict[str, str] | None = None
                ) -> tuple[str | None, list[str]]:
    """The grouping factor whose group-specific lines the report draws — the first (most
    levels) with a random slope on a bare numeric column — and its slope terms."""
    from .design import is_numeric
    from .formula import parse_formula

    try:
        formula = parse_formula(run.result["formula"])
    except MlpipeError:
        return None, []
    for factor in run.factors or formula.grouping_factors:
        terms = run.factor_terms(factor)
        out = []
        for rt in (r for r in formula.random if r.group == factor):
            for var in rt.variables():
                col = var.column
                if col is None or var.label not in terms or var.label in out:
                    continue
                if schema is not None and not is_numeric(schema.get(col, "VARCHAR")):
                    continue
                out.append(var.label)
        if out:
            return factor, out
    return None, []


def slope_variables(run: ModelRun, schema: dict[str, str] | None = None) -> list[str]:
    """Random-slope terms that are a bare numeric column (`(x | g)` with x numeric), of the
    factor the lines are drawn for (`line_factor`)."""
    return line_factor(run, schema)[1]


def _held_predictors(model: _Model, xcol: str, keys: list[str]
                     ) -> tuple[list[str], list[str], list[str]]:
    """How a grid along `xcol` holds the model's other columns (`keys`, the columns grouped
    on, excepted): the predictors held (at their mean, categorical ones at their most
    frequent level — `mode()` — and the means of center()/group_mean() at their mean), the
    aggregates that compute them (over the rows grouped), and the select list that carries
    them into the grid, with the columns of the other grouping factors as NULL (so their
    conditional modes do not enter)."""
    from ._sql import quote_ident
    from .design import is_numeric

    formula, schema = model.pred.formula, model.pred.schema
    grouping = {c for rt in formula.random for c in rt.group_columns}
    variables = {c for t in list(formula.fixed) + [t for rt in formula.random
                                                    for t in rt.terms]
                 for v in t for c in v.expr.columns()}
    others = [c for c in formula.columns()
              if c not in [xcol, *keys] and c not in formula.response.columns()]
    held = [c for c in others if c in variables or c not in grouping]
    means = [alias for ms in model.pred.design.aggregates.tables.values() for alias, _ in ms]
    aggs = []
    for c in held:
        qc = quote_ident(c)
        aggs.append(f"favg({qc}) AS {qc}" if is_numeric(schema[c]) else f"mode({qc}) AS {qc}")
    aggs += [f"favg({a}) AS {a}" for a in means]
    keep = [quote_ident(c) for c in held] + means
    keep += [f"NULL AS {quote_ident(c)}" for c in others if c not in held]
    return held, aggs, keep


def group_lines(run: ModelRun, slope_term: str, max_groups: int = MAX_LINE_GROUPS
                ) -> tuple[pl.DataFrame, pl.DataFrame, int, str]:
    """Fitted lines over the slope variable's observed range within each level of the
    `line_factor`, with the other predictors at the level's means (categorical ones at its
    mode), for at most `max_groups` levels (spread evenly over the ranked slopes); plus the
    fixed-effects line over the overall range at the overall means.  Other grouping factors'
    columns are left null, so their conditional modes do not enter the lines.  One grouped
    DuckDB pass, through the model's linear predictor (sql/predict.sql)."""
    from ._sql import first_line, quote_ident, render
    from .design import is_numeric

    factor, _ = line_factor(run)
    model = _compile(run)
    try:
        formula, schema = model.pred.formula, model.pred.schema
        var = next((v for rt in formula.random if rt.group == factor
                    for v in rt.variables() if v.label == slope_term), None)
        if var is None:
            raise _NoData(f"{slope_term} is not a random slope of {factor}")
        xcol = var.column
        if xcol is None or not is_numeric(schema[xcol]):
            raise _NoData(f"{slope_term} is not a numeric column")
        # the levels to draw: evenly spaced over the ranked conditional modes of the slope
        slopes = (run.factor_ranef(factor).filter(pl.col("term") == slope_term)
                  .select(pl.col("level").cast(pl.Utf8), pl.col("estimate").cast(pl.Float64))
                  .sort("estimate"))
        m = slopes.height
        if m > max_groups:
            idx = np.unique(np.linspace(0, m - 1, max_groups).round().astype(int))
            slopes = slopes[idx.tolist()]
        model.con.register("mlpipe_pick",
                           slopes.select(pl.col("level").alias("mlpipe_level")).to_arrow())

        keys = list(formula.factor_columns(factor))
        qkeys = [quote_ident(c) for c in keys]
        _, aggs, keep = _held_predictors(model, xcol, keys)
        qx = quote_ident(xcol)
        agg_sql = ", ".join([f"min({qx}) AS __mlpipe_lo", f"max({qx}) AS __mlpipe_hi",
                             f"grouping({qkeys[0]}) AS __mlpipe_all"] + aggs)
        k = LINE_POINTS - 1
        points = render("report_group_lines", keys=", ".join(qkeys), aggregates=agg_sql,
                        source=model.source, complete=model.complete,
                        label=" || ':' || ".join(f"CAST({q} AS VARCHAR)" for q in qkeys),
                        keep="".join(f"{c}, " for c in keep), points=str(k + 1),
                        lo_hi_x=f"__mlpipe_lo + (__mlpipe_hi - __mlpipe_lo) "
                                f"* (__mlpipe_t / {k}.0) AS {qx}")
        sql = model.pred.sql(f"__mlpipe_line AS level, CAST({qx} AS DOUBLE) AS x, "
                             f"fitted AS yhat", f"({points}) AS __mlpipe_points",
                             response=False, input="*")
        try:
            out = pl.DataFrame(model.execute(sql).fetchall(), orient="row",
                               schema={"level": pl.Utf8, "x": pl.Float64, "yhat": pl.Float64})
        except duckdb.Error as exc:
            raise _NoData(f"cannot compute the lines from the data: {first_line(exc)}") \
                from None
        population = out.filter(pl.col("level").is_null()).select("x", "yhat")
        lines = (out.filter(pl.col("level").is_not_null())
                 .join(slopes.rename({"estimate": "mode"}), on="level"))
        # each line's slope, end to end: with cross-level interactions (x:z) it is more
        # than the fixed slope plus the conditional mode
        fixed_slope = float({r["term"]: r["estimate"]
                             for r in run.result["fixed_effects"]}.get(slope_term, 0.0))
        ends = (lines.sort("x").group_by("level")
                .agg(((pl.col("yhat").last() - pl.col("yhat").first())
                      / (pl.col("x").last() - pl.col("x").first())).alias("slope")))
        lines = lines.join(ends, on="level").with_columns(
            pl.when(pl.col("slope").is_finite()).then(pl.col("slope"))
            .otherwise(pl.col("mode") + fixed_slope).alias("slope"))
        return lines, population, m, xcol
    finally:
        model.close()


# ---------------------------------------------------------------------- growth curves

@dataclass(frozen=True)
class GrowthModel:
    """Why a model is a growth model, and its time and subject (`growth_model`)."""

    rule: str  # "correlation" (rule 1) or "slope" (rule 2)
    time: str  # the time column
    subject: tuple[str, ...]  # the subject's columns
    name: str  # the subject as the model names it: the series ("a:b") or the factor
    why: str  # the rule that applied, as the page says it


def growth_model(run: ModelRun) -> GrowthModel | None:
    """Whether the report draws growth curves for a model, and what its time and subject are.

    Rule 1: a model with a residual correlation structure (result.json's `correlation`, from
    `--correlation "ar1(TIME | GROUP)"` or car1): time = its `time`, subject = its `group`
    columns ("a:b": several).  Rule 2, otherwise: a model whose innermost grouping factor
    (the one with most levels) has a random slope on a numeric variable (`line_factor`; a
    categorical column is one with levels in result.json's `factor_levels`): time = that
    variable (the first such slope), subject = that factor.  None for any other model."""
    from .formula import parse_formula

    corr = run.result.get("correlation")
    if isinstance(corr, dict) and corr.get("structure") and corr.get("time") \
            and corr.get("group"):
        time, group = str(corr["time"]), str(corr["group"])
        return GrowthModel("correlation", time, tuple(group.split(":")), group,
                           f"its {corr['structure']}({time} | {group}) residual correlation "
                           f"gives the time ({time}) and the subject ({group})")
    try:
        formula = parse_formula(run.result["formula"])
    except MlpipeError:
        return None
    factors = run.factors or formula.grouping_factors
    factor, terms = line_factor(run)
    if not factors or factor != factors[0]:
        return None
    categorical = run.result.get("factor_levels") or {}
    for rt in (r for r in formula.random if r.group == factor):
        for var in rt.variables():
            if var.label in terms and var.column and var.column not in categorical:
                return GrowthModel(
                    "slope", var.column, tuple(formula.factor_columns(factor)), factor,
                    f"no residual correlation structure, and the innermost grouping factor "
                    f"({factor}) has a random slope on the numeric {var.column}: time = "
                    f"{var.column}, subject = {factor}")
    return None


def fixed_vcov(run: ModelRun) -> tuple[np.ndarray, str]:
    """Var(β̂), in the order of the fit's fixed effects, and where it came from.

    result.json keeps only the standard errors.  The saved statistics (stats.parquet,
    whitened at the fit's ψ̂ when there is a residual structure) decomposed at the fit's θ̂
    give the whole matrix without optimizing — σ̂²(R_X'R_X)⁻¹ as the fit computed it
    (`results._fixed_table`); its β̂ (and, but under Kenward–Roger, whose standard errors
    are adjusted, its diagonal) must be result.json's.  Without them: a refit (`_refit`)."""
    from .model import make_objective
    from .results import _fixed_table
    from .stats import Statistics

    r = run.result
    terms = run.fixed_terms
    beta = np.array([float(f["estimate"]) for f in r["fixed_effects"]])
    se = np.array([float(f.get("std_error") or "nan") for f in r["fixed_effects"]])
    saved = run.path / "stats.parquet"
    if saved.is_file() and r.get("theta") is not None:
        try:
            stats = Statistics.load(saved)
            obj = make_objective(stats, reml=r.get("method", "REML") == "REML")
            dec = obj.decompose(np.asarray(r["theta"], dtype=float))
            _, vcov = _fixed_table(list(stats.fixed_names), dec.beta, dec.rx,
                                   obj.sigma(dec) ** 2)
            kr = "kenward" in str(r.get("df_method") or "").lower()
            if list(stats.fixed_names) == terms \
                    and np.allclose(dec.beta, beta, rtol=1e-6, atol=1e-9 * (1 + abs(beta).max())) \
                    and (kr or np.allclose(np.sqrt(np.diag(vcov)), se, rtol=1e-5)):
                return vcov, "the saved statistics at the fit's estimates"
        except Exception:  # noqa: BLE001 - the refit below still gives it
            pass
    res = _refit(run)
    names = res.fixed_effects["term"].to_list()
    if names != terms:
        raise _NoData(f"the refit's fixed effects ({', '.join(names)}) are not the model's")
    return np.asarray(res.vcov_matrix, dtype=float), "a refit of the model"


def growth_curves(run: ModelRun, subjects: int = GROWTH_SUBJECTS) -> dict:
    """What the growth pictures of a growth model (`growth_model`) draw, from three DuckDB
    passes through the model's linear predictor (sql/predict.sql):

    * the spaghetti plot: the rows of at most `subjects` subjects — those whose key label
      has the smallest MD5 hash (sql/report_growth_sample.sql; stable, O(subjects)), a series
      over GROWTH_SUBJECT_ROWS rows thinned evenly — with the observed response and the
      conditional fit X·β̂ + Z·b̂ at the subject's own rows;
    * the average trajectory: X·β̂ on GROWTH_POINTS points along the time's range, the other
      predictors held as the group-specific lines hold them (`_held_predictors`; grouping
      columns NULL), with the pointwise 95% band ±1.96·√(x'Var(β̂)x) (`fixed_vcov`), x the
      row of X the same compilation gives at the point (sql/report_growth_average.sql);
    * the observed mean of the response per distinct time (at most GROWTH_MAX_TIMES of them)
      or per quantile bin of time (GROWTH_BINS bins, from approximate quantiles).

    Returns a dict: `growth` (the GrowthModel), `subjects` (how many the data has),
    `sampled` (the labels drawn, in hash order), `trajectories` (subject, time, observed,
    fitted; sorted by sample order and time), `thinned` (subjects thinned), `grid`, `line`,
    `se`, `lower`, `upper`, `x` (the rows of X; arrays), `terms`, `vcov`, `vcov_source`,
    `held` (the predictors held), `means` (time, mean, n), `binning` ("time" or
    "quantile")."""
    from ._sql import first_line, quote_ident, render
    from .design import complete_condition, is_numeric

    growth = growth_model(run)
    if growth is None:
        raise _NoData("not a growth model")
    if subjects < 1:
        raise ValueError("subjects must be positive")
    model = _compile(run)
    try:
        schema, design = model.pred.schema, model.pred.design
        cols = [growth.time, *growth.subject]
        missing = [c for c in cols if c not in schema]
        if missing:
            raise _NoData(f"column {missing[0]!r} is not in the data")
        if not is_numeric(schema[growth.time]):
            raise _NoData(f"the time column {growth.time!r} is not numeric "
                          f"({schema[growth.time]})")
        # the model's rows, and a time and subject (the residual structure's may be
        # columns the formula does not name: the fit dropped their nulls too)
        complete = f"{model.complete} AND {complete_condition(cols, schema)}"
        qt = quote_ident(growth.time)
        label = " || ':' || ".join(f"CAST({quote_ident(c)} AS VARCHAR)" for c in growth.subject)

        def run_sql(sql: str, what: str):
            try:
                return model.polars(sql)
            except duckdb.Error as exc:
                raise _NoData(f"cannot compute {what} from the data: {first_line(exc)}") \
                    from None

        # --- the sampled subjects' rows: observed and conditional fit
        rows = render("report_growth_sample", source=model.source, complete=complete,
                      label=label, time=qt, order=design.response.sql,
                      subjects=str(int(subjects)), rows=str(GROWTH_SUBJECT_ROWS))
        traj = run_sql(model.pred.sql(
            "__mlpipe_subject AS subject, __mlpipe_rank AS rank, __mlpipe_time AS time, "
            "CAST(__mlpipe_y AS DOUBLE) AS observed, CAST(fitted AS DOUBLE) AS fitted, "
            "__mlpipe_n AS n, __mlpipe_subjects AS subjects",
            f"({rows}) AS __mlpipe_growth"), "the subjects' trajectories")
        if traj.height == 0:
            raise _NoData("no rows with a time and a subject")
        traj = traj.sort("rank", "time", "observed", "fitted")
        firsts = traj.group_by("rank", maintain_order=True).agg(
            pl.col("subject").first(), pl.col("n").first())
        sampled = firsts["subject"].to_list()
        thinned = firsts.filter(pl.col("n") > GROWTH_SUBJECT_ROWS)["subject"].to_list()
        n_subjects = int(traj["subjects"][0])
        traj = traj.select("subject", "time", "observed", "fitted")

        # --- the average trajectory X·β̂ on a grid, and the rows of X there
        held, aggs, keep = _held_predictors(model, growth.time, [])
        fractions = ", ".join(f"{i / GROWTH_BINS!r}" for i in range(1, GROWTH_BINS))
        k = GROWTH_POINTS - 1
        points = render("report_growth_average", time=qt, source=model.source,
                        complete=complete, fractions=f"[{fractions}]",
                        aggregates="".join(f", {a}" for a in aggs),
                        keep="".join(f"{c}, " for c in keep), k=str(k),
                        points=str(k + 1))
        xs = [f"CAST({'1' if c.sql is None else c.sql} AS DOUBLE) AS __mlpipe_x{j}"
              for j, c in enumerate(design.fixed)]
        grid = run_sql(model.pred.sql(
            ", ".join([f"CAST({qt} AS DOUBLE) AS __mlpipe_grid",
                       "CAST(fitted_population AS DOUBLE) AS __mlpipe_line",
                       "__mlpipe_distinct", "__mlpipe_edges", *xs]),
            f"({points}) AS __mlpipe_points", response=False, input="*"),
            "the average trajectory")
        grid = grid.sort("__mlpipe_grid").filter(pl.col("__mlpipe_line").is_not_null())
        if grid.height == 0:
            raise _NoData("the average trajectory is undefined (a predictor held is missing)")
        x = grid.select([f"__mlpipe_x{j}" for j in range(len(design.fixed))]) \
            .to_numpy().astype(float)
        vcov, vcov_source = fixed_vcov(run)
        se = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", x, vcov, x), 0.0, None))
        line = grid["__mlpipe_line"].to_numpy().astype(float)

        # --- the observed means by time: per distinct time, or per quantile bin
        distinct = int(grid["__mlpipe_distinct"][0] or 0)
        edges = sorted({float(e) for e in (grid["__mlpipe_edges"].to_list()[0] or [])
                        if e is not None and math.isfinite(float(e))})
        if distinct <= GROWTH_MAX_TIMES or not edges:
            binning, bin_sql = "time", f"CAST({qt} AS DOUBLE)"
        else:
            binning = "quantile"
            model.params.update({f"mlpipe_edge{i}": e for i, e in enumerate(edges)})
            bin_sql = ("CASE " + " ".join(f"WHEN CAST({qt} AS DOUBLE) <= $mlpipe_edge{i} "
                                           f"THEN {i}" for i in range(len(edges)))
                       + f" ELSE {len(edges)} END")
        means = run_sql(render("report_growth_means", bin=bin_sql, time=qt,
                               response=design.response.sql, source=model.source,
                               complete=complete), "the observed means")
        means = means.select(pl.col("time").cast(pl.Float64), pl.col("mean").cast(pl.Float64),
                             pl.col("n").cast(pl.Int64))
        return {"growth": growth, "subjects": n_subjects, "sampled": sampled,
                "trajectories": traj, "thinned": thinned,
                "grid": grid["__mlpipe_grid"].to_numpy().astype(float), "line": line,
                "se": se, "lower": line - Z95 * se, "upper": line + Z95 * se, "x": x,
                "terms": [c.name for c in design.fixed], "vcov": vcov,
                "vcov_source": vcov_source, "held": held, "means": means,
                "binning": binning}
    finally:
        model.close()


# ---------------------------------------------------------------------- variance summaries

def _refit(run: ModelRun):
    """The run's model fitted again (a FitResult with statistics): from a statistics file
    when there is one, else one statistics pass over the training data."""
    from .model import fit

    method = run.result.get("method", "REML")
    if (run.path / "stats.parquet").is_file():
        return fit(stats=run.path / "stats.parquet", method=method)
    if run.config.get("stats") and os.path.exists(str(run.config["stats"])):
        return fit(stats=run.config["stats"], method=method)
    duck = run.config.get("duckdb") or {}
    return fit(resolve_data(run), run.result["formula"], method=method,
               weights=run.config.get("weights"), correlation=run.config.get("correlation"),
               residual_variance_by=run.config.get("residual_variance_by"),
               **{k: duck.get(k) for k in ("memory_limit", "threads", "temp_directory")})


def icc_info(run: ModelRun, *, data: bool = True) -> tuple[dict | None, list[str]]:
    """ICC of a random-intercept-only model, τ₀₀ / (τ₀₀ + σ²), with its confidence interval
    from mlpipe.variance.icc when available; None for models with random slopes."""
    if not run.intercept_only:
        return None, []
    notes: list[str] = []
    given = run.result.get("icc")
    if isinstance(given, dict) and isinstance(given.get("icc"), (int, float)):
        return {**given, "source": "result.json"}, notes
    tau = float(run.result["random_effects"][0]["variance"])
    s2 = float(run.result["residual_variance"])
    info: dict = {"icc": tau / (tau + s2) if tau + s2 > 0 else None, "source": "computed"}
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        info = {"icc": float(given), "source": "result.json"}
    variance = _optional("variance")
    if variance is None or not hasattr(variance, "icc"):
        notes.append("mlpipe.variance is not available: no confidence interval for the ICC.")
    elif not data:
        notes.append("Data passes are off (--no-data): no confidence interval for the ICC.")
    else:
        try:
            ic = variance.icc(_refit(run))
            info = {"icc": float(ic.icc), "lower": ic.lower, "upper": ic.upper,
                    "level": ic.level, "method": ic.method, "source": "mlpipe.variance.icc"}
        except Exception as exc:  # noqa: BLE001 - the point estimate remains
            notes.append(f"No confidence interval for the ICC ({_first_line(exc)}).")
    return info, notes


def _components(run: ModelRun) -> dict[str, float]:
    out = {f"{r['group']}: {r['term']}": float(r["variance"])
           for r in run.result.get("random_effects", [])}
    out["Residual"] = float(run.result["residual_variance"])
    return out


def variance_reduction(base: ModelRun, model: ModelRun) -> list[list[Any]]:
    """Proportional reduction in each variance component shared by two models:
    (V_base − V_model) / V_base (Raudenbush & Bryk's 'proportion of variance explained')."""
    a, b = _components(base), _components(model)
    rows = []
    for comp in a:
        if comp in b:
            va, vb = a[comp], b[comp]
            rows.append([comp, va, vb, (va - vb) / va if va > 0 else None])
    return rows


# ---------------------------------------------------------------------- model comparison

def _own_comparison(runs: list[ModelRun]) -> tuple[list[list[Any]], list[list[Any]], list[str]]:
    from . import _dist

    runs = sorted(runs, key=lambda r: r.npar)  # as mlpipe.compare and lme4's anova order them
    models = [[r.name, r.result["formula"], r.result.get("method"), r.npar,
               r.result.get("nobs"), r.result.get("loglik"), r.result.get("aic"),
               r.result.get("bic"), r.result.get("deviance")] for r in runs]
    tests, notes = [], []
    for a, b in zip(runs, runs[1:]):
        if not _nested(a, b):
            tests.append([f"{a.name} → {b.name}", b.npar - a.npar, None, None])
            notes.append(_not_nested_note(a.name, b.name) + ".")
            continue
        dev_a, dev_b = a.result.get("deviance"), b.result.get("deviance")
        df = b.npar - a.npar
        reason = None
        if a.result.get("nobs") != b.result.get("nobs"):
            reason = "different numbers of observations"
        elif a.result.get("method") != b.result.get("method"):
            reason = "one REML and one ML fit"
        elif a.result.get("method") == "REML" and a.fixed_terms != b.fixed_terms:
            reason = "REML fits with different fixed effects (refit both with --ml)"
        elif df == 0:
            reason = "same number of parameters"
        if reason or dev_a is None or dev_b is None:
            tests.append([f"{a.name} → {b.name}", df, None, None])
            notes.append(f"{a.name} vs {b.name}: no likelihood-ratio test ({reason}).")
            continue
        small, big = (a, b) if df > 0 else (b, a)
        chisq = float(small.result["deviance"]) - float(big.result["deviance"])
        p = float(_dist.chi2_sf(max(chisq, 0.0), abs(df)))
        tests.append([f"{a.name} → {b.name}", abs(df), chisq, p])
    if any(r.result.get("method") == "REML" for r in runs):
        notes.append("Tests of variance components on the boundary (a variance of zero) are "
                     "conservative: the χ² p-value is about twice the correct one.")
    return models, tests, notes


def comparison_section(runs: list[ModelRun], *, data: bool = True) -> str:
    out = ['<section id="comparison"><h2>Model comparison</h2>']
    compare = _optional("compare")
    comp = None
    if compare is None or not hasattr(compare, "compare"):
        out.append(_note("mlpipe.compare is not available; the report compares the models "
                         "itself (no ML refits)."))
    elif not data:
        out.append(_note("Data passes are off (--no-data), so REML fits are not refitted by "
                         "ML; the report compares the models as fitted."))
    else:
        try:
            comp = compare.compare([r.path for r in runs], [r.name for r in runs])
        except Exception as exc:  # noqa: BLE001 - fall back to our own table
            out.append(_note(f"mlpipe.compare could not compare these models "
                             f"({_first_line(exc)}); the report compares them as fitted."))
    if comp is not None:
        out.append(_compare_tables(comp))
    else:
        models, tests, notes = _own_comparison(runs)
        out.append("<h3>Models</h3>")
        block = _fmt_block([v for r in models for v in r[5:]])
        out.append(_table(["model", "formula", "method", "npar", "nobs", "logLik", "AIC", "BIC",
                           "deviance"],
                          [[r[0], r[1], r[2], r[3], r[4]] + block[4 * i:4 * i + 4]
                           for i, r in enumerate(models)], cls="num"))
        out.append("<h3>Likelihood-ratio tests (consecutive models)</h3>")
        out.append(_table(["models", "Df", "Chisq", "Pr(>Chisq)"],
                          [[_e(t[0]), _e(_fmt(t[1])), _e(_fmt(t[2])), _fmt_p(t[3])]
                           for t in tests],
                          cls="num", raw_cols=frozenset({0, 1, 2, 3})))
        out += [_note(n) for n in notes]
    out.append("</section>")
    return "\n".join(out)


def _compare_tables(comp) -> str:
    """mlpipe.compare's Comparison as HTML (its known columns; anything else generically)."""
    models, tests = getattr(comp, "models", None), getattr(comp, "tests", None)
    out = []
    if getattr(comp, "refit_ml", False):
        out.append('<p class="warn">REML fits were refitted by ML for the comparison (their '
                   'fixed effects differ, or an ML fit is among them), as lme4\'s anova '
                   'does.</p>')
    known_m = ["name", "formula", "method", "npar", "loglik", "deviance", "aic", "bic"]
    out.append("<h3>Models</h3>")
    if isinstance(models, pl.DataFrame) and set(known_m) <= set(models.columns):
        rows = list(models.iter_rows(named=True))
        block = _fmt_block([r[k] for r in rows for k in known_m[4:]])  # one set of decimals
        out.append(_table(["model", "formula", "method", "npar", "logLik", "deviance", "AIC",
                           "BIC"],
                          [[r["name"], r["formula"], r["method"], _fmt(r["npar"])]
                           + block[4 * i:4 * i + 4] for i, r in enumerate(rows)], cls="num"))
    else:
        out.append(_frame_table(models))
    out.append("<h3>Likelihood-ratio tests</h3>")
    known_t = ["model_a", "model_b", "chisq", "df", "p_value"]
    if isinstance(tests, pl.DataFrame) and set(known_t) <= set(tests.columns):
        mix = "p_value_mixture" in tests.columns and \
            tests["p_value_mixture"].null_count() < tests.height
        header = ["model", "vs.", "Chisq", "Df", "Pr(>Chisq)"] + (["Pr(mix)"] if mix else [])
        rows, skipped = [], []
        for t in tests.iter_rows(named=True):
            nested = t.get("nested", True) is not False
            if not nested:
                skipped.append(_not_nested_note(t["model_a"], t["model_b"]) + ".")
            row = [_e(t["model_b"]), _e(t["model_a"]),
                   _e(_fmt(t["chisq"] if nested else None)), _e(_fmt(t["df"])),
                   _fmt_p(t["p_value"] if nested else None)]
            if mix:
                row.append(_fmt_p(t.get("p_value_mixture") if nested else None))
            rows.append(row)
        out.append(_table(header, rows, cls="num", raw_cols=frozenset(range(len(header)))))
        out += [f'<p class="warn">{_e(n)}</p>' for n in skipped]
        if mix:
            out.append(_note("Pr(mix): boundary test of an added variance, against the 50:50 "
                             "mixture of χ²(df−1) and χ²(df) (Self & Liang 1987)."))
    else:
        out.append(_frame_table(tests))
    out.append(_note("Computed by mlpipe.compare (lme4's anova rules: models ordered by "
                     "their number of parameters, each tested against the one before; only "
                     "nested pairs are tested)."))
    return "\n".join(out)


def variance_change_section(runs: list[ModelRun]) -> str:
    out = ['<section id="variance-explained"><h2>Proportional reduction in variance</h2>',
           "<p>Between consecutive models, for each variance component present in both: "
           "(V<sub>previous</sub> − V<sub>this</sub>) / V<sub>previous</sub>. Negative "
           "values mean the component grew.</p>"]
    variance = _optional("variance")
    if variance is None or not hasattr(variance, "variance_explained"):
        out.append(_note("mlpipe.variance is not available; the report computes the "
                         "reductions itself."))
        variance = None
    for a, b in zip(runs, runs[1:]):
        out.append(f"<h3>{_e(a.name)} → {_e(b.name)}</h3>")
        ve = None
        # variance_explained names no factor: with several, the report's own numbers follow
        if variance is not None and len(a.factors) <= 1 and len(b.factors) <= 1:
            try:
                ve = variance.variance_explained(a.path, b.path)
            except Exception as exc:  # noqa: BLE001 - fall back to our own numbers
                out.append(_note(f"mlpipe.variance.variance_explained: {_first_line(exc)}; "
                                 f"the report's own numbers follow."))
        known = ["term", "base_variance", "model_variance", "proportion_reduction"]
        if isinstance(ve, pl.DataFrame) and set(known) <= set(ve.columns):
            rows = []
            for r in ve.iter_rows(named=True):
                comp = r["term"] if r["term"] == "Residual" or r.get("level") == 1 \
                    else f"{b.group}: {r['term']}"
                rows.append([comp, *_fmt_block([r["base_variance"], r["model_variance"]], 4),
                             _fmt_share(r["proportion_reduction"])])
        elif ve is not None:
            out.append(_frame_table(ve))
            rows = None
        else:
            rows = [[r[0], *_fmt_block([r[1], r[2]], 4), _fmt_share(r[3])]
                    for r in variance_reduction(a, b)]
        if rows:
            out.append(_table(["component", f"variance ({a.name})", f"variance ({b.name})",
                               "proportional reduction"], rows, cls="num"))
        elif rows is not None:
            out.append(_note("The two models share no variance component."))
        if a.result.get("nobs") != b.result.get("nobs"):
            out.append(_note("The models were fitted to different rows; the reduction is not "
                             "interpretable."))
        if a.result.get("method") != b.result.get("method"):
            out.append(_note("One REML and one ML fit: compare fits by the same method."))
        if any(t != "(Intercept)" for t in b.random_terms) and "(Intercept)" in b.random_terms:
            out.append(_note(f"{b.name} has random slopes: its intercept variance is the "
                             f"variance at the slope variable's zero, so its change is not a "
                             f"proportion of variance explained."))
    out.append("</section>")
    return "\n".join(out)


# ---------------------------------------------------------------------- one model

def _anchor(i: int) -> str:
    return f"model-{i + 1}"


def model_section(i: int, run: ModelRun, *, data: bool, sample_rows: int,
                  max_groups: int) -> str:
    r = run.result
    out = [f'<section class="model" id="{_anchor(i)}">',
           f"<h2>{i + 1}. {_e(run.name)}</h2>",
           f'<p class="formula"><code>{_e(r["formula"])}</code></p>']
    facts = [("method", r.get("method")), ("observations", f"{r.get('nobs') or 0:,}"),
             ("groups", ", ".join(f"{g}: {n:,}" for g, n in (r.get("groups") or {}).items())),
             ("result directory", str(run.path)), ("data", run.config.get("data", "—"))]
    if r.get("rows_dropped"):
        facts.append(("rows dropped (missing values)", r["rows_dropped"]))
    out.append('<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(_fmt(v))}</dd>"
                                             for k, v in facts) + "</dl>")
    flags = []
    if r.get("converged") is False:
        opt = r.get("optimizer") or {}
        flags.append("The optimizer did not converge"
                     + (f": {opt.get('return_code')}" if opt.get("return_code") else "") + ".")
    if r.get("singular"):
        flags.append("Boundary (singular) fit: a variance component is estimated as zero.")
    out += [f'<p class="warn">{_e(f)}</p>' for f in flags]
    out += [_note(n) for n in run.notes]

    # --- fixed effects
    out.append("<h3>Fixed effects</h3>")
    fe = r.get("fixed_effects", [])
    has_df = any(f.get("df") is not None for f in fe)
    header = ["term", "estimate", "std. error", "t value"] + (["df", "Pr(>|t|)"] if has_df
                                                               else [])
    rows = []
    for f in fe:
        row = [_e(f["term"]), _e(_fmt(f.get("estimate"))), _e(_fmt(f.get("std_error"))),
               _e(_fmt(f.get("t_value"), 4))]
        if has_df:
            row += [_e(_fmt(f.get("df"))), _fmt_p(f.get("p_value"))]
        rows.append(row)
    out.append(_table(header, rows, cls="num", raw_cols=frozenset(range(len(header)))))
    if has_df and r.get("df_method"):
        out.append(_note(f"degrees of freedom: {r['df_method']}"))

    # --- variance components
    out.append("<h3>Variance components</h3>")
    corr = {(c.get("group"), c["term1"], c["term2"]): c.get("correlation")
            for c in r.get("random_correlations", [])}
    rows = []
    before: dict[Any, list[str]] = {}  # the earlier terms of each factor
    for re_ in r.get("random_effects", []):
        g = re_.get("group")
        earlier = before.setdefault(g, [])
        cors = [_fmt(corr[(g, t, re_["term"])], 3) for t in earlier
                if (g, t, re_["term"]) in corr]
        earlier.append(re_["term"])
        rows.append([g, re_["term"], _fmt(re_["variance"]), _fmt(re_["std_dev"]),
                     " ".join(cors)])
    if not r.get("family"):  # a GLMM's response has no residual variance
        rows.append(["Residual", "", _fmt(r.get("residual_variance")), _fmt(r.get("sigma")),
                     ""])
    out.append(_table(["group", "term", "variance", "std. dev.", "corr."], rows, cls="num"))

    # --- fit criteria
    out.append("<h3>Fit criteria</h3>")
    crit = [("logLik", r.get("loglik")), ("deviance", r.get("deviance"))]
    if r.get("reml_criterion") is not None:
        crit.append(("REML criterion", r.get("reml_criterion")))
    crit += [("AIC", r.get("aic")), ("BIC", r.get("bic")), ("parameters", run.npar)]
    out.append(_table([c[0] for c in crit], [[_fmt(c[1], 6) for c in crit]], cls="num"))
    if r.get("method") == "REML":
        out.append(_note("REML fit: logLik, AIC and BIC are REML quantities; compare models "
                         "that differ in their fixed effects with ML fits (--ml)."))

    if r.get("family"):  # a GLMM: the sections below are those of a linear mixed model
        out.append(_note(f"Generalized linear mixed model ({r['family']}, {r.get('link')} "
                         f"link, Laplace approximation): z tests; the caterpillar plot is on "
                         f"the link scale; the variance decomposition, residual and "
                         f"group-line sections are not drawn for GLMMs."))
        out += caterpillar_html(run)
        out.append("<h3>Calibration</h3>")
        out.append(calibration_html(run, data=data))
        out.append("</section>")
        return "\n".join(out)

    # --- variance decomposition
    out.append("<h3>Variance decomposition</h3>")
    comps = _components(run)
    icc, icc_notes = icc_info(run, data=data)
    partition = r.get("variance_partition") if len(run.factors) > 1 else None
    if run.intercept_only:
        total = sum(comps.values())
        out.append(_table(["component", "variance", "share of total"],
                          [[c, _fmt(v), _fmt(v / total if total else None, 3)]
                           for c, v in comps.items()], cls="num"))
    elif partition:
        out.append(_table(["component", "variance", "share of total"],
                          [[p_.get("group"), _fmt(p_.get("variance")),
                            _fmt(p_.get("proportion"), 3)] for p_ in partition], cls="num"))
    if partition:
        out.append(_note("Random intercepts on several grouping factors: each factor's share "
                         "of the total variance (given the fixed effects). Two observations "
                         "that share a level of a factor, and of every factor it is nested "
                         "in, correlate by the sum of those shares."))
    elif icc is not None and icc.get("icc") is not None:
        ci = ""
        if icc.get("lower") is not None and icc.get("upper") is not None:
            level = f"{100 * float(icc.get('level') or 0.95):g}%"
            ci = (f" ({level} CI {_e(_fmt(icc['lower'], 3))} – {_e(_fmt(icc['upper'], 3))}"
                  + (f", {_e(icc['method'])}" if icc.get("method") else "") + ")")
        out.append(f'<p class="icc">Intraclass correlation (ICC) = '
                   f"<b>{_e(_fmt(icc['icc'], 3))}</b>{ci}: the share of the outcome's "
                   f"variance (given the fixed effects) that lies between levels of "
                   f"{_e(run.group)}, and the correlation of two observations in the same "
                   f"{_e(run.group)}.</p>")
        if icc.get("source") not in (None, "computed"):
            out.append(_note(f"ICC from {icc['source']}."))
    else:
        out.append(_note("The ICC is shown for random-intercept-only models; with random "
                         "slopes the between-group variance depends on the slope variable."))
    out += [_note(n) for n in icc_notes]

    # --- caterpillar plot
    out.append("<h3>Conditional modes (caterpillar plot)</h3>")
    if run.ranef is None or run.ranef.height == 0:
        out.append(_note("Skipped: no conditional modes (ranef.parquet)."))
    else:
        out += caterpillar_html(run)

    # --- residuals
    out.append("<h3>Residuals</h3>")
    out.append(residual_html(run, data=data, sample_rows=sample_rows))

    # --- group-specific lines (of the first factor with a random slope)
    factor, slopes = line_factor(run)
    if slopes:
        out.append("<h3>Group-specific regression lines</h3>")
        if len(run.factors) > 1:
            out.append(_note(f"Lines for the levels of {factor}, the first grouping factor "
                             f"with a random slope; the conditional modes of the other "
                             f"factors ({', '.join(f for f in run.factors if f != factor)}) "
                             f"are left out."))
        for term in slopes:
            out.append(lines_html(run, term, data=data, max_groups=max_groups))

    # --- growth curves (a residual correlation, or a slope on the innermost factor)
    growth = growth_model(run)
    if growth is not None:
        out.append("<h3>Growth curves</h3>")
        out.append(growth_html(run, growth, data=data))
    out.append("</section>")
    return "\n".join(out)


CALIBRATION_BINS = 10


def calibration(run: ModelRun, bins: int = CALIBRATION_BINS) -> pl.DataFrame:
    """A GLMM's observed against fitted means in `bins` bins of the fitted μ (one DuckDB
    pass over the training rows; only the bins come back): bin, fitted, observed, n."""
    from ._sql import render
    from .formula import parse_formula
    from .predict import inverse_link_sql

    r = run.result
    formula = parse_formula(r["formula"])
    model = _compile(run)
    try:
        mu = inverse_link_sql(r.get("link") or "logit", "fitted")
        trials = "1.0"
        if formula.response.kind == "call" and formula.response.value == "cbind":
            trials = f"(__mlpipe_y + {formula.response.args[1].sql()})"
        inner = model.pred.sql(f"{mu} AS mu, __mlpipe_y AS y, CAST({trials} AS DOUBLE) AS t",
                               model.source, where=model.complete)
        return model.polars(render("report_calibration", inner=inner, bins=int(bins)))
    finally:
        model.close()


def calibration_plot(cal: pl.DataFrame, what: str) -> str:
    """Observed against fitted means per bin, the 45° line, points sized by their weight."""
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    x, y = cal["fitted"].to_numpy(), cal["observed"].to_numpy()
    n = cal["n"].to_numpy().astype(float)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--", label="observed = fitted")
    ax.scatter(x, y, s=20 + 180 * n / n.max(), color="tab:blue", alpha=0.8, zorder=3,
               label=f"bins of the fitted {what}")
    ax.set_xlabel(f"fitted {what} (mean in the bin)")
    ax.set_ylabel(f"observed {what}")
    ax.legend(loc="upper left", fontsize=8)
    return _img(fig, "Calibration: observed against fitted")


def calibration_html(run: ModelRun, *, data: bool) -> str:
    """The calibration section of a binomial / count GLMM (none for ordinal outcomes)."""
    family = run.result.get("family")
    if family == "ordinal":
        return _note("Ordinal outcome: no single fitted mean, no calibration plot.")
    if not data:
        return _note("Skipped (calibration): data passes were turned off (--no-data).")
    what = "probability" if family == "binomial" else "mean"
    try:
        cal = calibration(run)
    except (_NoData, MlpipeError) as exc:
        return _note(f"Skipped (calibration): {exc}")
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the page
        return _note(f"Skipped (calibration): the pass over the data failed "
                     f"({_first_line(exc)}).")
    return (f"<figure>{calibration_plot(cal, what)}<figcaption>Observed against fitted "
            f"{_e(what)} in {cal.height} bins of equal size by the fitted value (conditional "
            f"on the random effects; {_fmt(float(cal['n'].sum()))} "
            f"{'trials' if family == 'binomial' else 'rows'}).</figcaption></figure>")


def caterpillar_html(run: ModelRun) -> list[str]:
    """One caterpillar plot per grouping factor (most levels first)."""
    out: list[str] = []
    factors = run.factors or [None]
    for factor in factors:
        ranef = run.factor_ranef(factor)
        name = factor or "group"
        if len(factors) > 1:
            out.append(f"<h4>{_e(name)}</h4>")
        if ranef.height == 0:
            out.append(_note(f"Skipped: no conditional modes of {name} in ranef.parquet."))
            continue
        terms = run.factor_terms(factor) or ranef["term"].unique(maintain_order=True).to_list()
        try:
            img, notes = caterpillar_plot(ranef, terms, name)
            out.append(f"<figure>{img}<figcaption>Conditional modes of the random effects of "
                       f"{_e(name)} with ±1.96 conditional SD, one panel per term, levels "
                       f"sorted by their estimate.</figcaption></figure>")
            out += [_note(n) for n in notes]
        except Exception as exc:  # noqa: BLE001 - one failed plot must not lose the report
            out.append(_note(f"Skipped: the caterpillar plot of {name} failed "
                             f"({_first_line(exc)})."))
    return out


def residual_html(run: ModelRun, *, data: bool, sample_rows: int) -> str:
    """Scaled-residual quantiles and per-group residual SDs (mlpipe.predict's exact pass over
    all rows, when available) and the normal Q-Q plot (the report's bounded sample)."""
    if not data:
        return _note("Skipped: data passes were turned off (--no-data).")
    out: list[str] = []
    summary = None
    predict = _optional("predict")
    if predict is None or not hasattr(predict, "residual_summary"):
        out.append(_note("mlpipe.predict is not available: the residual quantiles are those of "
                         "the sample, and the per-group residual variances are not shown."))
    else:
        try:
            from .engines import EngineOptions

            summary = predict.residual_summary(
                str(run.path), resolve_data(run),
                options=EngineOptions.from_config(run.config))
        except Exception as exc:  # noqa: BLE001 - the sample below still gives the Q-Q plot
            out.append(_note(f"mlpipe.predict.residual_summary: {_first_line(exc)}"))
    resid, qq = None, ""
    try:
        resid, nrows = residual_sample(run, sample_rows)
        resid = resid[np.isfinite(resid)]
        if len(resid) < 3:
            raise _NoData("too few residuals")
        origin = (f"a reservoir sample of {len(resid):,} of the {nrows:,} rows"
                  if len(resid) < nrows else f"all {len(resid):,} rows")
        qq = (f"<figure>{qq_plot(resid, 'Normal Q-Q plot of the scaled residuals')}"
              f"<figcaption>Normal Q-Q plot of the scaled conditional residuals "
              f"(y − Xβ̂ − Zb̂) / σ̂ from {_e(origin)}.</figcaption></figure>")
    except (_NoData, MlpipeError) as exc:
        qq = _note(f"Skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the page
        qq = _note(f"Skipped: the residual pass failed ({_first_line(exc)}).")
    names = ["Min", "1Q", "Median", "3Q", "Max"]
    quantiles = getattr(summary, "quantiles", None)
    if isinstance(quantiles, dict) and quantiles:
        n = getattr(summary, "n", None)
        exact = getattr(summary, "exact", True)
        caption = (f"Scaled residuals ({'all' if exact else 'approximate quartiles, all'} "
                   f"{int(n):,} rows)" if n else "Scaled residuals")
        out.insert(0, _table(list(quantiles), [[_fmt(v, 4) for v in quantiles.values()]],
                             caption=caption))
    elif resid is not None:
        qs = np.quantile(resid, [0.0, 0.25, 0.5, 0.75, 1.0])
        out.insert(0, _table(names, [[_fmt(v, 4) for v in qs]],
                             caption=f"Scaled residuals (the sample of {len(resid):,} rows)"))
    out.append(qq)
    by_group = getattr(summary, "by_group", None)
    if isinstance(by_group, pl.DataFrame) and by_group.height:
        factors = (by_group["group"].cast(pl.Utf8).unique(maintain_order=True).to_list()
                   if "group" in by_group.columns else [run.group or "group"])
        for factor in factors:  # one plot per grouping factor
            part = (by_group.filter(pl.col("group").cast(pl.Utf8) == factor)
                    if "group" in by_group.columns else by_group)
            try:
                out.append(_group_variance_html(part, float(summary.sigma), factor))
            except Exception as exc:  # noqa: BLE001 - an optional figure
                out.append(_note(f"Skipped the per-group residual SD plot of {factor} "
                                 f"({_first_line(exc)})."))
    return "\n".join(out)


def _group_variance_html(by_group: pl.DataFrame, sigma: float, group: str) -> str:
    d = by_group.filter(pl.col("residual_variance").is_not_null() & (pl.col("n") > 1))
    if d.height == 0:
        return _note("No group has two or more rows: no per-group residual variance.")
    n = d["n"].cast(pl.Float64).to_numpy()
    ratio = np.sqrt(np.clip(d["residual_variance"].cast(pl.Float64).to_numpy(), 0, None)) / sigma
    q = np.quantile(ratio, [0.0, 0.5, 1.0])
    if n.min() == n.max():  # one group size: a plot against it would be a single column
        return _note(f"Residual SD within each {group} relative to σ̂ (every {group} has "
                     f"{int(n[0]):,} rows, so no plot against group size): min "
                     f"{_fmt(q[0], 3)}, median {_fmt(q[1], 3)}, max {_fmt(q[2], 3)} over "
                     f"{d.height:,} groups.")
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.axhline(1.0, color="#c0392b", lw=1, label="σ̂ (the model's residual SD)")
    ax.plot(n, ratio, "o", ms=3 if len(n) < 2000 else 1.2, color="#1f3f73", alpha=0.6,
            mec="none")
    if n.max() > 20 * n.min():
        ax.set_xscale("log")
    ax.set_xlabel(f"rows in the {group}")
    ax.set_ylabel("residual SD / σ̂")
    ax.set_title(f"Residual SD by {group}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(color="0.93")
    return (f"<figure>{_img(fig, f'residual standard deviation by {group}')}<figcaption>Standard "
            f"deviation of the conditional residuals within each {_e(group)} ({d.height:,} "
            f"groups with two or more rows), relative to σ̂, against the group's size "
            f"(mlpipe.predict.residual_summary): min {_e(_fmt(q[0], 3))}, median "
            f"{_e(_fmt(q[1], 3))}, max {_e(_fmt(q[2], 3))}. The model assumes one residual "
            f"variance for all groups.</figcaption></figure>")


def lines_html(run: ModelRun, term: str, *, data: bool, max_groups: int) -> str:
    if not data:
        return _note("Skipped: data passes were turned off (--no-data).")
    try:
        lines, pop, m, xcol = group_lines(run, term, max_groups)
    except (_NoData, MlpipeError) as exc:
        return _note(f"Skipped ({term}): {exc}")
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the page
        return _note(f"Skipped ({term}): the pass over the data failed ({_first_line(exc)}).")
    if lines.height == 0:
        return _note(f"Skipped ({term}): no lines to draw.")
    shown = lines["level"].n_unique()
    from .formula import parse_formula

    formula = parse_formula(run.result["formula"])
    factor = line_factor(run)[0]
    title = (f"{formula.response.deparse()} on {term}: {shown} of {m} levels of {factor}"
             if shown < m else f"{formula.response.deparse()} on {term}: all {m} levels of "
             f"{factor}")
    img = lines_plot(lines, pop, xcol, formula.response.deparse(), title)
    grouping = {c for rt in formula.random for c in rt.group_columns}
    variables = {c for t in list(formula.fixed) + [t for rt in formula.random for t in rt.terms]
                 for v in t for c in v.expr.columns()}
    others = [c for c in formula.columns()
              if c not in [xcol, *formula.factor_columns(factor)]
              and c not in formula.response.columns() and (c in variables or c not in grouping)]
    held = (f" Other predictors ({', '.join(others)}) are held at each group's mean "
            f"(categorical ones at the group's most frequent level); the dashed line at "
            f"their overall means." if others else "")
    which = (f"{shown} of {m} levels of {factor}, spread evenly over the ranked "
             f"conditional modes of the slope"
             if shown < m else f"all {m} levels of {factor}")
    return (f"<figure>{img}<figcaption>Group-specific lines of {_e(term)} ({_e(which)}): "
            f"fixed effects plus conditional modes, over each group's observed range of "
            f"{_e(xcol)}; colour is the group's slope.{_e(held)}</figcaption></figure>")


def growth_html(run: ModelRun, growth: GrowthModel, *, data: bool) -> str:
    """The growth pictures of a growth model: the spaghetti plot and the average trajectory
    (`growth_curves`), each with a one-line caption naming the sample and the rule."""
    rule = "rule 1, a residual correlation structure" if growth.rule == "correlation" \
        else "rule 2, a random slope on the innermost grouping factor"
    out = [f"<p>Growth model ({_e(rule)}): {_e(growth.why)}.</p>"]
    if not data:
        return "\n".join(out + [_note("Skipped: data passes were turned off (--no-data).")])
    try:
        curves = growth_curves(run)
    except (_NoData, MlpipeError) as exc:
        return "\n".join(out + [_note(f"Skipped (growth curves): {exc}")])
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the page
        return "\n".join(out + [_note(f"Skipped (growth curves): the pass over the data "
                                      f"failed ({_first_line(exc)}).")])
    from .formula import parse_formula

    y = parse_formula(run.result["formula"]).response.deparse()
    k, m, name, time = len(curves["sampled"]), curves["subjects"], growth.name, growth.time
    which = f"all {m:,}" if k == m else f"{k} of {m:,}"
    how = "" if k == m else " (those with the smallest MD5 hash of their key: the same every time)"
    rule_short = "a residual correlation" if growth.rule == "correlation" \
        else "a random slope on the innermost factor"
    try:
        img = spaghetti_plot(curves, y, f"{y} by {time}: {which} levels of {name}")
        out.append(f"<figure>{img}<figcaption>Observed (points, thin lines) and fitted "
                   f"(thick lines, X·β̂ + Z·b̂ at the subject's own rows) trajectories of "
                   f"{_e(which)} subjects ({_e(name)}){_e(how)}; growth model by "
                   f"{_e(rule_short)}.</figcaption></figure>")
        if curves["thinned"]:
            out.append(_note(f"{len(curves['thinned'])} of the drawn subjects have more than "
                             f"{GROWTH_SUBJECT_ROWS} rows: their series are thinned evenly "
                             f"along {time}."))
    except Exception as exc:  # noqa: BLE001 - an optional figure
        out.append(_note(f"Skipped the spaghetti plot ({_first_line(exc)})."))
    try:
        means = curves["means"]
        bins = (f"per {time} ({means.height} values)" if curves["binning"] == "time"
                else f"in {means.height} quantile bins of {time}")
        held = (f"; other predictors ({', '.join(curves['held'])}) at their overall means, "
                f"categorical ones at their most frequent level" if curves["held"] else "")
        img = average_plot(curves, y, f"Average trajectory of {y} by {time}")
        out.append(f"<figure>{img}<figcaption>Average trajectory X·β̂ along {_e(time)} with "
                   f"its pointwise 95% band ±1.96·√(x′Var(β̂)x) (Var(β̂) from "
                   f"{_e(curves['vcov_source'])}){_e(held)}, over the observed mean of "
                   f"{_e(y)} {_e(bins)} ({int(means['n'].sum()):,} rows); "
                   f"growth model by {_e(rule_short)}.</figcaption></figure>")
    except Exception as exc:  # noqa: BLE001 - an optional figure
        out.append(_note(f"Skipped the average trajectory ({_first_line(exc)})."))
    return "\n".join(out)


# ---------------------------------------------------------------------- the page

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:#1d2733;max-width:1100px;margin:2em auto;padding:0 1.2em;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #d5dde8;padding-bottom:.2em;
 margin-top:2.2em}h3{margin-top:1.6em;color:#2b4a73}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
caption{text-align:left;font-weight:600;padding-bottom:.3em}
th,td{padding:.28em .8em;border-bottom:1px solid #e3e8ef;text-align:left}
th{background:#f2f5f9;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{background:#f2f5f9;padding:.1em .35em;border-radius:3px}
.formula{font-size:1.05em}.note{color:#5b6777;font-size:.88em;font-style:italic}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.4em .8em}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;font-size:.92em}
dl.facts dt{color:#5b6777}dl.facts dd{margin:0}
figure{margin:1em 0}figcaption{font-size:.88em;color:#5b6777;max-width:760px}
img.plot{max-width:100%;height:auto;border:1px solid #e3e8ef}
nav ol{columns:2}.meta{color:#5b6777;font-size:.9em}
"""


def render_html(runs: list[ModelRun], *, data: bool = True, sample_rows: int = SAMPLE_ROWS,
                max_groups: int = MAX_LINE_GROUPS) -> str:
    from . import __version__

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "mlpipe report: " + ", ".join(r.name for r in runs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
             "<h1>Multilevel model report</h1>",
             f'<p class="meta">mlpipe {_e(__version__)} · {len(runs)} model'
             f'{"s" if len(runs) != 1 else ""} · generated {stamp}</p>']
    nav = ["<nav><ol>"]
    if len(runs) > 1:
        nav.append('<li><a href="#comparison">Model comparison</a></li>')
        nav.append('<li><a href="#variance-explained">Proportional reduction in variance</a>'
                   '</li>')
    nav += [f'<li><a href="#{_anchor(i)}">{_e(r.name)}: <code>{_e(r.result["formula"])}'
            f"</code></a></li>" for i, r in enumerate(runs)]
    nav.append("</ol></nav>")
    parts += nav
    if len(runs) > 1:
        parts.append(comparison_section(runs, data=data))
        parts.append(variance_change_section(runs))
    for i, run in enumerate(runs):
        parts.append(model_section(i, run, data=data, sample_rows=sample_rows,
                                   max_groups=max_groups))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def report(result_dirs: list[str | os.PathLike[str]] | str | os.PathLike[str],
           out: str | os.PathLike[str] = "report.html", *, data: bool = True,
           sample_rows: int = SAMPLE_ROWS, max_groups: int = MAX_LINE_GROUPS) -> Path:
    """Write one self-contained HTML report of the models in `result_dirs` to `out`.

    `data=False` skips the passes over the training data (residuals, regression lines).
    The file is written next to `out` and renamed into place: never half-written.
    """
    if isinstance(result_dirs, (str, os.PathLike)):
        result_dirs = [result_dirs]
    if not result_dirs:
        raise InputError("report needs at least one result directory")
    if sample_rows < 3:
        raise InputError("--sample-rows must be at least 3")
    if max_groups < 1:
        raise InputError("--max-groups must be at least 1")
    runs = [load_run(d) for d in result_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # distinct names for the comparison tables
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({i + 1})"
    dest = Path(out)
    if dest.is_dir():
        raise InputError(f"--out {out} is a directory; name the HTML file to write")
    text = render_html(runs, data=data, sample_rows=sample_rows, max_groups=max_groups)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


# ---------------------------------------------------------------------- command line

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `mlpipe report RESULT_DIR... --out FILE` on the CLI's subparsers."""
    p = subparsers.add_parser("report", help="a self-contained HTML report of fitted models",
                              description="Write one HTML file (plots embedded) for one or "
                                          "more result directories written by `mlpipe fit "
                                          "--out`; several directories are also compared.")
    p.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR",
                   help="result directories (result.json, ranef.parquet, config.toml)")
    p.add_argument("--out", "-o", default="report.html", help="HTML file to write")
    p.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS,
                   help="rows sampled for the residual Q-Q plot")
    p.add_argument("--max-groups", type=int, default=MAX_LINE_GROUPS,
                   help="groups drawn in the regression-lines plot")
    p.add_argument("--no-data", dest="data", action="store_false",
                   help="do not read the training data (no residuals, no regression lines)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    path = report(args.result_dirs, args.out, data=args.data, sample_rows=args.sample_rows,
                  max_groups=args.max_groups)
    print(f"wrote {path}")
    return 0
