"""Stage 1: lme4 model formulas.

`parse_formula("y ~ x * g + (1 + x | school)")` returns a `Formula`: the response, the fixed
terms (each a tuple of variables, R's term algebra applied: `a*b`, `a:b`, `a/b`, `-`, `0 +`),
and the random-effect terms.  Variables carry a small expression tree that compiles to SQL
(`Expr.sql`), so the design matrix is only ever built inside DuckDB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ._sql import quote_ident
from .errors import FormulaError

# ------------------------------------------------------------------ expressions (I(), log(), ...)

#: functions allowed on numeric columns: formula name -> DuckDB function
NUMERIC_FUNCTIONS = {"log": "ln", "exp": "exp", "sqrt": "sqrt", "abs": "abs", "log10": "log10",
                     "log2": "log2", "sin": "sin", "cos": "cos", "tan": "tan"}
#: two-argument numeric functions: R's elementwise pmin / pmax -> DuckDB's least / greatest
BINARY_FUNCTIONS = {"pmin": "least", "pmax": "greatest"}
#: pw(t, knot): a piecewise-linear time in two columns, min(t, knot) and max(t - knot, 0)
#: (the slopes before and after the knot), named "pw(t, knot)1" and "pw(t, knot)2"
SPLIT_FUNCTIONS = ("pw",)
#: predictor-construction functions computed from group or grand means in the statistics pass
AGGREGATE_FUNCTIONS = ("center", "group_mean")
#: a column as a factor: factor(x), relevel(x, "b") / relevel(x, 2), C(x, ref = "b")
CATEGORICAL_FUNCTIONS = ("factor", "relevel", "C")
#: functions whose constants come from a pre-pass over the rows used (stored with the fit):
#: scale(x) (mean, SD) and poly(x, k) (R's alpha, norm2); the key is the call's deparse
PREPASS_FUNCTIONS = ("scale", "poly")


@dataclass(frozen=True)
class Expr:
    """A numeric expression: a column, a number, an operator or a function call."""

    kind: str  # "col" | "num" | "str" | "pi" | "kw" | "op" | "neg" | "paren" | "call"
    value: str = ""  # column name, number text, operator or function name
    args: tuple[Expr, ...] = ()
    by: str | None = None  # grouping column of center()/group_mean()

    def columns(self) -> list[str]:
        if self.kind == "col":
            return [self.value]
        if self.kind in ("num", "str", "pi"):
            return []
        out: list[str] = []
        for a in self.args:
            out += [c for c in a.columns() if c not in out]
        if self.by is not None and self.by not in out:
            out.append(self.by)
        return out

    def aggregates(self) -> list[Expr]:
        """The center()/group_mean() calls inside this expression."""
        own = [self] if self.kind == "call" and self.value in AGGREGATE_FUNCTIONS else []
        return own + [g for a in self.args for g in a.aggregates()]

    def prepass(self) -> list[Expr]:
        """The scale()/poly() calls inside this expression."""
        own = [self] if self.kind == "call" and self.value in PREPASS_FUNCTIONS else []
        return own + [g for a in self.args for g in a.prepass()]

    @property
    def categorical(self) -> bool:
        """factor(x), relevel(x, ref), C(x, ref = r): a column taken as a factor."""
        return self.kind == "call" and self.value in CATEGORICAL_FUNCTIONS

    @property
    def factor_column(self) -> str:
        """The data column under factor() / relevel() / C() (possibly nested)."""
        e = self
        while e.kind == "call" and e.value in CATEGORICAL_FUNCTIONS:
            e = e.args[0]
        return e.value

    @property
    def reference(self) -> Expr | None:
        """The reference level of relevel() / C() (a "str" or "num" Expr), else None."""
        if self.kind == "call" and self.value in ("relevel", "C") and len(self.args) > 1:
            ref = self.args[1]
            return ref.args[0] if ref.kind == "kw" else ref
        return None

    def deparse(self) -> str:
        """R's deparse() of the expression (the term label: `I(age^2)`, `log(age/365)`):
        spaces around `+ - *`, none around `/` and `^`, the user's parentheses kept."""
        if self.kind == "col":
            return self.value if _SIMPLE_NAME.fullmatch(self.value) else f"`{self.value}`"
        if self.kind in ("num", "pi"):
            return self.value
        if self.kind == "str":
            return '"' + self.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if self.kind == "kw":
            return f"{self.value} = {self.args[0].deparse()}"
        if self.kind == "neg":
            return "-" + self.args[0].deparse()
        if self.kind == "paren":
            return f"({self.args[0].deparse()})"
        if self.kind == "op":
            a, b = (x.deparse() for x in self.args)
            return f"{a}{self.value}{b}" if self.value in "/^" else f"{a} {self.value} {b}"
        inner = ", ".join(a.deparse() for a in self.args)
        if self.by is not None:
            inner += f", by = {Expr('col', self.by).deparse()}"
        return f"{self.value}({inner})"

    def sql(self, aggregate_names: dict[Expr, str] | None = None) -> str:
        """DuckDB SQL for this expression; aggregate calls (and scale() / poly() columns)
        refer to pre-computed columns or SQL given in `aggregate_names`."""
        if aggregate_names and self in aggregate_names and self.kind == "call":
            return aggregate_names[self]
        if self.kind == "col":
            return f"CAST({quote_ident(self.value)} AS DOUBLE)"
        if self.kind == "pi":
            return f"CAST({math.pi!r} AS DOUBLE)"
        if self.kind in ("str", "kw"):
            raise FormulaError(f"{self.deparse()} is not a number")
        if self.kind == "num":
            value = float(self.value)
            if not math.isfinite(value):
                raise FormulaError(f"number {self.value} in the formula is not finite")
            return f"CAST({value!r} AS DOUBLE)"
        if self.kind == "neg":
            return f"(-{self.args[0].sql(aggregate_names)})"
        if self.kind == "paren":
            return f"({self.args[0].sql(aggregate_names)})"
        if self.kind == "op":
            a, b = (x.sql(aggregate_names) for x in self.args)
            if self.value == "^":
                return f"power({a}, {b})"
            return f"({a} {self.value} {b})"
        if self.value in AGGREGATE_FUNCTIONS:
            if not aggregate_names or self not in aggregate_names:
                raise FormulaError(f"{self.deparse()} needs the statistics pass to compute it")
            return aggregate_names[self]
        if self.value == "I":
            return self.args[0].sql(aggregate_names)
        if self.value in CATEGORICAL_FUNCTIONS:
            raise FormulaError(f"{self.deparse()} is a factor: it can be a term (or part of "
                               f"an interaction), not part of arithmetic")
        if self.value in PREPASS_FUNCTIONS:
            raise FormulaError(f"{self.deparse()} needs its pre-pass constants to compute it")
        if self.value in SPLIT_FUNCTIONS:
            raise FormulaError(f"{self.deparse()} is two columns: it can be a term, not part "
                               f"of arithmetic")
        if self.value == "cbind":
            raise FormulaError(f"{self.deparse()}: a cbind(successes, failures) response needs "
                               f"a binomial family (--family binomial)")
        if self.value in BINARY_FUNCTIONS:
            a, b = (x.sql(aggregate_names) for x in self.args)
            return f"{BINARY_FUNCTIONS[self.value]}({a}, {b})"
        return f"{NUMERIC_FUNCTIONS[self.value]}({self.args[0].sql(aggregate_names)})"


