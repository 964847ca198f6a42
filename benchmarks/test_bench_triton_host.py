"""pytest-benchmark suite: the Python host time of the Triton backend's calls, with every kernel launch
replaced by a no-op (what a GPU call costs the CPU before Triton's own launcher runs).

    pytest benchmarks/test_bench_triton_host.py --benchmark-group-by=group

At fine-tuning shapes the GPU work is small: an attention forward + backward at (32, 12, 128, 64) causal is
2.8 GFLOP (3.5x the forward's 0.81), ~10 us on an H200 at 280 TFLOP/s, so the host time decides the call.
Each group has a floor beside llmcore's calls: a bare autograd.Function that allocates the same outputs and
gradients, the least any Python-launched kernel pays. Runs on the CPU (no GPU, no Triton compile): CPU tensors
stand in for CUDA ones, and glibc is told to keep large blocks on its heap (as CUDA's caching allocator does), else each
3 MB allocation maps and faults fresh pages and the allocations' noise drowns the launchers' time.
extra_info carries calls/s.
"""
import ctypes
import ctypes.util
import types

import pytest
import torch

import llmcore
from llmcore.ops.triton import attention, norm

SHAPE = (32, 12, 128, 64)  # (B, H, L, D): an SST-2 / MiniLM-sized batch's attention
ROWS = (32 * 128, 384)  # the same batch's LayerNorm rows


def _keep_large_blocks_on_the_heap():
    libc = ctypes.util.find_library("c")
    if libc is not None:
        mallopt = ctypes.CDLL(libc).mallopt
        mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


class _NoOp:
    """A kernel whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_op_kernels(monkeypatch):
    _keep_large_blocks_on_the_heap()
    fake = types.SimpleNamespace(INTERPRET=False)
    for name in ("attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq", "norm_fwd", "norm_bwd",
                 "norm_bwd_dx", "norm_bwd_dw"):
        setattr(fake, name, _NoOp())
    monkeypatch.setattr(attention, "kernels", lambda name, device: fake)
    monkeypatch.setattr(attention, "_capability", lambda device: 90)
    monkeypatch.setattr(norm, "kernels", lambda name, device: fake)
    monkeypatch.setattr(norm, "multiprocessors", lambda device: 132)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend="triton" take CPU tensors; the kernels stay no-ops
    for name in ("LLMCORE_TRITON_DQ", "LLMCORE_TRITON_LOADS", "LLMCORE_TRITON_AUTOTUNE", "LLMCORE_TRITON_WS"):
        monkeypatch.delenv(name, raising=False)


class _Floor(torch.autograd.Function):
    """Allocates what a kernel pair would write (outputs, per-row statistics, gradients), launches nothing."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.save_for_backward(x, *others)
        return torch.empty_like(x), torch.empty(x.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad, grad_stats):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def _leaves(shape, n, dtype=torch.bfloat16):
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(n)]


def _attention_calls():
    q, k, v = _leaves(SHAPE, 3)
    grad = torch.randn(SHAPE, dtype=torch.bfloat16)
    batch = torch.Size(SHAPE[:1])

    def floor():
        return _Floor.apply(q, k, v)[0]

    def launcher():
        return attention.sdpa(q, k, v, None, 0.0, True, SHAPE[-1] ** -0.5, batch)

    def public():
        return llmcore.ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")

    return {"floor": floor, "triton sdpa": launcher, "llmcore sdpa": public}, (q, k, v), grad


def _norm_calls():
    x, res = _leaves(ROWS, 2)
    w, b = _leaves(ROWS[-1:], 2)
    grad = torch.randn(ROWS, dtype=torch.bfloat16)

    def floor():
        return _Floor.apply(x, res, w, b)[0]

    def launcher():
        return norm.layer_norm(x, w, b, 1e-12, residual=res)[0]

    def public():
        return llmcore.ops.layer_norm(x, w, b, 1e-12, residual=res, backend="triton")[0]

    return {"floor": floor, "triton layer_norm": launcher, "llmcore layer_norm": public}, (x, res, w, b), grad


CASES = {"attention (32, 12, 128, 64) bf16 causal": _attention_calls,
         "LayerNorm + residual (4096, 384) bf16": _norm_calls}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [0, 1, 2], ids=["floor", "launcher", "public"])
@pytest.mark.parametrize("case", list(CASES))
def test_host_time(benchmark, no_op_kernels, case, impl, mode):
    calls, inputs, grad = CASES[case]()
    name, call = list(calls.items())[impl]

    def run():
        out = call()
        if mode == "fwd+bwd":
            torch.autograd.grad(out, inputs, grad)

    benchmark.group = f"host time, no-op kernels: {case} {mode}"
    benchmark.extra_info.update(impl=name, case=case, mode=mode)
    benchmark.pedantic(run, rounds=30, iterations=200, warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["calls_per_s"] = round(1.0 / benchmark.stats.stats.median)
