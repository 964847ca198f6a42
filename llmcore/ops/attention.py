"""Scaled-dot-product attention: torch's semantics, llmcore's kernels.

``scaled_dot_product_attention`` mirrors ``torch.nn.functional.scaled_dot_product_attention``;
``varlen_attention`` mirrors FlashAttention's ``flash_attn_varlen_func`` for packed batches.
Both are differentiable in q, k and v, are ``torch.library`` custom ops (so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work; eager calls run the
same CPU implementations through plain autograd.Functions, without the custom-op dispatch)
and pick a backend from :mod:`llmcore.ops.dispatch`.

Fully masked rows (no key visible, through the mask, causality or an empty key sequence)
return 0 and receive zero gradients; torch 2.13's CPU kernels return the same. Their
logsumexp is -inf.
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from llmcore import _C
from llmcore.ops import _cpu
from llmcore.ops.dispatch import AttentionCall, select
from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops._shapes import broadcast_shape, broadcasts_to
from llmcore.ops.reference import check_cu_seqlens, sdpa_reference, varlen_reference

__all__ = ["scaled_dot_product_attention", "varlen_attention"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_4d(t: Tensor, batch: tuple, heads: int, rows: int, dim: int) -> Tensor:
    """t (*batch', heads, rows, dim), batch' broadcasting to ``batch`` -> (prod(batch), heads, rows, dim): t itself
    where it already is that (expand and reshape cost ~1-2 us a call each even as no-ops), else a view, or a copy
    where t broadcasts. Shared by the backends' sdpa."""
    if t.dim() == 4 and t.shape[0] == batch[0]:  # one batch dim (all inputs have the same rank), not broadcast
        return t
    return t.expand(*batch, heads, rows, dim).reshape(math.prod(batch), heads, rows, dim)


# ---------------------------------------------------------------------------------------
# CPU kernels, each behind a custom op (what torch.compile sees) and an eager autograd.Function
# (what eager calls take: the custom-op dispatch measured ~100 us of a ~110 us forward and
# ~260 us of a ~370 us forward + backward of a tiny call, as much as the kernels of a whole
# SST-2 batch's attention).


def _sdpa_fwd_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, rng):
    q, k, v = (_cpu.last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, _ = q.shape
    out = q.new_empty(B, Hq, Lq, v.size(-1))
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32)
    if out.numel() == 0 or k.size(2) == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    p = _cpu.problem(q, k, v, batch=B, len_q=Lq, len_k=k.size(2), scale=scale, is_causal=is_causal,
                     dropout_p=dropout_p, rng=rng, mask=attn_mask)
    _C.attention_forward(p, *_cpu.refs([q, k, v, out], packed=False), lse.data_ptr())
    return out, lse


def _sdpa_bwd_impl(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, rng):
    q, k, v, out, grad_out = (_cpu.last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    p = _cpu.problem(q, k, v, batch=q.size(0), len_q=q.size(2), len_k=k.size(2), scale=scale, is_causal=is_causal,
                     dropout_p=dropout_p, rng=rng, mask=attn_mask)
    _C.attention_backward(p, *_cpu.refs([q, k, v, out, grad_out, dq, dk, dv], packed=False), lse.data_ptr())
    return dq, dk, dv


def _check_op_args(q: Tensor, k: Tensor, v: Tensor, packed: bool, mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, rng: Optional[Tensor] = None, cu: tuple = (), outputs: dict = None) -> None:
    """What the kernels index by q's shape, checked where the custom ops are called directly (torch.ops.llmcore.*,
    torch.compile): mismatched tensors raise instead of reading out of bounds. The public functions build
    consistent arguments and call the kernels without these checks (the eager path)."""
    rank = 3 if packed else 4
    if any(t.dim() != rank for t in (q, k, v)):
        raise ValueError(f"q, k, v must be {rank}-D, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.dtype not in _cpu._DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of float32, bfloat16, float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    heads, rows, dim = (1, 0, 2) if packed else (1, 2, 3)
    if k.shape[rows] != v.shape[rows] or k.shape[heads] != v.shape[heads] or (not packed and not
                                                                             q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)} (batch, heads, "
                         "rows)")
    if k.shape[dim] != q.shape[dim] or (k.shape[heads] and q.shape[heads] % k.shape[heads]):
        raise ValueError(f"k {tuple(k.shape)} needs q's head dim and a head count dividing q's {tuple(q.shape)}")
    if mask is not None:
        if mask.dtype not in (torch.bool, torch.float32) or mask.dim() != 4:
            raise TypeError(f"the kernels take a 4-D bool or float32 mask, got {mask.dim()}-D {mask.dtype}")
        want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if any(m not in (1, w) for m, w in zip(mask.shape, want)):
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the scores {want}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0 and (rng is None or rng.numel() != 2):
        raise ValueError("dropout_p > 0 needs rng: the (seed, offset) tensor")
    for c in cu:
        if c.dtype != torch.int32 or c.dim() != 1 or not c.is_contiguous():
            raise TypeError(f"cu_seqlens must be contiguous 1-D int32, got {c.dim()}-D {c.dtype} "
                            f"{'' if c.is_contiguous() else '(strided)'}")
    if any(c.numel() == 0 for c in cu):  # (it said "batch must be >= 0")
        raise ValueError("cu_seqlens must start with 0 and hold one more entry than there are sequences, got an "
                         "empty tensor")
    if len(cu) == 2 and cu[0].numel() != cu[1].numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one entry per sequence each, got "
                         f"{cu[0].numel()} and {cu[1].numel()}")
    for name, (t, shape) in (outputs or {}).items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        # (the kernels read out and grad_out as q's dtype, lse as contiguous float32)
        want = torch.float32 if name == "lse" else q.dtype
        if t.dtype != want or (name == "lse" and not t.is_contiguous()):
            raise TypeError(f"{name} must be {'contiguous ' if name == 'lse' else ''}{want}, got "
                            f"{'' if t.is_contiguous() else 'strided '}{t.dtype}")


