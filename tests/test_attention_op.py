"""The custom-op side: dropout reproducibility, opcheck, torch.compile, and bad input."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore import _C
from llmcore.ops.reference import sdpa_reference, varlen_reference

from attention_checks import assert_close_to_ref, forward_backward


# --- dropout ---------------------------------------------------------------------------


def test_philox_matches_published_test_vectors():
    # Random123's kat_vectors for philox4x32-10
    assert _C.philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _C.philox4x32_10([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _C.philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def keep_mask(seed: int, offset: int, p: float, row0: int, rows: int, cols: int) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=torch.uint8)
    _C.dropout_keep_mask(seed, offset, p, row0, rows, cols, out.data_ptr())
    return out.bool()


def drawn_rng(seed: int) -> tuple[int, int]:
    """The (seed, offset) llmcore draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    s, o = torch.randint(0, 2**62, (2,), dtype=torch.int64).tolist()
    return s, o


@pytest.mark.parametrize("row0,rows,col0,cols", [(0, 1, 0, 1), (5, 15, 4, 3), (0, 17, 252, 5), (7, 70, 64, 63),
                                                (2**32 - 5, 33, 0, 130)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_kernel_dropout_masks_match_the_scalar_reference(cpu_isa, row0, rows, col0, cols, p):
    # The kernels draw whole tiles, rows as vector lanes (dropout_block); the reference draws one
    # row at a time, four columns per Philox call. Odd sizes, a row range crossing 2^32.
    seed, offset = 0x1234_5678_9ABC_DEF0, 2**32 - 1
    ref = keep_mask(seed, offset, p, row0, rows, col0 + cols)[:, col0:]
    for transposed in (False, True):
        out = torch.full((cols, rows) if transposed else (rows, cols), 7, dtype=torch.uint8)
        _C.dropout_keep_block(seed, offset, p, row0, rows, col0, cols, transposed, out.data_ptr())
        assert torch.equal(out.T if transposed else out, ref.to(torch.uint8)), (cpu_isa, transposed)


def test_dropout_keep_rate():
    keep = keep_mask(123, 7, 0.3, 0, 512, 1000)
    rate = keep.float().mean().item()
    assert abs(rate - 0.7) < 0.005, rate  # 512k draws: std 0.0006
    assert not keep_mask(1, 0, 1.0, 0, 4, 64).any()
    assert keep_mask(1, 0, 0.0, 0, 4, 64).all()


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_dropout_matches_reference_with_the_same_mask(cpu_isa, is_causal, dtype):
    B, H, L, D, p = 2, 3, 70, 32, 0.25
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for _ in range(4))
    seed, offset = drawn_rng(5)
    keep = keep_mask(seed, offset, p, 0, B * H * L, L).view(B, H, L, L)
    kw = dict(is_causal=is_causal, dropout_p=p, dropout_keep=keep)
    ref = forward_backward(sdpa_reference, (q, k, v), grad, torch.float64, **kw)
    theirs = forward_backward(sdpa_reference, (q, k, v), grad, dtype, **kw)
    torch.manual_seed(5)
    ours = forward_backward(llmcore.scaled_dot_product_attention, (q, k, v), grad, dtype, is_causal=is_causal,
                            dropout_p=p)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)


