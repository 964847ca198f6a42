"""Print llmcore vs torch from a pytest-benchmark JSON: median, IQR, GFLOP/s, ratio.

    python benchmarks/compare.py benchmarks/results/attention-pytest.json
"""
import json
import math
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "flops" not in info:  # not an attention benchmark (e.g. the tokenizer suite)
            continue
        groups[(info["case"], info["mode"])][info["impl"]] = (b["stats"]["median"], b["stats"]["iqr"], info["flops"])
    print(f"{'case':52} {'mode':8} {'impl':10} {'median ms':>10} {'IQR ms':>8} {'GFLOP/s':>8} {'vs torch':>8}")
    ratios, missing = defaultdict(list), defaultdict(list)
    for (case, mode), impls in groups.items():
        torch_med = impls.get("torch", (None,))[0]
        for impl, (med, iqr, flops) in impls.items():
            r = torch_med / med if torch_med else None
            if impl == "llmcore" and not case.startswith("varlen") and r is not None:
                ratios[mode].append(r)
            shown = f"{r:7.2f}x" if r is not None else "   (none)"
            print(f"{case:52} {mode:8} {impl:10} {med * 1e3:10.3f} {iqr * 1e3:8.3f} {flops / med / 1e9:8.1f} {shown}")
        # (a case without one side, a failed check's or a deselected one: said, and left out of the summary)
        for side in ("llmcore", "torch"):
            if side not in impls and not case.startswith("varlen"):
                missing[mode].append(f"{case} (no {side} row)")
    for mode in sorted(set(ratios) | set(missing)):
        rs = ratios[mode]
        if rs:
            g = math.exp(sum(map(math.log, rs)) / len(rs))
            print(f"{mode}: geometric-mean speedup over torch {g:.2f}x, min {min(rs):.2f}x over {len(rs)} cases")
        for m in missing[mode]:
            print(f"{mode}: left out of the summary: {m}")


if __name__ == "__main__":
    main(sys.argv[1])
