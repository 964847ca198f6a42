"""Fused activations of Transformer MLPs.

``bias_gelu(x, bias)`` is ``F.gelu(x + bias)``: the bias of the up-projection folded into
the activation (BERT uses the erf GELU, GPT-2's "gelu_new" the tanh approximation).
``swiglu(gate, up)`` is ``F.silu(gate) * up`` (Llama, Qwen2, Mistral MLPs).

On CPU, for float32, bfloat16 and float16 inputs, forward and backward run as native
kernels, registered as ``torch.library`` custom ops (eager mode calls the same
implementation through a plain autograd.Function, as in norm.py); the intermediate ``x + bias`` and ``silu(gate)``
stay in float32, so 16-bit results are rounded once instead of twice. Elsewhere the
plain-PyTorch references below run.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmcore import _C, _fork
from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops.norm import _CODES, _as_rows, _check_kernel_args, _empty_f32, _ptr

__all__ = ["bias_gelu", "swiglu", "bias_gelu_reference", "swiglu_reference"]

_APPROXIMATE = ("none", "tanh")


# ---------------------------------------------------------------------------------------
# custom ops


def _f32_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.to(torch.float32).contiguous()


def _bias_gelu_fwd_impl(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    _check_kernel_args(x, x.size(-1), {}, {"bias": bias})
    y = torch.empty(x.shape, dtype=x.dtype)
    if x.numel() == 0:
        return y
    cols = x.size(-1)
    x2, x_stride = _as_rows(x, cols)
    b = _f32_bias(bias)  # held: the kernel reads its memory
    _C.bias_gelu_forward(_CODES[x.dtype], approximate == "tanh", x2.size(0), cols, x2.data_ptr(), x_stride,
                         _ptr(b), y.data_ptr(), _fork.num_threads())
    return y


@torch.library.custom_op("llmcore::bias_gelu_fwd", mutates_args=(), device_types="cpu")
def _bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    _check_approximate(approximate)
    return _bias_gelu_fwd_impl(x, bias, approximate)


def _check_approximate(approximate: str) -> None:
    """The kernels know the erf form ("none") and the tanh one; any other name ran the erf form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh' (as torch's gelu), got {approximate!r}")


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_bwd_impl(grad_out: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                        need_bias: bool) -> tuple[Tensor, Tensor]:
    cols = x.size(-1)
    _check_kernel_args(x, cols, {"grad_out": grad_out}, {"bias": bias})
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    gb = torch.zeros(cols if need_bias else 0, dtype=torch.float32)
    if x.numel() == 0:
        return grad_x, gb
    x2, x_stride = _as_rows(x, cols)
    go2, go_stride = _as_rows(grad_out.to(x.dtype), cols)
    b = _f32_bias(bias)
    _C.bias_gelu_backward(_CODES[x.dtype], approximate == "tanh", x2.size(0), cols, go2.data_ptr(), go_stride,
                          x2.data_ptr(), x_stride, _ptr(b), grad_x.data_ptr(), gb.data_ptr() if need_bias else 0,
                          _fork.num_threads())
    return grad_x, gb


