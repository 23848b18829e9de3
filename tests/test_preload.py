"""`mlpipe/_preload.py`: the solver's modules imported in the background during the scan."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from pathlib import Path

from mlpipe import _preload

ROOT = Path(__file__).resolve().parent.parent


def test_during_imports_calls_and_waits(monkeypatch):
    calls = []
    mod = types.ModuleType("mlpipe_preload_probe")
    mod.hello = lambda: calls.append(threading.current_thread().name)
    monkeypatch.setitem(sys.modules, "mlpipe_preload_probe", mod)
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    with _preload.during(["json.tool", "mlpipe_preload_probe:hello", "no_such_module_x"]):
        pass
    assert "json.tool" in sys.modules  # imported, and the block waited for it
    assert calls == ["mlpipe-preload"]  # called once, in the background thread
    # a failing import is left to the main thread (nothing raised here)
    with _preload.during([]):
        pass


def test_model_imports_the_solver_lazily_and_fit_preloads_it():
    """`import mlpipe.model` does not import scipy's or polars' users (mlpipe.inference,
    .objective, .optimize, .results); a fit has them afterwards (preloaded during its scan)
    and gives the same numbers as before."""
    code = (
        "import json, sys\n"
        "import mlpipe.model as m\n"
        "before = [n for n in m.SOLVER_MODULES if n in sys.modules]\n"
        f"res = m.fit({str(ROOT / 'tests' / 'data' / 'sleepstudy.parquet')!r}, "
        "'Reaction ~ Days + (Days | Subject)')\n"
        "after = [n for n in m.SOLVER_MODULES if n in sys.modules]\n"
        "print(json.dumps({'before': before, 'after': after, 'dev': res.deviance}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == []
    assert sorted(got["after"]) == sorted(["mlpipe.objective", "mlpipe.optimize",
                                           "mlpipe.results", "mlpipe.inference"])
    assert abs(got["dev"] - 1743.628272) < 1e-5  # lme4's REML criterion for sleepstudy
