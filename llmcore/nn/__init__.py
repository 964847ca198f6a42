"""Transformer building blocks that call only llmcore ops (attention, fused norms and
activations, the chunked LM-head loss) plus dense projections."""
from llmcore.nn.layers import (
    Attention,
    Batch,
    Dropout,
    GatedMLP,
    LayerNorm,
    MLP,
    RMSNorm,
    RotaryEmbedding,
)

__all__ = ["Attention", "Batch", "Dropout", "GatedMLP", "LayerNorm", "MLP", "RMSNorm", "RotaryEmbedding"]
