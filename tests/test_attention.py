"""llmcore.scaled_dot_product_attention against float64 math and torch, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore.ops.reference import sdpa_reference

from attention_checks import assert_close_to_ref, check_varlen, forward_backward

NAMES = ("out", "dq", "dk", "dv")


def check_sdpa(shape_q, shape_kv, dtype, *, dv=None, mask=None, is_causal=False, enable_gqa=False, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, dtype=torch.float64, generator=g)
    k = torch.randn(*shape_kv, dtype=torch.float64, generator=g)
    v = torch.randn(*shape_kv[:-1], dv or shape_kv[-1], dtype=torch.float64, generator=g)
    grad = torch.randn(*shape_q[:-1], dv or shape_kv[-1], dtype=torch.float64, generator=g)
    kw = dict(is_causal=is_causal, enable_gqa=enable_gqa, scale=scale)

    def with_mask(dt):
        if mask is None or mask.dtype == torch.bool:
            return dict(kw, attn_mask=mask)
        return dict(kw, attn_mask=mask.to(dt))

    ref = forward_backward(sdpa_reference, (q, k, v), grad, torch.float64, **with_mask(torch.float64))
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, dtype, **with_mask(dtype))
    theirs = forward_backward(F.scaled_dot_product_attention, (q, k, v), grad, dtype, **with_mask(dtype))
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)
    return ours


@pytest.mark.parametrize("L", [1, 97, 1025])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_reference(L, D, is_causal, dtype):
    B, H = (1, 2) if L > 512 else (2, 3)
    check_sdpa((B, H, L, D), (B, H, L, D), dtype, is_causal=is_causal)


@pytest.mark.parametrize("Lq,Lk", [(17, 300), (300, 17), (64, 65), (130, 70)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_rectangular(Lq, Lk, is_causal):
    check_sdpa((2, 2, Lq, 48), (2, 2, Lk, 48), torch.float32, is_causal=is_causal)


@pytest.mark.parametrize("D", [16, 59, 96, 256])
def test_sdpa_odd_and_large_head_dims(D):
    check_sdpa((1, 2, 77, D), (1, 2, 77, D), torch.float32, is_causal=True)


def test_sdpa_value_head_dim_differs():
    check_sdpa((2, 2, 50, 64), (2, 2, 70, 64), torch.float32, dv=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_negative_scale(dtype, is_causal):
    # The kernels flip Q's sign for a negative scale (exact) and keep the scale's magnitude.
    # torch's CPU kernel returns NaN for it when causal (torch 2.13), so the baseline error is
    # the plain-PyTorch reference run in dtype.
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 130, 64, dtype=torch.float64, generator=g) for _ in range(4))
    kw = dict(scale=-0.15, is_causal=is_causal)
    ref = forward_backward(sdpa_reference, (q, k, v), grad, torch.float64, **kw)
    theirs = forward_backward(sdpa_reference, (q, k, v), grad, dtype, **kw)
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, dtype, **kw)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)


def test_sdpa_float16_and_custom_scale():
    check_sdpa((2, 2, 65, 64), (2, 2, 65, 64), torch.float16, scale=0.3)


def test_numpy_and_tensor_scalars_as_torch_takes_them():
    """A probe: scale=np.float32(0.5), a 0-d tensor scale, dropout_p=np.float32(0) and NumPy max_seqlen were refused
    ("must be a finite number") where torch's SDPA takes them."""
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    want = F.scaled_dot_product_attention(q, q, q, scale=0.5)
    for scale, p in ((np.float32(0.5), 0.0), (torch.tensor(0.5), np.float32(0.0)), (0.5, np.float64(0.0))):
        torch.testing.assert_close(llmcore.ops.scaled_dot_product_attention(q, q, q, scale=scale, dropout_p=p), want)
    flat, cu = q[0].transpose(0, 1).contiguous(), torch.tensor([0, 5], dtype=torch.int32)
    got = llmcore.ops.varlen_attention(flat, flat, flat, cu, cu, np.int64(5), np.int32(5), scale=0.5)
    torch.testing.assert_close(got, want[0].transpose(0, 1))
    for bad in ("0.5", float("nan"), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            llmcore.ops.scaled_dot_product_attention(q, q, q, scale=bad)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_gqa(hq, hkv, is_causal):
    check_sdpa((2, hq, 97, 64), (2, hkv, 97, 64), torch.float32, is_causal=is_causal, enable_gqa=True)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_one_query_head_broadcasts_over_key_heads_like_torch(backend):
    """A query with one head against keys and values with several (no enable_gqa) broadcasts as torch's does, one
    output head per key head; it was refused as a head count that does not divide (a probe)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 37, 32, dtype=torch.float64, generator=g) for h in (1, 4, 4))
    mask = torch.rand(2, 1, 37, 37, generator=g) > 0.3
    grad = torch.randn(2, 4, 37, 32, dtype=torch.float64, generator=g)
    ref = forward_backward(F.scaled_dot_product_attention, (q, k, v), grad, torch.float64, attn_mask=mask)
    theirs = forward_backward(F.scaled_dot_product_attention, (q, k, v), grad, torch.float32, attn_mask=mask)
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, torch.float32, attn_mask=mask,
                            backend=backend)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, torch.float32)
    with pytest.raises(ValueError, match="must be a multiple of key/value heads"):  # (torch refuses it too)
        llmcore.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("mask_shape", [(2, 3, 40, 90), (40, 90), (2, 1, 1, 90), (1, 3, 40, 1)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_masks_broadcast(mask_shape, kind):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(*mask_shape, generator=g) > 0.3
    else:
        mask = torch.randn(*mask_shape, generator=g) * 2
    check_sdpa((2, 3, 40, 32), (2, 3, 90, 32), torch.float32, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_are_zero_like_torch(dtype, kind):
    B, H, L, D = 2, 2, 33, 32
    keep = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[:, :, 5] = False  # row 5 sees nothing
    keep[1, :, 20:] = False  # and the last rows of batch 1
    mask = keep if kind == "bool" else torch.where(keep, 0.0, float("-inf"))
    ours = check_sdpa((B, H, L, D), (B, H, L, D), dtype, mask=mask)
    assert (ours[0][:, :, 5] == 0).all() and (ours[1][:, :, 5] == 0).all()
    # torch returns exactly the same zeros: compare with it directly too
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))
    m = mask if kind == "bool" else mask.to(dtype)
    torch.testing.assert_close(llmcore.scaled_dot_product_attention(q, k, v, attn_mask=m)[:, :, 5],
                               F.scaled_dot_product_attention(q, k, v, attn_mask=m)[:, :, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_positive_additive_mask_like_torch(cpu_isa, dtype):
    """A finite mask past FLT_MAX / log2(e) (~2.36e38) became +inf in base-2 units, and the row NaN (inf - inf in
    the softmax; a probe): it gives its key the weight, as torch and the float64 reference do."""
    mask = torch.zeros(2, 1, 17, 23)
    mask[:, :, ::2, 5] = 3e38  # even rows: key 5 takes all the weight
    mask[1, :, 1::4, 9] = 2.5e38
    out = check_sdpa((2, 2, 17, 32), (2, 2, 23, 32), dtype, mask=mask)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infinite_or_nan_additive_mask_is_nan_like_torch(cpu_isa, dtype):
    """A mask of +inf or NaN makes its row NaN in torch (inf - inf in the softmax), and through it every key's
    gradient in that batch. The clamp meant for huge finite masks turned +inf into FLT_MAX and the row finite, and
    the forward saved such rows' logsumexp as a fully masked row's -inf, so the gradients stayed finite (a probe).
    Compared with torch's math backend and float64: torch's fused CPU kernel is itself inconsistent here (its dv is
    NaN at one key in a batch and at every key in the other). Other rows, huge finite and -inf entries among them,
    still match."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, Lq, Lk, D = 2, 2, 21, 37, 32  # odd lengths: rows and keys cross the kernels' tile edges
    mask = torch.randn(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(3))
    mask[0, :, 4, 30] = float("inf")
    mask[0, :, 15, 2] = float("nan")
    mask[1, :, 19, [0, 36]] = float("inf")
    mask[:, :, 7, 11] = 3e38  # finite: key 11 takes the weight
    mask[:, :, 9, :20] = float("-inf")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    grad = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    ref = forward_backward(sdpa_reference, (q, k, v), grad, torch.float64, attn_mask=mask.double())
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, dtype, attn_mask=mask.to(dtype))
    with sdpa_kernel(SDPBackend.MATH):
        theirs = forward_backward(F.scaled_dot_product_attention, (q, k, v), grad, dtype, attn_mask=mask.to(dtype))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for name, a, b, r in zip(NAMES, ours, theirs, ref):
        assert torch.equal(a.isnan(), r.isnan()), name
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=name)
    nan_rows = ours[0].isnan().any(-1)
    assert nan_rows[0, :, 4].all() and nan_rows[0, :, 15].all() and nan_rows[1, :, 19].all()
    assert nan_rows.sum() == 3 * H and torch.equal(ours[1].isnan().any(-1), nan_rows)
    assert ours[2].isnan().all() and ours[3].isnan().all()  # each batch has a NaN row, which reaches all its keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e10, 1e19])
