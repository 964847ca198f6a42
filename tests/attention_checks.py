"""The accuracy rule of the attention tests, after FlashAttention's test suite, and the varlen
check the dense and varlen tests share.

A result in dtype ``dt`` passes when its max error against the float64 reference is at
most twice torch's own error in ``dt`` against the same reference, plus the rounding
error ``dt`` makes on values of the reference's size (so an exact torch result does not
demand an exact llmcore result).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import llmcore
from llmcore.ops.reference import varlen_reference


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    return 2 * ((ref.to(dtype) + 0.3 - 0.3).double() - ref).abs().max().item() if ref.numel() else 0.0


def assert_close_to_ref(name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(ours.double()).all(), f"{name}: non-finite values"
    err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    bound = 2 * torch_err + rounding_floor(ref, dtype)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (torch's error {torch_err:.3e})"


def forward_backward(fn, inputs, grad_out, dtype, **kwargs):
    """Runs fn on copies of inputs cast to dtype; returns [out, *grads] in float64."""
    leaves = [t.detach().clone().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def cu(lengths):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return out


def padded_sdpa(q, k, v, lens_q, lens_k, is_causal, sdpa=F.scaled_dot_product_attention):
    """sdpa on packed (total, H, D) q, k, v padded to (n, H, L, D), with a mask that hides padded keys
    and, with is_causal, keys past each sequence's bottom-right diagonal; returns the packed output."""
    n, mq, mk = len(lens_q), max(lens_q), max(lens_k)
    vq = (torch.arange(mq)[None, :] < torch.tensor(lens_q)[:, None]).to(q.device)  # (n, mq) True = real
    vk = (torch.arange(mk)[None, :] < torch.tensor(lens_k)[:, None]).to(q.device)

    def pad(x, valid, rows):
        out = x.new_zeros(n, rows, x.size(1), x.size(2))
        out[valid] = x
        return out.transpose(1, 2)

    mask = vk[:, None, None, :].expand(n, 1, mq, mk)
    if is_causal:
        shift = torch.tensor(lens_k) - torch.tensor(lens_q)
        causal = torch.arange(mk)[None, None, :] <= torch.arange(mq)[None, :, None] + shift[:, None, None]
        mask = mask & causal[:, None].to(q.device)
    out = sdpa(pad(q, vq, mq), pad(k, vk, mk), pad(v, vk, mk), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)[vq]


def torch_padded_grads(q, k, v, grad, lens_q, lens_k, is_causal, dtype):
    """padded_sdpa's output and gradients in dtype, as float64: torch's own error baseline."""
    leaves = [t.detach().clone().to(dtype).requires_grad_() for t in (q, k, v)]
    out = padded_sdpa(*leaves, lens_q, lens_k, is_causal)
    out.backward(grad.to(dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def check_varlen(lens_q, lens_k, hq, hkv, d, dtype, is_causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(tk, hkv, d, dtype=torch.float64, generator=g)
    v = torch.randn(tk, hkv, d, dtype=torch.float64, generator=g)
    grad = torch.randn(tq, hq, d, dtype=torch.float64, generator=g)
    cq, ck = cu(lens_q), cu(lens_k)
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    ref = forward_backward(varlen_reference, (q, k, v), grad, torch.float64, cu_seqlens_q=cq, cu_seqlens_k=ck,
                           is_causal=is_causal)
    ours = forward_backward(llmcore.varlen_attention, (q, k, v), grad, dtype, cu_seqlens_q=cq, cu_seqlens_k=ck,
                            max_seqlen_q=mq, max_seqlen_k=mk, is_causal=is_causal)
    theirs = torch_padded_grads(q, k, v, grad, lens_q, lens_k, is_causal, dtype)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert_close_to_ref(name, a, b, r, dtype)
    return ours
