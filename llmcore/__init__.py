"""llmcore: fast data preparation and fine-tuning for Transformer language models.

Public surface:
    llmcore.Tokenizer                      (llmcore.tokenizer; does not import torch)
    llmcore.data.prepare, llmcore.train.Trainer, llmcore.models.from_pretrained, llmcore.hf
    llmcore.ops.scaled_dot_product_attention, llmcore.ops.varlen_attention
    llmcore.info()

Submodules (ops, nn, models, hf, data, train) are imported on first use: tokenizing and
``llmcore.data`` run without importing torch.
"""
from llmcore._version import __version__
from llmcore import _fork  # noqa: F401  (registers its fork handler first)

try:
    from llmcore import _C
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "llmcore's native module llmcore._C is missing or failed to load; install the package with "
        "`pip install .` so it is built (" + str(e) + ")"
    ) from e

from llmcore._info import check_environment, info
from llmcore.tokenizer import BatchEncoding, Tokenizer

check_environment()

_SUBMODULES = ("ops", "nn", "models", "hf", "data", "train")  # imported on first use
_FROM_OPS = ("scaled_dot_product_attention", "varlen_attention")


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        value = importlib.import_module(f"llmcore.{name}")
    elif name in _FROM_OPS:
        value = getattr(importlib.import_module("llmcore.ops"), name)
    else:
        raise AttributeError(f"module 'llmcore' has no attribute {name!r}")
    globals()[name] = value  # later lookups find it directly, not through this function (an import each)
    return value


__all__ = ["BatchEncoding", "Tokenizer", "__version__", "data", "hf", "info", "models", "nn", "ops",
           "scaled_dot_product_attention", "train", "varlen_attention"]
