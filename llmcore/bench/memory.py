"""Resident memory of this process, from /proc/self (Linux): the benchmarks' peak-memory probes."""
from __future__ import annotations

from llmcore._proc import status_kb  # noqa: F401  (the benchmarks' import of it)


def reset_high_water_mark() -> bool:
    """Set VmHWM to the current VmRSS (``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
