"""Transformer models on llmcore's layers, loaded from and saved to HF checkpoints."""
from llmcore.models.config import DecoderConfig, EncoderConfig, UnsupportedModelError
from llmcore.models.decoder import DecoderForCausalLM
from llmcore.models.encoder import EncoderForSequenceClassification
from llmcore.models.loading import CheckpointError, from_pretrained, save_pretrained
from llmcore.models.output import ModelOutput

__all__ = ["CheckpointError", "DecoderConfig", "DecoderForCausalLM", "EncoderConfig",
           "EncoderForSequenceClassification", "ModelOutput", "UnsupportedModelError", "from_pretrained",
           "save_pretrained"]
