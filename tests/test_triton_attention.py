"""The Triton attention kernels (backend="triton") against the float64 reference.

Without a GPU they run on CPU tensors in Triton's interpreter, at small shapes that still
cross several 16 x 16 blocks, ragged tails and causal diagonals. With a GPU the same tests
run on CUDA tensors at full shapes, compiled.

How the interpreter is switched on: ``@triton.jit`` reads TRITON_INTERPRET when a kernel
module is executed, so setting it "early enough" depends on what pytest imported first.
llmcore avoids the question: ``llmcore.ops.triton._loader`` executes each kernel module
once per mode (interpreted for CPU tensors, compiled for CUDA ones), whenever it is first
needed. TRITON_INTERPRET=1 then only has to be set while a test runs, to allow CPU
tensors; the autouse fixture below does that with monkeypatch, so it never leaks into
other test files.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from attention_checks import assert_close_to_ref, cu, padded_sdpa
from aten_trace import zero_fills

import llmcore
from llmcore import _C
from llmcore.ops import triton as triton_ops
from llmcore.ops.reference import sdpa_reference, varlen_reference

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

pytestmark = pytest.mark.skipif(not triton_ops.installed(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        fp32_dots_round_once(monkeypatch)


def fp32_dots_round_once(monkeypatch):
    """Makes the interpreter's float32 tl.dot exact up to one rounding, on any CPU.

    The interpreter computes tl.dot with numpy's matmul, and numpy's BLAS picks its kernel, and
    with it the summation order and the float32 rounding, by CPU. With it, this file's fp32 dk/dv
    errors on an AMD EPYC (OpenBLAS's Haswell kernel) were 0.5-1.3 of the bound over 8 seeds of
    test_sdpa_strided_inputs_batch_dims_and_value_dim's shapes, and 0.2-0.5 with dots summed in
    float64 and rounded once: the excess was numpy's, not the kernel's. So here float32 dots (the
    accumulator added before the one rounding) measure the kernels' own arithmetic: their block
    structure, scales, masks and casts; bf16/fp16 dots are left as the interpreter does them. On a
    GPU these tests run the hardware's dots unchanged.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    dot = getattr(builder, "create_dot", None)
    if dot is None:  # a Triton whose interpreter is laid out differently: leave its dot as it is
        return

    def create_dot(self, a, b, d, *args, **kwargs):
        if not all(t.data.dtype == np.float32 for t in (a, b, d)):
            return dot(self, a, b, d, *args, **kwargs)
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data
        return interpreter.TensorHandle(exact.astype(np.float32), d.dtype.scalar)

    monkeypatch.setattr(builder, "create_dot", create_dot)


def size(cpu: int, gpu: int) -> int:
    return gpu if GPU else cpu


def run(fn, inputs, grad, dtype, **kwargs):
    """fn on copies of inputs (float64, CPU) cast to dtype on DEVICE; [out, *grads] in float64 on the CPU."""
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(DEVICE, dtype))
    return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves]


def reference(fn, inputs, grad, **kwargs):
    """The float64 truth, on DEVICE (float64 matmuls are fast enough on a GPU too)."""
    return run(fn, inputs, grad, torch.float64, **kwargs)


def no_nan(results):
    """torch's kernels may return NaN for rows that see no key; llmcore (and torch 2.13 on the CPU) return 0."""
    return [torch.nan_to_num(t, nan=0.0) for t in results]


def check(ours, theirs, ref, dtype, names=("out", "dq", "dk", "dv")):
    for name, a, b, r in zip(names, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def triton_sdpa(q, k, v, **kw):
    return llmcore.scaled_dot_product_attention(q, k, v, backend="triton", **kw)


def torch_sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


# --- dense attention: head dims, dtypes, causal, GQA, Lq != Lk ----------------------------

CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, dtype, causal)
    (2, 2, 2, 37, 37, 16, torch.float32, True),
    (1, 4, 2, 45, 45, 48, torch.bfloat16, True),     # GQA 2:1
    (2, 2, 2, 33, 50, 80, torch.float16, False),     # Lq < Lk
    (1, 3, 1, 50, 29, 96, torch.bfloat16, True),     # MQA; Lq > Lk: top-left rows past Lk see all keys
    (1, 2, 2, 40, 21, 128, torch.float32, True),
    (1, 2, 1, 24, 40, 128, torch.bfloat16, False),
]
GPU_ONLY = [(2, 4, 2, 300, 300, 256, torch.bfloat16, True), (1, 2, 2, 257, 1025, 59, torch.float16, True)]


@pytest.mark.parametrize("B, hq, hkv, lq, lk, d, dtype, causal", CASES + (GPU_ONLY if GPU else []))
def test_sdpa_matches_reference(B, hq, hkv, lq, lk, d, dtype, causal):
    if GPU:
        lq, lk = lq * 8 + 3, lk * 8 + 3
    check_dense_case(B, hq, hkv, lq, lk, d, dtype, causal)


def check_dense_case(B, hq, hkv, lq, lk, d, dtype, causal):
    """Triton SDPA forward + backward on seeded (B, H, L, D) inputs against torch SDPA and the
    float64 reference."""
    q, k, v, g = randn(B, hq, lq, d, seed=1), randn(B, hkv, lk, d, seed=2), randn(B, hkv, lk, d, seed=3), \
        randn(B, hq, lq, d, seed=4)
    kw = dict(is_causal=causal, enable_gqa=hq != hkv)
    ref = reference(torch_sdpa, (q, k, v), g, **kw)
    theirs = run(torch_sdpa, (q, k, v), g, dtype, **kw)
    ours = run(triton_sdpa, (q, k, v), g, dtype, **kw)
    check(ours, theirs, ref, dtype)


@pytest.fixture
def ws_spy(monkeypatch):
    """LLMCORE_TRITON_WS=1, and the warp-specialized launches made: a list of "fwd" and "bwd"."""
    from llmcore.ops.triton import attention

    monkeypatch.setenv("LLMCORE_TRITON_WS", "1")
    calls = []
    for name, tag in (("_forward_ws", "fwd"), ("_backward_ws", "bwd")):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _tag=tag, **kw: (calls.append(_tag),
                                                                                      _real(*a, **kw))[1])
    return calls


