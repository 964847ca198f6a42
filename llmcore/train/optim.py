"""AdamW with decoupled weight decay on matrices only, and transformers' linear warmup/decay schedule."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (weight matrices, embeddings) and not decayed (biases, norm weights).

    A parameter is exempt when it is 1-D (biases, LayerNorm/RMSNorm weights) or its name says bias/norm,
    as transformers' ``get_parameter_names(model, [nn.LayerNorm])`` + "bias" rule does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        exempt = p.ndim < 2 or leaf == "bias" or "norm" in name.lower()
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8, as transformers). ``fused=True`` where the parameters' device
    supports it: on CPU it measured ~8x faster than the foreach path for MiniLM."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """lr x step/warmup during warmup, then linear decay to 0 at ``total_steps``
    (transformers' ``get_linear_schedule_with_warmup``)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
