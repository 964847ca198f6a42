"""Decoder-only causal LMs: GPT-2, Llama, Mistral, Qwen2, Qwen3 (GQA; Qwen3 norms each head of q and k)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from llmcore import ops
from llmcore.models.checkpointing import LayerCheckpointing
from llmcore.models.config import DecoderConfig, gelu_approximate
from llmcore.models.output import ModelOutput, make_batch, packed_rows
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
    init_linear_,
    plain_linear,
    positions_of,
)


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream is carried beside the sublayer output so that each
    norm fuses the residual add: (normed, stream) = norm(delta, residual=stream)."""

    def __init__(self, cfg: DecoderConfig, index: int = 0):
        """``index``: the layer's place in the stack (GPT-2's ``scale_attn_by_inverse_layer_idx`` reads it)."""
        super().__init__()
        gpt2 = cfg.family == "gpt2"
        Norm = LayerNorm if gpt2 else RMSNorm
        scale = None
        if gpt2 and (not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx):
            scale = (cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0)
            scale /= float(index + 1) if cfg.scale_attn_by_inverse_layer_idx else 1.0
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              qkv_bias=cfg.attention_bias,
                              out_bias=gpt2 or (cfg.attention_bias and cfg.family != "qwen2"), causal=True,
                              dropout=cfg.attention_dropout,
                              qk_norm_eps=cfg.norm_eps if cfg.family == "qwen3" else None, scale=scale)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = (MLP(cfg.hidden_size, cfg.intermediate_size, approximate=gelu_approximate(cfg.hidden_act, "gpt2"))
                    if gpt2
                    else GatedMLP(cfg.hidden_size, cfg.intermediate_size))
        self.dropout = Dropout(cfg.dropout)

    def forward(self, delta: Optional[Tensor], stream: Tensor, batch: Batch, rotary):
        if delta is None:
            h = self.attn_norm(stream)
        else:
            h, stream = self.attn_norm(delta, residual=stream)
        h, stream = self.mlp_norm(self.dropout(self.attn(h, batch, rotary)), residual=stream)
        return self.dropout(self.mlp(h)), stream


def next_token_targets(labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Each position's next-token target: ``labels`` shifted left inside each sequence (rows of a (B, L)
    batch, or the ``cu_seqlens`` sequences of a packed (T,) one), -100 at each sequence's last position."""
    target = torch.full_like(labels, -100)
    if cu_seqlens is not None:
        target[:-1] = labels[1:]
        target[cu_seqlens[1:].long() - 1] = -100
    else:
        target[..., :-1] = labels[..., 1:]
    return target


class DecoderForCausalLM(LayerCheckpointing, nn.Module):
    """``model(input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, labels=None,
    num_items_in_batch=None, label_smoothing=0.0)``.

    With labels (same shape as input_ids; -100 is ignored), the loss is next-token cross-entropy
    (shifted inside each sequence, as transformers does) computed by the chunked fused LM-head
    loss, without materializing the logits: the mean over the predicted tokens or, given
    ``num_items_in_batch`` (transformers' loss keyword, which its Trainer and llmcore's pass for
    gradient accumulation), their sum divided by it. ``label_smoothing`` mixes in the mean over the
    vocabulary of -log p, as torch's ``label_smoothing`` (and transformers' ``LabelSmoother``).
    ``activation_checkpointing_enable()`` recomputes the layers in the backward (``LayerCheckpointing``).
    """

    # transformers' name for this loss (its Trainer counts a causal LM's targets as labels[..., 1:]; so does llmcore's)
    loss_type = "ForCausalLM"

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Module()
        self.embed.word = Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.family == "gpt2":
            self.embed.position = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            self.rotary = None
        else:
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.dropout = Dropout(cfg.dropout if cfg.embedding_dropout is None else cfg.embedding_dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = (LayerNorm if cfg.family == "gpt2" else RMSNorm)(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.embed.word.dense_reads = cfg.tie_word_embeddings  # the tied head reads the whole table
        init_linear_(self, cfg.initializer_range)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.embed.word.weight if self.lm_head is None else self.lm_head.weight

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors in transformers' names and layouts."""
        from llmcore.models.loading import save_pretrained

        save_pretrained(self, path)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                num_items_in_batch: Optional[Union[int, Tensor]] = None, label_smoothing: float = 0.0) -> ModelOutput:
        if token_type_ids is not None:
            raise ValueError(f"{self.config.family} takes no token_type_ids")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        rows, target = None, None
        packed = packed_rows(input_ids, attention_mask, position_ids, cu_seqlens)
        if packed is not None:  # sequences packed into rows: each attends to itself (transformers without a cache)
            if labels is not None:
                target = next_token_targets(labels, None).reshape(-1)  # (shifted along the row, as transformers)
                labels = labels.reshape(-1)
            rows = input_ids.shape
            position_ids = position_ids.expand(rows).reshape(-1)
            input_ids, cu_seqlens = input_ids.reshape(-1), packed
        batch = make_batch(input_ids, attention_mask, cu_seqlens)
        window = self.config.sliding_window
        if window is not None and (batch.max_seqlen if batch.packed else input_ids.shape[-1]) > window:
            raise ValueError(f"sequences longer than the sliding window ({window}) are not supported")
        if position_ids is None:
            longest = batch.max_seqlen if batch.packed else input_ids.shape[-1]
            if self.rotary is None and longest > self.embed.position.num_embeddings:
                raise ValueError(f"sequences of {longest} tokens are longer than the model's "
                                 f"{self.embed.position.num_embeddings} positions (n_positions)")
            position_ids = positions_of(batch, input_ids.shape[-1], input_ids.device)
        x = self.embed.word(input_ids)
        rotary = None
        if self.rotary is None:
            x = x + self.embed.position(position_ids)
        else:
            rotary = self.rotary.cos_sin(position_ids, x.dtype)
        stream, delta = self.dropout(x), None
        for i, layer in enumerate(self.layers):
            delta, stream = self._run_layer(i, layer, delta, stream, batch, rotary)
        hidden = self.norm(delta, residual=stream)[0]

        head_called = self.lm_head is not None and not plain_linear(self.lm_head)  # (hooked, an adapter)

        def logits() -> Tensor:
            scores = self.lm_head(hidden) if head_called else nn.functional.linear(hidden, self.lm_head_weight)
            return scores if rows is None else scores.reshape(*rows, scores.shape[-1])

        if labels is None:
            return ModelOutput(None, logits())
        if target is None:
            target = next_token_targets(labels, batch.cu_seqlens if batch.packed else None)
        if head_called:  # the head's own forward, then the loss of its logits (as transformers computes it)
            scores = logits()
            loss = nn.functional.cross_entropy(
                scores.reshape(-1, scores.shape[-1]).float(), target.reshape(-1), ignore_index=-100,
                reduction="mean" if num_items_in_batch is None else "sum", label_smoothing=label_smoothing)
            if num_items_in_batch is not None:
                loss = loss / (num_items_in_batch.to(loss.device) if isinstance(num_items_in_batch, Tensor)
                               else num_items_in_batch)
            return ModelOutput(loss, None, lambda: scores)
        loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head_weight,
                                        target.reshape(-1), ignore_index=-100,
                                        reduction="mean" if num_items_in_batch is None else "sum",
                                        label_smoothing=label_smoothing,
                                        # float32 for bf16 / fp16 weights, as transformers' causal LM loss
                                        loss_dtype=torch.float32 if hidden.element_size() < 4 else None)
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return ModelOutput(loss, None, logits)
