"""FlashAttention-2 in Triton: forward, and a backward in two kernels (dQ, which also makes D
for the next, then dK/dV), or in one (dK/dV adding dQ) after a small kernel that makes D.

Notation, per (batch, query head) and query row i, key j, with s = scale * log2(e):

    S_ij = s * q_i . k_j  (+ log2(e) * additive mask; -inf where masked)
    P_ij = exp2(S_ij - lse_i),  lse_i = log2(sum_j exp2(S_ij))       (base-2 logsumexp)
    O_i  = sum_j P_ij Z_ij / (1 - p) v_j                               (Z: dropout keep mask)

Backward, with D_i = dO_i . O_i:

    dV_j = sum_i P_ij Z_ij / (1 - p) dO_i
    dS_ij = P_ij (Z_ij / (1 - p) dO_i . v_j - D_i)
    dQ_i = scale * sum_j dS_ij k_j,   dK_j = scale * sum_i dS_ij q_i

One program owns BLOCK_M query rows (forward, dQ) or BLOCK_N key rows (dK/dV, which also
loops over the GROUP query heads sharing a key head, so GQA needs no atomics). The dK/dV
kernel can instead produce dQ as well (DQ_ATOMIC): each of its query blocks adds
scale * dS^T k into a float32 buffer with atomics, which saves the dQ kernel's two
recomputed matmuls (S and dP) at the price of a summation order that varies run to run. Key blocks
wholly visible to a query block run without per-element masking; only the blocks on the
causal diagonal and the ragged tails are masked. Rows with no visible key get O = 0,
lse = -inf and zero gradients.

Tensors are addressed by (batch, head, row) strides and a contiguous head dim. Dense
inputs are (B, H, L, D); packed varlen inputs (total, H, D) use batch stride 0 and start
each sequence at ``cu_seqlens[b]``. The tiles a kernel streams (K and V, or Q and dO) may
instead come through tensor descriptors over the same tensors (KV_DESC, QD_DESC: TMA copies
on the GPU), rank 4 dense (rows past L read as zeros) or rank 3 packed (rows past a
sequence are the next one's, zeroed in the edge blocks). The logsumexp (and D) live at ``b * stride_lb + h *
stride_lh + row``: (B, H, Lq) dense, (H, total_q) packed; that index is also the dropout
row, as in llmcore's CPU kernels, so both backends draw the same keep mask: Philox4x32-10
keyed by the seed, counter (col / 4, row lo, row hi, offset lo), word col % 4.

This module is loaded once per mode by :mod:`llmcore.ops.triton._loader`: compiled for
CUDA tensors, and under Triton's interpreter for CPU tensors.
"""
import os

import triton
import triton.language as tl

from llmcore.ops.triton import _loader

LOG2E = tl.constexpr(1.4426950408889634)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_h = _loader.load("_helpers", INTERPRET)
_dot = _h.dot
_cast = _h.cast


