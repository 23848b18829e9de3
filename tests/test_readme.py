"""The Python the README shows runs: every `mlpipe.…` name it mentions resolves after a bare
`import mlpipe`, every ```python block executes (statements with `...` placeholders are only
resolved), and the calls its prose shows inline run with real arguments."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlpipe

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
QUICK = "mAch ~ meanses*cses + sector*cses + (cses | school)"


def _dotted_names() -> list[str]:
    """`mlpipe.a.b` names in the README (not file paths such as mlpipe/stats.py)."""
    names = re.findall(r"(?<![\w/.])mlpipe((?:\.[A-Za-z_]\w*)+)(?![\w/])", README)
    names = [n for n in names if not re.search(r"\.(py|toml|json|parquet|sql|md)$", n)]
    return sorted({"mlpipe" + n for n in names})


def _python_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    out = []
    for block in blocks:
        lines = block.splitlines()
        if any(line.startswith(">>> ") for line in lines):  # doctest style: the input lines
            lines = [line[4:] for line in lines if line.startswith((">>> ", "... "))]
        out.append("\n".join(lines))
    return out


def test_the_readme_shows_python():
    assert len(_dotted_names()) >= 5 and len(_python_blocks()) >= 2


def test_every_mlpipe_name_resolves_after_import_mlpipe():
    """In a fresh interpreter: `import mlpipe` alone, then the names (so a submodule that
    only an earlier import made an attribute does not count)."""
    names = _dotted_names()
    code = ("import json, sys, mlpipe\n"
            "bad = []\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    obj = mlpipe\n"
            "    try:\n"
            "        for part in name.split('.')[1:]:\n"
            "            obj = getattr(obj, part)\n"
            "    except AttributeError as exc:\n"
            "        bad.append(f'{name}: {exc}')\n"
            "print(json.dumps(bad))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


def _has_ellipsis(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(node))


def _resolve_callees(node: ast.AST, ns: dict) -> None:
    """The functions a placeholder statement calls exist (`mlpipe.fit(..., ddf=...)`)."""
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, (ast.Name, ast.Attribute)):
            assert callable(eval(compile(ast.Expression(func), "<README>", "eval"), ns))


@pytest.fixture()
def readme_dir(tmp_path, monkeypatch):
    """A working directory with the README's relative paths: data/, S.parquet."""
    (tmp_path / "data").symlink_to(ROOT / "data")
    mlpipe.compute_statistics(ROOT / "data" / "hsb82.parquet", QUICK).save(tmp_path / "S.parquet")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_blocks_run(readme_dir):
    ns: dict = {}
    for k, block in enumerate(_python_blocks()):
        for stmt in ast.parse(block).body:
            if _has_ellipsis(stmt):
                _resolve_callees(stmt, ns)
                continue
            code = compile(ast.Module([stmt], []), f"<README python block {k + 1}>", "exec")
            exec(code, ns)  # noqa: S102 - the README's own examples
    assert "res" in ns


def test_inline_calls_run(readme_dir):
    """The calls the README's prose shows in `code` spans."""
    data = "data/hsb82.parquet"
    a = mlpipe.fit(data, "mAch ~ cses + (1 | school)", ddf=None)
    b = mlpipe.fit(data, "mAch ~ cses + (cses | school)", ddf=None)
    # "Python: mlpipe.compare([fit_a, fit_b]).summary(), .models, .tests, .write(dir)"
    cmp = mlpipe.compare([a, b])
    assert cmp.summary() and cmp.models.height == 2 and cmp.tests.height >= 1
    cmp.write(readme_dir / "comparison")
    # "mlpipe.fit(..., ddf="kenward-roger", ci="profile")"
    kr = mlpipe.fit(data, "mAch ~ cses + (1 | school)", ddf="kenward-roger", ci="profile")
    assert kr.df_method == "Kenward-Roger" and kr.confidence_intervals is not None
    # "mlpipe.predict.predict(result, data, out=None, level="conditional")"
    pred = mlpipe.predict.predict(a, data, out=None, level="conditional")
    assert pred.height == a.nobs
    # "mlpipe.predict.residual_summary(result)"
    assert mlpipe.predict.residual_summary(a).n == a.nobs
    # "stats.save(path)", "a.merge(b)", Statistics.load
    st = mlpipe.compute_statistics(data, "mAch ~ cses + (1 | school)")
    st.save(readme_dir / "st.parquet")
    again = mlpipe.Statistics.load(readme_dir / "st.parquet")
    assert again.merge(st).n == 2 * st.n
    # "mlpipe.variance_explained(base, model)"
    assert mlpipe.variance_explained(a, b).height >= 1
    # data in memory
    import polars as pl
    assert mlpipe.fit(pl.read_parquet(data), "mAch ~ cses + (1 | school)",
                      ddf=None).deviance == pytest.approx(a.deviance, rel=1e-10)
    assert os.path.isdir(readme_dir / "comparison")
