"""Import the modules a later stage needs in a background thread while the main thread waits
on something that releases the GIL — the statistics pass, whose DuckDB query runs in C++.

`fit` imports the solver's stages (scipy, polars, nlopt, numba: ~0.7 s, ~1 s with numba)
this way during the scan instead of before it.  The main thread uses the modules only after
the block, which waits for the thread first, so the two never import concurrently beyond
the scan's own few imports (none of them in an import cycle with these).  A failing import
is left to the main thread, which meets and reports it as it would have anyway.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


@contextmanager
def during(names: Sequence[str]) -> Iterator[None]:
    """Within the block, a daemon thread imports `names` in order ("module", or
    "module:function" to call the module's function after importing it, e.g. a warm-up);
    on exit (normal or not) the block waits for it."""
    todo = [n for n in names if n.partition(":")[0] not in sys.modules or ":" in n]
    if not todo:
        yield
        return

    def run() -> None:
        for name in todo:
            module, _, function = name.partition(":")
            try:
                mod = importlib.import_module(module)
                if function:
                    getattr(mod, function)()
            except Exception:  # noqa: BLE001 - the main thread's own import reports it
                return

    thread = threading.Thread(target=run, name="mlpipe-preload", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