def _broadcast_mask(mask: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The mask as a (B, Hq, Lq, Lk) view: its size-1 dims get stride 0 (the kernels read it by its strides)."""
    return None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@torch.library.custom_op("llmcore::sdpa_fwd", mutates_args=(), device_types="cpu")
def _sdpa_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
    rng: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    _check_op_args(q, k, v, False, attn_mask, dropout_p, rng)
    attn_mask = _broadcast_mask(attn_mask, q, k)
    return _sdpa_fwd_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, rng)


@_sdpa_fwd.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, rng):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.size(-1)), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("llmcore::sdpa_bwd", mutates_args=(), device_types="cpu")
def _sdpa_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
    dropout_p: float, is_causal: bool, scale: float, rng: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    rows = (q.shape[0], q.shape[1], q.shape[2])
    _check_op_args(q, k, v, False, attn_mask, dropout_p, rng,
                   outputs={"out": (out, rows + (v.shape[3],)), "grad_out": (grad_out, rows + (v.shape[3],)),
                            "lse": (lse, rows)})
    attn_mask = _broadcast_mask(attn_mask, q, k)
    return _sdpa_bwd_impl(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, rng)


@_sdpa_bwd.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, rng):
    return _grads_like(q, k, v)


def _grads_like(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fakes of the backward ops: dq, dk, dv in the layouts the kernels write them (their inputs' with a unit
    last-dim stride), so that torch.compile's strides are the real ones."""
    return tuple(torch.empty_like(_cpu.last_dim_contiguous(t)) for t in (q, k, v))


def _sdpa_setup(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, rng = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], attn_mask, rng)
    ctx.args = (dropout_p, is_causal, scale)


def _sdpa_backward_with(bwd, ctx, grad_out, grad_lse):
    if grad_out is None:  # lse carries no gradient, and grads are not materialized (no zeros for it)
        return (None,) * 8
    q, k, v, out, lse, attn_mask, rng = ctx.saved_tensors
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, attn_mask, *ctx.args, rng)
    return dq, dk, dv, None, None, None, None, None


_sdpa_fwd.register_autograd(partial(_sdpa_backward_with, _sdpa_bwd), setup_context=_sdpa_setup)
_SdpaEager = _eager_function("_SdpaEager", _sdpa_fwd_impl, _sdpa_setup, partial(_sdpa_backward_with, _sdpa_bwd_impl),
                             differentiable=1)


