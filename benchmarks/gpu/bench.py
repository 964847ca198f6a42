"""llmcore's Triton kernels against torch on one GPU, in the same run; JSON + Markdown out.

Measured with ``triton.testing.do_bench`` (median, 20th-80th percentile spread), every
kernel validated against torch before it is timed. In order of priority (a section starts
only while the ``--budget`` lasts; the JSON and Markdown are rewritten after every step, so
a run cut short still leaves what it measured):

- the bf16 matmul peak (8192^3 ``torch.matmul``), the yardstick for the attention figures;
- attention (4, 32, 4096, 128) bf16, causal and not, forward and forward+backward: llmcore's
  ``triton`` backend with its default blocks against torch SDPA with each of its CUDA
  backends (the fastest is the baseline); FLOPs as FlashAttention counts them (forward
  4 B H L^2 D, halved when causal; forward+backward 3.5x the forward);
- then a sweep of the attention kernels' block configurations (``attention._TABLES``): the
  forward, the dK/dV and dQ kernels each timed on their own, and the backward with dQ made
  in the dK/dV kernel (by per-element atomics, and by TMA reductions), each kernel also with
  its streamed tiles through tensor descriptors (the ``_desc`` kinds, TMA copies); every
  candidate's output is checked against the defaults'. The winners (the faster way to load
  for each kernel, and the fastest way to dQ) are then timed like the defaults;
- last, a head-to-head for each case: llmcore (defaults, and the winners) and torch's best
  backend timed in alternating rounds, so that the GPU's clocks drifting during the run
  (the matmul peak moved 716 -> 802 TFLOP/s between two runs) weigh on both alike; the
  bars' speed-up is the median of the per-round ratios, of the defaults (what ships; the winners' figure
  is beside it), and a bar is met only where the case's outputs and gradients were compared with torch's;
- LayerNorm and RMSNorm with the residual add fused, (16384, 4096) bf16, forward and
  forward+backward, in GB/s of the bytes the fused op must move, against torch's unfused
  composite (``x + r`` then ``F.layer_norm`` / HF's RMSNorm) and ``F.rms_norm``, with the
  backward's other launches (``norm.backward_launch``: forms, stages, programs, warps) timed
  against its defaults (wider rows, 8192 and 16384 columns, where the defaults change form: last);
- ``benchmarks/gpu/bench_cuda.py``'s ``run(results)`` when the ``cuda`` attention backend is
  available;
- the chunked LM-head cross-entropy, forward+backward, against torch's
  ``F.cross_entropy(F.linear(...))`` (which materializes the logits);
- causal GQA attention (Llama-3-8B's 4:1 heads) and the norms' wider rows;
- attention at fine-tuning shapes (MiniLM on an SST-2-like batch, padded and packed, BERT-base
  at 128, GPT-2 at 1024) through the public API against torch SDPA, where host time can dominate, with each
  call's device time and its busiest host ops and launches (torch.profiler);
- RoPE on a Llama-3-8B layer's q (the Triton rotary kernel against transformers' composite);
- last, the backend swap: training steps of transformers' DistilBERT classifier (distilbert-base shape, the guide's
  batch of 16) on its sdpa attention and after ``llmcore.hf.patch``.

    python benchmarks/gpu/bench.py --out benchmarks/results [--budget 300] [--no-sweep]
    python benchmarks/gpu/bench.py --warm-worker 0/6   # compile the sweep's kernels only (no timing)
    python benchmarks/gpu/bench.py --smoke --out /tmp/x # this script's logic, tiny shapes, CPU interpreter

``--warm-worker i/n`` compiles every n-th kernel of the sweep into Triton's cache, so that
``run.sh`` can do that in parallel processes while llmcore is still being built (it imports
the Triton modules without llmcore's native module). Each section is independent: a
failure is recorded in the JSON and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the source tree, when run as a script

ATTN_SHAPE = (4, 32, 4096, 128)
GQA_SHAPE = (4, 32, 8, 4096, 128)  # batch, query heads, key/value heads (Llama-3-8B's 4:1), length, head dim
NORM_SHAPE = (16384, 4096)
CE_SHAPE = (8192, 4096, 128256)  # tokens, hidden, vocab (Llama-3's)
# dK/dV blocks the GQA section times beside the default: no spills at GROUP 4, D 128, causal (aot, Triton 3.9, sm_90:
# 183 and 212 registers; the default 230)
GQA_DKDV = ((32, 64, 8, 3), (16, 128, 8, 3))
# The norm backward's launches timed against the defaults (llmcore.ops.triton.norm._BWD), NORM_ROUNDS rounds.
# The fused form's launches, then the split form (whole rows, and rows swept in chunks), none measured on a GPU yet.
NORM_BWD_LAUNCHES = tuple(dict(stages=s, programs_per_sm=p, warps=w) for s in (1, 2) for p in (2, 4, 8)
                          for w in (4, 8, 16)) + (dict(split=True), dict(split=True, chunk=2048),
                                                  dict(split=True, chunk=1024))
NORM_ROUNDS = 3
CE_ROUNDS = 3  # the LM-head loss's chunk sizes, side by side
# Wider rows, where the backward's defaults change form (fused to 8192 columns, split beyond: the fused one spills at
# 16384, aot sm_90), each timed with both forms and smaller chunks against the defaults.
NORM_WIDE = ((8192, 8192), (4096, 16384))
NORM_WIDE_LAUNCHES = (dict(split=False), dict(split=True), dict(split=True, chunk=4096), dict(split=True, chunk=2048))
BARS = {"attention_fwd_bwd_causal_vs_sdpa": 1.0, "attention_fwd_noncausal_tflops": 450.0}
# Each kernel by pointers and, as "<kind>_desc", with its streamed tiles through tensor descriptors (TMA copies);
# in the order the sweep's deadline cuts them (dQ by per-element atomics, the slowest on the H200, last).
SWEEP_KINDS = ("fwd", "fwd_desc", "dkdv", "dkdv_desc", "dq", "dq_desc", "dkdv_tma", "dkdv_tma_desc", "dkdv_atomic")
DQ_MODES = {"dkdv_atomic": "atomic", "dkdv_tma": "tma"}  # kernel -> LLMCORE_TRITON_DQ: dQ in the dK/dV kernel

DEVICE = "cuda"
SMOKE = False  # --smoke: tiny shapes on the CPU under Triton's interpreter (checks this script, measures nothing)


def bench(fn, grads=None, rep=100, warmup=25) -> dict:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"ms": ms, "ms_p20": ms, "ms_p80": ms}
    import triton.testing

    torch.cuda.synchronize()
    med, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
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


def triton_attention_module():
    """llmcore.ops.triton.attention, importable before llmcore's native module is built: when ``import llmcore``
    fails, the packages above it are stubbed (the Triton modules import nothing of llmcore but each other)."""
    try:
        import llmcore  # noqa: F401
    except ImportError:
        for name in ("llmcore", "llmcore.ops"):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                pkg = types.ModuleType(name)
                pkg.__path__ = [str(ROOT.joinpath(*name.split(".")))]
                sys.modules[name] = pkg
    return importlib.import_module("llmcore.ops.triton.attention")


# ---------------------------------------------------------------------------------------


def matmul_peak(results: dict, ctx: dict) -> None:
    n = 256 if SMOKE else 8192
    dt = torch.float32 if SMOKE else torch.bfloat16
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dt) for _ in range(2))
    results["matmul_bf16"] = dict(rate(bench(lambda: torch.matmul(a, b)), flops=2.0 * n**3), shape=[n, n, n])


def _attn_flops(shape, causal: bool, backward: bool) -> float:
    b, h, n, d = shape
    return 4.0 * b * h * n * n * d * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)


def _attn_shape():
    return (1, 2, 64, 32) if SMOKE else ATTN_SHAPE


def _attn_inputs(shape):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dt = torch.float32 if SMOKE else torch.bfloat16
    return tuple(torch.randn(*shape, dtype=dt, device=DEVICE, generator=g) for _ in range(4))


def _ours(causal: bool):
    import llmcore

    def fn(*t):
        return llmcore.scaled_dot_product_attention(*t, is_causal=causal, backend="triton")

    return fn


def _out_and_grads(fn, leaves, grad) -> list:
    """[fn's output, its gradients for the leaves (q, k, v)] under the upstream gradient ``grad``."""
    o = fn(*leaves)
    return [o, *torch.autograd.grad(o, leaves, grad)]


def _diffs(got: list, want: list, pick=None) -> dict:
    """Max abs differences of out, dq, dk, dv; pick(t): the rows of one of ``want`` that ``got`` computes."""
    return {n: max_diff(a, b if pick is None else pick(b)) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def _validate(fn, leaves, grad, causal: bool) -> tuple:
    """(max abs differences, torch's max magnitudes) of fn's output and gradients against torch's default SDPA in
    the same dtype."""
    want = _out_and_grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), leaves, grad)
    scales = {n: float(t.detach().float().abs().max()) for n, t in zip(("out", "dq", "dk", "dv"), want)}
    return _diffs(_out_and_grads(fn, leaves, grad), want), scales


def _mode_call(fn, mode: str, data, leaves):
    """One call of attention ``fn``: "forward" on data's q, k, v (to run under no_grad), or "fwd_bwd" on the leaves
    (their gradients accumulate: the caller clears them)."""
    q, k, v, grad = data
    if mode == "forward":
        return lambda: fn(q, k, v)
    return lambda: fn(*leaves).backward(grad)


def _time_mode(fn, mode: str, data, leaves) -> dict:
    """bench() of attention ``fn``: "forward" on data's q, k, v without autograd, or "fwd_bwd" on the leaves."""
    call = _mode_call(fn, mode, data, leaves)
    if mode == "forward":
        with torch.no_grad():
            return bench(call)
    return bench(call, leaves)


def _time_ours(fn, data, leaves, shape, causal: bool) -> dict:
    return {mode: rate(_time_mode(fn, mode, data, leaves), _attn_flops(shape, causal, mode == "fwd_bwd"))
            for mode in ("forward", "fwd_bwd")}


