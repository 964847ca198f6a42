"""Launcher of the Triton rotary kernel (``rotary_kernels``): the ``triton`` backend of
:func:`llmcore.ops.rotary_embedding`, which owns the autograd and the custom ops."""
from __future__ import annotations

import torch
from torch import Tensor

from llmcore.ops.triton._loader import kernels

__all__ = ["rotate", "why_not"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def why_not(x: Tensor, cos: Tensor) -> str | None:
    """Why the kernel cannot take this call (dtypes), or None."""
    if x.dtype not in _DTYPES:
        return f"x dtype {x.dtype} not supported (float32, bfloat16, float16)"
    if cos.dtype not in _DTYPES:
        return f"cos / sin dtype {cos.dtype} not supported (float32, bfloat16, float16)"
    return None


def rotate(x2: Tensor, x_stride: int, c2: Tensor, c_stride: int, s2: Tensor, s_stride: int, out: Tensor,
           heads: int, dim: int, backward: bool) -> None:
    """x2 (rows, heads * dim) rows ``x_stride`` apart, cos / sin rows (rows, dim) -> out (rows, heads, dim)."""
    mod = kernels("rotary_kernels", x2.device)
    rows, half = x2.size(0), dim // 2
    block_d = max(1, 1 << (half - 1).bit_length())
    block_h = min(max(1, 1 << (heads - 1).bit_length()), max(1, 4096 // (2 * block_d)))
    rows_per = 1 if mod.INTERPRET else max(1, min(16, 4096 // (block_h * 2 * block_d)))
    grid = (-(-rows // rows_per), -(-heads // block_h))
    mod.rotary[grid](x2, c2, s2, out, rows, heads, x_stride, c_stride, s_stride, HALF=half, BLOCK_D=block_d,
                     ROWS=rows_per, BLOCK_H=block_h, BACKWARD=backward, num_warps=1 if mod.INTERPRET else 4)