WS_LEN = 384 if GPU else 48  # a multiple of the blocks: 128 on the GPU, the interpreter's 16 here


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_warp_specialized_kernels_match_reference(ws_spy, d, causal, layout, dtype):
    # The dense case the warp-specialized kernels take (attention_ws_kernels): contiguous (B, H, L, D) and
    # transformers' (B, L, H, D) transposed, whose heads are columns of one row matrix
    shape = (2, 3, WS_LEN, d) if layout == "bhld" else (2, WS_LEN, 3, d)
    q, k, v, g = (randn(*shape, seed=s) for s in (11, 12, 13, 14))
    if layout == "blhd":
        q, k, v, g = (t.transpose(1, 2) for t in (q, k, v, g))
    ref = reference(torch_sdpa, (q, k, v), g, is_causal=causal)
    theirs = run(torch_sdpa, (q, k, v), g, dtype, is_causal=causal)
    ours = run(triton_sdpa, (q, k, v), g, dtype, is_causal=causal)
    assert ws_spy == ["fwd", "bwd"]
    check(ours, theirs, ref, dtype)


@pytest.mark.parametrize("case, used", [
    ("gqa", ["fwd"]),  # the backward takes the general kernels, on the warp-specialized forward's logsumexp
    ("ragged", []), ("mask", []), ("float32", []), ("lq_ne_lk", []), ("d80", [])])
def test_warp_specialized_kernels_only_where_they_apply(ws_spy, case, used):
    hq, hkv, lq, lk, d, dtype, kw = 4, 4, WS_LEN, WS_LEN, 64, torch.bfloat16, dict(is_causal=True)
    if case == "gqa":
        hkv, kw = 2, dict(is_causal=True, enable_gqa=True)
    elif case == "ragged":
        lq = lk = WS_LEN + 5
    elif case == "mask":
        kw = dict(attn_mask=torch.rand(lq, lk, generator=torch.Generator().manual_seed(3)) > 0.2)
    elif case == "float32":
        dtype = torch.float32
    elif case == "lq_ne_lk":
        lk, kw = WS_LEN * 2, {}
    elif case == "d80":
        d = 80
    q, k, v, g = randn(2, hq, lq, d, seed=1), randn(2, hkv, lk, d, seed=2), randn(2, hkv, lk, d, seed=3), \
        randn(2, hq, lq, d, seed=4)
    if "attn_mask" in kw:
        kw["attn_mask"] = kw["attn_mask"].to(DEVICE)
    ref = reference(torch_sdpa, (q, k, v), g, **kw)
    theirs = run(torch_sdpa, (q, k, v), g, dtype, **kw)
    ours = run(triton_sdpa, (q, k, v), g, dtype, **kw)
    assert ws_spy == used
    check(ours, theirs, ref, dtype)


def test_warp_specialized_setting_is_checked(monkeypatch):
    monkeypatch.setenv("LLMCORE_TRITON_WS", "yes")
    q = torch.randn(1, 2, 32, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="LLMCORE_TRITON_WS must be '0' or '1'"):
        triton_sdpa(q, q, q)


def test_sdpa_strided_inputs_batch_dims_and_value_dim():
    # (B, L, H, D) memory seen as (B, H, L, D), extra leading dims, Ev != E, a custom scale
    q = randn(2, 3, 40, 2, 32, seed=5).transpose(2, 3)
    k = randn(2, 3, 30, 2, 32, seed=6).transpose(2, 3)
    v = randn(1, 1, 2, 30, 24, seed=7)
    g = randn(2, 3, 2, 40, 24, seed=8)
    kw = dict(scale=0.3)
    ref = reference(sdpa_reference, (q, k, v), g, **kw)
    theirs = run(torch_sdpa, (q, k, v), g, torch.float32, **kw)
    ours = run(triton_sdpa, (q, k, v), g, torch.float32, **kw)
    check(ours, theirs, ref, torch.float32)


@pytest.mark.parametrize("scale", [-0.2, 0.0, 1.7])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_any_scale(scale, causal):
    # Unmasked blocks take the row max before scaling, which only a positive scale allows; zero and negative
    # scales (legal in torch's SDPA) take the general path. 1.7: large logits, the max matters. The comparator is
    # torch's math backend: torch 2.13's fused CPU kernel returns NaN for causal with a scale <= 0.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, L, D = 1, 2, size(40, 300), 32
    q, k, v, g = (randn(B, H, L, D, seed=s) for s in (31, 32, 33, 34))
    kw = dict(scale=scale, is_causal=causal)
    ref = reference(sdpa_reference, (q, k, v), g, **kw)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = run(torch_sdpa, (q, k, v), g, torch.bfloat16, **kw)
    ours = run(triton_sdpa, (q, k, v), g, torch.bfloat16, **kw)
    check(ours, theirs, ref, torch.bfloat16)


# --- the backward's ways to dQ: its own kernel, or atomics in the dK/dV kernel (per element, or a TMA reduction
# per tile, which the interpreter emulates through the same descriptor) ----------------------------------------

TMA = pytest.param("tma", marks=pytest.mark.skipif(GPU and torch.cuda.get_device_capability()[0] < 9,
                                                   reason="TMA needs a GPU of compute capability 9.0 or newer"))

DQ_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, dtype, causal); on the GPU Lq and Lk are 8x
    (2, 4, 2, 48, 48, 64, torch.bfloat16, True),    # Lq a multiple of the query block: no row masks (EVEN_M)
    (1, 2, 2, 64, 40, 128, torch.bfloat16, False),  # EVEN_M, ragged keys
    (1, 2, 2, 33, 50, 80, torch.float16, False),    # ragged rows, head dim below its block
    (1, 3, 1, 50, 29, 32, torch.float32, True),     # MQA; Lq > Lk
]


@pytest.mark.parametrize("mode", ["atomic", TMA, "kernel"])
@pytest.mark.parametrize("B, hq, hkv, lq, lk, d, dtype, causal", DQ_CASES)
def test_dq_modes_match_reference(monkeypatch, mode, B, hq, hkv, lq, lk, d, dtype, causal):
    monkeypatch.setenv("LLMCORE_TRITON_DQ", mode)
    if GPU:
        lq, lk = lq * 8, lk * 8
    check_dense_case(B, hq, hkv, lq, lk, d, dtype, causal)


