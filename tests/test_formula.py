"""lme4 formula syntax → terms, with R's term algebra and naming."""

from __future__ import annotations

import pytest

from mlpipe.errors import FormulaError
from mlpipe.formula import parse_formula


def labels(f):
    return [":".join(v.label for v in t) for t in f.fixed]


def test_r_term_order_and_interaction_names():
    f = parse_formula("mAch ~ meanses*cses + sector*cses + (cses|school)")
    assert labels(f) == ["meanses", "cses", "sector", "meanses:cses", "cses:sector"]
    assert f.intercept
    (r,) = f.random
    assert r.group == "school" and r.intercept and r.correlated
    assert [v.label for t in r.terms for v in t] == ["cses"]


@pytest.mark.parametrize("text,intercept", [
    ("y ~ x + (1|g)", True), ("y ~ 0 + x + (1|g)", False), ("y ~ x - 1 + (1|g)", False),
    ("y ~ -1 + x + (1|g)", False), ("y ~ 1 + x + (1|g)", True)])
def test_intercept(text, intercept):
    assert parse_formula(text).intercept is intercept


def test_double_bar_splits_into_uncorrelated_terms():
    f = parse_formula("Reaction ~ Days + (Days || Subject)")
    assert [(r.intercept, len(r.terms)) for r in f.random] == [(True, 0), (False, 1)]


def test_zero_plus_slope_only():
    (r,) = parse_formula("y ~ x + (0 + x | g)").random
    assert not r.intercept and len(r.terms) == 1


def test_functions_and_I():
    f = parse_formula("height ~ age + I(age^2) + log(w) + sqrt(v) + exp(u) + (age|Subject)")
    assert labels(f) == ["age", "I(age^2)", "log(w)", "sqrt(v)", "exp(u)"]
    assert "power(" in f.fixed[1][0].expr.sql()
    assert f.fixed[2][0].expr.sql().startswith("ln(")


def test_nesting_slash_and_colon():
    f = parse_formula("y ~ a/b + c:d + (1|g)")
    assert labels(f) == ["a", "a:b", "c:d"]


def test_minus_removes_terms():
    assert labels(parse_formula("y ~ a*b - a:b + (1|g)")) == ["a", "b"]


def test_backticks_and_columns():
    f = parse_formula("`my y` ~ `a b` + (1 | `the g`)")
    assert f.columns() == ["my y", "a b", "the g"]


@pytest.mark.parametrize("text,piece", [
    ("y ~", "missing predictors"), ("~ x", "missing response"),
    ("y ~ x + (1|g", "end of formula"), ("y ~ 2 + (1|g)", "'2'"),
    ("y ~ x + (0|g)", "no effects"), ("y ~ x + (1|a/a)", "repeats a column")])
def test_errors_name_the_piece(text, piece):
    with pytest.raises(FormulaError, match=None) as e:
        parse_formula(text)
    assert piece in str(e.value)


@pytest.mark.parametrize("expr,label", [
    ("I(temp/5)", "I(temp/5)"), ("log(age/365)", "log(age/365)"),
    ("I(2*temp + 1)", "I(2 * temp + 1)"), ("I(temp/10/2)", "I(temp/10/2)"),
    ("exp(-temp/100)", "exp(-temp/100)"), ("I(temp-(200))", "I(temp - (200))"),
    ("I(x*2.50)", "I(x * 2.5)"), ("I(x*1e-2)", "I(x * 0.01)"), ("I(x*100000)", "I(x * 1e+05)"),
    ("I(x*0.0001)", "I(x * 1e-04)")])
def test_labels_deparse_like_r(expr, label):
    """Term names are R's deparse(): `/` and `^` unspaced, the user's parentheses kept,
    numbers in R's shortest notation."""
    assert parse_formula(f"y ~ {expr} + (1|g)").fixed[0][0].label == label


@pytest.mark.parametrize("text,groups", [
    ("y ~ 1 + (1|batch/cask)", [("cask:batch", ("cask", "batch")), ("batch", ("batch",))]),
    ("y ~ 1 + (1|a/b/c)", [("c:(b:a)", ("c", "b", "a")), ("b:a", ("b", "a")), ("a", ("a",))]),
    ("y ~ 1 + (1|a:b)", [("a:b", ("a", "b"))]),
    ("y ~ t + (t|school) + (t|school:child)",
     [("school", ("school",)), ("school:child", ("school", "child"))]),
    ("y ~ 1 + (1|a) + (1|b) + (1|c)", [("a", ("a",)), ("b", ("b",)), ("c", ("c",))]),
])
def test_grouping_factors_expand_as_lme4(text, groups):
    """`a/b` is lme4's expandSlash: `b:a` (named inner column first) and `a`."""
    f = parse_formula(text)
    assert [(r.group, r.group_columns) for r in f.random] == groups
    assert f.grouping_factors == [g for g, _ in groups]


def test_double_bar_at_every_level():
    f = parse_formula("y ~ x + (x || a/b)")
    assert [(r.group, r.intercept, len(r.terms)) for r in f.random] == [
        ("b:a", True, 0), ("b:a", False, 1), ("a", True, 0), ("a", False, 1)]
