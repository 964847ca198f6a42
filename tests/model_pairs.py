"""Shared by the model and training tests: one transformers causal LM with random weights and llmcore's model
loaded from its checkpoint (the same weights)."""
from __future__ import annotations

import torch

from llmcore.models import from_pretrained


def causal_lm_pair(config, folder):
    """(llmcore model, transformers model, checkpoint folder) for a transformers config, seeded 0."""
    import transformers

    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ref.save_pretrained(folder)
    return from_pretrained(folder, task="causal-lm"), ref, folder