def test_varlen_dropout_matches_reference_with_the_same_mask(cpu_isa):
    lens, H, D, p = [5, 0, 40, 1, 17], 2, 32, 0.4
    cu = torch.tensor([0, 5, 5, 45, 46, 63], dtype=torch.int32)
    total = sum(lens)
    g = torch.Generator().manual_seed(1)
    q, k, v, grad = (torch.randn(total, H, D, dtype=torch.float64, generator=g) for _ in range(4))
    seed, offset = drawn_rng(9)
    full = keep_mask(seed, offset, p, 0, H * total, max(lens)).view(H, total, max(lens))  # row = h * total + token
    keeps = [full[:, cu[b] : cu[b + 1], : lens[b]] for b in range(len(lens))]
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True, dropout_p=p, dropout_keep=keeps)
    ref = forward_backward(varlen_reference, (q, k, v), grad, torch.float64, **kw)
    theirs = forward_backward(varlen_reference, (q, k, v), grad, torch.float32, **kw)
    torch.manual_seed(9)
    ours = forward_backward(llmcore.varlen_attention, (q, k, v), grad, torch.float32, cu_seqlens_q=cu,
                            cu_seqlens_k=cu, max_seqlen_q=40, max_seqlen_k=40, is_causal=True, dropout_p=p)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, torch.float32)


def test_dropout_reproduces_under_manual_seed():
    q, k, v = (torch.randn(2, 2, 50, 32, requires_grad=True) for _ in range(3))

    def run(seed):
        torch.manual_seed(seed)
        out = llmcore.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return out.detach(), grads

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert not torch.equal(a[0], c[0])


def test_dropout_one_zeroes_everything():
    q = torch.randn(1, 2, 9, 16)
    assert (llmcore.scaled_dot_product_attention(q, q, q, dropout_p=1.0) == 0).all()


