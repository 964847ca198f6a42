"""Token-length statistics and the printed summary of a prepared dataset."""
from __future__ import annotations

from typing import Optional

import numpy as np

BATCH = 32  # the batch size the "padded per batch" waste figure assumes


def split_stats(lengths: np.ndarray, max_length: int, texts: Optional[int] = None) -> dict:
    """Token-length histogram (power-of-two buckets up to ``max_length``) and the share of padding in
    a padded batch: padded to ``max_length``, and padded to the longest row of each batch of 32.
    ``at_max_length``: rows of exactly ``max_length`` tokens -- cut there, or that long whole (the
    truncated encoding cannot tell which). ``texts``: how many texts the rows came from, when long texts
    were split into rows (nothing was cut then: those rows are full windows)."""
    n = int(len(lengths))
    lengths = np.asarray(lengths, dtype=np.int64)
    edges = []
    e = 16
    while e < max_length:
        edges.append(e)
        e *= 2
    edges.append(max_length)
    hist, lo = [], -1  # (the first bucket from 0: a text without special tokens can have none)
    for hi in edges:
        hist.append([f"{lo + 1}-{hi}", int(np.sum((lengths > lo) & (lengths <= hi)))])
        lo = hi
    total = int(lengths.sum())
    out = {"rows": n, "tokens": total, "histogram": hist}
    if texts is not None:
        out["texts"] = int(texts)
    if n:
        out.update(mean=round(float(lengths.mean()), 2), max=int(lengths.max()),
                   at_max_length=int(np.sum(lengths >= max_length)))
        padded_max = n * max_length
        pad_blocks = [int(lengths[i:i + BATCH].max()) * len(lengths[i:i + BATCH]) for i in range(0, n, BATCH)]
        out["padding_waste_max_length"] = round(1 - total / padded_max, 4)
        out[f"padding_waste_batch{BATCH}"] = round(1 - total / sum(pad_blocks), 4)
    return out


def split_line(meta: dict, split: str) -> str:
    """One split's rows: read, kept, dropped by reason, moved to validation, split into windows."""
    c = meta["counts"].get(split, {})
    s = meta["stats"][split]
    dropped = {k: v for k, v in c.get("dropped", {}).items() if v}
    line = f"[{split}] rows {c.get('rows', s['rows'])}  kept {s.get('texts', s['rows'])}"
    if dropped:
        line += "  dropped " + ", ".join(f"{k} {v}" for k, v in dropped.items())
    if c.get("split_off_to_validation"):
        line += f"  ({c['split_off_to_validation']} moved to validation)"
    if c.get("split_from"):
        line += f"  (stratified split of {c['split_from']})"
    if "texts" in s:
        line += f"  -> {s['rows']} rows ({c.get('texts_split', 0)} texts longer than max_length split)"
    return line


def format_summary(meta: dict) -> str:
    lines = [f"data {meta['data']}  text column {meta['text_column']!r}  label column {meta['label_column']!r}"
             + (f"  labels {meta['label_names']}" if meta.get("label_names") else "")]
    max_length = meta["options"]["max_length"]
    for split in meta["splits"]:
        s = meta["stats"][split]
        lines.append(split_line(meta, split))
        if not s["rows"]:
            continue
        full = s.get("at_max_length", s.get("truncated"))  # (its older name, in folders prepared before)
        if "texts" in s:
            full = "nothing cut" if "at_max_length" not in s else f"{full} windows fill max_length={max_length}"
        else:
            full = f"at max_length={max_length} {full} (cut there, or exactly that long)"
        lines.append(f"    tokens {s['tokens']}  mean {s['mean']}  max {s['max']}  {full}")
        peak = max(cnt for _, cnt in s["histogram"]) or 1
        for bucket, cnt in s["histogram"]:
            lines.append(f"    {bucket:>9} {cnt:>8} {'#' * int(round(40 * cnt / peak))}")
        lines.append(f"    padding waste: {100 * s['padding_waste_max_length']:.1f}% padded to max_length, "
                     f"{100 * s['padding_waste_batch32']:.1f}% padded to the longest of each batch of 32")
    return "\n".join(lines)
