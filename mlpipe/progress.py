"""Progress lines on a terminal (rich): the statistics pass, Dask's files, the optimizer.

Off unless the CLI turns it on (`enable()`) and stderr is a terminal: a scheduled job's log
never gets progress noise, and nothing here touches the results.  A stage is a context:

    with progress.stage("scanning data/", total=100.0, poll=lambda: (pct, "")) as bar:
        ...             # poll() is called ~8 times a second from a thread while the block
                        # runs; bar.advance() moves the bar by hand

Without a terminal `stage()` costs nothing and `bar` is a no-op.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

_enabled = False


def enable(on: bool = True) -> None:
    """Show progress (when stderr is a terminal); MLPIPE_NO_PROGRESS=1 turns it off."""
    global _enabled
    _enabled = bool(on)


def active() -> bool:
    return (_enabled and not os.environ.get("MLPIPE_NO_PROGRESS")
            and hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class _NoBar:
    def advance(self, amount: float = 1.0) -> None:
        pass

    def info(self, text: str) -> None:
        pass


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1.0) -> None:
        self._progress.update(self._task, advance=amount)

    def info(self, text: str) -> None:
        self._progress.update(self._task, info=text)


@contextmanager
def stage(description: str, total: float | None = None, poll=None):
    """A progress line for the block (see the module docstring)."""
    if not active():
        yield _NoBar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns.append(BarColumn())
    columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    progress = Progress(*columns, console=Console(stderr=True), transient=True,
                        refresh_per_second=8)
    with progress:
        task = progress.add_task(description, total=total, info="")
        stop = threading.Event()

        def update():
            try:
                completed, info = poll()
            except Exception:  # a poll that fails (a closed connection) shows nothing
                return
            fields = {"info": info}
            if completed is not None and total is not None:
                fields["completed"] = completed
            progress.update(task, **fields)

        def watch():
            while not stop.wait(0.125):
                update()

        thread = threading.Thread(target=watch, daemon=True) if poll is not None else None
        if thread is not None:
            thread.start()
        try:
            yield _Bar(progress, task)
        finally:
            stop.set()
            if thread is not None:
                thread.join()
                update()  # the last state is drawn once before the line is cleared
                progress.refresh()