_TORCH_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                   "math": "MATH"}  # short name -> torch.nn.attention.SDPBackend member


def _time_torch_sdpa(out: dict, sdpa, data, leaves, fwd_flops: float, fb_flops: float, backends) -> None:
    """out[name] = forward and forward+backward timings of ``sdpa`` (torch's, with its options bound) pinned to each
    backend in ``backends`` (keys of _TORCH_BACKENDS), or the error of one torch cannot run here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name in backends:
        try:
            with sdpa_kernel(getattr(SDPBackend, _TORCH_BACKENDS[name])):
                out[name] = {mode: rate(_time_mode(sdpa, mode, data, leaves), flops)
                             for mode, flops in (("forward", fwd_flops), ("fwd_bwd", fb_flops))}
        except Exception as e:  # a backend torch cannot run here
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _speedups(case: dict) -> None:
    ours = case.get("llmcore_triton")
    if not ours:
        return
    for mode in ("forward", "fwd_bwd"):
        ok = {n: c[mode]["ms"] for n, c in case.get("torch_sdpa", {}).items() if mode in c}
        if ok and mode in ours:
            best = min(ok, key=ok.get)
            case.setdefault("best_torch", {})[mode] = best
            case.setdefault("speedup_vs_best_torch", {})[mode] = ok[best] / ours[mode]["ms"]


def attention(results: dict, ctx: dict) -> None:
    """Defaults and torch for both cases first (causal first: the bar), then the block sweep."""
    shape = _attn_shape()
    data = _attn_inputs(shape)
    q, k, v, grad = data
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = results.setdefault("attention", {"shape": list(shape), "dtype": str(q.dtype).replace("torch.", ""),
                                           "cases": {}})
    for causal in (True, False):
        case = out["cases"].setdefault("causal" if causal else "noncausal", {})
        ours = _ours(causal)
        try:
            case["max_abs_diff_vs_torch"], case["max_abs_torch"] = _validate(ours, leaves, grad, causal)
            case["llmcore_triton_defaults"] = _time_ours(ours, data, leaves, shape, causal)
            case["llmcore_triton"] = case["llmcore_triton_defaults"]
        except Exception:
            results["errors"][f"attention_{'causal' if causal else 'noncausal'}"] = traceback.format_exc()
            print(traceback.format_exc(), file=sys.stderr)
        ctx["save"]()
        fwd_f, fb_f = _attn_flops(shape, causal, False), _attn_flops(shape, causal, True)
        _time_torch_sdpa(case.setdefault("torch_sdpa", {}),
                         lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), data, leaves, fwd_f, fb_f,
                         ("flash", "efficient", "cudnn"))
        _speedups(case)
        ctx["save"]()
    if ctx.get("sweep", True):
        for causal in (True, False):
            case = out["cases"]["causal" if causal else "noncausal"]
            if time.time() > ctx["sweep_deadline"]:
                case["sweep"] = {"skipped": "no time left in the budget"}
                continue
            try:
                _sweep_and_time(case, causal, data, leaves, shape, ctx)
            except Exception:
                case.setdefault("sweep", {})["error"] = traceback.format_exc()
                results["errors"][f"attention_sweep_{'causal' if causal else 'noncausal'}"] = case["sweep"]["error"]
                print(case["sweep"]["error"], file=sys.stderr)
            _speedups(case)
            ctx["save"]()
        del data, leaves
        for causal in (True, False):  # the winners on ragged shapes, before they become defaults
            case = out["cases"]["causal" if causal else "noncausal"]
            tuned = case.get("llmcore_triton_tuned")
            if not tuned:
                continue
            if time.time() > ctx["sweep_deadline"] + 20:
                case["winners_check"] = {"skipped": "no time left in the budget"}
                continue
            try:
                case["winners_check"] = _check_winners(causal, tuned["blocks"], tuned["dq_mode"],
                                                       tuned.get("loads", "pointer"))
            except Exception:
                case["winners_check"] = {"error": traceback.format_exc()}
                print(case["winners_check"]["error"], file=sys.stderr)
            ctx["save"]()
    if time.time() < ctx["sweep_deadline"] + 30:
        data = _attn_inputs(shape)
        leaves = [t.clone().requires_grad_() for t in data[:3]]
        for causal in (True, False):
            case = out["cases"]["causal" if causal else "noncausal"]
            try:
                case["head_to_head"] = _head_to_head(case, causal, data, leaves, shape)
            except Exception:
                case["head_to_head"] = {"error": traceback.format_exc()}
                print(case["head_to_head"]["error"], file=sys.stderr)
            ctx["save"]()


H2H_ROUNDS = 5


def _head_to_head(case: dict, causal: bool, data, leaves, shape, rounds: int = H2H_ROUNDS) -> dict:
    """llmcore with the defaults (and with the sweep's winners, where they ran) against torch SDPA pinned to its
    fastest backend for that mode, timed in ``rounds`` alternating rounds (the order rotates each round).
    Per mode: each entrant's median ms and TFLOP/s over the rounds, and the ratios torch ms / llmcore ms per round
    (median, min, max)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    A = triton_attention_module()
    ours = _ours(causal)
    entrants = {"llmcore_defaults": lambda: _Env(A, "", loads=""),
                "llmcore_unfolded": lambda: _Env(A, "", loads="", fold_scale=False)}  # before the FMA fold
    tuned = case.get("llmcore_triton_tuned")
    if tuned:
        blocks = {kind: dict(BLOCK_M=r[0], BLOCK_N=r[1], num_warps=r[2], num_stages=r[3])
                  for kind, r in tuned["blocks"].items()}
        entrants["llmcore_tuned"] = lambda: _Env(A, tuned["dq_mode"], loads=tuned.get("loads", "pointer"), **blocks)
    res = {"rounds": rounds, "modes": {}}
    for mode in ("forward", "fwd_bwd"):
        best = case.get("best_torch", {}).get(mode)
        if best is None:
            continue
        flops = _attn_flops(shape, causal, mode == "fwd_bwd")
        torch_name = f"torch_{best}"

        def run_torch():
            with sdpa_kernel(getattr(SDPBackend, _TORCH_BACKENDS[best])):
                return _time_mode(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), mode, data,
                                  leaves)["ms"]

        def run_ours(env):
            with env():
                return _time_mode(ours, mode, data, leaves)["ms"]

        runners = {name: (lambda env=env: run_ours(env)) for name, env in entrants.items()}
        runners[torch_name] = run_torch
        times = _alternating(runners, rounds)
        m = res["modes"][mode] = {"torch_backend": best, "ms": times}
        m["median"] = {name: rate({"ms": _median(t)}, flops) for name, t in times.items()}
        for name in entrants:
            m[f"{name}_vs_torch"] = _round_speedups(times[torch_name], times[name])
    return res


def _alternating(runners: dict, rounds: int) -> dict:
    """name -> the ms each of ``rounds`` rounds measured; a round runs every runner once, in an order that
    rotates from round to round (the GPU's clocks drift during a run: side-by-side ratios, not absolute times)."""
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(runners[name]())
    return times


def _median(xs: list) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _round_speedups(base: list, times: list) -> dict:
    """The per-round speed-ups over ``base`` of a runner timed in the same alternating rounds: median, min, max."""
    ratios = [b / t for b, t in zip(base, times)]
    return {"median": _median(ratios), "min": min(ratios), "max": max(ratios)}


def _close_to_ref(ours, theirs, ref) -> dict:
    """FlashAttention's test rule (tests/attention_checks.py): max error <= 2x torch's own + bf16 rounding."""
    out = {}
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        err, torch_err = float((a - r).abs().max()), float((b - r).abs().max())
        floor = 2 * float(((r.to(torch.bfloat16) + 0.3 - 0.3).double() - r).abs().max())
        out[name] = {"err": err, "torch_err": torch_err, "ok": bool(err <= 2 * torch_err + floor)}
    return out


def _check_winners(causal: bool, blocks: dict, dq_mode: str, loads: str = "pointer") -> dict:
    """The sweep's winners against float64 at ragged sizes: GQA with L = 1027, and packed sequences."""
    import llmcore

    A = triton_attention_module()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    dt = torch.float32 if SMOKE else torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE, generator=g)

    def fb(fn, inputs, grad, dtype, **kw):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        o = fn(*leaves, **kw)
        o.backward(grad.to(dtype))
        return [o.detach().double()] + [t.grad.double() for t in leaves]

    res = {"blocks": blocks, "dq_mode": dq_mode, "loads": loads}
    L = 67 if SMOKE else 1027
    qkv, grad = (rnd(1, 8, L, 128), rnd(1, 2, L, 128), rnd(1, 2, L, 128)), rnd(1, 8, L, 128)
    kw = dict(is_causal=causal, enable_gqa=True)
    ref = fb(F.scaled_dot_product_attention, qkv, grad, torch.float64, **kw)
    theirs = fb(F.scaled_dot_product_attention, qkv, grad, dt, **kw)
    with _Env(A, dq_mode, loads=loads, **{k: dict(BLOCK_M=r[0], BLOCK_N=r[1], num_warps=r[2], num_stages=r[3])
                                          for k, r in blocks.items()}):
        ours = fb(lambda *t, **k: llmcore.scaled_dot_product_attention(*t, backend="triton", **k), qkv, grad, dt,
                  **kw)
        res["dense_gqa_1x8x1027"] = _close_to_ref(ours, theirs, ref)
        lens = [30, 1, 37] if SMOKE else [300, 1, 717]
        cu = torch.tensor([0, lens[0], lens[0] + lens[1], sum(lens)], dtype=torch.int32, device=DEVICE)
        total = sum(lens)
        qkv, grad = (rnd(total, 4, 128), rnd(total, 2, 128), rnd(total, 2, 128)), rnd(total, 4, 128)

        def packed_torch(q, k, v):
            outs = []
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
                qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)[0]
                            .transpose(0, 1))
            return torch.cat(outs)

        def packed_ours(q, k, v):
            return llmcore.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), is_causal=causal,
                                            backend="triton")

        ref = fb(packed_torch, qkv, grad, torch.float64)
        theirs = fb(packed_torch, qkv, grad, dt)
        ours = fb(packed_ours, qkv, grad, dt)
        res["packed_" + "_".join(map(str, lens))] = _close_to_ref(ours, theirs, ref)
    res["ok"] = all(v["ok"] for key, r in res.items() if isinstance(r, dict) and key != "blocks"
                    for v in r.values())
    return res