@pytest.mark.parametrize("mode", ["atomic", TMA])
@pytest.mark.parametrize("case", ["packed", "dropout", "mask"])
def test_dq_atomic_with_packed_dropout_and_masks(monkeypatch, mode, case):
    monkeypatch.setenv("LLMCORE_TRITON_DQ", mode)
    if case == "packed":
        test_varlen_ragged(*VARLEN[2])  # bottom-right causal with dead rows, GQA
    elif case == "dropout":
        test_dropout_uses_the_cpu_backends_mask(0.2)
    else:
        test_key_padding_mask("additive", torch.bfloat16)


def test_dq_mode_is_checked(monkeypatch):
    monkeypatch.setenv("LLMCORE_TRITON_DQ", "fast")
    q = torch.randn(1, 1, 4, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="LLMCORE_TRITON_DQ"):
        triton_sdpa(q, q, q).sum().backward()


def test_dq_by_tma_is_refused_before_hopper(monkeypatch):
    from llmcore.ops.triton import attention

    q = torch.randn(1, 1, 4, 16)
    p = attention._Problem(q, q, q, None, None, None, 4, 4, 0.0, False, 0.25)
    monkeypatch.setenv("LLMCORE_TRITON_DQ", "tma")
    monkeypatch.setattr(attention, "_capability", lambda device: 80)
    with pytest.raises(ValueError, match="compute capability 9.0 or newer; this one is 8.0"):
        attention._dq_mode(p, False, q.device)
    assert attention._dq_mode(p, True, q.device) == "tma"  # the interpreter emulates it
    monkeypatch.setattr(attention, "_capability", lambda device: 90)
    assert attention._dq_mode(p, False, q.device) == "tma"


@pytest.mark.parametrize("mode, dtype, delta_kernels", [("kernel", torch.float16, 0), ("kernel", torch.float32, 1),
                                                         ("atomic", torch.float16, 1)])
def test_delta_by_the_dq_kernel_when_there_is_one(monkeypatch, mode, dtype, delta_kernels):
    # dQ by its own kernel: launched first, it makes delta (dO . O by row) for the dK/dV kernel, and no delta kernel
    # runs (the gradients against the references show the dK/dV kernel read the right one); dQ in the dK/dV kernel,
    # or float32 inputs: the delta kernel runs first.
    from llmcore.ops.triton._loader import kernels

    mod = kernels("attention_kernels", torch.device(DEVICE))
    launches, real = [], mod.attn_bwd_delta

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(mod, "attn_bwd_delta", Spy())
    monkeypatch.setenv("LLMCORE_TRITON_DQ", mode)
    check_dense_case(1, 3, 1, 50 * (8 if GPU else 1), 29 * (8 if GPU else 1), 32, dtype, True)  # ragged, MQA
    assert len(launches) == delta_kernels


def test_the_sweep_skipping_the_dq_kernel_still_gets_delta(monkeypatch):
    # benchmarks/gpu/bench.py times the dK/dV kernel alone by skipping the dQ kernel (attention._OVERRIDE): delta,
    # which the dQ kernel would have made, then comes from its own kernel. Launches recorded, nothing run.
    import types

    from llmcore.ops.triton import attention

    launched = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    fake = types.SimpleNamespace(INTERPRET=False, **{n: Kernel(n) for n in ("attn_bwd_delta", "attn_bwd_dkdv",
                                                                             "attn_bwd_dq")})
    monkeypatch.setattr(attention, "kernels", lambda name, device: fake)
    for name in ("LLMCORE_TRITON_DQ", "LLMCORE_TRITON_LOADS"):
        monkeypatch.delenv(name, raising=False)
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    p = attention._Problem(q, q, q, None, None, None, 64, 64, 0.0, True, 0.125)
    lse = torch.zeros(1, 2, 64)
    cfg = attention._cfg(16, 16, 4, 2)
    for override, expected in (({"dq": None, "dkdv": cfg}, ["attn_bwd_delta", "attn_bwd_dkdv"]),
                               ({"dq": cfg, "dkdv": None}, ["attn_bwd_dq"]),
                               ({"dq": cfg, "dkdv": cfg}, ["attn_bwd_dq", "attn_bwd_dkdv"])):
        monkeypatch.setattr(attention, "_OVERRIDE", override)
        launched.clear()
        attention._backward(p, q, q, q, q, q, lse, None)
        assert launched == expected, override


# --- masks --------------------------------------------------------------------------------


def key_padding(B, lk, lens):
    return torch.arange(lk)[None, :] < torch.tensor(lens)[:, None]  # (B, Lk) True = real key


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_key_padding_mask(kind, dtype):
    B, H, L, D = 3, 2, size(38, 700), 64
    valid = key_padding(B, L, [L, 5, 0])  # batch 2: every key padded -> zeros, zero gradients
    mask = valid[:, None, None, :]  # (B, 1, 1, Lk): read with stride 0 over heads and rows
    if kind == "additive":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        mask[0, ..., ::3] -= 1.5
    q, k, v, g = (randn(B, H, L, D, seed=s) for s in range(4))
    ref = reference(sdpa_reference, (q, k, v), g, attn_mask=mask.to(DEVICE))
    low = (mask if kind == "bool" else mask.to(dtype)).to(DEVICE)
    theirs = no_nan(run(torch_sdpa, (q, k, v), g, dtype, attn_mask=low))
    ours = run(triton_sdpa, (q, k, v), g, dtype, attn_mask=low)
    check(ours, theirs, ref, dtype)
    assert (ours[0][2] == 0).all() and (ours[1][2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.xfail(
    GPU, strict=False, reason="on an H200 (2026-12-04) float32 dq was 1.4e-6 off float64 against 4.3e-7 for torch's "
    "math backend, over the 2x bound: rows whose weight sits on the masked key make dS = P (dP - D) a cancellation, "
    "dP and D summed in other orders; out, dk and dv passed, and bfloat16 passes"))])
