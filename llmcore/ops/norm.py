"""LayerNorm and RMSNorm over the last dim, with an optional fused residual add.

``layer_norm`` has the semantics of ``torch.nn.functional.layer_norm`` over the last dim;
``rms_norm`` those of Hugging Face's ``LlamaRMSNorm`` (also Qwen2, Mistral): statistics in
float32, the normalized value cast back to the input dtype, then multiplied by the weight.
With ``residual`` both compute ``s = x + residual`` first (rounded to the input dtype, as
the unfused ``x + residual`` would be) and return ``(norm(s), s)``: the residual stream of
pre-norm blocks, or BERT's post-norm ``LayerNorm(dropout(h) + input)``.

On CPU, for float32, bfloat16 and float16 inputs, forward and backward run as native
kernels, registered as ``torch.library`` custom ops (so ``torch.compile`` and
``torch.library.opcheck`` work; eager mode calls the same implementation through a plain
autograd.Function, which dispatches faster); elsewhere they run the plain-PyTorch
references below, which have the same semantics.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from llmcore import _C, _fork
from llmcore.ops import triton as triton_ops
from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops.dispatch import BackendUnavailableError
from llmcore.ops.triton import norm as triton_norm

__all__ = ["layer_norm", "rms_norm", "layer_norm_reference", "rms_norm_reference"]

# dtype codes of the native kernels (csrc/norm_bindings.cpp)
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ---------------------------------------------------------------------------------------
# native-call helpers (shared with activation.py)


def _as_rows(t: Tensor, cols: int) -> tuple[Tensor, int]:
    """t as a (rows, cols) matrix with a contiguous last dim, and its row stride (no copy
    when the leading dims collapse into one stride, broadcast rows included)."""
    if t.stride(-1) != 1 and cols > 1:
        t = t.contiguous()
    try:
        m = t.view(-1, cols)
    except RuntimeError:
        m = t.contiguous().view(-1, cols)
    return m, m.stride(0)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _f32_vector(t: Optional[Tensor], cols: int, fill: float) -> Tensor:
    """A float32 contiguous copy of a (cols,) parameter, or `fill` when it is absent."""
    if t is None:
        return torch.full((cols,), fill, dtype=torch.float32)
    return t.to(torch.float32).contiguous()


def _empty_f32(shape, like: Tensor) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _rms_out_dtype(x: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


def _check_kernel_args(x: Tensor, cols: int, like_x: dict, vectors: dict, rows_of: Optional[dict] = None) -> None:
    """Checks what the kernels index by x's shape, so that a direct call of a custom op with
    mismatched tensors raises instead of reading out of bounds."""
    if x.dtype not in _CODES:
        raise TypeError(f"the CPU kernels take float32, bfloat16 or float16, got {x.dtype}")
    for name, t in like_x.items():
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have shape {tuple(x.shape)}, got {tuple(t.shape)}")
    for name, t in vectors.items():
        if t is not None and t.numel() != cols:
            raise ValueError(f"{name} must have {cols} elements, got {tuple(t.shape)}")
        if t is not None and t.dtype not in _CODES:  # (float64: the output's promoted dtype had no kernel, KeyError)
            raise TypeError(f"the CPU kernels take a float32, bfloat16 or float16 {name}, got {t.dtype}")
    rows = x.numel() // max(cols, 1)
    for name, t in (rows_of or {}).items():
        if t.numel() != rows:
            raise ValueError(f"{name} must have {rows} elements (one per row), got {tuple(t.shape)}")
        if t.dtype != torch.float32:  # (the kernels read the statistics as float32)
            raise TypeError(f"{name} must be float32, got {t.dtype}")


# ---------------------------------------------------------------------------------------
# custom ops


def _norm_forward(rms: bool, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cols = x.size(-1)
    _check_kernel_args(x, cols, {"residual": residual}, {"weight": weight, "bias": bias})
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"the CPU kernels write {x.dtype} or float32, not {out_dtype} (from the weight's dtype)")
    y = torch.empty(x.shape, dtype=out_dtype)
    s = torch.empty(x.shape, dtype=x.dtype) if residual is not None else x.new_empty(0)
    mean = torch.empty(x.shape[:-1] if not rms else (0,), dtype=torch.float32)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
    if x.numel() == 0:
        return y, s, mean, rstd
    x2, x_stride = _as_rows(x, cols)
    r2, r_stride = _as_rows(residual, cols) if residual is not None else (None, 0)
    w = _f32_vector(weight, cols, 1.0)
    b = None if rms else _f32_vector(bias, cols, 0.0)
    _C.norm_forward(rms, _CODES[x.dtype], _CODES[out_dtype], x2.size(0), cols, eps, x2.data_ptr(), x_stride,
                    _ptr(r2), r_stride, w.data_ptr(), _ptr(b), y.data_ptr(), _ptr(s) if residual is not None else 0,
                    0 if rms else mean.data_ptr(), rstd.data_ptr(), _fork.num_threads())
    return y, s, mean, rstd


def _norm_backward(rms: bool, grad_out: Tensor, inp: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                   grad_sum: Optional[Tensor], out_dtype: torch.dtype, need_weight: bool,
                   need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    cols = inp.size(-1)
    _check_kernel_args(inp, cols, {"grad_out": grad_out, "grad_sum": grad_sum}, {"weight": weight},
                       {"rstd": rstd} if rms else {"mean": mean, "rstd": rstd})
    grad_in = torch.empty(inp.shape, dtype=inp.dtype)
    gw = torch.zeros(cols if need_weight else 0, dtype=torch.float32)
    gb = torch.zeros(cols if need_bias else 0, dtype=torch.float32)
    if inp.numel() == 0:
        return grad_in, gw, gb
    go2, go_stride = _as_rows(grad_out.to(out_dtype), cols)
    in2, in_stride = _as_rows(inp, cols)
    gs2, gs_stride = _as_rows(grad_sum.to(inp.dtype), cols) if grad_sum is not None else (None, 0)
    w = _f32_vector(weight, cols, 1.0)
    mean = None if rms else mean.contiguous()
    rstd = rstd.contiguous()
    _C.norm_backward(rms, _CODES[inp.dtype], _CODES[out_dtype], in2.size(0), cols, go2.data_ptr(), go_stride,
                     in2.data_ptr(), in_stride, _ptr(gs2), gs_stride, _ptr(mean), rstd.data_ptr(), w.data_ptr(),
                     grad_in.data_ptr(), gw.data_ptr() if need_weight else 0, gb.data_ptr() if need_bias else 0,
                     _fork.num_threads())
    return grad_in, gw, gb


def _layer_norm_fwd_impl(x, weight, bias, residual, eps):
    return _norm_forward(False, x, weight, bias, residual, eps, x.dtype)


def _layer_norm_bwd_impl(grad_out, inp, mean, rstd, weight, grad_sum, need_weight, need_bias):
    return _norm_backward(False, grad_out, inp, mean, rstd, weight, grad_sum, inp.dtype, need_weight, need_bias)


@torch.library.custom_op("llmcore::layer_norm_fwd", mutates_args=(), device_types="cpu")
def _layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                    eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd); s = x + residual, or an empty tensor without a residual."""
    return _layer_norm_fwd_impl(x, weight, bias, residual, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), s, _empty_f32(x.shape[:-1], x), _empty_f32(x.shape[:-1], x)


