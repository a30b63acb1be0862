"""Give freed memory back to the operating system between the steps of a large tensor's work."""

from __future__ import annotations

import ctypes

try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc
except (AttributeError, OSError, TypeError):
    _MALLOC_TRIM = None


def release_free_memory() -> None:
    """Return the pages of freed heap blocks to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Temporaries of a few MiB are allocated from the heap, and glibc keeps their pages once freed, so
    without this the peak resident memory of a step includes the garbage of the steps before it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
