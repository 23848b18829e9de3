"""mlpipe/_malloc.py: freed large arrays are reused inside the block (no fresh page faults)."""

import resource

import numpy as np
import pytest

from mlpipe import _malloc


def _faults_of_two_allocations(nbytes: int) -> int:
    """Minor page faults of the second of two same-sized arrays, each written then freed."""
    a = np.ones(nbytes // 8)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(nbytes // 8)
    del b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc's mallopt is not available")
def test_freed_arrays_are_reused_inside_the_block_only():
    nbytes = 200 << 20  # far above glibc's default mmap threshold (32 MB at most)
    outside = _faults_of_two_allocations(nbytes)
    with _malloc.reuse_freed_memory():
        with _malloc.reuse_freed_memory():  # nested: the outer block restores
            inside = _faults_of_two_allocations(nbytes)
        assert _malloc._depth == 1
    assert _malloc._depth == 0
    pages = nbytes // 4096
    # outside, each array is a fresh mapping faulted in again (4 KB pages, or 2 MB huge
    # pages where numpy asks for them); inside, the second array reuses the first's memory
    assert outside > nbytes // (2 << 20) // 2
    assert inside < pages // 100
    assert inside < outside / 10


def test_numpy_hugepage_advice_is_off_inside_the_block_and_restored():
    before = _malloc._set_numpy_hugepage(True)
    if before is None:
        pytest.skip("this NumPy has no huge-page switch")
    try:
        with _malloc.reuse_freed_memory():
            assert _malloc._set_numpy_hugepage(False) is False  # off inside (set it again)
        assert _malloc._set_numpy_hugepage(True) is True  # restored on exit
    finally:
        _malloc._set_numpy_hugepage(before)
