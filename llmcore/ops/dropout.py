"""Dropout with a regenerated mask.

``dropout(x, p, training)`` has the semantics of ``torch.nn.functional.dropout``: each
element is zeroed with probability p and the others are scaled by 1 / (1 - p); identity when
not training or p == 0, zeros when p == 1.

On CPU, for contiguous float32, bfloat16 and float16 inputs, a native kernel draws the mask
from Philox4x32-10 keyed by a (seed, offset) pair that is drawn from torch's default
generator (so ``torch.manual_seed`` reproduces it) and by each element's index alone (so
neither the ISA nor the thread count changes it). The mask is never stored: the backward
regenerates it from the same (seed, offset). Kept values are scaled in float32 and rounded
once to the input dtype. Elsewhere ``F.dropout`` runs.

The forward and the backward are the same custom op, ``llmcore::dropout_apply(x, rng, p)``,
registered for torch.compile; eager mode calls its implementation through a plain
autograd.Function (as in norm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmcore import _C, _fork
from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops.norm import _CODES

__all__ = ["dropout"]


def _draw_rng() -> Tensor:
    """(seed, offset) for the Philox mask, drawn from torch's default CPU generator."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64)


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _dropout_apply_impl(x: Tensor, rng: Tensor, p: float) -> Tensor:
    if x.dtype not in _CODES:
        raise TypeError(f"the CPU dropout kernel takes float32, bfloat16 or float16, got {x.dtype}")
    if rng.dtype != torch.int64 or rng.numel() != 2:
        raise ValueError("rng must be an int64 tensor of 2 elements (seed, offset), "
                         f"got {rng.dtype} {tuple(rng.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    out = torch.empty(x.shape, dtype=x.dtype)
    if x.numel() == 0:
        return out
    xc = x.contiguous()  # the mask follows the row-major element index
    seed, offset = rng.tolist()
    _C.dropout_apply(_CODES[x.dtype], xc.numel(), float(p), _scale(p), seed & (2**64 - 1), offset & (2**64 - 1),
                     xc.data_ptr(), out.data_ptr(), _fork.num_threads())
    return out


@torch.library.custom_op("llmcore::dropout_apply", mutates_args=(), device_types="cpu")
def _dropout_apply(x: Tensor, rng: Tensor, p: float) -> Tensor:
    """x * (keep ? 1 / (1 - p) : 0), keep from Philox keyed by rng = (seed, offset) and the
    element index; the same call on the gradient is the backward."""
    return _dropout_apply_impl(x, rng, p)


@_dropout_apply.register_fake
def _(x, rng, p):
    return x.new_empty(x.shape)


def _dropout_setup(ctx, inputs, output):
    _, rng, p = inputs
    ctx.save_for_backward(rng)
    ctx.p = p


def _dropout_backward_with(apply, ctx, grad_y):
    if grad_y is None:  # the output got no gradient (grads are not materialized)
        return None, None, None
    (rng,) = ctx.saved_tensors
    return apply(grad_y, rng, ctx.p), None, None


_dropout_apply.register_autograd(lambda ctx, g: _dropout_backward_with(_dropout_apply, ctx, g),
                                 setup_context=_dropout_setup)
_DropoutEager = _eager_function("_DropoutEager", _dropout_apply_impl, _dropout_setup,
                                lambda ctx, g: _dropout_backward_with(_dropout_apply_impl, ctx, g))


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """``torch.nn.functional.dropout(x, p, training)`` with a Philox mask that is recomputed,
    not stored, for the backward (see the module docstring).

    >>> dropout(torch.ones(2, 4), 0.5, training=False).sum().item()
    8.0
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(p, (str, bytes)) or isinstance(p, bool):  # (float("0.5") took a string: a probe)
        raise TypeError(f"dropout probability must be a number, got {p!r}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    native = (x.device.type == "cpu" and x.dtype in _CODES and x.is_contiguous())
    if not native:
        return F.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0  # as torch: zeros (NaN where x is inf or NaN), gradient zero
    rng = _draw_rng()
    return _run_op(_dropout_apply, _DropoutEager, x, rng, p)
