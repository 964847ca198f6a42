"""pytest-benchmark suite: one training step (forward + backward + fused AdamW), llmcore padded and packed vs
transformers (sdpa): MiniLM sequence classification on 32 SST-2 sentences, and next-token loss of a
MiniLM-sized Llama on 8 IMDB reviews cut to 256 tokens (``llmcore.bench.train_step``).

    pytest benchmarks/test_bench_train_step.py --benchmark-group-by=group

extra_info carries samples/s; `llmcore bench train-step [--task causal-lm]` runs the same steps round-robin. Before
any step, every side's loss and logits are checked against transformers' (``loss_check``, the command's rule): a
case that disagrees fails instead of timing (it timed a model without attention, a probe found).
"""
import functools

import pytest

from llmcore.bench.train_step import loss_check, make_lm_steps, make_steps


@functools.lru_cache(maxsize=None)
def steps(task, dtype):
    fns, facts = (make_lm_steps if task == "causal-lm" else make_steps)(dtype=dtype)
    return fns, facts, loss_check(fns, dtype)  # (before any step: the sides start from the same weights)


@pytest.mark.parametrize("impl", ["transformers", "transformers + llmcore.hf.patch", "llmcore padded",
                                  "llmcore packed"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_train_step(benchmark, task, dtype, impl):
    fns, facts, check = steps(task, dtype)
    if impl not in fns:
        pytest.skip(f"{impl}: causal-lm only")
    assert check["agree"], f"the sides do not compute the same step: {check}"
    benchmark.extra_info["logit_max_rel_diff"] = check["logit_max_rel_diff"].get(impl)
    benchmark.group = f"{'MiniLM' if task != 'causal-lm' else 'MiniLM-sized Llama'} {task} train step {dtype}"
    benchmark.extra_info.update(facts)
    benchmark.pedantic(fns[impl], rounds=10, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = round(facts["sentences"] / benchmark.stats.stats.median, 1)
