"""Rotary position embedding in Triton, rotate-half layout: the formulas of csrc/norm/rotary_kernels.cpp.
Per row r (a token) and head h, with x1 | x2 the halves of x[r, h] and c1 | c2, s1 | s2 those of cos[r],
sin[r], in float32 and rounded once to the output's dtype:

    forward    out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2
    backward   out1 = x1 c1 + x2 s2,  out2 = x2 c2 - x1 s1     (x: the output's gradient; the transpose)

Each program takes ROWS rows and BLOCK_H heads of them: the angles of a row are read once for its heads.

Loaded once per mode by :mod:`llmcore.ops.triton._loader`.
"""
import os

import triton
import triton.language as tl

from llmcore.ops.triton import _loader

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_cast = _loader.load("_helpers", INTERPRET).cast


@triton.jit
def rotary(X, COS, SIN, OUT, rows, heads, stride_x, stride_cos, stride_sin,
           HALF: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
           BACKWARD: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = r < rows, d < HALF
    r64 = r.to(tl.int64)
    angles = row_ok[:, None] & d_ok[None, :]
    c1 = tl.load(COS + r64[:, None] * stride_cos + d[None, :], mask=angles, other=0.0).to(tl.float32)
    c2 = tl.load(COS + r64[:, None] * stride_cos + HALF + d[None, :], mask=angles, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + r64[:, None] * stride_sin + d[None, :], mask=angles, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + r64[:, None] * stride_sin + HALF + d[None, :], mask=angles, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose: (s1, s2) -> (-s2, -s1)
        s1, s2 = -s2, -s1
    # (ROWS, BLOCK_H, BLOCK_D) tiles; x's heads sit 2 * HALF apart within a row, the output is contiguous
    inside = row_ok[:, None, None] & (h < heads)[None, :, None] & d_ok[None, None, :]
    col = h[None, :, None] * (2 * HALF) + d[None, None, :]
    x_at = X + r64[:, None, None] * stride_x + col
    x1 = tl.load(x_at, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=inside, other=0.0).to(tl.float32)
    c1, c2, s1, s2 = c1[:, None, :], c2[:, None, :], s1[:, None, :], s2[:, None, :]
    out_at = OUT + r64[:, None, None] * (heads * 2 * HALF) + col
    tl.store(out_at, _cast(x1 * c1 - x2 * s1, OUT.dtype.element_ty), mask=inside)
    tl.store(out_at + HALF, _cast(x2 * c2 + x1 * s2, OUT.dtype.element_ty), mask=inside)
