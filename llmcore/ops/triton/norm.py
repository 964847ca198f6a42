"""Launchers and autograd for the Triton LayerNorm / RMSNorm (``norm_kernels``).

Same semantics and return values as :func:`llmcore.ops.layer_norm` and
:func:`llmcore.ops.rms_norm` (which route here for CUDA tensors, or with
``backend="triton"``): ``y``, or ``(y, s)`` with ``s = x + residual``.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops.triton._loader import kernels, multiprocessors

__all__ = ["layer_norm", "rms_norm", "why_not", "backward_launch"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The forward holds rows of up to _FWD_WHOLE columns whole in a program's registers (compiled for sm_90 without
# spills; 65536 spilled 328 B, Triton 3.9); wider rows it sweeps in chunks of _FWD_CHUNK columns, reading s back twice
# (LayerNorm) or once (RMSNorm). Neither width is timed on a GPU.
_FWD_WHOLE, _FWD_CHUNK = 32768, 8192
# How the backward launches (GPU only; the interpreter runs one warp, one stage):
# - split: None picks by row length (fused up to _FUSED_MAX_BLOCK columns, split beyond: the fused kernel's full-width
#   dw/db accumulators spill at 16384 columns, python -m llmcore.ops.triton.aot); True / False force one form
#   (norm_kernels explains both);
# - stages: software-pipelining stages of the fused kernel's row loop. With 2, the next rows' loads are in flight
#   (cp.async, 16 KB more shared memory at 4096 bf16 columns, no spills) while a row is reduced;
# - programs_per_sm: the fused kernel's programs each sweep a contiguous range of rows and write one float32 partial
#   of dw and db;
# - warps: per program of the fused kernel, None for _blocks' rule (by row length);
# - chunk: the split form's rows wider than this many columns are swept in chunks of it (a power of 2).
# The defaults are the launch the H200 measured (LayerNorm fwd+bwd 0.73x torch, fused); benchmarks/gpu/bench.py
# times the others against them (backward_launch), none of them on a GPU yet; the split form has not run on one.
_BWD = {"split": None, "stages": 1, "programs_per_sm": 4, "warps": None, "chunk": 8192}
_FUSED_MAX_BLOCK = 8192
# The split form's dw/db kernel: (rows, columns) per tile, warps, and programs per SM to aim for.
_DW_TILE, _DW_WARPS, _DW_PROGRAMS_PER_SM = (16, 128), 4, 8


def why_not(x: Tensor, params: tuple) -> Optional[str]:
    """Why the kernels cannot take this call (dtypes, row length), or None."""
    if x.dtype not in _DTYPES:
        return f"x dtype {x.dtype} not supported (float32, bfloat16, float16)"
    for p in params:
        if p is not None and p.dtype not in _DTYPES:
            return f"parameter dtype {p.dtype} not supported (float32, bfloat16, float16)"
    return None


def _rows(t: Tensor, cols: int) -> Tensor:
    """t as (rows, cols) with a unit column stride (a view when possible)."""
    if t.stride(-1) != 1 and cols > 1:
        t = t.contiguous()
    try:
        return t.view(-1, cols)
    except RuntimeError:
        return t.contiguous().view(-1, cols)


def _blocks(cols: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps): about 4K elements per program, whole rows."""
    block_n = max(16, 1 << (max(cols, 1) - 1).bit_length())
    rows = 4 if interpret else max(1, min(16, 4096 // block_n))
    elems = block_n * rows
    warps = 1 if interpret else (4 if elems <= 2048 else 8 if elems <= 8192 else 16 if elems <= 32768 else 32)
    return block_n, rows, warps


@contextmanager
def backward_launch(**override) -> Iterator[None]:
    """Backward launches inside use these of ``_BWD``'s settings (split, stages, programs_per_sm, warps, chunk)
    instead. For measuring them (benchmarks/gpu/bench.py) and compiling them (aot); not thread-safe."""
    unknown = set(override) - set(_BWD)
    if unknown:
        raise ValueError(f"unknown backward launch settings {sorted(unknown)}; known: {sorted(_BWD)}")
    if override.get("split", None) not in (None, True, False):
        raise ValueError(f"split must be None, True or False, got {override['split']!r}")
    chunk = override.get("chunk", 16)
    if not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of 2 >= 16, got {chunk!r}")
    saved = dict(_BWD)
    _BWD.update(override)
    try:
        yield
    finally:
        _BWD.update(saved)


def _dummy(x: Tensor) -> Tensor:
    return x.new_empty(1)


def _forward(rms: bool, x: Tensor, weight, bias, residual, eps: float, out_dtype: torch.dtype):
    cols = x.size(-1)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    # (row-major whatever x's layout: the kernel writes s and reads back rows of unit column stride)
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    mean = torch.empty(x.shape[:-1] if not rms else (0,), dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, s, mean, rstd
    mod = kernels("norm_kernels", x.device)
    x2, y2 = _rows(x, cols), y.view(-1, cols)
    r2 = _rows(residual, cols) if residual is not None else None
    s2 = s.view(-1, cols) if residual is not None else None
    n_rows = x2.size(0)
    block_n, rows, warps = _blocks(cols if cols <= _FWD_WHOLE else _FWD_CHUNK, mod.INTERPRET)
    d = _dummy(x)
    mod.norm_fwd[(-(-n_rows // rows),)](
        x2, d if r2 is None else r2, d if weight is None else weight, d if bias is None else bias, y2,
        d if s2 is None else s2, mean if not rms else d, rstd,
        n_rows, cols, x2.stride(0), 0 if r2 is None else r2.stride(0), y2.stride(0), 0 if s2 is None else s2.stride(0),
        float(eps), RMS=rms, HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        ROWS=rows, BLOCK_N=block_n, CHUNKED=cols > block_n, num_warps=warps)
    return y, s, mean, rstd


def _row_ranges(n_rows: int, rows: int, target: int) -> tuple[int, int]:
    """n_rows cut into at most ``target`` contiguous ranges of whole ``rows``-row tiles: (rows per range, ranges)."""
    per_range = -(-n_rows // max(1, min(target, -(-n_rows // rows))))
    per_range = -(-per_range // rows) * rows
    return per_range, -(-n_rows // per_range)


def _backward(rms: bool, grad_y: Tensor, inp: Tensor, mean: Tensor, rstd: Tensor, weight, grad_s,
              need_w: bool, need_b: bool):
    cols = inp.size(-1)
    grad_in = inp.new_empty(inp.shape)  # row-major, as the kernel writes it (empty_like kept a permuted layout)
    if inp.numel() == 0:
        return grad_in, *(torch.zeros(cols, dtype=torch.float32, device=inp.device) for _ in range(2))
    mod = kernels("norm_kernels", inp.device)
    dy2, x2, dx2 = _rows(grad_y, cols), _rows(inp, cols), grad_in.view(-1, cols)
    ds2 = _rows(grad_s, cols) if grad_s is not None else None
    d = _dummy(inp)
    args = (dy2, x2, mean if not rms else d, rstd)
    split = _BWD["split"]
    if split is None:
        split = _blocks(cols, False)[0] > _FUSED_MAX_BLOCK
    if split:
        _backward_dx(mod, args, weight, ds2, dx2, rms, d)
        dw, db = _backward_dw(mod, args, need_w, need_b, rms, d)
    else:
        dw, db = _backward_fused(mod, args, weight, ds2, dx2, need_w, need_b, rms, d)
    return grad_in, dw.sum(0) if need_w else None, db.sum(0) if need_b else None


def _partials(programs: int, cols: int, need: bool, like: Tensor) -> Tensor:
    return torch.empty(programs if need else 0, cols, dtype=torch.float32, device=like.device)


def _backward_fused(mod, args, weight, ds2, dx2, need_w, need_b, rms, d):
    dy2, x2 = args[:2]
    n_rows, cols = x2.shape
    block_n, rows, warps = _blocks(cols, mod.INTERPRET)
    if _BWD["warps"] and not mod.INTERPRET:
        warps = _BWD["warps"]
    target = 4 if mod.INTERPRET else _BWD["programs_per_sm"] * multiprocessors(x2.device)
    per_program, programs = _row_ranges(n_rows, rows, target)
    dw, db = _partials(programs, cols, need_w, x2), _partials(programs, cols, need_b, x2)
    mod.norm_bwd[(programs,)](
        *args, d if weight is None else weight, d if ds2 is None else ds2, dx2,
        dw if need_w else d, db if need_b else d,
        n_rows, cols, per_program, dy2.stride(0), x2.stride(0), 0 if ds2 is None else ds2.stride(0), dx2.stride(0),
        RMS=rms, HAS_W=weight is not None, HAS_DS=ds2 is not None, NEED_DW=need_w, NEED_DB=need_b,
        ROWS=rows, BLOCK_N=block_n, STAGES=1 if mod.INTERPRET else _BWD["stages"], num_warps=warps)
    return dw, db


def _backward_dx(mod, args, weight, ds2, dx2, rms, d):
    """The split form's ds (into dx2): whole rows as the forward holds them, or rows wider than _BWD["chunk"]
    in chunks of it."""
    dy2, x2 = args[:2]
    n_rows, cols = x2.shape
    block_n, rows, warps = _blocks(min(cols, _BWD["chunk"]), mod.INTERPRET)
    mod.norm_bwd_dx[(-(-n_rows // rows),)](
        *args, d if weight is None else weight, d if ds2 is None else ds2, dx2,
        n_rows, cols, dy2.stride(0), x2.stride(0), 0 if ds2 is None else ds2.stride(0), dx2.stride(0),
        RMS=rms, HAS_W=weight is not None, HAS_DS=ds2 is not None, ROWS=rows, BLOCK_N=block_n,
        CHUNKED=cols > block_n, num_warps=warps)


def _backward_dw(mod, args, need_w, need_b, rms, d):
    """The split form's dw and db: float32 partials (row ranges, cols)."""
    dy2, x2 = args[:2]
    n_rows, cols = x2.shape
    if not (need_w or need_b):
        return None, None
    rows, block_c = (4, 32) if mod.INTERPRET else _DW_TILE
    col_blocks = -(-cols // block_c)
    target = 3 if mod.INTERPRET else _DW_PROGRAMS_PER_SM * multiprocessors(x2.device) // col_blocks
    per_range, ranges = _row_ranges(n_rows, rows, target)
    dw, db = _partials(ranges, cols, need_w, x2), _partials(ranges, cols, need_b, x2)
    mod.norm_bwd_dw[(col_blocks, ranges)](
        *args, dw if need_w else d, db if need_b else d, n_rows, cols, per_range, dy2.stride(0), x2.stride(0),
        RMS=rms, NEED_DW=need_w, NEED_DB=need_b, ROWS=rows, BLOCK_C=block_c,
        num_warps=1 if mod.INTERPRET else _DW_WARPS)
    return dw, db


def _backward_impl(grad_y: Optional[Tensor], inp: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                   grad_s: Optional[Tensor], rms: bool, need_w: bool, need_b: bool):
    """(grad of the normalized input, float32 dw, float32 db); dw / db empty when not needed."""
    if grad_y is None:  # only s received a gradient
        grad_y = torch.zeros(inp.shape, dtype=torch.float32, device=inp.device)
    grad_in, dw, db = _backward(rms, grad_y, inp, mean, rstd, weight, grad_s, need_w, need_b)
    return (grad_in, dw if need_w else inp.new_empty(0, dtype=torch.float32),
            db if need_b else inp.new_empty(0, dtype=torch.float32))  # distinct tensors: a custom op's outputs


# The kernels behind custom ops, what torch.compile sees (it cannot trace the launchers), as the CPU backend does;
# eager calls take _NormEager, a plain autograd.Function over the same implementation.
# (x, weight, bias, residual) -> (y, s, mean, rstd); s = x + residual, or an empty tensor without a residual.
def _forward_impl(x, weight, bias, residual, eps, rms, out_dtype):
    return _forward(rms, x, weight, bias, residual, eps, out_dtype)


@torch.library.custom_op("llmcore::triton_norm_fwd", mutates_args=())
def _norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
              rms: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from llmcore.ops.norm import _check_kernel_args  # (as the CPU backend's ops check theirs)

    _check_kernel_args(x, x.size(-1), {"residual": residual}, {"weight": weight, "bias": bias})
    return _forward_impl(x, weight, bias, residual, eps, rms, out_dtype)


@_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, rms, out_dtype):
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=out_dtype), s, stats if not rms else x.new_empty(0, dtype=torch.float32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("llmcore::triton_norm_bwd", mutates_args=())
def _norm_bwd(grad_y: Optional[Tensor], inp: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
              grad_s: Optional[Tensor], rms: bool, need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    from llmcore.ops.norm import _check_kernel_args

    _check_kernel_args(inp, inp.size(-1), {"grad_y": grad_y, "grad_s": grad_s}, {"weight": weight},
                       {"rstd": rstd} if rms else {"mean": mean, "rstd": rstd})
    return _backward_impl(grad_y, inp, mean, rstd, weight, grad_s, rms, need_w, need_b)


@_norm_bwd.register_fake
def _(grad_y, inp, mean, rstd, weight, grad_s, rms, need_w, need_b):
    cols = inp.size(-1)
    return (inp.new_empty(inp.shape), inp.new_empty(cols if need_w else 0, dtype=torch.float32),
            inp.new_empty(cols if need_b else 0, dtype=torch.float32))


def _norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, rms, out_dtype = inputs
    _, s, mean, rstd = output
    ctx.rms, ctx.has_residual = rms, residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _norm_backward_with(bwd, ctx, grad_y, grad_s, grad_mean, grad_rstd):
    inp, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    grad_in, dw, db = bwd(grad_y, inp, mean, rstd, weight, grad_s if ctx.has_residual else None, ctx.rms, need_w,
                          need_b)
    return (grad_in if need_x else None, dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None, grad_in if need_r else None, None, None, None)


_norm_fwd.register_autograd(partial(_norm_backward_with, _norm_bwd), setup_context=_norm_setup)
_NormEager = _eager_function("_NormEager", _forward_impl, _norm_setup, partial(_norm_backward_with, _backward_impl))


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels read weight and bias at W + cols: a strided or expanded (stride 0) vector is copied first (autograd
    takes its gradient back to the view)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """x (..., N), weight/bias (N,) or None, residual like x -> y in x's dtype, or (y, s)."""
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    y, s = _run_op(_norm_fwd, _NormEager, x, weight, bias, residual, float(eps), False, x.dtype)[:2]
    return (y, s) if residual is not None else y


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6,
             residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """x (..., N), weight (N,) or None -> y in promote(x, weight), or (y, s)."""
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    y, s = _run_op(_norm_fwd, _NormEager, x, _unit_stride(weight), None, residual, float(eps), True, out_dtype)[:2]
    return (y, s) if residual is not None else y
