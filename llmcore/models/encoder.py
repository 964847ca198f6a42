"""BERT-family encoders (BERT, MiniLM, RoBERTa, DistilBERT) for sequence classification."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from llmcore.models.checkpointing import LayerCheckpointing
from llmcore.models.config import EncoderConfig, gelu_approximate
from llmcore.models.output import ModelOutput, make_batch, packed_rows
from llmcore.nn.layers import (MLP, Attention, Batch, Dropout, Embedding, LayerNorm, hooks_see_layer_output,
                                init_linear_, positions_of)



class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.family = cfg.family
        self.pad_token_id = cfg.pad_token_id
        pad = cfg.pad_token_id  # (an id of the vocabulary: the config checks it; a negative one counts from its end)
        self.word = Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad)  # as transformers: no pad-row gradient
        # RoBERTa's position table has a padding row too (its pad positions are padding_idx): no gradient there
        roberta_pad = cfg.family == "roberta" and pad is not None and pad < cfg.max_position_embeddings
        pad_position = pad if roberta_pad else None
        self.position = Embedding(cfg.max_position_embeddings, cfg.hidden_size, padding_idx=pad_position)
        self.token_type = Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor],
                batch: Batch) -> Tensor:
        if position_ids is None:
            longest = batch.max_seqlen if batch.packed else input_ids.shape[-1]
            first = self.pad_token_id + 1 if self.family == "roberta" else 0  # (RoBERTa's positions start there)
            if first + longest > self.position.num_embeddings and self.family == "roberta" and not batch.packed:
                longest = int(input_ids.ne(self.pad_token_id).sum(-1).max())  # (its pads take the padding position)
            if first + longest > self.position.num_embeddings:
                raise ValueError(f"sequences of {longest} tokens are longer than the model's "
                                 f"{self.position.num_embeddings - first} positions (max_position_embeddings)")
            if self.family == "roberta" and not batch.packed:
                # RoBERTa counts positions of non-pad tokens from padding_idx + 1
                real = input_ids.ne(self.pad_token_id).int()
                position_ids = (real.cumsum(-1) * real).long() + self.pad_token_id
            else:
                position_ids = positions_of(batch, input_ids.shape[-1], input_ids.device)
                if self.family == "roberta":
                    position_ids = position_ids + self.pad_token_id + 1
        x = self.word(input_ids)
        extra = self.position(position_ids)
        if self.token_type is not None:
            extra = extra + (self.token_type(token_type_ids) if token_type_ids is not None
                             else self.token_type.weight[0])
        return self.dropout(self.norm(x + extra))


class EncoderLayer(nn.Module):
    """Post-LN block: norm(x + attn(x)), then norm(h + mlp(h)), residual adds fused into the norms. BERT and
    RoBERTa drop out both branches' outputs; DistilBERT the MLP's only (its attention output goes to the norm as
    it is)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, dropout=cfg.attention_dropout)
        self.attn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, approximate=gelu_approximate(cfg.hidden_act, cfg.family))
        self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.attn_dropout = nn.Identity() if cfg.family == "distilbert" else self.dropout

    def forward(self, x: Tensor, batch: Batch, first_only: bool = False) -> Tensor:
        """(B, L, D) or (T, D) -> the same; with ``first_only`` only the rows of each sequence's
        first token are computed past the key/value projections: (B, 1, D) or (n, D)."""
        h = self.attn(x, batch, first_only=first_only)
        if first_only:
            x = x[batch.cu_seqlens[:-1].long()] if batch.packed else x[:, :1]
        x = self.attn_norm(self.attn_dropout(h), residual=x)[0]
        return self.mlp_norm(self.dropout(self.mlp(x)), residual=x)[0]


class ClassificationHead(nn.Module):
    """The family's head on the first token: BERT pooler + tanh, RoBERTa dense + tanh,
    DistilBERT pre-classifier + ReLU; then dropout and the output projection."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.family = cfg.family
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, cfg.num_labels)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
        self.dropout = Dropout(p)

    def forward(self, first: Tensor) -> Tensor:
        if self.family == "bert":
            return self.out(self.dropout(torch.tanh(self.hidden(first))))
        if self.family == "roberta":
            return self.out(self.dropout(torch.tanh(self.hidden(self.dropout(first)))))
        return self.out(self.dropout(torch.relu(self.hidden(first))))


class EncoderForSequenceClassification(LayerCheckpointing, nn.Module):
    """``model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
    cu_seqlens=None, labels=None)``: padded (B, L) or packed (T,) + cu_seqlens; logits (n, labels).
    ``activation_checkpointing_enable()`` recomputes the layers in the backward (``LayerCheckpointing``)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.head = ClassificationHead(cfg)
        init_linear_(self, cfg.initializer_range)

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors in transformers' names and layouts."""
        from llmcore.models.loading import save_pretrained

        save_pretrained(self, path)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ModelOutput:
        packed = packed_rows(input_ids, attention_mask, position_ids, cu_seqlens)
        if packed is not None:  # sequences packed into rows: each attends to itself; a row's logits are its first's
            shape = input_ids.shape
            out = self.forward(input_ids.reshape(-1), None,
                               None if token_type_ids is None else token_type_ids.expand(shape).reshape(-1),
                               position_ids.expand(shape).reshape(-1), packed)
            row_first = torch.searchsorted(packed[:-1], torch.arange(0, input_ids.numel(), shape[1], dtype=torch.int32,
                                                                     device=packed.device))
            logits = out.logits[row_first]
            return ModelOutput(None if labels is None else classification_loss(logits, labels, self.config), logits)
        batch = make_batch(input_ids, attention_mask, cu_seqlens)
        if (batch.min_seqlen == 0) if batch.packed else (input_ids.size(1) == 0 and input_ids.size(0) > 0):
            # (packed, the empty sequence's "first token" was the next one's: a silently wrong row)
            raise ValueError("a sequence of no tokens: the classifier reads each sequence's first token ([CLS]); "
                             "encode with the special tokens, or leave the empty texts out")
        x = self.embed(input_ids, token_type_ids, position_ids, batch)
        # The head reads only each sequence's first token, so the last layer computes only those
        # rows once its keys and values are known (~1/6 fewer FLOPs for 6 layers; exact) -- unless a hook of the
        # user's would see that layer's rows (a sentence embedder hooking the last layer): then it runs whole.
        last = len(self.layers) - 1
        if last >= 0 and hooks_see_layer_output(self, "layers", self.layers[last]):
            last = -1
        for i, layer in enumerate(self.layers):
            x = self._run_layer(i, layer, x, batch, first_only=i == last)
        if not self.layers and batch.packed:
            x = x[batch.cu_seqlens[:-1].long()]
        logits = self.head(x if batch.packed else x[:, 0])
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        return ModelOutput(loss, logits)


def classification_loss(logits: Tensor, labels: Tensor, cfg: EncoderConfig) -> Tensor:
    """transformers' sequence-classification loss, in float32: by ``problem_type``, else regression (MSE) for one
    label, single-label cross-entropy for integer labels, multi-label BCE-with-logits for float ones."""
    problem = cfg.problem_type
    if problem is None:
        integer = labels.dtype in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8)
        problem = ("regression" if cfg.num_labels == 1
                   else "single_label_classification" if integer else "multi_label_classification")
    logits = logits.float()
    if problem == "regression":
        if cfg.num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.float().squeeze())
        return nn.functional.mse_loss(logits, labels.float())
    if problem == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, cfg.num_labels), labels.long().view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