@torch.library.custom_op("llmcore::layer_norm_bwd", mutates_args=(), device_types="cpu")
def _layer_norm_bwd(grad_out: Tensor, inp: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                    grad_sum: Optional[Tensor], need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of the normalized input, float32 grad_weight, float32 grad_bias); the last two
    are empty when not needed."""
    return _layer_norm_bwd_impl(grad_out, inp, mean, rstd, weight, grad_sum, need_weight, need_bias)


@_layer_norm_bwd.register_fake
def _(grad_out, inp, mean, rstd, weight, grad_sum, need_weight, need_bias):
    cols = inp.size(-1)
    return (inp.new_empty(inp.shape), _empty_f32(cols if need_weight else 0, inp),
            _empty_f32(cols if need_bias else 0, inp))


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grad_or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """The gradient of y, or zeros when only the residual sum s received one (grads are not materialized)."""
    return grad if grad is not None else torch.zeros_like(like)


def _layer_norm_backward_with(bwd, ctx, grad_y, grad_s, grad_mean, grad_rstd):
    inp, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_r, _ = ctx.needs_input_grad
    grad_in, gw, gb = bwd(_grad_or_zeros(grad_y, inp), inp, mean, rstd, weight,
                          grad_s if ctx.has_residual else None, need_w, need_b)
    return (grad_in if need_x else None, gw.to(weight.dtype) if need_w else None,
            gb.to(ctx.bias_dtype) if need_b else None, grad_in if need_r else None, None)


_layer_norm_fwd.register_autograd(partial(_layer_norm_backward_with, _layer_norm_bwd), setup_context=_layer_norm_setup)
_LayerNormEager = _eager_function("_LayerNormEager", _layer_norm_fwd_impl, _layer_norm_setup,
                                  partial(_layer_norm_backward_with, _layer_norm_bwd_impl))


def _rms_norm_fwd_impl(x, weight, residual, eps):
    y, s, _, rstd = _norm_forward(True, x, weight, None, residual, eps, _rms_out_dtype(x, weight))
    return y, s, rstd


def _rms_norm_bwd_impl(grad_out, inp, rstd, weight, grad_sum, need_weight):
    grad_in, gw, _ = _norm_backward(True, grad_out, inp, rstd, rstd, weight, grad_sum, _rms_out_dtype(inp, weight),
                                    need_weight, False)
    return grad_in, gw


@torch.library.custom_op("llmcore::rms_norm_fwd", mutates_args=(), device_types="cpu")
def _rms_norm_fwd(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, s, rstd); y has dtype promote(x, weight), as in HF; s as in layer_norm_fwd."""
    return _rms_norm_fwd_impl(x, weight, residual, eps)


