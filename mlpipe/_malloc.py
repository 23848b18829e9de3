"""Keep freed memory for reuse while the solver evaluates its objective again and again.

Each evaluation of a large objective (millions of levels) allocates and frees the same
few hundred MB of temporaries.  glibc's malloc serves arrays above its mmap threshold (at
most 32 MB by default) with fresh `mmap`s and unmaps them when freed, so every evaluation
faults all of that memory in again — page by page, zeroed by the kernel: measured at about
40% of an evaluation's wall time on 2M levels, almost all of it system time.

`reuse_freed_memory()` raises the mmap and trim thresholds for the duration of a block, so
freed arrays stay in the heap and the next evaluation reuses them (no page faults); on exit
the thresholds go back to glibc's settled defaults and `malloc_trim` returns what is free to
the system.  Peak resident memory is unchanged (the same arrays are live at the peak).  On
other C libraries it does nothing.

Within the block NumPy also stops asking for transparent huge pages for its large arrays
(its default on Linux: `madvise(MADV_HUGEPAGE)` on every array of 4 MB or more).  Where the
kernel compacts memory to find a huge page at the fault (THP "madvise" with defrag
"madvise", common, and the page cache full of the Parquet just read), a first touch cost
~3.6 ms/MB against ~0.6 ms/MB with ordinary pages (measured here), and the 2M-level nested
fit took 11.4 s against 10.0 s on average (five runs each; system time 4.7 s against 2.5 s).
`ordinary_pages()` does that alone, for the stages that allocate once and should not keep
their garbage in the heap (the objective's build, the results): building the 2M-level
nested objective took 2.33 s with huge pages (1.77 s system time, at the first build in a
process) against 1.20 s without (0.56 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # during the block: arrays up to 1 GiB come from (and return to) the heap
_NO_TRIM = 2**31 - 1  # ... and the heap's free top is never given back (the largest value:
# a lower one, 1 GiB, still trimmed — and refaulted — a 2M-level evaluation's temporaries)
_DEFAULT_MMAP, _DEFAULT_TRIM = 32 << 20, 64 << 20  # glibc's dynamic thresholds, settled

_libc = None
_depth = 0


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


@contextmanager
def reuse_freed_memory():
    """Within the block, freed large arrays are kept for reuse, on ordinary pages (see the
    module docstring); nested blocks are allowed (the outermost restores)."""
    global _depth
    lib = _glibc()
    if lib is None:
        yield
        return
    with ordinary_pages():
        if _depth == 0:
            lib.mallopt(_M_MMAP_THRESHOLD, _KEEP)
            lib.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
                lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                lib.malloc_trim(0)


_page_depth = 0
_hugepage_before: bool | None = None


@contextmanager
def ordinary_pages():
    """Within the block NumPy does not advise huge pages for its large arrays (see the
    module docstring); nested blocks are allowed (the outermost restores the setting)."""
    global _page_depth, _hugepage_before
    if _page_depth == 0:
        _hugepage_before = _set_numpy_hugepage(False)
    _page_depth += 1
    try:
        yield
    finally:
        _page_depth -= 1
        if _page_depth == 0 and _hugepage_before is not None:
            _set_numpy_hugepage(_hugepage_before)


def _set_numpy_hugepage(enabled: bool) -> bool | None:
    """NumPy's huge-page advice on (True) or off → its previous setting (None where this
    NumPy has no such switch: nothing changes)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 2
        try:
            from numpy.core import multiarray
        except ImportError:
            return None
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        return None
    return bool(setter(bool(enabled)))
