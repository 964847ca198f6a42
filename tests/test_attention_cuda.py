"""The `cuda` attention backend (csrc/attention/cuda/) against float64, forward and backward.

Same parametrization as the CPU kernel's tests (test_attention.py, test_varlen.py), in bf16
and fp16 on the GPU. Without a usable GPU every kernel test skips with the reason the
dispatcher gives; the host check of the kernels' index math runs everywhere a C++ compiler is.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_checks import assert_close_to_ref, forward_backward

import llmcore
from llmcore import _C
from llmcore.ops import cuda_attention
from llmcore.ops.reference import sdpa_reference, varlen_reference

NAMES = ("out", "dq", "dk", "dv")
ROOT = Path(__file__).resolve().parents[1]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def gpu():
    """The CUDA device, or a skip naming why the cuda backend cannot run here."""
    reason = cuda_attention.unavailable()
    if reason:
        pytest.skip(f"cuda attention backend unavailable: {reason}")
    return torch.device("cuda")


def randn(*shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(device)


def check_sdpa(shape_q, shape_kv, dtype, device, *, dv=None, is_causal=False, enable_gqa=False, scale=None, seed=0):
    q = randn(*shape_q, seed=seed, device=device)
    k = randn(*shape_kv, seed=seed + 1, device=device)
    v = randn(*shape_kv[:-1], dv or shape_kv[-1], seed=seed + 2, device=device)
    grad = randn(*shape_q[:-1], dv or shape_kv[-1], seed=seed + 3, device=device)
    kw = dict(is_causal=is_causal, enable_gqa=enable_gqa, scale=scale)
    ref = forward_backward(sdpa_reference, (q, k, v), grad, torch.float64, **kw)
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, dtype, backend="cuda", **kw)
    theirs = forward_backward(F.scaled_dot_product_attention, (q, k, v), grad, dtype, **kw)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)
    return ours


def cu(lengths, device):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return out.to(device)


def check_varlen(lens_q, lens_k, hq, hkv, d, dtype, device, is_causal, seed=0):
    q = randn(sum(lens_q), hq, d, seed=seed, device=device)
    k = randn(sum(lens_k), hkv, d, seed=seed + 1, device=device)
    v = randn(sum(lens_k), hkv, d, seed=seed + 2, device=device)
    grad = randn(sum(lens_q), hq, d, seed=seed + 3, device=device)
    kw = dict(cu_seqlens_q=cu(lens_q, device), cu_seqlens_k=cu(lens_k, device), is_causal=is_causal)
    ref = forward_backward(varlen_reference, (q, k, v), grad, torch.float64, **kw)
    # torch has no varlen kernel: its baseline error is the plain-PyTorch reference run in dtype
    theirs = forward_backward(varlen_reference, (q, k, v), grad, dtype, **kw)
    ours = forward_backward(llmcore.varlen_attention, (q, k, v), grad, dtype, max_seqlen_q=max(lens_q, default=0),
                            max_seqlen_k=max(lens_k, default=0), backend="cuda", **kw)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)
    return ours


# --- runs everywhere: the index math the kernels share with this host program ---------------


def test_tile_index_math_on_the_host(tmp_path):
    src = ROOT / "csrc/attention/cuda/tile_math_test.cpp"
    if not src.exists():
        pytest.skip(f"{src} not found (tests run outside the source tree)")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build csrc/attention/cuda/tile_math_test.cpp")
    exe = tmp_path / "tile_math_test"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("passed, 0 failed"), out.stdout


def test_backend_reports_why_it_cannot_run():
    reason = llmcore.info()["backends"]["cuda"]["reason"]
    if not _C.cuda_built:
        assert "without CUDA" in reason
    elif not torch.cuda.is_available():
        assert "no CUDA GPU" in reason
        assert _C.cuda_attention_smem_bytes > 48 * 1024  # the kernels are in the module
    else:
        assert reason == cuda_attention.unavailable()


@pytest.mark.parametrize("packed", [False, True])
def test_launch_description_of_a_call(packed):
    """What the launcher hands the kernels, built on the host: sizes read from the (padded) inputs."""
    if packed:  # (total, H, D): two sequences of 3 and 5 queries, 4 and 6 keys
        q, k, v = torch.empty(8, 6, 80, dtype=torch.bfloat16), *(torch.empty(10, 2, 80, dtype=torch.bfloat16),) * 2
        cus = (cu([3, 5], "cpu"), cu([4, 6], "cpu"))
        p = cuda_attention._problem(q, k, v, 2, 5, 6, 0.25, True, cus)
        assert (p.total_q, p.total_k, p.causal_bottom_right) == (8, 10, True)
    else:
        q, k, v = torch.empty(3, 6, 7, 80), torch.empty(3, 2, 9, 80), torch.empty(3, 2, 9, 48)
        q, k, v = (t.to(torch.float16) for t in (q, k, v))
        p = cuda_attention._problem(q, k, v, 3, 7, 9, 0.25, True, None)
        assert p.causal_bottom_right is False
    assert p.dtype == (_C.DType.bf16 if packed else _C.DType.f16)
    assert (p.batch, p.heads_q, p.heads_kv, p.len_q, p.len_k) == ((2, 6, 2, 5, 6) if packed else (3, 6, 2, 7, 9))
    assert (p.head_dim, p.head_dim_v, p.scale, p.causal) == (80, 80 if packed else 48, 0.25, True)
    assert (p.dropout_p, p.mask_kind) == (0.0, _C.MaskKind.none)


# --- GPU: correctness against float64 ---------------------------------------------------------


@pytest.mark.parametrize("L", [1, 97, 1025])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_sdpa_matches_reference(gpu, L, D, is_causal, dtype):
    B, H = (1, 2) if L > 512 else (2, 3)
    check_sdpa((B, H, L, D), (B, H, L, D), dtype, gpu, is_causal=is_causal)


@pytest.mark.parametrize("Lq,Lk", [(17, 300), (300, 17), (64, 65), (130, 70)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_rectangular(gpu, Lq, Lk, is_causal):
    check_sdpa((2, 2, Lq, 48), (2, 2, Lk, 48), torch.bfloat16, gpu, is_causal=is_causal)


@pytest.mark.parametrize("D", [16, 59, 96, 256])
def test_sdpa_odd_and_large_head_dims(gpu, D):
    check_sdpa((1, 2, 77, D), (1, 2, 77, D), torch.bfloat16, gpu, is_causal=True)
    check_sdpa((2, 2, 200, D), (2, 2, 333, D), torch.float16, gpu)


def test_sdpa_value_head_dim_differs(gpu):
    check_sdpa((2, 2, 50, 64), (2, 2, 70, 64), torch.bfloat16, gpu, dv=40)
    check_sdpa((2, 2, 50, 40), (2, 2, 70, 40), torch.bfloat16, gpu, dv=136)


def test_sdpa_float16_and_custom_scale(gpu):
    check_sdpa((2, 2, 65, 64), (2, 2, 65, 64), torch.float16, gpu, scale=0.3)


def test_sdpa_negative_scale(gpu):
    # the row max is taken after scaling, so a negative scale is still a stable softmax. torch's
    # flash kernel returns NaN here (seen with torch 2.11 on an H200), so the baseline error is
    # the plain-PyTorch reference run in bf16.
    q, k, v, grad = (randn(2, 2, 65, 64, seed=s, device=gpu) for s in range(4))
    kw = dict(scale=-0.2, is_causal=True)
    ref = forward_backward(sdpa_reference, (q, k, v), grad, torch.float64, **kw)
    theirs = forward_backward(sdpa_reference, (q, k, v), grad, torch.bfloat16, **kw)
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, torch.bfloat16, backend="cuda", **kw)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, torch.bfloat16)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_gqa(gpu, hq, hkv, is_causal):
    check_sdpa((2, hq, 97, 64), (2, hkv, 97, 64), torch.bfloat16, gpu, is_causal=is_causal, enable_gqa=True)
    check_sdpa((1, hq, 300, 128), (1, hkv, 300, 128), torch.float16, gpu, is_causal=is_causal, enable_gqa=True)


def test_causal_with_more_queries_than_keys_is_top_left(gpu):
    check_sdpa((1, 2, 40, 32), (1, 2, 10, 32), torch.bfloat16, gpu, is_causal=True)


@pytest.mark.parametrize("dtype", HALF)
def test_noncontiguous_and_broadcast_batch(gpu, dtype):
    B, H, L, D = 2, 4, 150, 64
    q = torch.randn(B, L, H, D, dtype=dtype, device=gpu).transpose(1, 2).requires_grad_()  # (B, L, H, D) memory
    k = torch.randn(1, L, H, D, dtype=dtype, device=gpu).transpose(1, 2).requires_grad_()  # batch broadcasts
    v = torch.randn(B, H, D, L, dtype=dtype, device=gpu).transpose(-1, -2).requires_grad_()  # last dim strided
    grad = torch.randn(B, H, L, D, dtype=dtype, device=gpu)
    ours = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    g_ours = torch.autograd.grad(ours, (q, k, v), grad)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*ref_in, is_causal=True)
    g_ref = torch.autograd.grad(ref, ref_in, grad.double())
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g_theirs = torch.autograd.grad(theirs, (q, k, v), grad)
    for name, a, b, r in zip(NAMES, (ours, *g_ours), (theirs, *g_theirs), (ref, *g_ref)):
        assert_close_to_ref(name, a.double(), b.double(), r.detach(), dtype)


@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_other_ranks(gpu, ndim):
    shape = {2: (30, 64), 3: (3, 30, 64), 5: (2, 2, 3, 30, 64)}[ndim]
    q, k, v = (torch.randn(*shape, dtype=torch.bfloat16, device=gpu) for _ in range(3))
    out = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


RAGGED = [
    [5, 1, 0, 97, 64, 3],
    [1],
    [130, 0, 0, 7],
    [33] * 5,
]


@pytest.mark.parametrize("lens", RAGGED)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_varlen_ragged(gpu, lens, is_causal, dtype):
    check_varlen(lens, lens, 4, 2, 64, dtype, gpu, is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_different_q_and_k_lengths(gpu, is_causal):
    # bottom-right causal; sequence 1 has more queries than keys, so its first rows see nothing
    check_varlen([4, 9, 1, 70], [10, 3, 5, 70], 2, 2, 80, torch.bfloat16, gpu, is_causal)
    check_varlen([4, 9, 1, 70, 130], [10, 3, 5, 77, 141], 4, 2, 128, torch.float16, gpu, is_causal)


def test_varlen_fully_masked_rows_are_zero(gpu):
    # bottom-right causal with 9 queries and 3 keys: rows 0..5 see nothing
    lens_q, lens_k = [9], [3]
    out, dq, dk, dv = check_varlen(lens_q, lens_k, 2, 2, 64, torch.bfloat16, gpu, True)
    assert (out[:6] == 0).all() and (dq[:6] == 0).all()


def test_varlen_sequences_never_see_each_other(gpu):
    lens = [7, 12, 1, 30]
    c = cu(lens, gpu)
    q, k, v = (torch.randn(sum(lens), 2, 64, dtype=torch.bfloat16, device=gpu) for _ in range(3))
    out = llmcore.varlen_attention(q, k, v, c, c, 30, 30, backend="cuda")
    k2, v2 = k.clone(), v.clone()
    k2[7:19] += 100 * torch.randn(12, 2, 64, device=gpu, dtype=torch.bfloat16)
    v2[7:19] += 100
    out2 = llmcore.varlen_attention(q, k2, v2, c, c, 30, 30, backend="cuda")
    torch.testing.assert_close(out[:7], out2[:7], rtol=0, atol=0)
    torch.testing.assert_close(out[19:], out2[19:], rtol=0, atol=0)
    assert not torch.allclose(out[7:19], out2[7:19])


def test_long_sequence_gqa_bf16(gpu):
    # several key tiles per query tile in both directions, and both causal alignments' diagonal tiles
    check_sdpa((1, 4, 2111, 128), (1, 2, 2111, 128), torch.bfloat16, gpu, is_causal=True, enable_gqa=True)
    check_varlen([1500, 611], [1500, 700], 4, 1, 64, torch.bfloat16, gpu, True)


# --- GPU: dispatch, custom ops, torch.compile --------------------------------------------------


def test_auto_selection_prefers_triton_then_cuda_which_declines_what_it_cannot_run(gpu):
    from llmcore.ops import triton as triton_ops
    from llmcore.ops.dispatch import AttentionCall, select

    def call(**kw):
        base = dict(device=gpu, dtype=torch.bfloat16, head_dim=128, head_dim_v=128, mask="none",
                    mask_requires_grad=False, varlen=False, dropout=False)
        return AttentionCall(**dict(base, **kw))

    first = "triton" if triton_ops.usable() else "cuda"  # Triton first: faster in every mode the H200 timed
    assert select(call()).name == first
    assert select(call(varlen=True)).name == first
    for kw, reason in ((dict(dropout=True), "dropout"), (dict(mask="bool"), "bool masks"),
                       (dict(dtype=torch.float32), "dtype"), (dict(head_dim=320, head_dim_v=320), "head dim"),
                       (dict(sequences=70000), "70000 sequences")):
        assert select(call(**kw)).name != "cuda"
        with pytest.raises(RuntimeError, match=reason):
            select(call(**kw), "cuda")


def test_runs_on_the_current_stream(gpu):
    q, k, v = (torch.randn(2, 4, 500, 64, dtype=torch.bfloat16, device=gpu) for _ in range(3))
    expected = llmcore.scaled_dot_product_attention(q, k, v, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = llmcore.scaled_dot_product_attention(q, k, v, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_opcheck(gpu):
    q, k, v = (torch.randn(2, 4, 37, 64, dtype=torch.bfloat16, device=gpu, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.llmcore.cuda_sdpa_fwd.default, (q, k, v, True, 0.17))
    c = cu([3, 0, 17], gpu)
    qp, kp, vp = (torch.randn(20, 4, 64, dtype=torch.float16, device=gpu, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.llmcore.cuda_varlen_fwd.default, (qp, kp, vp, c, c, 17, 17, True, 0.2))


def test_torch_compile_fullgraph(gpu):
    q, k, v = (torch.randn(2, 4, 65, 64, dtype=torch.bfloat16, device=gpu, requires_grad=True) for _ in range(3))
    c = cu([10, 55], gpu)

    def f(q, k, v):
        a = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = llmcore.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), c, c, 55, 55)
        return a.float().sum() + b.float().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(eager, torch.autograd.grad(compiled(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b)