@pytest.mark.parametrize("kind", ["full", "causal", "additive"])
def test_a_key_with_huge_scores_takes_its_rows_like_float64(cpu_isa, dtype, magnitude, kind):
    """One key scaled by `magnitude` takes all the weight of the rows it scores high in and none of the others'.
    The kernels' exp argument s * c - max, one FMA, left that key's P 2^(s c - round(s c)), not 1: the forward's
    row became 0 at 1e19 (torch: that key's value), and the backward, whose P is 2^(s c - lse), was off by up to
    ulp(lse), which the huge key multiplies into dQ (1e4: dq off by 1e-2 of its size; 1e10: NaN). Float64 is the
    reference (torch's fused fp32 kernel is itself off by 1e-2 at 1e4 and NaN at 1e10). The key sits in the second
    key tile, so rows meet it after their running max was set by ordinary scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, L, D = 2, 2, 150, 24
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    k[:, :, 100] *= magnitude
    mask = torch.randn(L, L, generator=g) if kind == "additive" else None
    inputs = [t.to(dtype).double() for t in (q, k, v)]  # the reference sees the same rounded inputs
    with sdpa_kernel(SDPBackend.MATH):
        ref = forward_backward(F.scaled_dot_product_attention, inputs, grad.double(), torch.float64,
                               attn_mask=None if mask is None else mask.to(dtype).double(), is_causal=kind == "causal")
    ours = forward_backward(llmcore.scaled_dot_product_attention, inputs, grad, dtype,
                            attn_mask=None if mask is None else mask.to(dtype), is_causal=kind == "causal")
    took = (ref[0] - inputs[2][:, :, 100:101]).abs().amax(-1) < 1e-6  # rows the huge key took
    assert took.float().mean().item() > 0.1  # the case is what it says: rows that are the key's value
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-5  # of each tensor's largest entry
    for name, a, r in zip(NAMES, ours, ref):
        assert torch.isfinite(a).all(), name
        err = ((a - r).abs().max() / r.abs().max()).item()
        assert err <= tol, f"{name}: max error {err:.2e} of its largest entry"


@pytest.mark.parametrize("heads, lq, lk", [(2, 3, 0), (2, 0, 4), (0, 3, 4), (2, 0, 0)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_empty_scores_with_a_mask_like_torch(heads, lq, lk, kind):
    """No heads, queries or keys, with a mask: torch's empty or zero output, on the native backend too (its
    mask reshape failed: -1 is ambiguous for zero elements)."""
    q, k, v = torch.randn(2, heads, lq, 8), torch.randn(2, heads, lk, 8), torch.randn(2, heads, lk, 8)
    mask = torch.ones(lq, lk, dtype=torch.bool) if kind == "bool" else torch.zeros(lq, lk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for backend in ("cpu", "reference"):
        out = llmcore.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
        assert out.shape == expected.shape and torch.equal(out, expected), backend


def test_causal_with_more_queries_than_keys_is_top_left():
    # rows 0.. see keys j <= i (torch's alignment); nothing is fully masked here
    check_sdpa((1, 2, 40, 32), (1, 2, 10, 32), torch.float32, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,D", [(50, 32), (130, 64)])  # 130 x 64: whole 64-row query tiles read in place
def test_noncontiguous_and_broadcast_batch(dtype, L, D):
    B, H = 2, 4
    q = torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2).requires_grad_()  # a (B, L, H, D) tensor
    k = torch.randn(1, L, H, D, dtype=dtype).transpose(1, 2).requires_grad_()  # batch broadcasts
    v = torch.randn(B, H, D, L, dtype=dtype).transpose(-1, -2).requires_grad_()  # last dim strided
    grad = torch.randn(B, H, L, D, dtype=dtype)
    ours = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True)
    g_ours = torch.autograd.grad(ours, (q, k, v), grad)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g_theirs = torch.autograd.grad(theirs, (q, k, v), grad)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours, theirs, **tol)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("shape_q,shape_kv", [((2, 2, 3, 30, 16), (2, 1, 3, 30, 16)),  # 5-D, broadcasting
                                               ((2, 2, 3, 30, 16), (1, 2, 3, 30, 16)),
                                               ((2, 3, 30, 16), (1, 3, 30, 16))])
def test_leading_dims_broadcast(shape_q, shape_kv):
    check_sdpa(shape_q, shape_kv, torch.float32, is_causal=True)


@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_other_ranks(ndim):
    shape = {2: (30, 16), 3: (3, 30, 16), 5: (2, 2, 3, 30, 16)}[ndim]
    q, k, v = (torch.randn(*shape) for _ in range(3))
    out = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_every_cpu_isa(cpu_isa, is_causal):
    check_sdpa((2, 4, 97, 80), (2, 2, 97, 80), torch.float32, is_causal=is_causal, enable_gqa=True)
    check_sdpa((1, 2, 70, 64), (1, 2, 70, 64), torch.bfloat16, is_causal=is_causal)


def test_mask_requiring_grad_falls_back_to_reference():
    q, k, v = (torch.randn(1, 2, 10, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(10, 10, requires_grad=True)
    out = llmcore.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert mask.grad is not None
    with pytest.raises(RuntimeError, match="attn_mask requires grad"):
        llmcore.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_learned_bias_in_half_precision_as_accurate_as_torch(dtype):
    """A mask that requires grad (a learned bias) runs on the reference backend: in float32 for bf16 / fp16, its
    output and gradients are as close to float64 as torch's (computed in the input dtype they were ~10x off)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(1, 4, 128, 128, generator=g).to(dtype)
    grad = torch.randn(2, 4, 128, 64, generator=g).to(dtype)
    exact = [t.double().requires_grad_() for t in (q, k, v, bias)]
    ref = F.scaled_dot_product_attention(*exact[:3], attn_mask=exact[3], scale=1.0)
    ref.backward(grad.double())

    def errors(fn):
        ins = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = fn(*ins[:3], attn_mask=ins[3], scale=1.0)
        out.backward(grad)
        return [float((a.double() - b).abs().max()) for a, b in
                zip([out] + [t.grad for t in ins], [ref] + [t.grad for t in exact])]

    ours, theirs = errors(llmcore.scaled_dot_product_attention), errors(F.scaled_dot_product_attention)
    assert all(a <= 1.5 * b for a, b in zip(ours, theirs)), (ours, theirs)


