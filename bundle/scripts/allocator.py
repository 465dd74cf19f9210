"""Keep freed memory in the process while a subject is encoded (glibc only; elsewhere a no-op).

A ViT's batch temporaries are tens of MB each. glibc serves blocks that large with ``mmap`` and hands them back to
the OS when they are freed, so every batch faults the same memory in again: millions of page faults per volume.
While encoding, large blocks come from the heap and freed memory stays there for the next batch; afterwards the
defaults are restored and the free memory is handed back (``malloc_trim``), so the process does not keep its peak.
Measured on 2 CPU cores, DINOv2 ViT-S/14 at 224 px: 15.3 -> 18.5 slices/s in fp32; the numbers computed are the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator

__all__ = ["keep_freed_memory"]

# mallopt parameters and glibc's defaults (malloc/malloc.c)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER = -1  # as an unsigned threshold: never trim

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Within this block, freed memory is kept for reuse; on leaving the outermost block it is returned to the OS."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(M_MMAP_MAX, 0)
            _LIBC.mallopt(M_TRIM_THRESHOLD, NEVER)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)
