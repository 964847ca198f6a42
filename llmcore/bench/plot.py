"""Grouped bar charts for ``llmcore bench ... --plot FILE``: llmcore against its reference, the
ratio written above each group.

matplotlib is optional and imported only when a chart is drawn. The charts are drawn on an Agg
canvas of their own (no ``pyplot``), so drawing one changes no global backend or figure state.

>>> bar_chart("out.png", "MiniLM fine-tuning, 1 epoch", ["fp32", "bf16"],
...           {"transformers Trainer": [61.0, 35.2], "llmcore": [190.4, 160.9]}, "train samples/s",
...           ["3.12x", "4.57x"])  # doctest: +SKIP
'out.png'
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

# The first series is the baseline (grey); llmcore usually comes second (blue).
PALETTE = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


@dataclass
class Panel:
    """One chart: for each group (x position) one bar per series; ``series`` maps a name to one value
    per group (None or NaN: no bar). ``ratio_labels`` (one per group, "" for none) is written above
    the group's tallest bar. ``log`` draws the value axis on a log scale."""

    groups: list
    series: dict
    unit: str
    ratio_labels: list | None = None
    title: str = ""
    log: bool = False

    def check(self) -> None:
        n = len(self.groups)
        if n == 0:
            raise ValueError("groups is empty: nothing to draw")
        if not self.series:
            raise ValueError("series is empty: nothing to draw")
        for name, values in self.series.items():
            if len(values) != n:
                raise ValueError(f"series {name!r} has {len(values)} values, expected one per group ({n})")
        if self.ratio_labels is not None and len(self.ratio_labels) != n:
            raise ValueError(f"ratio_labels has {len(self.ratio_labels)} entries, expected one per group ({n})")


def bar_chart(path: str, title: str, groups: Sequence[str], series: dict, unit: str,
              ratio_labels: Sequence[str] | None = None, log: bool = False) -> str:
    """Write a grouped bar chart to ``path`` (format from the extension: .png, .svg, .pdf) and
    return ``path``. ``series``: {name: [value per group]}, drawn left to right in that order, the
    first in grey as the baseline. Raises ImportError when matplotlib is missing."""
    panel = Panel(list(groups), {k: list(v) for k, v in series.items()}, unit,
                  None if ratio_labels is None else list(ratio_labels), log=log)
    return bar_panels(path, title, [panel])


def bar_panels(path: str, title: str, panels: Sequence[Panel]) -> str:
    """Several grouped bar charts stacked in one figure (one per panel); see ``bar_chart``."""
    if not panels:
        raise ValueError("panels is empty: nothing to draw")
    for p in panels:
        p.check()
    Figure, FigureCanvasAgg = _matplotlib()
    widest = max(len(p.groups) * (0.32 * len(p.series) + 0.35) for p in panels)
    longest = max(len(line) for p in panels for g in p.groups for line in str(g).split("\n"))
    rotate = longest * max(len(p.groups) for p in panels) > 90
    fig = Figure(figsize=(max(6.0, 1.5 + widest), (4.2 if rotate else 3.6) * len(panels) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, panels):
        _draw(ax, p, rotate)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # (the legends outside the axes included)
    return path


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from e
    return Figure, FigureCanvasAgg


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _draw(ax, p: Panel, rotate: bool) -> None:
    n, k = len(p.groups), len(p.series)
    span = min(0.8, 0.3 * k)  # a group's bars together; narrow when there are few series
    width = span / k
    tops = [0.0] * n
    few = n * k <= 16  # value labels on the bars only while they stay legible
    for j, (name, values) in enumerate(p.series.items()):
        xs = [i - span / 2 + width * (j + 0.5) for i in range(n)]
        heights = [v if _finite(v) else float("nan") for v in values]
        bars = ax.bar(xs, heights, width * 0.95, label=name, color=PALETTE[j % len(PALETTE)])
        for i, v in enumerate(heights):
            if math.isfinite(v):
                tops[i] = max(tops[i], v)
        if few:
            ax.bar_label(bars, labels=[_short(v) if math.isfinite(v) else "" for v in heights], fontsize=7,
                         padding=1)
    if p.log:
        ax.set_yscale("log")
    top = max(tops) if any(tops) else 1.0
    if p.ratio_labels:
        for i, label in enumerate(p.ratio_labels):
            if label and tops[i] > 0:
                y = tops[i] * (1.35 if p.log else 1.0) + (0 if p.log else 0.07 * top)
                ax.text(i, y, label, ha="center", va="bottom", fontsize=9, fontweight="bold")
    if p.log:
        lows = [v for vals in p.series.values() for v in vals if _finite(v)]
        ax.set_ylim(min(lows) / 1.5 if lows else 0.1, top * 3.0)
    else:
        ax.set_ylim(0, top * 1.22)
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(g) for g in p.groups], rotation=30 if rotate else 0, ha="right" if rotate else "center",
                       fontsize=8)
    ax.set_ylabel(p.unit)
    if p.title:
        ax.set_title(p.title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # (right of the axes: inside, it covered the first group's ratio label)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _short(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"