# --- the block sweep ---------------------------------------------------------------------


def sweep_candidates(A, causal: bool, block_d: int = 128) -> dict:
    """kind -> the candidate configs of attention._TABLES (bf16), in table order (the default first)."""
    return {kind: A._gpu_configs(kind, block_d, False, True, causal) for kind in SWEEP_KINDS}


def _cfg_row(cfg: dict) -> list:
    return [cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]]


def _loads_setting(kinds) -> str:
    """LLMCORE_TRITON_LOADS for launch kinds such as ("fwd_desc", "dkdv", "dq_desc"): "fwd,dq", or "pointer"."""
    return ",".join(k.removesuffix("_desc") for k in kinds if k.endswith("_desc")) or "pointer"


class _Env:
    """Sets LLMCORE_TRITON_DQ and (unless None) LLMCORE_TRITON_LOADS (None: left as they are; "": unset),
    attention._OVERRIDE and (unless None) attention._FOLD_SCALE for a block; restores them after."""

    def __init__(self, A, dq_mode=None, fold_scale=None, loads=None, **override):
        self.A, self.dq_mode, self.fold_scale, self.loads, self.override = A, dq_mode, fold_scale, loads, override

    def __enter__(self):
        self.old_env = os.environ.get("LLMCORE_TRITON_DQ")
        self.old_loads = os.environ.get("LLMCORE_TRITON_LOADS")
        if self.loads is not None:
            os.environ.pop("LLMCORE_TRITON_LOADS", None)
            if self.loads:
                os.environ["LLMCORE_TRITON_LOADS"] = self.loads
        self.old_override = dict(self.A._OVERRIDE)
        self.old_fold = self.A._FOLD_SCALE
        if self.fold_scale is not None:
            self.A._FOLD_SCALE = self.fold_scale
        if self.dq_mode:
            os.environ["LLMCORE_TRITON_DQ"] = self.dq_mode
        elif self.dq_mode == "":
            os.environ.pop("LLMCORE_TRITON_DQ", None)
        self.A._OVERRIDE.update(self.override)
        return self

    def __exit__(self, *exc):
        self.A._FOLD_SCALE = self.old_fold
        self.A._OVERRIDE.clear()
        self.A._OVERRIDE.update(self.old_override)
        for name, old in (("LLMCORE_TRITON_DQ", self.old_env), ("LLMCORE_TRITON_LOADS", self.old_loads)):
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _launch_kind(A, p, kind: str, cfg: dict, q, k, v, do, out, lse):
    """Runs one sweep candidate: the forward, or the backward with only the kernel of ``kind`` launched (a
    "_desc" kind: that kernel with its tiles through tensor descriptors)."""
    base = kind.removesuffix("_desc")
    loads = base if kind != base else "pointer"
    if base == "fwd":
        with _Env(A, loads=loads, **{kind: cfg}):
            return A._forward(p, q, k, v, None)
    skip = {"dkdv": ("dq", "dq_desc"), "dq": ("dkdv", "dkdv_desc")}.get(base, ())
    with _Env(A, DQ_MODES.get(base, "kernel"), loads=loads, **{kind: cfg}, **{other: None for other in skip}):
        return A._backward(p, do, q, k, v, out, lse, None)


def _kernel_stats(kernel) -> dict:
    """Registers per thread, spilled bytes and shared memory of a compiled kernel (where Triton says)."""
    out = {}
    for name, get in (("regs", lambda: kernel.n_regs), ("spills", lambda: kernel.n_spills),
                      ("shared", lambda: kernel.metadata.shared)):
        try:
            value = get()
            if isinstance(value, int):
                out[name] = value
        except Exception:
            pass
    return out


def _sweep_problem(A, causal: bool, q, k, v):
    L = q.size(2)
    return A._Problem(q, k, v, None, None, None, L, L, 0.0, causal, q.size(-1) ** -0.5)


def _sweep_and_time(case: dict, causal: bool, data, leaves, shape, ctx) -> None:
    A = triton_attention_module()
    q, k, v, do = data
    p = _sweep_problem(A, causal, q, k, v)
    t0 = time.time()
    sw = case["sweep"] = {"note": "ms per call of the timed piece: fwd = the forward; dkdv / dq = the backward "
                                  "with only that kernel (dkdv: and the small delta kernel, which the dq kernel "
                                  "replaces); dkdv_atomic / dkdv_tma = the "
                                  "whole backward with dQ by per-element atomics / TMA reductions. max_err: vs the "
                                  "default blocks' output.",
                          "candidates": {}}
    with _Env(A):
        A._OVERRIDE.clear()  # the defaults, whatever the environment says
        out_ref, lse_ref = A._forward(p, q, k, v, None)
        with _Env(A, "kernel"):
            grads_ref = A._backward(p, do, q, k, v, out_ref, lse_ref, None)  # dq, dk, dv
    refs = {"fwd": [out_ref], "dkdv": list(grads_ref[1:]), "dq": [grads_ref[0]], "dkdv_atomic": list(grads_ref),
            "dkdv_tma": list(grads_ref)}
    refs.update({kind + "_desc": rs for kind, rs in list(refs.items())})
    tols = {kind: [0.02 * float(r.float().abs().max()) + 1e-3 for r in rs] for kind, rs in refs.items()}
    best = {}
    for kind, cands in sweep_candidates(A, causal, p.block_d).items():
        rows = sw["candidates"][kind] = []
        for cfg in cands:
            if time.time() > ctx["sweep_deadline"]:
                rows.append({"cfg": _cfg_row(cfg), "skipped": "budget"})
                continue
            entry = {"cfg": _cfg_row(cfg)}
            rows.append(entry)
            died = ctx.get("suspects", {}).get(_task_key(causal, kind, cfg))
            if died:
                entry["skipped"] = f"the warm-up process compiling it died or was stopped ({died})"
                continue
            try:
                A._LAST.pop(kind, None)
                res = _launch_kind(A, p, kind, cfg, q, k, v, do, out_ref, lse_ref)
                entry.update(_kernel_stats(A._LAST.get(kind)))
                base = kind.removesuffix("_desc")
                got = [res[0]] if base == "fwd" else ([res[1], res[2]] if base == "dkdv" else
                                                      ([res[0]] if base == "dq" else list(res)))
                errs = [max_diff(a, b) for a, b in zip(got, refs[kind])]
                entry["max_err"] = max(errs)
                if any(not (e <= t) for e, t in zip(errs, tols[kind])):
                    entry["rejected"] = "output differs from the default blocks'"
                    continue
                entry.update(bench(lambda: _launch_kind(A, p, kind, cfg, q, k, v, do, out_ref, lse_ref),
                                   rep=40, warmup=10))
            except Exception as e:  # does not compile (shared memory, registers) or fails to launch
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                continue
            if kind not in best or entry["ms"] < best[kind][1]["ms"]:
                best[kind] = (cfg, entry)
            ctx["save"]()
    sw["winners"] = {kind: _cfg_row(c) for kind, (c, _) in best.items()}
    win = {kind: c for kind, (c, _) in best.items()}

    def faster(*kinds):  # of a kernel's ways to load (pointers, descriptors), the one whose best blocks were faster
        timed = [kind for kind in kinds if kind in win]
        return min(timed, key=lambda kind: best[kind][1]["ms"]) if timed else None

    # LLMCORE_TRITON_DQ -> the backward's kernels (launch kinds), each with its best blocks and way to load, timed
    # as a whole backward (the dQ kernel first: it wins ties)
    plan = {}
    if faster("dkdv", "dkdv_desc") and faster("dq", "dq_desc"):
        plan["kernel"] = (faster("dkdv", "dkdv_desc"), faster("dq", "dq_desc"))
    if faster("dkdv_tma", "dkdv_tma_desc"):
        plan["tma"] = (faster("dkdv_tma", "dkdv_tma_desc"),)
    if "dkdv_atomic" in win:
        plan["atomic"] = ("dkdv_atomic",)
    sw["plan"] = {m: list(kinds) for m, kinds in plan.items()}
    whole = {}  # LLMCORE_TRITON_DQ -> ms
    for dq_mode, kinds in plan.items():
        with _Env(A, dq_mode, loads=_loads_setting(kinds), **{kind: win[kind] for kind in kinds}):
            whole[dq_mode] = bench(lambda: A._backward(p, do, q, k, v, out_ref, lse_ref, None), rep=60,
                                   warmup=10)["ms"]
    sw["backward_ms"] = {f"dq_{m}": whole.get(m) for m in ("kernel", "atomic", "tma")}
    if not whole:
        sw["seconds"] = round(time.time() - t0, 1)
        return
    mode = min(whole, key=whole.get)
    sw["dq_mode"] = mode
    kinds = tuple(k for k in (faster("fwd", "fwd_desc"),) if k) + plan[mode]
    override, loads = {kind: win[kind] for kind in kinds}, _loads_setting(kinds)
    with _Env(A, mode, loads=loads, **override):
        ours = _ours(causal)
        case["max_abs_diff_vs_torch_tuned"] = _validate(ours, leaves, do, causal)
        case["llmcore_triton_tuned"] = dict(_time_ours(ours, data, leaves, shape, causal),
                                            blocks={kind: _cfg_row(c) for kind, c in override.items()}, dq_mode=mode,
                                            loads=loads)
    tuned, before = case["llmcore_triton_tuned"], case["llmcore_triton_defaults"]
    case["llmcore_triton"] = {m: tuned[m] for m in ("forward", "fwd_bwd")}
    case["tuned_vs_defaults"] = {m: before[m]["ms"] / tuned[m]["ms"] for m in ("forward", "fwd_bwd")}
    sw["seconds"] = round(time.time() - t0, 1)


