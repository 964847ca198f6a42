"""The tokenizer speed-ups on text unlike the bench's SST-2 + IMDB (English reviews), one thread each side.

    python benchmarks/tokenizer_unseen.py [--md PATH] [--json PATH] [--budget SECONDS]

A probe found cl100k 0.71x tiktoken (slower) on Chinese text where the English bench says ~4x; this keeps the
check. Corpora, made on the machine that runs it (nothing shipped, nothing tuned on):
- ``python-stdlib``: the running interpreter's standard-library sources, one file per text (code, long documents);
- ``cjk-random``: random CJK ideographs in runs of 2-40 with spaces and CJK punctuation (seeded), each run one
  pre-tokenizer piece that BPE merges byte by byte (cl100k's worst kind of piece);
- ``mixed-scripts``: random words of Cyrillic, Greek, Arabic, Devanagari, Hangul, Thai and emoji (seeded).

Each (tokenizer, corpus) case is ``llmcore.bench.tokenizer.run_throughput_case`` at one thread in this process
(``RAYON_NUM_THREADS=1`` is set before HF tokenizers starts): every implementation's ids are checked against the
reference's first, then they are timed round-robin; speed-ups are paired per round (median, min-max).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers' pool starts
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

SCRIPTS = {  # inclusive code point ranges of letters
    "cyrillic": (0x0430, 0x044F), "greek": (0x03B1, 0x03C9), "arabic": (0x0627, 0x064A),
    "devanagari": (0x0915, 0x0939), "hangul": (0xAC00, 0xD7A3), "thai": (0x0E01, 0x0E2E),
    "emoji": (0x1F600, 0x1F64F)}


def python_stdlib(max_bytes: int = 2_000_000) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            texts.append(text)
            total += len(text.encode("utf-8"))
            if total >= max_bytes:
                break
    return texts


def cjk_random(texts: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(texts):
        runs = ["".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(2, 40)))
                for _ in range(rng.randint(5, 30))]
        out.append("".join(r + rng.choice(("，", "。", " ", "、", "！")) for r in runs))
    return out


def mixed_scripts(texts: int = 1500, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    ranges = list(SCRIPTS.values())
    out = []
    for _ in range(texts):
        words = []
        for _ in range(rng.randint(5, 60)):
            lo, hi = rng.choice(ranges)
            words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
        out.append(" ".join(words))
    return out


CORPORA = {"python-stdlib": python_stdlib, "cjk-random": cjk_random, "mixed-scripts": mixed_scripts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--md", help="write the Markdown table here")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--budget", type=float, default=15.0, help="timing seconds per case (default 15)")
    a = p.parse_args(argv)
    from llmcore.bench.tokenizer import environment, run_throughput_case

    cases, lines = [], ["| corpus | tokenizer | MB | llmcore MB/s | reference | reference MB/s | speed-up | exact |",
                        "|---|---|---|---|---|---|---|---|"]
    for corpus, make in CORPORA.items():
        texts = make()
        for family in ("wordpiece", "cl100k"):
            case = run_throughput_case(family, 1, texts, min_rounds=7, budget_s=a.budget)
            case["corpus"] = corpus
            cases.append(case)
            rows = {r["impl"]: r for r in case["results"]}
            ours = rows.pop("llmcore")
            for name, r in rows.items():
                if name == "hf encode_batch":  # (the fastest call that computes what llmcore's does is _fast)
                    continue
                s = r["llmcore_speedup"]
                lines.append(f"| {corpus} | {family} | {ours['bytes'] / 1e6:.2f} | {ours['mb_s']:.1f} | {name} "
                             f"| {r['mb_s']:.1f} | {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) "
                             f"| {ours['exact'] and r['exact']} |")
            print(lines[-1], flush=True)
    env = environment()
    text = (f"# llmcore tokenizers on unseen text, 1 thread\n\nCommand: `python benchmarks/tokenizer_unseen.py"
            f"{' --md ' + a.md if a.md else ''}{' --json ' + a.json if a.json else ''}`. Machine: "
            f"{env.get('cpu_model')}, load average {env.get('loadavg_start')} at start. llmcore's ids equal the "
            "reference's on every text (`exact`) before any timing; speed-up: per-round paired ratios, median "
            "(min-max).\n\n" + "\n".join(lines) + "\n")
    print(text)
    if a.md:
        with open(a.md, "w", encoding="utf-8") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "cases": cases}, f, indent=1, default=str)
    return 0 if all(r["exact"] for c in cases for r in c["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
