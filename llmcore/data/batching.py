"""Length-bucketed batches: rows of similar length share a batch, so padding (or, packed, the spread
of sequence lengths inside a batch) stays small while the order stays random."""
from __future__ import annotations

from typing import List

import numpy as np


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int = 0, bucket_batches: int = 50,
                     shuffle: bool = True, drop_last: bool = False) -> List[np.ndarray]:
    """Row indices split into batches of ``batch_size``: rows are shuffled, cut into buckets of
    ``bucket_batches * batch_size`` rows, each bucket sorted by length and cut into batches, and the
    batches shuffled. ``lengths``: (n,) tokens per row. Returns a list of int64 index arrays.
    Without ``shuffle`` the batches simply follow the rows sorted by length (evaluation)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = np.asarray(lengths)
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        span = batch_size * max(1, bucket_batches)
        batches = []
        for start in range(0, n, span):
            bucket = perm[start:start + span]
            bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
            batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
        rng.shuffle(batches)
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return [np.asarray(b, dtype=np.int64) for b in batches]
