"""Launches the native CPU kernels: turns tensors into pointers, sizes and strides."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmcore import _C

_DTYPES = {torch.float32: _C.DType.f32, torch.bfloat16: _C.DType.bf16, torch.float16: _C.DType.f16}


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _ref_dense(t: Tensor) -> "_C.TensorRef":  # (B, H, L, D)
    return _C.TensorRef(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _ref_packed(t: Tensor) -> "_C.TensorRef":  # (total, H, D)
    return _C.TensorRef(t.data_ptr(), 0, t.stride(1), t.stride(0))


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
    p = _C.AttentionProblem()
    p.dtype = _DTYPES[q.dtype]
    p.batch = batch
    p.heads_q, p.heads_kv = q.size(1), k.size(1)  # (B, H, L, D) and (total, H, D) alike
    p.len_q, p.len_k = len_q, len_k
    p.head_dim, p.head_dim_v = q.size(-1), v.size(-1)
    p.scale = scale
    p.causal = is_causal
    p.causal_bottom_right = cu_seqlens is not None
    p.dropout_p = dropout_p
    if dropout_p > 0.0:
        seed, offset = (int(x) for x in rng.tolist())
        p.seed, p.offset = seed & (2**64 - 1), offset & (2**64 - 1)
    p.num_threads = torch.get_num_threads()  # share torch's budget rather than oversubscribe
    if mask is not None:
        p.mask_kind = _C.MaskKind.boolean if mask.dtype == torch.bool else _C.MaskKind.additive
        p.set_mask(mask.data_ptr(), list(mask.stride()))
    if cu_seqlens is not None:
        p.set_cu_seqlens(cu_seqlens[0].data_ptr(), cu_seqlens[1].data_ptr())
        p.total_q, p.total_k = q.size(0), k.size(0)
    return p


def refs(tensors: list[Tensor], packed: bool) -> list["_C.TensorRef"]:
    return [(_ref_packed if packed else _ref_dense)(t) for t in tensors]
