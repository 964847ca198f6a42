"""The LM head fused with cross-entropy in chunks, with a Triton kernel per chunk.

Same semantics as :func:`llmcore.ops.linear_cross_entropy` (which routes here for CUDA
tensors, or with ``backend="triton"``) and the same plan: each chunk of rows is projected
by one matmul into a reused (chunk, V) buffer in the compute dtype; ``cross_entropy_kernels``
then turns it, in place, into its loss and its logits' gradient (one kernel, two sweeps,
instead of the log_softmax / exp / scatter / scale passes over a float32 copy), which the
matmuls of ``grad_hidden`` and ``grad_weight`` consume before the next chunk. The
(tokens, vocab) logits are never materialized; gradients are summed over chunks as in
:class:`llmcore.ops.cross_entropy._GradSink`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmcore.ops._autograd import no_double_backward
from llmcore.ops.cross_entropy import _NONES, _finish, _GradSink, _inputs, _row_coef, _saved_backward
from llmcore.ops.triton._loader import kernels

__all__ = ["LinearCrossEntropy", "why_not"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def why_not(compute_dtype: torch.dtype) -> Optional[str]:
    if compute_dtype not in _DTYPES:
        return f"dtype {compute_dtype} not supported (float32, bfloat16, float16)"
    return None


def _ce_rows(z: Tensor, y: Tensor, coef: Optional[Tensor], loss: Tensor, eps: float) -> None:
    """loss[i] from logits z (n, V); with coef, z <- coef[i] * dloss/dz in place."""
    if z.size(0) == 0:
        return
    mod = kernels("cross_entropy_kernels", z.device)
    V = z.size(1)
    if mod.INTERPRET:
        block, warps = 64, 1
    else:
        block = min(8192, max(128, 1 << (V - 1).bit_length()))
        warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    mod.ce_rows[(z.size(0),)](z, y, loss if coef is None else coef, loss, z.stride(0), V, float(eps),
                              WRITE_GRAD=coef is not None, SMOOTH=eps != 0.0, BLOCK_V=block, num_warps=warps)


def _logits(z: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = z[: h.size(0)]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


class _Sums:
    """_GradSink for grad_hidden and grad_weight; grad_bias summed here in float32 from each chunk."""

    def __init__(self, hidden, weight, needs, dtypes, num_chunks):
        self.sink = _GradSink(hidden, weight, (needs[0], needs[1], False), dtypes, torch.float32, num_chunks)
        self.b = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if needs[2] else None

    def add(self, dz: Tensor, h: Tensor, weight: Tensor, s: int) -> None:
        if self.b is not None:
            self.b.add_(dz.sum(0, dtype=torch.float32))
        self.sink.add(dz, None, h, weight, s)

    def result(self) -> tuple:
        self.sink.b = self.b  # converted to the bias dtype with the others
        return self.sink.result()


class LinearCrossEntropy(torch.autograd.Function):
    """Same arguments as ``llmcore.ops.cross_entropy._LinearCrossEntropy``: hidden (N, H), weight (V, H),
    bias (V,) or None, labels (N,) int64 -> loss () or (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, eps, chunk, needs, compute_dtype,
                out_dtype):
        dtypes, hidden, weight, bias, valid, y, n_valid = _inputs(hidden, weight, bias, labels, ignore_index,
                                                                  compute_dtype)
        N, V = hidden.size(0), weight.size(0)
        z = torch.empty(min(chunk, N), V, dtype=compute_dtype, device=hidden.device)
        eager = reduction != "none" and any(needs)
        coef = None
        if eager:
            coef = _row_coef(valid, n_valid, reduction, torch.float32)
            sums = _Sums(hidden, weight, needs, dtypes, -(-N // chunk))
        rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk):
            h = hidden[s : s + chunk]
            zc = _logits(z, h, weight, bias)
            _ce_rows(zc, y[s : s + chunk], None if coef is None else coef[s : s + chunk], rows[s : s + chunk], eps)
            if eager:
                sums.add(zc, h, weight, s)
        del z
        return _finish(ctx, torch.where(valid, rows, 0.0), n_valid, out_dtype, reduction, eps, chunk, needs, dtypes,
                       sums.result() if eager else None, (hidden, weight, bias, y, valid))

    @staticmethod
    @no_double_backward
    def backward(ctx, grad_out):
        saved = _saved_backward(ctx, grad_out)
        if saved is not None:
            return saved
        hidden, weight, bias, y, valid = ctx.saved_tensors
        N, chunk = hidden.size(0), ctx.chunk
        z = torch.empty(min(chunk, N), weight.size(0), dtype=hidden.dtype, device=hidden.device)
        coef = torch.where(valid, grad_out.float(), 0.0)
        sums = _Sums(hidden, weight, ctx.needs, ctx.dtypes, -(-N // chunk))
        scratch_loss = torch.empty(min(chunk, N), dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk):
            h = hidden[s : s + chunk]
            zc = _logits(z, h, weight, bias)
            _ce_rows(zc, y[s : s + chunk], coef[s : s + chunk], scratch_loss[: h.size(0)], ctx.eps)
            sums.add(zc, h, weight, s)
        return sums.result() + _NONES
