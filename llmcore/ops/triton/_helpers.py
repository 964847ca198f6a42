"""Device functions shared by the kernel modules (loaded in the same mode as the module that uses them).

Three of them work around Triton's interpreter (3.9; the compiled path is untouched):
``tl.dot`` on bfloat16 operands multiplies their raw 16-bit patterns, and float32 ->
bfloat16 casts truncate where the GPU rounds to nearest even. Under the interpreter
``dot`` widens bfloat16 operands first and ``cast`` rounds by hand, so CPU tests see the
GPU's numerics. And the interpreter has no tensor-descriptor reductions: ``tile_add``
loads, adds and stores through the descriptor instead, the same thing while programs run
one at a time, as they do there.
"""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FIX = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in float32 (acc None: a fresh product)."""
    if _FIX:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even."""
    if _FIX:
        if DTYPE == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def tile_add(desc, row, value):
    """Adds ``value`` to the tile of 2-D ``desc`` whose first row is ``row`` (rows and columns past the
    descriptor's shape are dropped): a TMA reduction on the GPU, atomic with respect to other programs."""
    if _FIX:
        desc.store([row, 0], desc.load([row, 0]) + value)
    else:
        desc.atomic_add([row, 0], value)
