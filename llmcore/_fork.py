"""Whether this process is a child forked from one that had loaded llmcore.

GNU OpenMP's thread pool does not survive fork(): a child whose parent ran an OpenMP region (torch's or
llmcore's kernels) hangs in its first multi-thread region (datasets.map(num_proc=N), fork-started
multiprocessing). llmcore's kernels then run on one thread in such a child, as HF tokenizers turns its own
parallelism off after a fork, and so do the torch ops inside llmcore's (``torch_one_thread``: the fused
cross-entropy's matmuls hung there); torch's own ops, called by the user, still need ``torch.set_num_threads(1)``.
"""
from __future__ import annotations

import contextlib
import os

forked = False


def _in_child() -> None:
    global forked
    forked = True


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_in_child)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity set where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# The most threads llmcore's kernels start: GNU OpenMP segfaults when it cannot create the threads a region asks for
# (after torch.set_num_threads(100000) llmcore's first kernel crashed the process, as torch's own first parallel op
# does), and past a few threads a CPU more of them only add switching.
_MAX_THREADS = max(8, 4 * usable_cpus())


def num_threads() -> int:
    """The thread count llmcore's CPU kernels take: torch's budget (at most ``_MAX_THREADS``), or 1 in a forked
    child."""
    if forked:
        return 1
    import torch

    return min(torch.get_num_threads(), _MAX_THREADS)


@contextlib.contextmanager
def torch_one_thread():
    """torch's ops run on one thread inside, in a forked child (see the module docstring); elsewhere a no-op. The
    thread count is set back after, so the caller's setting stands."""
    if not forked:
        yield
        return
    import torch

    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
