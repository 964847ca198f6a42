"""The ``cuda`` attention backend: llmcore's CUDA C++ kernels (csrc/attention/cuda/).

FlashAttention-2's algorithm on mma.sync tensor cores, compiled for sm_80 and sm_90a (the
sm_90a build runs the same mma.sync code; it does not use wgmma or TMA). bf16 and fp16,
fp32 accumulation, head dims up to 256, causal, GQA and varlen; no attention mask, no
dropout, and at most 65535 sequences and heads (one launch's grid): the dispatcher sends
those calls elsewhere. The forward saves the base-2
logsumexp, as the CPU kernels do, and only this backend's backward reads it.

Kernels run on torch's current stream of the inputs' device, whose handle is passed to the
native module as an integer; nothing synchronizes. Inputs need a contiguous last dim and
16-byte aligned rows; anything else (and head dims that are not multiples of 8, which are
zero-padded) is copied first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmcore import _C
from llmcore.ops import _cpu

__all__ = ["unavailable", "sdpa", "varlen"]

_REASONS: dict[int, Optional[str]] = {}


def unavailable() -> Optional[str]:
    """Why the CUDA kernels cannot run on the current device, or None if they can.

    Only torch.cuda queries that torch.compile constant-folds are used, and the answer is
    cached per device, so the check is cheap and safe inside a compiled region.
    """
    if not getattr(_C, "cuda_built", False):
        return "llmcore was built without CUDA (no nvcc at build time, or LLMCORE_CUDA=OFF)"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    dev = torch.cuda.current_device()
    if dev not in _REASONS:
        props = torch.cuda.get_device_properties(dev)
        smem = getattr(props, "shared_memory_per_block_optin", 0)
        if props.major < 8:
            reason = f"compute capability {props.major}.{props.minor}; the CUDA kernels need 8.0 or newer"
        elif smem and smem < _C.cuda_attention_smem_bytes:
            reason = (f"{props.name} allows {smem} bytes of shared memory per block; the CUDA kernels need "
                      f"{_C.cuda_attention_smem_bytes}")
        else:
            reason = _C.cuda_attention_device_support(dev) or None
        _REASONS[dev] = reason
    return _REASONS[dev]


# ---------------------------------------------------------------------------------------
# launching


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _ready(t: Tensor, dim: int) -> Tensor:
    """t with its last dim zero-padded to ``dim`` and every row 16-byte aligned."""
    if t.size(-1) != dim:
        t = F.pad(t, (0, dim - t.size(-1)))
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
        t = t.contiguous()
    return t


def _dense(t: Tensor, make) -> Tensor:
    """A row-major tensor of t's shape, dtype and device: the layout the backward returns its gradients in (its fakes
    and its empty-input answers too, so that torch.compile's strides are the real ones)."""
    return make(t.shape, dtype=t.dtype, device=t.device)


def _ref(t: Tensor, packed: bool) -> "_C.TensorRef":
    if packed:  # (total, H, D)
        return _C.TensorRef(t.data_ptr(), 0, t.stride(1), t.stride(0))
    return _C.TensorRef(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))  # (B, H, L, D)


def _problem(q: Tensor, k: Tensor, v: Tensor, batch: int, len_q: int, len_k: int, scale: float, causal: bool,
             cu: Optional[tuple[Tensor, Tensor]]) -> "_C.AttentionProblem":
    # the CPU launcher's constructor call; the CUDA kernels ignore its thread count
    return _cpu.problem(q, k, v, batch=batch, len_q=len_q, len_k=len_k, scale=scale, is_causal=causal,
                        dropout_p=0.0, rng=None, cu_seqlens=cu)


def _forward(q, k, v, scale, causal, batch, len_q, len_k, cu=None):
    """(out, lse) with out padded to the kernels' head dims (multiples of 8)."""
    packed = cu is not None
    d, dv = _round8(q.size(-1)), _round8(v.size(-1))
    q, k, v = _ready(q, d), _ready(k, d), _ready(v, dv)
    out = q.new_empty(*q.shape[:-1], dv)
    lse = torch.empty((q.size(1), q.size(0)) if packed else q.shape[:-1], dtype=torch.float32, device=q.device)
    p = _problem(q, k, v, batch, len_q, len_k, scale, causal, cu)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _C.cuda_attention_forward(p, _ref(q, packed), _ref(k, packed), _ref(v, packed), _ref(out, packed),
                                  lse.data_ptr(), stream)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, scale, causal, batch, len_q, len_k, cu=None):
    packed = cu is not None
    e, ev = q.size(-1), v.size(-1)
    d, dv = _round8(e), _round8(ev)
    q, k, v, out, grad_out = _ready(q, d), _ready(k, d), _ready(v, dv), _ready(out, dv), _ready(grad_out, dv)
    dq, dk, dv_ = (_dense(t, torch.empty) for t in (q, k, v))
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # contiguous, like q
    delta = torch.empty_like(lse)
    p = _problem(q, k, v, batch, len_q, len_k, scale, causal, cu)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _C.cuda_attention_backward(p, *(_ref(t, packed) for t in (q, k, v, out, grad_out, dq, dk, dv_)),
                                   lse.data_ptr(), dq_accum.data_ptr(), delta.data_ptr(), stream)
    if d != e:
        dq, dk = dq[..., :e].contiguous(), dk[..., :e].contiguous()
    if dv != ev:
        dv_ = dv_[..., :ev].contiguous()
    return dq, dk, dv_


