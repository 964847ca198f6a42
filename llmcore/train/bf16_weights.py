"""bf16 copies of the linear weights, kept by the optimizer step, for bf16 autocast on the CPU.

Under bf16 autocast a step casts every fp32 weight to bf16 for its GEMMs and every bf16 weight
gradient back to fp32 (MiniLM: 74 copies, ~7.5 ms of a ~100 ms step); fused AdamW then reads the
fp32 gradient and, to apply the clip coefficient, writes it back. ``Bf16Weights`` keeps a bf16
copy (the *shadow*) of each tracked weight instead:

- the multi-tensor AdamW kernel (``_C.adamw_tensors``, torch's fused update operation for
  operation) writes the shadow in the same pass that updates the fp32 weight, rounding as
  ``weight.to(torch.bfloat16)`` does;
- llmcore's linear layers read it through ``llmcore.nn.layers.linear_weight`` while bf16
  autocast is on, so autocast has nothing to cast;
- the backward keeps the bf16 gradient, which the kernel widens exactly as the cast back would.

The values are those of the autocast path: the shadow is bitwise ``weight.to(bf16)``, and the
update bitwise torch's fused AdamW on the widened gradient (tests/test_bf16_weights.py); only
the gradient norm is summed in another order. Optimizer state stays in ``optimizer.state`` (dense
``exp_avg``/``exp_avg_sq`` and a float32 ``step``), so checkpoints are unchanged. While attached,
a tracked weight's gradient lives in the tracker, not in ``weight.grad``; a weight updated by
anything else (its ``_version`` moves, or it has an ordinary ``.grad`` at the step, which
torch's fused AdamW updates without moving ``_version``) has its shadow recast before the next
use.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Optional

import torch
from torch import Tensor, nn

from llmcore import _C, _fork
from llmcore.nn.layers import MLP, Attention, GatedMLP
from llmcore.train.optim import fused_adamw_group

ENV_SWITCH = "LLMCORE_BF16_WEIGHTS"  # "0": autocast casts the weights, as without llmcore
# The layers that read their Linears through ``linear_weight``: only their weights get copies (a
# Linear called directly, as a classification head's, would keep a copy it never reads).
_READERS = (Attention, MLP, GatedMLP)
_BF16 = 1  # the kernels' dtype code for bfloat16


class _Entry:
    """One tracked weight: its group, bf16 shadow and the gradient gathered this step."""

    def __init__(self, weight: Tensor, group: dict):
        self.weight, self.group = weight, group
        self.shadow = weight.detach().to(torch.bfloat16)
        self.version = weight._version
        self.grad: Optional[Tensor] = None

    def current_shadow(self) -> Tensor:
        w = self.weight
        if w._version != self.version:  # written by someone else since the kernel's last pass
            with torch.no_grad():
                self.shadow.copy_(w)
            self.version = w._version
        return self.shadow

    def for_forward(self) -> Optional[Tensor]:
        """The bf16 weight a GEMM under bf16 autocast takes (with the gradient path back to this
        entry), or None when bf16 autocast is off (``llmcore.nn.layers.linear_weight``)."""
        if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _ShadowWeight.apply(self.weight, self)
        return self.current_shadow()

    def add_grad(self, g: Tensor) -> None:
        g = g.contiguous()
        if self.grad is None:
            self.grad = g
        else:  # accumulation: in float32, as autocast's path adds the widened gradients
            if self.grad.dtype != torch.float32:
                self.grad = self.grad.float()
            self.grad.add_(g.float())


class _ShadowWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, entry: _Entry) -> Tensor:
        ctx.entry = entry
        return entry.current_shadow().detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.entry.add_grad(grad)
        return None, None


class Bf16Weights:
    """The bf16 shadows of a model's ``nn.Linear`` weights and their AdamW step (module doc).

    Per step: ``grads()`` (for the norm), ``step(grad_scale)`` before ``optimizer.step()``;
    ``detach()`` at the end. ``flush()`` is a no-op (the weights are always current)."""

    def __init__(self, optimizer: torch.optim.AdamW, entries: list):
        self.optimizer, self.entries = optimizer, entries
        for e in entries:
            e.weight._llmcore_bf16 = e

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1,
               bf16: bool = True) -> list:
        """``[Bf16Weights]`` for the weights of the ``nn.Linear`` children of llmcore's attention
        and MLP layers that ``fused_adamw_group`` accepts, in one process under bf16 autocast; ``[]``
        when none qualifies or ``LLMCORE_BF16_WEIGHTS=0``."""
        if not bf16 or world_size > 1 or os.environ.get(ENV_SWITCH, "1") == "0":
            return []
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        entries = []
        linears = [c for m in model.modules() if isinstance(m, _READERS) for c in m.children()
                   if isinstance(c, nn.Linear)]
        for module in linears:
            w = module.weight
            group = None if hasattr(w, "_llmcore_bf16") else fused_adamw_group(optimizer, w, uses[id(w)])
            if group is not None:
                entries.append(_Entry(w, group))
        return [cls(optimizer, entries)] if entries else []

    def params(self) -> list:
        """The weights whose gradient this tracker holds (after ``grads()``: not the merged ones)."""
        return [e.weight for e in self.entries if e.grad is not None]

    def grads(self) -> list:
        """This step's gradients (bf16, or float32 when accumulated). A weight that also got an
        ordinary ``.grad`` (used outside llmcore's layers) takes the shadow's share into it and is
        left to the optimizer."""
        out = []
        for e in self.entries:
            if e.grad is None:
                continue
            if e.weight.grad is not None:
                e.weight.grad.add_(e.grad.float())
                e.grad = None
                continue
            out.append(e.grad)
        return out

    @torch.no_grad()
    def step(self, grad_scale: Optional[Tensor] = None) -> None:
        """AdamW on every weight with a gradient (divided by ``grad_scale`` first), writing the
        fp32 weight, its moments and its shadow in one pass (one native call per set of betas
        and eps); weights without one are skipped, as torch's AdamW skips them."""
        self.grads()  # merge the gradients of weights that also got an ordinary one
        scale = 0.0 if grad_scale is None else float(grad_scale)
        calls: dict = {}
        for e in self.entries:
            if e.grad is None:
                if e.weight.grad is not None:
                    e.version = -1  # torch's optimizer steps it next, without moving _version: recast
                continue
            w, g = e.weight, e.grad
            if g.shape != w.shape or g.dtype not in (torch.bfloat16, torch.float32):
                raise RuntimeError(f"{type(self).__name__}: a {tuple(w.shape)} weight got a {g.dtype} "
                                   f"{tuple(g.shape)} gradient")
            state = self.optimizer.state[w]
            if not state:  # torch's fused layout
                state["step"] = torch.zeros((), dtype=torch.float32, device=w.device)
                state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            lr, wd = float(e.group["lr"]), float(e.group["weight_decay"])
            beta1, beta2 = (float(b) for b in e.group["betas"])
            # torch's constants, in double as its kernel computes them
            args = calls.setdefault((beta1, beta2, float(e.group["eps"])), [[] for _ in range(10)])
            for lst, x in zip(args, (w.data_ptr(), g.data_ptr(), _BF16 if g.dtype == torch.bfloat16 else 0,
                                     state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                                     e.shadow.data_ptr(), w.numel(), 1 - lr * wd if wd != 0 else 1.0,
                                     -(lr / (1 - beta1 ** step)), math.sqrt(1 - beta2 ** step))):
                lst.append(x)
            e.version = w._version  # the raw write moves no counter: the shadow will match the weight
        for (beta1, beta2, eps), args in calls.items():
            _C.adamw_tensors(*args, lerp=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
                             grad_scale=scale, num_threads=_fork.num_threads())
        for e in self.entries:
            e.grad = None

    def flush(self) -> None:
        pass

    def detach(self) -> None:
        for e in self.entries:
            if getattr(e.weight, "_llmcore_bf16", None) is e:
                del e.weight._llmcore_bf16
            e.grad = None
