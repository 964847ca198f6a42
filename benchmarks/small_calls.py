"""llmcore's ops against torch's at few rows, the decode step of generation, on the CPU: where llmcore's
per-call launch cost outweighs its kernels. It picks the row counts below which ``llmcore.hf.patch`` hands
inference calls to transformers' own forward (``llmcore.hf.TORCH_BELOW``).

    python benchmarks/small_calls.py

No gradient (torch.no_grad), fp32, torch's thread count. For each op and row count the two sides alternate,
round by round, each round timing n calls; reported: each side's median microseconds a call and the paired
ratio torch / llmcore, median (min-max) of 7 rounds (below 1: llmcore slower). Each llmcore result is checked
against torch's before timing. Rows are tokens (batch x positions); attention's are query rows per head, against
512 keys (a KV cache).
"""
import statistics

import torch
import torch.nn.functional as F

from llmcore import ops
from llmcore.bench import alternating_rounds, spread, spread_text

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, KEYS = 768, 2048, 12, 4, 64, 512


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def cases(rows: int):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, HIDDEN, generator=g)
    w, b = torch.randn(HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
    yield "layer_norm", lambda: ops.layer_norm(x, w, b, 1e-5), lambda: F.layer_norm(x, (HIDDEN,), w, b, 1e-5)
    yield "rms_norm", lambda: ops.rms_norm(x, w, 1e-6), lambda: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                                      + 1e-6))
    y, bias = torch.randn(1, rows, FFN, generator=g), torch.randn(FFN, generator=g)
    yield "bias_gelu", lambda: ops.bias_gelu(y, bias, approximate="tanh"), lambda: F.gelu(y + bias, approximate="tanh")
    up = torch.randn(1, rows, FFN, generator=g)
    yield "swiglu", lambda: ops.swiglu(y, up), lambda: F.silu(y) * up
    q = torch.randn(1, rows, HEADS, HEAD_DIM, generator=g)  # (B, L, H, D), as transformers' projections leave it
    angle = torch.randn(1, rows, HEAD_DIM, generator=g)
    cos, sin = angle.cos(), angle.sin()
    yield ("rotary_embedding", lambda: ops.rotary_embedding(q, cos[0], sin[0]),
           lambda: q * cos[:, :, None] + rotate_half(q) * sin[:, :, None])
    qh = torch.randn(1, HEADS, rows, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, KV_HEADS, KEYS, HEAD_DIM, generator=g) for _ in range(2))
    yield ("attention (GQA 12/4, 512 keys)", lambda: ops.scaled_dot_product_attention(qh, k, v, enable_gqa=True),
           lambda: F.scaled_dot_product_attention(qh, k, v, enable_gqa=True))
    k, v = (torch.randn(1, HEADS, KEYS, HEAD_DIM, generator=g) for _ in range(2))
    yield ("attention (MHA 12, 512 keys)", lambda: ops.scaled_dot_product_attention(qh, k, v),
           lambda: F.scaled_dot_product_attention(qh, k, v))


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {HIDDEN}, ffn {FFN}, "
          f"heads {HEADS}/{KV_HEADS} x {HEAD_DIM}")
    print("| op | rows | llmcore us | torch us | torch / llmcore |")
    print("|---|---|---|---|---|")
    results = {}
    with torch.no_grad():
        for rows in ROWS:
            for name, ours, theirs in cases(rows):
                torch.testing.assert_close(ours(), theirs(), atol=1e-4, rtol=1e-4)
                n = max(20, 4000 // rows)
                ts = alternating_rounds({"llmcore": ours, "torch": theirs}, n, 7)
                r = [b / a for a, b in zip(ts["llmcore"], ts["torch"])]
                results.setdefault(name, []).append((rows, statistics.median(r)))
                print(f"| {name} | {rows} | {statistics.median(ts['llmcore']):.1f} "
                      f"| {statistics.median(ts['torch']):.1f} | {spread_text(spread(r))} |", flush=True)
    print("\nfirst row count where llmcore is faster (median ratio > 1), per op:")
    for name, rs in results.items():
        won = [rows for rows, r in rs if r > 1]
        print(f"  {name}: {won[0] if won else 'none up to ' + str(ROWS[-1])}")


if __name__ == "__main__":
    main()
