"""The LM head fused with cross-entropy, a chunk of tokens at a time.

``linear_cross_entropy(hidden, weight, labels, bias)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias), labels)`` but never holds the full
(tokens, vocab) logits: each chunk of rows is projected, reduced to its loss and, when a
gradient is wanted, to its logits' gradient, which is spent at once on
``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden[chunk]``
before the next chunk reuses the same buffers. Extra memory is O(chunk * vocab), plus the
(tokens, hidden) and (vocab, hidden) gradients themselves.

For one row with logits z (V classes), label y, smoothing eps and log-probabilities
logp = log_softmax(z), computed in float32 from logits in the inputs' dtype:

    loss     = -(1 - eps) * logp[y] - eps * mean(logp)
    dloss/dz = exp(logp) - (1 - eps) * onehot(y) - eps / V

With ``reduction`` "mean" or "sum" the gradient's scale (1 / #tokens or 1) is known in the
forward, so the forward finishes the gradients (the Liger-Kernel "fused linear cross
entropy" idea) and backward only multiplies them by the scalar grad_output. With "none"
each row's scale arrives only in backward, so backward recomputes each chunk's logits
(one more matmul per chunk; same memory bound).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from llmcore import _C, _fork
from llmcore.ops._autograd import FUNCTORCH_REFUSAL, functorch_in_use, no_double_backward
from llmcore.ops.dispatch import BackendUnavailableError
from llmcore.ops import triton as triton_ops

__all__ = ["linear_cross_entropy", "default_chunk_size"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NATIVE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # _C's dtype codes
_REDUCTIONS = ("mean", "sum", "none")
# One chunk's fp32 logits stay under this; a bf16/fp16 chunk also has its input-dtype copy (half again), which
# is all the CPU's native path holds.
_CHUNK_BYTES = 64 << 20
# On CUDA, 8x that: an H200 ran Llama-3's LM head (8192 tokens, hidden 4096, vocab 128256, bf16) forward+backward in
# 43.0 ms with 1024-row chunks against 91.7 ms with 64 MiB's 128 rows (torch's unchunked composite: 48.9 ms), and
# with less extra peak memory (+1317 vs +2099 MiB; benchmarks/results/gpu-nvidia-h200*.md).
_CHUNK_BYTES_CUDA = 512 << 20
# bf16/fp16 grad_weight: at least this many chunks are summed in the compute dtype before joining the total
_MIN_FLUSH_EVERY = 8


# Chunks of at least this many rows are cut to a multiple of it: a GPU matmul runs whole tiles of 64-256 rows, so
# 130 rows (Llama-3's vocab) would pay for a second, nearly empty row of tiles in each of the chunk's matmuls.
_CHUNK_ROWS_MULTIPLE = 128


def default_chunk_size(num_tokens: int, vocab_size: int, cuda: bool = False) -> int:
    """Rows per chunk so that one chunk's fp32 logits (rows * vocab * 4 bytes) fit in 64 MiB (512 MiB on CUDA),
    cut to a multiple of 128 rows where there are that many; at least 1."""
    rows = (_CHUNK_BYTES_CUDA if cuda else _CHUNK_BYTES) // (4 * max(vocab_size, 1))
    if rows >= _CHUNK_ROWS_MULTIPLE:
        rows -= rows % _CHUNK_ROWS_MULTIPLE
    return max(1, min(num_tokens, rows))


# ---------------------------------------------------------------------------------------
# one chunk


class _Scratch:
    """Scratch for one chunk's (n, V) logits, reused by every chunk.

    ``low`` holds them in the inputs' dtype (the matmuls' dtype, as autograd would use), ``z`` in
    float32 (float64 for float64 inputs) for the softmax; for float32 inputs they are one buffer.
    ``native`` (CPU, float32/bf16/fp16): ``rows`` runs the softmax as one native kernel on the logits in
    the inputs' dtype, in place, and ``z`` is not needed.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device, native: bool = False):
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.native = native and device.type == "cpu" and dtype in _NATIVE_CODES
        self.z = None if self.native else torch.empty(rows, vocab, dtype=self.acc, device=device)
        self.low = None if dtype == self.acc else torch.empty(rows, vocab, dtype=dtype, device=device)
        self.buf = self.low if self.low is not None else self.z
        if self.native and self.buf is None:
            self.buf = torch.empty(rows, vocab, dtype=dtype, device=device)

    def rows(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, coef: Optional[Tensor],
             eps: float, loss: Tensor) -> Tensor:
        """Native: each row's loss into ``loss`` (float32) and, with ``coef``, the chunk's dlogits (as ``dlogits``
        makes them) returned in the inputs' dtype, in the scratch; ``_C.cross_entropy_rows``."""
        n = h.size(0)
        z = self.buf[:n]
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias, h, weight.t(), out=z)
        c = None if coef is None else coef.to(torch.float32).contiguous()
        _C.cross_entropy_rows(_NATIVE_CODES[z.dtype], n, z.size(1), z.data_ptr(), z.stride(0), y.data_ptr(),
                              0 if c is None else c.data_ptr(), float(eps), loss.data_ptr(), _fork.num_threads())
        return z

    def log_probs(self, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """(n, V) log_softmax(h @ weight.T + bias) in the wide dtype, in the scratch."""
        n = h.size(0)
        z = self.z[:n]
        dst = z if self.low is None else self.low[:n]
        if bias is None:
            torch.mm(h, weight.t(), out=dst)
        else:
            torch.addmm(bias, h, weight.t(), out=dst)
        if self.low is not None:
            z.copy_(dst)
        # In place: the kernel reads a row (max, then sum of exp) before it writes it. The fused row-wise
        # kernel makes one pass where max / sub / exp / sum would make four over the chunk.
        return torch.log_softmax(z, 1, out=z)

    @staticmethod
    def dlogits(logp: Tensor, y: Tensor, coef: Tensor, eps: float) -> Tensor:
        """coef * (exp(logp) - (1 - eps) * onehot(y) - eps / V), in place; rows with coef 0 (ignored) become 0."""
        p = logp.exp_()
        p.scatter_add_(1, y[:, None], p.new_full((y.numel(), 1), -(1.0 - eps)))
        if eps:
            p.sub_(eps / p.size(1))
        p.mul_(coef[:, None])
        p.masked_fill_((coef == 0)[:, None], 0.0)  # (an ignored row's logits may overflow: 0 * inf is NaN)
        return p


class _GradSink:
    """Where each chunk's dlogits (n, V) go: its rows of grad_hidden, and the grad_weight and grad_bias sums.

    The matmuls run in the compute dtype, as autograd would run them. In float32/float64 grad_weight
    accumulates in place. In bf16/fp16 a running sum rounded once per chunk drifts as k chunks add up
    (error ~ sqrt(k) roundings; 1024 chunks measured 6x torch's error), so G chunks at a time are summed
    into a partial in the compute dtype (each matmul accumulates in float32 inside), which is then added
    to a total in the dtype of the weight the caller passed: float32 under autocast, so float32 gradients
    come at no extra memory; bf16/fp16 otherwise, at the cost of one (V, H) partial. The error then goes
    like sqrt(k / G + G) roundings, least at G = sqrt(k); G >= 8 keeps the (mixed-dtype) adds rare.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, needs: tuple[bool, bool, bool], dtypes, acc: torch.dtype,
                 num_chunks: int):
        self.h = torch.empty_like(hidden) if needs[0] else None
        self.need_w, self.weight = needs[1], weight
        self.w = self.w_part = None  # total (caller's dtype) and partial (compute dtype) of grad_weight
        self.pending = 0  # chunks in w_part
        wide = weight.dtype in (torch.float32, torch.float64)
        self.flush_every = num_chunks + 1 if wide else max(_MIN_FLUSH_EVERY, math.isqrt(max(num_chunks - 1, 0)) + 1)
        self.b = torch.zeros(weight.size(0), dtype=acc, device=weight.device) if needs[2] else None
        self.dtypes = dtypes

    def add(self, dz: Tensor, low: Optional[Tensor], h: Tensor, weight: Tensor, s: int) -> None:
        """grad_hidden[s:s+n] = dz @ weight; grad_weight += dz.T @ h; grad_bias += dz.sum(0)."""
        if self.b is not None:
            self.b.add_(dz.sum(0, dtype=self.b.dtype))
        if low is not None:  # the logits' scratch is free again: hold dz in the compute dtype, as autograd would
            dz = low[: dz.size(0)].copy_(dz)
        if self.h is not None:
            torch.mm(dz, weight, out=self.h[s : s + dz.size(0)])
        if not self.need_w:
            return
        if self.pending == 0:
            if self.w_part is None:
                self.w_part = torch.empty_like(weight)
            torch.mm(dz.t(), h, out=self.w_part)
        else:
            self.w_part.addmm_(dz.t(), h)
        self.pending += 1
        if self.pending == self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.w is None:  # the first partial is the total (no copy when the dtypes agree)
            self.w, self.w_part = self.w_part.to(self.dtypes[1]), None
        else:
            self.w.add_(self.w_part)
        self.pending = 0

    def result(self) -> tuple[Optional[Tensor], ...]:
        self._flush()
        self.w_part = None
        if self.need_w and self.w is None:  # no rows at all
            self.w = torch.zeros(self.weight.shape, dtype=self.dtypes[1], device=self.weight.device)
        return tuple(None if g is None else g.to(dt) for g, dt in zip((self.h, self.w, self.b), self.dtypes))


# ---------------------------------------------------------------------------------------
# autograd (the pieces both backends' Functions share: this one and llmcore.ops.triton.cross_entropy)


def _inputs(hidden, weight, bias, labels, ignore_index, compute_dtype):
    """A forward's start: the caller's dtypes (the gradients go back in them), the operands in
    ``compute_dtype``, the valid rows, labels with ignored rows pointed at class 0, the valid count."""
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
    bias = None if bias is None else bias.to(compute_dtype)
    valid = labels != ignore_index
    return dtypes, hidden, weight, bias, valid, torch.where(valid, labels, 0), valid.sum()


def _row_coef(valid: Tensor, n_valid: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """d loss / d row loss. torch's mean over zero tokens is nan with zero gradients: clamp only the
    gradient's divisor."""
    return valid.to(dtype) / n_valid.clamp(min=1).to(dtype) if reduction == "mean" else valid.to(dtype)


def _finish(ctx, rows: Tensor, n_valid: Tensor, out_dtype, reduction: str, eps: float, chunk: int, needs, dtypes,
            eager_grads, inputs: tuple) -> Tensor:
    """A forward's end: reduce the (masked) row losses and keep what backward needs -- the gradients
    finished eagerly, or the inputs to recompute them (reduction "none")."""
    if reduction == "none":
        out = rows
    else:  # N floats: summing them in float64 costs nothing and keeps the mean as exact as its terms
        out = rows.to(torch.float64).sum()
        if reduction == "mean":
            out = out / n_valid
    ctx.reduction, ctx.eps, ctx.chunk, ctx.needs, ctx.dtypes = reduction, eps, chunk, needs, dtypes
    if eager_grads is not None:
        ctx.save_for_backward(*eager_grads)
    elif reduction == "none" and any(needs):
        ctx.save_for_backward(*inputs)
    return out.to(out_dtype)


_NONES = (None,) * 8  # the gradients of the non-tensor arguments


def _saved_backward(ctx, grad_out):
    """A backward's answer when no recomputation is needed (nothing needs a gradient, or the forward
    finished them: scaled by grad_out, out of place as a retained graph may run backward again), else None."""
    if not any(ctx.needs):
        return (None, None, None) + _NONES
    if ctx.reduction != "none":
        grads = ctx.saved_tensors
        g_out = grad_out.item()
        if not math.isfinite(g_out):
            # as torch's loss: what no valid row reached stays zero whatever grad_out is (transformers' Trainer
            # divides a window without loss tokens by num_items_in_batch 0); 0 * inf made every gradient nan
            grads = tuple(None if g is None else torch.where(g == 0, g, g * g_out) for g in grads)
        elif g_out != 1.0:
            grads = tuple(None if g is None else g.mul(g_out) for g in grads)
        return grads + _NONES
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64 -> loss () or (N,).

    Inputs arrive in the caller's dtypes and are cast to ``compute_dtype`` here (autocast), and the
    gradients are returned in the caller's dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, eps, chunk, needs, compute_dtype,
                out_dtype, native):
        dtypes, hidden, weight, bias, valid, y, n_valid = _inputs(hidden, weight, bias, labels, ignore_index,
                                                                  compute_dtype)
        N, V = hidden.size(0), weight.size(0)
        scratch = _Scratch(min(chunk, N), V, compute_dtype, hidden.device, native)
        acc = scratch.acc
        eager = reduction != "none" and any(needs)  # finish the gradients now; see the module docstring
        if eager:
            coef = _row_coef(valid, n_valid, reduction, acc)
            sink = _GradSink(hidden, weight, needs, dtypes, acc, -(-N // chunk))
        rows = torch.empty(N, dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            h, yc = hidden[s : s + chunk], y[s : s + chunk]
            if scratch.native:
                dz = scratch.rows(h, weight, bias, yc, coef[s : s + chunk] if eager else None, eps,
                                  rows[s : s + chunk])
                if eager:
                    sink.add(dz, None, h, weight, s)
                continue
            logp = scratch.log_probs(h, weight, bias)  # (n, V)
            loss = logp.gather(1, yc[:, None])[:, 0].neg_()
            if eps:
                loss = (1.0 - eps) * loss - eps * logp.mean(1)
            rows[s : s + chunk] = loss
            if eager:
                sink.add(scratch.dlogits(logp, yc, coef[s : s + chunk], eps), scratch.low, h, weight, s)
        del scratch
        rows = torch.where(valid, rows, 0.0)
        ctx.native = native
        return _finish(ctx, rows, n_valid, out_dtype, reduction, eps, chunk, needs, dtypes,
                       sink.result() if eager else None, (hidden, weight, bias, y, valid))

    @staticmethod
    @no_double_backward  # the saved gradients are constants to autograd
    def backward(ctx, grad_out):
        with _fork.torch_one_thread():
            return _LinearCrossEntropy._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        saved = _saved_backward(ctx, grad_out)
        if saved is not None:
            return saved + (None,)  # and native's
        hidden, weight, bias, y, valid = ctx.saved_tensors
        N, chunk = hidden.size(0), ctx.chunk
        scratch = _Scratch(min(chunk, N), weight.size(0), hidden.dtype, hidden.device, ctx.native)
        coef = torch.where(valid, grad_out.to(scratch.acc), 0.0)  # ignored rows: zero gradient whatever grad_out is
        sink = _GradSink(hidden, weight, ctx.needs, ctx.dtypes, scratch.acc, -(-N // chunk))
        loss = torch.empty(min(chunk, N), dtype=torch.float32, device=hidden.device) if scratch.native else None
        for s in range(0, N, chunk):
            h, yc, cc = hidden[s : s + chunk], y[s : s + chunk], coef[s : s + chunk]
            if scratch.native:
                sink.add(scratch.rows(h, weight, bias, yc, cc, ctx.eps, loss), None, h, weight, s)
            else:
                sink.add(scratch.dlogits(scratch.log_probs(h, weight, bias), yc, cc, ctx.eps), scratch.low, h, weight,
                         s)
        return sink.result() + _NONES + (None,)


# ---------------------------------------------------------------------------------------
# public API


def _use_triton(device: torch.device, compute_dtype: torch.dtype, backend: Optional[str]) -> bool:
    """Named "triton" (and able, else an error naming why), or no backend named and CUDA tensors."""
    if backend is None:
        return device.type == "cuda" and triton_ops.usable() and compute_dtype != torch.float64
    if backend != "triton":
        return False
    from llmcore.ops.triton.cross_entropy import why_not

    reason = triton_ops.unavailable(device) or why_not(compute_dtype)
    if reason:
        raise BackendUnavailableError(f"backend='triton' cannot run this call: {reason}")
    return True


def _check_float(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


@torch.compiler.disable  # torch.compile cannot trace the Triton launchers: a graph break around them, run eagerly
def _apply_triton(*args):
    from llmcore.ops.triton.cross_entropy import LinearCrossEntropy

    return LinearCrossEntropy.apply(*args)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    label_smoothing: float = 0.0,
    backend: Optional[str] = None,
    loss_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` without the full logits.

    Shapes: hidden (..., H), weight (V, H), bias (V,) or None, labels (...) integer class
    ids in [0, V) or ``ignore_index``. Returns a scalar for ``reduction`` "mean" (over
    non-ignored tokens; nan when there are none, as torch) or "sum", and a tensor of
    labels' shape for "none" (0 at ignored tokens). ``label_smoothing`` in [0, 1] follows
    torch. The loss has hidden's dtype, or float32 under autocast (where hidden, weight and
    bias are first cast to the autocast dtype, as ``F.linear`` would).

    Tokens are processed ``chunk_size`` rows at a time (default: as many as keep one
    chunk's fp32 logits under 64 MiB, 512 MiB on CUDA, see :func:`default_chunk_size`); bf16/fp16 inputs
    also keep the chunk in their own dtype (half as much again; on the CPU's native path, only
    that). Beyond that, memory goes to the gradients themselves and, for bf16/fp16 weights, one
    (V, H) partial sum.
    Logits are computed in the inputs' dtype and widened to float32 (float64 inputs stay
    float64) for the log-softmax; the matmuls of the backward run in the inputs' dtype, as
    autograd's would. With reduction "mean" or "sum" the gradients are computed during the
    forward whenever an input requires grad (and grad mode is on), and are held until
    backward, which only scales them; with "none" backward recomputes the logits.

    Precision: float32 results match torch's to rounding. In bf16/fp16 the weight gradient
    is summed over chunks; chunks are grouped so its error against float64 stays within 2x
    torch's own plus one rounding of the dtype (what the tests assert, up to 1024 chunks): at
    1024 chunks of one row that is 2.8-3.0x torch's error alone (relative; 2.9-4.0x at the largest;
    bf16, V 257, three seeds). It is accumulated in float32 when the weight is float32 under
    autocast. The loss itself is more precise than torch's bf16 composite (float32
    log-softmax) but is returned in the input dtype, as torch does.

    ``loss_dtype``: the returned loss's dtype instead (float32 for bf16 weights without autocast, as
    transformers' causal LM losses return it; the loss is computed in float32 either way).

    ``backend``: None runs each chunk's softmax as one native kernel on the CPU
    (``_C.cross_entropy_rows``: loss and gradient in place, on the logits in the matmul's dtype) and as a
    Triton kernel for CUDA tensors (when Triton is installed); "triton" (CPU tensors under
    TRITON_INTERPRET=1) or "torch" (PyTorch ops, the reference) force one. float64 runs on PyTorch ops
    ("triton" refuses it).

    Gradient accumulation: "mean" divides each micro-batch by its own token count, which
    weights tokens unevenly when micro-batches hold different numbers of real tokens. Sum
    instead, and divide by the number of real tokens in the whole step (the division only
    scales the saved gradients):

    >>> n = sum(int((y != -100).sum()) for y in step_labels)  # doctest: +SKIP
    >>> for h, y in micro_batches:                              # doctest: +SKIP
    ...     (linear_cross_entropy(h, lm_head.weight, y, reduction="sum") / n).backward()

    >>> h, w = torch.randn(2, 5, 16), torch.randn(100, 16)
    >>> y = torch.tensor([[1, 2, 3, -100, 4], [5, 6, 7, 8, 9]])
    >>> loss = linear_cross_entropy(h, w, y, chunk_size=4)
    >>> ref = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())
    >>> torch.allclose(loss, ref)
    True
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., H), got a 0-dim tensor")
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f"weight must be (V, H) with H = hidden.size(-1) = {hidden.size(-1)}, got shape "
                         f"{tuple(weight.shape)}")
    V = weight.size(0)
    if V == 0:
        raise ValueError("weight must have at least one row (class), got shape (0, H)")
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if isinstance(t, Tensor) and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must be (V,) = ({V},), got shape {tuple(bias.shape)}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # (NumPy scalars as torch's cross_entropy takes them: a probe found them refused)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    if not -2**63 <= ignore_index < 2**63:  # (labels are int64: compared with it, a larger int overflowed)
        raise ValueError(f"ignore_index must fit in int64 (labels' dtype), got {ignore_index}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk_size = None if chunk_size is None else int(chunk_size)
    if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    label_smoothing = float(label_smoothing)
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend={backend!r} is unknown; choose one of None, 'triton', 'torch'")
    if loss_dtype is not None and loss_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"loss_dtype must be None or a floating dtype, got {loss_dtype!r}")

    out_dtype = compute_dtype = hidden.dtype
    if hidden.device.type == "meta":  # shapes only (a model traced on the meta device): the labels hold no values
        return hidden.new_empty(hidden.shape[:-1] if reduction == "none" else (), dtype=loss_dtype or hidden.dtype)
    if torch.is_autocast_enabled(hidden.device.type) and torch.float64 not in (hidden.dtype, weight.dtype):
        # As F.linear then F.cross_entropy under autocast: the matmuls in the autocast dtype, the loss in float32.
        compute_dtype, out_dtype = torch.get_autocast_dtype(hidden.device.type), torch.float32
    else:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != hidden.dtype:
                raise TypeError(f"{name} dtype {t.dtype} does not match hidden dtype {hidden.dtype}")

    out_dtype = loss_dtype or out_dtype
    labels = labels.reshape(-1).long()
    # under a torch.func transform (the labels batched by vmap too: a probe) the composite's cross_entropy checks
    # them; a Python branch on their values cannot run there
    transformed = functorch_in_use(hidden, weight, bias, labels)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if not transformed and bool(bad.any()):  # torch raises too; an out-of-range gather would read garbage instead
        raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}, got {labels[bad][0].item()}")
    shape = hidden.shape
    hidden2d = hidden.reshape(labels.numel(), shape[-1]).contiguous()  # (a hidden size of 0 too: -1 is ambiguous)
    chunk = chunk_size or default_chunk_size(hidden2d.size(0), V, hidden2d.is_cuda)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    args = (hidden2d, weight.contiguous(), None if bias is None else bias.contiguous(), labels, ignore_index,
            reduction, float(label_smoothing), chunk, needs, compute_dtype, out_dtype)
    if transformed:  # (an autograd.Function without setup_context: torch refuses it)
        if backend != "torch":
            raise RuntimeError(FUNCTORCH_REFUSAL)
        with torch.autocast(hidden.device.type, enabled=False):  # the composite, which the transforms can trace
            logits = torch.nn.functional.linear(hidden2d.to(compute_dtype), weight.to(compute_dtype),
                                                None if bias is None else bias.to(compute_dtype))
            out = torch.nn.functional.cross_entropy(logits.to(torch.promote_types(compute_dtype, torch.float32)),
                                                    labels, ignore_index=ignore_index, reduction=reduction,
                                                    label_smoothing=float(label_smoothing)).to(out_dtype)
        return out.reshape(shape[:-1]) if reduction == "none" else out
    with torch.autocast(hidden.device.type, enabled=False):
        if _use_triton(hidden.device, compute_dtype, backend):
            out = _apply_triton(*args)
        else:
            with _fork.torch_one_thread():  # (its torch.mm hung in a forked child)
                out = _LinearCrossEntropy.apply(*args, backend != "torch")
    if out.grad_fn is not None and not torch.compiler.is_compiling():
        # no_double_backward's links to the inputs (its saved gradients have no graph): the parameters, and for
        # hidden one element's copy, whose graph reaches hidden without holding its N x H storage until the backward
        link = hidden2d[(0,) * hidden2d.dim()].clone() if hidden2d.numel() and needs[0] else None
        out.grad_fn.links = (link, weight, bias)
    return out.reshape(shape[:-1]) if reduction == "none" else out
