"""Launchers and autograd for the Triton attention kernels (``attention_kernels``).

``sdpa`` takes :func:`llmcore.scaled_dot_product_attention`'s checked arguments (any
leading batch dims, boolean or additive masks of any broadcastable shape, top-left causal,
GQA, dropout); ``varlen`` those of :func:`llmcore.varlen_attention` (packed sequences,
bottom-right causal). Both return differentiable outputs in the inputs' dtype.

Block sizes: a fixed table per kernel, head dim, dtype and causality on the GPU (sized for
H100/H200; defaults measured there where ``_MEASURED`` says so); ``LLMCORE_TRITON_AUTOTUNE=1``
autotunes among a few configurations instead (per head dim, dtype and power-of-two sequence
length). Under the interpreter the blocks are 16 x 16 (``LLMCORE_TRITON_INTERPRET_BLOCK``),
small enough that tiny test shapes cross several blocks, ragged tails and causal diagonals.

The backward makes dQ with its own kernel (deterministic) or, with ``LLMCORE_TRITON_DQ=atomic``
(or where measured faster, see ``_DQ_MEASURED``), inside the dK/dV kernel with float32 atomics per
element; ``LLMCORE_TRITON_DQ=tma`` does the same with one TMA reduction per tile (GPUs of compute
capability 9.0 and newer); ``LLMCORE_TRITON_DQ=kernel`` forces the deterministic path.

``LLMCORE_TRITON_WS=1`` runs warp-specialized kernels (``attention_ws_kernels``; experimental, not yet run
correctly on a GPU) where they apply: dense 16-bit inputs without mask or dropout, one length that is a
multiple of their blocks, head dim 64 or 128; elsewhere the kernels below.

The tiles a kernel streams (K and V in the forward and dQ kernels, Q and dO in the dK/dV kernel) come
by pointers, or through tensor descriptors (TMA copies on GPUs of compute capability 9.0+) with
``LLMCORE_TRITON_LOADS=desc`` or a list of kernels (see ``_desc_loads``); the same numbers either way.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache, partial
from typing import Optional

import torch
from torch import Tensor

from llmcore.ops._autograd import _eager_function, _run_op
from llmcore.ops.reference import check_cu_seqlens
from llmcore.ops.triton._loader import kernels, offline

__all__ = ["sdpa", "varlen"]

_NONE, _BOOL, _ADDITIVE = 0, 1, 2


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages) per kernel and head-dim bucket. Sized for 228 KB of shared
# memory per SM (H100/H200; A100 has 164 KB): a pipeline stage holds a K and a V tile (forward,
# dQ) or a Q and a dO tile (dK/dV) besides the resident tiles. The first row is the default
# unless _MEASURED names another; the others are candidates for LLMCORE_TRITON_AUTOTUNE=1 and
# for benchmarks/gpu/bench.py's sweep (a candidate that does not fit is skipped there).
_TABLES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
            128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 4, 3),
                  (64, 64, 4, 3)],
            256: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)]},
    "dkdv": {64: [(32, 128, 8, 3), (16, 128, 8, 3), (64, 64, 8, 3)],
             128: [(16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
                   (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2)],
             256: [(32, 32, 8, 2), (16, 32, 4, 2)]},
    # dK/dV with dQ by atomics (LLMCORE_TRITON_DQ=atomic)
    "dkdv_atomic": {64: [(32, 128, 8, 3), (64, 64, 8, 3)],
                    128: [(64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (16, 128, 8, 3),
                          (64, 64, 4, 3)],
                    256: [(32, 32, 8, 2), (16, 32, 4, 2)]},
    # dK/dV with dQ by TMA reductions (LLMCORE_TRITON_DQ=tma): the dQ tile is staged in shared memory
    # (BLOCK_M x BLOCK_D x 4 bytes). Not yet timed on a GPU: the order is the aot compile's (Triton 3.9, sm_90),
    # the D-128 blocks that do not spill first; (64, 128, 8, 3) spills 16-32 B.
    "dkdv_tma": {64: [(32, 128, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)],
                 128: [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 128, 8, 3),
                       (32, 64, 4, 3)],
                 256: [(32, 32, 8, 2), (16, 32, 4, 2)]},
    "dq": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
           128: [(128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3),
                 (128, 128, 8, 2)],
           256: [(32, 32, 4, 2), (64, 32, 8, 1)]},
}
# The kernels with their streamed tiles through tensor descriptors (LLMCORE_TRITON_LOADS): the same candidates.
_TABLES.update({kind + "_desc": rows for kind, rows in list(_TABLES.items())})
# Defaults measured on a GPU by benchmarks/gpu/bench.py's sweep: (kind, head-dim bucket, causal) -> row.
# Measured on an NVIDIA H200 (Triton 3.6, torch 2.11), bf16 (4, 32, 4096, 128), in the run recorded in
# benchmarks/results/gpu-nvidia-h200.{json,md}: the backward kernels' fastest candidates there (in the first run
# the sweep's forward picks were not faster in the longer timing).
# The second H200 run of the sweep (2026-12-04, with tensor-descriptor loads) changed the causal dK/dV blocks, the
# causal dQ kernel's loads and the non-causal forward's blocks and loads (_DESC_MEASURED), where
# benchmarks/gpu/decide.py found the change faster in every round of its alternating head-to-head.
_MEASURED: dict = {
    ("dkdv", 128, True): (64, 128, 8, 3),    # 2.21 ms vs 2.45 ms for (32, 64, 4, 3), the first run's pick
    ("dkdv", 128, False): (64, 128, 8, 3),   # 3.92 ms vs 5.73 ms
    ("dq", 128, True): (128, 64, 8, 3),      # 1.53 ms vs 2.62 ms for the old (128, 32, 8, 2)
    ("dq_desc", 128, True): (128, 64, 8, 3),  # through descriptors: 1.47 ms vs 1.52 ms by pointers
    ("dq", 128, False): (128, 64, 8, 3),     # 2.71 ms vs 4.43 ms
    ("fwd_desc", 128, False): (64, 64, 4, 3),  # 2.21 ms vs 2.41 ms for (128, 64, 8, 3) by pointers
    ("dkdv_atomic", 128, True): (64, 128, 8, 3),
    ("dkdv_atomic", 128, False): (64, 128, 8, 3),
    # GQA (the kernel's one loop over (head, block) pairs): "<kind>_grouped", else the kind's own entry. The causal
    # (64, 128, 8, 3) above was timed without groups only, and compiled for sm_90 with GROUP 4 it spills 40 B
    # (Triton 3.9); the H200 timed (32, 64, 4, 3) there at Llama-3-8B's 4:1 (351 TFLOP/s fwd+bwd, against 289 and
    # 224 for the two other blocks it tried; 2026-12-04), without spills.
    ("dkdv_grouped", 128, True): (32, 64, 4, 3),
}
# How the backward makes dQ by default where measured: (head-dim bucket, causal) -> "atomic" or "tma" (the dK/dV
# kernel adds it; see _dq_mode); elsewhere its own kernel. None so far: on the H200 the whole backward took 3.62 ms
# (causal) / 6.21 ms with the dQ kernel against 3.77 / 6.97 ms with per-element atomics and 3.77 / 6.93 ms with TMA
# reductions (each with its best blocks and loads; 2026-12-04).
_DQ_MEASURED: dict = {}

# The forward's unmasked blocks take the row max of the raw QK^T and fold the scale into one FMA per element (positive
# scales only). Static on sm_90 (D 128): 30 fewer FMUL, same registers; not yet timed. Benchmarks only: bench.py's
# head-to-head sets it False to time the unfolded forward beside it.
_FOLD_SCALE = True

# Benchmarks only (benchmarks/gpu/bench.py): kind -> config dict forced on CUDA launches, or None to skip
# that launch altogether (to time one kernel of the backward on its own).
_OVERRIDE: dict = {}
_LAST: dict = {}  # kind -> the compiled kernel last launched while _OVERRIDE was set


def _bucket(block_d: int) -> int:
    return max(64, block_d) if block_d <= 256 else 256


def _measured(kind: str, bucket: int, causal: bool, grouped: bool) -> Optional[tuple]:
    """``_MEASURED``'s row for a launch: the kind's own, else (a "_desc" kind) its pointer twin's; for a GQA launch
    (``grouped``) a "_grouped" entry of either first."""
    kinds = (kind, kind.removesuffix("_desc"))
    keys = ([(k + "_grouped", bucket, causal) for k in kinds] if grouped else []) + [(k, bucket, causal) for k in kinds]
    return next((_MEASURED[key] for key in keys if key in _MEASURED), None)


@lru_cache(maxsize=None)
def _gpu_configs(kind: str, block_d: int, wide: bool, tune: bool, causal: bool = False,
                 grouped: bool = False) -> tuple[dict, ...]:
    """Candidate blocks for kernel ``kind`` ("fwd", "dkdv", "dkdv_atomic", "dkdv_tma", "dq"); the first is the
    default (``grouped``: for a GQA launch of the dK/dV kernel). Callers must not change the dicts.

    float32 inputs (``wide``) halve the blocks. Cached per argument tuple (it runs on every launch): ``_TABLES``
    and ``_MEASURED`` are read once per key, so code that changes them at run time calls
    ``_gpu_configs.cache_clear()``.
    """
    bucket = _bucket(block_d)
    rows = list(_TABLES[kind][bucket])
    best = None if wide else _measured(kind, bucket, causal, grouped)
    if best is not None:
        rows = [tuple(best)] + [r for r in rows if tuple(r) != tuple(best)]
    if wide:
        rows = [(max(16, m // 2), max(16, n // 2), w, max(1, s - 1)) for m, n, w, s in rows]
    rows = rows if tune else rows[:1]
    return tuple(_cfg(*r) for r in rows)


def _interpreter_config() -> dict:
    b = int(os.environ.get("LLMCORE_TRITON_INTERPRET_BLOCK", "16"))
    return _cfg(b, b, 1, 1)


def _even_m(varlen: bool, len_q: int, block_m: int) -> bool:
    """Whether every query block is full (dense inputs, len_q a multiple of BLOCK_M): no row masks."""
    return (not varlen) and len_q % block_m == 0


_TUNED: dict = {}


def _launch(mod, kind: str, fn, grid, args: tuple, consts: dict, block_d: int, wide: bool, causal: bool = False,
            len_q: Optional[int] = None, descs: tuple = ()) -> bool:
    """Runs kernel ``fn`` with fixed blocks, or through a (cached) autotuner on request; False where the
    benchmark's ``_OVERRIDE`` skips the launch.

    ``len_q`` given: the kernel takes an EVEN_M constexpr, derived from it and BLOCK_M. Where the table's
    blocks need more shared memory than the GPU has, smaller ones are tried (``_smaller``) and remembered.
    ``descs``: (argument name, tensor descriptor among ``args``, "BLOCK_M" or "BLOCK_N") for each descriptor
    whose tiles are that many rows (it is given the configuration's rows before each launch).
    """
    fit_key, configs = None, ()
    if mod.INTERPRET:
        cfg = _interpreter_config()
    elif kind in _OVERRIDE:
        cfg = _OVERRIDE[kind]
        if cfg is None:
            return False
    else:
        tune = os.environ.get("LLMCORE_TRITON_AUTOTUNE", "0") == "1"
        grouped = bool(consts.get("GROUPED", False))
        configs = _gpu_configs(kind, block_d, wide, tune, causal, grouped)
        if tune:
            import triton

            key = (kind, block_d, wide, causal, grouped)
            tuned = _TUNED.get(key)
            if tuned is None:
                inner = fn
                if len_q is not None:
                    inner = triton.heuristics({"EVEN_M": lambda a: _even_m(a["VARLEN"], a["LQ"], a["BLOCK_M"])})(fn)
                hook = None if not descs else lambda nargs: _tile_rows(
                    [(nargs[name], nargs[block]) for name, _, block in descs])
                tuned = _TUNED[key] = triton.autotune(
                    [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                                   num_stages=c["num_stages"], pre_hook=hook) for c in configs],
                    key=["TUNE_LEN", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "VARLEN", "MASK_KIND", "DROPOUT"],
                    reset_to_zero=["DQ_ACC"] if kind in ("dkdv_atomic", "dkdv_tma") else None,
                )(inner)
            tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
            return True
        cfg = configs[0]
        if _FITS:  # smaller blocks replaced the table's somewhere: maybe for this launch
            fit_key = _fit_key(kind, args[0], consts, cfg)
            cfg = _FITS.get(fit_key, cfg)
    from triton.runtime.errors import OutOfResources

    while True:
        launch = consts if len_q is None else dict(consts, EVEN_M=_even_m(consts["VARLEN"], len_q, cfg["BLOCK_M"]))
        _tile_rows([(d, cfg[block]) for _, d, block in descs])
        try:  # Triton checks shared memory when it loads the kernel, before launching it
            compiled = fn[grid(cfg["BLOCK_M"], cfg["BLOCK_N"])](*args, **launch, **cfg)
            break
        except OutOfResources:
            smaller = None if not configs else _smaller(cfg)
            if smaller is None:
                raise
            fit_key = fit_key or _fit_key(kind, args[0], consts, configs[0])
            cfg = _FITS[fit_key] = smaller
    if _OVERRIDE:
        _LAST[kind] = compiled  # for the benchmark's sweep: registers, spills, shared memory
    return True


def _tile_rows(pairs) -> None:
    """Each (descriptor, rows) pair: the descriptor's tiles get ``rows`` rows (the configuration's BLOCK_M or
    BLOCK_N), set before each launch and by the autotuner's pre-hook before each configuration it tries. Rows
    are the third dim of a (B, H, L, D) descriptor, else the first."""
    for desc, rows in pairs:
        dim = 2 if len(desc.block_shape) == 4 else 0
        desc.block_shape = [*desc.block_shape[:dim], rows, *desc.block_shape[dim + 1:]]


def _fit_key(kind: str, first: Tensor, consts: dict, cfg: dict) -> tuple:
    return kind, offline() or first.device, tuple(consts.items()), tuple(cfg.items())


# _fit_key (kind, device or the architecture aot.compiling_for compiles for, constexprs, table config) -> the
# configuration that fit the device's shared memory where the table's did not. The tables are sized for 227 KB a block
# (H100/H200); A100 has 163 KB, and sm_86 / sm_89 / sm_120 GPUs (RTX 30xx-50xx, A10, L4, L40) 99 KB.
_FITS: dict = {}


def _smaller(cfg: dict) -> Optional[dict]:
    """The next configuration to try when ``cfg`` needs more shared memory than the GPU has: two pipeline stages,
    then the larger block halved (4 warps once a tile is 64 x 64 or less), then one stage; None below 16 x 16."""
    m, n, w, s = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
    if s > 2:
        return _cfg(m, n, w, 2)
    if max(m, n) > 16:
        m, n = (m // 2, n) if m >= n else (m, n // 2)
        return _cfg(m, n, min(w, 4) if m * n <= 64 * 64 else w, s)
    return _cfg(m, n, w, 1) if s > 1 else None


_DQ_MODES = ("kernel", "atomic", "tma")


def _capability(device: torch.device) -> int:
    """Compute capability as 90 for 9.0: of the GPU, or of the architecture aot.compiling_for compiles for."""
    arch = offline()
    if arch is not None:
        return arch.capability
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _dq_mode(p: "_Problem", interpret: bool, device: torch.device) -> str:
    """How the backward makes dQ: "kernel" (its own kernel, deterministic), "atomic" (in the dK/dV kernel, float32
    atomics per element) or "tma" (in the dK/dV kernel, a TMA reduction per tile; compute capability 9.0+, and the
    interpreter, which emulates it). LLMCORE_TRITON_DQ chooses; unset: as measured for this head dim on a GPU,
    else "kernel"."""
    mode = os.environ.get("LLMCORE_TRITON_DQ", "")
    if mode and mode not in _DQ_MODES:
        raise ValueError(f"LLMCORE_TRITON_DQ must be one of {', '.join(map(repr, _DQ_MODES))}, got {mode!r}")
    if not mode:
        mode = "kernel" if interpret or p.wide else _DQ_MEASURED.get((_bucket(p.block_d), p.causal), "kernel")
    if mode == "tma" and not interpret:
        cap = _capability(device)
        if cap < 90:
            raise ValueError(f"LLMCORE_TRITON_DQ=tma needs TMA, on GPUs of compute capability 9.0 or newer; this one "
                             f"is {cap // 10}.{cap % 10} (use 'atomic' or 'kernel')")
    return mode


# The kernels (launch kinds without "_desc") that can load their streamed tiles through tensor descriptors
_DESC_KINDS = ("fwd", "dkdv", "dkdv_atomic", "dkdv_tma", "dq")
# Which kernels load their streamed tiles through tensor descriptors (TMA) by default: (kind, head-dim bucket,
# causal) -> True, where measured faster on a GPU (benchmarks/gpu/bench.py sweeps the "_desc" kinds beside the
# pointer ones; H200, 2026-12-04, with the blocks in _MEASURED). Compiled for sm_90 they issue TMA copies instead
# of cp.async and need fewer registers (the D-128 forward: 180 -> 143 under Triton 3.6).
_DESC_MEASURED: dict = {("dq", 128, True): True, ("fwd", 128, False): True}


def _desc_loads(kind: str, p: "_Problem", interpret: bool, device: torch.device) -> bool:
    """Whether kernel ``kind`` loads the tiles it streams (K and V in the forward and dQ kernels, Q and dO in the
    dK/dV kernels) through tensor descriptors (TMA) rather than pointers.

    LLMCORE_TRITON_LOADS chooses: "desc" (every kernel), "pointer" (none), or a comma-separated list of the
    kernels that do (of ``_DESC_KINDS``, e.g. "fwd,dq"). Unset: as measured for this head dim on a GPU
    (``_DESC_MEASURED``), else pointers. Descriptors need TMA (compute capability 9.0+; the interpreter
    emulates it): below that, pointers whatever is asked."""
    mode = os.environ.get("LLMCORE_TRITON_LOADS", "")
    if not mode:
        return (not interpret and not p.wide and _DESC_MEASURED.get((kind, _bucket(p.block_d), p.causal), False)
                and _capability(device) >= 90)
    if mode in ("desc", "pointer"):
        wanted = mode == "desc"
    else:
        kinds = mode.split(",")
        if any(k not in _DESC_KINDS for k in kinds):
            raise ValueError(f"LLMCORE_TRITON_LOADS must be 'desc', 'pointer' or a comma-separated list of "
                             f"{', '.join(_DESC_KINDS)}; got {mode!r}")
        wanted = kind in kinds
    return wanted and (interpret or _capability(device) >= 90)


def _rows_desc(t: Tensor, packed: bool, cols: int, strides_in_elements: bool = False):
    """A tensor descriptor over the rows of ``t`` (dense (B, H, L, D) or packed (total, H, D)) for tiles ``cols``
    wide, or None where TMA cannot address ``t`` (a base or a stride that is not a multiple of 16 bytes, or a
    broadcast dim). Its tiles' rows are set per configuration by _launch. ``strides_in_elements``: the strides
    must also be multiples of 16 elements (what the interpreters of Triton 3.4 and 3.5 check, in error)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    unit = 16 if strides_in_elements else 16 // t.element_size()  # in elements
    if t.data_ptr() % 16:
        return None
    strides = list(t.stride())
    for i, (n, st) in enumerate(zip(t.shape[:-1], strides[:-1])):
        if n == 1:
            strides[i] = 16  # never stepped along: any stride TMA (and any interpreter) accepts
        elif st == 0 or st % unit:
            return None
    return TensorDescriptor(t, list(t.shape), strides, [16, 1, cols] if packed else [1, 1, 16, cols])


