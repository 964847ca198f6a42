"""The warp-specialized attention kernels (llmcore/ops/triton/attention_ws_kernels.py) on a GPU: correctness
against float64, then time against llmcore's general kernels and torch SDPA, side by side.

    python benchmarks/gpu/ws_check.py --out benchmarks/results          # on an H100/H200, a few minutes
    TRITON_INTERPRET=1 python benchmarks/gpu/ws_check.py --smoke --out /tmp/ws   # tiny shapes, CPU

1. Correctness: out, dQ, dK, dV of LLMCORE_TRITON_WS=1 (the warp-specialized kernels) against a float64
   reference, beside the errors of LLMCORE_TRITON_WS=0 (the general kernels) and of torch's own SDPA in the
   same dtype; a case passes where each error is at most twice the larger of those two.
2. Blocks: each candidate of ``_WS_TABLES`` timed alone at the bar shape (forward; backward with a retained
   graph), the fastest kept for step 3.
3. Head to head: torch SDPA (cuDNN and flash backends), llmcore general, llmcore warp-specialized, in
   alternating rounds (``triton.testing.do_bench`` each); speed-up = median of the per-round ratios.

Writes gpu-<device>-ws.json and .md to --out, with what to adopt (``proposals``). Each unit (a correctness case,
a sweep, a head-to-head) runs in a process of its own with a timeout, so a kernel that hangs the GPU costs that
unit only (the first, single-process version of this script lost its whole run to the hang of 2026-12-04). A
correctness unit prints when its warp-specialized forward and backward have finished; where one hangs, the later
units run the part that hung (the backward's two kernels, or else the forward) on the general kernels, so that a
hang still leaves the other part's figures.

On the GPU machine (no network, nothing installed; llmcore's module built without CUDA sources, which the
Triton kernels do not need; carry build-gpu-tables, see run.sh):

    B=build/ws; mkdir -p $B/generated && cp build-gpu-tables/unicode_tables.inc $B/generated/ &&
    cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(command -v python3) \
      -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) -DLLMCORE_CUDA=OFF && cmake --build $B -j16 &&
    cp $B/_C*.so llmcore/ && python3 benchmarks/gpu/ws_check.py --out $OUT --budget 330

(the build took about 20 s there, 2026-12-04: 523 s in all, of which 500 s the hung check's timeout).
The same call can go on to the fine-tuning shapes, where llmcore lost to torch 3-5x (host time; run 2026-12-04),
with their device time and host profile (bench.py's attention_small, then the hf.patch training step):

    ... && python3 benchmarks/gpu/ws_check.py --out $OUT --budget 300; python3 benchmarks/gpu/bench.py \
      --out $OUT --budget 120 --no-sweep \
      --skip matmul,attention,norms,cuda,cross_entropy,attention_gqa,norms_wide,rotary
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import llmcore  # noqa: E402
from llmcore.ops.triton import attention as A  # noqa: E402

START = time.time()


def bench_ms(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # (its default: the mean)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


class ws:
    """LLMCORE_TRITON_WS set to ``value`` for the duration."""

    def __init__(self, value: str):
        self.value = value

    def __enter__(self):
        self.old = os.environ.get("LLMCORE_TRITON_WS")
        os.environ["LLMCORE_TRITON_WS"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("LLMCORE_TRITON_WS", None)
        else:
            os.environ["LLMCORE_TRITON_WS"] = self.old


def inputs(b, h, hk, length, d, dtype, layout, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def one(heads):
        if layout == "bhld":
            t = torch.randn(b, heads, length, d, generator=g, dtype=torch.float32)
        else:  # transformers' (B, L, H, D), transposed
            t = torch.randn(b, length, heads, d, generator=g, dtype=torch.float32).transpose(1, 2)
        return t.to(device=device, dtype=dtype).requires_grad_()

    return one(h), one(hk), one(hk)


def llmcore_call(q, k, v, causal):
    return llmcore.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1],
                                                backend="triton")


def torch_call(q, k, v, causal, backend=None):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def grads(fn, q, k, v, g, marks: bool = False):
    """out, dq, dk, dv of ``fn``. ``marks``: the forward and the backward each finished (synchronized) and said so
    on stdout, so that a unit that hangs shows which of them did (main narrows the warp-specialized kinds then)."""
    out = fn(q, k, v)
    if marks:
        _synchronize()
        print(FORWARD_DONE, flush=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    if marks:
        _synchronize()
        print(BACKWARD_DONE, flush=True)
    return out, dq, dk, dv


FORWARD_DONE, BACKWARD_DONE = "ws forward done", "ws backward done"


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _correctness_cases() -> list[dict]:
    cases = []
    # non-causal D 128 first: the simplest of the kernels, so that a failure of all of them shows there
    for d in (128, 64):
        for causal in (False, True):
            for layout in ("bhld", "blhd"):
                cases.append(dict(b=2, h=4, hk=4, d=d, dtype=torch.bfloat16, layout=layout, causal=causal))
    cases.append(dict(b=2, h=4, hk=4, d=128, dtype=torch.float16, layout="bhld", causal=True))
    # GQA: the forward is warp-specialized, the backward falls back to the general kernels on its logsumexp
    cases.append(dict(b=2, h=8, hk=2, d=128, dtype=torch.bfloat16, layout="bhld", causal=True))
    return cases


CORRECTNESS_CASES = _correctness_cases()


def correctness(device, smoke: bool, only: int) -> list[dict]:
    rows = []
    for c in CORRECTNESS_CASES[only:only + 1]:
        c = dict(c, length=48 if smoke else 1024)
        q, k, v = inputs(c["b"], c["h"], c["hk"], c["length"], c["d"], c["dtype"], c["layout"], device)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=q.dtype)
        causal = c["causal"]
        r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = grads(lambda a, b_, c_: torch_call(a, b_, c_, causal), *r64, g.double())
        got = {}
        for name, fn in (("ws", lambda a, b_, c_: llmcore_call(a, b_, c_, causal)),
                         ("general", lambda a, b_, c_: llmcore_call(a, b_, c_, causal)),
                         ("torch", lambda a, b_, c_: torch_call(a, b_, c_, causal))):
            calls = []
            fwd, bwd = A._forward_ws, A._backward_ws
            A._forward_ws = lambda *a, **kw: (calls.append("fwd"), fwd(*a, **kw))[1]
            A._backward_ws = lambda *a, **kw: (calls.append("bwd"), bwd(*a, **kw))[1]
            try:
                with ws("1" if name == "ws" else "0"):
                    res = grads(fn, q, k, v, g, marks=name == "ws")
            finally:
                A._forward_ws, A._backward_ws = fwd, bwd
            got[name] = ([(x.double() - y).abs().max().item() for x, y in zip(res, ref)], calls)
        errs = {n: e for n, (e, _) in got.items()}
        ok = all(errs["ws"][i] <= 2 * max(errs["general"][i], errs["torch"][i]) for i in range(4))
        rows.append(dict(case={k_: (str(v_) if k_ == "dtype" else v_) for k_, v_ in c.items()}, errors=errs,
                         ws_kernels=got["ws"][1], ok=ok))
        print("correctness", rows[-1], flush=True)
    return rows


def flops(b, h, length, d, causal, mode):
    f = 4.0 * b * h * length * length * d / (2 if causal else 1)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def sweep(q, k, v, causal, budget) -> dict:
    """Each _WS_TABLES candidate alone: the forward's, then (dQ, dK/dV) pairs on the backward of one forward."""
    d = q.shape[-1]
    out = {"fwd": [], "bwd": []}
    with ws("1"):
        for cfg in A._WS_TABLES["fwd"][d] if "fwd" in A._WS_KINDS else ():  # (a kind dropped after a hang: none)
            if time.time() - START > budget:
                break
            A._WS_OVERRIDE.clear()
            A._WS_OVERRIDE["fwd"] = cfg
            with torch.no_grad():
                ms = bench_ms(lambda: llmcore_call(q, k, v, causal))
            out["fwd"].append(dict(cfg=cfg, ms=ms))
            print("sweep fwd", causal, cfg, ms, flush=True)
        A._WS_OVERRIDE.clear()
        o = llmcore_call(q, k, v, causal)
        g = torch.randn_like(o)
        for cq in A._WS_TABLES["dq"][d] if {"dq", "dkdv"} <= set(A._WS_KINDS) else ():
            for ckv in A._WS_TABLES["dkdv"][d]:
                if time.time() - START > budget:
                    break
                A._WS_OVERRIDE.clear()
                A._WS_OVERRIDE.update(dq=cq, dkdv=ckv)
                ms = bench_ms(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
                out["bwd"].append(dict(dq=cq, dkdv=ckv, ms=ms))
                print("sweep bwd", causal, cq, ckv, ms, flush=True)
    A._WS_OVERRIDE.clear()
    return out


def head_to_head(q, k, v, causal, best: dict, rounds: int) -> dict:
    from torch.nn.attention import SDPBackend

    g = torch.randn_like(q)
    cands = {
        "torch_cudnn": (lambda: torch_call(q, k, v, causal, SDPBackend.CUDNN_ATTENTION), "0"),
        "torch_flash": (lambda: torch_call(q, k, v, causal, SDPBackend.FLASH_ATTENTION), "0"),
        "llmcore_general": (lambda: llmcore_call(q, k, v, causal), "0"),
        "llmcore_ws": (lambda: llmcore_call(q, k, v, causal), "1"),
    }
    res = {}
    for mode in ("fwd", "fwd_bwd"):
        times = {n: [] for n in cands}
        for _ in range(rounds):
            for name, (fn, flag) in cands.items():
                A._WS_OVERRIDE.clear()
                if flag == "1":
                    A._WS_OVERRIDE.update(best)
                def step(fn=fn):
                    out = fn()
                    torch.autograd.grad(out, (q, k, v), g)

                with ws(flag):
                    try:
                        if mode == "fwd":
                            with torch.no_grad():
                                ms = bench_ms(fn)
                        else:
                            ms = bench_ms(step)
                    except RuntimeError as e:  # a torch backend that refuses this case
                        print("skip", name, mode, str(e)[:100], flush=True)
                        ms = float("nan")
                times[name].append(ms)
        A._WS_OVERRIDE.clear()
        b, h, length, d = q.shape
        fl = flops(b, h, length, d, causal, mode)
        row = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            row[name] = dict(ms=ts, median_ms=med, tflops=fl / med / 1e9 if med == med else None)
        ref = "torch_cudnn"
        for name in ("llmcore_general", "llmcore_ws"):
            ratios = [a / b_ for a, b_ in zip(times[ref], times[name])]
            row[name]["vs_cudnn"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
            # (torch's best of the two that ran: min(nan, x) is nan, but min(x, nan) is x)
            ratios = [min((t for t in (a, c) if t == t), default=math.nan) / b_
                      for a, c, b_ in zip(times[ref], times["torch_flash"], times[name])]
            row[name]["vs_torch_best"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
        ratios = [a / b_ for a, b_ in zip(times["llmcore_general"], times["llmcore_ws"])]
        row["ws_vs_general"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
        res[mode] = row
        print("h2h", tuple(q.shape), causal, mode, json.dumps({n: (r["median_ms"], r.get("vs_cudnn"))
                                                              for n, r in row.items() if n != "ws_vs_general"}),
              "ws/general", row["ws_vs_general"], flush=True)
    return res


def markdown(result: dict) -> str:
    lines = [f"# Warp-specialized attention kernels on {result['device']}", "",
             f"{result['versions']}", "",
             "Made by `python benchmarks/gpu/ws_check.py` (see its docstring); each figure measured in this run.",
             "", "## Correctness (max abs error against float64: out, dQ, dK, dV)", "",
             "| case | warp-specialized | general kernels | torch | kernels run | ok |", "|---|---|---|---|---|---|"]
    fmt = lambda e: ", ".join(f"{x:.2e}" for x in e)  # noqa: E731
    for r in result["correctness"]:
        c = r["case"]
        name = f"{c['dtype'].replace('torch.', '')} ({c['b']}, {c['h']}/{c['hk']}, {c['length']}, {c['d']}) " \
               f"{c['layout']} {'causal' if c['causal'] else 'non-causal'}"
        lines.append(f"| {name} | {fmt(r['errors']['ws'])} | {fmt(r['errors']['general'])} | "
                     f"{fmt(r['errors']['torch'])} | {'+'.join(r['ws_kernels']) or 'none'} | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    for key, shape in result.get("sweeps", {}).items():
        lines += ["", f"## Blocks, {key} (ms, do_bench median)", ""]
        for r in shape["fwd"]:
            lines.append(f"- forward {tuple(r['cfg'])}: {r['ms']:.3f}")
        for r in shape["bwd"]:
            lines.append(f"- backward dQ {tuple(r['dq'])}, dK/dV {tuple(r['dkdv'])}: {r['ms']:.3f}")
    for r in result.get("ws_kinds_dropped", []):
        lines += ["", f"**After a hang in {json.dumps(r['unit'])}, the later units ran {', '.join(r['dropped'])} on "
                  "the general kernels.**"]
    for key, res in result.get("head_to_head", {}).items():
        kinds = result.get("head_to_head_ws_kinds", {}).get(key, list(A._WS_KINDS))
        lines += ["", f"## Head to head, {key}", "", f"Warp-specialized kernels in `llmcore WS`: {', '.join(kinds)}.",
                  "",
                  "| mode | candidate | median ms (rounds) | TFLOP/s | vs cuDNN (min-max) | vs torch's best |",
                  "|---|---|---|---|---|---|"]
        for mode, row in res.items():
            for name, r in row.items():
                if name == "ws_vs_general":
                    continue
                vs = r.get("vs_cudnn")
                vb = r.get("vs_torch_best")
                lines.append(f"| {mode} | {name} | {r['median_ms']:.3f} ({', '.join(f'{x:.3f}' for x in r['ms'])})"
                             f" | {r['tflops'] or float('nan'):.0f} | "
                             + (f"{vs['median']:.3f}x ({vs['min']:.3f}-{vs['max']:.3f})" if vs else "-") + " | "
                             + (f"{vb['median']:.3f}x" if vb else "-") + " |")
            w = row["ws_vs_general"]
            lines.append(f"| {mode} | warp-specialized / general | | | {w['median']:.3f}x ({w['min']:.3f}-"
                         f"{w['max']:.3f}) | |")
    if result.get("failed"):
        lines += ["", "## Units that gave no result", ""]
        lines += [f"- {json.dumps(r['unit'])}: {r['error']}" for r in result["failed"]]
    lines += ["", "## Proposals", ""] + (proposals(result) or ["- none"])
    lines += ["", f"Wall time: {result['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def proposals(result: dict) -> list[str]:
    """What to adopt: the warp-specialized kernels by default (_WS_MEASURED) where every correctness case passed and
    they were faster than the general kernels in every round, forward and fwd+bwd; their blocks where the sweep's
    best is not the table's first row."""
    out = []
    if not result["correctness"] or not all(r["ok"] for r in result["correctness"]) or result.get("failed"):
        return ["- none: a correctness case failed or a unit gave no result"]
    for key, res in result.get("head_to_head", {}).items():
        if "table defaults" in key:
            continue
        causal = "non-causal" not in key
        d = result.get("head_dim", {}).get(key, 128)
        wins = all(res[mode]["ws_vs_general"]["min"] > 1.0 for mode in ("fwd", "fwd_bwd"))
        w = {mode: res[mode]["ws_vs_general"]["median"] for mode in ("fwd", "fwd_bwd")}
        verdict = f"_WS_MEASURED[({d}, {causal})] = True" if wins else "keep the general kernels"
        out.append(f"- {key}: {verdict} (warp-specialized / general: forward {w['fwd']:.3f}x, fwd+bwd "
                   f"{w['fwd_bwd']:.3f}x, medians of the rounds)")
        best = result.get("best", {}).get(key, {})
        for kind, cfg in best.items():
            if tuple(cfg) != tuple(A._WS_TABLES[kind][d][0]):
                out.append(f"  - {kind}: blocks {tuple(cfg)} first in _WS_TABLES[{kind!r}][{d}] (the sweep's best)")
    return out


def narrowed(kinds: list, failed: dict) -> list:
    """The warp-specialized kinds to drop after a correctness unit hung: the backward's where its log says the
    forward finished, else the forward's (its backward then runs on the general forward's output)."""
    if failed["unit"].get("kind") != "correct" or "hung" not in failed["error"]:
        return []
    hung = ["dq", "dkdv"] if FORWARD_DONE in failed.get("log", "") else ["fwd"]
    return [k for k in hung if k in kinds]


def run_unit(unit: dict, args) -> dict:
    """One unit of work in a process of its own, so a kernel that hangs the GPU costs its timeout, not the run."""
    import subprocess

    cmd = [sys.executable, __file__, "--out", args.out, "--unit", json.dumps(unit)] + (["--smoke"] if args.smoke
                                                                                        else [])
    t = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.unit_timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out, flush=True)
        return dict(unit=unit, error=f"no result in {args.unit_timeout} s (hung?)", log=out[-2000:])
    print(done.stdout, flush=True)
    for line in done.stdout.splitlines():
        if line.startswith("UNIT "):
            return json.loads(line[5:])
    return dict(unit=unit, error=f"exit {done.returncode} after {time.time() - t:.0f} s", log=done.stderr[-3000:])


def unit_main(unit: dict, smoke: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    A._WS_KINDS = tuple(unit.get("ws_kinds", A._WS_KINDS))
    if unit["kind"] == "correct":
        return dict(rows=correctness(device, smoke, only=unit["case"]))
    shape = tuple(unit["shape"])
    q, k, v = inputs(shape[0], shape[1], shape[1], shape[2], shape[3], torch.bfloat16, "bhld", device)
    if unit["kind"] == "sweep":
        return sweep(q, k, v, unit["causal"], 1e9)
    best = {kind: tuple(cfg) for kind, cfg in unit["best"].items()}
    return head_to_head(q, k, v, unit["causal"], best, unit["rounds"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds: later units are skipped past it")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--unit-timeout", type=float, default=150.0,
                    help="seconds for one unit, its compiles included: past it the unit counts as hung (after two "
                         "hung units the rest are skipped)")
    ap.add_argument("--unit", help="(internal) one unit of work, as JSON; prints its result")
    a = ap.parse_args()
    if a.unit:
        print("UNIT " + json.dumps(unit_main(json.loads(a.unit), a.smoke)), flush=True)
        return 0
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    result = dict(device=name, versions=f"torch {torch.__version__}, Triton {triton.__version__}, "
                                        f"CUDA {torch.version.cuda}", correctness=[], sweeps={}, head_to_head={},
                  failed=[])
    slug = "gpu-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-") + "-ws"

    def save():
        result["wall_s"] = time.time() - START
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, slug + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(a.out, slug + ".md"), "w") as f:
            f.write(markdown(result))

    kinds = list(A._WS_KINDS)  # the kinds run warp-specialized: a hang drops the one that hung from the rest

    def unit(u):
        hung = sum("hung" in f["error"] for f in result["failed"])
        if time.time() - START > a.budget or hung >= 2 or not kinds:
            why = ("past the budget" if time.time() - START > a.budget else "no warp-specialized kernel left"
                   if not kinds else "two units hung already")
            result["failed"].append(dict(unit=u, error=f"skipped: {why}"))
            return None
        u = dict(u, ws_kinds=list(kinds))
        r = run_unit(u, a)
        if "error" in r:
            result["failed"].append(r)
            dropped = narrowed(kinds, r)
            if dropped:
                result.setdefault("ws_kinds_dropped", []).append(dict(unit=u, dropped=dropped))
                kinds[:] = [k_ for k_ in kinds if k_ not in dropped]
            save()
            return None
        return r

    for i in range(len(CORRECTNESS_CASES)):
        r = unit(dict(kind="correct", case=i))
        if r is not None:
            result["correctness"] += r["rows"]
        save()
    shapes = [(1, 2, 64, 64)] if a.smoke else [(4, 32, 4096, 128)]
    extra = [] if a.smoke else [(8, 16, 2048, 64), (2, 16, 8192, 128)]
    for causal in (True, False):
        for shape in shapes:
            key = f"{shape} bf16 {'causal' if causal else 'non-causal'}"
            sw = unit(dict(kind="sweep", shape=shape, causal=causal)) or {"fwd": [], "bwd": []}
            result["sweeps"][key] = sw
            best = {}
            if sw["fwd"]:
                best["fwd"] = min(sw["fwd"], key=lambda r: r["ms"])["cfg"]
            if sw["bwd"]:
                b = min(sw["bwd"], key=lambda r: r["ms"])
                best.update(dq=b["dq"], dkdv=b["dkdv"])
            result.setdefault("best", {})[key] = best
            result.setdefault("head_dim", {})[key] = shape[3]
            save()
            h = unit(dict(kind="h2h", shape=shape, causal=causal, best=best, rounds=a.rounds))
            if h is not None:
                result["head_to_head"][key] = h
                result.setdefault("head_to_head_ws_kinds", {})[key] = list(kinds)
            save()
    for shape in extra:
        key = f"{shape} bf16 causal (table defaults)"
        h = unit(dict(kind="h2h", shape=shape, causal=True, best={}, rounds=3))
        if h is not None:
            result["head_to_head"][key] = h
        save()
    print("wall", time.time() - START)
    return 0 if not result["failed"] and all(r["ok"] for r in result["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