@pytest.mark.parametrize("L,D", [(1, 32), (97, 64), (130, 80)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_logsumexp_matches_float64(cpu_isa, L, D, is_causal, dtype):
    # The forward saves lse = log2(sum_j 2^(log2(e) * scale * q.k_j)) per row for the backward;
    # checked here against float64 math. Without causality a boolean mask hides every key
    # from one row, whose lse is -inf.
    from llmcore.ops.attention import _sdpa_fwd_impl

    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(2, 3, L, D, generator=g).to(dtype) for _ in range(3))
    visible = torch.ones(L, L, dtype=torch.bool)
    if is_causal:
        visible = visible.tril()
        mask = None
    else:
        visible[L // 2] = False
        mask = visible.expand(2, 3, L, L)
    scale = D**-0.5
    _, lse = _sdpa_fwd_impl(q, k, v, mask, 0.0, is_causal, scale, None)
    s = scale * q.double() @ k.double().transpose(-1, -2)
    ref = torch.logsumexp(s.masked_fill(~visible, float("-inf")), dim=-1) / math.log(2)
    if mask is not None:
        assert torch.isneginf(lse[:, :, L // 2]).all()
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=2e-5)


# --- custom op: opcheck and torch.compile -----------------------------------------------


def _op_args(dropout: bool, mask: bool):
    q, k, v = (torch.randn(2, 4, 37, 32, requires_grad=True) for _ in range(3))
    m = (torch.rand(2, 4, 37, 37) > 0.2) if mask else None
    rng = torch.tensor([11, 3]) if dropout else None
    return (q, k, v, m, 0.3 if dropout else 0.0, not mask, 0.17, rng)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_opcheck_sdpa(dropout, mask):
    torch.library.opcheck(torch.ops.llmcore.sdpa_fwd.default, _op_args(dropout, mask))


def test_opcheck_varlen():
    cu = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 4, 32, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.llmcore.varlen_fwd.default, (q, k, v, cu, cu, 17, 17, 0.0, True, 0.2, None))


def test_opcheck_backward_ops_on_inputs_without_a_unit_last_stride():
    """The backward ops' fakes give dq, dk, dv the layouts the kernels write (unit last stride): they took the inputs'
    strides, which inductor asserted on ("expected stride 8==1") and opcheck's fake-tensor test refused."""
    qs = torch.randn(2, 2, 8, 5).transpose(-1, -2)
    o, lse = torch.ops.llmcore.sdpa_fwd(qs, qs, qs, None, 0.0, False, 0.3, None)
    torch.library.opcheck(torch.ops.llmcore.sdpa_bwd.default, (torch.randn_like(o), qs, qs, qs, o, lse, None, 0.0,
                                                                False, 0.3, None))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qv = torch.randn(8, 2, 5).permute(2, 1, 0)
    o, lse = torch.ops.llmcore.varlen_fwd(qv, qv, qv, cu, cu, 3, 3, 0.0, True, 0.3, None)
    torch.library.opcheck(torch.ops.llmcore.varlen_bwd.default, (torch.randn_like(o), qv, qv, qv, o, lse, cu, cu, 3, 3,
                                                                 0.0, True, 0.3, None))
    x = torch.randn(2, 2, 8, 5, requires_grad=True)

    def f(x):
        q = x.transpose(-1, -2)
        return (llmcore.scaled_dot_product_attention(q, q, q, is_causal=True) ** 2).sum()

    torch.testing.assert_close(torch.autograd.grad(torch.compile(f, backend="inductor", fullgraph=True)(x), x)[0],
                               torch.autograd.grad(f(x), x)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_the_inputs_as_torchs_sdpa(dtype):
    """torch's autocast casts its SDPA's floating inputs (the mask too) to the autocast dtype: llmcore's ops, which
    autocast does not see, returned float32 for float32 inputs and refused a float32 q with bf16 k/v."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.randn(9, 9, generator=g)
    for kw, key in ((dict(is_causal=True), k), (dict(attn_mask=mask), k), (dict(is_causal=True), k.to(dtype))):
        with torch.autocast("cpu", dtype=dtype):
            ours = llmcore.scaled_dot_product_attention(q, key, v, **kw)
            theirs = torch.nn.functional.scaled_dot_product_attention(q, key, v, **kw)
        assert ours.dtype == theirs.dtype == dtype
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-2)
        grads = [torch.autograd.grad(o.float().sum(), q) for o in (ours, theirs)]
        assert grads[0][0].dtype == torch.float32
        torch.testing.assert_close(*grads, atol=2e-3, rtol=2e-2)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.autocast("cpu", dtype=dtype):
        out = llmcore.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 5, 5)
    assert out.dtype == dtype


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    q, k, v = (torch.randn(2, 4, 33, 32, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 10, 33], dtype=torch.int32)

    def f(q, k, v):
        a = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = llmcore.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 23, 23)
        return a.sum() + b.sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager_grads = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


# --- bad input: a clear error naming the argument, never a crash ---------------------------


def qkv(*shape, dtype=torch.float32):
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: (torch.randn(2, 2, 8, 16, dtype=torch.float32), *qkv(2, 2, 8, 16, dtype=torch.bfloat16)[1:]),
         TypeError, "key dtype"),
        (lambda: (torch.randint(0, 5, (2, 2, 8, 16)), *qkv(2, 2, 8, 16)[1:]), TypeError, "query must be float"),
        (lambda: (torch.randn(16), torch.randn(16), torch.randn(16)), ValueError, "query must have at least 2 dims"),
        (lambda: (torch.randn(2, 2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16)), ValueError, "same rank"),
        (lambda: (torch.randn(2, 6, 8, 16), *qkv(2, 4, 8, 16)[1:]), ValueError, "multiple of key/value heads"),
        (lambda: (torch.randn(2, 4, 8, 16), *qkv(2, 2, 8, 16)[1:]), ValueError, "enable_gqa"),
        (lambda: (torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)),
         ValueError, "key head dim"),
        (lambda: (torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 9, 16)),
         ValueError, "value has 9"),
        (lambda: (torch.randn(2, 2, 8, 16), torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16)),
         ValueError, "do not broadcast"),
        (lambda: (torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16, device="meta"), torch.randn(2, 2, 8, 16)),
         ValueError, "key is on meta"),
        (lambda: (torch.randn(2, 4, 8, 16), *qkv(2, 0, 8, 16)[1:]), ValueError, r"multiple of key/value heads \(0\)"),
        (lambda: qkv(2, 2, 8, 0), ValueError, "head dim 0"),
    ],
)
def test_sdpa_bad_input(make, err, match):
    q, k, v = make()
    with pytest.raises(err, match=match):
        llmcore.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_one_key_value_head_broadcasts_as_in_torch(backend):
    """torch broadcasts a key/value head count of 1 over the query's heads without enable_gqa (its matmuls
    broadcast); llmcore asked for enable_gqa=True (a probe). Outputs and gradients as torch's."""
    q, k, v = (torch.randn(2, h, n, 8, dtype=torch.float64 if backend == "reference" else torch.float32,
                           requires_grad=True) for h, n in ((3, 5), (1, 7), (1, 7)))
    ours = llmcore.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.randn_like(ours)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(attn_mask=torch.ones(3, 8, 8, dtype=torch.bool)), ValueError, "attn_mask of shape"),
        (dict(attn_mask=torch.ones(8, 8, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
        (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), ValueError, "not both"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(backend="nope"), ValueError, "backend='nope' is unknown"),
        # (torch's TypeError too; llmcore ran causal for any truthy value)
        (dict(is_causal=0.5), TypeError, "is_causal must be a bool, got float"),
        (dict(is_causal="no"), TypeError, "is_causal must be a bool, got str"),
    ],
)
def test_sdpa_bad_options(kwargs, err, match):
    q, k, v = qkv(2, 2, 8, 16)
    with pytest.raises(err, match=match):
        llmcore.scaled_dot_product_attention(q, k, v, **kwargs)


def test_forced_backend_that_cannot_run_explains_why():
    q, k, v = qkv(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run this call: dtype torch.float64"):
        llmcore.scaled_dot_product_attention(q, k, v, backend="cpu")
    # auto-selection falls back to the reference for float64
    torch.testing.assert_close(llmcore.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_no_backend_fits_lists_every_reason():
    from llmcore.ops.dispatch import AttentionCall, select

    call = AttentionCall(torch.device("cpu"), torch.int8, 64, 64, "none", False, False, False)
    with pytest.raises(RuntimeError) as e:
        select(call)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"  {name}: " in str(e.value)


def test_calls_the_cuda_kernels_cannot_launch_go_to_the_triton_backend(monkeypatch):
    """More than 65535 sequences or heads: one CUDA kernel launch cannot hold them (grid y, z); the Triton
    kernels split them. Here the two backends stand as if on a GPU (no GPU needed to choose)."""
    from llmcore.ops import dispatch
    from llmcore.ops.dispatch import AttentionCall, select

    cuda = dataclasses.replace(dispatch._BY_NAME["cuda"], unavailable=lambda: None)
    triton = dataclasses.replace(dispatch._BY_NAME["triton"], unavailable=lambda: None)
    monkeypatch.setattr(dispatch, "BACKENDS", (cuda, triton))
    monkeypatch.setattr(dispatch, "_BY_NAME", {"cuda": cuda, "triton": triton})

    def call(sequences, heads):
        return AttentionCall(torch.device("cuda"), torch.bfloat16, 64, 64, "none", False, True, False,
                             sequences, heads)

    assert select(call(65535, 32)).name == "cuda"
    assert select(call(65536, 32)).name == "triton"
    assert select(call(4, 70000)).name == "triton"
    with pytest.raises(RuntimeError, match="65536 sequences x 32 heads: more than 65535"):
        select(call(65536, 32), "cuda")


def test_cuda_tensors_prefer_triton_then_cuda(monkeypatch):
    """The order of automatic selection: on a GPU, Triton (1.3-1.8x the CUDA C++ kernels in every mode the H200
    timed), then the CUDA kernels where Triton is missing; on the CPU, the CPU kernels. Both GPU backends stand
    here as if on a GPU (no GPU needed to choose)."""
    from llmcore.ops import dispatch
    from llmcore.ops.dispatch import AttentionCall, select

    def standing(missing: str = ""):
        backends = tuple(dataclasses.replace(b, unavailable=(lambda: None) if b.name != missing else
                                             (lambda: "Triton is not installed"))
                         if b.name in ("cuda", "triton") else b for b in dispatch.BACKENDS)
        monkeypatch.setattr(dispatch, "BACKENDS", backends)
        monkeypatch.setattr(dispatch, "_BY_NAME", {b.name: b for b in backends})

    def call(device):
        return AttentionCall(torch.device(device), torch.bfloat16, 64, 64, "none", False, False, False)

    standing()
    assert select(call("cuda")).name == "triton"
    assert select(call("cpu")).name == "cpu"
    standing(missing="triton")
    assert select(call("cuda")).name == "cuda"


def test_the_call_counts_sequences_and_heads(monkeypatch):
    from llmcore.ops import attention

    seen, real = [], attention.select

    def spy(call, backend=None):
        seen.append(call)
        return real(call, backend)

    monkeypatch.setattr(attention, "select", spy)
    q = torch.randn(2, 3, 5, 4, 16)
    llmcore.scaled_dot_product_attention(q, q, q)
    packed = torch.randn(9, 4, 16)
    llmcore.varlen_attention(packed, packed, packed, _cu(0, 2, 2, 9), _cu(0, 2, 2, 9), 7, 7)
    assert [(c.sequences, c.heads, c.varlen) for c in seen] == [(6, 5, False), (3, 4, True)]


def _cu(*xs):
    return torch.tensor(xs, dtype=torch.int32)


@pytest.mark.parametrize(
    "cu_q, cu_k, max_q, max_k, err, match",
    [
        (_cu(0, 5, 3, 10), _cu(0, 5, 3, 10), 7, 7, ValueError, "non-decreasing"),
        (_cu(1, 5, 10), _cu(1, 5, 10), 9, 9, ValueError, "must start at 0"),
        (_cu(0, 5, 9), _cu(0, 5, 9), 5, 5, ValueError, r"cu_seqlens_q\[-1\] = 9"),
        (_cu(0, 5, 10), _cu(0, 5, 10), 4, 9, ValueError, "longer than max_seqlen"),
        (torch.tensor([0, 5, 10]), _cu(0, 5, 10), 5, 5, ValueError, "1-D int32"),
        (_cu(0, 10), _cu(0, 5, 10), 10, 10, ValueError, "entries"),
        (_cu(0, 5, 10), _cu(0, 5, 10), -1, 5, ValueError, "max_seqlen_q"),
        (_cu(0, 5, 10), _cu(0, 5, 10), 5, 2**64, ValueError, r"max_seqlen_k must be .*below 2\*\*63"),  # (a probe)
    ],
)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_varlen_bad_input(cu_q, cu_k, max_q, max_k, err, match, backend):
    q, k, v = qkv(10, 2, 16)
    with pytest.raises(err, match=match):  # (the reference backend, also float64's automatic one, read them wrongly)
        llmcore.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend)
    with pytest.raises(err, match=match):
        llmcore.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k)


@pytest.mark.parametrize("empty", ["q", "k"])
def test_varlen_bad_offsets_of_the_other_side_when_one_side_is_empty(empty):
    """No query rows, or no key rows: nothing reaches the native checks, the other side's offsets are still read."""
    rows = {"q": 0, "k": 0}
    rows["k" if empty == "q" else "q"] = 7
    q, k, v = torch.randn(rows["q"], 2, 16), torch.randn(rows["k"], 2, 16), torch.randn(rows["k"], 2, 16)
    zeros, bad = _cu(0, 0, 0), _cu(0, 5, 3)
    cu_q, cu_k = (zeros, bad) if empty == "q" else (bad, zeros)
    side = "k" if empty == "q" else "q"
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=f"cu_seqlens_{side} must be non-decreasing"):
            llmcore.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, backend=backend)


