from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from llmcore.nn.layers import Batch


@dataclass
class ModelOutput:
    """``logits`` and, when labels were given, ``loss``. A causal LM trained with labels
    computes its loss without materializing the logits; they are computed on first access."""
    loss: Optional[Tensor] = None
    _logits: Optional[Tensor] = None
    _make_logits: Optional[Callable[[], Tensor]] = None

    @property
    def logits(self) -> Tensor:
        if self._logits is None and self._make_logits is not None:
            self._logits = self._make_logits()
        return self._logits


def make_batch(input_ids: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Batch:
    """Validate the two input layouts and describe the batch."""
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if cu_seqlens is not None:
        if input_ids.dim() != 1:
            raise ValueError(f"packed input_ids must be 1-D (total_tokens,), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            raise ValueError("give attention_mask (padded batch) or cu_seqlens (packed batch), not both")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of n + 1 >= 2 offsets")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != input_ids.numel():
            raise ValueError(f"cu_seqlens must run from 0 to {input_ids.numel()} (the token count), "
                             f"got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        shortest, longest = torch.stack((lengths.min(), lengths.max())).tolist()  # (one device sync)
        return Batch(cu_seqlens=cu_seqlens, max_seqlen=longest, min_seqlen=shortest)
    if input_ids.dim() != 2:
        raise ValueError(f"padded input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}; "
                         "packed batches also pass cu_seqlens")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask.is_floating_point() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            # an additive mask (0 attend, -inf masked) would read inverted as a bool (checked for float masks only:
            # tokenizers give integer ones, which then cost no pass and no device sync)
            raise ValueError("attention_mask must hold 1 (attend) and 0 (padding), as transformers' models take it; "
                             "it holds other values (an additive 0 / -inf mask?)")
        attention_mask = attention_mask.bool()
    return Batch(key_mask=attention_mask)


def packed_rows(input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor],
                cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """transformers 5's reading of a (B, L) batch without an attention_mask whose position_ids restart within a row
    (DataCollatorWithFlattening's rows): sequences packed into each row, each attending to itself only
    (``masking_utils.find_packed_sequence_indices``; llmcore had let them attend across the restart, a probe).
    The cu_seqlens of those sequences over the flattened rows (int32), or None: one sequence a row."""
    if (attention_mask is not None or cu_seqlens is not None or position_ids is None or input_ids.dim() != 2
            or input_ids.numel() == 0):
        return None
    pos = position_ids.expand(input_ids.shape)
    start = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    start[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(start[:, 1:].any()):  # (one device sync)
        return None
    first = start.flatten().nonzero().flatten()
    return torch.cat([first, first.new_tensor([input_ids.numel()])]).to(torch.int32)
