"""`make fit CONFIG=... RUNS=...` (the Makefile-driven pattern): statistics, result and
report are real file targets, rebuilt only when the config or the data they come from
change.  Runs the repository's Makefile with its virtual environment (skipped without it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or not (ROOT / ".venv" / ".installed").is_file(),
    reason="needs make and the repository's .venv (make test builds it)")


def _make(config: Path, runs: Path) -> str:
    out = subprocess.run(["make", "-C", str(ROOT), "fit", f"CONFIG={config}", f"RUNS={runs}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _age(path: Path, seconds: float) -> None:
    """Set a file's modification time `seconds` in the past."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _age_run(run: Path, config: Path, data: Path) -> None:
    """Everything made long ago, its inputs before that."""
    for p in (data, config):
        _age(p, 300)
    for target in ("stats.parquet", "fit/result.json", "report.html"):
        _age(run / target, 200)


def test_targets_rebuild_only_when_their_inputs_change(tmp_path):
    data = tmp_path / "sleep.parquet"
    shutil.copy(DATA / "sleepstudy.parquet", data)
    config = tmp_path / "sleep_rs.toml"
    config.write_text(f'data = "{data}"\nformula = "Reaction ~ Days + (Days | Subject)"\n')
    runs = tmp_path / "runs"
    first = _make(config, runs)
    run = runs / "sleep_rs"
    for target in ("stats.parquet", "fit/result.json", "report.html"):
        assert (run / target).is_file(), first
    assert "mlpipe stats" in first and "mlpipe fit" in first and "mlpipe report" in first
    assert "Nothing to be done" in _make(config, runs)
    _age_run(run, config, data)
    _age(data, 100)  # data newer than the statistics: everything again
    again = _make(config, runs)
    assert "mlpipe stats" in again and "mlpipe fit" in again and "mlpipe report" in again
    _age_run(run, config, data)
    _age(run / "fit" / "result.json", 100)  # a result newer than the report: the report
    only = _make(config, runs)
    assert "mlpipe report" in only and "mlpipe stats" not in only and "mlpipe fit" not in only