@torch.library.custom_op("llmcore::bias_gelu_bwd", mutates_args=(), device_types="cpu")
def _bias_gelu_bwd(grad_out: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                   need_bias: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, float32 grad_bias); grad_bias is empty when not needed."""
    _check_approximate(approximate)
    return _bias_gelu_bwd_impl(grad_out, x, bias, approximate, need_bias)


@_bias_gelu_bwd.register_fake
def _(grad_out, x, bias, approximate, need_bias):
    return x.new_empty(x.shape), _empty_f32(x.size(-1) if need_bias else 0, x)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward_with(bwd, ctx, grad_y):
    if grad_y is None:  # the output got no gradient (grads are not materialized)
        return None, None, None
    x, bias = ctx.saved_tensors
    need_x, need_b, _ = ctx.needs_input_grad
    grad_x, gb = bwd(grad_y, x, bias, ctx.approximate, need_b)
    return grad_x if need_x else None, gb.to(bias.dtype) if need_b else None, None


_bias_gelu_fwd.register_autograd(partial(_bias_gelu_backward_with, _bias_gelu_bwd), setup_context=_bias_gelu_setup)
_BiasGeluEager = _eager_function("_BiasGeluEager", _bias_gelu_fwd_impl, _bias_gelu_setup,
                                 partial(_bias_gelu_backward_with, _bias_gelu_bwd_impl))


def _swiglu_fwd_impl(gate: Tensor, up: Tensor) -> Tensor:
    _check_kernel_args(gate, gate.size(-1), {"up": up}, {})
    if up.dtype != gate.dtype:
        raise TypeError(f"up dtype {up.dtype} does not match gate dtype {gate.dtype}")
    y = torch.empty(gate.shape, dtype=gate.dtype)
    if gate.numel() == 0:
        return y
    cols = gate.size(-1)
    g2, g_stride = _as_rows(gate, cols)
    u2, u_stride = _as_rows(up, cols)
    _C.swiglu_forward(_CODES[gate.dtype], g2.size(0), cols, g2.data_ptr(), g_stride, u2.data_ptr(), u_stride,
                      y.data_ptr(), _fork.num_threads())
    return y


@torch.library.custom_op("llmcore::swiglu_fwd", mutates_args=(), device_types="cpu")
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return _swiglu_fwd_impl(gate, up)


@_swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


def _swiglu_bwd_impl(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _check_kernel_args(gate, gate.size(-1), {"up": up, "grad_out": grad_out}, {})
    if up.dtype != gate.dtype:
        raise TypeError(f"up dtype {up.dtype} does not match gate dtype {gate.dtype}")
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype)
    grad_up = torch.empty(gate.shape, dtype=gate.dtype)
    if gate.numel() == 0:
        return grad_gate, grad_up
    cols = gate.size(-1)
    go2, go_stride = _as_rows(grad_out.to(gate.dtype), cols)
    g2, g_stride = _as_rows(gate, cols)
    u2, u_stride = _as_rows(up, cols)
    _C.swiglu_backward(_CODES[gate.dtype], g2.size(0), cols, go2.data_ptr(), go_stride, g2.data_ptr(), g_stride,
                       u2.data_ptr(), u_stride, grad_gate.data_ptr(), grad_up.data_ptr(), _fork.num_threads())
    return grad_gate, grad_up


@torch.library.custom_op("llmcore::swiglu_bwd", mutates_args=(), device_types="cpu")
def _swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _swiglu_bwd_impl(grad_out, gate, up)


@_swiglu_bwd.register_fake
def _(grad_out, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward_with(bwd, ctx, grad_y):
    if grad_y is None:  # the output got no gradient (grads are not materialized)
        return None, None
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = bwd(grad_y, gate, up)
    need_g, need_u = ctx.needs_input_grad
    return grad_gate if need_g else None, grad_up if need_u else None


_swiglu_fwd.register_autograd(partial(_swiglu_backward_with, _swiglu_bwd), setup_context=_swiglu_setup)
_SwigluEager = _eager_function("_SwigluEager", _swiglu_fwd_impl, _swiglu_setup,
                               partial(_swiglu_backward_with, _swiglu_bwd_impl))


# ---------------------------------------------------------------------------------------
# references


def bias_gelu_reference(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """``F.gelu(x + bias, approximate=approximate)``."""
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------
# public API


def _check_float(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")


def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """``gelu(x + bias)``, fused. ``approximate`` is "none" (erf; BERT) or "tanh" (GPT-2's
    "gelu_new").

    Shapes: x (..., N), bias (N,) or None; returns (..., N) in the dtype of ``x + bias``.
    Differentiable in x and bias.

    >>> bias_gelu(torch.randn(4, 8), torch.zeros(8), approximate="tanh").shape
    torch.Size([4, 8])
    """
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (x.size(-1),):
            raise ValueError(f"bias must have shape ({x.size(-1)},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    native = (x.device.type == "cpu" and x.dtype in _CODES and x.size(-1) > 0
              and (bias is None or (bias.dtype in _CODES and torch.promote_types(x.dtype, bias.dtype) == x.dtype)))
    if not native:
        return bias_gelu_reference(x, bias, approximate)
    return _run_op(_bias_gelu_fwd, _BiasGeluEager, x, bias, approximate)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, fused.

    Shapes: gate and up (..., N), the same shape and dtype (views such as the two halves of
    a fused gate-up projection are read in place). Differentiable in both.

    >>> gu = torch.randn(4, 16)
    >>> swiglu(gu[:, :8], gu[:, 8:]).shape
    torch.Size([4, 8])
    """
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.device != up.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    native = (gate.device.type == "cpu" and gate.dtype in _CODES and up.dtype == gate.dtype
              and gate.shape == up.shape and gate.dim() >= 1 and gate.size(-1) > 0)
    if not native:
        return swiglu_reference(gate, up)
    return _run_op(_swiglu_fwd, _SwigluEager, gate, up)
