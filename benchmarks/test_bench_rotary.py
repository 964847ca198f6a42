"""pytest-benchmark suite: rotary position embedding, forward + backward, llmcore.ops.rotary_embedding (one
native pass each way) vs the composite transformers computes (``x * cos + rotate_half(x) * sin``: torch, which is
llmcore's reference path too).

    pytest benchmarks/test_bench_rotary.py --benchmark-group-by=group --benchmark-json=out.json

Shapes: the queries and keys of one layer of the MiniLM-sized Llama of `llmcore bench train-step --task
causal-lm` (1717 packed tokens, 6 query heads and 2 key heads of 64) and of a Llama-3-8B layer on 2048 tokens
(32 and 8 heads of 128), q as the column slice of a fused qkv projection that llmcore's attention rotates;
float32, and bfloat16 with float32 angles (as under bf16 autocast). ``extra_info``: GB/s from the bytes the
rotation must move (x and out, the gradient in and out, cos and sin twice; the composite moves more).
glibc keeps freed blocks for reuse, as `llmcore finetune` has it on the CPU (llmcore.train.runtime): else
every output of 32 MB or more is a fresh mapping whose page faults both sides pay on every call. Before llmcore's
timings, its output and q's gradient are checked against the composite's (``outputs_max_rel_diff``).
"""
import pytest
import torch

from llmcore.ops import rotary_embedding
from llmcore.ops.rotary import rotary_reference
from llmcore.train.runtime import retain_freed_memory

SHAPES = [(1717, 6, 2, 64), (2048, 32, 8, 128)]  # tokens, query heads, key heads, head dim
IMPLS = ["llmcore", "torch"]


@pytest.fixture(scope="module", autouse=True)
def warm_heap():
    retain_freed_memory()


def inputs(T, H, K, D, dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, (H + 2 * K) * D, generator=g).to(dtype).requires_grad_()
    angle = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g)
    angle = torch.cat((angle, angle), dim=-1)
    return qkv, angle.cos(), angle.sin(), torch.randn(T, H, D, generator=g).to(dtype)


def step(impl, qkv, cos, sin, grad, heads, dim):
    q = qkv[:, :heads * dim].view(-1, heads, dim)
    out = (rotary_embedding if impl == "llmcore" else rotary_reference)(q, cos, sin)
    return out, *torch.autograd.grad(out, q, grad)  # q's gradient: the slice's own backward is the same on both sides


def max_rel_diff(got, want) -> float:
    return max(float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in zip(got, want))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-D{}".format(s[0], s[1], s[3]))
def test_rotary(benchmark, shape, dtype, impl):
    T, H, K, D = shape
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    qkv, cos, sin, grad = inputs(T, H, K, D, dt)
    case = f"rotary q T{T} H{H} D{D} {dtype}"
    moved = 4 * T * H * D * qkv.element_size() + 4 * T * D * cos.element_size()
    benchmark.group = case
    benchmark.extra_info.update(case=case, mode="fwd+bwd", impl=impl, bytes=moved)
    if impl == "llmcore":  # (float32 angles on both sides: the bf16 outputs round once, each its own way)
        diff = max_rel_diff(step("llmcore", qkv, cos, sin, grad, H, D), step("torch", qkv, cos, sin, grad, H, D))
        assert diff <= (1e-2 if dtype == "bf16" else 1e-5), f"{case}: llmcore differs from the composite by {diff:.3g}"
        benchmark.extra_info["outputs_max_rel_diff"] = diff
    benchmark.pedantic(step, args=(impl, qkv, cos, sin, grad, H, D), rounds=30, iterations=5, warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["GB_per_s"] = round(moved / benchmark.stats.stats.median / 1e9, 2)
