"""The host's memory allocator: large freed blocks kept for reuse, not handed back to the OS.

A compiled XLA:CPU call mallocs its scratch buffer (tens of MB for a training step) and frees it when
it returns. glibc gives blocks above its mmap threshold (32 MB at most, by default) back to the OS at
once, and per-thread heaps that fall empty too, so the next call maps fresh pages and faults them in
one by one: thousands of page faults and a zeroed buffer a call, on the step's critical path.
Raising the two thresholds keeps those blocks in the heap. Only glibc has these settings; elsewhere,
or when the user tunes malloc through the environment, nothing changes.
"""

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 512 << 20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before any is returned


def user_tunes_malloc() -> bool:
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ
    )


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse; True if it did. A process-wide setting: the
    command lines call it first thing, before JAX allocates."""
    if platform.libc_ver()[0] != "glibc" or user_tunes_malloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
