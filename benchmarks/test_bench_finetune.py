"""pytest-benchmark suite: one epoch of MiniLM fine-tuning on the first 1,000 SST-2 rows,
transformers' Trainer vs llmcore's loop, in fp32 and under bf16 autocast.

    pytest benchmarks/test_bench_finetune.py --benchmark-only --benchmark-group-by=group

Each round times ``.train()`` alone; its setup (untimed) prepares the data (the reference's
``datasets.map``, llmcore's ``prepare``), loads a fresh model and builds a fresh trainer, so every
round starts from the pretrained weights. The llmcore side is built
from the pieces ``finetune()`` uses (``prepare``, ``from_pretrained``, ``split_batches``,
``Trainer``), as ``llmcore.bench.finetune.build_llmcore``; ``llmcore bench finetune`` runs
``finetune()`` itself, each side in a fresh process, and adds accuracy and memory.
extra_info carries samples/s and tokens/s (real tokens) of the median round. ``LLMCORE_BENCH_FINETUNE_ROWS``
changes the slice.
"""
import os

import pytest

from llmcore.bench import finetune as bench
from llmcore.bench.data import minilm_dir, missing_inputs
from llmcore.train.runtime import retain_freed_memory

ROWS = int(os.environ.get("LLMCORE_BENCH_FINETUNE_ROWS", "1000"))
ROUNDS = 3


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory):
    reason = missing_inputs()
    if reason:
        pytest.skip(reason)
    # Both sides in this one process keep freed memory for reuse, as finetune() and `llmcore bench finetune`'s
    # run_transformers set it in theirs; this suite calls the builders, which do not, so neither side had it here
    # (a bench probe). mallopt is process-wide and stays.
    retain_freed_memory()
    folder = str(tmp_path_factory.mktemp("sst2"))
    bench.write_slice(folder, ROWS, validation_rows=32, test_rows=32)
    return folder


def _builder(impl: str):
    if impl == "transformers":
        for mod in ("transformers", "datasets", "accelerate"):  # Trainer needs accelerate
            pytest.importorskip(mod)
        return bench.build_transformers
    return bench.build_llmcore


@pytest.mark.parametrize("impl", ["transformers", "llmcore"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_finetune_epoch(benchmark, sst2_slice, tmp_path, dtype, impl):
    build = _builder(impl)
    facts = {}
    counter = iter(range(1000))

    def setup():
        built = build(sst2_slice, minilm_dir(), str(tmp_path / f"run{next(counter)}"), dtype)
        facts.update(rows=len(built["splits"]["train"]) if "splits" in built else built["train_rows"],
                     tokens=built["train_tokens"])
        return (built["trainer"],), {}

    benchmark.group = f"MiniLM fine-tuning, 1 epoch of {ROWS} SST-2 rows, {dtype}"
    benchmark.pedantic(lambda trainer: trainer.train(), setup=setup, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({"train_rows": facts["rows"], "train_tokens": facts["tokens"], "dtype": dtype})
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["samples_per_s"] = round(facts["rows"] / median, 1)
        benchmark.extra_info["tokens_per_s"] = round(facts["tokens"] / median, 1)