_SIMPLE_NAME = re.compile(r"[A-Za-z.][A-Za-z0-9._]*")


@dataclass(frozen=True)
class Variable:
    """One variable of a term: a plain column (numeric or categorical) or an expression."""

    expr: Expr

    @property
    def label(self) -> str:
        return self.expr.deparse()

    @property
    def column(self) -> str | None:
        """The column name when the variable is a bare column (may then be categorical)."""
        return self.expr.value if self.expr.kind == "col" else None

    @property
    def factor_call(self) -> bool:
        """True for factor(x) / relevel(x, r) / C(x, ref = r): categorical whatever x's type;
        its levels are stored under `label` (a bare categorical column's under its name)."""
        return self.expr.categorical


Term = tuple[Variable, ...]  # an interaction of variables; () is the intercept


@dataclass(frozen=True)
class RandomTerm:
    """`(expr | group)`: random effects for the terms of `expr`, one set per level of `group`."""

    terms: tuple[Term, ...]  # without the intercept
    intercept: bool
    group: str  # lme4's name of the grouping factor: a column, or `b:a` for an interaction
    correlated: bool = True  # False for `||`
    text: str = ""
    group_columns: tuple[str, ...] = ()  # the columns whose combination is the factor

    def __post_init__(self):
        if not self.group_columns:
            object.__setattr__(self, "group_columns", (self.group,))

    def variables(self) -> list[Variable]:
        return _unique(v for t in self.terms for v in t)