def _varlen_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                     rng):
    # cu_seqlens values (start at 0, non-decreasing, end at the row count, within max_seqlen)
    # are checked by the native module, on real data, so tracing never needs them.
    q, k, v = (_cpu.last_dim_contiguous(t) for t in (q, k, v))
    out = q.new_zeros(q.size(0), q.size(1), v.size(-1))
    lse = torch.full((q.size(1), q.size(0)), float("-inf"), dtype=torch.float32)
    if out.numel() == 0 or k.size(0) == 0:  # nothing to compute, or every row fully masked: no native call
        check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), max_seqlen_q, max_seqlen_k)
        return out, lse
    p = _cpu.problem(q, k, v, batch=cu_seqlens_q.numel() - 1, len_q=max_seqlen_q, len_k=max_seqlen_k, scale=scale,
                     is_causal=is_causal, dropout_p=dropout_p, rng=rng, cu_seqlens=(cu_seqlens_q, cu_seqlens_k))
    _C.attention_forward(p, *_cpu.refs([q, k, v, out], packed=True), lse.data_ptr())
    return out, lse


def _varlen_bwd_impl(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                     is_causal, scale, rng):
    q, k, v, out, grad_out = (_cpu.last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # The kernel writes every row: cu_seqlens cover all of q's and k's rows.
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    p = _cpu.problem(q, k, v, batch=cu_seqlens_q.numel() - 1, len_q=max_seqlen_q, len_k=max_seqlen_k, scale=scale,
                     is_causal=is_causal, dropout_p=dropout_p, rng=rng, cu_seqlens=(cu_seqlens_q, cu_seqlens_k))
    _C.attention_backward(p, *_cpu.refs([q, k, v, out, grad_out, dq, dk, dv], packed=True), lse.data_ptr())
    return dq, dk, dv


@torch.library.custom_op("llmcore::varlen_fwd", mutates_args=(), device_types="cpu")
def _varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float, rng: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    _check_op_args(q, k, v, True, None, dropout_p, rng, (cu_seqlens_q, cu_seqlens_k))
    return _varlen_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                            scale, rng)


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, rng):
    return q.new_empty(q.size(0), q.size(1), v.size(-1)), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("llmcore::varlen_bwd", mutates_args=(), device_types="cpu")
def _varlen_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float,
    rng: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    rows = (q.shape[0], q.shape[1], v.shape[2])
    _check_op_args(q, k, v, True, None, dropout_p, rng, (cu_seqlens_q, cu_seqlens_k),
                   outputs={"out": (out, rows), "grad_out": (grad_out, rows), "lse": (lse, (q.shape[1], q.shape[0]))})
    return _varlen_bwd_impl(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, is_causal, scale, rng)


@_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
      scale, rng):
    return _grads_like(q, k, v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, rng = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, rng)
    ctx.args = (max_q, max_k, dropout_p, is_causal, scale)


def _varlen_backward_with(bwd, ctx, grad_out, grad_lse):
    if grad_out is None:  # as in _sdpa_backward_with
        return (None,) * 11
    q, k, v, out, lse, cu_q, cu_k, rng = ctx.saved_tensors
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args, rng)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_fwd.register_autograd(partial(_varlen_backward_with, _varlen_bwd), setup_context=_varlen_setup)
_VarlenEager = _eager_function("_VarlenEager", _varlen_fwd_impl, _varlen_setup,
                               partial(_varlen_backward_with, _varlen_bwd_impl), differentiable=1)


# ---------------------------------------------------------------------------------------
# public API


