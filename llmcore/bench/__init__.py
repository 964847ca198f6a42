"""Benchmark harnesses shared by `llmcore bench ...` and the pytest-benchmark suites."""
from __future__ import annotations

import statistics


def spread(xs: list) -> dict | None:
    """{"median", "min", "max"} of ``xs``; None when it is empty."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def spread_text(d: dict | None, fmt: str = ".2f") -> str:
    """A ``spread`` as "median (min-max)"; "-" for None."""
    return "-" if d is None else f"{d['median']:{fmt}} ({d['min']:{fmt}}-{d['max']:{fmt}})"
