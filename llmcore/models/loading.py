"""Checkpoints: HF ``config.json`` + safetensors (single or sharded) in, and back out.

Names are mapped by per-family tables of (HF name, llmcore name) templates; GPT-2's Conv1D
weights are transposed and its fused c_attn split into q, k and v. transformers' model
classes are never imported."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional, Union

import torch
from torch import nn

from llmcore.models.config import (
    DECODER_FAMILIES,
    DecoderConfig,
    EncoderConfig,
    TaskMismatchError,
    UnsupportedModelError,
    config_from_hf,
)
from llmcore.models.decoder import DecoderForCausalLM
from llmcore.models.encoder import EncoderForSequenceClassification


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


_ENCODER_LAYER = [
    ("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"), ("attention.self.value", "attn.v"),
    ("attention.output.dense", "attn.o"), ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"), ("output.LayerNorm", "mlp_norm"),
]
_DISTIL_LAYER = [
    ("attention.q_lin", "attn.q"), ("attention.k_lin", "attn.k"), ("attention.v_lin", "attn.v"),
    ("attention.out_lin", "attn.o"), ("sa_layer_norm", "attn_norm"), ("ffn.lin1", "mlp.fc1"),
    ("ffn.lin2", "mlp.fc2"), ("output_layer_norm", "mlp_norm"),
]
_LLAMA_LAYER = [
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
    ("self_attn.v_proj", "attn.v"), ("self_attn.o_proj", "attn.o"), ("post_attention_layernorm", "mlp_norm"),
    ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down"),
]
_QK_NORM = [("self_attn.q_norm", "attn.q_norm"), ("self_attn.k_norm", "attn.k_norm")]  # Qwen3
_GPT2_LAYER = [("ln_1", "attn_norm"), ("attn.c_proj", "attn.o"), ("ln_2", "mlp_norm"), ("mlp.c_fc", "mlp.fc1"),
               ("mlp.c_proj", "mlp.fc2")]


def _table(family: str):
    """(prefix, [(hf module, llmcore module)], per-layer prefix pair, ignorable HF names)."""
    if family in ("bert", "roberta"):
        top = [("embeddings.word_embeddings", "embed.word"), ("embeddings.position_embeddings", "embed.position"),
               ("embeddings.token_type_embeddings", "embed.token_type"), ("embeddings.LayerNorm", "embed.norm")]
        if family == "bert":
            top += [("pooler.dense", "head.hidden"), ("classifier", "head.out")]
            ignore = [r"embeddings\.position_ids", r"cls\..*"]
        else:
            top += [("classifier.dense", "head.hidden"), ("classifier.out_proj", "head.out")]
            ignore = [r"embeddings\.position_ids", r"pooler\..*", r"lm_head\..*"]
        return family, top, ("encoder.layer.{i}", "layers.{i}", _ENCODER_LAYER), ignore
    if family == "distilbert":
        top = [("embeddings.word_embeddings", "embed.word"), ("embeddings.position_embeddings", "embed.position"),
               ("embeddings.LayerNorm", "embed.norm"), ("pre_classifier", "head.hidden"), ("classifier", "head.out")]
        return "distilbert", top, ("transformer.layer.{i}", "layers.{i}", _DISTIL_LAYER), [
            r"vocab_.*", r"embeddings\.position_ids"]
    if family == "gpt2":
        top = [("wte", "embed.word"), ("wpe", "embed.position"), ("ln_f", "norm")]
        return "transformer", top, ("h.{i}", "layers.{i}", _GPT2_LAYER), [
            r"h\.\d+\.attn\.(masked_)?bias"]
    top = [("embed_tokens", "embed.word"), ("norm", "norm")]
    layer = _LLAMA_LAYER + (_QK_NORM if family == "qwen3" else [])
    return "model", top, ("layers.{i}", "layers.{i}", layer), [r"layers\.\d+\.self_attn\.rotary_emb\..*"]


def _hf_to_internal(family: str, tied: bool):
    """A function mapping an HF tensor name to (llmcore name or None, ignorable?)."""
    prefix, top, (hf_layer, our_layer, layer_pairs), ignore = _table(family)
    rules = [(re.escape(h) + r"\.(weight|bias)", o + r".\1") for h, o in top]
    for h, o in layer_pairs:
        rules.append((re.escape(hf_layer).replace(r"\{i\}", r"(\d+)") + r"\." + re.escape(h) + r"\.(weight|bias)",
                      our_layer.replace("{i}", r"\1") + "." + o + r".\2"))
    compiled = [(re.compile(p), r) for p, r in rules]
    ignores = [re.compile(p) for p in ignore]

    def convert(name: str):
        # base-model checkpoints (e.g. BertModel) are saved without the prefix
        base = name[len(prefix) + 1:] if name.startswith(prefix + ".") else name
        if family in DECODER_FAMILIES and name == "lm_head.weight":  # (a tied head's copy is ignorable)
            return (None if tied else "lm_head.weight"), tied
        for pattern, repl in compiled:
            m = pattern.fullmatch(base)
            if m:
                return m.expand(repl), False
        return None, any(p.fullmatch(base) for p in ignores)

    return convert


def load_safetensors_file(file: str) -> dict:
    """safetensors' ``load_file``; a damaged file (truncated, not safetensors) is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as e:
        raise CheckpointError(f"{file!r} is unreadable (damaged or not a safetensors file): {e}") from e


