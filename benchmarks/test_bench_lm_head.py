"""pytest-benchmark suite: the LM-head loss, forward + backward, F.cross_entropy(F.linear(h, W), y) (torch,
which holds the (tokens, vocab) logits and their gradient) vs llmcore.ops.linear_cross_entropy in chunks, with
its native softmax kernel (llmcore) and with PyTorch ops per chunk (llmcore-torch-ops, its reference path).

    pytest benchmarks/test_bench_lm_head.py --benchmark-group-by=group --benchmark-json=out.json
    python benchmarks/compare.py out.json

FLOPs: the three matmuls, 6 * tokens * hidden * vocab. Shapes: the MiniLM-sized Llama of `llmcore bench
train-step --task causal-lm` (1717 tokens, hidden 384, MiniLM's vocabulary) and GPT-2 small (2048 tokens,
hidden 768, vocabulary 50257); hidden states random, labels uniform. Before llmcore's timings, its loss and
gradients are checked against torch's (``outputs_max_rel_diff`` in extra_info): a case that disagrees fails.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from llmcore.ops.cross_entropy import linear_cross_entropy

SHAPES = [(1717, 384, 30522), (2048, 768, 50257)]
IMPLS = ["llmcore", "llmcore-torch-ops", "torch"]


@functools.lru_cache(maxsize=None)
def inputs(N, H, V):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_()
    return h, w, torch.randint(0, V, (N,), generator=g)


def step(impl, h, w, y, autocast):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if impl == "torch":
            loss = F.cross_entropy(F.linear(h, w), y)
        else:
            loss = linear_cross_entropy(h, w, y, backend="torch" if impl == "llmcore-torch-ops" else None)
    loss.backward()
    return loss


@functools.lru_cache(maxsize=None)
def checked(impl, shape, autocast) -> float:
    """``impl``'s loss and gradients against torch's: the largest difference relative to torch's largest value,
    asserted below 1e-4 (fp32) or 2e-2 (bf16 autocast, whose matmuls round to bf16 on both sides)."""
    h, w, y = inputs(*shape)
    got = [step(impl, h, w, y, autocast).detach().double(), h.grad.double(), w.grad.double()]
    want = [step("torch", h, w, y, autocast).detach().double(), h.grad.double(), w.grad.double()]
    diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
    assert diff <= (2e-2 if autocast else 1e-4), f"{impl} {shape}: differs from torch by {diff:.3g}"
    return diff


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
def test_lm_head_loss(benchmark, shape, dtype, impl):
    N, H, V = shape
    h, w, y = inputs(*shape)
    case = f"lm-head N{N} H{H} V{V} {dtype}"
    benchmark.group = case
    benchmark.extra_info.update(case=case, mode="fwd+bwd", impl=impl, flops=6.0 * N * H * V)
    if impl != "torch":
        benchmark.extra_info["outputs_max_rel_diff"] = checked(impl, shape, dtype != "fp32")
    benchmark.pedantic(step, args=(impl, h, w, y, dtype != "fp32"), rounds=7, iterations=1, warmup_rounds=1)
