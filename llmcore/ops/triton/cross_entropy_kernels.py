"""Cross-entropy over one chunk of logits, in place, in Triton.

For a row of logits z (V classes, any float dtype, read as float32), label y, smoothing
eps and weight c (1 / #tokens, 1, the upstream gradient, or 0 for ignored rows):

    lse  = log(sum_j exp(z_j))
    loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j)
    z_j <- c * (exp(z_j - lse) - (1 - eps) * [j == y] - eps / V)      (when WRITE_GRAD)

Two sweeps over the row: an online max / sum of exp (and sum of z for the smoothing),
then the gradient, written over the logits so the chunk's buffer goes straight into the
next matmuls. Loaded once per mode by :mod:`llmcore.ops.triton._loader`.

In float32 the row's max m is kept apart from log(sum_j exp(z_j - m)) = lse - m: exp(z_j - lse) with lse rounded
at m's magnitude put that rounding into every probability (float32 gradients 5x torch's error at logits ~70, 400x
at ~1000: a probe), as would lse - z_y and lse - mean z in the loss. The smoothing's sum of z is taken relative to
the row's first logit, for the same reason.
"""
import os

import triton
import triton.language as tl

from llmcore.ops.triton import _loader

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_cast = _loader.load("_helpers", INTERPRET).cast


@triton.jit
def ce_rows(
    Z, Y, COEF, LOSS, stride_z, n_classes, eps,
    WRITE_GRAD: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    Z += row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max and sum
    acc = tl.zeros([BLOCK_V], tl.float32)
    z_sum = tl.zeros([BLOCK_V], tl.float32)  # (the smoothing's: of z - z0)
    z0 = tl.load(Z).to(tl.float32)
    for v0 in range(0, n_classes, BLOCK_V):
        inside = v0 + cols < n_classes
        z = tl.load(Z + v0 + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_use) + tl.exp(z - m_use)
        m = m_new
        if SMOOTH:
            z_sum += tl.where(inside, z - z0, 0.0)
    m_row = tl.max(m, 0)
    log_s = tl.log(tl.sum(acc * tl.exp(m - m_row), 0))  # lse - m_row
    y = tl.load(Y + row)
    loss = (m_row - tl.load(Z + y).to(tl.float32)) + log_s
    if SMOOTH:  # lse - mean z = (m_row - z0) - mean(z - z0) + log_s
        loss = (1.0 - eps) * loss + eps * (((m_row - z0) - tl.sum(z_sum, 0) / n_classes) + log_s)
    tl.store(LOSS + row, loss)
    if WRITE_GRAD:
        c = tl.load(COEF + row)
        for v0 in range(0, n_classes, BLOCK_V):
            idx = v0 + cols
            inside = idx < n_classes
            z = tl.load(Z + idx, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp((z - m_row) - log_s) - eps / n_classes
            g = tl.where(idx == y, g - (1.0 - eps), g)
            # (an ignored row, c == 0, gets exact zeros: its logits may overflow, and 0 * inf is NaN)
            tl.store(Z + idx, _cast(tl.where(c == 0.0, 0.0, c * g), Z.dtype.element_ty), mask=inside)
