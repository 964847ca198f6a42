"""pytest-benchmark suite: one MiniLM training step (forward + backward + fused AdamW) on 32
SST-2 sentences, llmcore padded and packed vs transformers' BertForSequenceClassification (sdpa).

    pytest benchmarks/test_bench_train_step.py --benchmark-group-by=group

extra_info carries samples/s; `llmcore bench train-step` runs the same steps round-robin.
"""
import functools

import pytest

from llmcore.bench.train_step import make_steps


@functools.lru_cache(maxsize=None)
def steps(dtype):
    return make_steps(dtype=dtype)


@pytest.mark.parametrize("impl", ["transformers", "llmcore padded", "llmcore packed"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_step(benchmark, dtype, impl):
    fns, facts = steps(dtype)
    benchmark.group = f"MiniLM train step {dtype}"
    benchmark.extra_info.update(facts)
    benchmark.pedantic(fns[impl], rounds=10, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = round(facts["sentences"] / benchmark.stats.stats.median, 1)
