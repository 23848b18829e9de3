"""The few distribution functions mlpipe needs, from scipy.special.

`scipy.stats` costs ~0.6 s to import (every distribution is built at import time); these are
the same special functions scipy.stats' `t`, `chi2` and `norm` call, so the numbers are
identical to `scipy.stats.t.sf` etc.
"""

from __future__ import annotations

from ._lazy import lazy_import

np = lazy_import("numpy")
_sc = lazy_import("scipy.special")


def t_sf(x, df):
    """Upper tail of Student's t: scipy.stats.t.sf(x, df)."""
    return _sc.stdtr(df, -x)


def chi2_sf(x, df):
    """Upper tail of χ²_df: scipy.stats.chi2.sf(x, df) (1 below 0, nan for df ≤ 0)."""
    x, df = np.asarray(x, float), np.asarray(df, float)
    out = np.where(df > 0, _sc.chdtrc(np.where(df > 0, df, 1.0), np.maximum(x, 0.0)), np.nan)
    return out[()] if out.ndim == 0 else out


def chi2_ppf(p, df):
    """Quantile of χ²_df: scipy.stats.chi2.ppf(p, df)."""
    return 2 * _sc.gammaincinv(df / 2, p)


def norm_ppf(p):
    """Standard normal quantile: scipy.stats.norm.ppf(p)."""
    return _sc.ndtri(p)


def f_sf(x, df1, df2):
    """Upper tail of F(df1, df2): scipy.stats.f.sf(x, df1, df2)."""
    return _sc.fdtrc(df1, df2, x)
