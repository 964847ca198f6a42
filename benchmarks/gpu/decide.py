"""What a GPU check's JSON (benchmarks/gpu/bench.py) says to change in llmcore's defaults. Changes nothing.

One rule throughout: a candidate replaces a default only where it was faster in every round of an
alternating comparison (the attention head-to-heads, the norm backward's launches, the LM-head loss's
chunks) and by at least MIN_GAIN in the median round: with 3 rounds and ~20 candidates, "faster in
every round" alone would pass a few candidates that are no faster at all. Where a section timed each
entrant once (GQA's dK/dV blocks), its 80th-percentile time must beat the default's 20th. Anything
else is reported as "keep", with the numbers, so that a reader can see how close it was.

    python benchmarks/gpu/decide.py benchmarks/results/gpu-nvidia-h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the source tree, when run as a script

from llmcore.ops.triton.attention import _bucket  # noqa: E402  (the tables' head-dim buckets)

MIN_GAIN = 1.03  # the median round's speed-up a change needs
# The backward's kernels for each way of making dQ (llmcore.ops.triton.attention._dq_mode); each may run as its
# "_desc" twin (tiles through tensor descriptors)
_DQ_KINDS = {"kernel": ("dkdv", "dq"), "atomic": ("dkdv_atomic",), "tma": ("dkdv_tma",)}


def _settings(kinds, blocks: dict, bucket: int, causal: bool) -> list[str]:
    """The attention module's lines for launch kinds (e.g. "dkdv_desc": the dK/dV kernel through descriptors)."""
    out = []
    for k in kinds:
        out.append(f'_MEASURED[("{k}", {bucket}, {causal})] = {tuple(blocks[k])}')
        if k.endswith("_desc"):
            out.append(f'_DESC_MEASURED[("{k.removesuffix("_desc")}", {bucket}, {causal})] = True')
    return out


def _ratios(slow: list, fast: list) -> list[float]:
    """Per-round speed-ups of ``fast`` over ``slow`` (their ms, round by round)."""
    return [s / f for s, f in zip(slow, fast)]


def _span(ratios: list[float]) -> str:
    ordered = sorted(ratios)
    return f"{statistics.median(ordered):.3f}x (min {ordered[0]:.3f}, max {ordered[-1]:.3f}, {len(ordered)} rounds)"


def _every_round(ratios: list[float]) -> bool:
    return bool(ratios) and min(ratios) > 1.0 and statistics.median(ratios) >= MIN_GAIN


def _backward_gain(fb: dict, fw: dict):
    """The winners' gain on the backward alone, defaults over winners: the median fwd+bwd less the median forward
    of each (None without the forward's head-to-head), so that a forward gain alone changes no backward setting."""
    if "llmcore_tuned" not in fw or "llmcore_defaults" not in fw:
        return None

    median = statistics.median
    ours = median(fb["llmcore_defaults"]) - median(fw["llmcore_defaults"])
    theirs = median(fb["llmcore_tuned"]) - median(fw["llmcore_tuned"])
    return ours / theirs if ours > 0 and theirs > 0 else None


def attention(results: dict) -> list[str]:
    out = []
    cases = results.get("attention", {}).get("cases", {})
    for name, case in cases.items():
        causal = name == "causal"
        modes = case.get("head_to_head", {}).get("modes", {})
        tuned = case.get("llmcore_triton_tuned") or {}
        blocks, dq = tuned.get("blocks"), tuned.get("dq_mode")
        bucket = _bucket(results["attention"]["shape"][-1])
        if not modes:
            out.append(f"attention {name}: no head-to-head in this JSON (an older bench.py, or cut short)")
            continue
        if blocks and (case.get("winners_check") or {}).get("ok") is not True:
            # (bench.py's float64 check of the winners on ragged shapes, before they become defaults)
            out.append(f"attention {name}: keep (the sweep's winners did not pass the float64 check on ragged "
                       f"shapes: {case.get('winners_check', 'not run')!r:.200})")
            blocks = None
        fb = modes.get("fwd_bwd", {}).get("ms", {})
        fwd = next((k for k in (blocks or {}) if k.removesuffix("_desc") == "fwd"), None)
        fw = modes.get("forward", {}).get("ms", {})
        if blocks and "llmcore_tuned" in fb:
            r = _ratios(fb["llmcore_defaults"], fb["llmcore_tuned"])
            alone = _backward_gain(fb, fw)  # the winners' entrant carries the forward's winner too
            if _every_round(r) and (alone is None or alone >= MIN_GAIN):
                sets = _settings([k for k in blocks if k.removesuffix("_desc") in _DQ_KINDS[dq]], blocks, bucket,
                                 causal)
                if dq != "kernel":
                    sets.append(f'_DQ_MEASURED[({bucket}, {causal})] = "{dq}"')
                out.append(f"attention {name} backward: CHANGE ({_span(r)} fwd+bwd, the forward's winners included: "
                           f"see the next line): " + "; ".join(sets))
            else:
                side = "" if alone is None else f"; the backward alone {alone:.3f}x in the median rounds"
                out.append(f"attention {name} backward: keep (the sweep's winners, dQ by {dq}: {_span(r)} fwd+bwd"
                           f"{side})")
        if fwd and "llmcore_tuned" in fw:
            r = _ratios(fw["llmcore_defaults"], fw["llmcore_tuned"])
            verdict = "CHANGE: " + "; ".join(_settings([fwd], blocks, bucket, causal)) if _every_round(r) else "keep"
            out.append(f"attention {name} forward {fwd} blocks {tuple(blocks[fwd])}: {verdict} ({_span(r)})")
        if "llmcore_unfolded" in fw:
            r = _ratios(fw["llmcore_unfolded"], fw["llmcore_defaults"])  # > 1: the fold is faster
            if _every_round(r):
                verdict = "keep _FOLD_SCALE = True, now measured"
            elif _every_round([1 / x for x in r]):
                verdict = "CHANGE: _FOLD_SCALE = False"
            else:
                verdict = "keep (neither faster by MIN_GAIN in every round)"
            out.append(f"attention {name} forward, the scale folded into one FMA vs not: {verdict} ({_span(r)})")
    return out