def test_varlen_without_query_rows_keeps_the_graph():
    """No query rows: an empty output that still backpropagates (zero gradients), on every CPU backend, as torch's
    dense attention does with Lq = 0."""
    cq, ck = _cu(0, 0, 0), _cu(0, 2, 5)
    for backend in ("cpu", "reference"):
        q = torch.randn(0, 2, 16, requires_grad=True)
        k, v = torch.randn(5, 2, 16, requires_grad=True), torch.randn(5, 2, 16, requires_grad=True)
        out = llmcore.varlen_attention(q, k, v, cq, ck, 0, 3, backend=backend)
        assert out.shape == (0, 2, 16) and out.requires_grad, backend
        out.sum().backward()
        assert (k.grad == 0).all() and (v.grad == 0).all() and q.grad.shape == q.shape, backend


def test_varlen_bad_shapes():
    cu = _cu(0, 10)
    with pytest.raises(ValueError, match="q must be"):
        llmcore.varlen_attention(torch.randn(1, 10, 2, 16), *qkv(10, 2, 16)[1:], cu, cu, 10, 10)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        llmcore.varlen_attention(torch.randn(10, 3, 16), *qkv(10, 2, 16)[1:], cu, cu, 10, 10)
    # FlashAttention's order (dropout_p, softmax_scale, causal) ran causal with a scale of 0, silently (a probe)
    for args, name in (((0.0, 0.125, False), "scale"), ((0.0, 0.125), "is_causal")):
        with pytest.raises(TypeError, match=f"{name} must be a .*FlashAttention's order"):
            llmcore.varlen_attention(*qkv(10, 2, 16), cu, cu, 10, 10, *args)


