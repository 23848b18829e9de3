"""Bounded memory end to end (issue 8, part 5): a fit whose raw model columns are larger
than the --memory-limit given stays under that limit, the whole process measured (its peak
resident memory, VmHWM, read in the child itself).  DuckDB streams the Parquet scan into the
per-group sums and spills beyond the limit; the solver holds O(groups).  The same fit through
the Polars engine (streaming) stays under it too."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest

ROWS = 50_000_000
GROUPS = 50_000
LIMIT_MB = 500

CHILD = r"""
import json, sys
import mlpipe
from mlpipe.runlog import peak_memory_mb
r = mlpipe.fit(sys.argv[1], "y ~ x + (1 | g)", memory_limit=sys.argv[2], ddf=None,
               temp_directory=sys.argv[3], engine=sys.argv[4])
print(json.dumps({"peak_mb": peak_memory_mb(), "nobs": r.nobs, "groups": r.groups,
                  "slope": float(r.fixed_effects["estimate"][1])}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["duckdb", "polars"])
def test_fit_of_columns_larger_than_the_memory_limit_stays_under_it(tmp_path, engine):
    """DuckDB under its memory limit (spilling); Polars' streaming engine (it has no limit
    setting: the streaming group-by holds O(groups))."""
    data = tmp_path / "big"
    data.mkdir()
    con = duckdb.connect()
    # 50M rows x (g, x, y): 1.2 GB of raw 8-byte columns, in 4 Parquet files
    for part in range(4):
        n = ROWS // 4
        con.execute(f"""
            COPY (SELECT (i % {GROUPS}) AS g,
                         sin(i * 0.37 + {part}) AS x,
                         1.0 + 0.5 * sin(i * 0.37 + {part}) + cos((i % {GROUPS}) * 1.3)
                             + sin(i * 1.7 + {part}) AS y
                  FROM range({part * n}, {(part + 1) * n}) AS t(i))
            TO '{data}/part{part}.parquet' (FORMAT parquet)""")
    con.close()
    raw_mb = ROWS * 3 * 8 / 1e6
    assert raw_mb > LIMIT_MB
    out = subprocess.run([sys.executable, "-c", CHILD, str(data / "*.parquet"),
                          f"{LIMIT_MB}MB", str(tmp_path / "spill"), engine],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["nobs"] == ROWS and res["groups"] == {"g": GROUPS}
    assert res["slope"] == pytest.approx(0.5, abs=0.01)
    assert res["peak_mb"] < LIMIT_MB, res
