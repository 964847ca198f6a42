"""Triton kernels: fused attention (forward and backward), LayerNorm / RMSNorm, and the
chunked LM-head cross-entropy. They are the ``triton`` backend of :mod:`llmcore.ops`.

They run on CUDA tensors, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` (that is how CI tests them). Nothing here imports Triton until a
kernel is first launched: ``import llmcore`` stays cheap, and the mode each kernel module
is compiled in is chosen per call (see ``_loader``).

- ``attention``: ``sdpa`` and ``varlen`` (FlashAttention-2: causal, masks, GQA, dropout)
- ``norm``: ``layer_norm`` and ``rms_norm`` with the residual add fused
- ``cross_entropy``: ``linear_cross_entropy``
- ``aot``: compiles all of them for a GPU architecture without a GPU, and reports registers,
  spills, shared memory and tensor-core use per kernel (``python -m llmcore.ops.triton.aot``)
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from llmcore.ops.triton._loader import interpreting, offline

__all__ = ["installed", "unavailable", "interpreting"]

# Once, at import (a path lookup, not an import of Triton): backend checks run inside torch.compile traces.
_INSTALLED = importlib.util.find_spec("triton") is not None


def installed() -> bool:
    """Whether a Triton package can be found (without importing it)."""
    return _INSTALLED


def unavailable(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on tensors of ``device``, or None if they can."""
    if not installed():
        return "triton is not installed (pip install triton)"
    if device.type == "cuda" or offline():  # offline: compiled for a GPU by aot.compiling_for, never run
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1"
    return f"device {device.type} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