def norms(results: dict) -> list[str]:
    out = []
    for name, case in results.get("norms", {}).get("cases", {}).items():
        launches = case.get("bwd_launches")
        if not launches:
            continue
        shape = tuple(case.get("shape", ()))
        timed = {n: row for n, row in launches["launches"].items() if "speedup_vs_defaults" in row}
        winners = {n: row for n, row in timed.items()
                   if row["speedup_vs_defaults"]["min"] > 1.0 and row["speedup_vs_defaults"]["median"] >= MIN_GAIN}
        failed = sorted(n for n, row in launches["launches"].items() if "error" in row)
        tail = f"; failed: {', '.join(failed)}" if failed else ""
        if winners:
            best = max(winners, key=lambda n: winners[n]["speedup_vs_defaults"]["median"])
            up = winners[best]["speedup_vs_defaults"]
            out.append(f"{name} {shape} backward: CHANGE for this row length: "
                       f"norm._BWD.update({winners[best]['settings']}) ({up['median']:.3f}x, min {up['min']:.3f}, "
                       f"max {up['max']:.3f} over the defaults {launches['defaults']}){tail}")
        elif timed:
            best = max(timed, key=lambda n: timed[n]["speedup_vs_defaults"]["median"])
            up = timed[best]["speedup_vs_defaults"]
            out.append(f"{name} {shape} backward: keep {launches['defaults']} (fastest other: {best}, "
                       f"{up['median']:.3f}x, min {up['min']:.3f}){tail}")
    return out


def cross_entropy(results: dict) -> list[str]:
    ce = results.get("cross_entropy")
    if not ce or "llmcore_triton" not in ce:
        return []
    base = ce["llmcore_triton"]
    others = {k: v for k, v in ce.items() if k.startswith("llmcore_triton_chunk") and "ms" in v}
    rounds = ce.get("chunk_rounds")
    if rounds:  # side by side
        ups = rounds["speedup_vs_default"]
        winners = {k: v for k, v in others.items() for up in [ups.get(k.removeprefix("llmcore_triton_"), {})]
                   if up.get("min", 0) > 1.0 and up.get("median", 0) >= MIN_GAIN}
    else:
        winners = {k: v for k, v in others.items() if v["ms_p80"] < base["ms_p20"]}
    shape = ce.get("shape", {})
    def cell(k, v):
        name = k.removeprefix("llmcore_triton_")
        up = rounds["speedup_vs_default"].get(name) if rounds else None
        side = f", {up['median']:.3f}x (min {up['min']:.3f}) in {rounds['rounds']} rounds" if up else ""
        return f"; {name}: {v['ms']:.2f} ms, +{v.get('peak_extra_mib', 0):.0f} MiB{side}"

    cells = "".join(cell(k, v) for k, v in others.items())
    head = (f"LM-head loss {shape}: default chunk {base['ms']:.2f} ms (p20-p80 {base['ms_p20']:.2f}-"
            f"{base['ms_p80']:.2f}), +{base.get('peak_extra_mib', 0):.0f} MiB{cells}")
    if not winners:
        return [head + ": keep the default chunk"]
    best = min(winners, key=lambda k: winners[k]["ms"])
    return [head + f": CHANGE the CUDA default toward {best.removeprefix('llmcore_triton_chunk')} rows "
            f"(faster in every round; weigh its memory)" if rounds else
            head + f": CHANGE the CUDA default toward {best.removeprefix('llmcore_triton_chunk')} rows "
            f"(p80 under the default's p20; weigh its memory)"]


def gqa(results: dict) -> list[str]:
    g = results.get("attention_gqa")
    if not g or "llmcore_triton" not in g:
        return []
    base = g["llmcore_triton"]["fwd_bwd"]
    faster = [r for r in g.get("dkdv_blocks", []) if "fwd_bwd" in r and r["fwd_bwd"]["ms_p80"] < base["ms_p20"]]
    if not faster:
        return [f"GQA {tuple(g['shape'])} dK/dV blocks: keep ({base['ms']:.3f} ms fwd+bwd)"]
    best = min(faster, key=lambda r: r["fwd_bwd"]["ms"])
    return [f"GQA {tuple(g['shape'])} dK/dV blocks: CHANGE for GROUP > 1: _MEASURED[(\"dkdv_grouped\", 128, True)] = "
            f"{tuple(best['cfg'])} ({best['fwd_bwd']['ms']:.3f} vs {base['ms']:.3f} ms fwd+bwd)"]


def decide(results: dict) -> list[str]:
    lines = []
    for section in (attention, norms, cross_entropy, gqa):
        try:
            lines += section(results)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # an older or cut-short JSON
            lines.append(f"{section.__name__}: cannot read ({type(e).__name__}: {e})")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a GPU check's JSON (benchmarks/results/gpu-*.json)")
    args = p.parse_args(argv)
    with open(args.json) as f:
        results = json.load(f)
    env = results.get("environment", {})
    print(f"# {args.json}: {env.get('device', '?')}, Triton {env.get('triton', '?')}, torch {env.get('torch', '?')}")
    for line in decide(results):
        print("- " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
