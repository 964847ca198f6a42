"""Model configs: dataclasses built from (and written back to) HF ``config.json`` dicts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ENCODER_FAMILIES = ("bert", "roberta", "distilbert")
DECODER_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one llmcore implements."""


class TaskMismatchError(UnsupportedModelError):
    """The checkpoint is an encoder asked for a causal LM, or a decoder asked for sequence classification."""


# transformers' GELU activation names -> the ``approximate`` of llmcore's fused bias-GELU (FastGELU is the tanh form)
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def gelu_approximate(act: str, family: str, key: str = "hidden_act") -> str:
    """The fused bias-GELU's ``approximate`` for a transformers activation name; UnsupportedModelError naming
    ``key`` (the config field) for any other activation."""
    if act not in GELU_APPROXIMATE:
        raise UnsupportedModelError(f"{key} {act!r} is not supported for {family} ({', '.join(GELU_APPROXIMATE)})")
    return GELU_APPROXIMATE[act]


def _gelu(hf: dict, key: str, default: str, family: str) -> str:
    act = hf.get(key, default)
    gelu_approximate(act, family, key)
    return act


def _positive(**values) -> None:
    """ValueError naming the first size that is not a positive int (a config.json's 0 became a ZeroDivisionError or
    a torch error far from the field)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _small_positive(**values) -> None:
    """ValueError naming the first value (a norm's eps) that is not a positive finite number (a null eps loaded and
    failed in the first forward, naming no field, and a string one ran: a probe)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{key} must be a positive number, got {value!r}")


def _refuse(hf: dict, family: str, **supported) -> None:
    """UnsupportedModelError naming the first config field whose value changes what llmcore computes."""
    for key, value in supported.items():
        if hf.get(key, value) != value:
            raise UnsupportedModelError(f"{key}={hf[key]!r} is not supported for {family} (llmcore implements "
                                        f"{key}={value!r})")


def _check_pad_token_id(pad, vocab_size: int) -> None:
    """A pad_token_id (the word embedding's padding row) must be an id of the vocabulary, or None."""
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not -vocab_size <= pad < vocab_size):
        # (transformers' embedding refuses it too; one past the vocabulary loaded here, with no padding row)
        raise ValueError(f"pad_token_id {pad!r} is not an id of the vocabulary ({vocab_size} ids; a negative one "
                         "counts from its end, as torch's padding_idx): fix it in config.json")


def _family(hf: dict) -> str:
    family = hf.get("model_type")
    if family not in ENCODER_FAMILIES + DECODER_FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {family!r} (config.json model_type); llmcore supports "
            f"{', '.join(ENCODER_FAMILIES + DECODER_FAMILIES)}")
    return family


