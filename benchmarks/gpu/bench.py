"""llmcore's Triton kernels against torch on one GPU, in the same run; JSON + Markdown out.

Measured with ``triton.testing.do_bench`` (median, 20th-80th percentile spread), every
kernel validated against torch before it is timed:

- the bf16 matmul peak (8192^3 ``torch.matmul``), the yardstick for the attention figures;
- attention (4, 32, 4096, 128) bf16, causal and not, forward and forward+backward: llmcore's
  ``triton`` backend against torch SDPA with each of its CUDA backends (the fastest is the
  baseline); FLOPs as FlashAttention counts them (forward 4 B H L^2 D, halved when causal;
  forward+backward 3.5x the forward);
- LayerNorm and RMSNorm with the residual add fused, (16384, 4096) bf16, forward and
  forward+backward, in GB/s of the bytes the fused op must move, against torch's unfused
  composite (``x + r`` then ``F.layer_norm`` / HF's RMSNorm) and ``F.rms_norm``;
- the chunked LM-head cross-entropy, forward+backward, against torch's
  ``F.cross_entropy(F.linear(...))`` (which materializes the logits);
- ``benchmarks/gpu/bench_cuda.py``'s ``run(results)`` when it imports and the ``cuda``
  attention backend is available.

    python benchmarks/gpu/bench.py --out benchmarks/results [--autotune] [--budget 300]

Each section is independent: a failure is recorded in the JSON and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the source tree, when run as a script

ATTN_SHAPE = (4, 32, 4096, 128)
NORM_SHAPE = (16384, 4096)
CE_SHAPE = (8192, 4096, 128256)  # tokens, hidden, vocab (Llama-3's)
BARS = {"attention_fwd_bwd_causal_vs_sdpa": 1.0, "attention_fwd_noncausal_tflops": 450.0}


def bench(fn, grads=None, rep=100) -> dict:
    import triton.testing

    torch.cuda.synchronize()
    med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "ms_p20": lo, "ms_p80": hi}


def rate(t: dict, flops: float = 0.0, nbytes: float = 0.0) -> dict:
    out = dict(t)
    if flops:
        out["tflops"] = flops / (t["ms"] * 1e-3) / 1e12
    if nbytes:
        out["gbps"] = nbytes / (t["ms"] * 1e-3) / 1e9
    return out


def max_diff(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# ---------------------------------------------------------------------------------------


def matmul_peak(results: dict) -> None:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    results["matmul_bf16"] = dict(rate(bench(lambda: torch.matmul(a, b)), flops=2.0 * n**3), shape=[n, n, n])


def _attn_flops(shape, causal: bool, backward: bool) -> float:
    b, h, n, d = shape
    return 4.0 * b * h * n * n * d * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)


def attention(results: dict, shape=ATTN_SHAPE, key="attention") -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import llmcore

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(*shape, dtype=torch.bfloat16, device="cuda", generator=g) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = results.setdefault(key, {"shape": list(shape), "dtype": "bfloat16", "cases": {}})
    for causal in (False, True):
        case = out["cases"].setdefault("causal" if causal else "noncausal", {})

        def ours(*t):
            return llmcore.scaled_dot_product_attention(*t, is_causal=causal, backend="triton")

        # validate first: output and gradients against torch's default SDPA in the same dtype
        o = ours(*leaves)
        got = [o] + list(torch.autograd.grad(o, leaves, grad))
        r = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        want = [r] + list(torch.autograd.grad(r, leaves, grad))
        case["max_abs_diff_vs_torch"] = {n: max_diff(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
        fwd_f, fb_f = _attn_flops(shape, causal, False), _attn_flops(shape, causal, True)
        with torch.no_grad():
            case["llmcore_triton"] = {"forward": rate(bench(lambda: ours(q, k, v)), fwd_f)}
        case["llmcore_triton"]["fwd_bwd"] = rate(bench(lambda: ours(*leaves).backward(grad), leaves), fb_f)
        torch_cases = case.setdefault("torch_sdpa", {})
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    with torch.no_grad():
                        fwd = rate(bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), fwd_f)
                    fb = rate(bench(lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(grad),
                                    leaves), fb_f)
                torch_cases[name] = {"forward": fwd, "fwd_bwd": fb}
            except Exception as e:  # a backend torch cannot run here
                torch_cases[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        for mode in ("forward", "fwd_bwd"):
            ok = {n: c[mode]["ms"] for n, c in torch_cases.items() if mode in c}
            if ok:
                best = min(ok, key=ok.get)
                case.setdefault("best_torch", {})[mode] = best
                case.setdefault("speedup_vs_best_torch", {})[mode] = ok[best] / case["llmcore_triton"][mode]["ms"]


def _norm_case(fn_ours, fn_torch, inputs, params, grad_outs, nbytes_fwd, nbytes_bwd) -> dict:
    x, r = inputs
    leaves = [t.clone().requires_grad_() for t in (x, r, *params)]
    res = {}
    got = fn_ours(*leaves)
    want = fn_torch(*leaves)
    res["max_abs_diff_vs_torch"] = {f"out{i}": max_diff(a, b) for i, (a, b) in enumerate(zip(got, want))}
    for name, fn in (("llmcore_triton", fn_ours), ("torch", fn_torch)):
        with torch.no_grad():
            fwd = rate(bench(lambda: fn(x, r, *params)), nbytes=nbytes_fwd)

        def fb():
            torch.autograd.backward(fn(*leaves), grad_outs)

        res[name] = {"forward": fwd, "fwd_bwd": rate(bench(fb, leaves), nbytes=nbytes_fwd + nbytes_bwd)}
    res["speedup_vs_torch"] = {m: res["torch"][m]["ms"] / res["llmcore_triton"][m]["ms"]
                               for m in ("forward", "fwd_bwd")}
    return res


def norms(results: dict, shape=NORM_SHAPE) -> None:
    from llmcore.ops import layer_norm, rms_norm

    rows, n = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r, gy, gs = (torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1 + 1
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    e = x.numel() * 2  # one bf16 tensor of the input's size
    # fused op: forward reads x, r; writes y, s. Backward reads dy, ds, s; writes dx (one tensor, x's and r's grad).
    fwd_bytes, bwd_bytes = 4 * e, 4 * e
    note = "GB/s of the fused op's least traffic: forward reads x, r, writes y, s; backward reads dy, ds, s, writes dx"
    out = results.setdefault("norms", {"shape": list(shape), "dtype": "bfloat16", "bytes_note": note, "cases": {}})

    def ln_ours(x, r, w, b):
        return layer_norm(x, w, b, 1e-5, r, backend="triton")

    def ln_torch(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (n,), w, b, 1e-5), s

    def rms_ours(x, r, w):
        return rms_norm(x, w, 1e-6, r, backend="triton")

    def rms_torch(x, r, w):  # HF LlamaRMSNorm, unfused
        s = x + r
        h = s.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(s.dtype), s

    def rms_torch_fused(x, r, w):  # torch's own RMSNorm op (still a separate add)
        s = x + r
        return F.rms_norm(s, (n,), w, 1e-6), s

    out["cases"]["layer_norm"] = _norm_case(ln_ours, ln_torch, (x, r), (w, b), (gy, gs), fwd_bytes, bwd_bytes)
    out["cases"]["rms_norm"] = _norm_case(rms_ours, rms_torch, (x, r), (w,), (gy, gs), fwd_bytes, bwd_bytes)
    if hasattr(F, "rms_norm"):
        out["cases"]["rms_norm_vs_F.rms_norm"] = _norm_case(rms_ours, rms_torch_fused, (x, r), (w,), (gy, gs),
                                                            fwd_bytes, bwd_bytes)


def cross_entropy(results: dict, shape=CE_SHAPE) -> None:
    from llmcore.ops import linear_cross_entropy

    n, h, vocab = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(vocab, h, device="cuda", dtype=torch.bfloat16, generator=g) * h**-0.5
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    flops = 3 * 2.0 * n * h * vocab  # logits, grad_hidden, grad_weight matmuls

    def ours(hd, w):
        return linear_cross_entropy(hd, w, labels, backend="triton")

    def torch_chunked(hd, w):
        return linear_cross_entropy(hd, w, labels, backend="torch")

    def torch_plain(hd, w):
        return F.cross_entropy(F.linear(hd, w).float(), labels)

    res = {"shape": {"tokens": n, "hidden": h, "vocab": vocab}, "dtype": "bfloat16",
           "loss_diff_vs_torch": abs(float(ours(hidden, weight)) - float(torch_plain(hidden, weight)))}
    for name, fn in (("llmcore_triton", ours), ("llmcore_torch_chunks", torch_chunked), ("torch", torch_plain)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = rate(bench(lambda: fn(*leaves).backward(), leaves, rep=50), flops)
        t["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res[name] = t
    res["speedup_vs_torch"] = res["torch"]["ms"] / res["llmcore_triton"]["ms"]
    results["cross_entropy"] = res


def cuda_backend(results: dict) -> None:
    from llmcore.ops.dispatch import availability

    reason = availability().get("cuda")
    if reason:
        results["cuda"] = {"skipped": reason}
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_cuda

    bench_cuda.run(results)


# ---------------------------------------------------------------------------------------


def bars(results: dict) -> dict:
    out = {}
    try:
        c = results["attention"]["cases"]
        out["attention_fwd_bwd_causal_vs_sdpa"] = {
            "bar": BARS["attention_fwd_bwd_causal_vs_sdpa"], "value": c["causal"]["speedup_vs_best_torch"]["fwd_bwd"]}
        out["attention_fwd_noncausal_tflops"] = {
            "bar": BARS["attention_fwd_noncausal_tflops"],
            "value": c["noncausal"]["llmcore_triton"]["forward"]["tflops"]}
        for v in out.values():
            v["met"] = v["value"] >= v["bar"]
    except KeyError:
        pass
    return out


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# llmcore GPU check: {env.get('device')}", "",
             f"torch {env.get('torch')}, Triton {env.get('triton')}, CUDA {env.get('cuda')}; "
             f"`triton.testing.do_bench` medians (p20-p80 in the JSON). Written by `benchmarks/gpu/run.sh`.", ""]
    mm = results.get("matmul_bf16")
    if mm:
        lines += [f"bf16 matmul peak (8192^3 torch.matmul): **{mm['tflops']:.0f} TFLOP/s**", ""]
    att = results.get("attention")
    if att and "cases" in att:
        lines += [f"## Attention {tuple(att['shape'])} bf16 (TFLOP/s; % of the matmul peak)", "",
                  "| case | mode | llmcore triton | best torch SDPA | vs SDPA |", "|---|---|---|---|---|"]
        peak = mm["tflops"] if mm else float("nan")
        for cname, c in att["cases"].items():
            for mode in ("forward", "fwd_bwd"):
                if "llmcore_triton" not in c or mode not in c["llmcore_triton"]:
                    continue
                ours = c["llmcore_triton"][mode]["tflops"]
                best = c.get("best_torch", {}).get(mode)
                theirs = c["torch_sdpa"][best][mode]["tflops"] if best else float("nan")
                lines.append(f"| {cname} | {mode} | {ours:.0f} ({100 * ours / peak:.0f}%) | {theirs:.0f} ({best}) | "
                             f"{c['speedup_vs_best_torch'][mode]:.2f}x |")
        lines.append("")
    nm = results.get("norms")
    if nm and "cases" in nm:
        lines += [f"## Norms with fused residual {tuple(nm['shape'])} bf16 (GB/s)", "",
                  "| op | mode | llmcore triton | torch | speed-up |", "|---|---|---|---|---|"]
        for cname, c in nm["cases"].items():
            for mode in ("forward", "fwd_bwd"):
                lines.append(f"| {cname} | {mode} | {c['llmcore_triton'][mode]['gbps']:.0f} | "
                             f"{c['torch'][mode]['gbps']:.0f} | {c['speedup_vs_torch'][mode]:.2f}x |")
        lines.append("")
    ce = results.get("cross_entropy")
    if ce and "torch" in ce:
        s = ce["shape"]
        lines += [f"## LM-head cross-entropy fwd+bwd ({s['tokens']} tokens, hidden {s['hidden']}, vocab {s['vocab']}, "
                  "bf16)", "", "| implementation | ms | TFLOP/s | extra peak memory (MiB) |", "|---|---|---|---|"]
        for name in ("llmcore_triton", "llmcore_torch_chunks", "torch"):
            t = ce[name]
            lines.append(f"| {name} | {t['ms']:.2f} | {t['tflops']:.0f} | {t['peak_extra_mib']:.0f} |")
        lines.append("")
    if results.get("bars"):
        lines += ["## Bars", "", "| bar | value | needed | met |", "|---|---|---|---|"]
        for name, b in results["bars"].items():
            lines.append(f"| {name} | {b['value']:.2f} | {b['bar']} | {'yes' if b['met'] else 'no'} |")
        lines.append("")
    if results.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {v.splitlines()[-1] if v else v}" for k, v in results["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for gpu-<device>.json and .md")
    p.add_argument("--autotune", action="store_true", help="autotune the Triton attention blocks (slower start)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later sections are skipped past it")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    if args.autotune:
        os.environ["LLMCORE_TRITON_AUTOTUNE"] = "1"
    import triton

    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    results = {"environment": {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                               "cuda": torch.version.cuda, "python": sys.version.split()[0],
                               "autotune": args.autotune, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
               "errors": {}, "seconds": {}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"gpu-{slug}.json", out_dir / f"gpu-{slug}.md"
    skip = set(filter(None, args.skip.split(",")))
    start = time.time()
    for section, fn in (("matmul", matmul_peak), ("attention", attention), ("norms", norms),
                        ("cross_entropy", cross_entropy), ("cuda", cuda_backend)):
        if section in skip:
            continue
        if time.time() - start > args.budget:
            results["errors"][section] = f"skipped: the {args.budget:.0f} s budget was spent"
            continue
        t0 = time.time()
        try:
            fn(results)
        except Exception:
            results["errors"][section] = traceback.format_exc()
            print(results["errors"][section], file=sys.stderr)
        results["seconds"][section] = round(time.time() - t0, 1)
        results["bars"] = bars(results)
        json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
        try:
            md_path.write_text(markdown(results))
        except Exception:  # the JSON has everything; a table bug must not end the run
            results["errors"]["markdown"] = traceback.format_exc()
        print(f"[bench] {section}: {results['seconds'][section]} s", flush=True)
    print(md_path.read_text())
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
