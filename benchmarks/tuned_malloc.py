"""glibc's allocator tuned for steady timings: the ``--tuned-malloc`` of the benchmark scripts.

A local copy of what ``spatialdrop bench --tuned-malloc`` does, so that the scripts in
``benchmarks/`` use the library only through its public API. By default glibc serves every
tensor above its mmap threshold with a fresh ``mmap`` and returns it on free, so each call of an
op on a large input pays page faults for its output; with ``mmap`` off and no trimming, freed
memory is reused, as with jemalloc or tcmalloc.
"""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def steady_malloc(enable: bool) -> bool:
    """Make glibc keep freed memory for reuse (or restore its defaults); return whether it did.

    Linux with glibc only; elsewhere nothing changes and the answer is ``False``.
    """
    if platform.system() != "Linux":
        return False
    values = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30} if enable else GLIBC_DEFAULTS
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(k, v) == 1 for k, v in values.items())
    except (OSError, AttributeError):
        return False