@dataclass
class EncoderConfig:
    family: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: Optional[int] = None  # the family's: 2, none (0) for distilbert
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: Optional[float] = None
    hidden_act: str = "gelu"
    pad_token_id: Optional[int] = 0  # None: no padding row (a config's null)
    num_labels: int = 2
    initializer_range: float = 0.02
    hf: dict = field(default_factory=dict, repr=False)  # the source config, written back on save
    # transformers' loss choice: "regression", "single_label_classification", "multi_label_classification", or
    # None (regression for one label, else by the labels' dtype)
    problem_type: Optional[str] = None
    # the class names by id, written to config.json's id2label / label2id (None: the source config's, if it
    # names num_labels classes, else LABEL_<i>)
    id2label: Optional[dict] = None

    def __post_init__(self):
        if self.type_vocab_size is None:
            self.type_vocab_size = 0 if self.family == "distilbert" else 2
        _positive(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size, num_labels=self.num_labels)
        _small_positive(layer_norm_eps=self.layer_norm_eps)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        _check_pad_token_id(self.pad_token_id, self.vocab_size)
        if self.family == "roberta" and self.pad_token_id is None:  # (forward failed on None + 1)
            raise ValueError("pad_token_id null: RoBERTa counts positions from its padding id (transformers' RoBERTa "
                             "cannot run without one either); set pad_token_id (in config.json)")
        # DistilBERT has no token types, and transformers' fixes its LayerNorm eps: a model with either could not
        # be saved as one (its token-type table was added to every token, and save_pretrained failed on it)
        if self.family == "distilbert" and (self.type_vocab_size or self.layer_norm_eps != 1e-12):
            raise ValueError(f"distilbert has no token types and layer_norm_eps 1e-12 (transformers' DistilBERT "
                             f"fixes both); got type_vocab_size={self.type_vocab_size}, "
                             f"layer_norm_eps={self.layer_norm_eps}")

    @classmethod
    def from_hf(cls, hf: dict, num_labels: Optional[int] = None) -> "EncoderConfig":
        family = _family(hf)
        if family not in ENCODER_FAMILIES:
            raise TaskMismatchError(f"{family!r} is a decoder; sequence classification takes "
                                    f"{', '.join(ENCODER_FAMILIES)}")
        if num_labels is not None:
            _positive(num_labels=num_labels)  # (0 fell back to the config's count)
        labels = num_labels or hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        problem = hf.get("problem_type")
        if problem not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise UnsupportedModelError(f"problem_type {problem!r} is not one of transformers' three")
        if family == "distilbert":
            return cls(family, hf["vocab_size"], hf["dim"], hf["n_layers"], hf["n_heads"], hf["hidden_dim"],
                       hf.get("max_position_embeddings", 512), 0, 1e-12, hf.get("dropout", 0.1),
                       hf.get("attention_dropout", 0.1), hf.get("seq_classif_dropout", 0.2),
                       _gelu(hf, "activation", "gelu", family), hf.get("pad_token_id", 0), labels,
                       hf.get("initializer_range", 0.02), dict(hf), problem)
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
        _refuse(hf, family, is_decoder=False, add_cross_attention=False)  # (causal self-attention, cross-attention)
        return cls(family, hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                   hf["intermediate_size"], hf.get("max_position_embeddings", 512), hf.get("type_vocab_size", 2),
                   hf.get("layer_norm_eps", 1e-12), hf.get("hidden_dropout_prob", 0.1),
                   hf.get("attention_probs_dropout_prob", 0.1), hf.get("classifier_dropout"),
                   _gelu(hf, "hidden_act", "gelu", family), hf.get("pad_token_id", 1 if family == "roberta" else 0),
                   labels, hf.get("initializer_range", 0.02), dict(hf), problem)

    def to_hf(self) -> dict:
        out = dict(self.hf) or {"model_type": self.family}
        arch = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                "distilbert": "DistilBertForSequenceClassification"}[self.family]
        out["architectures"] = [arch]
        out["num_labels"] = self.num_labels
        if self.problem_type is not None:
            out["problem_type"] = self.problem_type
        if self.id2label is not None:
            out["id2label"] = {str(i): str(name) for i, name in self.id2label.items()}
            out["label2id"] = {str(name): int(i) for i, name in self.id2label.items()}
        elif len(out.get("id2label") or {}) != self.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if not self.hf:  # built from the dataclass: write HF's names for every field
            out.update(self._hf_fields())
        return out

    def _hf_fields(self) -> dict:
        if self.family == "distilbert":
            return {"vocab_size": self.vocab_size, "dim": self.hidden_size, "n_layers": self.num_layers,
                    "n_heads": self.num_heads, "hidden_dim": self.intermediate_size,
                    "max_position_embeddings": self.max_position_embeddings, "dropout": self.hidden_dropout,
                    "attention_dropout": self.attention_dropout, "seq_classif_dropout": self.classifier_dropout or 0.2,
                    "activation": self.hidden_act, "pad_token_id": self.pad_token_id,
                    "initializer_range": self.initializer_range}
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps, "hidden_dropout_prob": self.hidden_dropout,
                "attention_probs_dropout_prob": self.attention_dropout, "classifier_dropout": self.classifier_dropout,
                "hidden_act": self.hidden_act, "pad_token_id": self.pad_token_id,
                "initializer_range": self.initializer_range}


