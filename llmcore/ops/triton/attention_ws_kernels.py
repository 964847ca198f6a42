"""FlashAttention with Hopper warp specialization: forward, dQ and dK/dV for the common dense case.

The same algorithm and notation as ``attention_kernels`` (base-2 logsumexp, D = dO . O by row), for inputs with
no mask, no dropout, one sequence length L (a multiple of the blocks) and, in the backward, as many key heads
as query heads. Each kernel's main loop is a ``tl.range(..., warp_specialize=WS)``: compiled for sm_90 by
Triton 3.6+, it becomes a producer warp group that issues the TMA copies of the streamed tiles and two consumer
warp groups, each owning half of the program's resident rows (64 of the forward's and dQ's 128 query rows, 64
of the dK/dV kernel's 128 key rows), with the registers moved to them (setmaxnreg): FlashAttention-3's layout,
made by the compiler. Under the interpreter, and where WS is False, the loop is an ordinary one.

Status (2026-12-04): experimental, opt-in (LLMCORE_TRITON_WS=1). An earlier form, with descriptors made on the
host, hung the H200 in its first call (Triton 3.6). Compiled here, Triton 3.9 refuses that form: the compiler
splits a resident tile between the consumers but a host descriptor keeps its block, so each copy would bring
twice the bytes the consumer's barrier expects, which fits the hang. This form (descriptors made in the kernel)
passes Triton 3.9's checks and Triton 3.6's compile for sm_90, and the interpreter tests, and every TMA copy in
it fills a buffer of its block's size (aot's ``tma_mismatches``, tested); it has not yet run on a GPU.
benchmarks/gpu/ws_check.py checks and times it there, each step in a process of its own.

What the compiler needs (Triton 3.6, sm_90; checked by tests/test_triton_aot.py): every load inside the
specialized loop, and the row vectors the backward reads (logsumexp and D), come through tensor descriptors;
stores go by pointers (a descriptor store is split between the consumers and then refused); one specialized
loop per kernel, so the causal diagonal is masked inside the loop (a comparison and a select per element of the
visible blocks) rather than in a second loop.

Addressing: Q, K, V and dO are each a 2-D row matrix (rows of ``row stride`` elements) through a descriptor
with tiles BLOCK x HEAD_DIM; head h of batch b starts at row ``b * RB + h * RH`` and column ``h * CH`` of it
(contiguous (B, H, L, D): RB = H L, RH = L, CH = 0; transformers' (B, L, H, D) transposed: RB = L, RH = 0,
CH = D). Outputs are stored by pointers with their (batch, head, row) strides. The logsumexp and D are
(B, H, L) float32, read BLOCK values at a time through rank-1 descriptors (a [1, BLOCK] block, reshaped, is not
split between the consumers: Triton 3.9 refuses it).
"""
import os

import triton
import triton.language as tl

from llmcore.ops.triton import _loader

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_h = _loader.load("_helpers", INTERPRET)
_dot = _h.dot
_cast = _h.cast