def _task_key(causal: bool, kind: str, cfg: dict) -> str:
    return f"{'causal' if causal else 'noncausal'}:{kind}:{','.join(map(str, _cfg_row(cfg)))}"


def suspects(log_dir) -> dict:
    """Sweep candidates a warm-up process was compiling when it died (no summary line): key -> log file."""
    out = {}
    for f in sorted(Path(log_dir).glob("warm-*.log")) if log_dir else []:
        lines = f.read_text(errors="replace").splitlines()
        if any(re.match(r"^\[warm \S+\] \d+ kernels in", x) or x.startswith("[stopped]") for x in lines):
            continue
        begun = [x.split(" ", 1)[1] for x in lines if x.startswith("[begin] ")]
        if begun:
            out[begun[-1]] = f.name
    return out


def warm_worker(spec: str) -> int:
    """Compiles this worker's share (i of n) of the sweep's kernels at the benchmark shape; times nothing."""
    i, n = (int(x) for x in spec.split("/"))
    A = triton_attention_module()
    data = _attn_inputs(_attn_shape())
    q, k, v, do = data
    tasks = []
    for causal in (True, False):
        for kind, cands in sweep_candidates(A, causal).items():
            tasks += [(causal, kind, cfg) for cfg in cands]
    mine = tasks[i::n]
    t0, failed = time.time(), 0
    out = torch.randn_like(q)  # any values do for compiling the backward
    for causal, kind, cfg in mine:
        print(f"[begin] {_task_key(causal, kind, cfg)}", flush=True)  # a crash leaves this last: the sweep skips it
        try:
            p = _sweep_problem(A, causal, q, k, v)
            lse = torch.zeros(p.lse_shape, dtype=torch.float32, device=q.device)
            _launch_kind(A, p, kind, cfg, q, k, v, do, out, lse)
        except Exception as e:
            failed += 1
            print(f"[warm {spec}] {kind} {_cfg_row(cfg)} causal={causal}: {type(e).__name__}", file=sys.stderr)
    if not SMOKE:
        torch.cuda.synchronize()
    print(f"[warm {spec}] {len(mine)} kernels in {time.time() - t0:.0f} s ({failed} failed)", flush=True)
    return 0


# --- norms, LM-head loss, cuda backend ---------------------------------------------------


def _norm_case(fn_ours, fn_torch, inputs, params, grad_outs, nbytes_fwd, nbytes_bwd, launches=None) -> dict:
    """Ours against torch, forward and fwd+bwd; with launches (backward_launch settings), those too."""
    x, r = inputs
    leaves = [t.clone().requires_grad_() for t in (x, r, *params)]
    res = {"shape": list(x.shape)}
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
    if launches:
        res["bwd_launches"] = _norm_bwd_launches(fn_ours, leaves, grad_outs, nbytes_fwd + nbytes_bwd, launches)
    return res


def _norm_bwd_launches(fn, leaves, grad_outs, nbytes: float, launches) -> dict:
    """The backward's launch settings (llmcore.ops.triton.norm.backward_launch: form, row-loop stages, programs per
    SM, warps, chunk) against the defaults: gradients compared with the defaults', fwd+bwd timed in NORM_ROUNDS
    alternating rounds; speed-up = the defaults' ms / its ms in the same round (median, min, max)."""
    from llmcore.ops.triton import norm as triton_norm

    def grads():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(fn(*leaves), grad_outs)
        return [t.grad.clone() for t in leaves]

    def timer(settings):
        def run():
            with triton_norm.backward_launch(**settings):
                return bench(lambda: torch.autograd.backward(fn(*leaves), grad_outs), leaves, rep=20, warmup=5)["ms"]
        return run

    want = grads()
    runners, rows = {"defaults": timer({})}, {}
    for settings in launches:
        name = ",".join(f"{k}={v}" for k, v in settings.items())
        try:
            with triton_norm.backward_launch(**settings):
                got = grads()
        except Exception as e:  # a launch this GPU refuses (shared memory): reported, not timed
            rows[name] = {"settings": settings, "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        rows[name] = {"settings": settings, "max_abs_diff_vs_defaults": max(max_diff(a, b) for a, b in zip(got, want))}
        runners[name] = timer(settings)
    times = _alternating(runners, NORM_ROUNDS)
    for name, row in rows.items():
        if name in times:
            row.update(rate({"ms": _median(times[name])}, nbytes=nbytes),
                       speedup_vs_defaults=_round_speedups(times["defaults"], times[name]))
    timed = [n for n in rows if "speedup_vs_defaults" in rows[n]]
    return {"defaults": dict(triton_norm._BWD), "rounds": NORM_ROUNDS,
            "defaults_fwd_bwd": rate({"ms": _median(times["defaults"])}, nbytes=nbytes), "launches": rows,
            "fastest": max(timed, key=lambda n: rows[n]["speedup_vs_defaults"]["median"]) if timed else None}


def norms(results: dict, ctx: dict) -> None:
    # smoke: 64-column chunks make the split form sweep its 256-column rows in chunks
    launches = NORM_BWD_LAUNCHES[:2] + NORM_BWD_LAUNCHES[-1:] + (dict(split=True, chunk=64),) if SMOKE else \
        NORM_BWD_LAUNCHES
    _norms(results, ctx, [((64, 256) if SMOKE else NORM_SHAPE, launches, "")])


def norms_wide(results: dict, ctx: dict) -> None:
    """The wider rows, last: their new compiles take longest and they weigh least."""
    _norms(results, ctx, [(s, NORM_WIDE_LAUNCHES, f" {s[0]}x{s[1]}") for s in ([(16, 512)] if SMOKE else NORM_WIDE)])


def _norms(results: dict, ctx: dict, shapes: list) -> None:
    """shapes: ((rows, cols), backward launches to time, case-name suffix: "" for the main shape)."""
    from llmcore.ops import layer_norm, rms_norm

    dt = torch.float32 if SMOKE else torch.bfloat16
    note = "GB/s of the fused op's least traffic: forward reads x, r, writes y, s; backward reads dy, ds, s, writes dx"
    out = results.setdefault("norms", {"dtype": str(dt).replace("torch.", ""), "bytes_note": note, "cases": {}})

    def ln_ours(x, r, w, b):
        return layer_norm(x, w, b, 1e-5, r, backend="triton")

    def ln_torch(x, r, w, b):
        s = x + r
        return F.layer_norm(s, s.shape[-1:], w, b, 1e-5), s

    def rms_ours(x, r, w):
        return rms_norm(x, w, 1e-6, r, backend="triton")

    def rms_torch(x, r, w):  # HF LlamaRMSNorm, unfused
        s = x + r
        h = s.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(s.dtype), s

    def rms_torch_fused(x, r, w):  # torch's own RMSNorm op (still a separate add)
        s = x + r
        return F.rms_norm(s, s.shape[-1:], w, 1e-6), s

    for (rows, n), launches, suffix in shapes:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x, r, gy, gs = (torch.randn(rows, n, device=DEVICE, dtype=dt, generator=g) for _ in range(4))
        w = torch.randn(n, device=DEVICE, dtype=dt, generator=g) * 0.1 + 1
        b = torch.randn(n, device=DEVICE, dtype=dt, generator=g) * 0.1
        e = x.numel() * x.element_size()  # one tensor of the input's size
        # fused op: forward reads x, r; writes y, s. Backward reads dy, ds, s; writes dx (x's and r's grad).
        nbytes = (4 * e, 4 * e)

        out["cases"]["layer_norm" + suffix] = _norm_case(ln_ours, ln_torch, (x, r), (w, b), (gy, gs), *nbytes,
                                                         launches)
        ctx["save"]()
        if not suffix:  # the main shape: also against HF's composite, which the fine-tuning models use
            out["cases"]["rms_norm"] = _norm_case(rms_ours, rms_torch, (x, r), (w,), (gy, gs), *nbytes, launches)
            ctx["save"]()
        if hasattr(F, "rms_norm"):
            out["cases"]["rms_norm_vs_F.rms_norm" + suffix] = _norm_case(
                rms_ours, rms_torch_fused, (x, r), (w,), (gy, gs), *nbytes, launches if suffix else None)
            ctx["save"]()
        del x, r, gy, gs


def rotary(results: dict, ctx: dict) -> None:
    """RoPE on a Llama-3-8B layer's q (4096 tokens, 32 heads of 128, a column slice of a fused qkv projection; bf16,
    float32 angles): llmcore's Triton kernel against the composite transformers runs (torch ops), fwd and fwd+bwd."""
    from llmcore.ops import rotary_embedding
    from llmcore.ops.rotary import rotary_reference

    T, H, K, D = (16, 4, 2, 32) if SMOKE else (4096, 32, 8, 128)
    dt = torch.float32 if SMOKE else torch.bfloat16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(T, (H + 2 * K) * D, device=DEVICE, dtype=dt, generator=g)
    angle = torch.arange(T, device=DEVICE, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=DEVICE,
                                                                                        generator=g)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    grad = torch.randn(T, H, D, device=DEVICE, dtype=dt, generator=g)
    e = T * H * D * qkv.element_size()
    nbytes = {"forward": 2 * e + 2 * cos.numel() * 4, "fwd_bwd": 4 * e + 4 * cos.numel() * 4}  # x, out; grad in, out
    res = {"shape": [T, H, D], "dtype": str(dt).replace("torch.", ""), "bytes_note": "x and out (+ the gradient in "
           "and out), cos and sin: the least traffic"}
    fns = {"llmcore_triton": lambda q: rotary_embedding(q, cos, sin, backend="triton"),
           "torch": lambda q: rotary_reference(q, cos, sin)}
    leaf = qkv.clone().requires_grad_()
    q = leaf[:, :H * D].view(T, H, D)
    res["max_abs_diff_vs_torch"] = max_diff(fns["llmcore_triton"](q), fns["torch"](q))
    for name, fn in fns.items():
        with torch.no_grad():
            fwd = rate(bench(lambda: fn(qkv[:, :H * D].view(T, H, D))), nbytes=nbytes["forward"])

        def fb():
            torch.autograd.grad(fn(leaf[:, :H * D].view(T, H, D)), leaf, grad)

        res[name] = {"forward": fwd, "fwd_bwd": rate(bench(fb), nbytes=nbytes["fwd_bwd"])}
    res["speedup_vs_torch"] = {m: res["torch"][m]["ms"] / res["llmcore_triton"][m]["ms"]
                               for m in ("forward", "fwd_bwd")}
    results["rotary"] = res
    ctx["save"]()


def cross_entropy(results: dict, ctx: dict) -> None:
    from llmcore.ops import cross_entropy as ce_ops
    from llmcore.ops import linear_cross_entropy

    n, h, vocab = (64, 32, 1000) if SMOKE else CE_SHAPE
    dt = torch.float32 if SMOKE else torch.bfloat16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, h, device=DEVICE, dtype=dt, generator=g)
    weight = torch.randn(vocab, h, device=DEVICE, dtype=dt, generator=g) * h**-0.5
    labels = torch.randint(0, vocab, (n,), device=DEVICE, generator=g)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    flops = 3 * 2.0 * n * h * vocab  # logits, grad_hidden, grad_weight matmuls

    def ours(hd, w):
        return linear_cross_entropy(hd, w, labels, backend="triton")

    def torch_chunked(hd, w):
        return linear_cross_entropy(hd, w, labels, backend="torch")

    def torch_plain(hd, w):
        return F.cross_entropy(F.linear(hd, w).float(), labels)

    def ours_rows(rows):  # other chunks than the default (1024 rows at this vocab on CUDA: see default_chunk_size)
        return lambda hd, w: linear_cross_entropy(hd, w, labels, chunk_size=rows, backend="triton")

    res = {"shape": {"tokens": n, "hidden": h, "vocab": vocab}, "dtype": str(dt).replace("torch.", ""),
           "loss_diff_vs_torch": abs(float(ours(hidden, weight)) - float(torch_plain(hidden, weight)))}
    # the CPU's default (64 MiB of fp32 logits: 128 rows here, the CUDA default before the 2026-12-04 H200 run),
    # half the CUDA default, and a larger chunk
    others = (17, 16, 32) if SMOKE else (ce_ops.default_chunk_size(n, vocab), 512, 4096)
    for name, fn in (("llmcore_triton", ours), ("llmcore_torch_chunks", torch_chunked), ("torch", torch_plain),
                     *((f"llmcore_triton_chunk{rows}", ours_rows(rows)) for rows in others)):
        # Memory: one call of its own, from no gradients (the previous entrant's would be freed inside this one's
        # peak, and do_bench's first calls accumulate into the gradients they leave): above the inputs, the
        # gradients it makes included
        for t in leaves:
            t.grad = None
        extra = 0.0
        if not SMOKE:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(*leaves).backward()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        t = rate(bench(lambda: fn(*leaves).backward(), leaves, rep=50), flops)
        t["peak_extra_mib"] = extra
        res[name] = t
    res["speedup_vs_torch"] = res["torch"]["ms"] / res["llmcore_triton"]["ms"]
    results["cross_entropy"] = res
    ctx["save"]()
    # One call takes ~50-100 ms, so each timing above is a call or two: the chunks and torch again, side by side in
    # rounds of several calls each; the speed-up over torch is then the rounds' (the single calls' stays beside)
    runners = {"default": ours, "torch": torch_plain, **{f"chunk{rows}": ours_rows(rows) for rows in others}}
    times = _alternating({k: (lambda fn=fn: bench(lambda: fn(*leaves).backward(), leaves, rep=300, warmup=50)["ms"])
                          for k, fn in runners.items()}, CE_ROUNDS)
    res["chunk_rounds"] = {"rounds": CE_ROUNDS, "ms": times, "speedup_vs_default": {
        k: _round_speedups(times["default"], t) for k, t in times.items() if k not in ("default", "torch")},
        "speedup_vs_torch": _round_speedups(times["torch"], times["default"])}
    res["speedup_vs_torch_single_calls"] = res["speedup_vs_torch"]
    res["speedup_vs_torch"] = res["chunk_rounds"]["speedup_vs_torch"]["median"]