# ---------------------------------------------------------------------------------------
# the warp-specialized kernels (attention_ws_kernels): dense inputs with no mask, no dropout and one length

# (BLOCK_M, BLOCK_N, warps, stages) per kernel and head dim. The forward's and dQ kernel's BLOCK_M and the dK/dV
# kernel's BLOCK_N are 128: compiled for sm_90, each of the two consumer warp groups owns 64 of those rows (with
# 64 the compiler gives both consumers the same rows). With num_warps 4 the compiled kernel runs 12 warps: the
# producer's group and the two consumers'. The first row is the default; the others are the candidates
# benchmarks/gpu/ws_check.py times. None of them has run on a GPU yet (see attention_ws_kernels).
_WS_TABLES = {
    "fwd": {64: [(128, 128, 4, 3), (128, 64, 4, 3)], 128: [(128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2)]},
    "dq": {64: [(128, 64, 4, 3), (128, 128, 4, 2)], 128: [(128, 64, 4, 2), (128, 128, 4, 2)]},
    "dkdv": {64: [(64, 128, 4, 3), (32, 128, 4, 3)], 128: [(64, 128, 4, 2), (32, 128, 4, 2), (64, 128, 4, 3)]},
}
# Where the warp-specialized kernels run by default: (head dim, causal) -> True where measured faster on an H200.
# None: they have not yet run correctly on a GPU (LLMCORE_TRITON_WS=1 asks for them).
_WS_MEASURED: dict = {}
_WS_OVERRIDE: dict = {}  # benchmarks only: kind -> (BLOCK_M, BLOCK_N, warps, stages)
# Benchmarks only: the kinds that may run warp-specialized (benchmarks/gpu/ws_check.py narrows it when one hangs)
_WS_KINDS = ("fwd", "dq", "dkdv")


