"""This process's figures from /proc/self (Linux): resident memory for the peak-memory reports and probes."""
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
