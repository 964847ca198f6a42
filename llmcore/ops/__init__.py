"""llmcore's differentiable ops. One file per op; dispatch.py chooses a backend."""
from llmcore.ops.attention import scaled_dot_product_attention, varlen_attention
from llmcore.ops.activation import bias_gelu, swiglu
from llmcore.ops.cross_entropy import linear_cross_entropy
from llmcore.ops.dispatch import BackendUnavailableError
from llmcore.ops.dropout import dropout
from llmcore.ops.norm import layer_norm, rms_norm
from llmcore.ops.rotary import rotary_embedding

__all__ = ["scaled_dot_product_attention", "varlen_attention", "layer_norm", "rms_norm", "bias_gelu", "swiglu",
           "linear_cross_entropy", "dropout", "rotary_embedding", "BackendUnavailableError"]