def _unpad(out: Tensor, ev: int) -> Tensor:
    return out if out.size(-1) == ev else out[..., :ev].contiguous()


# ---------------------------------------------------------------------------------------
# custom ops: dense (B, H, L, D)


@torch.library.custom_op("llmcore::cuda_sdpa_fwd", mutates_args=(), device_types="cuda")
def _sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    Lk, Ev = k.size(2), v.size(-1)
    if B * Hq * Lq == 0 or Lk == 0 or Ev == 0:
        return (q.new_zeros(B, Hq, Lq, Ev),
                torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device))
    out, lse = _forward(q, k, v, scale, is_causal, B, Lq, Lk)
    return _unpad(out, Ev), lse


@_sdpa_fwd.register_fake
def _(q, k, v, is_causal, scale):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.size(-1)), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("llmcore::cuda_sdpa_bwd", mutates_args=(), device_types="cuda")
def _sdpa_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return _dense(q, torch.zeros), _dense(k, torch.zeros), _dense(v, torch.zeros)
    return _backward(grad_out, q, k, v, out, lse, scale, is_causal, q.size(0), q.size(2), k.size(2))


@_sdpa_bwd.register_fake
def _(grad_out, q, k, v, out, lse, is_causal, scale):
    return _dense(q, torch.empty), _dense(k, torch.empty), _dense(v, torch.empty)


def _sdpa_setup(ctx, inputs, output):
    q, k, v, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.args = (is_causal, scale)


def _sdpa_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _sdpa_bwd(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None


_sdpa_fwd.register_autograd(_sdpa_backward, setup_context=_sdpa_setup)


# ---------------------------------------------------------------------------------------
# custom ops: packed (total, H, D)


@torch.library.custom_op("llmcore::cuda_varlen_fwd", mutates_args=(), device_types="cuda")
def _varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                max_seqlen_k: int, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    n = cu_seqlens_q.numel() - 1
    if q.size(0) == 0 or k.size(0) == 0 or n == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or v.size(-1) == 0:
        # nothing to attend to: every row is fully masked
        return (q.new_zeros(q.size(0), q.size(1), v.size(-1)),
                torch.full((q.size(1), q.size(0)), float("-inf"), dtype=torch.float32, device=q.device))
    out, lse = _forward(q, k, v, scale, is_causal, n, max_seqlen_q, max_seqlen_k, (cu_seqlens_q, cu_seqlens_k))
    return _unpad(out, v.size(-1)), lse


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    return q.new_empty(q.size(0), q.size(1), v.size(-1)), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("llmcore::cuda_varlen_bwd", mutates_args=(), device_types="cuda")
def _varlen_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
                cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    n = cu_seqlens_q.numel() - 1
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or n == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return _dense(q, torch.zeros), _dense(k, torch.zeros), _dense(v, torch.zeros)
    return _backward(grad_out, q, k, v, out, lse, scale, is_causal, n, max_seqlen_q, max_seqlen_k,
                     (cu_seqlens_q, cu_seqlens_k))


@_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    return _dense(q, torch.empty), _dense(k, torch.empty), _dense(v, torch.empty)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (max_q, max_k, is_causal, scale)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---------------------------------------------------------------------------------------
# entry points for llmcore.ops.attention (inputs already validated there)


def sdpa(query: Tensor, key: Tensor, value: Tensor, batch: tuple[int, ...], is_causal: bool, scale: float) -> Tensor:
    """query (*batch, Hq, Lq, E), key (*batch', Hkv, Lk, E), value (*batch', Hkv, Lk, Ev), batch dims
    broadcasting to ``batch`` -> (*batch, Hq, Lq, Ev). Top-left causal alignment, as torch."""
    hq, lq, e = query.shape[-3:]
    hkv, lk, ev = value.shape[-3:]

    from llmcore.ops.attention import as_4d

    out, _ = _sdpa_fwd(as_4d(query, batch, hq, lq, e), as_4d(key, batch, hkv, lk, e), as_4d(value, batch, hkv, lk, ev),
                       bool(is_causal), float(scale))
    return out.reshape(*batch, hq, lq, ev)


def varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
           max_seqlen_k: int, is_causal: bool, scale: float) -> Tensor:
    """Packed q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev) -> (total_q, Hq, Ev).

    Bottom-right causal alignment, as FlashAttention >= 2.1. The cu_seqlens are not checked
    against the tensors (that would synchronize with the GPU); inconsistent offsets make a
    sequence empty in the kernels, which never read or write out of bounds.
    """
    out, _ = _varlen_fwd(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
                         bool(is_causal), float(scale))
    return out
