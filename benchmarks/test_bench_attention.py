"""pytest-benchmark suite: llmcore attention vs torch SDPA (and the eager reference).

    pytest benchmarks/test_bench_attention.py --benchmark-json=benchmarks/results/attention-pytest.json
    python benchmarks/compare.py benchmarks/results/attention-pytest.json

Each benchmark stores its FLOPs in extra_info; compare.py turns the medians into GFLOP/s and
llmcore/torch ratios. Set LLMCORE_BENCH_REFERENCE=1 to include the (slow) eager reference. Before llmcore's
timings, its output and gradients are checked against torch's and, in bf16, float64 math's (``llmcore bench
attention``'s rule and tolerances;
``outputs_max_rel_diff`` in extra_info): a case that disagrees fails instead of timing.
"""
import functools
import os

import pytest
import torch

from llmcore.bench.attention import DTYPES, SUITE, check, dense_case, varlen_case, wordpiece_lengths

IMPLS = ["llmcore", "torch"] + (["reference"] if os.environ.get("LLMCORE_BENCH_REFERENCE") else [])
CASES = [(s, dt, c) for s in SUITE for dt in DTYPES.values() for c in (False, True)]


def _id(c):
    (B, H, L, D), dt, causal = c
    return f"{B}x{H}x{L}x{D}-{str(dt).split('.')[-1]}-{'causal' if causal else 'full'}"


def checked(make_case, *key) -> float:
    """llmcore's output and gradients against torch's for one case: the largest difference relative to torch's
    largest value, asserted to pass ``llmcore bench attention``'s check (in bf16, float64 math's too)."""
    return _checked(make_case, key)


@functools.lru_cache(maxsize=None)
def _checked(make_case, key) -> float:
    c = make_case(*key, impls=("llmcore", "torch"))
    result = check(c.make(), c.dtype)
    assert result.agree, f"{c.name}: llmcore's outputs fail the check: {result}"
    return result.vs_torch


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_dense(benchmark, case, impl, mode):
    c = dense_case(*case, impls=(impl,))
    run = c.make()[impl]
    backward = mode == "fwd+bwd"
    benchmark.group = f"{c.name} {mode}"
    benchmark.extra_info.update(flops=c.flops_fwd * (3.5 if backward else 1.0), impl=impl, mode=mode, case=c.name)
    if impl == "llmcore":
        benchmark.extra_info["outputs_max_rel_diff"] = checked(dense_case, *case)
    benchmark.pedantic(run, args=(backward,), rounds=7, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def sst2_batch():
    try:
        lengths = wordpiece_lengths("sst2")
    except (ImportError, RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"SST-2 lengths unavailable: {e}")
    pick = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))[:128].tolist()
    return [lengths[i] for i in pick]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["llmcore", "torch"])
def test_varlen_sst2(benchmark, sst2_batch, impl, mode):
    c = varlen_case(sst2_batch, impls=(impl,))
    run = c.make()[impl]
    backward = mode == "fwd+bwd"
    benchmark.group = f"{c.name} {mode}"
    benchmark.extra_info.update(flops=c.flops_fwd * (3.5 if backward else 1.0), impl=impl, mode=mode, case=c.name)
    if impl == "llmcore":
        benchmark.extra_info["outputs_max_rel_diff"] = checked(varlen_case, tuple(sst2_batch))
    benchmark.pedantic(run, args=(backward,), rounds=15, iterations=1, warmup_rounds=2)