@dataclass(frozen=True)
class Formula:
    text: str
    response: Expr
    fixed: tuple[Term, ...]  # without the intercept, R's order (by degree, then appearance)
    intercept: bool
    random: tuple[RandomTerm, ...] = field(default=())
    offsets: tuple[Expr, ...] = field(default=())  # offset(x): known coefficient 1

    def _exprs(self) -> list[Expr]:
        exprs = [self.response] + [v.expr for t in self.fixed for v in t]
        exprs += [v.expr for r in self.random for v in r.variables()]
        return exprs + list(self.offsets)

    def prepass(self) -> list[Expr]:
        """The scale() / poly() calls of the model (their constants come from a pre-pass)."""
        return _unique(a for e in self._exprs() for a in e.prepass())

    def columns(self) -> list[str]:
        """Every data column the model uses (response, predictors, grouping factors)."""
        exprs = [self.response] + list(self.offsets) + [v.expr for t in self.fixed for v in t]
        exprs += [v.expr for r in self.random for v in r.variables()]
        cols = _unique(c for e in exprs for c in e.columns())
        return _unique(cols + [c for r in self.random for c in r.group_columns])

    def value_columns(self) -> list[str]:
        """The columns whose values enter the model (outcome, predictors, arguments of
        functions): every column but the grouping factors and the `by =` of center() /
        group_mean()."""
        exprs = self._exprs()
        groups = {c for r in self.random for c in r.group_columns}
        groups |= {a.by for e in exprs for a in e.aggregates() if a.by is not None}
        return [c for c in self.columns() if c not in groups
                or any(c in _value_columns(e) for e in exprs)]

    def aggregates(self) -> list[Expr]:
        exprs = self._exprs()
        return _unique(a for e in exprs for a in e.aggregates())

    @property
    def grouping_factors(self) -> list[str]:
        """lme4's names of the grouping factors, in order of first appearance."""
        return _unique(r.group for r in self.random)

    def factor_columns(self, group: str) -> tuple[str, ...]:
        return next(r.group_columns for r in self.random if r.group == group)


def _value_columns(e: Expr) -> list[str]:
    """The columns of `e` whose values it uses (not a `by =` grouping column)."""
    if e.kind == "col":
        return [e.value]
    return [c for a in e.args for c in _value_columns(a)]


def _unparen(e: Expr) -> Expr:
    """`e` without redundant parentheses (and `I()`), for comparing expressions."""
    while e.kind == "paren" or (e.kind == "call" and e.value == "I"):
        e = e.args[0]
    if e.args:
        return Expr(e.kind, e.value, tuple(_unparen(a) for a in e.args), e.by)
    return e


def _unique(items):
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


# ------------------------------------------------------------------ tokenizer

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z.][A-Za-z0-9._]*|`(?:[^`\\]|\\.)+`)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>\|\||%[^%\s]*%|[~+\-*/^:()|,=])
""", re.VERBOSE)


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int
    quoted: bool = False  # a backticked name: always a column (`pi` is the column pi)


def _tokenize(text: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise FormulaError(f"unexpected character {text[pos]!r} at position {pos + 1} "
                               f"in formula {text!r}")
        if m.lastgroup != "ws":
            value = m.group()
            quoted = m.lastgroup == "name" and value.startswith("`")
            if quoted:
                value = value[1:-1].replace("\\`", "`")
            if m.lastgroup == "str":
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            if m.lastgroup == "op" and value.startswith("%") and value != "%in%":
                raise FormulaError(f"operator {value} at position {pos + 1} is not supported "
                                   f"in formula {text!r} (of the %...% operators only %in%)")
            toks.append(_Tok(m.lastgroup, value, pos, quoted))
        pos = m.end()
    toks.append(_Tok("end", "", len(text)))
    return toks


# ------------------------------------------------------------------ parser

