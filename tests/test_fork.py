"""A child forked after llmcore's kernels ran: GNU OpenMP's pool does not survive fork(), and a child's first
multi-thread region hung (datasets.map(num_proc=N) running attention; found by a probe). llmcore's kernels run on
one thread in a forked child, with the same results, and so do the torch ops inside llmcore's."""
import subprocess
import sys

import pytest

_SCRIPT = """
import os, sys, torch
import llmcore
torch.set_num_threads(2)
q = torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(0))
want = llmcore.scaled_dot_product_attention(q, q, q, is_causal=True)   # the parent's OpenMP pool now exists
x = torch.randn(64, 384)
want_ln = llmcore.ops.layer_norm(x, torch.ones(384), torch.zeros(384), 1e-5)
pid = os.fork()
if pid == 0:
    import signal
    signal.alarm(90)  # a hang ends the child (SIGALRM), not the test run
    got = llmcore.scaled_dot_product_attention(q, q, q, is_causal=True)
    got_ln = llmcore.ops.layer_norm(x, torch.ones(384), torch.zeros(384), 1e-5)
    same = torch.equal(got, want) and torch.equal(got_ln[0] if isinstance(got_ln, tuple) else got_ln,
                                                  want_ln[0] if isinstance(want_ln, tuple) else want_ln)
    # the fused cross-entropy's torch.mm hung here (a probe); its torch ops run on one thread in the child too,
    # and the thread count is the child's again after
    w = torch.randn(50, 384, requires_grad=True)
    loss = llmcore.ops.linear_cross_entropy(x, w, torch.arange(64) % 50)
    loss.backward()
    same = same and bool(torch.isfinite(loss)) and w.grad is not None and torch.get_num_threads() == 2
    os._exit(0 if same else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX fork")
def test_kernels_run_in_a_forked_child(tmp_path):
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # (outside the source tree: the installed package)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_huge_thread_budget_does_not_crash_the_kernels(tmp_path):
    """torch.set_num_threads(100000): GNU OpenMP segfaulted creating that many threads in llmcore's first kernel (a
    probe); the kernels take at most llmcore._fork._MAX_THREADS, with the results of two threads."""
    script = """
import sys, torch
import llmcore
q = torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(0))
torch.set_num_threads(2)
want = llmcore.scaled_dot_product_attention(q, q, q, is_causal=True)
torch.set_num_threads(100000)
got = llmcore.scaled_dot_product_attention(q, q, q, is_causal=True)
sys.exit(0 if torch.equal(got, want) else 3)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
