"""Resident memory of this process, from /proc/self (Linux): the benchmarks' peak-memory probes."""
from __future__ import annotations


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status: VmRSS (resident now), VmHWM (its high-water mark), ..."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_high_water_mark() -> bool:
    """Set VmHWM to the current VmRSS (``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