@lru_cache(maxsize=None)
def _ws_compiles() -> bool:
    """Whether this Triton's ``tl.range`` takes ``warp_specialize`` (3.4 and newer)."""
    import inspect

    import triton.language as tl

    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


def _ws_wanted(p: "_Problem", interpret: bool, device: torch.device) -> bool:
    """LLMCORE_TRITON_WS: "1" runs the warp-specialized kernels wherever they apply (the interpreter and GPUs
    other than sm_90 included, where their loops are plain ones), "0" never; unset: where measured faster
    (``_WS_MEASURED``) on sm_90."""
    mode = os.environ.get("LLMCORE_TRITON_WS", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"LLMCORE_TRITON_WS must be '0' or '1', got {mode!r}")
    if mode:
        return mode == "1"
    return (not interpret and _WS_MEASURED.get((p.head_dim, p.causal), False) and _capability(device) == 90)


def _ws_config(kind: str, head_dim: int, interpret: bool) -> tuple:
    if interpret:
        block = int(os.environ.get("LLMCORE_TRITON_INTERPRET_BLOCK", "16"))
        return (block, block, 4, 1)
    return _WS_OVERRIDE.get(kind) or _WS_TABLES[kind][head_dim][0]


def _row_matrix(t: Tensor) -> Optional[tuple]:
    """(t, rows, row stride, RB, RH, CH): dense (B, H, L, D) ``t`` as attention_ws_kernels' 2-D row matrix, or
    None where TMA cannot address it so: a row stride or base that is not 16-byte aligned, or heads and batches
    that do not start on rows (or, heads, at columns within a row)."""
    B, H, L, D = t.shape
    sb, sh, sl, sd = t.stride()
    if sd != 1 or sl < D or (sl * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    rb = 0
    if B > 1:
        if sb % sl:
            return None
        rb = sb // sl
    rh = ch = 0
    if H > 1:
        if sh % sl == 0:
            rh = sh // sl
        elif sh >= D and (H - 1) * sh + D <= sl:
            ch = sh
        else:
            return None
    rows = (B - 1) * rb + (H - 1) * rh + L
    if rows >= 2 ** 31:
        return None
    return t, rows, sl, rb, rh, ch


def _ws_plan(kind: str, p: "_Problem", tensors: tuple, interpret: bool, device: torch.device):
    """The warp-specialized ``kind`` ("fwd", "dq" or "dkdv") for this launch: (config, one _row_matrix per
    tensor, WS), or None where it does not apply (then the general kernels run)."""
    if (kind not in _WS_KINDS or p.packed or p.mask is not None or p.dropout_p > 0.0 or p.wide
            or p.head_dim not in (64, 128)
            or p.head_dim_v != p.head_dim or p.len_q != p.len_k or not _ws_compiles()
            or (kind != "fwd" and p.heads != p.heads_k) or not _ws_wanted(p, interpret, device)):
        return None
    capability = 0 if interpret else _capability(device)
    if not interpret and capability < 90:  # TMA copies: Hopper and newer
        return None
    cfg = _ws_config(kind, p.head_dim, interpret)
    block_m, block_n = cfg[0], cfg[1]
    if p.len_q % block_m or p.len_q % block_n:
        return None
    mats = [_row_matrix(t) for t in tensors]
    if any(m is None for m in mats):
        return None
    return cfg, mats, capability == 90


def _scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ws_launch(mod, fn, grid, cfg: tuple, args: tuple, consts: dict) -> None:
    """The kernels make their tensor descriptors themselves, in global scratch memory that Triton asks an
    allocator for: torch's caching allocator, installed here unless the program installed one."""
    import triton
    from triton.runtime import _allocation

    if not mod.INTERPRET and isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    block_m, block_n, warps, stages = cfg
    fn[grid](*args, **consts, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _forward_ws(p: "_Problem", q: Tensor, plan) -> tuple[Tensor, Tensor]:
    cfg, (mq, mk, mv), ws = plan
    mod = kernels("attention_ws_kernels", q.device)
    out = q.new_empty(q.shape)
    lse = torch.empty(p.lse_shape, dtype=torch.float32, device=q.device)
    args = (mq[0], mk[0], mv[0], out, lse, p.scale * math.log2(math.e), *out.stride()[:3],
            *mq[1:], *mk[1:], *mv[1:], p.heads, p.heads // p.heads_k, p.len_q)
    _ws_launch(mod, mod.ws_attn_fwd, (p.len_q // cfg[0], p.heads, p.batch), cfg, args,
               dict(HEAD_DIM=p.head_dim, CAUSAL=p.causal, FOLD_SCALE=p.scale > 0, WS=ws))
    return out, lse


def _backward_ws(p: "_Problem", do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 dq_plan, dkdv_plan) -> tuple[Tensor, Tensor, Tensor]:
    mod = kernels("attention_ws_kernels", q.device)
    delta = torch.empty_like(lse)
    _delta(kernels("attention_kernels", q.device), p, out, do, delta, q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scales = (p.scale, p.scale * math.log2(math.e))
    consts = dict(HEAD_DIM=p.head_dim, CAUSAL=p.causal)
    cfg, mats, ws = dq_plan
    args = (*(m[0] for m in mats), dq, lse, delta, *scales,
            *dq.stride()[:3], *(x for m in mats for x in m[1:]), p.heads, p.heads // p.heads_k, p.len_q)
    _ws_launch(mod, mod.ws_attn_bwd_dq, (p.len_q // cfg[0], p.heads, p.batch), cfg, args, dict(consts, WS=ws))
    cfg, mats, ws = dkdv_plan
    args = (*(m[0] for m in mats), dk, dv, lse, delta, *scales,
            *dk.stride()[:3], *dv.stride()[:3], *(x for m in mats for x in m[1:]), p.heads, p.len_q)
    _ws_launch(mod, mod.ws_attn_bwd_dkdv, (p.len_k // cfg[1], p.heads, p.batch), cfg, args, dict(consts, WS=ws))
    return dq, dk, dv


def _old_interpreter() -> bool:
    """Whether Triton's interpreter is one that checks descriptor strides in elements (3.4, 3.5; fixed in 3.6)."""
    from llmcore.ops import triton as triton_ops

    release = triton_ops._release(triton_ops.version())
    return release is not None and release < (3, 6)


def _rows3(t: Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides: (B, H, L, D) dense, or (total, H, D) packed (batch stride 0)."""
    s = t.stride()
    return (0, s[1], s[0]) if packed else s[:3]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


class _Problem:
    """Sizes, strides and flags shared by the forward and backward launches."""

    def __init__(self, q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale):
        q_shape = q.shape
        self.packed = cu_q is not None
        self.batch = cu_q.numel() - 1 if self.packed else q_shape[0]
        self.heads, self.heads_k = q_shape[1], k.shape[1]  # dense (B, H, L, D) and packed (total, H, D) alike
        self.len_q, self.len_k = max_q, max_k
        self.head_dim, self.head_dim_v = q_shape[-1], v.shape[-1]
        self.block_d, self.block_dv = _pow2(self.head_dim), _pow2(self.head_dim_v)
        self.scale, self.causal, self.dropout_p = scale, causal, dropout_p
        self.mask = mask
        self.mask_kind = _NONE if mask is None else (_BOOL if mask.dtype == torch.bool else _ADDITIVE)
        self.wide = q.dtype == torch.float32
        self.cu_q, self.cu_k = cu_q, cu_k
        total_q = q_shape[0]
        # logsumexp / delta rows: (B, H, Lq) dense, (H, total_q) packed
        self.lse_shape = (self.heads, total_q) if self.packed else (self.batch, self.heads, self.len_q)
        self.lse_strides = (0, total_q) if self.packed else (self.heads * self.len_q, self.len_q)
        if dropout_p >= 1.0:
            self.drop_thresh, self.drop_scale = 0xFFFFFFFF, 0.0
        else:
            self.drop_thresh = min(int(dropout_p * 4294967296.0), 0xFFFFFFFF)
            self.drop_scale = 1.0 / (1.0 - dropout_p)

    def mask_args(self, dummy: Tensor) -> tuple:
        if self.mask is None:
            return (dummy, 0, 0, 0, 0)
        m = self.mask.view(torch.uint8) if self.mask.dtype == torch.bool else self.mask
        return (m, *self.mask.stride())

    def consts(self) -> dict:
        return dict(HEAD_DIM=self.head_dim, HEAD_DIM_V=self.head_dim_v, BLOCK_D=self.block_d,
                    BLOCK_DV=self.block_dv, CAUSAL=self.causal, BOTTOM_RIGHT=self.packed, VARLEN=self.packed,
                    MASK_KIND=self.mask_kind, DROPOUT=self.dropout_p > 0.0,
                    PRECISION="ieee" if self.wide else "tf32")

    def tune_len(self) -> int:
        return _pow2(max(self.len_q, self.len_k))


def _forward(p: _Problem, q: Tensor, k: Tensor, v: Tensor, rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    mod = kernels("attention_kernels", q.device)
    plan = _ws_plan("fwd", p, (q, k, v), mod.INTERPRET, q.device)
    if plan is not None:
        return _forward_ws(p, q, plan)
    out = q.new_empty(*q.shape[:-1], p.head_dim_v)
    lse = torch.empty(p.lse_shape, dtype=torch.float32, device=q.device)
    cu_q = p.cu_q if p.packed else q
    cu_k = p.cu_k if p.packed else q
    mask, *mask_strides = p.mask_args(q)
    args = (q, k, v, out, lse, mask, cu_q, cu_k, rng if rng is not None else q,
            p.scale * math.log2(math.e), p.drop_thresh, p.drop_scale,
            *_rows3(q, p.packed), *_rows3(k, p.packed), *_rows3(v, p.packed), *_rows3(out, p.packed),
            *mask_strides, *p.lse_strides,
            p.heads // p.heads_k, p.len_q, p.len_k, p.tune_len())
    grid = lambda bm, bn: (triton_cdiv(p.len_q, bm), p.heads, p.batch)  # noqa: E731
    kind, kv, use, descs = _streamed("fwd", p, mod, (k, v), ("K_DESC", "V_DESC"), "BLOCK_N")
    consts = dict(p.consts(), FOLD_SCALE=_FOLD_SCALE and p.scale > 0, KV_DESC=use)
    _launch(mod, kind, mod.attn_fwd, grid, args[:9] + kv + args[9:], consts, p.block_d, p.wide, p.causal,
            descs=descs)
    return out, lse


def _streamed(kind: str, p: _Problem, mod, tensors: tuple, names: tuple, block: str, dense_only: bool = False):
    """How kernel ``kind`` gets the tiles it streams from ``tensors`` (K and V, or Q and dO; the descriptors
    named ``names`` among its arguments, tiles of ``block`` rows): (the launch's kind, its descriptor arguments,
    whether it uses them, _launch's ``descs``). Tensor descriptors where _desc_loads says so (and, with
    ``dense_only``, the inputs are not packed) and TMA can address every tensor; else pointers, with the first
    tensor in the descriptors' places."""
    if not (dense_only and p.packed) and _desc_loads(kind, p, mod.INTERPRET, tensors[0].device):
        old = mod.INTERPRET and _old_interpreter()
        descs = [_rows_desc(t, p.packed, _pow2(t.size(-1)), old) for t in tensors]
        if all(d is not None for d in descs):
            return kind + "_desc", tuple(descs), True, tuple((n, d, block) for n, d in zip(names, descs))
    return kind, (tensors[0],) * len(tensors), False, ()


def _delta(mod, p: _Problem, out: Tensor, do: Tensor, delta: Tensor, cu_q: Tensor) -> None:
    """delta = dO . O by row (float32, in the logsumexp's layout), by its own kernel."""
    block = 16 if mod.INTERPRET else 64
    mod.attn_bwd_delta[(triton_cdiv(p.len_q, block), p.heads, p.batch)](
        out, do, delta, cu_q, *_rows3(out, p.packed), *_rows3(do, p.packed), *p.lse_strides, p.len_q,
        HEAD_DIM_V=p.head_dim_v, BLOCK_DV=p.block_dv, VARLEN=p.packed, BLOCK_M=block)


def _backward(p: _Problem, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              rng: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    mod = kernels("attention_kernels", q.device)
    do = _last_dim_contiguous(do)
    dq_plan = _ws_plan("dq", p, (q, k, v, do), mod.INTERPRET, q.device)
    dkdv_plan = dq_plan and _ws_plan("dkdv", p, (q, k, v, do), mod.INTERPRET, q.device)
    if dkdv_plan is not None:
        return _backward_ws(p, do, q, k, v, out, lse, dq_plan, dkdv_plan)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    cu_q = p.cu_q if p.packed else q
    cu_k = p.cu_k if p.packed else q
    consts = p.consts()
    mask, *mask_strides = p.mask_args(q)
    common = (p.scale, p.scale * math.log2(math.e), p.drop_thresh, p.drop_scale,
              *_rows3(q, p.packed), *_rows3(k, p.packed), *_rows3(v, p.packed), *_rows3(do, p.packed))
    tail = (*mask_strides, *p.lse_strides, p.heads // p.heads_k, p.len_q, p.len_k, p.tune_len())
    rng = rng if rng is not None else q
    mode = _dq_mode(p, mod.INTERPRET, q.device)
    atomic, desc, dq = mode != "kernel", None, None
    # delta (dO . O by row), which the dK/dV kernel reads: made by the dQ kernel, launched first, where there is one
    # (one launch, and one read of dO, fewer); else (or when the benchmark's sweep skips the dQ kernel) by its own.
    # Not for float32 inputs: compiled for sm_90, their D-256 dQ kernel spilled 2 KB with it (Triton 3.9).
    delta_in_dq = not atomic and not p.wide
    if not delta_in_dq:
        _delta(mod, p, out, do, delta, cu_q)
    if not atomic:
        dq = torch.empty_like(q)
        kind, kv, use, descs = _streamed("dq", p, mod, (k, v), ("K_DESC", "V_DESC"), "BLOCK_N")
        args = (q, k, v, do, dq, lse, delta, mask, cu_q, cu_k, rng, *kv, out, *common, *_rows3(dq, p.packed),
                *_rows3(out, p.packed), *tail)
        grid = lambda bm, bn: (triton_cdiv(p.len_q, bm), p.heads, p.batch)  # noqa: E731
        launched = _launch(mod, kind, mod.attn_bwd_dq, grid, args, dict(consts, KV_DESC=use, DELTA_HERE=delta_in_dq),
                           p.block_d, p.wide, p.causal, descs=descs)
        if delta_in_dq and not launched:
            _delta(mod, p, out, do, delta, cu_q)
    dq_acc = q
    if atomic:  # float32 dQ by logsumexp row, padded to BLOCK_D: (B, H, Lq) or (H, total_q) rows
        dq_acc = torch.zeros(lse.numel(), p.block_d, dtype=torch.float32, device=q.device)
        if mode == "tma":
            from triton.tools.tensor_descriptor import TensorDescriptor

            desc = TensorDescriptor.from_tensor(dq_acc, [16, p.block_d])  # rows set per configuration by _launch
    # Q and dO through descriptors for dense inputs only: packed ones would mask every query block of rows past
    # the sequence (no block is known to be whole), which undoes what TMA saves.
    kind, qd, use, descs = _streamed("dkdv" if not atomic else "dkdv_" + mode, p, mod, (q, do), ("Q_DESC", "DO_DESC"),
                                     "BLOCK_M", dense_only=True)
    args = (q, k, v, do, dk, dv, lse, delta, mask, cu_q, cu_k, rng, dq_acc, q if desc is None else desc, *qd,
            *common, *_rows3(dk, p.packed), *_rows3(dv, p.packed), *tail)
    grid = lambda bm, bn: (triton_cdiv(p.len_k, bn), p.heads_k, p.batch)  # noqa: E731
    grouped = p.heads != p.heads_k
    _launch(mod, kind, mod.attn_bwd_dkdv, grid, args,
            dict(consts, DQ_ATOMIC=atomic, DQ_TMA=desc is not None, GROUPED=grouped, HEAD_SUMS=p.wide and grouped,
                 QD_DESC=use),
            p.block_d, p.wide, p.causal, len_q=p.len_q,
            descs=descs + (() if desc is None else (("DQ_DESC", desc, "BLOCK_M"),)))
    if atomic:  # dQ in q's layout (what the custom op's fake promises), from the padded float32 rows
        dq = dq_acc.view(*p.lse_shape, p.block_d)[..., :p.head_dim]
        dq = torch.empty_like(q).copy_(dq.transpose(0, 1) if p.packed else dq)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _problem(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale):
    """(the _Problem, q, k, v with a contiguous last dim) of one launch, forward or backward."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _Problem(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale), q, k, v


def _forward_impl(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, rng):
    p, q, k, v = _problem(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale)
    return _forward(p, q, k, v, rng)


def _backward_impl(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, rng, max_q, max_k, dropout_p, causal, scale):
    p, q, k, v = _problem(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale)
    return _backward(p, grad_out, q, k, v, out, lse, rng)


# The kernels behind custom ops, what torch.compile sees (it cannot trace the launchers), as the CPU and cuda
# backends do; eager calls take _AttentionEager, a plain autograd.Function over the same implementation.
# q, k, v: dense (B, H, L, D) or packed (total, H, D) with cu_seqlens -> (out like q with Dv, float32 lse).
def _check_op_args(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, rng, outputs=None) -> None:
    """What the kernels index by the arguments' shapes, checked where the custom ops are called directly
    (torch.ops.llmcore.*, torch.compile), as the CPU backend's ops check theirs: mismatched tensors raise instead of
    reading out of bounds. Shapes and dtypes only on a GPU (the values of cu_seqlens are trusted there, as the
    public varlen trusts them); on CPU tensors (the interpreter) cu_seqlens' values too."""
    from llmcore.ops.attention import _check_op_args as check_shapes

    packed = cu_q is not None
    if packed != (cu_k is not None):
        raise ValueError("cu_q and cu_k go together: both for packed inputs, neither for dense ones")
    if outputs is not None:
        rows = q.shape[:-1] + (v.shape[-1],)
        lse = (q.shape[1], q.shape[0]) if packed else q.shape[:-1]
        outputs = {"out": (outputs[0], rows), "grad_out": (outputs[1], rows), "lse": (outputs[2], lse)}
    check_shapes(q, k, v, packed, None, dropout_p, rng, (cu_q, cu_k) if packed else (), outputs)
    if packed:
        if mask is not None:
            raise ValueError("packed (cu_seqlens) inputs take no mask")
        if cu_q.device.type == "cpu":
            check_cu_seqlens(cu_q, cu_k, q.size(0), k.size(0), max_q, max_k)
        return
    if (max_q, max_k) != (q.size(2), k.size(2)):
        raise ValueError(f"dense inputs: max_q, max_k must be q's and k's lengths {(q.size(2), k.size(2))}, got "
                         f"{(max_q, max_k)}")
    want = (q.size(0), q.size(1), q.size(2), k.size(2))
    if mask is not None and (mask.dim() != 4 or any(m not in (1, w) for m, w in zip(mask.shape, want))):
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the scores {want}")


@torch.library.custom_op("llmcore::triton_attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cu_q: Optional[Tensor],
                   cu_k: Optional[Tensor], max_q: int, max_k: int, dropout_p: float, causal: bool, scale: float,
                   rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check_op_args(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, rng)
    from llmcore.ops.attention import _broadcast_mask

    mask = _broadcast_mask(mask, q, k)
    return _forward_impl(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, rng)


@_attention_fwd.register_fake
def _(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, rng):
    lse = (q.size(1), q.size(0)) if cu_q is not None else (q.size(0), q.size(1), max_q)
    return q.new_empty(*q.shape[:-1], v.size(-1)), q.new_empty(lse, dtype=torch.float32)


@torch.library.custom_op("llmcore::triton_attention_bwd", mutates_args=())
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                   cu_q: Optional[Tensor], cu_k: Optional[Tensor], rng: Optional[Tensor], max_q: int, max_k: int,
                   dropout_p: float, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_op_args(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, rng, (out, grad_out, lse))
    from llmcore.ops.attention import _broadcast_mask

    mask = _broadcast_mask(mask, q, k)
    return _backward_impl(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, rng, max_q, max_k, dropout_p, causal, scale)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, rng, max_q, max_k, dropout_p, causal, scale):
    return tuple(torch.empty_like(_last_dim_contiguous(t)) for t in (q, k, v))  # the layouts _backward allocates


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, rng = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, cu_q, cu_k, rng)
    ctx.args = (max_q, max_k, dropout_p, causal, scale)


def _attention_backward_with(bwd, ctx, grad_out, grad_lse):
    if grad_out is None:  # lse carries no gradient, and none is materialized for it
        return (None,) * 12
    q, k, v, out, lse, mask, cu_q, cu_k, rng = ctx.saved_tensors
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, rng, *ctx.args)
    return (dq, dk, dv) + (None,) * 9


_attention_fwd.register_autograd(partial(_attention_backward_with, _attention_bwd), setup_context=_attention_setup)
_AttentionEager = _eager_function("_AttentionEager", _forward_impl, _attention_setup,
                                  partial(_attention_backward_with, _backward_impl), differentiable=1)


def _attention(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, rng) -> Tensor:
    """One launch's output: through the custom op under torch.compile, else the eager Function (or, without
    gradients, the bare implementation)."""
    return _run_op(_attention_fwd, _AttentionEager, q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, causal,
                   scale, rng)[0]


# CUDA caps a launch grid's y and z at 65535 blocks. The kernels put heads on y and sequences on z: calls with
# more sequences run in several launches (sdpa, varlen); more heads than that is refused.
_MAX_GRID_Z = 65535
_MAX_GRID_Y = 65535


def _check_grid_y(heads: int) -> None:
    if heads > _MAX_GRID_Y:
        raise ValueError(f"the Triton attention kernels take at most {_MAX_GRID_Y} heads (a CUDA grid's y), "
                         f"got {heads}")


def _draw_rng(dropout_p: float, device) -> Optional[Tensor]:
    """(seed, offset) for the kernels' Philox dropout, as the CPU backend draws them."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


class _Zeros(torch.autograd.Function):
    """An empty problem (no rows, no keys or no heads): zeros out, zero gradients in."""

    @staticmethod
    def forward(ctx, q, k, v, shape):
        ctx.save_for_backward(q, k, v)
        return q.new_zeros(shape)

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors) + (None,)


def _empty_result(q: Tensor, k: Tensor, v: Tensor, out_shape) -> Tensor:
    return _Zeros.apply(q, k, v, tuple(out_shape))


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
         scale: float, batch: torch.Size) -> Tensor:
    """query (*batch?, Hq, Lq, E), key/value (*batch?, Hkv, Lk, E / Ev) -> (*batch, Hq, Lq, Ev).

    Leading dims broadcast to ``batch``; ``attn_mask`` broadcasts to (*batch, Hq, Lq, Lk)
    (its broadcast dims are read with stride 0, never copied).
    """
    hq, hkv = query.size(-3), key.size(-3)
    lq, lk, e, ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)

    from llmcore.ops.attention import as_4d

    n = math.prod(batch)
    q4, k4, v4 = as_4d(query, batch, hq, lq, e), as_4d(key, batch, hkv, lk, e), as_4d(value, batch, hkv, lk, ev)
    if q4.numel() == 0 or k4.numel() == 0 or v4.numel() == 0:
        return _empty_result(q4, k4, v4, q4.shape[:-1] + (ev,)).reshape(*batch, hq, lq, ev)
    _check_grid_y(hq)
    mask4 = None
    if attn_mask is not None:
        mask4 = attn_mask.expand(*batch, hq, lq, lk).reshape(n, hq, lq, lk)
    # One launch per at most 65535 sequences (the grid's z). The inputs go in whole where one launch takes them all:
    # a slice's backward would allocate zeros of the input's size and copy the gradient in, for each of q, k and v.
    parts = [(q4, k4, v4, mask4)]
    if n > _MAX_GRID_Z:
        parts = zip(*(t.split(_MAX_GRID_Z) if t is not None else [None] * -(-n // _MAX_GRID_Z)
                      for t in (q4, k4, v4, mask4)))
    outs = [_attention(q_, k_, v_, m_, None, None, lq, lk, float(dropout_p), bool(is_causal), float(scale),
                       _draw_rng(dropout_p, query.device)) for q_, k_, v_, m_ in parts]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    # one batch dim: out is that shape already (a reshape would still add a view, and its node to the backward)
    return out if len(batch) == 1 else out.reshape(*batch, hq, lq, ev)


def varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
           max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float) -> Tensor:
    """q (total_q, Hq, E), k/v (total_k, Hkv, E / Ev), int32 cu_seqlens (n + 1,) -> (total_q, Hq, Ev).

    On a GPU ``cu_seqlens`` are trusted (as FlashAttention does): each sequence must be at
    most ``max_seqlen`` long, or its tail rows are not computed.
    """
    if q.device.type == "cpu" and not torch.compiler.is_compiling():  # reads them: no data-dependent graph
        check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), max_seqlen_q, max_seqlen_k)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return _empty_result(q, k, v, (q.size(0), q.size(1), v.size(-1)))
    _check_grid_y(q.size(1))
    n = cu_seqlens_q.numel() - 1
    if n <= _MAX_GRID_Z:
        return _attention(q, k, v, None, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q,
                          max_seqlen_k, float(dropout_p), bool(is_causal), float(scale), _draw_rng(dropout_p, q.device))
    # More sequences than one launch takes (the grid's z): runs of at most 65535, each with its rows and
    # rebased offsets. Reading the run boundaries costs one device sync, in this path only.
    starts = list(range(0, n, _MAX_GRID_Z)) + [n]
    rows_q, rows_k = cu_seqlens_q[starts].tolist(), cu_seqlens_k[starts].tolist()
    outs = []
    for i, (b0, b1) in enumerate(zip(starts, starts[1:])):
        q0, q1, k0, k1 = rows_q[i], rows_q[i + 1], rows_k[i], rows_k[i + 1]
        if q1 == q0 or k1 == k0:  # a run of empty sequences, or without keys
            outs.append(_empty_result(q[q0:q1], k[k0:k1], v[k0:k1], (q1 - q0, q.size(1), v.size(-1))))
            continue
        outs.append(_attention(q[q0:q1], k[k0:k1], v[k0:k1], None, (cu_seqlens_q[b0:b1 + 1] - q0).contiguous(),
                               (cu_seqlens_k[b0:b1 + 1] - k0).contiguous(), max_seqlen_q, max_seqlen_k,
                               float(dropout_p), bool(is_causal), float(scale), _draw_rng(dropout_p, q.device)))
    return torch.cat(outs)