def test_huge_positive_additive_mask(dtype):
    """A finite mask past FLT_MAX / log2(e) (~2.36e38) became +inf in base-2 units and the row NaN (a probe); it
    gives its key the weight, as torch does. The comparator is torch's math backend: on CUDA torch's fused kernels
    return NaN here (seen on an H200, torch 2.11)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, L, D = 1, 2, size(19, 300), 32
    mask = torch.zeros(B, 1, L, L, dtype=torch.float64)
    mask[..., ::2, 5] = 3e38
    q, k, v, g = (randn(B, H, L, D, seed=s) for s in range(4))
    ref = reference(sdpa_reference, (q, k, v), g, attn_mask=mask.to(DEVICE))
    low = mask.to(dtype).to(DEVICE)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = run(torch_sdpa, (q, k, v), g, dtype, attn_mask=low)
    ours = run(triton_sdpa, (q, k, v), g, dtype, attn_mask=low)
    check(ours, theirs, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infinite_or_nan_in_an_additive_mask_is_nan(dtype):
    """A NaN or +inf in an additive mask makes its row NaN in torch, and through it every key's gradient. Both were
    lost to the clamp at the float32 maximum meant for huge finite masks (a NaN by tl.minimum's default, a probe;
    then +inf, another probe): the row attended to that key alone. The comparator is torch's math backend and the
    float64 reference (torch's fused kernels differ among themselves on such rows)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, Lq, Lk, D = 2, 2, 19, 23, 16
    mask = torch.zeros(B, 1, Lq, Lk, dtype=torch.float64)
    mask[0, :, 0, 1] = float("nan")
    mask[0, :, 12, 22] = float("inf")
    mask[1, :, 18, [0, 9]] = float("inf")
    mask[:, :, 5, 3] = 3e38  # finite: key 3 takes the weight
    q, g = randn(B, H, Lq, D, seed=0), randn(B, H, Lq, D, seed=3)
    k, v = randn(B, H, Lk, D, seed=1), randn(B, H, Lk, D, seed=2)
    ref = reference(sdpa_reference, (q, k, v), g, attn_mask=mask.to(DEVICE))
    low = mask.to(dtype).to(DEVICE)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = run(torch_sdpa, (q, k, v), g, dtype, attn_mask=low)
    ours = run(triton_sdpa, (q, k, v), g, dtype, attn_mask=low)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert torch.equal(a.isnan(), r.isnan()), name
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=name)
    nan_rows = ours[0].isnan().any(-1)
    assert nan_rows[0, :, 0].all() and nan_rows[0, :, 12].all() and nan_rows[1, :, 18].all()
    assert nan_rows.sum() == 3 * H and ours[2].isnan().all() and ours[3].isnan().all()


@pytest.mark.parametrize("call, message", [
    (lambda q: torch.ops.llmcore.triton_attention_fwd(q, q, q, None, None, None, 4096, 6, 0.0, False, 1.0, None),
     r"max_q, max_k must be q's and k's lengths \(6, 6\), got \(4096, 6\)"),
    (lambda q: torch.ops.llmcore.triton_attention_fwd(q, q.bfloat16(), q, None, None, None, 6, 6, 0.0, False, 1.0,
                                                      None), "must share one of"),
    (lambda q: torch.ops.llmcore.triton_attention_fwd(q, q, q, torch.zeros(1, 3, 6, 6), None, None, 6, 6, 0.0, False,
                                                      1.0, None), "does not broadcast to the scores"),
    (lambda q: torch.ops.llmcore.triton_attention_fwd(q, q, q, None, None, None, 6, 6, 0.5, False, 1.0, None),
     "needs rng"),
    (lambda q: torch.ops.llmcore.triton_attention_fwd(
        q[0].transpose(0, 1).contiguous(), *[q[0].transpose(0, 1).contiguous()] * 2, None,
        *[torch.tensor([0, 400], dtype=torch.int32)] * 2, 400, 400, 0.0, False, 1.0, None),
     "but the tensor has 6 rows"),
    (lambda q: torch.ops.llmcore.triton_attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 6, dtype=torch.bfloat16), None,
                                                      None, None, None, 6, 6, 0.0, False, 1.0), "lse must be"),
    (lambda q: torch.ops.llmcore.triton_norm_fwd(q, torch.ones(3), None, None, 1e-5, False, q.dtype),
     "weight must have 16 elements"),
])
def test_direct_op_calls_check_their_arguments(call, message):
    """The Triton custom ops called directly (torch.ops.llmcore.*, as torch.compile does) checked nothing: a max_q
    past q's rows or cu_seqlens past the packed rows segfaulted, mixed dtypes and mis-sized masks or weights ran
    (found by a probe). They check as the CPU backend's ops do (cu_seqlens' values on CPU tensors only)."""
    from llmcore.ops.triton import attention, norm  # noqa: F401  (registers the ops)

    q = torch.randn(1, 2, 6, 16, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=message):
        call(q)


def test_direct_op_call_broadcasts_a_size_one_mask():
    """A (1, 1, 1, 1) mask given to the op directly was read by its strides past its one element. (torch's side gets
    the mask materialized: on CUDA its fused kernels refuse a broadcast one, 'last dimension must be contiguous'.)"""
    from llmcore.ops.triton import attention  # noqa: F401

    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    mask = torch.randn(1, 1, 1, 1, device=DEVICE)
    out, _ = torch.ops.llmcore.triton_attention_fwd(q, q, q, mask, None, None, 8, 8, 0.0, False, 0.25, None)
    want = F.scaled_dot_product_attention(q, q, q, attn_mask=mask.expand(1, 2, 8, 8).contiguous(), scale=0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_full_bool_mask_with_dead_rows():
    B, H, L, D = 1, 2, size(35, 300), 32
    mask = torch.rand(B, H, L, L, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[0, 1, 3] = False  # a row that sees nothing
    q, k, v, g = (randn(B, H, L, D, seed=s) for s in range(4))
    ref = reference(sdpa_reference, (q, k, v), g, attn_mask=mask.to(DEVICE))
    theirs = no_nan(run(torch_sdpa, (q, k, v), g, torch.float16, attn_mask=mask.to(DEVICE)))
    ours = run(triton_sdpa, (q, k, v), g, torch.float16, attn_mask=mask.to(DEVICE))
    check(ours, theirs, ref, torch.float16)
    assert (ours[0][0, 1, 3] == 0).all() and (ours[1][0, 1, 3] == 0).all()


# --- varlen -------------------------------------------------------------------------------


def torch_padded(q, k, v, lens_q, lens_k, is_causal):
    return padded_sdpa(q, k, v, lens_q, lens_k, is_causal, sdpa=torch_sdpa)


VARLEN = [
    # (lens_q, lens_k, Hq, Hkv, D, dtype, causal)
    ([5, 1, 0, 37, 20, 3], None, 4, 2, 64, torch.bfloat16, True),
    ([5, 1, 0, 37, 20, 3], None, 2, 2, 80, torch.float32, False),
    ([4, 19, 1, 33], [10, 3, 5, 40], 2, 1, 48, torch.float16, True),  # bottom-right: sequence 1 has dead rows
]


@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, dtype, causal", VARLEN)
def test_varlen_ragged(lens_q, lens_k, hq, hkv, d, dtype, causal):
    lens_k = lens_k or lens_q
    if GPU:
        lens_q, lens_k = [n * 30 for n in lens_q], [n * 30 for n in lens_k]
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v, g = randn(tq, hq, d, seed=1), randn(tk, hkv, d, seed=2), randn(tk, hkv, d, seed=3), \
        randn(tq, hq, d, seed=4)
    cq, ck = cu(lens_q).to(DEVICE), cu(lens_k).to(DEVICE)
    ref = reference(varlen_reference, (q, k, v), g, cu_seqlens_q=cq, cu_seqlens_k=ck, is_causal=causal)
    theirs = run(torch_padded, (q, k, v), g, dtype, lens_q=lens_q, lens_k=lens_k, is_causal=causal)
    ours = run(llmcore.varlen_attention, (q, k, v), g, dtype, cu_seqlens_q=cq, cu_seqlens_k=ck,
               max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), is_causal=causal, backend="triton")
    check(ours, theirs, ref, dtype)


def test_varlen_checks_cu_seqlens_on_cpu():
    if GPU:
        pytest.skip("cu_seqlens are trusted on the GPU (checking them would cost a sync per call)")
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="longer than max_seqlen_q"):
        llmcore.varlen_attention(q, q, q, cu([4, 6]), cu([4, 6]), 5, 6, backend="triton")


