"""LayerNorm and RMSNorm over the last dim in Triton, with the residual add fused.

Forward, per row of s = x + residual (rounded to x's dtype, as the unfused add would be),
statistics in float32:

    LayerNorm: y = (s - mean) * rstd * w + b,        rstd = 1 / sqrt(var(s) + eps)
    RMSNorm:   y = w * round_x(s * rstd),            rstd = 1 / sqrt(mean(s^2) + eps)   (HF LlamaRMSNorm)

Backward, with xhat = (s - mean) * rstd (LayerNorm) or s * rstd (RMSNorm), g = dy * w and
N the row length:

    LayerNorm: ds = rstd * (g - xhat * mean(g * xhat) - mean(g)),  dw = sum_rows dy * xhat,  db = sum_rows dy
    RMSNorm:   ds = rstd * (g - xhat * mean(g * xhat)),            dw = sum_rows dy * round_x(xhat)

plus the gradient that reaches s directly (the residual stream's). A program holds ROWS
whole rows (BLOCK_N >= N); the backward's programs each sweep a contiguous range of rows
and write one float32 partial of dw and db, summed afterwards.

Loaded once per mode by :mod:`llmcore.ops.triton._loader`.
"""
import os

import triton
import triton.language as tl

from llmcore.ops.triton import _loader

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_cast = _loader.load("_helpers", INTERPRET).cast


@triton.jit
def norm_fwd(
    X, R, W, B, Y, S, MEAN, RSTD,
    n_rows, n_cols, stride_x, stride_r, stride_y, stride_s, eps,
    RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    inside = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=inside, other=0.0)
    if HAS_RES:
        res = tl.load(R + r64 * stride_r + cols[None, :], mask=inside, other=0.0)
        x = _cast(x.to(tl.float32) + res.to(tl.float32), X.dtype.element_ty)
        tl.store(S + r64 * stride_s + cols[None, :], x, mask=inside)
    xf = x.to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / n_cols + eps)
        y = _cast(xf * rstd[:, None], X.dtype.element_ty).to(tl.float32)
        if HAS_W:
            y = y * w[None, :]
    else:
        mean = tl.sum(xf, 1) / n_cols
        xc = tl.where(inside, xf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / n_cols + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * w[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    tl.store(Y + r64 * stride_y + cols[None, :], _cast(y, Y.dtype.element_ty), mask=inside)


@triton.jit
def norm_bwd(
    DY, X, MEAN, RSTD, W, DS, DX, DW, DB,
    n_rows, n_cols, rows_per_program, stride_dy, stride_x, stride_ds, stride_dx,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for r0 in tl.range(first, last, ROWS, num_stages=STAGES):  # STAGES 2: the next rows load during this one
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < last
        inside = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_W else dy
        c1 = tl.sum(xhat * g, 1) / n_cols
        if RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, 1) / n_cols
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx = dx + tl.load(DS + r64 * stride_ds + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], _cast(dx, DX.dtype.element_ty), mask=inside)
        if NEED_DW:
            if RMS:  # HF multiplies the weight by the normalized value rounded to x's dtype
                dw += tl.sum(dy * _cast(xhat, X.dtype.element_ty).to(tl.float32), 0)
            else:
                dw += tl.sum(dy * xhat, 0)
        if NEED_DB:
            db += tl.sum(dy, 0)
    if NEED_DW:
        tl.store(DW + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)
    if NEED_DB:
        tl.store(DB + pid.to(tl.int64) * n_cols + cols, db, mask=col_ok)