@triton.jit
def _dropout_keep(seed, offset_lo, rows, cols, thresh):
    """Keep mask of a tile: rows (int64) and cols (int32) broadcast against each other."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)  # the tile's shape
    c0 = (cols >> 2).to(tl.uint32) + zero
    c1 = (rows & 0xFFFFFFFF).to(tl.uint32) + zero
    c2 = (rows >> 32).to(tl.uint32) + zero
    c3 = offset_lo + zero
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    word = (cols & 3) + zero.to(tl.int32)
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return r.to(tl.int64) >= thresh


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """ptrs (R, C); rows (R,), cols (C,) indices checked only where asked (constexpr)."""
    if ROW_MASK:
        if COL_MASK:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if COL_MASK:
            return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _desc_tile(desc, b, h, row0, ROWS: tl.constexpr, COLS: tl.constexpr, VARLEN: tl.constexpr):
    """Rows [row0, row0 + ROWS) of head h, COLS wide, through a tensor descriptor (TMA on the GPU): dense
    (B, H, L, D) at [b, h, row0, 0], rows past L and columns past D reading as zeros; packed (total, H, D) at
    [row0, h, 0], rows past the tensor as zeros (past the sequence: the next sequence's rows)."""
    if VARLEN:
        t = desc.load([row0.to(tl.int32), h, 0])
    else:
        t = desc.load([b, h, row0.to(tl.int32), 0])
    return t.reshape(ROWS, COLS)


@triton.jit
def _rows_tile(PTR, DESC, b, h, start, n0, offs_n, n_rows, offs_c, stride_n, N_COLS: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, VARLEN: tl.constexpr,
               DESC_LOAD: tl.constexpr):
    """Rows [n0, n0 + BLOCK_N) of head h of a sequence's K, V, Q or dO (PTR: the head's first row of the sequence,
    which starts at row ``start`` of a packed tensor), through the descriptor DESC where DESC_LOAD, else by
    pointers. EDGE: the block may pass the sequence's n_rows rows, which read as zeros either way."""
    if DESC_LOAD:
        t = _desc_tile(DESC, b, h, start + n0, BLOCK_N, BLOCK_C, VARLEN)
        if VARLEN and EDGE:
            t = tl.where(offs_n[:, None] < n_rows, t, 0.0)
        return t
    rows = offs_n.to(tl.int64)[:, None] * stride_n  # (int64: row x stride passes 2**31 in long sequences)
    return _load_tile(PTR + rows + offs_c[None, :], offs_n, n_rows, offs_c, N_COLS, EDGE, N_COLS != BLOCK_C)


@triton.jit
def _apply_attn_mask(s, MASK, offs_r, offs_c, len_r, len_c, stride_r, stride_c, MASK_KIND: tl.constexpr):
    """Adds an additive mask (MASK_KIND 2) or applies a boolean one (1) to a score tile s (R, C)."""
    # (int64: a row index times a mask's row stride passes 2**31 at L = 46341, a slice of a wider buffer sooner)
    ptrs = MASK + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
    inside = (offs_r[:, None] < len_r) & (offs_c[None, :] < len_c)
    if MASK_KIND == 1:
        keep = tl.load(ptrs, mask=inside, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        # A finite mask past the float32 maximum / log2(e) overflows to +inf in base 2, and the softmax to NaN
        # where torch gives that key all the weight: it is clamped to the float32 maximum. A mask of +inf stays
        # +inf, so its row is NaN as in torch (clamping it too gave a finite row); -inf and NaN pass through.
        m = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        scaled = m * LOG2E
        s = s + tl.where((scaled == float("inf")) & (m != float("inf")), 3.4028234663852886e38, scaled)
    return s


@triton.jit
def _mask_scores(s, MASK, offs_m, offs_n, len_q, len_k, shift, stride_mm, stride_mn, MASK_KIND: tl.constexpr,
                 EDGE: tl.constexpr, CAUSAL: tl.constexpr):
    """A score tile s (query rows, key columns) with the attention mask applied and, in EDGE blocks, keys past the
    sequence or (CAUSAL) past the diagonal set to -inf."""
    if MASK_KIND != 0:
        s = _apply_attn_mask(s, MASK, offs_m, offs_n, len_q, len_k, stride_mm, stride_mn, MASK_KIND)
    if EDGE:
        visible = offs_n[None, :] < len_k
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, LQ, LK, VARLEN: tl.constexpr):
    """(first row in q, query count, first row in k, key count) of sequence b, all int64 / int32."""
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        len_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        len_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = b.to(tl.int64) * 0
        k_start = q_start
        len_q = LQ + b * 0
        len_k = LK + b * 0
    return q_start, len_q, k_start, len_k


@triton.jit
def _query_block(CU_Q, CU_K, GROUP, LQ, LK, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                 VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query block of a forward or dQ program: (head, sequence, key/value head, first q row, query count,
    first k row, key count, first query of the block, causal shift). Grid (query blocks, heads, sequences);
    causal grids run the longest rows first (fewer stragglers at the end). m0 >= len_q: nothing to do."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, LQ, LK, VARLEN)
    shift = len_k - len_q if BOTTOM_RIGHT else len_k * 0
    return h, b, h // GROUP, q_start, len_q, k_start, len_k, pid_m * BLOCK_M, shift


@triton.jit
def _key_range(m0, len_k, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, hi): query rows [m0, m0 + BLOCK_M) see keys below hi, and every one of them sees whole key
    blocks below full (a multiple of BLOCK_N); the blocks from full to hi need the causal or edge mask."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + shift), 0)
        full = tl.maximum(tl.minimum(hi, m0 + shift + 1), 0)
    else:
        hi = len_k
        full = len_k
    return full // BLOCK_N * BLOCK_N, hi


# ---------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, b, hk, k_start, MASK, n0, offs_m, offs_d, offs_dv, len_q,
              len_k, shift, stride_kn, stride_vn, stride_mm, stride_mn, scale_log2, seed, offset_lo, drop_rows,
              drop_thresh, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
              MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr,
              VARLEN: tl.constexpr, KV_DESC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _rows_tile(K, K_DESC, b, hk, k_start, n0, offs_n, len_k, offs_d, stride_kn, HEAD_DIM, BLOCK_D, BLOCK_N, EDGE,
                   VARLEN, KV_DESC)
    qk = _dot(q, tl.trans(k), None, PRECISION)
    if MASK_KIND == 0 and not EDGE and FOLD_SCALE:
        # Nothing masked: the row max of the raw products, scaled once per row (FOLD_SCALE only with a positive
        # scale, which keeps the max), and the scale and shift of each element in one FMA.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale_log2 - m_use[:, None])
    else:
        s = _mask_scores(qk * scale_log2, MASK, offs_m, offs_n, len_q, len_k, shift, stride_mm, stride_mn, MASK_KIND,
                         EDGE, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, offset_lo, drop_rows[:, None], offs_n[None, :], drop_thresh), p, 0.0)
    v = _rows_tile(V, V_DESC, b, hk, k_start, n0, offs_n, len_k, offs_dv, stride_vn, HEAD_DIM_V, BLOCK_DV, BLOCK_N,
                   EDGE, VARLEN, KV_DESC)
    acc = _dot(_cast(p, v.dtype), v, acc, PRECISION)
    return acc, l_i, m_new


@triton.jit
def attn_fwd(
    Q, K, V, OUT, LSE, MASK, CU_Q, CU_K, RNG, K_DESC, V_DESC,
    scale_log2, drop_thresh, drop_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    GROUP, LQ, LK, TUNE_LEN,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr, MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr, KV_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """KV_DESC: K and V tiles come through the tensor descriptors K_DESC and V_DESC (TMA), not pointers."""
    h, b, hk, q_start, len_q, k_start, len_k, m0, shift = _query_block(CU_Q, CU_K, GROUP, LQ, LK, CAUSAL,
                                                                       BOTTOM_RIGHT, VARLEN, BLOCK_M)
    if m0 >= len_q:
        return

    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    OUT += b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    MASK += b64 * stride_mb + h.to(tl.int64) * stride_mh
    lse_row0 = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :], offs_m, len_q, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)
    drop_rows = lse_row0 + offs_m
    seed = tl.load(RNG) if DROPOUT else 0
    offset_lo = (tl.load(RNG + 1) & 0xFFFFFFFF).to(tl.uint32) if DROPOUT else 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    full, hi = _key_range(m0, len_k, shift, CAUSAL, BLOCK_M, BLOCK_N)
    for n0 in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, b, hk, k_start, MASK, n0, offs_m, offs_d,
                                  offs_dv, len_q, len_k, shift, stride_kn, stride_vn, stride_mm, stride_mn, scale_log2,
                                  seed, offset_lo, drop_rows, drop_thresh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                  BLOCK_N, False, CAUSAL, MASK_KIND, DROPOUT, PRECISION, FOLD_SCALE, VARLEN, KV_DESC)
    for n0 in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, b, hk, k_start, MASK, n0, offs_m, offs_d,
                                  offs_dv, len_q, len_k, shift, stride_kn, stride_vn, stride_mm, stride_mn, scale_log2,
                                  seed, offset_lo, drop_rows, drop_thresh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                  BLOCK_N, True, CAUSAL, MASK_KIND, DROPOUT, PRECISION, FOLD_SCALE, VARLEN, KV_DESC)

    dead = l_i == 0.0
    out = acc * (drop_scale / tl.where(dead, 1.0, l_i))[:, None]
    lse = tl.where(dead, float("-inf"), m_i + tl.math.log2(tl.where(dead, 1.0, l_i)))
    row_ok = offs_m < len_q
    tl.store(LSE + lse_row0 + offs_m, lse, mask=row_ok)
    o_ptrs = OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, _cast(out, OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


# ---------------------------------------------------------------------------------------
# backward


@triton.jit
def attn_bwd_delta(
    OUT, DO, DELTA, CU_Q,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    LQ,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DELTA[row] = dO[row] . O[row] in float32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, _, _ = _seq_bounds(CU_Q, CU_Q, b, LQ, LQ, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + (q_start + offs_m)[:, None] * stride_om
                   + offs_dv[None, :], offs_m, len_q, offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    do = _load_tile(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + (q_start + offs_m)[:, None] * stride_dom
                    + offs_dv[None, :], offs_m, len_q, offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, b, h, q_start, LSE, DELTA, MASK, DQA, DQ_DESC, m0, offs_n, offs_d,
               offs_dv, len_q, len_k, shift, stride_qm, stride_dom, stride_mm, stride_mn, scale, scale_log2, seed,
               offset_lo, lse_row0, drop_thresh, drop_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
               MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
               DQ_TMA: tl.constexpr, EVEN_M: tl.constexpr, VARLEN: tl.constexpr, QD_DESC: tl.constexpr):
    """One query block against this program's key block, in transposed form (keys as rows).

    With DQ_ATOMIC it also adds this block's share of dQ (scale * dS k) into the float32 DQA, whose
    row r is the logsumexp's row r, BLOCK_D wide: by per-element atomics, or (DQ_TMA) as one tile
    through the tensor descriptor DQ_DESC (a TMA reduction on the GPU). Rows past the sequence add
    exact zeros there (their dS is 0), so a tile may overlap the next sequence's rows.
    EVEN_M: the query count is a multiple of BLOCK_M (dense inputs), so no row is out of range.
    QD_DESC: the Q and dO tiles come through the descriptors Q_DESC and DO_DESC (query head h, sequence b).
    """
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < len_q
    # Rows past the sequence load as zeros with lse = +inf, so they add nothing (no per-element mask).
    q = _rows_tile(Q, Q_DESC, b, h, q_start, m0, offs_m, len_q, offs_d, stride_qm, HEAD_DIM, BLOCK_D, BLOCK_M,
                   EVEN_M == 0, VARLEN, QD_DESC)
    if EVEN_M:
        lse = tl.load(LSE + lse_row0 + offs_m)
    else:
        lse = tl.load(LSE + lse_row0 + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see nothing: P = 0
    s_t = _dot(k, tl.trans(q), None, PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M)
    if MASK_KIND != 0:
        s_t = _apply_attn_mask(s_t, MASK, offs_n, offs_m, len_k, len_q, stride_mn, stride_mm, MASK_KIND)
    if DIAGONAL:
        s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse[None, :])
    do = _rows_tile(DO, DO_DESC, b, h, q_start, m0, offs_m, len_q, offs_dv, stride_dom, HEAD_DIM_V, BLOCK_DV, BLOCK_M,
                    EVEN_M == 0, VARLEN, QD_DESC)
    dp_t = _dot(v, tl.trans(do), None, PRECISION)
    if DROPOUT:
        keep_t = _dropout_keep(seed, offset_lo, (lse_row0 + offs_m)[None, :], offs_n[:, None], drop_thresh)
        pd_t = tl.where(keep_t, p_t * drop_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
    else:
        pd_t = p_t
    dv = _dot(_cast(pd_t, do.dtype), do, dv, PRECISION)
    if EVEN_M:
        delta = tl.load(DELTA + lse_row0 + offs_m)
    else:
        delta = tl.load(DELTA + lse_row0 + offs_m, mask=row_ok, other=0.0)
    ds_t = _cast(p_t * (dp_t - delta[None, :]), q.dtype)
    dk = _dot(ds_t, q, dk, PRECISION)
    if DQ_ATOMIC:
        dq = _dot(tl.trans(ds_t), k, None, PRECISION) * scale  # (BLOCK_M, BLOCK_D)
        if DQ_TMA:
            _h.tile_add(DQ_DESC, (lse_row0 + m0).to(tl.int32), dq)
        else:
            tl.atomic_add(DQA + (lse_row0 + offs_m)[:, None] * BLOCK_D + offs_d[None, :], dq,
                          mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _head_inputs(Q, DO, MASK, b64, h, q_start, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                 stride_mb, stride_mh, stride_lb, stride_lh):
    """Query head h's Q, dO and mask bases, and the logsumexp index of its first row."""
    h = h.to(tl.int64)
    return (Q + b64 * stride_qb + h * stride_qh + q_start * stride_qm,
            DO + b64 * stride_dob + h * stride_doh + q_start * stride_dom,
            MASK + b64 * stride_mb + h * stride_mh,
            b64 * stride_lb + h * stride_lh + q_start)


@triton.jit
def _dkdv_heads(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, b, LSE, DELTA, MASK, DQA, DQ_DESC, b64, hk, GROUP, q_start, m_lo,
                m_hi, offs_n,
                offs_d, offs_dv, len_q, len_k, shift, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                stride_dom, stride_mb, stride_mh, stride_mm, stride_mn, stride_lb, stride_lh, scale, scale_log2, seed,
                offset_lo, drop_thresh, drop_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                DQ_TMA: tl.constexpr, EVEN_M: tl.constexpr, VARLEN: tl.constexpr, QD_DESC: tl.constexpr,
                HEAD_SUMS: tl.constexpr):
    """_dkdv_step over the query blocks [m_lo, m_hi) of each of the GROUP query heads of key head hk, as one loop
    over (head, block) pairs, adding into dk and dv. HEAD_SUMS: each head's share is summed in a chain of its own
    (ak, av), which joins dk and dv after the head's last block."""
    blocks = tl.cdiv(m_hi - m_lo, BLOCK_M)
    if HEAD_SUMS:
        ak = tl.zeros_like(dk)
        av = tl.zeros_like(dv)
    else:
        ak = dk
        av = dv
    for t in range(0, GROUP * blocks):
        g = t // blocks
        Qh, DOh, MASKh, lse_row0 = _head_inputs(Q, DO, MASK, b64, hk * GROUP + g, q_start, stride_qb, stride_qh,
                                                stride_qm, stride_dob, stride_doh, stride_dom, stride_mb, stride_mh,
                                                stride_lb, stride_lh)
        ak, av = _dkdv_step(ak, av, k, v, Qh, DOh, Q_DESC, DO_DESC, b, hk * GROUP + g, q_start, LSE, DELTA, MASKh, DQA,
                            DQ_DESC, m_lo + (t - g * blocks) * BLOCK_M, offs_n, offs_d, offs_dv, len_q, len_k, shift,
                            stride_qm, stride_dom, stride_mm, stride_mn, scale, scale_log2, seed, offset_lo, lse_row0,
                            drop_thresh, drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, DIAGONAL,
                            MASK_KIND, DROPOUT, PRECISION, DQ_ATOMIC, DQ_TMA, EVEN_M, VARLEN, QD_DESC)
        if HEAD_SUMS:
            last = t - g * blocks == blocks - 1
            dk = tl.where(last, dk + ak, dk)
            dv = tl.where(last, dv + av, dv)
            ak = tl.where(last, 0.0, ak)
            av = tl.where(last, 0.0, av)
    if not HEAD_SUMS:
        dk = ak
        dv = av
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK, CU_Q, CU_K, RNG, DQ_ACC, DQ_DESC, Q_DESC, DO_DESC,
    scale, scale_log2, drop_thresh, drop_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    GROUP, LQ, LK, TUNE_LEN,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr, MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_TMA: tl.constexpr,
    EVEN_M: tl.constexpr, GROUPED: tl.constexpr, HEAD_SUMS: tl.constexpr, QD_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV of one key block (over the GROUP query heads sharing it); with DQ_ATOMIC also dQ,
    added in float32 into the zeroed DQ_ACC (then no attn_bwd_dq launch is needed): (logsumexp rows,
    BLOCK_D), written through the descriptor DQ_DESC (block (BLOCK_M, BLOCK_D)) where DQ_TMA.
    GROUPED (GROUP > 1): each of the two query loops runs over (head, block) pairs, one loop rather than a
    loop over heads around one over blocks, which compiled for sm_90 spilled (176 B at D 128, causal).
    HEAD_SUMS (with GROUPED; float32 inputs): each query head's share of dK and dV is summed on its own, then
    added, as torch sums GQA heads. In one float32 chain over all GROUP heads (a dot adds into its accumulator
    term by term) dV's error was twice torch's on an H200 (7.1e-6 vs 3.2e-6, MQA 3:1, Lq 400); a CPU simulation
    of the two summation orders on that case gave 3.2e-6 per head (torch's figure) and 5.8e-6 for one chain.
    QD_DESC: the Q and dO tiles come through the tensor descriptors Q_DESC and DO_DESC (TMA), not pointers."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, LQ, LK, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    shift = len_k - len_q if BOTTOM_RIGHT else len_k * 0
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    v_base = b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    rows = offs_n.to(tl.int64)[:, None]
    k = _load_tile(K + k_base + rows * stride_kn + offs_d[None, :], offs_n, len_k, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)
    v = _load_tile(V + v_base + rows * stride_vn + offs_dv[None, :], offs_n, len_k, offs_dv, HEAD_DIM_V,
                   True, HEAD_DIM_V != BLOCK_DV)
    seed = tl.load(RNG) if DROPOUT else 0
    offset_lo = (tl.load(RNG + 1) & 0xFFFFFFFF).to(tl.uint32) if DROPOUT else 0

    if CAUSAL:  # query i sees key j when j <= i + shift
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - shift, lo), len_q)  # rows from here see the whole block
        mid = tl.minimum((mid + BLOCK_M - 1 - lo) // BLOCK_M * BLOCK_M + lo, tl.maximum(len_q, lo))
    else:
        lo = len_q * 0
        mid = lo

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if GROUPED:
        dk, dv = _dkdv_heads(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, b, LSE, DELTA, MASK, DQ_ACC, DQ_DESC, b64, hk, GROUP,
                             q_start, lo, mid, offs_n, offs_d, offs_dv, len_q, len_k, shift, stride_qb, stride_qh,
                             stride_qm, stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mm, stride_mn,
                             stride_lb, stride_lh, scale, scale_log2, seed, offset_lo, drop_thresh, drop_scale,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, True, MASK_KIND, DROPOUT, PRECISION,
                             DQ_ATOMIC, DQ_TMA, EVEN_M, VARLEN, QD_DESC, HEAD_SUMS)
        dk, dv = _dkdv_heads(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, b, LSE, DELTA, MASK, DQ_ACC, DQ_DESC, b64, hk, GROUP,
                             q_start, mid, len_q, offs_n, offs_d, offs_dv, len_q, len_k, shift, stride_qb, stride_qh,
                             stride_qm, stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mm, stride_mn,
                             stride_lb, stride_lh, scale, scale_log2, seed, offset_lo, drop_thresh, drop_scale,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, False, MASK_KIND, DROPOUT, PRECISION,
                             DQ_ATOMIC, DQ_TMA, EVEN_M, VARLEN, QD_DESC, HEAD_SUMS)
    else:
        Qh, DOh, MASKh, lse_row0 = _head_inputs(Q, DO, MASK, b64, hk, q_start, stride_qb, stride_qh, stride_qm,
                                                stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_lb,
                                                stride_lh)
        for m0 in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Qh, DOh, Q_DESC, DO_DESC, b, hk, q_start, LSE, DELTA, MASKh, DQ_ACC,
                                DQ_DESC, m0, offs_n, offs_d, offs_dv, len_q, len_k, shift, stride_qm, stride_dom,
                                stride_mm, stride_mn, scale, scale_log2, seed, offset_lo, lse_row0, drop_thresh,
                                drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, True, MASK_KIND, DROPOUT,
                                PRECISION, DQ_ATOMIC, DQ_TMA, EVEN_M, VARLEN, QD_DESC)
        for m0 in range(mid, len_q, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Qh, DOh, Q_DESC, DO_DESC, b, hk, q_start, LSE, DELTA, MASKh, DQ_ACC,
                                DQ_DESC, m0, offs_n, offs_d, offs_dv, len_q, len_k, shift, stride_qm, stride_dom,
                                stride_mm, stride_mn, scale, scale_log2, seed, offset_lo, lse_row0, drop_thresh,
                                drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, False, MASK_KIND, DROPOUT,
                                PRECISION, DQ_ATOMIC, DQ_TMA, EVEN_M, VARLEN, QD_DESC)

    row_ok = offs_n[:, None] < len_k
    dk_ptrs = DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + (k_start + offs_n)[:, None] * stride_dkn
    tl.store(dk_ptrs + offs_d[None, :], _cast(dk * scale, DK.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < HEAD_DIM))
    dv_ptrs = DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + (k_start + offs_n)[:, None] * stride_dvn
    tl.store(dv_ptrs + offs_dv[None, :], _cast(dv, DV.dtype.element_ty), mask=row_ok & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, K_DESC, V_DESC, b, hk, k_start, MASK, n0, offs_m, offs_d, offs_dv, len_q,
             len_k, shift, stride_kn, stride_vn, stride_mm, stride_mn, scale_log2, seed, offset_lo, drop_rows,
             drop_thresh, drop_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
             MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
             KV_DESC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _rows_tile(K, K_DESC, b, hk, k_start, n0, offs_n, len_k, offs_d, stride_kn, HEAD_DIM, BLOCK_D, BLOCK_N, EDGE,
                   VARLEN, KV_DESC)
    v = _rows_tile(V, V_DESC, b, hk, k_start, n0, offs_n, len_k, offs_dv, stride_vn, HEAD_DIM_V, BLOCK_DV, BLOCK_N,
                   EDGE, VARLEN, KV_DESC)
    s = _mask_scores(_dot(q, tl.trans(k), None, PRECISION) * scale_log2, MASK, offs_m, offs_n, len_q, len_k, shift,
                     stride_mm, stride_mn, MASK_KIND, EDGE, CAUSAL)
    p = tl.math.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), None, PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, offset_lo, drop_rows[:, None], offs_n[None, :], drop_thresh)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return _dot(_cast(ds, k.dtype), k, dq, PRECISION)


@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, MASK, CU_Q, CU_K, RNG, K_DESC, V_DESC, OUT,
    scale, scale_log2, drop_thresh, drop_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    GROUP, LQ, LK, TUNE_LEN,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr, MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, KV_DESC: tl.constexpr, DELTA_HERE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """KV_DESC: K and V tiles come through the tensor descriptors K_DESC and V_DESC (TMA), not pointers.
    DELTA_HERE: the block's DELTA rows (dO . O, what attn_bwd_delta computes) are made here from its dO tile and
    the forward's output OUT, and stored for the dK/dV kernel launched after this one; else they are read."""
    h, b, hk, q_start, len_q, k_start, len_k, m0, shift = _query_block(CU_Q, CU_K, GROUP, LQ, LK, CAUSAL,
                                                                       BOTTOM_RIGHT, VARLEN, BLOCK_M)
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    MASK += b64 * stride_mb + h.to(tl.int64) * stride_mh
    lse_row0 = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < len_q
    q_rows = (q_start + offs_m)[:, None]
    q = _load_tile(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_rows * stride_qm + offs_d[None, :],
                   offs_m, len_q, offs_d, HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    do = _load_tile(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_rows * stride_dom + offs_dv[None, :],
                    offs_m, len_q, offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    lse = tl.load(LSE + lse_row0 + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    if DELTA_HERE:
        o = _load_tile(OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_rows * stride_om + offs_dv[None, :],
                       offs_m, len_q, offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + lse_row0 + offs_m, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + lse_row0 + offs_m, mask=row_ok, other=0.0)
    seed = tl.load(RNG) if DROPOUT else 0
    offset_lo = (tl.load(RNG + 1) & 0xFFFFFFFF).to(tl.uint32) if DROPOUT else 0
    drop_rows = lse_row0 + offs_m

    full, hi = _key_range(m0, len_k, shift, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, K_DESC, V_DESC, b, hk, k_start, MASK, n0, offs_m, offs_d, offs_dv,
                      len_q, len_k, shift, stride_kn, stride_vn, stride_mm, stride_mn, scale_log2, seed, offset_lo,
                      drop_rows, drop_thresh, drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False,
                      CAUSAL, MASK_KIND, DROPOUT, PRECISION, VARLEN, KV_DESC)
    for n0 in range(full, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, K_DESC, V_DESC, b, hk, k_start, MASK, n0, offs_m, offs_d, offs_dv,
                      len_q, len_k, shift, stride_kn, stride_vn, stride_mm, stride_mn, scale_log2, seed, offset_lo,
                      drop_rows, drop_thresh, drop_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True,
                      CAUSAL, MASK_KIND, DROPOUT, PRECISION, VARLEN, KV_DESC)
    dq_ptrs = DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + q_rows * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, _cast(dq * scale, DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