@_rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=_rms_out_dtype(x, weight)), s, _empty_f32(x.shape[:-1], x)


@torch.library.custom_op("llmcore::rms_norm_bwd", mutates_args=(), device_types="cpu")
def _rms_norm_bwd(grad_out: Tensor, inp: Tensor, rstd: Tensor, weight: Optional[Tensor], grad_sum: Optional[Tensor],
                  need_weight: bool) -> tuple[Tensor, Tensor]:
    return _rms_norm_bwd_impl(grad_out, inp, rstd, weight, grad_sum, need_weight)


@_rms_norm_bwd.register_fake
def _(grad_out, inp, rstd, weight, grad_sum, need_weight):
    return inp.new_empty(inp.shape), _empty_f32(inp.size(-1) if need_weight else 0, inp)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, eps = inputs
    _, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)


def _rms_norm_backward_with(bwd, ctx, grad_y, grad_s, grad_rstd):
    inp, weight, rstd = ctx.saved_tensors
    need_x, need_w, need_r, _ = ctx.needs_input_grad
    grad_in, gw = bwd(_grad_or_zeros(grad_y, inp), inp, rstd, weight, grad_s if ctx.has_residual else None, need_w)
    return grad_in if need_x else None, gw.to(weight.dtype) if need_w else None, grad_in if need_r else None, None


_rms_norm_fwd.register_autograd(partial(_rms_norm_backward_with, _rms_norm_bwd), setup_context=_rms_norm_setup)
_RmsNormEager = _eager_function("_RmsNormEager", _rms_norm_fwd_impl, _rms_norm_setup,
                                partial(_rms_norm_backward_with, _rms_norm_bwd_impl))


# ---------------------------------------------------------------------------------------
# references: plain PyTorch, the fallback off the CPU fast path and the tests' truth


def layer_norm_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                         residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``layer_norm`` in plain PyTorch: float32 math (float64 for float64 inputs), one
    rounding to x's dtype."""
    s = x + residual if residual is not None else x
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.layer_norm(s.to(acc), (s.size(-1),), w, b, eps).to(s.dtype)
    return (y, s) if residual is not None else y


