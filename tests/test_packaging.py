"""An installed (non-editable) package carries its SQL templates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_built_package_has_its_sql_and_fits(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "out", "bench_data", "tests", "*.egg-info", "__pycache__"))
    build = tmp_path / "lib"
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                    "build_py", "--build-lib", str(build)], cwd=src, check=True,
                   capture_output=True)
    assert (build / "mlpipe" / "sql" / "group_moments.sql").is_file()
    data = str(ROOT / "tests/data/sleepstudy.parquet")
    code = ("import mlpipe, mlpipe._sql as s; "
            f"assert str(s.SQL_DIR).startswith({str(build)!r}), s.SQL_DIR; "
            f"r = mlpipe.fit({data!r}, 'Reaction ~ Days + (Days|Subject)'); "
            "print(round(r.reml_criterion, 4))")
    env = {**os.environ, "PYTHONPATH": str(build)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "1743.6283"
