"""Plain-PyTorch attention: the truth for tests and benchmarks, and the fallback backend.

Everything here is written for clarity, not speed. Pass float64 inputs to get the
reference the tests compare against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["sdpa_reference", "varlen_reference", "causal_mask"]


def causal_mask(len_q: int, len_k: int, bottom_right: bool = False, device=None) -> Tensor:
    """Boolean (len_q, len_k) mask, True where query i may attend key j.

    Top-left (torch's ``is_causal``): j <= i. Bottom-right (FlashAttention's varlen):
    j <= i + len_k - len_q.
    """
    shift = len_k - len_q if bottom_right else 0
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    return j <= i + shift


def sdpa_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
    dropout_keep: Optional[Tensor] = None,
    causal_bottom_right: bool = False,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, in float32 for float16 / bfloat16 inputs (as torch's math backend: in their
    own dtype the scores lose about ten times more), else in the inputs' dtype; returned in the inputs' dtype.

    Shapes: q (..., Hq, Lq, D), k (..., Hkv, Lk, D), v (..., Hkv, Lk, Dv) -> (..., Hq, Lq, Dv).
    ``attn_mask`` is boolean (True = attend) or additive, broadcastable to (..., Hq, Lq, Lk).
    Dropout: with ``dropout_keep`` (a boolean keep-mask of the score shape) that mask is
    applied and the kept weights are scaled by 1 / (1 - dropout_p); with only
    ``dropout_p`` > 0, a fresh mask is drawn from torch's generator.
    Rows whose every key is masked return 0 (and get zero gradients), as torch does.
    """
    if q.dtype in (torch.float16, torch.bfloat16):
        wide = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        return sdpa_reference(q.float(), k.float(), v.float(), wide, is_causal, scale, enable_gqa, dropout_p,
                              dropout_keep, causal_bottom_right).to(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    if enable_gqa and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * scale
    len_q, len_k = q.size(-2), k.size(-2)
    visible = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = causal_mask(len_q, len_k, causal_bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no finite score has no distribution: return zeros, not NaN.
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p) if dropout_p < 1.0 else probs * 0.0
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return probs @ v


def check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """The offsets' contract (start at 0, non-decreasing, end at the row count, no sequence longer than its
    max_seqlen), as the CPU backend checks it natively: a ValueError naming the first breach. Reads the offsets
    (a device sync on a GPU)."""
    for name, cu, total, mx, mx_name in (("cu_seqlens_q", cu_q, total_q, max_q, "max_seqlen_q"),
                                         ("cu_seqlens_k", cu_k, total_k, max_k, "max_seqlen_k")):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {c[0]}")
        if any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {c[:16]}")
        if c[-1] != total:
            raise ValueError(f"{name}[-1] = {c[-1]} but the tensor has {total} rows")
        if any(b - a > mx for a, b in zip(c, c[1:])):
            raise ValueError(f"{name} has a sequence longer than {mx_name} = {mx}")


def varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_keep: Optional[list] = None,
) -> Tensor:
    """Packed attention, one sequence at a time. q (total_q, Hq, D) -> (total_q, Hq, Dv).

    Causal masks are bottom-right aligned, as in FlashAttention's varlen API.
    ``dropout_keep``, if given, holds one (Hq, Lq_b, Lk_b) keep-mask per sequence.
    """
    out = q.new_zeros(q.size(0), q.size(1), v.size(-1))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]
        if qs.size(0) == 0:
            continue
        o = sdpa_reference(
            qs.transpose(0, 1),
            ks.transpose(0, 1),
            vs.transpose(0, 1),
            is_causal=is_causal,
            scale=scale,
            enable_gqa=True,
            dropout_p=dropout_p,
            dropout_keep=None if dropout_keep is None else dropout_keep[b],
            causal_bottom_right=True,
        )
        out[cq[b] : cq[b + 1]] = o.transpose(0, 1)
    if q.size(0) == 0 and any(t.requires_grad for t in (q, k, v)):
        out = out + (q.sum() + k.sum() + v.sum()) * 0  # no query rows: still an output of the inputs, as torch's
    return out