def cuda_backend(results: dict, ctx: dict) -> None:
    from llmcore.ops.dispatch import availability

    reason = availability().get("cuda")
    if reason:
        results["cuda"] = {"skipped": reason}
        return
    _bench_cuda().run(results)


def _bench_cuda() -> types.ModuleType:
    """benchmarks/gpu/bench_cuda.py, the module beside this script (run by path, its folder is not on sys.path)."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module("bench_cuda")


def attention_gqa(results: dict, ctx: dict) -> None:
    """Causal GQA forward + backward, the defaults against torch SDPA's enable_gqa. The dK/dV kernel runs over
    the query heads that share a key head (one loop over (head, block) pairs: the loop over heads around one
    over blocks spilled 176 B at D 128, sm_90; now none, 230 registers, python -m llmcore.ops.triton.aot).
    Timed here with the GROUP 1 default blocks (32, 64, 4, 3), and beside it other blocks that compile without
    spills at GROUP 4 (GQA_DKDV)."""
    import llmcore

    b, hq, hkv, n, d = (1, 4, 2, 64, 32) if SMOKE else GQA_SHAPE
    g = torch.Generator(device=DEVICE).manual_seed(1)
    dt = torch.float32 if SMOKE else torch.bfloat16
    q, grad = (torch.randn(b, hq, n, d, dtype=dt, device=DEVICE, generator=g) for _ in range(2))
    k, v = (torch.randn(b, hkv, n, d, dtype=dt, device=DEVICE, generator=g) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    case = results.setdefault("attention_gqa", {"shape": [b, hq, hkv, n, d], "dtype": str(dt).replace("torch.", ""),
                                                "causal": True})

    def ours(*t):
        return llmcore.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True, backend="triton")

    def theirs(*t):
        return F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True)

    got = _out_and_grads(ours, leaves, grad)
    case["max_abs_diff_vs_torch"] = _diffs(got, _out_and_grads(theirs, leaves, grad))
    case["llmcore_triton"] = _time_ours(ours, (q, k, v, grad), leaves, (b, hq, n, d), True)
    fwd_f, fb_f = _attn_flops((b, hq, n, d), True, False), _attn_flops((b, hq, n, d), True, True)
    _time_torch_sdpa(case.setdefault("torch_sdpa", {}), theirs, (q, k, v, grad), leaves, fwd_f, fb_f,
                     ("flash", "efficient", "cudnn", "math"))
    _speedups(case)
    A = triton_attention_module()
    rows = case["dkdv_blocks"] = []
    for cfg in GQA_DKDV:
        row = {"cfg": list(cfg)}
        rows.append(row)
        try:
            with _Env(A, dkdv=A._cfg(*cfg)):
                o = ours(*leaves)
                row["max_abs_diff_vs_defaults"] = max(
                    max_diff(x, y) for x, y in zip(torch.autograd.grad(o, leaves, grad), got[1:]))
                row["fwd_bwd"] = rate(bench(lambda: ours(*leaves).backward(grad), leaves), fb_f)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        ctx["save"]()


# Short sequences, where a call's host time (Python, autograd, the launches) can exceed its GPU time: fine-tuning
# shapes. (name, (batch, heads, length, head dim), causal, layout): "dense"; "padded" with a key-padding mask (every
# sequence keeps at least a quarter of its length); "packed": the same sequences through varlen_attention, against
# torch on the padded batch (what a padded model runs instead). MiniLM-L6 (12 x 32) on an SST-2-like batch, padded
# and packed; BERT-base at 128; GPT-2 at 1024, causal.
SMALL_CASES = (("minilm_sst2_padded", (32, 12, 64, 32), False, "padded"),
               ("minilm_sst2_packed", (32, 12, 64, 32), False, "packed"),
               ("bert_base_l128", (32, 12, 128, 64), False, "dense"),
               ("gpt2_l1024_causal", (8, 12, 1024, 64), True, "dense"))
SMALL_ROUNDS = 3


def _small_case(shape, causal: bool, layout: str, backend: str):
    """(ours on ``backend``, ours' data (q, k, v, grad), theirs, their data, pick): pick(t) takes the rows both
    compute from one of theirs (the valid rows of a packed case; None where both compute all)."""
    import llmcore

    b, h, n, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(2)
    dt = torch.float32 if SMOKE else torch.bfloat16
    data = tuple(torch.randn(b, h, n, d, dtype=dt, device=DEVICE, generator=g) for _ in range(4))
    mask = None
    if layout != "dense":
        lens = torch.randint(max(1, n // 4), n + 1, (b,), device=DEVICE, generator=g)
        valid = torch.arange(n, device=DEVICE)[None, :] < lens[:, None]
        mask = valid[:, None, None, :]

    def theirs(*t):
        return F.scaled_dot_product_attention(*t, attn_mask=mask, is_causal=causal)

    if layout != "packed":
        def ours(*t):
            return llmcore.scaled_dot_product_attention(*t, attn_mask=mask, is_causal=causal, backend=backend)

        return ours, data, theirs, data, None

    def pick(t):  # (B, H, L, D) -> the valid rows, packed (total, H, D)
        return t.transpose(1, 2)[valid]

    cu = torch.zeros(b + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lens.cumsum(0)
    longest = int(lens.max())

    def ours(*t):
        return llmcore.varlen_attention(*t, cu, cu, longest, longest, is_causal=causal, backend=backend)

    # no gradient from the padded batch's pad rows (they attend too, and would add to the valid keys' dK and dV)
    data = (*data[:3], data[3] * valid[:, None, :, None])
    return ours, tuple(pick(t).contiguous() for t in data), theirs, data, pick


HOST_TOP = 12  # host-side ops listed per entrant in the fine-tuning shapes' profile


@contextlib.contextmanager
def _launch_ranges():
    """llmcore's kernel launches, each inside a profiler range of its own ("llmcore triton launch <kind>", "llmcore
    cuda forward" / "backward"), so that a profile tells the launchers' Python time (the range's self time) from the
    rest of a call."""
    from torch.profiler import record_function

    from llmcore.ops import cuda_attention
    from llmcore.ops.triton import attention

    def ranged(fn, name):
        def wrapper(*args, **kwargs):
            label = name(args) if callable(name) else name
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapper

    patches = [(attention, "_launch", lambda a: f"llmcore triton launch {a[1]}"),
               (attention, "_ws_launch", "llmcore triton launch ws"),
               (cuda_attention, "_forward", "llmcore cuda forward"),
               (cuda_attention, "_backward", "llmcore cuda backward")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
    try:
        for mod, attr, name in patches:
            setattr(mod, attr, ranged(getattr(mod, attr), name))
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def _profile_calls(fn, mode: str, data, leaves, calls: int = 20) -> dict:
    """One call of ``mode``, ``calls`` times under torch.profiler: ``device_us``, the kernels' summed durations per
    call (CUDA activity; None on the CPU, --smoke), beside the timed us it says how much of a call is host time
    (Python, autograd, launches), where the GPU waits; and ``host``, the HOST_TOP ops and runtime calls with the most
    self CPU time per call (aten ops, cudaLaunchKernel / cuLaunchKernelEx, a cudaStreamSynchronize or memcpy if a call
    waits on the GPU), which say where that host time goes."""
    from torch.profiler import ProfilerActivity, profile

    once = _mode_call(fn, mode, data, leaves)

    def call():
        once()
        for t in leaves:  # as bench() clears them (none in "forward")
            t.grad = None

    activities = [ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA])
    with torch.no_grad() if mode == "forward" else torch.enable_grad():
        call()
        if not SMOKE:
            torch.cuda.synchronize()
        with _launch_ranges(), profile(activities=activities) as prof:
            for _ in range(calls):
                call()
            if not SMOKE:
                torch.cuda.synchronize()
    from torch.autograd import DeviceType

    events = prof.key_averages()
    host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    # the kernels' own events only: with the CPU activity on, each CPU op also carries its kernels' device time
    kernels = (e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
    return {"device_us": None if SMOKE else sum(kernels) / calls,
            "host": [{"name": e.key[:80], "self_cpu_us": e.self_cpu_time_total / calls, "count": e.count / calls}
                     for e in host[:HOST_TOP]]}


def attention_small(results: dict, ctx: dict) -> None:
    """Fine-tuning shapes through the public API, llmcore's ``triton`` backend (and its ``cuda`` one where built,
    for the cases it takes: no mask) against torch SDPA as torch picks its backend (what a model calls), forward
    and forward+backward in SMALL_ROUNDS alternating rounds: us per call and the per-round speed-ups. Each
    entrant validated against torch first (on the rows both compute)."""
    from llmcore.ops.dispatch import availability

    cuda_built = availability().get("cuda") is None
    out = results.setdefault("attention_small", {"rounds": SMALL_ROUNDS, "cases": {}})
    for name, shape, causal, layout in SMALL_CASES:
        shape = (2, 2, 24, 16) if SMOKE else shape
        case = out["cases"].setdefault(name, {"shape": list(shape), "causal": causal, "layout": layout})
        try:
            runners = {}
            for backend in ("triton", "cuda") if cuda_built and layout != "padded" else ("triton",):
                try:
                    ours, data, theirs, their_data, pick = _small_case(shape, causal, layout, backend)
                    leaves = [t.clone().requires_grad_() for t in data[:3]]
                    their_leaves = [t.clone().requires_grad_() for t in their_data[:3]]
                    case.setdefault("max_abs_diff_vs_torch", {})[backend] = _diffs(
                        _out_and_grads(ours, leaves, data[3]), _out_and_grads(theirs, their_leaves, their_data[3]),
                        pick)
                    runners[f"llmcore_{backend}"] = (ours, data, leaves)
                except Exception:
                    if backend == "triton":
                        raise
                    case["cuda_error"] = traceback.format_exc()  # the case goes on without it
            runners["torch_sdpa"] = (theirs, their_data, their_leaves)
            case["dtype"] = str(data[0].dtype).replace("torch.", "")
            for mode in ("forward", "fwd_bwd"):
                times = _alternating({k: lambda m=mode, r=r: _time_mode(r[0], m, r[1], r[2])["ms"]
                                      for k, r in runners.items()}, SMALL_ROUNDS)
                case[mode] = {"us": {k: 1e3 * _median(t) for k, t in times.items()}, "ms_rounds": times,
                              "speedup": {k: _round_speedups(times["torch_sdpa"], t) for k, t in times.items()
                                          if k != "torch_sdpa"}}
                try:
                    prof = {k: _profile_calls(r[0], mode, r[1], r[2]) for k, r in runners.items()}
                    case[mode]["device_us"] = {k: pr["device_us"] for k, pr in prof.items()}
                    case[mode]["host_top"] = {k: pr["host"] for k, pr in prof.items()}
                except Exception:  # the timings above stand without it
                    case[mode]["device_us_error"] = traceback.format_exc()
        except Exception:
            case["error"] = traceback.format_exc()
            print(case["error"], file=sys.stderr)
        ctx["save"]()


HF_SHAPE = (16, 128)  # the guide's batch size; sequences of 128 tokens, half the rows padded from token 64
HF_ROUNDS = 7  # alternating rounds of HF_STEPS training steps each
HF_STEPS = 5


def hf_patch(results: dict, ctx: dict) -> None:
    """The backend swap: training steps (forward, backward, fused AdamW; bf16 autocast) of transformers'
    DistilBertForSequenceClassification at distilbert-base-uncased's shape (random weights) on its sdpa attention,
    and of a copy after ``llmcore.hf.patch`` (Triton attention and norms, fused GELU and dropout, the first-token
    last layer), in HF_ROUNDS alternating rounds: ms a step and the per-round speed-ups. The two models' evaluation
    logits are compared first."""
    import copy

    import transformers

    import llmcore.hf
    from llmcore.bench.train_step import stepper  # the CPU train-step benchmark's step: fused AdamW

    torch.manual_seed(0)
    tiny = {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64, "vocab_size": 1000} if SMOKE else {}
    ref = transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(attn_implementation="sdpa", **tiny)).to(DEVICE)
    patched = llmcore.hf.patch(copy.deepcopy(ref))
    b, n = (4, 16) if SMOKE else HF_SHAPE
    ids = torch.randint(1000 if not SMOKE else 1, ref.config.vocab_size, (b, n), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[b // 2:, n // 2:] = 0
    labels = torch.arange(b, device=DEVICE) % 2
    rounds = 1 if SMOKE else HF_ROUNDS
    out = results.setdefault("hf_patch", {"model": "DistilBertForSequenceClassification", "shape": [b, n],
                                          "patched": dict(patched._llmcore_patched), "rounds": rounds,
                                          "steps_per_round": HF_STEPS})
    ref.eval(), patched.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out["max_abs_logit_diff_bf16"] = max_diff(patched(input_ids=ids, attention_mask=mask).logits,
                                                  ref(input_ids=ids, attention_mask=mask).logits)

    def timed(model):
        step = stepper(model, {"input_ids": ids, "attention_mask": mask}, labels, autocast=True)

        def steps() -> float:
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(HF_STEPS):
                step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3 / HF_STEPS
        steps()  # warm-up: compiles the kernels at these shapes
        return steps

    times = _alternating({"transformers": timed(ref), "hf_patch": timed(patched)}, rounds)
    out["ms"] = {k: _median(t) for k, t in times.items()}
    out["ms_rounds"] = times
    out["speedup"] = _round_speedups(times["transformers"], times["hf_patch"])
    ctx["save"]()


# ---------------------------------------------------------------------------------------


def _h2h_mode(case: dict, mode: str):
    """The head-to-head's results for ``mode``, or None where no head-to-head ran."""
    return case.get("head_to_head", {}).get("modes", {}).get(mode) or None


