"""Fine-tuning: TrainConfig, the Trainer loop, checkpoints with exact resume.

``TrainConfig`` does not need torch (the CLI builds its flags from it without importing torch);
the other names load their modules on first use."""
from importlib import import_module

from llmcore.train.config import TrainConfig

_LAZY = {
    "latest_checkpoint": "checkpoint", "list_checkpoints": "checkpoint",
    "Accuracy": "loop", "Trainer": "loop", "accumulate_gradients": "loop", "example_count": "loop",
    "is_causal_lm": "loop", "loss_sum": "loop", "macro_f1": "loop", "sample_count": "loop",
    "linear_schedule": "optim", "make_optimizer": "optim", "make_schedule": "optim", "param_groups": "optim",
    "retain_freed_memory": "runtime",
}

__all__ = ["TrainConfig", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"llmcore.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'llmcore.train' has no attribute {name!r}")
