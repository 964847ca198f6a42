"""The accuracy rule of the attention tests, after FlashAttention's test suite.

A result in dtype ``dt`` passes when its max error against the float64 reference is at
most twice torch's own error in ``dt`` against the same reference, plus the rounding
error ``dt`` makes on values of the reference's size (so an exact torch result does not
demand an exact llmcore result).
"""
from __future__ import annotations

import torch


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
