"""Progress lines (mlpipe/progress.py, rich): on a terminal only, never in the results."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"


def run(argv: list[str], tty: bool, cwd: Path, **extra_env) -> tuple[int, str]:
    """Run `mlpipe ARGV` with stderr on a pseudo-terminal (tty) or a pipe; its stderr."""
    cmd = [sys.executable, "-m", "mlpipe", *argv]
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    env.pop("MLPIPE_NO_PROGRESS", None)
    env.update(extra_env)
    if not tty:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
        return p.returncode, p.stderr
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    buf = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    p.wait()
    return p.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.decode(errors="replace"))


def test_progress_on_a_terminal_only_and_never_in_the_results(tmp_path):
    """On a terminal: the statistics pass and the optimizer (evaluations, the criterion);
    through a pipe (a scheduler's log): nothing.  result.json is byte-identical."""
    data = DATA / "multilevel" / "egsingle.parquet"
    argv = ["fit", str(data), "-f", "math ~ year + (year | schoolid/childid)", "-q",
            "--ddf", "none"]
    rc, err = run(argv + ["--out", str(tmp_path / "tty")], tty=True, cwd=tmp_path)
    assert rc == 0, err
    assert "statistics pass over" in err and "egsingle.parquet" in err
    assert re.search(r"optimizing .*\d+ evaluations, REML criterion \d+\.\d{6}", err), err
    rc, err = run(argv + ["--out", str(tmp_path / "pipe")], tty=False, cwd=tmp_path)
    assert rc == 0 and err == ""
    assert (tmp_path / "tty" / "result.json").read_bytes() == \
        (tmp_path / "pipe" / "result.json").read_bytes()


def test_progress_of_the_other_engines_and_the_switch_off(tmp_path):
    """Polars shows its pass, Dask the files done; MLPIPE_NO_PROGRESS=1 turns it off."""
    import polars as pl

    parts = tmp_path / "parts"
    parts.mkdir()
    df = pl.read_parquet(DATA / "hsb82.parquet")
    for k in range(3):
        df[k * 2395:(k + 1) * 2395].write_parquet(parts / f"p{k}.parquet")
    argv = ["fit", str(parts), "-f", "mAch ~ ses + (1 | school)", "-q"]
    rc, err = run(argv + ["--engine", "polars"], tty=True, cwd=tmp_path)
    assert rc == 0 and "(Polars)" in err, err
    rc, err = run(argv + ["--engine", "dask", "--workers", "2"], tty=True, cwd=tmp_path)
    assert rc == 0 and "3 tasks on Dask (3 files)" in err, err
    rc, err = run(argv, tty=True, cwd=tmp_path, MLPIPE_NO_PROGRESS="1")
    assert rc == 0 and err.strip() == "", err