@triton.jit
def _matrix(T, rows, row_stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A descriptor over the row matrix at T (``rows`` rows of ``row_stride`` elements), tiles BLOCK x HEAD_DIM.
    Made here, not on the host: the compiler splits a tile between the consumer warp groups, and only a
    descriptor it made itself gets the halved tiles (a host descriptor keeps its block, and the copy then
    brings twice the bytes the consumer's barrier waits for)."""
    return tl.make_tensor_descriptor(T, shape=[rows, row_stride], strides=[row_stride, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _tile(desc, row, col):
    return desc.load([row, col])


@triton.jit
def _vectors(T, n, BLOCK: tl.constexpr):
    """A descriptor over the n float32 values at T (the logsumexp or D), BLOCK at a time."""
    return tl.make_tensor_descriptor(T, shape=[n], strides=[1], block_shape=[BLOCK])


@triton.jit
def _query_program(Q, K, V, q_rows, q_sl, k_rows, k_sl, v_rows, v_sl, GROUP, HEAD_DIM: tl.constexpr,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A forward or dQ program's (head, batch, key head, first query row, its rows, Q, K and V descriptors). Grid
    (L / BLOCK_M, H, B); causal grids run the longest rows first."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    return (h, tl.program_id(2), h // GROUP, m0, m0 + tl.arange(0, BLOCK_M),
            _matrix(Q, q_rows, q_sl, BLOCK_M, HEAD_DIM), _matrix(K, k_rows, k_sl, BLOCK_N, HEAD_DIM),
            _matrix(V, v_rows, v_sl, BLOCK_N, HEAD_DIM))


# ---------------------------------------------------------------------------------------
# forward


@triton.jit
def ws_attn_fwd(Q, K, V, OUT, LSE, scale_log2,
                stride_ob, stride_oh, stride_om,
                q_rows, q_sl, q_rb, q_rh, q_ch, k_rows, k_sl, k_rb, k_rh, k_ch, v_rows, v_sl, v_rb, v_rh, v_ch,
                H, GROUP, L,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FOLD_SCALE: tl.constexpr, WS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (L / BLOCK_M, H, B). Causal grids run the longest rows first."""
    h, b, hk, m0, offs_m, Q_DESC, K_DESC, V_DESC = _query_program(Q, K, V, q_rows, q_sl, k_rows, k_sl, v_rows, v_sl,
                                                                  GROUP, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N)
    q = _tile(Q_DESC, b * q_rb + h * q_rh + m0, h * q_ch)
    k_row0 = b * k_rb + hk * k_rh
    v_row0 = b * v_rb + hk * v_rh
    m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = m0 + BLOCK_M if CAUSAL else L
    for n0 in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        k = _tile(K_DESC, k_row0 + n0, hk * k_ch)
        qk = _dot(q, tl.trans(k), None, "tf32")
        if CAUSAL:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            s = tl.where(offs_n[None, :] <= offs_m[:, None], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        elif FOLD_SCALE:  # (a positive scale keeps the row max: one FMA per element)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        else:
            s = qk * scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _tile(V_DESC, v_row0 + n0, hk * v_ch)
        acc = _dot(_cast(p, v.dtype), v, acc, "tf32")
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(LSE + (b * H + h).to(tl.int64) * L + offs_m, m_i + tl.math.log2(l_i))
    offs_d = tl.arange(0, HEAD_DIM)
    base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(base + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :], _cast(acc, OUT.dtype.element_ty))


# ---------------------------------------------------------------------------------------
# backward (D = dO . O by row comes from attention_kernels.attn_bwd_delta)


@triton.jit
def ws_attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, scale, scale_log2,
                   stride_qb, stride_qh, stride_qm,
                   q_rows, q_sl, q_rb, q_rh, q_ch, k_rows, k_sl, k_rb, k_rh, k_ch, v_rows, v_sl, v_rb, v_rh, v_ch,
                   do_rows, do_sl, do_rb, do_rh, do_ch,
                   H, GROUP, L,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ_i = scale * sum_j dS_ij k_j for BLOCK_M query rows. Grid (L / BLOCK_M, H, B)."""
    h, b, hk, m0, offs_m, Q_DESC, K_DESC, V_DESC = _query_program(Q, K, V, q_rows, q_sl, k_rows, k_sl, v_rows, v_sl,
                                                                  GROUP, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N)
    DO_DESC = _matrix(DO, do_rows, do_sl, BLOCK_M, HEAD_DIM)
    LSE_DESC = _vectors(LSE, H * L * tl.num_programs(2), BLOCK_M)
    DELTA_DESC = _vectors(DELTA, H * L * tl.num_programs(2), BLOCK_M)
    q = _tile(Q_DESC, b * q_rb + h * q_rh + m0, h * q_ch)
    do = _tile(DO_DESC, b * do_rb + h * do_rh + m0, h * do_ch)
    lse = LSE_DESC.load([(b * H + h) * L + m0])
    delta = DELTA_DESC.load([(b * H + h) * L + m0])
    k_row0 = b * k_rb + hk * k_rh
    v_row0 = b * v_rb + hk * v_rh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = m0 + BLOCK_M if CAUSAL else L
    for n0 in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        k = _tile(K_DESC, k_row0 + n0, hk * k_ch)
        v = _tile(V_DESC, v_row0 + n0, hk * v_ch)
        p = tl.math.exp2(_dot(q, tl.trans(k), None, "tf32") * scale_log2 - lse[:, None])
        if CAUSAL:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        dp = _dot(do, tl.trans(v), None, "tf32")
        ds = _cast(p * (dp - delta[:, None]), k.dtype)
        dq = _dot(ds, k, dq, "tf32")
    offs_d = tl.arange(0, HEAD_DIM)
    base = DQ + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    tl.store(base + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :], _cast(dq * scale, DQ.dtype.element_ty))


@triton.jit
def ws_attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, scale, scale_log2,
                     stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     q_rows, q_sl, q_rb, q_rh, q_ch, k_rows, k_sl, k_rb, k_rh, k_ch, v_rows, v_sl, v_rb, v_rh, v_ch,
                     do_rows, do_sl, do_rb, do_rh, do_ch,
                     H, L,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij q_i for BLOCK_N key rows (one key head per query
    head). Grid (L / BLOCK_N, H, B)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    Q_DESC = _matrix(Q, q_rows, q_sl, BLOCK_M, HEAD_DIM)
    K_DESC = _matrix(K, k_rows, k_sl, BLOCK_N, HEAD_DIM)
    V_DESC = _matrix(V, v_rows, v_sl, BLOCK_N, HEAD_DIM)
    DO_DESC = _matrix(DO, do_rows, do_sl, BLOCK_M, HEAD_DIM)
    LSE_DESC = _vectors(LSE, H * L * tl.num_programs(2), BLOCK_M)
    DELTA_DESC = _vectors(DELTA, H * L * tl.num_programs(2), BLOCK_M)
    k = _tile(K_DESC, b * k_rb + h * k_rh + n0, h * k_ch)
    v = _tile(V_DESC, b * v_rb + h * v_rh + n0, h * v_ch)
    q_row0 = b * q_rb + h * q_rh
    do_row0 = b * do_rb + h * do_rh
    lse_row0 = (b * H + h) * L
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = n0 // BLOCK_M * BLOCK_M if CAUSAL else 0
    for m0 in tl.range(lo, L, BLOCK_M, warp_specialize=WS):
        q = _tile(Q_DESC, q_row0 + m0, h * q_ch)
        do = _tile(DO_DESC, do_row0 + m0, h * do_ch)
        lse = LSE_DESC.load([lse_row0 + m0])
        delta = DELTA_DESC.load([lse_row0 + m0])
        p_t = tl.math.exp2(_dot(k, tl.trans(q), None, "tf32") * scale_log2 - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if CAUSAL:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = _dot(_cast(p_t, do.dtype), do, dv, "tf32")
        dp_t = _dot(v, tl.trans(do), None, "tf32")
        ds_t = _cast(p_t * (dp_t - delta[None, :]), q.dtype)
        dk = _dot(ds_t, q, dk, "tf32")
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_n.to(tl.int64)[:, None]
    tl.store(DK + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + rows * stride_kn + offs_d[None, :],
             _cast(dk * scale, DK.dtype.element_ty))
    tl.store(DV + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows * stride_vn + offs_d[None, :],
             _cast(dv, DV.dtype.element_ty))
