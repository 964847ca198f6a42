"""Causal / non-causal time of the CPU attention kernels alone: `_C` calls on preallocated outputs,
causal and full alternating, no torch call between (the time `llmcore bench attention` reports
adds the public API and the round robin's other calls to every llmcore call).

    python benchmarks/causal_ratio.py --shape 4,12,512,64 --dtype bfloat16

With --torch-between, a torch SDPA forward + backward (causal, on tensors of its own) runs before
each timed call, as in the bench's round robin: the kernels then read their inputs after another
op has streamed its data through the caches.

To compare two builds, put each package (llmcore/ with its _C*.so) in its own folder and
alternate runs: `for r in 1 2 3; do for v in /tmp/a /tmp/b; do PYTHONPATH=$v python
benchmarks/causal_ratio.py; done; done` (a script path, not `python -m`, which would put the
checkout's llmcore first). An editable install (`pip install -e .`) puts an import hook ahead of
PYTHONPATH, and every run then measures the installed build: check the path on the first line of
the output. The machine is noisy: compare ratios within runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmcore
from llmcore import _C
from llmcore.ops import _cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4,12,512,64", help="B,H,L,D")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per mode and causality")
    ap.add_argument("--torch-between", action="store_true",
                    help="run a torch SDPA forward + backward before each timed call")
    args = ap.parse_args()
    B, H, L, D = (int(x) for x in args.shape.split(","))
    dt = getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(B, H, L, D, dtype=dt) for _ in range(4))
    out, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse = torch.empty(B, H, L)
    prob = {c: _cpu.problem(q, k, v, batch=B, len_q=L, len_k=L, scale=D**-0.5, is_causal=c, dropout_p=0.0, rng=None)
            for c in (True, False)}
    fwd_refs = _cpu.refs([q, k, v, out], packed=False)
    bwd_refs = _cpu.refs([q, k, v, out, g, dq, dk, dv], packed=False)

    def fwd(c):
        _C.attention_forward(prob[c], *fwd_refs, lse.data_ptr())

    def bwd(c):
        _C.attention_backward(prob[c], *bwd_refs, lse.data_ptr())

    other = [t.clone().requires_grad_() for t in (q, k, v)]

    def torch_call():
        for t in other:
            t.grad = None
        torch.nn.functional.scaled_dot_product_attention(*other, is_causal=True).backward(g)

    medians = {}
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        for c in (True, False):  # warm up; the backward needs its forward's lse
            fwd(c)
            fn(c)
        times = {True: [], False: []}
        for _ in range(args.reps):
            for c in (True, False):
                if name == "bwd":
                    fwd(c)
                if args.torch_between:
                    torch_call()
                t0 = time.perf_counter()
                fn(c)
                times[c].append(time.perf_counter() - t0)
        medians[name] = {c: statistics.median(times[c]) * 1e3 for c in (True, False)}
    between = ", torch SDPA fwd+bwd before each call" if args.torch_between else ""
    print(f"llmcore {llmcore.__file__} ({_C.cpu_isa()}), {args.dtype} {args.shape}, median of {args.reps}{between}:")
    for name, m in medians.items():
        print(f"  {name}: causal {m[True]:.3f} ms, full {m[False]:.3f} ms, causal/full {m[True] / m[False]:.3f}")
    both = {c: medians["fwd"][c] + medians["bwd"][c] for c in (True, False)}
    print(f"  fwd+bwd: causal/full {both[True] / both[False]:.3f}")


if __name__ == "__main__":
    main()
