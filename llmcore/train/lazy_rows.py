"""Exact AdamW for embedding tables whose gradient touches few rows a step.

A word embedding is half of a small encoder's parameters (MiniLM: 11.7 M of 22.7 M), yet a
batch of 32 SST-2 sentences touches a few hundred of its 30522 rows. torch's fused AdamW
still reads and writes every element of the table, its gradient and both moments each step,
and the embedding's backward zeroes the whole gradient first. For a row whose gradient and
moments are all zero, AdamW's update is only the decoupled weight decay
``p = p * float32(1 - lr * wd)``. ``LazyRowAdamW`` therefore

- updates the rows that have ever had a gradient (*active* rows) with torch's element
  update, operation for operation (``_C.adamw_rows``, csrc/norm/optim_kernels.cpp);
- replays the weight decay of every other row, one float32 product per missed step, when the
  row is next read (the embedding calls ``before_read``) or at ``flush``;
- zeroes only the gradient rows it consumed, so the embedding's next backward need not
  zero the whole buffer.

The weights and moments it leaves after ``flush`` are bitwise those torch.optim.AdamW
(fused=True) computes on the dense gradient (tests/test_lazy_rows.py); the moments stay
dense in the optimizer's state, so ``state_dict``, checkpoints and resume are unchanged.
Differences: the step leaves ``weight.grad`` as None (the Trainer drops it next anyway), and a
non-finite gradient scale spoils only the active rows, where torch's dense update would turn
every row to NaN. The table must reach the loss only through its lookups: a module that reads
the whole weight says so (``Embedding.dense_reads``, set for tied LM heads) and is left to torch.
Any other use of the weight (``emb.weight[k]`` added to an output, a penalty) makes autograd sum
its gradient with the lookups' into a new tensor: a step whose ``weight.grad`` is not a buffer the
lookups' backward wrote hands the table back to torch's AdamW (after a flush) for the rest of the
run -- unless several lookups' buffers were summed into it, where one count of its nonzeros tells.
A check of random untouched rows each step stays as a backstop, for a stray gradient added in
place to a buffer (gradient accumulation, where only a later micro-batch has one).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Optional

import torch
from torch import Tensor, nn

from llmcore import _C, _fork
from llmcore.nn.layers import Embedding
from llmcore.train.optim import fused_adamw_group

# Tables smaller than this are touched almost everywhere by a batch (positions, token types).
MIN_ROWS = 4096
# Untouched rows checked for a stray gradient each step (a weight also used outside the lookup).
SAMPLE_ROWS = 32
ENV_SWITCH = "LLMCORE_LAZY_EMBEDDING"  # "0": the dense torch update for every table


def _eligible_group(optimizer: torch.optim.Optimizer, module: nn.Module, uses: int) -> Optional[dict]:
    """The param group of ``module.weight`` when the lazy update reproduces the optimizer's exactly:
    ``fused_adamw_group``'s conditions, a 2-D table of at least MIN_ROWS rows that only its own
    lookups read."""
    w = module.weight
    if (not isinstance(module, Embedding) or w.dim() != 2 or w.shape[0] < MIN_ROWS or module.max_norm is not None
            or module.sparse or module.scale_grad_by_freq or module.dense_reads):
        return None
    return fused_adamw_group(optimizer, w, uses)


class LazyRowAdamW:
    """The AdamW update of one ``llmcore.nn.Embedding`` table, row-sparse and exact (module doc).

    ``attach`` builds one per eligible table; then, every step: ``grads()`` (the touched
    gradient rows, for the norm), ``step(grad_scale)`` before ``optimizer.step()``, and
    ``flush()`` before anything reads the whole table (evaluation, checkpoints); ``detach()``
    at the end."""

    def __init__(self, optimizer: torch.optim.AdamW, module: Embedding, group: dict):
        self.optimizer, self.module, self.group = optimizer, module, group
        self.weight = w = module.weight
        state = optimizer.state.get(w)
        if state and "exp_avg" in state:  # resumed: the rows with a moment are the active ones
            self.active = (state["exp_avg"] != 0).any(1) | (state["exp_avg_sq"] != 0).any(1)
        else:
            self.active = torch.zeros(w.shape[0], dtype=torch.bool)
        self.active_rows = self.active.nonzero().flatten()
        self.synced = torch.zeros(w.shape[0], dtype=torch.int64)  # decay steps an inactive row has had
        self.factors = torch.empty(256, dtype=torch.float32)  # factors[s]: step s's 1 - lr * wd, as float32
        self.t = 0  # steps taken
        self.touched: list[Tensor] = []
        self.rows: Optional[Tensor] = None  # this step's touched rows, once computed
        self.buffers: set[int] = set()  # addresses of the gradient buffers this step's lookup backwards wrote
        self.dense = False  # a gradient outside the touched rows was seen: torch's AdamW steps the table
        self.checked = False  # this step's gradient was checked (``_still_sparse``)
        self.sampler = torch.Generator().manual_seed(0)  # the check's own draws: the global RNG is untouched
        module.row_tracker = self

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1) -> list:
        """Trackers for the model's embedding tables that qualify: CPU float32, at least MIN_ROWS
        rows, in one fused AdamW group (no amsgrad/maximize), not tied to another module, no
        gradient hooks, one process (DDP reduces every row). Empty when ``LLMCORE_LAZY_EMBEDDING=0``."""
        if os.environ.get(ENV_SWITCH, "1") == "0" or world_size > 1:
            return []
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        out = []
        for module in model.modules():
            if isinstance(module, Embedding) and module.row_tracker is None:
                group = _eligible_group(optimizer, module, uses[id(module.weight)])
                if group is not None:
                    out.append(cls(optimizer, module, group))
        return out

    # -- called by the embedding -----------------------------------------------------------------
    def before_read(self, ids: Tensor) -> None:
        """Bring the rows ``ids`` names up to date before the lookup reads them."""
        if self.t == 0 or ids.numel() == 0:
            return
        rows = torch.unique(ids.reshape(-1)).long()  # int32 ids too: the kernels take int64 rows
        if int(rows[0]) < 0 or int(rows[-1]) >= self.weight.shape[0]:
            return  # out of range: the lookup itself raises
        self._sync(rows)

    def after_backward(self, ids: Tensor) -> None:
        self.touched.append(ids.reshape(-1).long())
        # The embedding has just written this backward's gradient into its buffer (``_grad_buffer``). A
        # ``weight.grad`` found elsewhere at the step also holds a gradient from outside the lookups.
        store = getattr(self.module, "_grad_storage", None)
        if store is not None:
            self.buffers.add(store.data_ptr())

    # -- the step --------------------------------------------------------------------------------
    def _sync(self, rows: Tensor) -> None:
        pending = rows[(self.synced[rows] < self.t) & ~self.active[rows]]
        if pending.numel():
            first = self.synced[pending].contiguous()
            _C.decay_rows(self.weight.data_ptr(), pending.data_ptr(), first.data_ptr(), pending.numel(),
                          self.weight.shape[1], self.factors.data_ptr(), self.t, _fork.num_threads())
            self.synced[pending] = self.t

    def _touched_rows(self) -> Tensor:
        if self.rows is None:
            self.rows = (torch.unique(torch.cat(self.touched)) if self.touched
                         else torch.zeros(0, dtype=torch.int64))
        return self.rows

    def _gradient_is_row_sparse(self) -> bool:
        """False when the gradient may have values outside the rows the lookups touched (the weight
        also reached the loss another way). ``weight.grad`` must be one of the buffers the lookups'
        backward wrote this step: autograd sums another use's gradient with them into a new tensor
        (``emb.weight[4999]`` in an output: the random sample alone found it at step 86, the row's
        gradient missing from every update and norm until then). After several backwards (lookups, or
        micro-batches: a later one's is added in place to the earlier one's buffer, a stray gradient with
        it) the nonzeros must all be on touched rows. One backward's own buffer: then SAMPLE_ROWS random
        untouched rows, a backstop."""
        g = self.weight.grad
        if g.layout != torch.strided:  # (a sparse one has no data_ptr)
            return False
        mine = g.data_ptr() in self.buffers
        if mine and len(self.touched) == 1:
            sample = torch.randint(0, g.shape[0], (SAMPLE_ROWS,), generator=self.sampler)
            sample = sample[~torch.isin(sample, self._touched_rows())]
            return not bool(g.index_select(0, sample).any())
        if (not mine and len(self.buffers) < 2) or g.dtype != torch.float32 or not g.is_contiguous():
            return False
        # Several lookups in one backward (a pair of sentences encoded apart), or several micro-batches (a probe
        # found a stray gradient in the second one, added in place to the first's buffer, missed): nonzeros only
        # on touched rows tell; one pass over the bits (a -0.0 counts: dense, still exact) costs a fraction of the
        # sums autograd made.
        bits = g.view(torch.int32)
        touched = bits.index_select(0, self._touched_rows())
        return int(torch.count_nonzero(bits)) == int(torch.count_nonzero(touched))

    def _still_sparse(self) -> bool:
        """Whether the table is still stepped here: the gradient is checked once a step (by
        ``grads()`` or, without it, by ``step()``) and a stray one hands the table over."""
        if not self.checked:
            self.checked = True
            if not self._gradient_is_row_sparse():
                self._go_dense()
        return not self.dense

    def _go_dense(self) -> None:
        """From now on torch's AdamW steps the table (it holds the same state): flush, stop tracking."""
        self.detach()
        self.dense = True
        self.touched.clear()
        self.rows = None
        self.buffers.clear()

    def params(self) -> list:
        return [] if self.dense else [self.weight]

    def grads(self) -> list:
        """What the table adds to the gradient norm: its touched rows (``grad_rows``). A gradient
        found outside them hands the table to torch's AdamW for good (then nothing: its ``.grad``
        is an ordinary one)."""
        if self.dense or self.weight.grad is None or not self._still_sparse():
            return []
        return [self.grad_rows()]

    def grad_rows(self) -> Optional[Tensor]:
        """The gradient's rows this step touched (every other row is zero), or None without a gradient."""
        g = self.weight.grad
        return None if g is None else g.index_select(0, self._touched_rows())

    @torch.no_grad()
    def step(self, grad_scale: Optional[Tensor] = None) -> None:
        """AdamW for the table, dividing its gradient by ``grad_scale`` first (as fused AdamW's
        ``grad_scale``); then ``weight.grad`` is None, so ``optimizer.step()`` leaves the table alone.
        Without a gradient nothing happens, as in torch; nor after ``grads()`` found a dense one."""
        w, g = self.weight, self.weight.grad
        if self.dense or (g is not None and not self._still_sparse()):
            return
        self.checked = False  # the next step checks its own gradient
        if g is None:
            self.touched.clear()
            self.rows = None
            self.buffers.clear()
            return
        if g.shape != w.shape or g.dtype != torch.float32 or not g.is_contiguous() or g.is_sparse:
            raise RuntimeError(f"{type(self).__name__}: the embedding gradient must be a dense contiguous float32 "
                               f"{tuple(w.shape)} tensor, got {g.dtype} {tuple(g.shape)}")
        rows = self._touched_rows()
        self.touched.clear()
        self.rows = None
        self.buffers.clear()
        self._sync(rows)  # a no-op when the forward read them
        new = rows[~self.active[rows]]
        if new.numel():
            self.active[new] = True
            self.active_rows = self.active.nonzero().flatten()
        state = self.optimizer.state[w]
        if not state:  # torch's fused layout: a float32 step count and dense moments
            state["step"] = torch.zeros((), dtype=torch.float32, device=w.device)
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        group = self.group
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decay = 1 - lr * wd if wd != 0 else 1.0
        scale = 0.0 if grad_scale is None else float(grad_scale)
        # torch's constants, in double as its kernel computes them
        _C.adamw_rows(w.data_ptr(), g.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                      self.active_rows.data_ptr(), self.active_rows.numel(), w.shape[1], decay=decay, lerp=1 - beta1,
                      beta2=beta2, one_minus_beta2=1 - beta2, neg_step_size=-(lr / (1 - beta1 ** step)),
                      bc2_sqrt=math.sqrt(1 - beta2 ** step), eps=eps, grad_scale=scale,
                      num_threads=_fork.num_threads())
        if self.t == self.factors.numel():
            self.factors = torch.cat([self.factors, torch.empty_like(self.factors)])
        self.factors[self.t] = decay  # rounded to float32, as the kernel's multiplier
        self.t += 1
        g.index_fill_(0, rows, 0.0)
        self.module.mark_clean(g)
        w.grad = None

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every row's pending weight decay: the table is then what dense AdamW holds."""
        if self.t:
            self._sync(((self.synced < self.t) & ~self.active).nonzero().flatten())

    def detach(self) -> None:
        """``flush`` and stop tracking the table."""
        self.flush()
        if self.module.row_tracker is self:
            self.module.row_tracker = None