def test_native_module_rejects_bad_problems_without_crashing():
    p = _C.AttentionProblem()
    p.batch, p.heads_q, p.heads_kv, p.len_q, p.len_k, p.head_dim, p.head_dim_v = 1, 3, 2, 4, 4, 8, 8
    ref = _C.TensorRef(1, 0, 0, 0)
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        _C.attention_forward(p, ref, ref, ref, ref, 1)
    p.heads_q = 2
    with pytest.raises(ValueError, match="null data pointer"):
        _C.attention_forward(p, _C.TensorRef(0, 0, 0, 0), ref, ref, ref, 1)
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        _C.set_cpu_isa("sse9")


def test_concurrent_calls_from_python_threads():
    # each calling thread has its own kernel workspace; results must not mix
    import threading

    inputs = [tuple(torch.randn(2, 4, 100, 32, generator=torch.Generator().manual_seed(s)) for _ in range(3))
              for s in range(4)]
    expected = [llmcore.scaled_dot_product_attention(*x, is_causal=True) for x in inputs]
    failures = []

    def work(i):
        for _ in range(5):
            out = llmcore.scaled_dot_product_attention(*inputs[i], is_causal=True)
            if not torch.equal(out, expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# --- eager dispatch: an autograd node only where a gradient can flow ------------------------


def _native_ops():
    from llmcore.ops import bias_gelu, dropout, layer_norm, rms_norm, swiglu

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    return {  # name -> (input shape, op of one input tensor); every one runs a native CPU kernel here
        "sdpa": ((2, 3, 17, 16), lambda t: llmcore.scaled_dot_product_attention(t, t * 0.5, t, is_causal=True)),
        "varlen": ((7, 2, 16), lambda t: llmcore.varlen_attention(t, t * 0.5, t, cu, cu, 4, 4, is_causal=True)),
        "layer_norm": ((5, 24), lambda t: layer_norm(t, torch.ones(24), torch.zeros(24))),
        "rms_norm": ((5, 24), lambda t: rms_norm(t, torch.ones(24))),
        "bias_gelu": ((5, 24), lambda t: bias_gelu(t, torch.ones(24))),
        "swiglu": ((5, 24), lambda t: swiglu(t, t * 0.5)),
        "dropout": ((5, 24), lambda t: dropout(t, 0.3)),
    }


@pytest.mark.parametrize("name", list(_native_ops()))
def test_grad_free_calls_build_no_autograd_node(name):
    shape, op = _native_ops()[name]
    x = torch.randn(*shape, requires_grad=True)
    torch.manual_seed(1)  # dropout draws its mask from torch's generator
    tracked = op(x)
    assert tracked.grad_fn is not None
    torch.manual_seed(1)
    with torch.no_grad():
        untracked = op(x)
    torch.manual_seed(1)
    plain = op(x.detach())  # grad mode on, but nothing requires grad
    for out in (untracked, plain):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, tracked.detach())  # the same kernel either way


