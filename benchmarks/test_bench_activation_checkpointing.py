"""pytest-benchmark suite: activation (gradient) checkpointing on long inputs, one MiniLM training step (forward +
backward + fused AdamW) on 8 IMDB reviews cut to 512 tokens, llmcore and transformers (sdpa), each with its layers
kept and recomputed (``activation_checkpointing_enable()``; transformers with use_reentrant=False, as llmcore).

    pytest benchmarks/test_bench_activation_checkpointing.py --benchmark-group-by=group

extra_info: samples/s, and ``saved_mib``: what autograd keeps from the forward for the backward (tensors packed by
saved_tensors_hooks around the forward, the model's parameters left out; a recomputed layer's own are made again in
its backward, one layer at a time).
"""
import functools

import pytest

from llmcore.bench.data import imdb_texts, missing_inputs
from llmcore.bench.train_step import loss_check, make_steps, saved_bytes

pytestmark = pytest.mark.skipif(missing_inputs() is not None, reason=str(missing_inputs()))

BATCH, MAX_LENGTH = 8, 512
IMPLS = ("transformers", "llmcore padded", "llmcore packed")


@functools.cache
def steps(dtype, recompute):
    """The steps, and ``loss_check`` of them before any step (each side's loss and logits against transformers')."""
    fns, facts = make_steps(batch_size=BATCH, dtype=dtype, texts=imdb_texts(), max_length=MAX_LENGTH,
                            activation_checkpointing=recompute, impls=IMPLS)
    return fns, facts, loss_check(fns, dtype)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_step_long(benchmark, dtype, impl, recompute):
    fns, facts, check = steps(dtype, recompute)
    assert check["agree"], f"the sides do not compute the same step: {check}"  # (else a wrong side is timed)
    benchmark.group = f"MiniLM train step, {BATCH} x {MAX_LENGTH} IMDB, {dtype}"
    benchmark.extra_info.update(facts)
    benchmark.extra_info["saved_mib"] = round(saved_bytes(fns[impl].forward, fns[impl].model) / 2**20, 1)
    benchmark.pedantic(fns[impl], rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = round(BATCH / benchmark.stats.stats.median, 2)
