"""host_memory.release_freed_memory gives freed heap back to the OS (glibc), and is harmless."""
import sys

import numpy as np
import pytest

from fixed_slots import host_memory


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(host_memory._glibc() is None, reason="no glibc malloc_trim here")
def test_freed_heap_goes_back_to_the_os():
    # 8 KiB blocks: below glibc's mmap threshold, so they come from (and go back to) the heap.
    blocks = [np.ones(1024) for _ in range(40_000)]  # ~330 MiB
    blocks = blocks[-1:]  # every block but the last freed: the heap's top stays in use
    before = resident_mib()
    assert host_memory.release_freed_memory()
    assert resident_mib() < before - 100
    assert blocks[0].sum() == 1024  # what is still alive is untouched


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", None)
    assert host_memory.release_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc lookup is Linux-only")
def test_the_libc_handle_is_looked_up_once():
    first = host_memory._glibc()
    assert host_memory._glibc() is first
