"""This process's resident memory from /proc/self (Linux): the peak-memory reports and the benchmarks' probes."""
from __future__ import annotations


def status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark, ...); None where there is no
    /proc (not Linux) or no such field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_high_water_mark() -> bool:
    """Set VmHWM to the current VmRSS (``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
