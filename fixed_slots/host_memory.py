"""Giving the heap that a compilation freed back to the operating system.

XLA's compilation, and its loading of an executable from the persistent cache, allocate and free
hundreds of MiB on the host in many threads; glibc's malloc keeps what was freed in its arenas,
so the process's resident memory stays at the compilation's level for the rest of the run and the
train step's buffers are added on top (BENCHMARKS.md: 1004-1044 MiB after 12 steps of the
side-by-side's harness with the cache warm, 807 MiB with the trim below after loading).
`release_freed_memory()` asks glibc to return the free pages (`malloc_trim(0)`); the trainer calls
it once the train step is compiled and after each evaluation. Elsewhere (another libc, macOS,
Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_UNSET = object()
_libc: Any = _UNSET


def _glibc() -> Any:
    """glibc's handle, or None where there is no glibc malloc_trim."""
    global _libc
    if _libc is _UNSET:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.malloc_trim.restype = ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):  # musl and others have no malloc_trim
                pass
    return _libc


def release_freed_memory() -> bool:
    """Returns the heap's free pages to the OS (glibc); True if any were released.

    Touches no live allocation: only memory already freed, so it is safe at any time, from any
    thread (malloc_trim locks each arena); it costs a walk of the heap (milliseconds).
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
