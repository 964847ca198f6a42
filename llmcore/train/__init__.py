"""Fine-tuning: TrainConfig, the Trainer loop, checkpoints with exact resume."""
from llmcore.train.checkpoint import latest_checkpoint, list_checkpoints
from llmcore.train.config import TrainConfig
from llmcore.train.loop import Accuracy, Trainer, accumulate_gradients, example_count, loss_sum
from llmcore.train.optim import linear_schedule, make_optimizer, param_groups

__all__ = ["Accuracy", "TrainConfig", "Trainer", "accumulate_gradients", "example_count", "latest_checkpoint",
           "linear_schedule", "list_checkpoints", "loss_sum", "make_optimizer", "param_groups"]
