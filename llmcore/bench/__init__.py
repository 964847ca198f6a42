"""Benchmark harnesses shared by `llmcore bench ...` and the pytest-benchmark suites."""
from __future__ import annotations

import statistics
import time


def spread(xs: list) -> dict | None:
    """{"median", "min", "max"} of ``xs``; None when it is empty."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def spread_text(d: dict | None, fmt: str = ".2f") -> str:
    """A ``spread`` as "median (min-max)"; "-" for None."""
    return "-" if d is None else f"{d['median']:{fmt}} ({d['min']:{fmt}}-{d['max']:{fmt}})"


def alternating_rounds(fns: dict, n: int, rounds: int, warmup: int = 5) -> dict:
    """Microseconds a call of each function in ``fns`` (name -> callable), one figure a round: each round times n
    calls of every function, in order on even rounds and reversed on odd ones (drift of the machine then weighs on
    both sides alike). Each function is called ``warmup`` times first."""
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    for r in range(rounds):
        for k, f in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t) / n * 1e6)
    return times
