"""Transformer building blocks that call only llmcore ops (attention, fused norms and
activations, the chunked LM-head loss) plus dense projections."""
from llmcore.nn.layers import (
    MLP,
    Attention,
    Batch,
    Dropout,
    Embedding,
    GatedMLP,
    LayerNorm,
    RMSNorm,
    RotaryEmbedding,
)

__all__ = ["Attention", "Batch", "Dropout", "Embedding", "GatedMLP", "LayerNorm", "MLP", "RMSNorm", "RotaryEmbedding"]