def read_safetensors(path: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return load_safetensors_file(single)
    if os.path.isfile(index):
        weight_map = read_json_object(index, "a shard index").get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index!r} has no weight_map of tensor names to shard files (a damaged index?)")
        shards = sorted(set(weight_map.values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_safetensors_file(os.path.join(path, shard)))
        return tensors
    raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor model.safetensors.index.json")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face transformers model (a ``PreTrainedModel``; transformers is not
    imported for it: a model of its classes means it is loaded already)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def transformers_auto_class(causal_lm: bool, refused: Optional[UnsupportedModelError] = None):
    """transformers' ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``, the model class for a checkpoint
    llmcore's own models do not take (``refused``: why they did not); None where transformers should not take it
    either -- an encoder asked for a causal LM -- or is not installed."""
    if causal_lm and isinstance(refused, TaskMismatchError):
        return None  # an encoder is no causal LM
    try:
        import transformers
    except ImportError:
        return None
    return transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModelForSequenceClassification


def load_transformers_state(model: nn.Module, tensors: dict) -> None:
    """Copy a transformers model's own tensors (its state_dict names, as its ``save_pretrained`` writes them) into
    it in place, sharded by FSDP or not. A name the model lacks is an error; a missing one only when the tensor
    is not tied to one that is present (``save_pretrained`` drops tied copies, e.g. a tied LM head)."""
    ours = dict(model.state_dict())
    unexpected = sorted(set(tensors) - set(ours))
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint for {type(model).__name__}: {unexpected[:10]}")
    given = {_storage_key(ours[name]) for name in tensors}
    missing = [k for k in ours if k not in tensors and _storage_key(ours[k]) not in given]
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint for {type(model).__name__}: {missing[:10]}")
    _copy_into(ours, tensors)


def _storage_key(t):
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: its shard's storage
    return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape)


def load_state(model: nn.Module, family: str, tensors: dict, strict_head: bool = False) -> list:
    """Copy HF-named tensors into model; returns the llmcore names left at their initial
    values (the new task head). Raises CheckpointError on missing, unexpected or mis-shaped
    tensors and on non-floating tensors."""
    tied = isinstance(model, DecoderForCausalLM) and model.lm_head is None
    convert = _hf_to_internal(family, tied)
    ours = dict(model.state_dict())
    loaded: dict = {}
    unexpected, unused = [], []
    # a checkpoint of the base model under its prefix (bert., model.) has its task head beside it: one llmcore
    # does not build (another task's: qa_outputs, a token classifier, score) is left unused, as transformers does
    prefix = _table(family)[0] + "."
    headed = any(name.startswith(prefix) for name in tensors)
    for name, t in tensors.items():
        if family == "gpt2" and re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.c_attn\.(weight|bias)", name):
            i = re.search(r"h\.(\d+)\.", name).group(1)
            kind = name.rsplit(".", 1)[1]
            t = t.t() if kind == "weight" else t
            if f"layers.{i}.attn.q.{kind}" not in ours:
                unexpected.append(name)
                continue
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                loaded[f"layers.{i}.attn.{part}.{kind}"] = chunk
            continue
        target, ignorable = convert(name)
        if target is None or target not in ours:
            if not ignorable:
                (unused if headed and not name.startswith(prefix) else unexpected).append(name)
            continue
        if family == "gpt2" and target.endswith(".weight") and (".attn.o." in target or ".mlp." in target):
            t = t.t()  # Conv1D stores (in, out)
        loaded[target] = t
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint for a {family} model: {sorted(unexpected)[:10]}"
                              + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    if unused:
        print(f"llmcore: the {family} checkpoint's tensors {sorted(unused)[:10]}"
              + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
              + f" are another task's head, not {type(model).__name__}'s: not used (as transformers leaves them)",
              file=sys.stderr)
    head_prefixes = ("head.out.", "head.hidden.") if isinstance(model, EncoderForSequenceClassification) else ()
    missing = [k for k in ours if k not in loaded]
    fresh = [k for k in missing if k.startswith(head_prefixes)]
    # BERT checkpoints carry the pooler (head.hidden) but not the classifier; others carry neither
    missing = [k for k in missing if k not in fresh or strict_head]
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint for a {family} model: {missing[:10]}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    _copy_into(ours, loaded)
    return fresh