@dataclass
class DecoderConfig:
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: Optional[bool] = None  # the family's: q/k/v biases in gpt2 and qwen2 (as transformers builds)
    hidden_act: Optional[str] = None  # the family's: "gelu_new" for gpt2, else "silu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    sliding_window: Optional[int] = None
    initializer_range: float = 0.02
    hf: dict = field(default_factory=dict, repr=False)
    # GPT-2's attention scaling: by 1/sqrt(head_dim) (else 1), and further by 1/(layer index + 1)
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # GPT-2's embd_pdrop, on the embeddings' sum (None: ``dropout``, which is its resid_pdrop)
    embedding_dropout: Optional[float] = None
    # the word embedding's padding row, which gets no gradient (transformers' padding_idx: the pad token id of the
    # Llama-family classes; GPT-2's embedding has none); None: no such row
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        _positive(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                  intermediate_size=self.intermediate_size)
        pad = self.pad_token_id
        if pad is not None and self.family == "gpt2":
            raise ValueError("pad_token_id: GPT-2's word embedding has no padding row (transformers' neither); "
                             "leave it None")
        _check_pad_token_id(pad, self.vocab_size)
        _small_positive(**{"layer_norm_epsilon" if self.family == "gpt2" else "rms_norm_eps": self.norm_eps})
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.family != "gpt2" and not self.rope_theta > 0:  # (GPT-2 has no RoPE: its 0)
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.hidden_act is None:
            self.hidden_act = "gelu_new" if self.family == "gpt2" else "silu"
        # what transformers' classes of the family compute, or a model saved with other values would load there as
        # another model (the fields were written to config.json but not computed)
        if self.family != "gpt2" and self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r}: llmcore's {self.family} MLP is SwiGLU (silu)")
        if self.family == "gpt2" and (self.num_kv_heads != self.num_heads
                                      or self.head_dim * self.num_heads != self.hidden_size):
            raise ValueError(f"GPT-2 has num_kv_heads == num_heads and head_dim * num_heads == hidden_size (got "
                             f"{self.num_kv_heads}, {self.num_heads}, {self.head_dim}, {self.hidden_size})")
        if self.family == "mistral" and self.attention_bias:
            raise ValueError("attention_bias=True: transformers' Mistral has no attention biases")
        if self.attention_bias is None:
            self.attention_bias = self.family in ("gpt2", "qwen2")
        elif self.family in ("gpt2", "qwen2") and not self.attention_bias:
            name = {"gpt2": "GPT-2", "qwen2": "Qwen2"}[self.family]
            raise ValueError(f"attention_bias=False: {name}'s attention always has q/k/v biases (transformers' "
                             f"{name} could not load such a model); leave attention_bias unset for {self.family}")

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderConfig":
        family = _family(hf)
        if family not in DECODER_FAMILIES:
            raise TaskMismatchError(f"{family!r} is an encoder; causal LM takes {', '.join(DECODER_FAMILIES)}")
        if family == "gpt2":
            d, h = hf["n_embd"], hf["n_head"]
            return cls(family, hf["vocab_size"], d, hf["n_layer"], h, h, d // h, hf.get("n_inner") or 4 * d,
                       hf.get("n_positions", 1024), hf.get("layer_norm_epsilon", 1e-5), 0.0,
                       hf.get("tie_word_embeddings", True), True, _gelu(hf, "activation_function", "gelu_new", family),
                       hf.get("resid_pdrop", 0.1), hf.get("attn_pdrop", 0.1), None,
                       hf.get("initializer_range", 0.02), dict(hf), bool(hf.get("scale_attn_weights", True)),
                       bool(hf.get("scale_attn_by_inverse_layer_idx", False)), hf.get("embd_pdrop", 0.1))
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UnsupportedModelError(f"rope scaling {rope!r} is not supported (only the default RoPE)")
        # transformers 5's order: the rope section's theta, then the top level's
        theta = next((t for t in ((rope or {}).get("rope_theta"), hf.get("rope_theta")) if t is not None), 10000.0)
        heads = hf["num_attention_heads"]
        _positive(num_attention_heads=heads)
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # (transformers' "swish" is SiLU too)
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported for {family}")
        if family == "llama":  # (Mistral's, Qwen2's and Qwen3's MLPs have no biases whatever the config says)
            _refuse(hf, family, mlp_bias=False)
        return cls(family, hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], heads,
                   hf.get("num_key_value_heads") or heads, hf.get("head_dim") or hf["hidden_size"] // heads,
                   hf["intermediate_size"], hf.get("max_position_embeddings", 4096), hf.get("rms_norm_eps", 1e-6),
                   float(theta), hf.get("tie_word_embeddings", False),
                   # (transformers' Mistral has no biases whatever its config says; Qwen2's are always there, an
                   # attention_bias false in its config.json ignored too: a probe found such a checkpoint refused)
                   {"mistral": False, "qwen2": True}.get(family, hf.get("attention_bias", False)), "silu", 0.0,
                   hf.get("attention_dropout", 0.0),
                   _sliding_window(hf, family), hf.get("initializer_range", 0.02), dict(hf),
                   pad_token_id=hf.get("pad_token_id"))

    def to_hf(self) -> dict:
        out = dict(self.hf) or {"model_type": self.family}
        out["architectures"] = [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                 "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM"}[self.family]]
        if not self.hf:  # built from the dataclass: write HF's names for every field
            out.update(self._hf_fields())
        return out

    def _hf_fields(self) -> dict:
        if self.family == "gpt2":
            return {"vocab_size": self.vocab_size, "n_embd": self.hidden_size, "n_layer": self.num_layers,
                    "n_head": self.num_heads, "n_inner": self.intermediate_size,
                    "n_positions": self.max_position_embeddings, "layer_norm_epsilon": self.norm_eps,
                    "tie_word_embeddings": self.tie_word_embeddings, "activation_function": self.hidden_act,
                    "resid_pdrop": self.dropout, "attn_pdrop": self.attention_dropout,
                    "embd_pdrop": self.dropout if self.embedding_dropout is None else self.embedding_dropout,
                    "initializer_range": self.initializer_range, "scale_attn_weights": self.scale_attn_weights,
                    "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx}
        out = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
               "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
               "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
               "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
               "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
               "hidden_act": self.hidden_act, "attention_dropout": self.attention_dropout,
               "initializer_range": self.initializer_range, "pad_token_id": self.pad_token_id}
        if self.family != "qwen2":
            out["attention_bias"] = self.attention_bias
        if self.family == "mistral":
            out["sliding_window"] = self.sliding_window
        elif self.family in ("qwen2", "qwen3"):  # (every layer slides, or none: as this model computes)
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            out.update(sliding_window=self.sliding_window, use_sliding_window=self.sliding_window is not None,
                       layer_types=[kind] * self.num_layers)
        return out