def _check_tensor(name: str, t, ndim_min: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dims, got shape {tuple(t.shape)}")


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (the custom ops are invisible to it).

    CPU and CUDA always have autocast; asking is_autocast_available only for other device types keeps this
    traceable by torch.compile in torch 2.11, whose dynamo cannot trace that builtin (fullgraph failed on an
    H200; torch 2.13 constant-folds it)."""
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def autocast_cast(device_type: str, *tensors):
    """``tensors`` as torch's autocast casts the inputs of an op on its lower-precision list (its SDPA): floating
    point ones, float64 excepted, to the autocast dtype; None and the rest as they are."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _real(x):
    """``x`` as a Python float where it is a real number as torch's SDPA takes one (a NumPy scalar, a 0-d tensor);
    else ``x`` itself, for the caller's check to name."""
    if isinstance(x, Tensor) and x.dim() == 0 and x.is_floating_point():
        return float(x)
    return float(x) if isinstance(x, numbers.Real) else x


def _check_common(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, scale: Optional[float],
                  is_causal: bool) -> tuple:
    """Checks what both attention entry points take; returns (dropout_p, scale) as Python floats. is_causal must
    be a bool, as torch's SDPA has it (a float there, from FlashAttention's argument order ``dropout_p,
    softmax_scale, causal``, ran causal, and the bool meant for it became the scale)."""
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r:.40} (arguments "
                        "in FlashAttention's order? llmcore's are dropout_p, is_causal, scale)")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match query dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but query is on {q.device}")
    if k.size(-1) != q.size(-1):
        raise ValueError(f"key head dim {k.size(-1)} does not match query head dim {q.size(-1)}")
    if q.size(-1) == 0:
        raise ValueError("query and key have head dim 0: the scores need at least one")
    dropout_p = _real(dropout_p)
    if not (isinstance(dropout_p, float) and 0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    scale = None if scale is None else _real(scale)
    if scale is not None and not (isinstance(scale, float) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return dropout_p, scale


def _draw_rng(dropout_p: float, device) -> Optional[Tensor]:
    """(seed, offset) for the kernels' Philox dropout, drawn from torch's generator."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes: query (..., Hq, Lq, E), key (..., Hkv, Lk, E), value (..., Hkv, Lk, Ev);
    returns (..., Hq, Lq, Ev). Leading dims broadcast. ``attn_mask`` is boolean (True =
    attend) or additive float, broadcastable to (..., Hq, Lq, Lk). ``is_causal`` masks
    key j > query i (top-left aligned, as torch). With ``enable_gqa``, Hq must be a
    multiple of Hkv and K/V heads are shared without being copied. Dropout uses a Philox
    stream seeded from torch's generator, so ``torch.manual_seed`` reproduces it. Under torch.autocast the
    floating inputs (the mask too; float64 excepted) are cast to its dtype, as torch's autocast casts its SDPA's.
    ``backend`` forces "cpu", "reference", ... (see :mod:`llmcore.ops.dispatch`).

    >>> q = k = v = torch.randn(2, 4, 16, 32)
    >>> scaled_dot_product_attention(q, k, v, is_causal=True).shape
    torch.Size([2, 4, 16, 32])
    """
    if isinstance(query, Tensor) and autocast_enabled(query.device.type):
        query, key, value, attn_mask = autocast_cast(query.device.type, query, key, value, attn_mask)
    _check_tensor("query", query, 2)
    _check_tensor("key", key, 2)
    _check_tensor("value", value, 2)
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same rank, got {query.dim()}, {key.dim()}, {value.dim()}")
    dropout_p, scale = _check_common(query, key, value, dropout_p, scale, is_causal)
    if key.size(-2) != value.size(-2):
        raise ValueError(f"key has {key.size(-2)} positions but value has {value.size(-2)}")
    nd = query.dim()
    if nd == 2:  # (L, E): one head
        query, key, value = query[None], key[None], value[None]
    hq, hkv = query.size(-3), key.size(-3)
    if value.size(-3) != hkv:
        raise ValueError(f"key has {hkv} heads but value has {value.size(-3)}")
    if hq == 1 and hkv > 1 and not enable_gqa:  # one query head broadcasts over the key/value heads, as in torch
        query = query.expand(*query.shape[:-3], hkv, *query.shape[-2:])
        hq = hkv
    if hq != hkv:
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
        if not enable_gqa and hkv != 1:  # (one key/value head broadcasts over the query's, as in torch)
            raise ValueError(f"query has {hq} heads but key/value have {hkv}; pass enable_gqa=True for "
                             "grouped-query attention")
        enable_gqa = True
    batch = query.shape[:-3]
    if not (key.shape[:-3] == batch == value.shape[:-3]):  # (broadcast_shape only where needed)
        batch = broadcast_shape(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        if batch is None:
            raise ValueError(f"batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                             f"{tuple(value.shape)} do not broadcast")
        batch = torch.Size(batch)
    lq, lk, e, ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    full_scores = (*batch, hq, lq, lk)
    mask_kind = "none"
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if not broadcasts_to(attn_mask.shape, full_scores):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' "
                             f"shape {full_scores}")
        mask_kind = "bool" if attn_mask.dtype == torch.bool else "additive"
    if scale is None:
        scale = 1.0 / math.sqrt(e)

    call = AttentionCall(query.device, query.dtype, e, ev, mask_kind,
                         attn_mask is not None and attn_mask.requires_grad, False, dropout_p > 0, math.prod(batch), hq)
    chosen = select(call, backend)
    if chosen.name == "reference":
        out = sdpa_reference(query, key, value, attn_mask, is_causal, scale, enable_gqa, dropout_p)
        return out[0] if nd == 2 else out
    if chosen.name == "cuda":
        from llmcore.ops.cuda_attention import sdpa as cuda_sdpa

        out = cuda_sdpa(query, key, value, batch, is_causal, scale)
        return out[0] if nd == 2 else out
    if chosen.name == "triton":
        from llmcore.ops.triton.attention import sdpa as triton_sdpa

        out = triton_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, batch)
        return out[0] if nd == 2 else out

    q4, k4, v4 = as_4d(query, batch, hq, lq, e), as_4d(key, batch, hkv, lk, e), as_4d(value, batch, hkv, lk, ev)
    mask4 = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(torch.float32)
        mask4 = m.expand(full_scores).reshape(math.prod(batch), hq, lq, lk)  # (-1 is ambiguous for empty scores)
    out, _ = _run_op(_sdpa_fwd, _SdpaEager, q4, k4, v4, mask4, float(dropout_p), bool(is_causal), float(scale),
                     _draw_rng(dropout_p, query.device))
    if len(batch) != 1:
        out = out.reshape(*batch, hq, lq, ev)
    return out[0] if nd == 2 else out


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention over packed sequences, like FlashAttention's ``flash_attn_varlen_func``.

    Shapes: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev); cu_seqlens_q and
    cu_seqlens_k are int32 (n + 1,) cumulative lengths starting at 0. Sequence b is rows
    [cu[b], cu[b + 1]) and attends only to its own keys. Hq must be a multiple of Hkv (GQA).
    Causal masks are aligned bottom-right (query i sees key j <= i + Lk_b - Lq_b), as in
    FlashAttention >= 2.1; with equal lengths this is the usual lower triangle. Returns
    (total_q, Hq, Ev).

    Under torch.autocast, q, k and v are cast as ``scaled_dot_product_attention``'s (torch's SDPA's) inputs are.

    >>> q = torch.randn(7, 2, 16); cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> varlen_attention(q, q, q, cu, cu, 4, 4, is_causal=True).shape
    torch.Size([7, 2, 16])
    """
    if isinstance(q, Tensor) and autocast_enabled(q.device.type):
        q, k, v = autocast_cast(q.device.type, q, k, v)
    _check_tensor("q", q, 3)
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (total, heads, head_dim), got shape {tuple(t.shape)}")
    if isinstance(scale, (bool, np.bool_)):  # (torch's SDPA takes False as 0; FlashAttention's order put it here)
        raise TypeError(f"scale must be a number or None, got {scale!r} (arguments in FlashAttention's order? "
                        "llmcore's are dropout_p, is_causal, scale)")
    dropout_p, scale = _check_common(q, k, v, dropout_p, scale, is_causal)
    if k.size(0) != v.size(0) or k.size(1) != v.size(1):
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must agree in tokens and heads")
    if q.size(1) != k.size(1) and (k.size(1) == 0 or q.size(1) % k.size(1) != 0):
        raise ValueError(f"query heads ({q.size(1)}) must be a multiple of key/value heads ({k.size(1)})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of n + 1 offsets, got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has {cu_seqlens_k.numel()}")
    for name, mx in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(mx, numbers.Integral) or isinstance(mx, bool) or not 0 <= mx < 2**63:  # (a NumPy int too)
            raise ValueError(f"{name} must be a non-negative int (below 2**63), got {mx!r}")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    if q.device.type == "meta":  # shapes only (a model traced on the meta device): cu_seqlens hold no values
        return q.new_empty(*q.shape[:-1], v.size(-1))

    call = AttentionCall(q.device, q.dtype, q.size(-1), v.size(-1), "none", False, True, dropout_p > 0,
                         cu_seqlens_q.numel() - 1, q.size(1))
    chosen = select(call, backend)
    if chosen.name == "reference":
        check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), max_seqlen_q, max_seqlen_k)
        return varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale, dropout_p)
    if chosen.name == "cuda":
        from llmcore.ops.cuda_attention import varlen as cuda_varlen

        return cuda_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale)
    if chosen.name == "triton":
        from llmcore.ops.triton.attention import varlen as triton_varlen

        return triton_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                             scale)
    out, _ = _run_op(_varlen_fwd, _VarlenEager, q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                     max_seqlen_q, max_seqlen_k, float(dropout_p), bool(is_causal), float(scale),
                     _draw_rng(dropout_p, q.device))
    return out