def _outputs_checked(case: dict) -> bool:
    """Whether the case's outputs and gradients were compared with torch's and agree (bench_cuda.outputs_agree:
    within 2**-5 of torch's largest magnitude; it was "every difference finite", which a wrong kernel passes): a
    bar is met only on checked outputs."""
    diffs, scales = case.get("max_abs_diff_vs_torch"), case.get("max_abs_torch")
    return isinstance(diffs, dict) and isinstance(scales, dict) and _bench_cuda().outputs_agree(diffs, scales)


def bars(results: dict) -> dict:
    """The bars, on the shipped defaults (the head-to-head's median where it ran, else the single timing). The
    sweep's winners are not what ships until decide.py's CHANGE lines are applied: their figure is beside, as
    ``with_winners``, not the verdict."""
    out = {}
    c = results.get("attention", {}).get("cases", {})
    causal, noncausal = c.get("causal", {}), c.get("noncausal", {})
    h2h = _h2h_mode(causal, "fwd_bwd")
    if h2h:
        out["attention_fwd_bwd_causal_vs_sdpa"] = {
            "bar": BARS["attention_fwd_bwd_causal_vs_sdpa"], "value": h2h["llmcore_defaults_vs_torch"]["median"],
            "from": "head_to_head llmcore_defaults", "case": causal,
            "with_winners": (h2h.get("llmcore_tuned_vs_torch") or {}).get("median")}
    elif "fwd_bwd" in causal.get("llmcore_triton_defaults", {}) and "fwd_bwd" in causal.get("best_torch", {}):
        # (the defaults' single timing: speedup_vs_best_torch is the sweep's winners' once the sweep ran)
        best = causal["torch_sdpa"][causal["best_torch"]["fwd_bwd"]]["fwd_bwd"]["ms"]
        out["attention_fwd_bwd_causal_vs_sdpa"] = {
            "bar": BARS["attention_fwd_bwd_causal_vs_sdpa"], "from": "the defaults' single timing",
            "value": best / causal["llmcore_triton_defaults"]["fwd_bwd"]["ms"], "case": causal}
    h2h = _h2h_mode(noncausal, "forward")
    if h2h:
        out["attention_fwd_noncausal_tflops"] = {
            "bar": BARS["attention_fwd_noncausal_tflops"], "value": h2h["median"]["llmcore_defaults"]["tflops"],
            "from": "head_to_head llmcore_defaults", "case": noncausal,
            "with_winners": (h2h["median"].get("llmcore_tuned") or {}).get("tflops")}
    elif "forward" in noncausal.get("llmcore_triton_defaults", {}):
        out["attention_fwd_noncausal_tflops"] = {"bar": BARS["attention_fwd_noncausal_tflops"],
                                                 "value": noncausal["llmcore_triton_defaults"]["forward"]["tflops"],
                                                 "case": noncausal}
    for v in out.values():
        v["outputs_checked"] = _outputs_checked(v.pop("case"))
        v["met"] = v["value"] >= v["bar"] and v["outputs_checked"]
    return out


