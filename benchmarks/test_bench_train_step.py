"""pytest-benchmark suite: one training step (forward + backward + fused AdamW), llmcore padded and packed vs
transformers (sdpa): MiniLM sequence classification on 32 SST-2 sentences, and next-token loss of a
MiniLM-sized Llama on 8 IMDB reviews cut to 256 tokens (``llmcore.bench.train_step``).

    pytest benchmarks/test_bench_train_step.py --benchmark-group-by=group

extra_info carries samples/s; `llmcore bench train-step [--task causal-lm]` runs the same steps round-robin.
"""
import functools

import pytest

from llmcore.bench.train_step import make_lm_steps, make_steps


@functools.lru_cache(maxsize=None)
def steps(task, dtype):
    return (make_lm_steps if task == "causal-lm" else make_steps)(dtype=dtype)


@pytest.mark.parametrize("impl", ["transformers", "transformers + llmcore.hf.patch", "llmcore padded",
                                  "llmcore packed"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_train_step(benchmark, task, dtype, impl):
    fns, facts = steps(task, dtype)
    if impl not in fns:
        pytest.skip(f"{impl}: causal-lm only")
    benchmark.group = f"{'MiniLM' if task != 'causal-lm' else 'MiniLM-sized Llama'} {task} train step {dtype}"
    benchmark.extra_info.update(facts)
    benchmark.pedantic(fns[impl], rounds=10, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = round(facts["sentences"] / benchmark.stats.stats.median, 1)
