"""`--log-json FILE`: one JSON line per stage of a run, for the scheduler that runs the job.

Each line is written (and flushed) when its stage ends:

    {"stage": "scan", "seconds": 0.57, "rows": 10000000, "cells": 100000,
     "groups": {"g": 100000}, "peak_memory_mb": 383.2, "time": "2026-12-02T03:01:12+0000"}

Stages: `prepare` (schema, levels, pre-passes), `scan` (the statistics pass), `solve` (the
optimizer and the results), `inference` (df, p-values, intervals), `residuals` (with
--residuals), `write` (the output files), `done`; a failed run ends with
`{"stage": "error", "message": ...}`.  `peak_memory_mb` is the process's peak resident
memory so far (VmHWM).  Nothing here changes result.json; without --log-json, `stage()`
does nothing.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar = ContextVar("mlpipe_runlog", default=None)


def peak_memory_mb() -> float | None:
    """The process's peak resident memory (VmHWM), in MB; ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def stage(name: str, seconds: float | None = None, **fields) -> None:
    """Log the end of a stage (no-op unless a log is open)."""
    fh = _current.get()
    if fh is None:
        return
    record = {"stage": name}
    if seconds is not None:
        record["seconds"] = round(float(seconds), 6)
    record.update({k: v for k, v in fields.items() if v is not None})
    record["peak_memory_mb"] = peak_memory_mb()
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    fh.write(json.dumps(record) + "\n")
    fh.flush()


def statistics_fields(stats) -> dict:
    """rows / cells / groups of a statistics value, for a stage line."""
    return {"rows": int(stats.rows_read), "rows_used": int(stats.n), "cells": int(stats.m),
            "groups": dict(stats.groups)}


@contextmanager
def logging_to(path: str | os.PathLike[str] | None):
    """Open the log for the duration of a run (appending: one file can collect many runs);
    a failure is logged as an `error` line and re-raised."""
    if path is None:
        yield
        return
    fh = open(path, "a", encoding="utf-8")
    token = _current.set(fh)
    t0 = time.perf_counter()
    try:
        yield
        stage("done", time.perf_counter() - t0)
    except BaseException as exc:
        stage("error", time.perf_counter() - t0,
              message=str(exc).strip().splitlines()[0] if str(exc).strip()
              else type(exc).__name__)
        raise
    finally:
        _current.reset(token)
        fh.close()