def _copy_into(ours: dict, loaded: dict) -> None:
    """``loaded[name]`` into the model's tensor ``ours[name]`` in place (its dtype; this rank's shard of a DTensor),
    after checking that it is floating point and of the model's shape."""
    with torch.no_grad():
        for name, t in loaded.items():
            if not t.is_floating_point():
                raise CheckpointError(f"tensor {name!r} is {t.dtype}, expected a floating-point dtype")
            if tuple(t.shape) != tuple(ours[name].shape):
                if name.startswith("head.out."):  # a fine-tuned classifier's head, asked for another label count
                    raise CheckpointError(f"the checkpoint's classification head has {t.shape[0]} classes, the model "
                                          f"asked for {ours[name].shape[0]} (the data's labels): start from a "
                                          "checkpoint without that head (its base model), or keep its label count")
                raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(ours[name].shape)} (does config.json match the weights?)")
            t = t.to(ours[name].dtype)
            if hasattr(ours[name], "device_mesh"):  # a DTensor (a model sharded by FSDP): this rank's shard of t
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t, ours[name].device_mesh, ours[name].placements, src_data_rank=None)
            ours[name].copy_(t)


def checkpoint_dir(path: Union[str, os.PathLike]) -> str:
    """The local checkpoint folder of a folder path or a Hugging Face Hub model id (fetched into the
    local Hub cache, see :mod:`llmcore.hub`); FileNotFoundError for anything else."""
    from llmcore.hub import checkpoint_folder

    path = checkpoint_folder(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is a file; a checkpoint is a folder (config.json + safetensors)")
    return path


def from_pretrained(path: Union[str, os.PathLike], task: str = "sequence-classification",
                    num_labels: Optional[int] = None, dtype: Optional[torch.dtype] = None):
    """Build an llmcore model from an HF checkpoint folder (config.json + safetensors), or from a Hugging
    Face Hub model id (see :func:`checkpoint_dir`)."""
    path = checkpoint_dir(path)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    hf = read_config(path)
    model = build_model(hf, task, num_labels)
    tensors = read_safetensors(path)
    if _head_differs_from_embedding(model, tensors):
        # as transformers (tie_weights): a tied config whose file has a head of other values is not tied; it warns
        print(f"llmcore: {path!r}: config.json ties the LM head to the embedding, but model.safetensors holds "
              "an lm_head.weight of other values: it is used, untied (as transformers does; set "
              "tie_word_embeddings false to silence this)", file=sys.stderr)
        model = build_model(dict(hf, tie_word_embeddings=False), task, num_labels)
    if dtype is not None:
        model.to(dtype)
    fresh = load_state(model, model.config.family, tensors)
    model.newly_initialized = fresh
    return model


def _head_differs_from_embedding(model: nn.Module, tensors: dict) -> bool:
    """Whether a tied decoder's checkpoint holds an ``lm_head.weight`` unequal to its word embedding."""
    if not isinstance(model, DecoderForCausalLM) or model.lm_head is not None or "lm_head.weight" not in tensors:
        return False
    prefix, top, _, _ = _table(model.config.family)
    hf_name = next(h for h, o in top if o == "embed.word") + ".weight"
    embedding = tensors.get(f"{prefix}.{hf_name}", tensors.get(hf_name))
    head = tensors["lm_head.weight"]
    return embedding is not None and not (embedding.shape == head.shape and torch.equal(embedding, head))


def read_json_object(file: str, what: str) -> dict:
    """A checkpoint's JSON file holding ``what``; damaged or no JSON object: a CheckpointError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file!r} is unreadable (a damaged checkpoint file?): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file!r} holds a JSON {type(obj).__name__}, not {what}")
    return obj


def read_config(path: str) -> dict:
    """The checkpoint folder's config.json (see ``read_json_object``)."""
    return read_json_object(os.path.join(path, "config.json"), "a model config")


def build_model(hf: dict, task: str = "sequence-classification", num_labels: Optional[int] = None) -> nn.Module:
    """A freshly initialized llmcore model for ``task`` from transformers' config dict ``hf`` (config.json)."""
    try:
        cfg = config_from_hf(hf, task, num_labels)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e.args[0]!r}, which a {hf.get('model_type')} model needs") from None
    except (TypeError, AttributeError) as e:
        raise CheckpointError(f"config.json has a field of the wrong type: {e}") from e
    return EncoderForSequenceClassification(cfg) if task == "sequence-classification" else DecoderForCausalLM(cfg)


