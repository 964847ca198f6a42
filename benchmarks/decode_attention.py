"""Attention at decode shapes (one query row against a KV cache) and tiny calls, llmcore vs torch SDPA on the CPU.

    python benchmarks/decode_attention.py

Forward only, fp32, torch's thread count; the two alternate in order round by round, each round timing n calls of
one; reported: each side's median microseconds a call and the paired ratio torch / llmcore, median (min-max) of 9
rounds (below 1: llmcore slower). Training shapes are there for contrast.
"""
import statistics

import torch
import torch.nn.functional as F

from llmcore.bench import alternating_rounds, spread, spread_text
from llmcore.ops import scaled_dot_product_attention

SHAPES = [  # (B, H, Lq, Lk, D, causal)
    (1, 12, 1, 128, 64, False), (1, 12, 1, 1024, 64, False), (8, 12, 1, 512, 64, False), (1, 2, 4, 4, 16, False),
    (16, 12, 64, 64, 64, False), (32, 12, 128, 128, 64, False), (32, 12, 128, 128, 64, True)]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| (B, H, Lq, Lk, D, causal) | llmcore us | torch us | torch / llmcore |")
    print("|---|---|---|---|")
    for B, H, Lq, Lk, D, causal in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        got = scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (B, H, Lq, Lk, D, causal)
        n = max(3, int(2e6 / (B * H * Lq * Lk * D / 64 + 2000)))
        ts = alternating_rounds({"llmcore": lambda: scaled_dot_product_attention(q, k, v, is_causal=causal),
                                 "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}, n, 9,
                                warmup=10)
        r = [b / a for a, b in zip(ts["llmcore"], ts["torch"])]
        print(f"| {(B, H, Lq, Lk, D, causal)} | {statistics.median(ts['llmcore']):.1f} "
              f"| {statistics.median(ts['torch']):.1f} | {spread_text(spread(r))} |", flush=True)


if __name__ == "__main__":
    main()
