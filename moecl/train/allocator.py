"""Keep freed heap memory in the process, so that each training step reuses pages instead of faulting in new ones.

glibc's malloc hands the top of its heap back to the OS once enough of it is free (M_TRIM_THRESHOLD), and
serves blocks above a moving size threshold with fresh mmaps. A training step frees most of what it allocated, so
the next step touches new pages again, and every first touch of a page is a page fault. On a 2-core VM that cost
moecl's step about a second of kernel time (up to 160,000 faults a step; seq_lora, with less memory in flight,
none); the floats computed are the same either way. glibc offers no other way to set this from inside a running
process, hence `mallopt` through ctypes.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the ceiling glibc itself lets its dynamic mmap threshold reach (64-bit)
TRIM_THRESHOLD = 2**31 - 1  # the largest int: only a heap top of 2 GiB free goes back to the OS


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (musl has mallopt too, but ignores these parameters)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (process-wide, for the process's life).

    Blocks up to 32 MiB come from the heap, and the heap's free top is kept up to 2 GiB. Setting either value
    stops glibc's own threshold adjustment, which is why both are set. Returns False, changing nothing, where the
    C library is not glibc (macOS, musl, Windows).
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Hand every free page of glibc's heaps back to the OS now (`malloc_trim(0)`), e.g. before measuring a peak
    of resident memory. Returns False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    malloc_trim = libc.malloc_trim
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True