def _sliding_window(hf: dict, family: str) -> Optional[int]:
    """The window of a decoder whose layers slide, else None. transformers' ``layer_types`` (or, in configs written
    before it, Qwen's ``max_window_layers``: layers from that index on slide) may leave every layer full. Where only
    some layers slide, the window counts for all (llmcore then refuses longer sequences rather than miscompute)."""
    # (use_sliding_window is Qwen's switch; transformers' Mistral slides whenever sliding_window is set)
    # (a Mistral config.json without the key: transformers' default window, 4096)
    window = (hf.get("sliding_window", 4096) if family == "mistral"
              else hf.get("sliding_window") if hf.get("use_sliding_window", False) else None)
    if window is None:
        return None
    types = hf.get("layer_types")
    if types is not None:
        return window if "sliding_attention" in types else None
    if family in ("qwen2", "qwen3") and hf.get("max_window_layers", 0) >= hf["num_hidden_layers"]:
        return None
    return window


def config_from_hf(hf: dict, task: str, num_labels: Optional[int] = None):
    if task == "sequence-classification":
        return EncoderConfig.from_hf(hf, num_labels)
    if task == "causal-lm":
        return DecoderConfig.from_hf(hf)
    raise ValueError(f"task must be 'sequence-classification' or 'causal-lm', got {task!r}")


__all__ = ["DecoderConfig", "EncoderConfig", "TaskMismatchError", "UnsupportedModelError", "config_from_hf"]
