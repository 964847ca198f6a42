"""LayerNorm and RMSNorm over the last dim in Triton, with the residual add fused.

Forward, per row of s = x + residual (rounded to x's dtype, as the unfused add would be),
statistics in float32:

    LayerNorm: y = (s - mean) * rstd * w + b,        rstd = 1 / sqrt(var(s) + eps)
    RMSNorm:   y = w * round_x(s * rstd),            rstd = 1 / sqrt(mean(s^2) + eps)   (HF LlamaRMSNorm)

Backward, with xhat = (s - mean) * rstd (LayerNorm) or s * rstd (RMSNorm), g = dy * w and
N the row length:

    LayerNorm: ds = rstd * (g - xhat * mean(g * xhat) - mean(g)),  dw = sum_rows dy * xhat,  db = sum_rows dy
    RMSNorm:   ds = rstd * (g - xhat * mean(g * xhat)),            dw = sum_rows dy * round_x(xhat)

plus the gradient that reaches s directly (the residual stream's). The forward's programs
hold ROWS whole rows (BLOCK_N >= N), or, for wide rows, sweep them in BLOCK_N-column chunks
(CHUNKED). The backward comes in two forms (``norm.py`` picks):

- fused, ``norm_bwd``: each program sweeps a contiguous range of whole rows, writing ds and
  one float32 partial of dw and db (summed afterwards). It reads each input once, but holds
  the full-width dw and db accumulators beside the row, which spill at 16384+ columns, and
  its few programs keep little memory traffic in flight.
- split, ``norm_bwd_dx`` then ``norm_bwd_dw``: the first holds ROWS rows per program as the
  forward does (or, for rows wider than BLOCK_N, sweeps each row twice in BLOCK_N-column
  chunks: the row sums, then ds), the second sums dw and db down column blocks, one float32
  partial per range of rows. It reads dy and x twice.

Loaded once per mode by :mod:`llmcore.ops.triton._loader`.
"""
import os

import triton
import triton.language as tl

from llmcore.ops.triton import _loader

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_cast = _loader.load("_helpers", INTERPRET).cast


@triton.jit
def _row_tile(r0, bound, ROWS: tl.constexpr):
    """Rows r0 .. r0 + ROWS of a tile: (rows, rows below ``bound``, rows as an int64 column for the offsets)."""
    rows = r0 + tl.arange(0, ROWS)
    return rows, rows < bound, rows.to(tl.int64)[:, None]


@triton.jit
def _residual_sum(X, R, S, r64, cols, inside, stride_x, stride_r, stride_s, HAS_RES: tl.constexpr):
    """A tile of s = x + residual in x's dtype (stored to S), or of x without a residual."""
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=inside, other=0.0)
    if HAS_RES:
        res = tl.load(R + r64 * stride_r + cols[None, :], mask=inside, other=0.0)
        x = _cast(x.to(tl.float32) + res.to(tl.float32), X.dtype.element_ty)
        tl.store(S + r64 * stride_s + cols[None, :], x, mask=inside)
    return x


@triton.jit
def _layer_norm_rstd(var):
    """1 / sqrt(var), NaN where the variance overflowed to inf (as torch's row; rstd 0 gave y the bias, silently)."""
    return tl.where(var == float("inf"), float("nan"), 1.0 / tl.sqrt(var))