def _f(x, fmt="{:.0f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# llmcore GPU check: {env.get('device')}", "",
             f"torch {env.get('torch')}, Triton {env.get('triton')}, CUDA {env.get('cuda')}; "
             f"`triton.testing.do_bench` medians (p20-p80 in the JSON). Written by `benchmarks/gpu/bench.py` "
             f"(run by `benchmarks/gpu/run.sh`), {env.get('date')}.", ""]
    mm = results.get("matmul_bf16")
    peak = mm["tflops"] if mm else float("nan")
    if mm:
        lines += [f"bf16 matmul peak (8192^3 torch.matmul): **{peak:.0f} TFLOP/s**", ""]
    att = results.get("attention")
    if att and att.get("cases"):
        lines += [f"## Attention {tuple(att['shape'])} {att['dtype']} (TFLOP/s; % of the matmul peak)", "",
                  "`llmcore triton`: with the block sweep's winners where the sweep ran (below), else with the "
                  "defaults; `before sweep`: with the defaults the run started with.", "",
                  "| case | mode | llmcore triton | before sweep | best torch SDPA | vs SDPA |",
                  "|---|---|---|---|---|---|"]
        for cname, c in att["cases"].items():
            for mode in ("forward", "fwd_bwd"):
                if mode not in c.get("llmcore_triton", {}):
                    continue
                ours = c["llmcore_triton"][mode]["tflops"]
                before = c.get("llmcore_triton_defaults", {}).get(mode, {}).get("tflops")
                best = c.get("best_torch", {}).get(mode)
                theirs = c["torch_sdpa"][best][mode]["tflops"] if best else None
                lines.append(f"| {cname} | {mode} | {ours:.0f} ({100 * ours / peak:.0f}%) | {_f(before)} | "
                             f"{_f(theirs)} ({best}) | {_f(c.get('speedup_vs_best_torch', {}).get(mode), '{:.2f}x')} |")
        lines.append("")
        h2h_rows = []
        for cname, c in att["cases"].items():
            for mode, m in c.get("head_to_head", {}).get("modes", {}).items():
                med = m["median"]
                cells = []
                for who in ("llmcore_defaults", "llmcore_unfolded", "llmcore_tuned"):
                    r = m.get(f"{who}_vs_torch")
                    cells.append(f"{med[who]['tflops']:.0f} | {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
                                 if r else "- | -")
                torch_name = f"torch_{m['torch_backend']}"
                h2h_rows.append(f"| {cname} | {mode} | {' | '.join(cells)} | {med[torch_name]['tflops']:.0f} "
                                f"({m['torch_backend']}) |")
        if h2h_rows:
            rounds = next(c["head_to_head"]["rounds"] for c in att["cases"].values() if "head_to_head" in c)
            lines += ["### Head-to-head: alternating rounds (the bars' figures)", "",
                      f"{rounds} rounds; each round times every entrant once (rotating the order); TFLOP/s of the "
                      "median round; speed-up = median of the per-round ratios torch ms / llmcore ms (min-max).", "",
                      "`unfolded`: the defaults with the forward's scale not folded into the exponent's FMA "
                      "(`attention._FOLD_SCALE = False`, the code before that change).", "",
                      "| case | mode | llmcore defaults | vs torch | llmcore unfolded | vs torch | "
                      "llmcore with the winners | vs torch | torch |",
                      "|---|---|---|---|---|---|---|---|---|", *h2h_rows, ""]
        for cname, c in att["cases"].items():
            sw = c.get("sweep")
            if not sw:
                continue
            lines += [f"### Block sweep, {cname} (BLOCK_M, BLOCK_N, warps, stages): ms", ""]
            if "skipped" in sw or "candidates" not in sw:
                lines += [f"not run: {sw.get('skipped') or (sw.get('error') or '').strip().splitlines()[-1:]}", ""]
                continue
            for kind, rows in sw["candidates"].items():
                cells = []
                for r in rows:
                    tag = tuple(r["cfg"])
                    if "ms" in r:
                        spill = f", {r['spills']} B spilled" if r.get("spills") else ""
                        cells.append(f"{tag}: {r['ms']:.3f}{spill}")
                    else:
                        why = "skipped" if "skipped" in r else ("wrong" if "rejected" in r else "failed")
                        cells.append(f"{tag}: {why}")
                lines.append(f"- {kind}: " + "; ".join(cells))
            bw, plan = sw.get("backward_ms", {}), sw.get("plan", {})

            def kernels(m):
                return f" ({' + '.join(plan[m])})" if m in plan else ""
            lines += [f"- whole backward with the winners: dQ kernel{kernels('kernel')} "
                      f"{_f(bw.get('dq_kernel'), '{:.3f}')} ms, dQ by atomics {_f(bw.get('dq_atomic'), '{:.3f}')} ms, "
                      f"dQ by TMA reductions{kernels('tma')} {_f(bw.get('dq_tma'), '{:.3f}')} ms -> "
                      f"{sw.get('dq_mode', '-')}"]
            wc = c.get("winners_check")
            if wc:
                verdict = ("passed" if wc.get("ok") else "FAILED") if "ok" in wc else \
                    (wc.get("skipped") or "error (see the JSON)")
                lines.append(f"- the winners against float64 on ragged shapes (GQA L=1027, packed sequences): "
                             f"{verdict}")
            lines.append("")
    nm = results.get("norms")
    if nm and nm.get("cases"):
        lines += [f"## Norms with fused residual, {nm['dtype']} (GB/s)", "",
                  "| op | shape | mode | llmcore triton | torch | speed-up |", "|---|---|---|---|---|---|"]
        for cname, c in nm["cases"].items():
            for mode in ("forward", "fwd_bwd"):
                lines.append(f"| {cname} | {tuple(c['shape'])} | {mode} | {c['llmcore_triton'][mode]['gbps']:.0f} | "
                             f"{c['torch'][mode]['gbps']:.0f} | {c['speedup_vs_torch'][mode]:.2f}x |")
        lines.append("")
        for cname, c in nm["cases"].items():
            bl = c.get("bwd_launches")
            if not bl:
                continue
            timed = sorted((n for n, r in bl["launches"].items() if "speedup_vs_defaults" in r),
                           key=lambda n: -bl["launches"][n]["speedup_vs_defaults"]["median"])
            cells = []
            for n in timed[:5]:
                row, up = bl["launches"][n], bl["launches"][n]["speedup_vs_defaults"]
                cells.append(f"{n}: {up['median']:.2f}x ({up['min']:.2f}-{up['max']:.2f}), {row['gbps']:.0f} GB/s")
            failed = [n for n, r in bl["launches"].items() if "error" in r]
            lines += [f"{cname} backward launches against the defaults {bl['defaults']} "
                      f"({bl['defaults_fwd_bwd']['gbps']:.0f} GB/s fwd+bwd), fastest first, median of {bl['rounds']} "
                      f"alternating rounds (min-max): " + "; ".join(cells)
                      + (f"; failed: {', '.join(failed)}" if failed else ""), ""]
    ro = results.get("rotary")
    if ro and ro.get("llmcore_triton"):
        lines += [f"## RoPE on q {tuple(ro['shape'])} {ro['dtype']}, a slice of a fused qkv (GB/s)", "",
                  "| mode | llmcore triton | torch composite | speed-up |", "|---|---|---|---|"]
        for mode in ("forward", "fwd_bwd"):
            lines.append(f"| {mode} | {ro['llmcore_triton'][mode]['gbps']:.0f} | {ro['torch'][mode]['gbps']:.0f} | "
                         f"{ro['speedup_vs_torch'][mode]:.2f}x |")
        lines.append("")
    gq = results.get("attention_gqa")
    if gq and gq.get("llmcore_triton"):
        lines += [f"## GQA attention, causal, (B, Hq, Hkv, L, D) = {tuple(gq['shape'])} {gq['dtype']} (TFLOP/s)", "",
                  "| mode | llmcore triton | best torch SDPA | vs SDPA |", "|---|---|---|---|"]
        for mode in ("forward", "fwd_bwd"):
            best = gq.get("best_torch", {}).get(mode)
            theirs = gq["torch_sdpa"][best][mode]["tflops"] if best else None
            lines.append(f"| {mode} | {gq['llmcore_triton'][mode]['tflops']:.0f} | {_f(theirs)} ({best}) | "
                         f"{_f(gq.get('speedup_vs_best_torch', {}).get(mode), '{:.2f}x')} |")
        lines.append("")
        cells = [f"{tuple(r['cfg'])}: {r['fwd_bwd']['tflops']:.0f}" if "fwd_bwd" in r else f"{tuple(r['cfg'])}: failed"
                 for r in gq.get("dkdv_blocks", [])]
        if cells:
            lines += ["fwd_bwd TFLOP/s with other dK/dV blocks (no spills at GROUP 4): " + "; ".join(cells), ""]
    sm = results.get("attention_small")
    if sm and sm.get("cases"):
        lines += ["## Attention at fine-tuning shapes, through the public API (us per call)", "",
                  "llmcore `triton` (and `cuda` where built, for the cases without a mask) against torch SDPA "
                  f"with the backend torch picks; {sm['rounds']} alternating "
                  "rounds, speed-up = median of the per-round ratios torch / llmcore (min-max). At these sizes a "
                  "call's host time (Python, autograd, launches) can exceed its GPU time: `device us` is the "
                  "kernels' summed time per call (torch.profiler, 20 calls), llmcore triton / torch.", "",
                  "| case | (B, H, L, D) | mode | llmcore triton | speed-up | llmcore cuda | speed-up | torch SDPA | "
                  "device us |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for cname, c in sm["cases"].items():
            if "error" in c:
                lines.append(f"| {cname} | {tuple(c['shape'])} | failed: {c['error'].strip().splitlines()[-1]} "
                             "|||||||")
                continue
            for mode in ("forward", "fwd_bwd"):
                if mode not in c:
                    continue
                cells = []
                for who in ("llmcore_triton", "llmcore_cuda"):
                    up = c[mode]["speedup"].get(who)
                    cells.append(f"{c[mode]['us'][who]:.0f} | {up['median']:.2f}x ({up['min']:.2f}-{up['max']:.2f})"
                                 if up else "- | -")
                dev = c[mode].get("device_us") or {}
                dev_cell = (f"{dev['llmcore_triton']:.0f} / {dev['torch_sdpa']:.0f}"
                            if dev.get("llmcore_triton") is not None and dev.get("torch_sdpa") is not None else "-")
                lines.append(f"| {cname} | {tuple(c['shape'])} | {mode} | {' | '.join(cells)} | "
                             f"{c[mode]['us']['torch_sdpa']:.0f} | {dev_cell} |")
        lines.append("")
        notes = [f"- {cname} {mode}, {who}: " + "; ".join(f"{h['name']} {h['self_cpu_us']:.1f} (x{h['count']:g})"
                                                         for h in top[:6])
                 for cname, c in sm["cases"].items() for mode in ("forward", "fwd_bwd")
                 for who, top in (c.get(mode, {}).get("host_top") or {}).items()]
        if notes:
            lines += ["Where the host time goes: the ops and runtime calls with the most self CPU time, us per call "
                      "(calls per call), under torch.profiler:", ""] + notes + [""]
    hp = results.get("hf_patch")
    if hp and "speedup" in hp:
        up = hp["speedup"]
        lines += ["## transformers + llmcore.hf.patch: a training step (ms)", "",
                  f"{hp['model']} at distilbert-base-uncased's shape (random weights), batch {tuple(hp['shape'])}, "
                  "half the rows padded from the middle, bf16 autocast, fused AdamW; transformers' sdpa model and a "
                  f"copy after `llmcore.hf.patch` ({', '.join(f'{k} {v}' for k, v in hp['patched'].items() if v)}), "
                  f"{hp['rounds']} alternating rounds of "
                  f"{hp['steps_per_round']} steps; evaluation logits differ by at most "
                  f"{hp['max_abs_logit_diff_bf16']:.3g} (bf16).", "",
                  "| transformers | + llmcore.hf.patch | speed-up (min-max) |", "|---|---|---|",
                  f"| {hp['ms']['transformers']:.2f} | {hp['ms']['hf_patch']:.2f} | {up['median']:.2f}x "
                  f"({up['min']:.2f}-{up['max']:.2f}) |", ""]
    cu = results.get("cuda")
    if cu and cu.get("cases"):
        lines += ["## llmcore `cuda` backend (CUDA C++ FA2, mma.sync), same attention shape (TFLOP/s)", "",
                  "| case | mode | llmcore cuda | best torch SDPA | vs SDPA |", "|---|---|---|---|---|"]
        for c in cu["cases"]:
            for mode in ("forward", "fwd_bwd"):
                best = c.get(f"torch_best_{mode}")
                theirs = c["torch"][best][mode]["tflops"] if best else None
                lines.append(f"| {'causal' if c['causal'] else 'noncausal'} | {mode} | "
                             f"{c['llmcore'][mode]['tflops']:.0f} | {_f(theirs)} ({best}) | "
                             f"{_f(c.get(f'speedup_{mode}'), '{:.2f}x')} |")
        lines.append("")
    elif cu:
        lines += [f"## llmcore `cuda` backend: not measured ({cu.get('skipped', 'see the JSON')})", ""]
    ce = results.get("cross_entropy")
    if ce and "torch" in ce:
        s = ce["shape"]
        lines += [f"## LM-head cross-entropy fwd+bwd ({s['tokens']} tokens, hidden {s['hidden']}, vocab {s['vocab']}, "
                  f"{ce['dtype']})", "", "| implementation | ms | TFLOP/s | extra peak memory (MiB) |",
                  "|---|---|---|---|"]
        for name in [k for k in ce if k.startswith(("llmcore_", "torch")) and isinstance(ce[k], dict)]:
            t = ce[name]
            lines.append(f"| {name} | {t['ms']:.2f} | {t['tflops']:.0f} | {t['peak_extra_mib']:.0f} |")
        vs = (ce.get("chunk_rounds") or {}).get("speedup_vs_torch")
        if vs:
            rounds = ce["chunk_rounds"]["rounds"]
            lines += ["", f"(one call each above) llmcore vs torch in {rounds} alternating rounds of several calls: "
                      f"{vs['median']:.2f}x ({vs['min']:.2f}-{vs['max']:.2f})"]
        lines.append("")
    if results.get("bars"):
        lines += ["## Bars (the shipped defaults)", "",
                  "| bar | value | needed | met | outputs checked | with the winners | measured by |",
                  "|---|---|---|---|---|---|---|"]
        for name, b in results["bars"].items():
            lines.append(f"| {name} | {b['value']:.2f} | {b['bar']} | {'yes' if b['met'] else 'no'} | "
                         f"{'yes' if b.get('outputs_checked') else 'no'} | {_f(b.get('with_winners'), '{:.2f}')} | "
                         f"{b.get('from', 'the single timing')} |")
        lines.append("")
    if results.get("errors"):
        lines += ["## Errors", ""]
        for k, v in results["errors"].items():
            last = v.strip().splitlines()[-1] if v and v.strip() else v
            lines.append(f"- {k}: {last}")
        lines.append("")
    if results.get("seconds"):
        lines += ["Seconds per benchmark section: " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()),
                  ""]
    if results.get("run_sh"):
        lines += ["## Build and tests (run.sh, before the benchmarks)", "", "```"] + results["run_sh"] + ["```", ""]
    return "\n".join(lines) + "\n"


