"""The `cuda` attention backend against torch SDPA on one GPU, in the same run.

``run(results)`` times llmcore's CUDA kernels forward and forward+backward at
(B, H, L, D) = (4, 32, 4096, 128) in bf16, causal and not, with ``triton.testing.do_bench``
(median and the 20th-80th percentile spread), after checking their output against torch's;
torch SDPA is timed with each of its CUDA backends and the fastest is the baseline. FLOPs
count the matmuls as FlashAttention does: forward 4 B H L^2 D (halved when causal),
backward 2.5x the forward. Fills ``results["cuda"]``; importable without a GPU.

    python benchmarks/gpu/bench_cuda.py            # prints the JSON
"""
from __future__ import annotations

import json
import math

SHAPE = (4, 32, 4096, 128)
BARS = {"forward_noncausal_tflops": 500.0, "fwd_bwd_vs_torch": 1.0}


def _flops(shape, causal: bool, backward: bool) -> float:
    b, h, n, d = shape
    f = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def _time(fn, grads=None):
    import triton.testing

    med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "ms_p20": lo, "ms_p80": hi}


def _with_rate(t: dict, flops: float) -> dict:
    return dict(t, tflops=flops / (t["ms"] * 1e-3) / 1e12)


def _torch_backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


# The most an output or gradient may differ from torch's in the same dtype for a bar to count, as a fraction of
# torch's largest magnitude there: 2**-5, 8 bf16 ulps of the largest element (the Triton kernels' differences at the
# bar's shape on the H200, 2026-11-28: 0.0039 for out to 0.0156 for dq; a wrong mask or scale is off by about the
# magnitude itself). A difference that is only finite proves nothing.
AGREE = 2.0 ** -5


def outputs_agree(diffs: dict, scales: dict) -> bool:
    """Whether every max abs difference from torch (``diffs``, per tensor) is finite and within ``AGREE`` of torch's
    largest magnitude (``scales``, per tensor)."""
    return bool(diffs) and all(math.isfinite(d) and name in scales and d <= AGREE * max(scales[name], 1e-6)
                               for name, d in diffs.items())


def _case(shape, causal: bool, dtype) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import llmcore

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(*shape, dtype=dtype, device="cuda", generator=g) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def ours_fwd():
        return llmcore.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cuda")

    def ours_fwd_bwd():
        llmcore.scaled_dot_product_attention(*leaves, is_causal=causal, backend="cuda").backward(grad)

    # validate before timing: output and gradients against torch's (flash) in the same dtype
    out = ours_fwd()
    ours_grads = torch.autograd.grad(llmcore.scaled_dot_product_attention(*leaves, is_causal=causal, backend="cuda"),
                                     leaves, grad)
    ref = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    check = {name: float((a.detach().float() - b.detach().float()).abs().max())
             for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *ours_grads), (ref, *ref_grads))}
    scales = {name: float(b.detach().float().abs().max()) for name, b in zip(("out", "dq", "dk", "dv"),
                                                                            (ref, *ref_grads))}
    finite = all(math.isfinite(x) for x in check.values())

    fwd_flops, fb_flops = _flops(shape, causal, False), _flops(shape, causal, True)
    case = {"causal": causal, "max_abs_diff_vs_torch": check, "max_abs_torch": scales, "finite": finite,
            "agrees": outputs_agree(check, scales),
            "llmcore": {"forward": _with_rate(_time(ours_fwd), fwd_flops),
                        "fwd_bwd": _with_rate(_time(ours_fwd_bwd, leaves), fb_flops)},
            "torch": {}}
    for name, backend in _torch_backends().items():
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                fb = _time(lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(grad), leaves)
            case["torch"][name] = {"forward": _with_rate(fwd, fwd_flops), "fwd_bwd": _with_rate(fb, fb_flops)}
        except RuntimeError as e:  # this backend cannot run the shape here
            case["torch"][name] = {"error": str(e).splitlines()[0][:200]}
    for phase in ("forward", "fwd_bwd"):
        timed = {n: r[phase]["ms"] for n, r in case["torch"].items() if phase in r}
        if timed:
            best = min(timed, key=timed.get)
            case[f"torch_best_{phase}"] = best
            case[f"speedup_{phase}"] = timed[best] / case["llmcore"][phase]["ms"]
    return case


def run(results: dict, shape=SHAPE) -> None:
    """Benchmarks the cuda backend on the current GPU and stores the figures in results["cuda"]."""
    import torch

    import llmcore
    from llmcore.ops import cuda_attention

    reason = cuda_attention.unavailable()
    if reason:
        results["cuda"] = {"skipped": reason}
        return
    entry = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape_bhld": list(shape),
             "dtype": "bfloat16", "timer": "triton.testing.do_bench (median, p20-p80), ms",
             "kernels": "llmcore CUDA C++ (FlashAttention-2 algorithm, mma.sync; sm_90a build, no wgmma/TMA)",
             "llmcore": llmcore.__version__, "cases": []}
    for causal in (False, True):
        entry["cases"].append(_case(shape, causal, torch.bfloat16))
    full = entry["cases"][0]
    entry["bars"] = {
        "forward_noncausal_tflops": {"need": BARS["forward_noncausal_tflops"],
                                     "got": full["llmcore"]["forward"]["tflops"]},
        "fwd_bwd_vs_torch": {"need": BARS["fwd_bwd_vs_torch"],
                             "got": {("causal" if c["causal"] else "full"): c.get("speedup_fwd_bwd")
                                     for c in entry["cases"]}},
    }
    entry["bars"]["outputs_agree"] = all(c["agrees"] for c in entry["cases"])
    entry["bars"]["met"] = (entry["bars"]["forward_noncausal_tflops"]["got"] >= BARS["forward_noncausal_tflops"]
                            and all((x or 0) >= BARS["fwd_bwd_vs_torch"]
                                    for x in entry["bars"]["fwd_bwd_vs_torch"]["got"].values())
                            and entry["bars"]["outputs_agree"])
    results["cuda"] = entry


if __name__ == "__main__":
    out: dict = {}
    run(out)
    print(json.dumps(out, indent=2))
