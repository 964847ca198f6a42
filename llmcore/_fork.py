"""Whether this process is a child forked from one that had loaded llmcore.

GNU OpenMP's thread pool does not survive fork(): a child whose parent ran an OpenMP region (torch's or
llmcore's kernels) hangs in its first multi-thread region (datasets.map(num_proc=N), fork-started
multiprocessing). llmcore's kernels then run on one thread in such a child, as HF tokenizers turns its own
parallelism off after a fork; torch's own ops still need ``torch.set_num_threads(1)`` there.
"""
from __future__ import annotations

import os

forked = False


def _in_child() -> None:
    global forked
    forked = True


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_in_child)


def num_threads() -> int:
    """The thread count llmcore's CPU kernels take: torch's budget, or 1 in a forked child."""
    if forked:
        return 1
    import torch

    return torch.get_num_threads()