SECTIONS = (("matmul", matmul_peak), ("attention", attention), ("norms", norms), ("cuda", cuda_backend),
            ("cross_entropy", cross_entropy), ("attention_gqa", attention_gqa), ("norms_wide", norms_wide),
            ("attention_small", attention_small), ("rotary", rotary), ("hf_patch", hf_patch))
# Seconds each section took on the H200 (2026-12-04, gpu-nvidia-h200.json's "seconds"; hf_patch, cut there by the
# outer timeout, a guess): one that would end past the budget is skipped, not started to be killed mid-way
# (hf_patch started at 109 s of a 112 s budget). The attention sweep keeps to its own deadline (--reserve).
EXPECTED_S = {"matmul": 1, "attention": 30, "norms": 11, "cuda": 5, "cross_entropy": 16, "attention_gqa": 7,
              "norms_wide": 7, "attention_small": 19, "rotary": 1, "hf_patch": 40}


def main(argv=None) -> int:
    global DEVICE, SMOKE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for gpu-<device>.json and .md")
    p.add_argument("--autotune", action="store_true", help="LLMCORE_TRITON_AUTOTUNE=1 for the default timings")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later sections are skipped past it")
    p.add_argument("--reserve", type=float, default=60.0,
                   help="seconds of the budget the attention sweep leaves to the sections after it")
    p.add_argument("--no-sweep", action="store_true", help="no block sweep of the attention kernels")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: " + ",".join(n for n, _ in SECTIONS))
    p.add_argument("--warm-worker", metavar="I/N", help="only compile the I-th of N shares of the sweep's kernels")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    p.add_argument("--notes", help="a text file (run.sh's build and test summary) to copy into the JSON and Markdown")
    p.add_argument("--warm-logs", help="folder of the --warm-worker logs: candidates one died on are not tried")
    args = p.parse_args(argv)
    if args.smoke:
        SMOKE, DEVICE = True, "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    if args.warm_worker:
        return warm_worker(args.warm_worker)
    if args.autotune:
        os.environ["LLMCORE_TRITON_AUTOTUNE"] = "1"
    import triton

    name = "smoke-cpu" if SMOKE else torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    results = {"environment": {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                               "cuda": torch.version.cuda, "python": sys.version.split()[0],
                               "autotune": args.autotune, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
               "errors": {}, "seconds": {}}
    if args.notes and Path(args.notes).is_file():
        results["run_sh"] = Path(args.notes).read_text().splitlines()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"gpu-{slug}.json", out_dir / f"gpu-{slug}.md"
    start = time.time()

    def write(path: Path, text: str) -> None:  # whole or not at all: run.sh's timeout may land mid-write
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def save():
        results["bars"] = bars(results)
        write(json_path, json.dumps(results, indent=2, default=float) + "\n")
        try:
            write(md_path, markdown(results))
        except Exception:  # the JSON has everything; a table bug must not end the run
            results["errors"]["markdown"] = traceback.format_exc()
            write(json_path, json.dumps(results, indent=2, default=float) + "\n")

    ctx = {"save": save, "sweep": not args.no_sweep, "sweep_deadline": start + args.budget - args.reserve,
           "suspects": suspects(args.warm_logs)}
    if ctx["suspects"]:
        results["warm_up_suspects"] = ctx["suspects"]
    skip = set(filter(None, args.skip.split(",")))
    for section, fn in SECTIONS:
        if section in skip:
            continue
        expected = 0.0 if SMOKE else EXPECTED_S.get(section, 0)
        if time.time() - start + expected > args.budget:
            results["errors"][section] = (f"skipped: {time.time() - start:.0f} s of the {args.budget:.0f} s budget "
                                          f"spent, and it takes about {expected} s")
            save()
            continue
        t0 = time.time()
        try:
            fn(results, ctx)
        except Exception:
            results["errors"][section] = traceback.format_exc()
            print(results["errors"][section], file=sys.stderr)
        results["seconds"][section] = round(time.time() - t0, 1)
        save()
        print(f"[bench {time.time() - start:.0f}s] {section}: {results['seconds'][section]} s", flush=True)
    print(md_path.read_text())
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