def _internal_to_hf(model: nn.Module, state: Optional[dict] = None) -> dict:
    cfg = model.config
    family = cfg.family
    prefix, top, (hf_layer, _, layer_pairs), _ = _table(family)
    heads = {"head.out": "classifier", "head.hidden": {"bert": "bert.pooler.dense", "roberta": "classifier.dense",
                                                       "distilbert": "pre_classifier"}.get(family)}
    if family == "roberta":
        heads["head.out"] = "classifier.out_proj"
    out = {}
    state = model.state_dict() if state is None else state
    for name, t in state.items():
        t = t.detach().contiguous()
        mod, kind = name.rsplit(".", 1)
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", mod)
        if m:
            i, rest = m.groups()
            if family == "gpt2" and rest in ("attn.q", "attn.k", "attn.v"):
                continue  # written fused below
            hf_rest = {o: h for h, o in layer_pairs}[rest]
            hf_name = f"{prefix}.{hf_layer.format(i=i)}.{hf_rest}.{kind}"
            if family == "gpt2" and kind == "weight" and rest in ("attn.o", "mlp.fc1", "mlp.fc2"):
                t = t.t().contiguous()
        elif mod in heads and family in ("bert", "roberta", "distilbert"):
            hf_name = f"{heads[mod]}.{kind}"
        elif mod == "lm_head":
            hf_name = f"lm_head.{kind}"
        else:
            hf_name = f"{prefix}.{ {o: h for h, o in top}[mod] }.{kind}"
        out[hf_name] = t
    if family == "gpt2":
        for i in range(cfg.num_layers):
            for kind in ("weight", "bias"):
                parts = [state[f"layers.{i}.attn.{p}.{kind}"] for p in "qkv"]
                fused = torch.cat(parts, dim=0)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = (fused.t() if kind == "weight" else fused).contiguous()
    return out


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike], state_dict: Optional[dict] = None) -> None:
    """Write config.json + model.safetensors that transformers loads (HF names and layouts). ``state_dict``:
    the model's tensors by llmcore's names, when not ``model.state_dict()`` (whole tensors gathered from the
    shards of a model FSDP shards: ``llmcore.train.fsdp.full_model_state``). A transformers model (llmcore's
    Trainer trains those too) is written by its own ``save_pretrained``, with ``state_dict`` by its names."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if is_transformers_model(model):
        model.save_pretrained(path, state_dict=state_dict)
        return
    tensors = _internal_to_hf(model, state_dict)
    if isinstance(model, DecoderForCausalLM) and model.lm_head is None:
        tensors.pop("lm_head.weight", None)
    save_config(model, path, next((t.dtype for t in tensors.values() if t.dtype.is_floating_point), None))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def save_config(model: nn.Module, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> None:
    """Write ``model``'s config.json (transformers' keys) into the folder ``path``, its ``dtype`` that of the
    tensors written (default: the model's parameters')."""
    if is_transformers_model(model):
        # as its save_pretrained does: the class, which `llmcore consolidate` builds from config.json again
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(os.fspath(path))
        return
    config = model.config.to_hf()
    # the dtype of the tensors written (a bf16 checkpoint trained in float32 is saved in float32): transformers
    # loads a model in the config's dtype
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    config.pop("torch_dtype", None)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(os.fspath(path), "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


__all__ = ["CheckpointError", "from_pretrained", "load_state", "save_pretrained", "EncoderConfig", "DecoderConfig"]