# --- streamed tiles through tensor descriptors (LLMCORE_TRITON_LOADS=desc: TMA copies on the GPU, emulated by the
# interpreter) ----------------------------------------------------------------------------------------------------


def launched_kinds(monkeypatch) -> list:
    """The kinds of the kernel launches the Triton attention makes ("fwd", "dq_desc", ...), in order."""
    from llmcore.ops.triton import attention

    kinds, launch = [], attention._launch

    def spy(mod, kind, *args, **kwargs):
        kinds.append(kind)
        return launch(mod, kind, *args, **kwargs)

    monkeypatch.setattr(attention, "_launch", spy)
    return kinds


@pytest.mark.parametrize("dq", ["kernel", TMA])
@pytest.mark.parametrize("B, hq, hkv, lq, lk, d, dtype, causal", DQ_CASES)
def test_descriptor_loads_match_reference(monkeypatch, dq, B, hq, hkv, lq, lk, d, dtype, causal):
    if GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need a GPU of compute capability 9.0 or newer")
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", "desc")
    monkeypatch.setenv("LLMCORE_TRITON_DQ", dq)
    kinds = launched_kinds(monkeypatch)
    if GPU:
        lq, lk = lq * 8, lk * 8
    check_dense_case(B, hq, hkv, lq, lk, d, dtype, causal)
    assert kinds == (["fwd_desc", "dq_desc", "dkdv_desc"] if dq == "kernel" else ["fwd_desc", "dkdv_tma_desc"])


def test_descriptor_loads_heads_interleaved(monkeypatch):
    # (B, L, H, D) memory seen as (B, H, L, D), as transformers lays out q, k and v: the descriptors' strides are
    # not in decreasing order (heads D apart, rows H * D apart).
    if GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need a GPU of compute capability 9.0 or newer")
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", "desc")
    kinds = launched_kinds(monkeypatch)
    L = size(45, 600)
    q, k, v, g = (randn(2, L, 3, 64, seed=s).transpose(1, 2) for s in (11, 12, 13, 14))
    ref = reference(torch_sdpa, (q, k, v), g, is_causal=True)
    theirs = run(torch_sdpa, (q, k, v), g, torch.bfloat16, is_causal=True)
    ours = run(lambda *t, **kw: triton_sdpa(*(x.transpose(1, 2).contiguous().transpose(1, 2) for x in t), **kw),
               (q, k, v), g, torch.bfloat16, is_causal=True)
    check(ours, theirs, ref, torch.bfloat16)
    assert kinds == ["fwd_desc", "dq_desc", "dkdv_desc"]


@pytest.mark.parametrize("case", VARLEN)
def test_descriptor_loads_varlen(monkeypatch, case):
    # Packed sequences: K and V through descriptors in the forward and dQ kernels (the rows past a sequence, the next
    # sequence's, zeroed in the edge blocks); the dK/dV kernel keeps pointers.
    if GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need a GPU of compute capability 9.0 or newer")
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", "desc")
    kinds = launched_kinds(monkeypatch)
    test_varlen_ragged(*case)
    assert kinds == ["fwd_desc", "dq_desc", "dkdv"]


