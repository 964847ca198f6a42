"""pytest-benchmark suite: llmcore tokenizers vs HF ``tokenizers`` (WordPiece) and tiktoken (cl100k).

    pytest benchmarks/test_bench_tokenizer.py --benchmark-group-by=group \\
        --benchmark-json=benchmarks/results/tokenizer-pytest.json

Each group holds one comparison at one thread count ("wordpiece 1 thread", "cl100k 2 threads"...).
Corpus: every 8th text of SST-2 (train, validation, test) + IMDB 2000 (about 0.8 MB; set
LLMCORE_BENCH_TOKENIZER_STRIDE=1 for the whole corpus).

HF ``tokenizers`` takes its thread count from RAYON_NUM_THREADS once, when its rayon pool starts,
so the HF cases run in child processes started with RAYON_NUM_THREADS set
(``llmcore.bench.tokenizer.RefServer``): the timed call asks the child to encode the texts once
and waits for it; the child frees the result after replying, and each round's untimed setup
waits for that (``extra_info`` holds the child's own median too: the pipe round trip is well
under a millisecond). This process never starts HF's pool. llmcore single thread is
``num_threads=1``; tiktoken single thread is ``encode_ordinary`` in a loop, all threads
``encode_ordinary_batch(num_threads=N)``.

Every benchmark first checks its ids text by text against the reference and fails if any differ.
``extra_info``: MB/s and tokens/s (from the median), bytes, tokens, exact, mismatches.
For the round-robin, paired llmcore/reference ratios use ``llmcore bench tokenizer``.
"""
import os
import statistics

import pytest

from llmcore.bench import tokenizer as tb

STRIDE = int(os.environ.get("LLMCORE_BENCH_TOKENIZER_STRIDE", "8"))
THREADS = sorted({1, tb.all_threads()})
ROUNDS = int(os.environ.get("LLMCORE_BENCH_TOKENIZER_ROUNDS", "7"))


def _group(family: str, threads: int) -> str:
    return f"{family} {threads} thread{'s' if threads > 1 else ''}"


@pytest.fixture(scope="module")
def corpus():
    try:
        texts = tb.load_corpus(stride=STRIDE)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return texts, tb.utf8_bytes(texts)


@pytest.fixture(scope="module")
def servers(corpus):
    """Reference servers, started on first use, one per (impl, threads), closed at the end."""
    started = {}

    def get(family, impl, threads):
        key = (family, impl, threads)
        if key not in started:
            started[key] = tb.RefServer(family, impl, threads, STRIDE)
        return started[key]

    yield get
    for s in started.values():
        s.close()


@pytest.fixture(scope="module")
def llmcore_tokenizers():
    cache = {}

    def get(family):
        if family not in cache:
            try:
                cache[family] = tb.llmcore_tokenizer(family)
            except (RuntimeError, FileNotFoundError) as e:
                pytest.skip(str(e))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def reference_ids(corpus, servers):
    """The reference's ids per text: HF encode_batch (in a 1-thread server) / tiktoken encode_ordinary."""
    texts, _ = corpus
    cache = {}

    def get(family):
        if family not in cache:
            if family == "wordpiece":
                pytest.importorskip("tokenizers")
                cache[family] = [x.tolist() for x in servers("wordpiece", "hf encode_batch", 1).ids()]
            else:
                pytest.importorskip("tiktoken")
                enc = tb.tiktoken_encoding()
                cache[family] = [enc.encode_ordinary(t) for t in texts]
        return cache[family]

    return get


def _check_exact(benchmark, got, ref):
    bad = tb.count_mismatches(got, ref)
    benchmark.extra_info.update(exact=bad == 0, mismatches=bad)
    if bad:
        pytest.fail(f"{bad} of {len(ref)} texts differ from the reference: a speed for wrong output means nothing")


def _record(benchmark, corpus, ref, family, impl, threads):
    texts, nbytes = corpus
    tokens = sum(len(x) for x in ref)
    benchmark.extra_info.update(tokenizer=family, impl=impl, threads=threads, texts=len(texts), bytes=nbytes,
                                tokens=tokens)
    if benchmark.stats is not None:  # None under --benchmark-disable
        med = benchmark.stats.stats.median
        benchmark.extra_info.update(mb_s=round(nbytes / med / 1e6, 3), tokens_s=round(tokens / med))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", ["llmcore", "hf encode_batch", "hf encode_batch_fast"])
def test_wordpiece(benchmark, corpus, servers, llmcore_tokenizers, reference_ids, impl, threads):
    texts, _ = corpus
    benchmark.group = _group("wordpiece", threads)
    ref = reference_ids("wordpiece")
    if impl == "llmcore":
        tok = llmcore_tokenizers("wordpiece")
        _check_exact(benchmark, tb._split(tok.encode_batch(texts, num_threads=threads)), ref)
        benchmark.pedantic(tok.encode_batch, args=(texts,), kwargs={"num_threads": threads}, rounds=ROUNDS,
                           iterations=1, warmup_rounds=1)
    else:
        import tokenizers

        if impl == "hf encode_batch_fast" and not hasattr(tokenizers.Tokenizer, "encode_batch_fast"):
            pytest.skip(f"tokenizers {tokenizers.__version__} has no encode_batch_fast")
        server = servers("wordpiece", impl, threads)
        _check_exact(benchmark, server.ids(), ref)
        child = []
        benchmark.pedantic(lambda: child.append(server.run()), setup=server.sync, rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
        benchmark.extra_info.update(child_median_s=statistics.median(child[1:] or child),
                                    child_cpu_util=server.cpu_util(), rayon_num_threads=threads)
    _record(benchmark, corpus, ref, "wordpiece", impl, threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", ["llmcore", "tiktoken", "tiktoken loop"])
def test_cl100k(benchmark, corpus, llmcore_tokenizers, reference_ids, impl, threads):
    """At more than one thread tiktoken's batch API (a Python thread pool, a task per text) can lose to its own
    one-thread loop on short texts: both are timed, as `llmcore bench tokenizer` times them, and the faster is the
    reference (the group had the batch call alone, a ratio ~4x the command's, a probe found)."""
    texts, _ = corpus
    benchmark.group = _group("cl100k", threads)
    ref = reference_ids("cl100k")
    if impl == "llmcore":
        tok = llmcore_tokenizers("cl100k")
        _check_exact(benchmark, tb._split(tok.encode_batch(texts, num_threads=threads)), ref)
        fn = lambda: tok.encode_batch(texts, num_threads=threads)  # noqa: E731
        name = "llmcore"
    else:
        enc = tb.tiktoken_encoding()
        if impl == "tiktoken loop" and threads == 1:
            pytest.skip("one thread: the tiktoken case is its loop")
        if threads == 1 or impl == "tiktoken loop":
            fn = lambda: [enc.encode_ordinary(t) for t in texts]  # noqa: E731
            name = "tiktoken encode_ordinary" + (" loop (1 thread)" if threads > 1 else "")
        else:
            fn = lambda: enc.encode_ordinary_batch(texts, num_threads=threads)  # noqa: E731
            name = "tiktoken encode_ordinary_batch"
        _check_exact(benchmark, fn(), ref)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, corpus, ref, "cl100k", name, threads)
