"""llmcore: fast data preparation and fine-tuning for Transformer language models.

Public surface:
    llmcore.Tokenizer                      (llmcore.tokenizer; does not import torch)
    llmcore.ops.scaled_dot_product_attention, llmcore.ops.varlen_attention
    llmcore.info()

torch is imported on first use of ``llmcore.ops`` (or the attention functions), so that data
preparation runs without it.
"""
from llmcore._version import __version__

try:
    from llmcore import _C
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "llmcore's native module llmcore._C is missing or failed to load; install the package with "
        "`pip install .` so it is built (" + str(e) + ")"
    ) from e

from llmcore._info import info
from llmcore.tokenizer import BatchEncoding, Tokenizer

_LAZY = {"ops": None, "scaled_dot_product_attention": "ops", "varlen_attention": "ops"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'llmcore' has no attribute {name!r}")
    import importlib

    ops = importlib.import_module("llmcore.ops")
    return ops if _LAZY[name] is None else getattr(ops, name)


__all__ = ["__version__", "info", "ops", "scaled_dot_product_attention", "varlen_attention", "Tokenizer",
           "BatchEncoding"]
