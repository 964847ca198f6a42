"""Launches the native CPU kernels: turns tensors into pointers, sizes and strides. ``problem``
also describes the CUDA backend's calls (cuda_attention.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmcore import _C, _fork

_DTYPES = {torch.float32: _C.DType.f32, torch.bfloat16: _C.DType.bf16, torch.float16: _C.DType.f16}


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _ref_dense(t: Tensor) -> "_C.TensorRef":  # (B, H, L, D)
    s = t.stride()
    return _C.TensorRef(t.data_ptr(), s[0], s[1], s[2])


def _ref_packed(t: Tensor) -> "_C.TensorRef":  # (total, H, D)
    s = t.stride()
    return _C.TensorRef(t.data_ptr(), 0, s[1], s[0])


def problem(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    batch: int,
    len_q: int,
    len_k: int,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    rng: Optional[Tensor],
    mask: Optional[Tensor] = None,
    cu_seqlens: Optional[tuple[Tensor, Tensor]] = None,
) -> "_C.AttentionProblem":
    # Each call here is paid on every attention call, with caches cold from the kernels: the sizes
    # go in through one constructor call, read from the shape tuples (not one size() call each).
    qs, ks, vs = q.shape, k.shape, v.shape
    # heads: dim 1 of (B, H, L, D) and (total, H, D) alike. torch's thread budget is shared
    # rather than oversubscribed.
    p = _C.AttentionProblem(_DTYPES[q.dtype], batch, qs[1], ks[1], len_q, len_k, qs[-1], vs[-1], scale, is_causal,
                            cu_seqlens is not None, _fork.num_threads())
    if dropout_p > 0.0:
        seed, offset = (int(x) for x in rng.tolist())
        p.dropout_p = dropout_p
        p.seed, p.offset = seed & (2**64 - 1), offset & (2**64 - 1)
    if mask is not None:
        p.mask_kind = _C.MaskKind.boolean if mask.dtype == torch.bool else _C.MaskKind.additive
        p.set_mask(mask.data_ptr(), list(mask.stride()))
    if cu_seqlens is not None:
        p.set_cu_seqlens(cu_seqlens[0].data_ptr(), cu_seqlens[1].data_ptr())
        p.total_q, p.total_k = qs[0], ks[0]
    return p


def refs(tensors: list[Tensor], packed: bool) -> list["_C.TensorRef"]:
    return [(_ref_packed if packed else _ref_dense)(t) for t in tensors]
