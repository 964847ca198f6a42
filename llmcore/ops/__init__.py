"""llmcore's differentiable ops. One file per op; dispatch.py chooses a backend."""
from llmcore.ops.attention import scaled_dot_product_attention, varlen_attention

__all__ = ["scaled_dot_product_attention", "varlen_attention"]