def test_backend_reference_matches_cpu():
    q, k, v = (torch.randn(2, 2, 33, 32) for _ in range(3))
    torch.testing.assert_close(llmcore.scaled_dot_product_attention(q, k, v, backend="reference"),
                               llmcore.scaled_dot_product_attention(q, k, v, backend="cpu"), atol=2e-6, rtol=1e-5)


def bf16_kernels() -> list[str]:
    """The bf16 attention kernels this build and CPU can run: fp32 math on converted inputs always,
    AMX tiles and AVX512-BF16 dot products where present (the automatic choice prefers AMX)."""
    return ["fp32"] + ["amx"] * llmcore._C.amx_available() + ["avx512_bf16"] * llmcore._C.bf16_dot_available()


@pytest.mark.parametrize("kernel", bf16_kernels())
@pytest.mark.parametrize("is_causal", [False, True])
def test_bf16_kernels(kernel, is_causal):
    amx, dot = llmcore._C.amx_available(), llmcore._C.bf16_dot_available()
    if amx:
        llmcore._C.set_amx(kernel == "amx")
    if dot:
        llmcore._C.set_bf16_dot(kernel == "avx512_bf16")
    try:
        assert (llmcore._C.amx_enabled(), llmcore._C.bf16_dot_enabled()) == (kernel == "amx", kernel == "avx512_bf16")
        check_sdpa((2, 4, 300, 80), (2, 2, 300, 80), torch.bfloat16, is_causal=is_causal, enable_gqa=True)
        check_sdpa((1, 2, 33, 59), (1, 2, 70, 59), torch.bfloat16, mask=torch.rand(33, 70) > 0.3)
        check_varlen([5, 0, 1, 97, 40], [5, 0, 1, 97, 40], 2, 2, 64, torch.bfloat16, is_causal=is_causal)
    finally:
        if amx:
            llmcore._C.set_amx(True)
        if dot:
            llmcore._C.set_bf16_dot(True)
