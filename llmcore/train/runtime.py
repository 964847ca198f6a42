"""Process settings for training on the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_retained = None


def retain_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse: blocks up to ``mmap_threshold`` bytes come
    from the heap instead of fresh ``mmap`` s, and up to ``trim_threshold`` free bytes at the heap's
    top stay mapped.

    A training step frees and reallocates the same activations, casts and gradients (MBs each)
    every step. With glibc's defaults many of them are new mappings, and touching a new mapping
    page-faults every 4 KiB page (zero-filled by the kernel): on a 2-core machine that was a tenth
    of a MiniLM step. This is what jemalloc/tcmalloc preloads do for PyTorch on CPUs, in-process.
    Freed heap memory is reused where a request fits it (fragmentation can still send a block to
    fresh pages now and then). The cost: RSS stays near its peak instead of shrinking between steps.

    Process-wide and idempotent; ``llmcore finetune`` calls it when it trains on the CPU. Returns
    whether the settings were applied (False off glibc, e.g. macOS or musl)."""
    global _retained
    if _retained is None:
        _retained = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # mallopt returns 1 on success; musl has no mallopt (AttributeError above)
            _retained = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                             and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    return _retained
