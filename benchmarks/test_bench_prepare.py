"""pytest-benchmark suite: preparing SST-2 train (clean + dedup + tokenize + save) as a whole Python
process, the datasets/transformers reference vs ``llmcore prepare``, and llmcore's rerun from its cache.

    pytest benchmarks/test_bench_prepare.py --benchmark-only --benchmark-group-by=group

Each round times one fresh child process from start to exit (imports included), the same commands
as ``llmcore bench prepare`` (see ``llmcore.bench.prepare``): the reference into a fresh folder with
a fresh ``HF_DATASETS_CACHE``, llmcore with ``--force`` (the cached case without it, into a folder
prepared beforehand). ``llmcore bench prepare`` adds the output check, paired ratios and the bar.
extra_info carries rows/s and MB/s of input text at the median. ``LLMCORE_BENCH_PREPARE_ROWS``
takes the first N rows instead of the whole split.
"""
import os
import subprocess

import pytest

from llmcore.bench import prepare as bench
from llmcore.bench.data import data_dir, minilm_dir, missing_inputs

ROWS = int(os.environ["LLMCORE_BENCH_PREPARE_ROWS"]) if os.environ.get("LLMCORE_BENCH_PREPARE_ROWS") else None
ROUNDS = 3


@pytest.fixture(scope="module")
def sst2_train(tmp_path_factory):
    reason = missing_inputs()
    if reason:
        pytest.skip(reason)
    if ROWS is None:
        return os.path.join(data_dir(), "sst2", "train.tsv")
    return bench.write_rows(str(tmp_path_factory.mktemp("sst2")), ROWS)


def _run(cmd, env, first_lines=None):
    """Runs a prepare; with ``first_lines`` (a list), appends its stdout's first line (llmcore's "cache hit ...")."""
    done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if first_lines is not None:
        first_lines.append(done.stdout.split("\n", 1)[0])


@pytest.mark.parametrize("impl", ["transformers", "llmcore", "llmcore cached"])
def test_prepare_process(benchmark, sst2_train, tmp_path, impl):
    if impl == "transformers":
        for mod in ("transformers", "datasets"):
            pytest.importorskip(mod)
    model = minilm_dir()
    counter = iter(range(1000))
    first_lines = []  # (the cached runs': each must be a cache hit, as `llmcore bench prepare` requires)
    cached_dir = str(tmp_path / "cached")
    if impl == "llmcore cached":
        _run(bench.llmcore_command(sst2_train, model, cached_dir), bench.child_env())

    def setup():
        i = next(counter)
        if impl == "transformers":
            cmd = bench.reference_command(sst2_train, model, str(tmp_path / f"ref{i}"))
            return (cmd, bench.child_env(str(tmp_path / f"hf-cache{i}"))), {}
        if impl == "llmcore":
            return (bench.llmcore_command(sst2_train, model, str(tmp_path / "llmcore"), force=True),
                    bench.child_env()), {}
        return (bench.llmcore_command(sst2_train, model, cached_dir, force=False), bench.child_env(), first_lines), {}

    inp = bench.describe_input(sst2_train)
    benchmark.group = f"prepare SST-2 train ({inp['rows']} rows), whole process"
    benchmark.pedantic(_run, setup=setup, rounds=ROUNDS, iterations=1)
    if impl == "llmcore cached":
        assert first_lines and all(line.startswith("cache hit") for line in first_lines), \
            f"a cached run prepared again: {first_lines}"
    benchmark.extra_info.update({"rows": inp["rows"], "text_bytes": inp["text_bytes"]})
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["rows_per_s"] = round(inp["rows"] / median, 1)
        benchmark.extra_info["mb_per_s"] = round(inp["text_bytes"] / bench.MB / median, 3)