class _Parser:
    """Recursive descent over lme4's formula grammar.

    Formula-level nodes are lists of terms (tuples of Variables) plus intercept flags; the
    algebra (`+`, `-`, `:`, `*`, `/`) is applied while parsing.
    """

    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.random: list[RandomTerm] = []
        self.offsets: list[Expr] = []
        #: fixed-part variables in order of appearance: R orders an interaction's variables so
        self.var_order: list[Variable] = []

    # -- helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self, text: str | None = None, kind: str | None = None) -> _Tok:
        t = self.tok
        if (text is not None and t.text != text) or (kind is not None and t.kind != kind) \
                or t.kind == "end" and text is not None:
            want = repr(text) if text else kind
            got = repr(t.text) if t.kind != "end" else "end of formula"
            raise FormulaError(f"expected {want} but found {got} at position {t.pos + 1} "
                               f"in formula {self.text!r}")
        self.i += 1
        return t

    def fail(self, what: str) -> FormulaError:
        return FormulaError(f"{what} in formula {self.text!r}")

    # -- top level
    def parse(self) -> Formula:
        if "~" not in self.text:
            raise self.fail("missing '~' (expected 'response ~ predictors')")
        if self.tok.text == "~":
            raise self.fail("missing response before '~'")
        if self.tok.text == "cbind" and self.toks[self.i + 1].text == "(":
            # lme4's binomial response cbind(successes, failures)
            self.take()
            self.take("(")
            successes = self.arith()
            self.take(",")
            failures = self.arith()
            self.take(")")
            response = Expr("call", "cbind", (successes, failures))
        else:
            response = self.arith()
        self.take("~")
        if self.tok.kind == "end":
            raise self.fail("missing predictors after '~'")
        node = self.sum_()
        if self.tok.kind != "end":
            raise FormulaError(f"unexpected {self.tok.text!r} at position {self.tok.pos + 1} "
                               f"in formula {self.text!r}")
        terms, intercept = node
        order = _unique(self.var_order + [v for t in terms for v in t])
        fixed = [tuple(sorted(t, key=order.index)) for t in terms if t]
        fixed = sorted(_unique(fixed), key=len)  # stable: by degree, then appearance
        self.check_response(response, fixed)
        return Formula(self.text, response, tuple(fixed), intercept is not False,
                       tuple(self.random), tuple(_unique(self.offsets)))

    def check_response(self, response: Expr, fixed: list[Term]) -> None:
        """The response may not be a predictor (a fixed or random term or part of one):
        lme4 would fit y on itself, a perfect fit with no residual variance."""
        target = _unparen(response)
        where = [("the fixed term", t) for t in fixed]
        where += [(f"a random term of ({r.text or r.group})", t)
                  for r in self.random for t in r.terms]
        for kind, term in where:
            if any(_unparen(v.expr) == target for v in term):
                label = ":".join(v.label for v in term)
                raise FormulaError(f"the response {response.deparse()!r} appears among the "
                                   f"predictors (as {kind}: {label!r}) in formula "
                                   f"{self.text!r}; remove it from the right-hand side")

    # formula node = (list of terms, intercept: True / False / None when unspecified)
    def sum_(self):
        terms, icpt = self.prod()
        while self.tok.text in ("+", "-"):
            op = self.take().text
            t2, i2 = self.prod()
            if op == "+":
                terms = _unique(terms + t2)
                if i2 is not None:
                    icpt = i2
            else:
                terms = [t for t in terms if t not in t2]
                if i2 is True:
                    icpt = False
                elif i2 is False:  # "- 0" means keep the intercept
                    icpt = True
        return terms, icpt

    def prod(self):
        terms, icpt = self.special()
        while self.tok.text in ("*", "/"):
            op = self.take().text
            t2, i2 = self.special()
            if op == "*":
                cross = [_join(a, b) for a in terms for b in t2]
                terms = _unique(terms + t2 + cross)
            else:  # a/b == a + a:b, the interaction taken with all of a's variables
                allvars = _unique(v for t in terms for v in t)
                terms = _unique(terms + [_join(tuple(allvars), b) for b in t2])
        return terms, icpt

    def special(self):
        """`a %in% b` (R: between `*` and `:`): every term of a joined with all of b's
        variables, so `b %in% a` == `b:a` and `(a + b) %in% c` == `a:c + b:c`."""
        terms, icpt = self.inter()
        while self.tok.text == "%in%":
            self.take("%in%")
            t2, _ = self.inter()
            allvars = tuple(_unique(v for t in t2 for v in t))
            terms = _unique(_join(a, allvars) for a in terms)
        return terms, icpt

    def inter(self):
        terms, icpt = self.power()
        while self.tok.text == ":":
            self.take(":")
            t2, _ = self.power()
            terms = _unique(_join(a, b) for a in terms for b in t2)
        return terms, icpt

    def power(self):
        """`(a + b + c)^k`: every interaction of up to k of the terms (R's `^`)."""
        terms, icpt = self.atom()
        while self.tok.text == "^":
            self.take("^")
            t = self.tok
            if t.kind != "num" or not re.fullmatch(r"\d+", t.text) or int(t.text) < 1:
                raise FormulaError(f"the power after '^' must be a whole number >= 1, not "
                                   f"{t.text or 'end of formula'!r}, at position {t.pos + 1} "
                                   f"in formula {self.text!r}")
            self.take()
            out = list(terms)
            for _ in range(int(t.text) - 1):
                out = _unique(out + [_join(a, b) for a in out for b in terms])
            terms = out
        return terms, icpt

    def atom(self):
        t = self.tok
        if t.text == "(":
            self.take("(")
            start, nvars, noffsets = self.i, len(self.var_order), len(self.offsets)
            node = self.sum_()
            if self.tok.text in ("|", "||"):
                if len(self.offsets) > noffsets:
                    raise self.fail("offset() is not allowed inside a random-effects term")
                del self.var_order[nvars:]  # a random term's variables: not the fixed part's
                bar = self.take().text
                groups = self.group_names()
                self.take(")")
                body = " ".join(x.text for x in self.toks[start:self.i - 1])
                for cols, name in groups:
                    self.add_random(node, cols, bar == "|", body, name)
                return [], None
            self.take(")")
            return node
        if t.kind == "num":
            self.take()
            if t.text in ("0", "1"):
                return [], t.text == "1"
            raise FormulaError(f"a bare number {t.text!r} is not a term (use I({t.text}) "
                               f"or 0/1 for the intercept) in formula {self.text!r}")
        if t.text == "-":  # leading "- 1"
            self.take("-")
            terms, icpt = self.atom()
            return [], (False if icpt is True else True if icpt is False else None)
        if t.kind == "name":
            if self.toks[self.i + 1].text == "(":
                if t.text == "offset" and not t.quoted:
                    return self.offset()
                return [(self.variable(self.call()),)], None
            if t.text == "pi" and not t.quoted:
                raise self.fail("pi is a constant, not a term (use it inside I(), e.g. "
                                "I(2 * pi * x); a column named pi: `pi`)")
            self.take()
            return [(self.variable(Expr("col", t.text)),)], None
        raise FormulaError(f"unexpected {t.text or 'end of formula'!r} at position {t.pos + 1} "
                           f"in formula {self.text!r}")

    def variable(self, expr: Expr) -> Variable:
        var = Variable(expr)
        self.var_order.append(var)
        return var

    def offset(self):
        """`offset(x)`: a term with known coefficient 1, subtracted from the response in the
        statistics and added back in prediction (lme4's offset)."""
        self.take(kind="name")
        self.take("(")
        expr = self.arith()
        self.take(")")
        if expr.aggregates():
            raise self.fail("offset() of center()/group_mean() is not supported")
        self.offsets.append(expr)
        return [], None

    def group_names(self) -> list[tuple[str, ...]]:
        """The grouping factor(s) after `|`: `g`, `a:b` (one factor, the combination), or
        `a/b/c` (nesting) = `a`, `a:b`, `a:b:c` — as lme4's `expandSlash`, each factor
        named with the inner column first (`b:a`, `c:(b:a)`).  → [(columns, name)],
        innermost first; a level is labelled by its column values joined by ':'."""
        parts = [self.group_component()]
        while self.tok.text == "/":
            self.take("/")
            parts.append(self.group_component())
        out, cols, name = [], (), ""
        for comp in parts:  # a/b: b:a, a (lme4's order: innermost factor first)
            cols = comp + cols
            label = ":".join(comp)
            # R deparses a right-nested ':' with parentheses: a/b/c names c:(b:a)
            name = label if not name else f"{label}:({name})" if ":" in name \
                else f"{label}:{name}"
            out.insert(0, (cols, name))
        return out

    def group_component(self) -> tuple[str, ...]:
        names = [self.take(kind="name").text]
        while self.tok.text == ":":
            self.take(":")
            names.append(self.take(kind="name").text)
        return tuple(names)  # R labels a level of a:b "a_level:b_level"

    def add_random(self, node, columns: tuple[str, ...], correlated: bool, body: str,
                   group: str) -> None:
        if len(set(columns)) < len(columns):
            raise self.fail(f"grouping factor {group} repeats a column")
        terms, icpt = node
        intercept = icpt is not False
        order = _unique(v for t in terms for v in t)
        terms = sorted(_unique(tuple(sorted(t, key=order.index)) for t in terms if t), key=len)
        if not terms and not intercept:
            raise self.fail(f"random term ({body}) has no effects")
        if correlated:
            self.random.append(RandomTerm(tuple(terms), intercept, group, True, body, columns))
            return
        # (a + b || g) == (1 | g) + (0 + a | g) + (0 + b | g), as in lme4
        if intercept:
            self.random.append(RandomTerm((), True, group, True, "1", columns))
        for t in terms:
            self.random.append(RandomTerm((t,), False, group, True,
                                          "0 + " + ":".join(v.label for v in t), columns))

    # -- arithmetic inside I(), log(), ...
    def call(self) -> Expr:
        name_tok = self.take(kind="name")
        name = name_tok.text
        self.take("(")
        if name_tok.quoted:
            raise self.fail(f"`{name}`(...) is not a function")
        if name in ("I",) or name in NUMERIC_FUNCTIONS:
            arg = self.arith()
            self.take(")")
            return Expr("call", name, (arg,))
        if name in CATEGORICAL_FUNCTIONS:
            return self.categorical_call(name_tok)
        if name in BINARY_FUNCTIONS or name in SPLIT_FUNCTIONS:
            a = self.arith()
            if self.tok.text != ",":
                raise self.fail(f"{name}() takes two arguments" + (
                    " (the time and the knot)" if name in SPLIT_FUNCTIONS else ""))
            self.take(",")
            b = self.arith()
            self.take(")")
            return Expr("call", name, (a, b))
        if name == "scale":
            arg = self.arith()
            if self.tok.text == ",":
                raise self.fail("scale() takes one argument (centred and scaled by the SD)")
            self.take(")")
            return Expr("call", name, (arg,))
        if name == "poly":
            arg = self.arith()
            self.take(",")
            kw = None
            if self.tok.kind == "name" and self.toks[self.i + 1].text == "=":
                kw = self.take().text
                self.take("=")
                if kw != "degree":
                    raise self.fail(f"poly() takes degree=, not {kw}= (only orthogonal "
                                    f"polynomials: no raw =)")
            deg = self.tok
            if deg.kind != "num" or not re.fullmatch(r"\d+", deg.text) or int(deg.text) < 1:
                raise self.fail("poly(x, k) needs a whole number k >= 1")
            self.take()
            if self.tok.text == ",":
                raise self.fail("poly() takes x and the degree (orthogonal polynomials only)")
            self.take(")")
            k = Expr("num", deg.text)
            return Expr("call", name, (arg, Expr("kw", kw, (k,)) if kw else k))
        if name in AGGREGATE_FUNCTIONS:
            arg = self.arith()
            by = None
            if self.tok.text == ",":
                self.take(",")
                kw = self.take(kind="name")
                if kw.text != "by":
                    raise self.fail(f"{name}() takes one keyword, by=, not {kw.text}=")
                self.take("=")
                by = self.take(kind="name").text
            self.take(")")
            if name == "group_mean" and by is None:
                raise self.fail("group_mean() needs by=GROUP")
            return Expr("call", name, (arg,), by)
        known = ["I"] + list(NUMERIC_FUNCTIONS) + list(AGGREGATE_FUNCTIONS) \
            + list(CATEGORICAL_FUNCTIONS) + list(PREPASS_FUNCTIONS) + list(BINARY_FUNCTIONS) \
            + list(SPLIT_FUNCTIONS) + ["offset"]
        raise FormulaError(f"unknown function {name}() at position {name_tok.pos + 1} in "
                           f"formula {self.text!r} (known: {', '.join(known)})")

    def categorical_call(self, name_tok: _Tok) -> Expr:
        """factor(x), relevel(x, "b") / relevel(x, ref = "b") / relevel(x, 2) (R: a level
        label, or a position), C(x, ref = "b") / C(x, ref = 2) (a level's value); x a column
        or factor(column)."""
        name = name_tok.text
        t = self.tok
        if t.kind != "name" or t.text in CATEGORICAL_FUNCTIONS and not t.quoted \
                and self.toks[self.i + 1].text != "(":
            raise self.fail(f"{name}() takes a column name (at position {t.pos + 1})")
        if self.toks[self.i + 1].text == "(" and not t.quoted:
            if t.text != "factor" or name == "factor":
                raise self.fail(f"{name}() takes a column name or factor(column) (at "
                                f"position {t.pos + 1})")
            arg = self.call()
        else:
            arg = Expr("col", self.take().text)
        if name == "factor":
            if self.tok.text == ",":
                raise self.fail("factor() takes one argument (levels are the sorted values)")
            self.take(")")
            return Expr("call", name, (arg,))
        args = [arg]
        if self.tok.text == ",":
            self.take(",")
            kw = None
            if self.tok.kind == "name" and self.toks[self.i + 1].text == "=":
                kw = self.take().text
                self.take("=")
                if kw != "ref":
                    raise self.fail(f"{name}() takes ref=, not {kw}=")
            r = self.tok
            if r.kind == "str":
                ref = Expr("str", r.text)
            elif r.kind == "num":
                ref = Expr("num", r_number(float(r.text)))
            elif r.text == "-" and self.toks[self.i + 1].kind == "num" and name == "C":
                self.take()
                r = self.tok
                ref = Expr("num", r_number(-float(r.text)))
            else:
                raise self.fail(f"the reference level of {name}() must be a quoted level or "
                                f"a number (at position {r.pos + 1})")
            self.take()
            args.append(Expr("kw", kw, (ref,)) if kw else ref)
        elif name == "relevel":
            raise self.fail('relevel() needs the reference level: relevel(x, "b")')
        if name == "C" and len(args) > 1 and args[1].kind != "kw":
            raise self.fail('C() takes the reference level as ref =, e.g. C(x, ref = "b")')
        self.take(")")
        return Expr("call", name, tuple(args))

    def arith(self) -> Expr:
        left = self.arith_term()
        while self.tok.text in ("+", "-"):
            op = self.take().text
            left = Expr("op", op, (left, self.arith_term()))
        return left

    def arith_term(self) -> Expr:
        left = self.arith_factor()
        while self.tok.text in ("*", "/"):
            op = self.take().text
            left = Expr("op", op, (left, self.arith_factor()))
        return left

    def arith_factor(self) -> Expr:
        if self.tok.text == "-":
            self.take("-")
            return Expr("neg", "", (self.arith_factor(),))
        base = self.arith_primary()
        if self.tok.text == "^":
            self.take("^")
            return Expr("op", "^", (base, self.arith_factor()))
        return base

    def arith_primary(self) -> Expr:
        t = self.tok
        if t.kind == "num":
            self.take()
            return Expr("num", r_number(float(t.text)))
        if t.text == "(":
            self.take("(")
            e = self.arith()
            self.take(")")
            return Expr("paren", "", (e,))
        if t.kind == "name":
            if self.toks[self.i + 1].text == "(" and not t.quoted:
                return self.call()
            self.take()
            if t.text == "pi" and not t.quoted:
                return Expr("pi", "pi")
            return Expr("col", t.text)
        raise FormulaError(f"unexpected {t.text or 'end of formula'!r} at position {t.pos + 1} "
                           f"in formula {self.text!r}")


def r_number(value: float) -> str:
    """A number as R deparses it: 15 significant digits, fixed or scientific notation
    whichever is shorter (fixed on a tie): 2.50 → 2.5, 1e-2 → 0.01, 100000 → 1e+05."""
    if not math.isfinite(value):
        return "Inf" if value > 0 else "-Inf" if value < 0 else "NaN"
    mant, _, exp = f"{value:.14e}".partition("e")
    mant = mant.rstrip("0").rstrip(".")
    e = int(exp)
    sci = f"{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    fixed = f"{value:.15g}"
    if "e" in fixed:
        digits = max(0, len(mant.replace("-", "").replace(".", "")) - 1 - e)
        fixed = f"{value:.{digits}f}"
    return fixed if len(fixed) <= len(sci) else sci


def _join(a: Term, b: Term) -> Term:
    return tuple(_unique(a + b))


def parse_formula(text: str) -> Formula:
    """Parse an lme4 formula such as `"mAch ~ meanses*cses + (cses | school)"`."""
    if not isinstance(text, str) or not text.strip():
        raise FormulaError("empty formula")
    return _Parser(text).parse()
