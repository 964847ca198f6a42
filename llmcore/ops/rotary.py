"""Rotary position embedding, fused: ``rotary_embedding(x, cos, sin)`` rotates each head of ``x`` by the
angles whose cosines and sines are ``cos`` and ``sin`` (rotate-half layout, as transformers' Llama,
Mistral and Qwen2: ``x * cos + rotate_half(x) * sin``).

For float32, bfloat16 and float16, forward and backward are one pass each: native on the CPU (``_C.rotary``,
csrc/norm/rotary_kernels.cpp), Triton on CUDA tensors (``llmcore.ops.triton.rotary``), registered as
``torch.library`` custom ops (eager calls take a plain autograd.Function over the same implementation, as
norm.py). The rotation is computed in float32 and rounded once to x's dtype, where the composite makes the
rotated half, two products and a sum, each a pass over memory (and, under bf16 autocast, float32
intermediates). The backward is the transposed rotation of the gradient and needs only cos and sin. Elsewhere,
and when cos or sin needs a gradient, the plain-PyTorch reference below runs.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from llmcore import _C, _fork
from llmcore.ops import triton as triton_ops
from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops._shapes import broadcasts_to
from llmcore.ops.dispatch import BackendUnavailableError
from llmcore.ops.norm import _CODES, _as_rows
from llmcore.ops.triton import rotary as triton_rotary

__all__ = ["rotary_embedding", "rotary_reference"]


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` in the promoted dtype, rounded to x's: transformers' formula, with cos and
    sin (..., D) broadcast over x's heads (..., H, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)).to(x.dtype)


# ---------------------------------------------------------------------------------------
# custom ops


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, transpose: bool, triton: bool) -> Tensor:
    """The rotation of x (..., H, D) by cos / sin (broadcastable to x.shape[:-2] + (D,)), or its transpose (the
    backward's: the gradient rotated back): the Triton kernel, or the native one (CPU tensors)."""
    if x.dtype not in _CODES or cos.dtype not in _CODES or sin.dtype != cos.dtype:
        raise TypeError(f"the kernels take float32, bfloat16 or float16 x and cos / sin of one such dtype, got "
                        f"{x.dtype}, {cos.dtype} and {sin.dtype}")
    if not triton and x.device.type != "cpu":
        raise ValueError(f"the native kernel takes CPU tensors, got {x.device.type}")
    if x.dim() < 2 or cos.dim() < 1:  # (a 1-D x, called as torch.ops.llmcore.*, was a bare IndexError)
        raise ValueError(f"x must be (..., heads, head_dim) and cos / sin (..., head_dim), got {tuple(x.shape)} and "
                         f"{tuple(cos.shape)}")
    heads, dim = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    if dim % 2 or cos.shape[-1] != dim or sin.shape != cos.shape or not broadcasts_to(cos.shape[:-1], lead):
        raise ValueError(f"cos and sin must have one shape, broadcastable to {(*lead, dim)} with an even last dim; got "
                         f"x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2, x_stride = _as_rows(x.reshape(*lead, heads * dim), heads * dim)
    c2, c_stride = _as_rows(cos.expand(*lead, dim), dim)
    s2, s_stride = _as_rows(sin.expand(*lead, dim), dim)
    if triton:
        triton_rotary.rotate(x2, x_stride, c2, c_stride, s2, s_stride, out, heads, dim, transpose)
        return out
    _C.rotary(_CODES[x.dtype], _CODES[cos.dtype], transpose, x2.size(0), heads, dim, x2.data_ptr(), x_stride,
              c2.data_ptr(), c_stride, s2.data_ptr(), s_stride, out.data_ptr(), _fork.num_threads())
    return out


# One op serves both directions: the backward of a rotation is the transposed rotation, by the same cos and sin.
@torch.library.custom_op("llmcore::rotary", mutates_args=())
def _rotary(x: Tensor, cos: Tensor, sin: Tensor, transpose: bool, triton: bool) -> Tensor:
    return _rotate(x, cos, sin, transpose, triton)


@_rotary.register_fake
def _(x, cos, sin, transpose, triton):
    return x.new_empty(x.shape)


def _rotary_setup(ctx, inputs, output):
    x, cos, sin, transpose, triton = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype, ctx.transpose, ctx.triton = x.dtype, transpose, triton


def _rotary_backward_with(rotate, ctx, grad_y):
    if grad_y is None:  # the output got no gradient (grads are not materialized)
        return None, None, None, None, None
    cos, sin = ctx.saved_tensors
    return rotate(grad_y.to(ctx.x_dtype), cos, sin, not ctx.transpose, ctx.triton), None, None, None, None


_rotary.register_autograd(partial(_rotary_backward_with, _rotary), setup_context=_rotary_setup)
_RotaryEager = _eager_function("_RotaryEager", _rotate, _rotary_setup, partial(_rotary_backward_with, _rotate))


# ---------------------------------------------------------------------------------------
# public API


_BACKENDS = (None, "triton", "cpu", "reference")


def _why_not_kernel(x: Tensor, cos: Tensor, sin: Tensor) -> Optional[str]:
    """Why the native and Triton kernels cannot take these tensors, or None."""
    kinds = ", ".join(str(d).replace("torch.", "") for d in _CODES)
    for name, t in (("x", x), ("cos", cos)):
        if t.dtype not in _CODES:
            return f"{name} is {t.dtype} (the kernels take {kinds})"
    if sin.dtype != cos.dtype:
        return f"sin is {sin.dtype} but cos is {cos.dtype}"
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return "cos / sin need gradients (the kernels differentiate x only)"
    return None


def _backend(x: Tensor, cos: Tensor, sin: Tensor, backend: Optional[str]) -> str:
    """"triton", "cpu" or "reference" for this call; a named backend that cannot run it is an error naming why."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of None, 'triton', 'cpu', 'reference'")
    not_kernel = _why_not_kernel(x, cos, sin)
    kernel_ok = not_kernel is None
    if backend == "triton":
        reason = triton_ops.unavailable(x.device) or triton_rotary.why_not(x, cos) or not_kernel
        if reason:
            raise BackendUnavailableError(f"backend='triton' cannot run this call: {reason}")
        return "triton"
    if backend == "cpu" and not (x.device.type == "cpu" and kernel_ok):
        reason = not_kernel or f"x is a {x.device.type} tensor"
        raise BackendUnavailableError(f"backend='cpu' cannot run this call: {reason}")
    if backend is None and x.device.type == "cuda" and kernel_ok and triton_ops.usable():
        return "triton"
    if backend == "reference" or not (x.device.type == "cpu" and kernel_ok):
        return "reference"
    return "cpu"


def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, backend: Optional[str] = None) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (..., H, D) and cos, sin (..., D) broadcast over the heads
    (their leading dims broadcastable to x's: (L, D) for a (B, L, H, D) batch, (T, D) for a packed (T, H, D)
    one), in x's dtype. D must be even. Differentiable in x (and, through the reference, in cos and sin).

    ``backend``: None runs the native kernel for CPU tensors and the Triton kernel for CUDA tensors (the
    plain-PyTorch reference where neither fits, e.g. float64, or cos / sin needing gradients); "triton" (CPU
    tensors under TRITON_INTERPRET=1), "cpu" or "reference" force one.

    >>> x = torch.randn(5, 2, 8)
    >>> angle = torch.arange(5.0)[:, None] * torch.ones(8)
    >>> rotary_embedding(x, angle.cos(), angle.sin()).shape
    torch.Size([5, 2, 8])
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be (..., heads, head_dim), got shape {tuple(x.shape)}")
    lead, dim = x.shape[:-2], x.shape[-1]
    if dim % 2:
        raise ValueError(f"the head dim must be even (rotate-half pairs its halves), got {dim}")
    if cos.shape != sin.shape or cos.dim() < 1 or cos.shape[-1] != dim:
        raise ValueError(f"cos and sin must have one shape (..., {dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not broadcasts_to(cos.shape[:-1], lead):
        raise ValueError(f"cos and sin {tuple(cos.shape)} do not broadcast over x {tuple(x.shape)}'s positions "
                         f"{tuple(lead)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"cos / sin are on {cos.device} / {sin.device} but x is on {x.device}")
    chosen = _backend(x, cos, sin, backend)
    if chosen == "reference":
        return rotary_reference(x, cos, sin)
    return _run_op(_rotary, _RotaryEager, x, cos, sin, False, chosen == "triton")