def rms_norm_reference(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6,
                       residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``rms_norm`` in plain PyTorch, line for line HF's ``LlamaRMSNorm.forward``."""
    s = x + residual if residual is not None else x
    h = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = h.to(s.dtype)
    if weight is not None:
        y = weight * y
    return (y, s) if residual is not None else y


# ---------------------------------------------------------------------------------------
# public API


def _check(name: str, t, x: Tensor, vector: bool) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    want = (x.size(-1),) if vector else tuple(x.shape)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (the normalized one)")


def _native(x: Tensor, params: tuple, residual: Optional[Tensor]) -> bool:
    """Whether the CPU kernels take this call (otherwise the reference does)."""
    if x.device.type != "cpu" or x.dtype not in _CODES or x.size(-1) == 0:
        return False
    if residual is not None and residual.dtype != x.dtype:
        return False
    return all(p is None or p.dtype in _CODES for p in params)


_BACKENDS = (None, "triton", "cpu", "reference")


def _use_triton(x: Tensor, params: tuple, backend: Optional[str]) -> bool:
    """Whether the Triton kernels take this call: asked for by name (and able, else an error naming why), or,
    when no backend is named, for CUDA tensors when Triton is installed and the kernels fit."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of None, 'triton', 'cpu', 'reference'")
    if backend is None:
        return x.device.type == "cuda" and triton_ops.usable() and triton_norm.why_not(x, params) is None
    if backend != "triton":
        return False
    reason = triton_ops.unavailable(x.device) or triton_norm.why_not(x, params)
    if reason:
        raise BackendUnavailableError(f"backend='triton' cannot run this call: {reason}")
    return True


def _use_reference(x: Tensor, params: tuple, residual: Optional[Tensor], backend: Optional[str]) -> bool:
    if backend == "cpu" and not _native(x, params, residual):
        raise BackendUnavailableError(f"backend='cpu' cannot run this call ({x.device.type} tensor of {x.dtype})")
    return backend == "reference" or not _native(x, params, residual)


def _promote_residual(x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x and residual in their promoted dtype, as ``x + residual`` would be: under bf16 autocast a
    bf16 sublayer output meets the fp32 residual stream, and the fused kernel then runs in fp32."""
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               residual: Optional[Tensor] = None,
               backend: Optional[str] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """LayerNorm over the last dim, optionally of ``x + residual``.

    Shapes: x (..., N), weight and bias (N,) or None, residual like x. Returns y (..., N) in
    x's dtype, or ``(y, s)`` with ``s = x + residual`` when a residual is given. Statistics
    are float32 (biased variance, as ``F.layer_norm``). Differentiable in x, weight, bias
    and residual (through y and s).

    ``backend``: None runs the native kernels for CPU tensors and the Triton kernels for
    CUDA tensors (the plain-PyTorch reference where neither fits); "triton" (CPU tensors
    under TRITON_INTERPRET=1), "cpu" or "reference" force one.

    >>> x = torch.randn(2, 5, 8); w, b = torch.ones(8), torch.zeros(8)
    >>> y, s = layer_norm(x, w, b, residual=torch.randn(2, 5, 8))
    >>> y.shape, s.shape
    (torch.Size([2, 5, 8]), torch.Size([2, 5, 8]))
    """
    _check_x(x)
    _check("weight", weight, x, True)
    _check("bias", bias, x, True)
    _check("residual", residual, x, False)
    x, residual = _promote_residual(x, residual)
    if _use_triton(x, (weight, bias), backend):
        return triton_norm.layer_norm(x, weight, bias, eps, residual)
    if _use_reference(x, (weight, bias), residual, backend):
        return layer_norm_reference(x, weight, bias, eps, residual)
    y, s, _, _ = _run_op(_layer_norm_fwd, _LayerNormEager, x, weight, bias, residual, float(eps))
    return (y, s) if residual is not None else y


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, residual: Optional[Tensor] = None,
             backend: Optional[str] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """RMSNorm over the last dim as HF's ``LlamaRMSNorm``, optionally of ``x + residual``.

    ``y = weight * (s * rsqrt(mean(s^2) + eps)).to(s.dtype)`` with the statistics in
    float32. Shapes: x (..., N), weight (N,) or None, residual like x. y has the dtype
    ``promote(x.dtype, weight.dtype)`` (x's dtype for a weight of the same dtype); returns
    ``(y, s)`` with ``s = x + residual`` when a residual is given.
    ``backend`` as in :func:`layer_norm`.

    >>> x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    >>> rms_norm(x, torch.ones(8, dtype=torch.bfloat16)).dtype
    torch.bfloat16
    """
    _check_x(x)
    _check("weight", weight, x, True)
    _check("residual", residual, x, False)
    x, residual = _promote_residual(x, residual)
    if _use_triton(x, (weight,), backend):
        return triton_norm.rms_norm(x, weight, eps, residual)
    if _use_reference(x, (weight,), residual, backend):
        return rms_norm_reference(x, weight, eps, residual)
    y, s, _ = _run_op(_rms_norm_fwd, _RmsNormEager, x, weight, residual, float(eps))
    return (y, s) if residual is not None else y