@pytest.mark.skipif(GPU, reason="bit for bit on the interpreter; compiled, the two forms may schedule differently")
@pytest.mark.parametrize("case", ["dense", "packed", "masked"])
def test_descriptor_loads_equal_pointer_loads(monkeypatch, case):
    # The same arithmetic on the same values: only where the tiles come from differs.
    lens = [7, 33, 1, 20]
    cq = cu(lens)
    packed = case == "packed"
    if packed:
        shapes, kw = [(61, 4, 80), (61, 2, 80)], dict(cu_seqlens_q=cq, cu_seqlens_k=cq, max_seqlen_q=33,
                                                      max_seqlen_k=33, is_causal=True, backend="triton")
        fn = llmcore.varlen_attention
    else:
        shapes, kw, fn = [(2, 4, 37, 48), (2, 2, 45, 48)], dict(enable_gqa=True), triton_sdpa
        if case == "masked":  # key padding and dropout (the same seed for both)
            kw.update(attn_mask=(torch.arange(45) < torch.tensor([[30], [45]]))[:, None, None, :], dropout_p=0.3)
    q, k, v, g = (randn(*shape, seed=s) for shape, s in zip([shapes[0], shapes[1], shapes[1], shapes[0]], range(4)))
    kinds = launched_kinds(monkeypatch)
    results = {}
    for loads in ("pointer", "desc"):
        monkeypatch.setenv("LLMCORE_TRITON_LOADS", loads)
        torch.manual_seed(7)
        results[loads] = run(fn, (q, k, v), g, torch.bfloat16, **kw)
    assert kinds == ["fwd", "dq", "dkdv", "fwd_desc", "dq_desc", "dkdv" if packed else "dkdv_desc"]
    assert all(torch.equal(a, b) for a, b in zip(results["pointer"], results["desc"]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the inf / NaN sequence
@pytest.mark.parametrize("loads", ["pointer", "desc"])
def test_packed_sequences_do_not_see_their_neighbours(monkeypatch, loads):
    # A key block past a sequence's end holds the next sequence's rows: non-finite values there must not reach
    # this sequence's outputs or gradients (0 * inf is NaN), whichever way the tiles are loaded.
    if GPU and loads == "desc" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need a GPU of compute capability 9.0 or newer")
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", loads)
    lens = [5, 17, 18] if not GPU else [50, 170, 180]
    cq = cu(lens).to(DEVICE)
    q, k, v, g = (randn(sum(lens), 2, 64, seed=s).to(DEVICE, torch.bfloat16) for s in (1, 2, 3, 4))
    a, b = lens[0], lens[0] + lens[1]
    k[a:b], v[a:b] = float("inf"), float("nan")  # the middle sequence
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = llmcore.varlen_attention(*leaves, cq, cq, max(lens), max(lens), is_causal=True, backend="triton")
    grads = torch.autograd.grad(out, leaves, g)
    for t in (out, *grads):
        assert t[:a].isfinite().all() and t[b:].isfinite().all()


def test_loads_setting_is_checked(monkeypatch):
    from llmcore.ops.triton import attention

    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    p = attention._Problem(q, q, q, None, None, None, 4, 4, 0.0, False, 0.25)
    monkeypatch.setattr(attention, "_capability", lambda device: 90)
    for setting, kinds in (("desc", attention._DESC_KINDS), ("pointer", ()), ("fwd,dq", ("fwd", "dq")), ("", ())):
        monkeypatch.setenv("LLMCORE_TRITON_LOADS", setting)
        assert [k for k in attention._DESC_KINDS if attention._desc_loads(k, p, False, q.device)] == list(kinds)
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", "fwd,tma")
    with pytest.raises(ValueError, match="LLMCORE_TRITON_LOADS"):
        attention._desc_loads("fwd", p, False, q.device)
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", "desc")
    monkeypatch.setattr(attention, "_capability", lambda device: 80)  # no TMA: pointers
    assert not attention._desc_loads("fwd", p, False, q.device)
    assert attention._desc_loads("fwd", p, True, q.device)  # the interpreter emulates it
    monkeypatch.setenv("LLMCORE_TRITON_LOADS", "")  # unset: as measured, here nothing
    monkeypatch.setattr(attention, "_capability", lambda device: 90)
    monkeypatch.setitem(attention._DESC_MEASURED, ("dq", 64, False), True)
    assert [k for k in attention._DESC_KINDS if attention._desc_loads(k, p, False, q.device)] == ["dq"]
    assert not attention._desc_loads("dq", p, True, q.device)  # the interpreter keeps pointers by default
    wide = attention._Problem(*(q.float(),) * 3, None, None, None, 4, 4, 0.0, False, 0.25)
    assert not attention._desc_loads("dq", wide, False, q.device)  # measured for 16-bit inputs only


def test_descriptors_only_where_tma_can_address_the_tensor():
    from llmcore.ops.triton import attention

    dense = torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16)
    d = attention._rows_desc(dense, False, 64)
    assert (d.shape, d.strides, d.block_shape) == ([2, 3, 40, 64], list(dense.stride()), [1, 1, 16, 64])
    attention._tile_rows([(d, 128)])
    assert d.block_shape == [1, 1, 128, 64]
    packed = torch.zeros(50, 4, 48, dtype=torch.bfloat16)  # rows of 96 bytes; tiles 64 wide (zeros past 48)
    d = attention._rows_desc(packed, True, 64)
    assert (d.shape, d.block_shape) == ([50, 4, 48], [16, 1, 64])
    attention._tile_rows([(d, 32)])
    assert d.block_shape == [32, 1, 64]
    one = torch.zeros(40, 64, dtype=torch.bfloat16).as_strided((1, 1, 40, 64), (0, 0, 64, 1))
    assert attention._rows_desc(one, False, 64).strides == [16, 16, 64, 1]  # size-1 dims: any stride TMA takes
    # Triton 3.4's and 3.5's interpreters check strides in elements: 40 rows of 24 (48-byte rows) are refused there
    rows24 = torch.zeros(2, 3, 40, 24, dtype=torch.bfloat16)
    assert attention._rows_desc(rows24, False, 32) is not None and attention._rows_desc(rows24, False, 32, True) is None
    assert attention._rows_desc(torch.zeros(2, 3, 40, 20, dtype=torch.bfloat16), False, 32) is None  # 40-byte rows
    assert attention._rows_desc(dense[:, :, 1:], False, 64) is not None  # starts a row (128 bytes) on
    unaligned = dense.view(-1)[1:1 + 2 * 3 * 39 * 64].view(2, 3, 39, 64)  # starts 2 bytes on
    assert attention._rows_desc(unaligned, False, 64) is None
    assert attention._rows_desc(dense[:1].expand(2, 3, 40, 64), False, 64) is None  # a broadcast batch (stride 0)


# --- more sequences than a CUDA grid's z (65535): several launches ---------------------------


def count_launches(monkeypatch) -> list:
    """Sequence counts of the launches (attention._attention calls) the Triton launchers make, in order."""
    from llmcore.ops.triton import attention

    calls, launch = [], attention._attention

    def counting(q, *args):
        calls.append(q.size(0) if args[3] is None else args[3].numel() - 1)  # dense batch, or varlen sequences
        return launch(q, *args)

    monkeypatch.setattr(attention, "_attention", counting)
    return calls


def test_sdpa_more_sequences_than_a_grid_takes(monkeypatch):
    from llmcore.ops.triton import attention

    monkeypatch.setattr(attention, "_MAX_GRID_Z", 2)  # 5 sequences: launches of 2, 2 and 1
    calls = count_launches(monkeypatch)
    B, L, D = 5, size(21, 200), 32
    q, k, v, g = randn(B, 4, L, D, seed=1), randn(B, 2, L, D, seed=2), randn(B, 2, L, D, seed=3), \
        randn(B, 4, L, D, seed=4)
    mask = key_padding(B, L, [L, 3, 0, L - 1, 7])[:, None, None, :].to(DEVICE)
    kw = dict(attn_mask=mask, enable_gqa=True)
    ref = reference(sdpa_reference, (q, k, v), g, **kw)
    theirs = no_nan(run(torch_sdpa, (q, k, v), g, torch.bfloat16, **kw))
    ours = run(triton_sdpa, (q, k, v), g, torch.bfloat16, **kw)
    check(ours, theirs, ref, torch.bfloat16)
    assert calls == [2, 2, 1]


def test_varlen_more_sequences_than_a_grid_takes(monkeypatch):
    from llmcore.ops.triton import attention

    monkeypatch.setattr(attention, "_MAX_GRID_Z", 2)  # runs [7, 4], [0, 0] (empty), [9, 1], [5]
    calls = count_launches(monkeypatch)
    lens = [7, 4, 0, 0, 9, 1, 5]
    if GPU:
        lens = [n * 30 for n in lens]
    c, total = cu(lens).to(DEVICE), sum(lens)
    q, k, v, g = randn(total, 4, 64, seed=1), randn(total, 2, 64, seed=2), randn(total, 2, 64, seed=3), \
        randn(total, 4, 64, seed=4)
    kw = dict(cu_seqlens_q=c, cu_seqlens_k=c, is_causal=True)
    ref = reference(varlen_reference, (q, k, v), g, **kw)
    theirs = run(torch_padded, (q, k, v), g, torch.float16, lens_q=lens, lens_k=lens, is_causal=True)
    ours = run(llmcore.varlen_attention, (q, k, v), g, torch.float16, max_seqlen_q=max(lens),
               max_seqlen_k=max(lens), backend="triton", **kw)
    check(ours, theirs, ref, torch.float16)
    assert calls == [2, 2, 1]  # the empty run launches nothing


@pytest.mark.parametrize("varlen", [False, True])
def test_backward_writes_no_zero_tensors(monkeypatch, varlen):
    """Around the kernels the backward allocates its gradients and nothing zero-filled: no slice of an input whose
    backward zero-fills an input-sized tensor (sdpa sliced q, k and v per launch, even for one launch), and no
    zero gradient materialized for the logsumexp output, which carries none. On a GPU each was a memset and a
    copy of the gradient (~1.1 GB of traffic at (4, 32, 4096, 128) bf16). With dQ by its own kernel: the atomic
    modes' float32 accumulator has to start at zero."""
    monkeypatch.setenv("LLMCORE_TRITON_DQ", "kernel")
    if varlen:
        c = cu([5, 0, 19]).to(DEVICE)
        q, k, v = (randn(24, 4, 16, seed=s).to(DEVICE, torch.float32).requires_grad_() for s in range(3))
        out = llmcore.varlen_attention(q, k, v, c, c, 19, 19, is_causal=True, backend="triton")
    else:
        q, k, v = (randn(2, 4, 21, 16, seed=s).to(DEVICE, torch.float32).requires_grad_() for s in range(3))
        out = triton_sdpa(q, k, v, is_causal=True)
    grad = randn(*out.shape, seed=3).to(DEVICE, torch.float32)
    assert zero_fills(lambda: out.backward(grad)) == {}
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


# --- torch.compile: the launchers run behind custom ops ---------------------------------------


def _op_args(dropout: bool, mask: bool, packed: bool) -> tuple:
    g = torch.Generator().manual_seed(5)
    rng = torch.tensor([11, 3], device=DEVICE) if dropout else None
    if packed:
        cu_q = torch.tensor([0, 3, 3, 20], dtype=torch.int32, device=DEVICE)
        q = torch.randn(20, 4, 32, generator=g).to(DEVICE).requires_grad_()
        k, v = (torch.randn(20, 2, 32, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        return (q, k, v, None, cu_q, cu_q, 17, 17, 0.3 if dropout else 0.0, True, 0.2, rng)
    q = torch.randn(2, 4, 21, 32, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(2, 4, 19, 32, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    # the op takes the mask broadcast to (B, H, Lq, Lk), as sdpa passes it (stride 0 over the heads)
    m = (torch.rand(2, 1, 21, 19, generator=g) > 0.2).to(DEVICE).expand(2, 4, 21, 19) if mask else None
    return (q, k, v, m, None, None, 21, 19, 0.3 if dropout else 0.0, not mask, 0.17, rng)


@pytest.mark.parametrize("dq", ["kernel", "atomic"])
@pytest.mark.parametrize("dropout, mask, packed", [(False, False, False), (True, True, False), (False, False, True),
                                                   (True, False, True)])
def test_opcheck(monkeypatch, dq, dropout, mask, packed):
    """Schema, fake tensors (shapes and strides as the kernels write them, dQ by atomics included), autograd
    registration and AOT dispatch of the custom op torch.compile sees."""
    from llmcore.ops.triton import attention  # registers the op (the Triton modules load on first use)

    monkeypatch.setenv("LLMCORE_TRITON_DQ", dq)
    args = _op_args(dropout, mask, packed)
    torch.library.opcheck(attention._attention_fwd, args)
    with torch.no_grad():  # opcheck compares shapes, not strides: the gradients come in q, k, v's layouts
        q, k, v = args[:3]
        out, lse = attention._forward_impl(*args)
        grads = attention._backward_impl(torch.ones_like(out), q, k, v, out, lse, *args[3:6], args[11], *args[6:11])
    assert [g.stride() for g in grads] == [torch.empty_like(t).stride() for t in (q, k, v)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """torch.compile traces the Triton backend in one graph (it could not trace the launchers: before the custom
    ops it failed on CPU tensors with or without fullgraph); results and gradients as eager."""
    q, k, v = (randn(2, 4, 33, 32, seed=s).to(DEVICE, torch.float32).requires_grad_() for s in range(3))
    cu = torch.tensor([0, 10, 33], dtype=torch.int32, device=DEVICE)

    def f(q, k, v):
        a = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        b = llmcore.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 23,
                                     23, backend="triton")
        return (a * a).sum() + b.sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager = f(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    result = compiled(q, k, v)
    compiled_grads = torch.autograd.grad(result, (q, k, v))
    torch.testing.assert_close(result, eager)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


def test_double_backward_is_refused():
    q, k, v = (randn(1, 2, 9, 16, seed=s).to(DEVICE, torch.float32).requires_grad_() for s in range(3))
    out = triton_sdpa(q, k, v)
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative of its own"):
        g.sum().backward()


def test_more_heads_than_a_grid_takes_is_refused(monkeypatch):
    from llmcore.ops.triton import attention

    monkeypatch.setattr(attention, "_MAX_GRID_Y", 3)
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at most 3 heads"):
        triton_sdpa(q, q, q)
    with pytest.raises(ValueError, match="at most 3 heads"):
        llmcore.varlen_attention(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu([8]).to(DEVICE),
                                 cu([8]).to(DEVICE), 8, 8, backend="triton")


# --- dropout: the CPU backend's Philox keep mask, bit for bit -------------------------------


def keep_mask(seed, offset, p, rows, cols):
    out = torch.empty(rows, cols, dtype=torch.uint8)
    _C.dropout_keep_mask(seed, offset, p, 0, rows, cols, out.data_ptr())
    return out.bool()


def drawn_rng(seed):
    """The (seed, offset) the kernels draw after torch.manual_seed(seed), on DEVICE's generator."""
    torch.manual_seed(seed)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=DEVICE).tolist()


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_uses_the_cpu_backends_mask(p):
    B, H, L, D = 1, 2, size(40, 300), 32
    q, k, v, g = (randn(B, H, L, D, seed=s) for s in range(4))
    seed, offset = drawn_rng(5)
    keep = keep_mask(seed, offset, p, B * H * L, L).view(B, H, L, L).to(DEVICE)
    kw = dict(is_causal=True, dropout_p=p, dropout_keep=keep)
    ref = reference(sdpa_reference, (q, k, v), g, **kw)
    theirs = run(sdpa_reference, (q, k, v), g, torch.bfloat16, **kw)
    torch.manual_seed(5)
    ours = run(triton_sdpa, (q, k, v), g, torch.bfloat16, is_causal=True, dropout_p=p)
    check(ours, theirs, ref, torch.bfloat16)


def test_varlen_dropout_uses_the_cpu_backends_mask():
    lens, H, D, p = [5, 0, size(40, 400), 17], 2, 32, 0.3
    c, total, mx = cu(lens).to(DEVICE), sum(lens), max(lens)
    q, k, v, g = (randn(total, H, D, seed=s) for s in range(4))
    seed, offset = drawn_rng(9)
    full = keep_mask(seed, offset, p, H * total, mx).view(H, total, mx)  # row = h * total + token
    keeps = [full[:, c[b] : c[b + 1], : lens[b]].to(DEVICE) for b in range(len(lens))]
    kw = dict(cu_seqlens_q=c, cu_seqlens_k=c, is_causal=True, dropout_p=p, dropout_keep=keeps)
    ref = reference(varlen_reference, (q, k, v), g, **kw)
    theirs = run(varlen_reference, (q, k, v), g, torch.float32, **kw)
    torch.manual_seed(9)
    ours = run(llmcore.varlen_attention, (q, k, v), g, torch.float32, cu_seqlens_q=c, cu_seqlens_k=c,
               max_seqlen_q=mx, max_seqlen_k=mx, is_causal=True, dropout_p=p, backend="triton")
    check(ours, theirs, ref, torch.float32)


def test_dropout_one_zeroes_everything():
    q = torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True)
    out = triton_sdpa(q, q, q, dropout_p=1.0)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all()


# --- edges and selection ------------------------------------------------------------------


def test_no_keys_and_no_queries():
    q = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, device=DEVICE, requires_grad=True)
    out = triton_sdpa(q, k, k)
    out.sum().backward()
    assert out.shape == (2, 2, 5, 16) and (out == 0).all() and (q.grad == 0).all()
    assert triton_sdpa(q[:, :, :0], q, q).shape == (2, 2, 0, 16)


@pytest.mark.skipif(GPU, reason="CPU selection rules")
def test_cpu_selection(monkeypatch):
    from llmcore.ops.dispatch import AttentionCall, select

    call = AttentionCall(torch.device("cpu"), torch.float32, 64, 64, "none", False, False, False)
    assert select(call).name == "cpu"  # automatic selection never picks the interpreter
    assert select(call, "triton").name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this call: CPU tensors need"):
        select(call, "triton")


def test_head_dim_limit_and_float64_are_declined():
    q = torch.randn(1, 1, 4, 300, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dim 300 > 256"):
        triton_sdpa(q, q, q)
    with pytest.raises(RuntimeError, match="dtype torch.float64 not supported"):
        triton_sdpa(q[..., :16].double(), q[..., :16].double(), q[..., :16].double())


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (automatic selection of the triton backend)")
def test_cuda_tensors_choose_a_gpu_backend():
    from llmcore.ops.dispatch import AttentionCall, select

    call = AttentionCall(torch.device("cuda"), torch.bfloat16, 128, 128, "none", False, False, False)
    assert select(call).name in ("cuda", "triton")


def test_identical_keys_give_uniform_weights():
    q = torch.randn(1, 1, 17, 16, device=DEVICE)
    k = torch.ones(1, 1, 23, 16, device=DEVICE)
    v = torch.randn(1, 1, 23, 16, device=DEVICE)
    out = triton_sdpa(q, k, v, scale=1 / math.sqrt(3))
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(GPU, reason="a 5 GiB virtual buffer: the interpreter's CPU tensors only")
def test_mask_row_offsets_past_2_31():
    """A mask row index times its row stride passed 2**31 in int32 (a dense (B, 1, L, L) mask from L = 46341; here a
    view with a 2**27 row stride): the kernel read 2 GiB before the mask, where a decoy row sits (found by a probe).
    Offsets are int64 now. The buffer is virtual: only the rows written are touched."""
    stride, base, lq, lk = 1 << 27, 3 << 30, 17, 16
    big = torch.empty(base + (lq - 1) * stride + lk, dtype=torch.bool)
    mask = big.as_strided((lq, lk), (stride, 1), base)
    for r in range(lq):
        mask[r].fill_(True)
    mask[16].fill_(False)
    mask[16, 3] = True  # the real row 16 sees key 3 only
    decoy = base + 16 * stride - (1 << 32)  # where the int32 offset wrapped to
    big[decoy:decoy + lk].fill_(False)
    q, k, v = (torch.randn(1, 1, n, 16, generator=torch.Generator().manual_seed(i)) for i, n in enumerate((lq, lk, lk)))
    out = llmcore.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
    torch.testing.assert_close(out[0, 0, 16], v[0, 0, 3])
    ref = llmcore.scaled_dot_product_attention(q, k, v, attn_mask=mask.clone(), backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