@pytest.mark.parametrize("name", list(_native_ops()))
def test_forward_mode_ad_raises_rather_than_dropping_the_tangent(name):
    import torch.autograd.forward_ad as fwAD

    shape, op = _native_ops()[name]
    x = torch.randn(*shape)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="jvp"):
            op(dual)


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.llmcore.sdpa_fwd(torch.randn(4, 2, 8, 8), *[torch.randn(1, 2, 8, 8)] * 2, None, 0.0, False, 1.0,
                                        None), "do not match q"),  # (a segfault)
    (lambda: torch.ops.llmcore.sdpa_fwd(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 3, 8),
                                        None, 0.0, False, 1.0, None), "do not match q"),
    (lambda: torch.ops.llmcore.sdpa_fwd(torch.randn(1, 2, 8, 8), *[torch.randn(1, 2, 8, 8).bfloat16()] * 2, None, 0.0,
                                        False, 1.0, None), "must share one of"),
    (lambda: torch.ops.llmcore.sdpa_fwd(*[torch.randn(1, 1, 4, 8)] * 3, torch.zeros(1, 1, 4, 4).half(), 0.0, False, 1.0,
                                        None), "bool or float32 mask"),
    (lambda: torch.ops.llmcore.sdpa_fwd(*[torch.randn(1, 1, 4, 8)] * 3, None, 0.5, False, 1.0, None), "needs rng"),
    (lambda: torch.ops.llmcore.sdpa_bwd(*[torch.randn(2, 2, 8, 8)] * 5, torch.zeros(1, 1, 1), None, 0.0, False, 1.0,
                                        None), "lse must have shape"),
    (lambda: torch.ops.llmcore.varlen_fwd(*[torch.randn(8, 2, 8)] * 3, *[torch.tensor([0, 8])] * 2, 8, 8, 0.0, False,
                                          1.0, None), "int32"),
    # (a probe: the kernels read out / grad_out as q's dtype and lse as contiguous float32, whatever was passed; a
    # shorter cu_seqlens_k was read past its end, a strided one by its storage)
    (lambda: torch.ops.llmcore.sdpa_bwd(*[torch.randn(1, 2, 8, 8)] * 4, torch.randn(1, 2, 8, 8).bfloat16(),
                                        torch.zeros(1, 2, 8), None, 0.0, False, 1.0, None),
     "out must be torch.float32"),
    (lambda: torch.ops.llmcore.sdpa_bwd(torch.randn(1, 2, 8, 8).double(), *[torch.randn(1, 2, 8, 8)] * 4,
                                        torch.zeros(1, 2, 8), None, 0.0, False, 1.0, None), "grad_out must be"),
    (lambda: torch.ops.llmcore.sdpa_bwd(*[torch.randn(1, 2, 8, 8)] * 5, torch.zeros(1, 8, 2).transpose(1, 2), None,
                                        0.0, False, 1.0, None), "lse must be contiguous torch.float32, got strided"),
    (lambda: torch.ops.llmcore.varlen_bwd(*[torch.randn(8, 2, 8)] * 5, torch.zeros(2, 8).bfloat16(),
                                          *[torch.tensor([0, 8], dtype=torch.int32)] * 2, 8, 8, 0.0, False, 1.0, None),
     "lse must be contiguous torch.float32"),
    (lambda: torch.ops.llmcore.varlen_fwd(*[torch.randn(8, 2, 8)] * 3, torch.tensor([0, 4, 8], dtype=torch.int32),
                                          torch.tensor([0, 8], dtype=torch.int32), 8, 8, 0.0, False, 1.0, None),
     "one entry per sequence each, got 3 and 2"),
    (lambda: torch.ops.llmcore.varlen_fwd(*[torch.randn(8, 2, 8)] * 3, *[torch.tensor([0, 3, 8, 9, 8],
                                          dtype=torch.int32)[::2]] * 2, 8, 8, 0.0, False, 1.0, None), "strided"),
    # (a probe: a negative dropout_p ran, an empty cu_seqlens said "batch must be >= 0")
    (lambda: torch.ops.llmcore.sdpa_fwd(*[torch.randn(1, 1, 4, 8)] * 3, None, -0.5, False, 1.0,
                                        torch.tensor([1, 2])), r"dropout_p must be in \[0, 1\], got -0.5"),
    (lambda: torch.ops.llmcore.varlen_fwd(*[torch.randn(8, 2, 8)] * 3, *[torch.zeros(0, dtype=torch.int32)] * 2, 8, 8,
                                          0.0, False, 1.0, None), "cu_seqlens must start with 0 .* an empty tensor"),
    (lambda: torch.ops.llmcore.rotary(torch.randn(8), torch.randn(8), torch.randn(8), False, False),
     r"x must be \(\.\.\., heads, head_dim\)"),
])
def test_direct_op_calls_check_their_arguments(call, message):
    """The custom ops called directly (torch.ops.llmcore.*, as torch.compile does) with tensors that do not fit
    together segfaulted or read out of bounds (found by a probe): they raise, naming the mismatch."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_direct_op_call_broadcasts_a_size_one_mask():
    """A (1, 1, 1, 1) mask given to the op directly was read by its strides past its one element."""
    q = torch.randn(1, 2, 32, 8)
    out, _ = torch.ops.llmcore.sdpa_fwd(q, q, q, torch.zeros(1, 1, 1, 1), 0.0, False, 8 ** -0.5, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q), rtol=1e-5, atol=1e-5)


def test_a_mask_that_does_not_broadcast_is_a_value_error_under_compile():
    """The shape checks caught torch.broadcast_shapes' RuntimeError; under torch.compile it fails inside a fake-tensor
    call dynamo cannot catch, and came out as torch's TorchRuntimeError, not llmcore's ValueError (a probe)."""
    q = torch.randn(2, 2, 9, 16)
    compiled = torch.compile(lambda q, m: llmcore.scaled_dot_product_attention(q, q, q, attn_mask=m),
                             backend="aot_eager")
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 1, 9, 5\) does not broadcast"):
        compiled(q, torch.zeros(2, 1, 9, 5))
    with pytest.raises(ValueError, match="batch dims of query .* do not broadcast"):
        torch.compile(lambda q, k: llmcore.scaled_dot_product_attention(q, k, k), backend="aot_eager")(
            torch.randn(2, 3, 1, 4, 8), torch.randn(2, 2, 1, 4, 8))


def test_shape_broadcasting_matches_torch():
    from llmcore.ops._shapes import broadcast_shape, broadcasts_to

    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        shapes = [tuple(int(d) for d in torch.randint(0, 4, (int(torch.randint(0, 4, (1,), generator=g)),),
                                                      generator=g)) for _ in range(int(torch.randint(1, 4, (1,),
                                                                                                     generator=g)))]
        try:
            want = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            want = None
        assert broadcast_shape(*shapes) == want, shapes
        try:
            fits = tuple(torch.broadcast_shapes(shapes[0], shapes[-1])) == shapes[-1]
        except RuntimeError:
            fits = False
        assert broadcasts_to(shapes[0], shapes[-1]) == fits, shapes
