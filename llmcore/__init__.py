"""llmcore: fast data preparation and fine-tuning for Transformer language models.

Public surface:
    llmcore.ops.scaled_dot_product_attention, llmcore.ops.varlen_attention
    llmcore.info()
"""
from llmcore._version import __version__

try:
    from llmcore import _C
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "llmcore's native module llmcore._C is missing or failed to load; install the package with "
        "`pip install .` so it is built (" + str(e) + ")"
    ) from e

from llmcore import ops
from llmcore._info import info
from llmcore.ops import scaled_dot_product_attention, varlen_attention

__all__ = ["__version__", "info", "ops", "scaled_dot_product_attention", "varlen_attention"]