@triton.jit
def _normalized(xf, mean, rstd, w, B, cols, col_ok, inside, X_DTYPE: tl.constexpr, RMS: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y of a tile of s (float32) from its rows' statistics (mean unused for RMS); w: the weight's columns, loaded
    by the caller (before the row sums, so that its latency hides behind them)."""
    if RMS:
        y = _cast(xf * rstd[:, None], X_DTYPE).to(tl.float32)
    else:
        y = tl.where(inside, xf - mean[:, None], 0.0) * rstd[:, None]
    if HAS_W:
        y = y * w[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def norm_fwd(
    X, R, W, B, Y, S, MEAN, RSTD,
    n_rows, n_cols, stride_x, stride_r, stride_y, stride_s, eps,
    RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr,
):
    """ROWS rows per program, whole (BLOCK_N >= n_cols), or, CHUNKED, swept in BLOCK_N-column chunks: s and its
    sum (of squares for RMS), then (LayerNorm) the centred sum of squares, then y; the later sweeps read s back."""
    rows, row_ok, r64 = _row_tile(tl.program_id(0) * ROWS, n_rows, ROWS)
    if CHUNKED:
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            inside = row_ok[:, None] & (cols < n_cols)[None, :]
            xf = _residual_sum(X, R, S, r64, cols, inside, stride_x, stride_r, stride_s, HAS_RES).to(tl.float32)
            acc += xf * xf if RMS else xf
        if HAS_RES:  # the later sweeps read s back: the block's stores visible to all its threads, whatever layout
            tl.debug_barrier()
        S_ = S if HAS_RES else X  # where the later sweeps read s
        stride = stride_s if HAS_RES else stride_x
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(acc, 1) / n_cols + eps)
            mean = rstd
        else:
            mean = tl.sum(acc, 1) / n_cols
            acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
            for c0 in range(0, n_cols, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                inside = row_ok[:, None] & (cols < n_cols)[None, :]
                xf = tl.load(S_ + r64 * stride + cols[None, :], mask=inside, other=0.0).to(tl.float32)
                xc = tl.where(inside, xf - mean[:, None], 0.0)
                acc += xc * xc
            rstd = _layer_norm_rstd(tl.sum(acc, 1) / n_cols + eps)
        for c0 in range(0, n_cols, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            inside = row_ok[:, None] & col_ok[None, :]
            w = _weight(W, cols, col_ok, HAS_W)
            xf = tl.load(S_ + r64 * stride + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            y = _normalized(xf, mean, rstd, w, B, cols, col_ok, inside, X.dtype.element_ty, RMS, HAS_W, HAS_B)
            tl.store(Y + r64 * stride_y + cols[None, :], _cast(y, Y.dtype.element_ty), mask=inside)
    else:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        inside = row_ok[:, None] & col_ok[None, :]
        xf = _residual_sum(X, R, S, r64, cols, inside, stride_x, stride_r, stride_s, HAS_RES).to(tl.float32)
        w = _weight(W, cols, col_ok, HAS_W)
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / n_cols + eps)
            mean = rstd
        else:
            mean = tl.sum(xf, 1) / n_cols
            xc = tl.where(inside, xf - mean[:, None], 0.0)
            rstd = _layer_norm_rstd(tl.sum(xc * xc, 1) / n_cols + eps)
        y = _normalized(xf, mean, rstd, w, B, cols, col_ok, inside, X.dtype.element_ty, RMS, HAS_W, HAS_B)
        tl.store(Y + r64 * stride_y + cols[None, :], _cast(y, Y.dtype.element_ty), mask=inside)
    if not RMS:
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _grad_terms(DY, X, MEAN, w, rstd, r64, rows, row_ok, cols, col_ok, stride_dy, stride_x,
                RMS: tl.constexpr, HAS_W: tl.constexpr):
    """(dy, g = dy * w, xhat) of a tile (rows, cols) in float32, zero outside it; w (cols,) and rstd (rows,)
    already loaded (w unused without HAS_W)."""
    inside = row_ok[:, None] & col_ok[None, :]
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if RMS:
        xhat = x * rstd[:, None]
    else:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        xhat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * w[None, :] if HAS_W else dy
    return dy, g, xhat


@triton.jit
def _weight(W, cols, col_ok, HAS_W: tl.constexpr):
    """The weight's columns in float32 (zeros, unused, without one)."""
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.zeros_like(cols).to(tl.float32)
    return w


@triton.jit
def _dw_terms(dy, xhat, X_DTYPE: tl.constexpr, RMS: tl.constexpr):
    """The tile's terms of dw: dy * xhat (RMS: xhat rounded to x's dtype first, as HF multiplies the weight by it)."""
    if RMS:
        xhat = _cast(xhat, X_DTYPE).to(tl.float32)
    return dy * xhat


@triton.jit
def _store_ds(DS, DX, g, xhat, c1, c2, rstd, r64, row_ok, cols, col_ok, stride_ds, stride_dx,
              RMS: tl.constexpr, HAS_DS: tl.constexpr):
    """ds = rstd * (g - xhat * c1 - c2) (RMS: without c2), plus the residual stream's gradient DS, stored in DX."""
    inside = row_ok[:, None] & col_ok[None, :]
    if RMS:
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    else:
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DS:
        dx = dx + tl.load(DS + r64 * stride_ds + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    tl.store(DX + r64 * stride_dx + cols[None, :], _cast(dx, DX.dtype.element_ty), mask=inside)


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
    w = _weight(W, cols, col_ok, HAS_W)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for r0 in tl.range(first, last, ROWS, num_stages=STAGES):  # STAGES 2: the next rows load during this one
        rows, row_ok, r64 = _row_tile(r0, last, ROWS)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dy, g, xhat = _grad_terms(DY, X, MEAN, w, rstd, r64, rows, row_ok, cols, col_ok, stride_dy, stride_x,
                                  RMS, HAS_W)
        c1 = tl.sum(xhat * g, 1) / n_cols
        c2 = c1 if RMS else tl.sum(g, 1) / n_cols
        _store_ds(DS, DX, g, xhat, c1, c2, rstd, r64, row_ok, cols, col_ok, stride_ds, stride_dx, RMS, HAS_DS)
        if NEED_DW:
            dw += tl.sum(_dw_terms(dy, xhat, X.dtype.element_ty, RMS), 0)
        if NEED_DB:
            db += tl.sum(dy, 0)
    if NEED_DW:
        tl.store(DW + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)
    if NEED_DB:
        tl.store(DB + pid.to(tl.int64) * n_cols + cols, db, mask=col_ok)


@triton.jit
def norm_bwd_dx(
    DY, X, MEAN, RSTD, W, DS, DX,
    n_rows, n_cols, stride_dy, stride_x, stride_ds, stride_dx,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    """ds of ROWS rows (the split backward's first kernel). CHUNKED: rows wider than BLOCK_N, swept twice."""
    rows, row_ok, r64 = _row_tile(tl.program_id(0) * ROWS, n_rows, ROWS)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if CHUNKED:
        s1 = tl.zeros([ROWS], tl.float32)
        s2 = tl.zeros([ROWS], tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            _, g, xhat = _grad_terms(DY, X, MEAN, _weight(W, cols, col_ok, HAS_W), rstd, r64, rows, row_ok, cols,
                                     col_ok, stride_dy, stride_x, RMS, HAS_W)
            s1 += tl.sum(xhat * g, 1)
            if not RMS:
                s2 += tl.sum(g, 1)
        c1 = s1 / n_cols
        c2 = s2 / n_cols
        for c0 in range(0, n_cols, BLOCK_N):  # the second sweep's loads mostly hit L2
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            _, g, xhat = _grad_terms(DY, X, MEAN, _weight(W, cols, col_ok, HAS_W), rstd, r64, rows, row_ok, cols,
                                     col_ok, stride_dy, stride_x, RMS, HAS_W)
            _store_ds(DS, DX, g, xhat, c1, c2, rstd, r64, row_ok, cols, col_ok, stride_ds, stride_dx, RMS, HAS_DS)
    else:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        _, g, xhat = _grad_terms(DY, X, MEAN, _weight(W, cols, col_ok, HAS_W), rstd, r64, rows, row_ok, cols, col_ok,
                                 stride_dy, stride_x, RMS, HAS_W)
        c1 = tl.sum(xhat * g, 1) / n_cols
        c2 = c1 if RMS else tl.sum(g, 1) / n_cols
        _store_ds(DS, DX, g, xhat, c1, c2, rstd, r64, row_ok, cols, col_ok, stride_ds, stride_dx, RMS, HAS_DS)


@triton.jit
def norm_bwd_dw(
    DY, X, MEAN, RSTD, DW, DB,
    n_rows, n_cols, rows_per_program, stride_dy, stride_x,
    RMS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Float32 partials of dw and db over BLOCK_C columns and one range of rows (the split backward's second
    kernel): grid (column blocks, row ranges); partial p of column c at DW[p * n_cols + c]."""
    pid_r = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    dw = tl.zeros([ROWS, BLOCK_C], tl.float32)  # summed down the rows once, at the end
    db = tl.zeros([ROWS, BLOCK_C], tl.float32)
    first = pid_r * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for r0 in range(first, last, ROWS):
        rows, row_ok, r64 = _row_tile(r0, last, ROWS)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dy, _, xhat = _grad_terms(DY, X, MEAN, rstd, rstd, r64, rows, row_ok, cols, col_ok, stride_dy, stride_x,
                                  RMS, False)
        if NEED_DW:
            dw += _dw_terms(dy, xhat, X.dtype.element_ty, RMS)
        if NEED_DB:
            db += dy
    out = pid_r.to(tl.int64) * n_cols + cols
    if NEED_DW:
        tl.store(DW + out, tl.sum(dw, 0), mask=col_ok)
    if NEED_DB:
        tl.store(DB + out, tl.sum(db, 0), mask=col_ok)
