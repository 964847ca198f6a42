"""The fine-tuning loop: accumulation normalized by real examples, streaming evaluation, exact resume."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable
from itertools import islice
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llmcore.models import DecoderConfig, EncoderConfig, save_pretrained
from llmcore.models.decoder import next_token_targets
from llmcore.models.loading import is_transformers_model
from llmcore.train.bf16_weights import Bf16Weights
from llmcore.train.checkpoint import (
    PREFIX,
    inside_folder,
    keep_only_best,
    load_checkpoint,
    load_model_weights,
    partial_path,
    publish_checkpoint,
    require_latest_checkpoint,
    restore_interrupted_swaps,
    resumes_here,
    rotate_checkpoints,
    save_checkpoint,
    seed_everything,
    set_aside_later_checkpoints,
    update_state,
)
from llmcore.train.config import LAYER_KEYS, TrainConfig
from llmcore.train.fsdp import (
    check_process_group,
    full_model_state,
    is_sharded,
    reshard,
    shard,
)
from llmcore.train.lazy_rows import LazyRowAdamW
from llmcore.train.optim import clip_and_step, make_optimizer, make_schedule
from llmcore.train.reporting import Reporter, peak_memory_mb, set_aside_earlier_logs

IGNORE_INDEX = -100
Batch = dict
BatchFactory = Callable[[int], Iterable[Batch]]


def example_count(batch: Batch, causal_lm: bool = False) -> int:
    """Labelled examples in a batch: labels that are not ``-100``; with ``causal_lm``, the tokens predicted: labels
    that are not ``-100`` and not the first of their sequence (transformers' Trainer counts ``labels[..., 1:]``)."""
    if "labels" not in batch:
        raise KeyError(f"a training batch needs 'labels'; it has keys {sorted(batch)}")
    labels = batch["labels"]
    if not causal_lm:
        return int((labels != IGNORE_INDEX).sum())
    if labels.dim() >= 2:
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    starts = _sequence_starts(batch)
    return int((labels != IGNORE_INDEX).sum()) - int((labels[starts] != IGNORE_INDEX).sum())


def _sequences_with_any(flags: Tensor, cu: Tensor) -> Tensor:
    """Per packed sequence (offsets ``cu``), whether any of its tokens' ``flags`` is set."""
    cu = cu.to(flags.device).long()
    running = torch.cat([cu.new_zeros(1), flags.long().cumsum(0)])
    return running[cu[1:]] > running[cu[:-1]]


def _sequence_starts(batch: Batch) -> Tensor:
    """Rows where the packed batch's non-empty sequences start."""
    cu = batch["cu_seqlens"].to(batch["labels"].device).long()
    return cu[:-1][cu[1:] > cu[:-1]]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the module DDP wraps) computes a next-token loss from labels shaped as its input_ids:
    its ``loss_type`` is transformers' "ForCausalLM" (llmcore's DecoderForCausalLM, most of transformers'
    *ForCausalLM) or another name transformers maps to that loss, or it is a transformers model registered for
    causal LM (GPT2LMHeadModel has no loss_type and falls back to that loss); not an encoder-decoder."""
    m = getattr(model, "module", model)
    if getattr(getattr(m, "config", None), "is_encoder_decoder", False):
        return False
    loss_type = getattr(m, "loss_type", None)
    if loss_type == "ForCausalLM":
        return True
    modeling = sys.modules.get("transformers.modeling_utils")  # imported wherever one of its models exists
    if modeling is None or not isinstance(m, modeling.PreTrainedModel):
        return False
    loss_types, classes = _transformers_causal_lm_names()
    return loss_type in loss_types or any(c.__name__ in classes for c in type(m).__mro__)  # FSDP2 subclasses


@functools.lru_cache(maxsize=1)
def _transformers_causal_lm_names() -> tuple[frozenset, frozenset]:
    """(loss_type names transformers maps to ForCausalLMLoss, its causal LM class names); importing its loss
    module takes ~1 s the first time, so only for transformers' models, and once."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return (frozenset(k for k, f in LOSS_MAPPING.items() if f is ForCausalLMLoss),
            frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


def _per_token_labels(batch: Batch) -> bool:
    """Labels shaped as input_ids (one per token) rather than one per sequence; a packed batch whose sequences are
    all one token long reads as one label per sequence."""
    ids, labels, cu = batch["input_ids"], batch["labels"], batch.get("cu_seqlens")
    if labels.shape != ids.shape:
        return False
    return ids.dim() >= 2 or cu is None or labels.numel() != cu.numel() - 1


def _check_task(model: nn.Module, batch: Batch, causal_lm: bool, what: str = "a training batch") -> None:
    """A clear error for a batch without labels (``what`` it is, in the message) or with labels the model's task
    cannot take."""
    if "labels" not in batch:
        raise KeyError(f"{what} needs 'labels'; it has keys {sorted(batch)}")
    labels, ids = batch["labels"], batch["input_ids"]
    # a causal LM's labels are its input_ids' shape, even in a packed batch of one-token sequences (whose count
    # equals the tokens': a classifier's one label per sequence has that shape too)
    per_token = labels.shape == ids.shape if causal_lm else _per_token_labels(batch)
    inner = getattr(model, "module", model)
    if batch.get("cu_seqlens") is not None and is_transformers_model(inner):
        raise ValueError(f"{what} is packed (cu_seqlens), which transformers' {type(inner).__name__} cannot take: "
                         "give it padded batches (finetune's --no-pack, prepare's pack=False)")
    if causal_lm and not per_token:
        raise ValueError(f"{type(getattr(model, 'module', model)).__name__} is a causal LM: its labels must have "
                         f"input_ids' shape {tuple(ids.shape)} (the loss shifts them), got {tuple(labels.shape)}")
    if not causal_lm and per_token and ids.dim() >= 2:
        raise ValueError(f"labels of input_ids' shape {tuple(ids.shape)} (one per token) are trained only as a causal "
                         f"LM, by a model whose loss_type is 'ForCausalLM' (llmcore's DecoderForCausalLM, "
                         f"transformers' *ForCausalLM); {type(getattr(model, 'module', model)).__name__} is not one")


def _model_loss(out) -> Tensor:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and out:
        loss = out[0]
    if not isinstance(loss, Tensor):
        raise ValueError(f"the causal LM returned no loss from its labels (got {type(out).__name__})")
    return loss


@functools.lru_cache(maxsize=None)
def _forward_takes_label_smoothing(cls: type) -> bool:
    try:
        return "label_smoothing" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # no signature to read: assume not
        return False


def causal_lm_loss(model: nn.Module, batch: Batch, labels: Tensor, num_items: Union[int, Tensor],
                   label_smoothing: float = 0.0):
    """(summed next-token loss / ``num_items``, the model's output) of one batch of a causal LM.

    Without label smoothing the model computes it from ``labels`` (transformers' ``num_items_in_batch``
    convention; llmcore's model never makes the logits). With it, a model whose forward takes
    ``label_smoothing`` (llmcore's ``DecoderForCausalLM``) still does; any other (transformers' models, whose
    loss has no smoothing) returns its logits and the loss is torch's smoothed cross-entropy over the shifted
    labels, as transformers' Trainer's ``LabelSmoother`` with ``shift_labels``."""
    if not label_smoothing:
        out = model(**batch, labels=labels, num_items_in_batch=num_items)
        return _model_loss(out), out
    if _forward_takes_label_smoothing(type(getattr(model, "module", model))):
        out = model(**batch, labels=labels, num_items_in_batch=num_items, label_smoothing=label_smoothing)
        return _model_loss(out), out
    out = model(**batch)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    target = next_token_targets(labels, batch.get("cu_seqlens"))
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    return loss / num_items, out


def sample_count(batch: Batch, causal_lm: bool = False) -> int:
    """Examples for throughput: labelled rows (classification), or sequences with a token to predict (causal LM)."""
    if not causal_lm:
        return example_count(batch)
    labels = batch["labels"]
    if labels.dim() >= 2:
        return int((labels[..., 1:] != IGNORE_INDEX).any(-1).sum())
    targets = labels != IGNORE_INDEX
    targets[_sequence_starts(batch)] = False
    return int(_sequences_with_any(targets, batch["cu_seqlens"]).sum())


def loss_sum(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed (not mean) loss of one batch, in fp32. logits (n, C), labels (n,).

    C == 1 is regression (squared error), else cross-entropy skipping ``-100`` labels; ``label_smoothing``
    (transformers' ``label_smoothing_factor``) mixes in the mean over classes of -log p, as transformers'
    ``LabelSmoother`` (the same formula as torch's ``label_smoothing``). Other shapes (a language model's
    (B, L, vocab) logits and per-token labels) get a ValueError naming them: a causal LM computes its own
    loss (``accumulate_gradients``)."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"loss_sum takes sequence classification and regression: logits (examples, classes) "
                         f"and labels (examples,); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
                         + (" (per-token labels: a causal LM, whose loss is the model's)"
                            if logits.dim() == 3 else ""))
    if logits.shape[-1] == 1:
        keep = labels != IGNORE_INDEX
        return F.mse_loss(logits.squeeze(-1).float()[keep], labels.float()[keep], reduction="sum")
    return F.cross_entropy(logits.float(), labels.long(), reduction="sum", ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: Tensor, op=None) -> None:
    """``dist.all_reduce(t, op)`` (default a sum) that returns only once the backend's worker thread has let go of t.

    gloo's worker threads drop a finished collective's tensors after ``wait()`` returns, and dropping
    a tensor Python sees takes the GIL. If the process exits meanwhile, the thread dies inside a
    destructor and the process aborts ("terminate called without an active exception"): after a
    finished run, in 4 of 20 two-rank gloo runs of tests/test_train.py's DDP worker on a 2-core
    machine (torch 2.13, whose DDP keeps the group alive, so destroy_process_group does not join those
    threads; a barrier after the last all-reduce left 1 in 30). The thread's reference shows in t's
    refcount, so waiting here, with the GIL released, until it is gone closes the window (0 in 60).
    Other backends return at once."""
    before = sys.getrefcount(t)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    if dist.get_backend() != "gloo":
        return
    deadline = time.perf_counter() + 5.0
    while sys.getrefcount(t) > before and time.perf_counter() < deadline:
        time.sleep(1e-5)


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch], bf16: bool = False,
                         label_smoothing: float = 0.0) -> tuple[Tensor, int]:
    """Forward + backward over the micro-batches of one optimizer step; return (loss, samples).

    Each micro-batch adds ``sum of its per-example losses / examples in the whole window`` to the
    gradient (summed over all ranks under torch.distributed), so accumulating uneven micro-batches
    gives the gradient of one big batch. A mean of per-micro-batch means would over-weight the small
    ones (transformers #34242). The returned loss is this rank's share of the window's mean loss.
    Classifiers (logits (n, C), labels (n,)): an example is a labelled row, and the loss is computed
    here from the logits. Causal LMs (``is_causal_lm``; labels shaped as input_ids): an example is a
    predicted token, and the model computes the summed loss itself, given the window's token count
    as ``num_items_in_batch`` (transformers' convention), so the logits need never exist whole.
    ``samples``: ``sample_count``'s (rows, or sequences) for throughput.
    ``model``: plain, wrapped in DDP, or sharded by FSDP (``fully_shard``); with DDP or FSDP the ranks
    exchange gradients after the last micro-batch's backward only."""
    _, world = _dist()
    sharded = is_sharded(model)
    device = next(model.parameters()).device
    causal_lm = is_causal_lm(model)
    for b in micro_batches:
        _check_task(model, b, causal_lm)
    examples = sum(example_count(b, causal_lm) for b in micro_batches)
    samples = sum(sample_count(b, True) for b in micro_batches) if causal_lm else examples
    total = examples
    if world > 1:
        t = torch.tensor([examples], dtype=torch.int64, device=device)
        all_reduce(t)
        total = int(t.item())
    denom = max(total, 1)
    loss_acc = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = _to(batch, device)
        labels = batch.pop("labels")
        last = i == len(micro_batches) - 1
        if sharded:  # the gradients stay whole on each rank until the last micro-batch's are reduce-scattered
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            if causal_lm:
                with _autocast(device, bf16):
                    loss = causal_lm_loss(model, batch, labels, denom, label_smoothing)[0].float()
            else:
                with _autocast(device, bf16):
                    logits = model(**batch).logits
                loss = loss_sum(logits, labels, label_smoothing) / denom
            # DDP and FSDP average gradients over ranks; undo that so the result is the global-example mean.
            (loss * world).backward()
        loss_acc += loss.detach()
    return loss_acc, samples


class Accuracy:
    """Streaming accuracy: counts only, never the logits (transformers #12878)."""

    def __init__(self):
        self.correct = 0
        self.total = 0

    def update(self, logits: Tensor, labels: Tensor) -> None:
        keep = labels != IGNORE_INDEX
        self.correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        self.total += int(keep.sum())

    def compute(self) -> dict:
        return {"accuracy": self.correct / max(self.total, 1)}


def macro_f1(true_positive: Tensor, predicted: Tensor, actual: Tensor) -> float:
    """Unweighted mean of per-class F1 = 2 TP / (predicted + actual), over the classes that occur
    among the predictions or the labels; 0.0 when there are none."""
    present = (predicted + actual) > 0
    if not bool(present.any()):
        return 0.0
    f1 = 2 * true_positive[present].double() / (predicted[present] + actual[present]).double()
    return float(f1.mean())


class TextVotes:
    """Scores by text for an evaluation whose rows are windows of longer texts (``--overflow split``): batches carry
    ``text_ids`` (each labelled row's text); a text's class probabilities are the mean of its windows', and
    accuracy and macro-F1 are taken over texts. ``compute`` is a collective under torch.distributed (the windows of
    a text may be on several ranks): every rank calls it."""

    def __init__(self) -> None:
        self.ids, self.probs, self.labels = [], [], []

    def update(self, text_ids: Tensor, logits: Tensor, labels: Tensor) -> None:
        keep = labels != IGNORE_INDEX
        self.ids.append(text_ids.to(labels.device)[keep].long())
        self.probs.append(torch.softmax(logits[keep].double(), -1))
        self.labels.append(labels[keep].long())

    def compute(self, device, world_size: int = 1) -> dict:
        ids = torch.cat(self.ids) if self.ids else torch.zeros(0, dtype=torch.long, device=device)
        size = torch.tensor([int(ids.max()) + 1 if ids.numel() else 0,
                             self.probs[0].shape[-1] if self.probs else 0], dtype=torch.float64, device=device)
        if world_size > 1:
            all_reduce(size, dist.ReduceOp.MAX)
        n, classes = int(size[0]), int(size[1])
        sums = torch.zeros(n, max(classes, 1), dtype=torch.float64, device=device)
        windows = torch.zeros(n, dtype=torch.float64, device=device)
        gold = torch.zeros(n, dtype=torch.float64, device=device)  # label + 1 (0: no window here)
        if ids.numel():
            sums.index_add_(0, ids, torch.cat(self.probs))
            windows.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
            gold.scatter_(0, ids, torch.cat(self.labels).double() + 1)
        if world_size > 1:
            all_reduce(sums)
            all_reduce(windows)
            all_reduce(gold, dist.ReduceOp.MAX)
        seen = windows > 0
        pred, gold = sums[seen].argmax(-1), gold[seen].long() - 1
        texts = int(seen.sum())
        out = {"eval_texts": texts, "eval_text_accuracy": float((pred == gold).double().mean()) if texts else 0.0}
        if classes > 1:
            tp = torch.bincount(gold[pred == gold], minlength=classes)
            out["eval_text_f1"] = macro_f1(tp, torch.bincount(pred, minlength=classes),
                                           torch.bincount(gold, minlength=classes))
        return out


def token_count(batch: Batch) -> int:
    """Real (non-padding) tokens of a batch: the ``attention_mask`` sum, or packed ``input_ids`` (T,)
    less the sequences labelled ``-100`` (one label per sequence), or with no label but ``-100`` (one per
    token): the filler sequences that ``SplitBatches`` adds to round the token count up."""
    ids, cu, labels = batch["input_ids"], batch.get("cu_seqlens"), batch.get("labels")
    if ids.dim() == 1 and cu is not None and labels is not None and labels.numel() == cu.numel() - 1:
        lengths = (cu[1:] - cu[:-1]).to(labels.device)
        return int(lengths[labels != IGNORE_INDEX].sum())
    if ids.dim() == 1 and cu is not None and labels is not None and labels.shape == ids.shape:
        labelled = _sequences_with_any(labels != IGNORE_INDEX, cu)
        return int((cu[1:] - cu[:-1]).to(labels.device)[labelled].sum())
    if ids.dim() == 1 or batch.get("attention_mask") is None:
        return ids.numel()
    return int(batch["attention_mask"].sum())


def _enable_activation_checkpointing(model: nn.Module, kwargs: Optional[dict]) -> None:
    """``model.activation_checkpointing_enable`` (llmcore's models, transformers >= 5), or the older
    ``gradient_checkpointing_enable`` (transformers 4), with TrainConfig's ``activation_checkpointing_kwargs``."""
    kwargs = dict(kwargs or {})
    layers = {k: kwargs.pop(k) for k in LAYER_KEYS if k in kwargs}
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, **layers)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None, **layers)
    else:
        raise ValueError(f"activation_checkpointing=True, but {type(model).__name__} has no "
                         "activation_checkpointing_enable() (llmcore's and transformers' models have)")


def _num_labels(model: nn.Module) -> Optional[int]:
    """The classifier's output count from its config (llmcore's and transformers' name it alike), if it says."""
    n = getattr(getattr(getattr(model, "module", model), "config", None), "num_labels", None)
    return n if isinstance(n, int) else None


def _check_watched_metric(name: Optional[str], causal_lm: bool, eval_batches, num_labels: Optional[int]) -> None:
    """Refuse, before any training, a ``metric_for_best_model`` the built-in evaluation can never report (without
    ``compute_metrics`` its metrics are known; with it, only the first evaluation can tell): a regression
    (``num_labels`` 1) reports no accuracy or F1. Text-level metrics (``--overflow split``) are allowed when the
    evaluation batches may be windows: a factory's batches are not made here to find out."""
    if name is None:
        return
    regression = not causal_lm and num_labels == 1
    known = (["loss", "tokens", "perplexity"] if causal_lm else ["loss", "examples"] if regression
             else ["loss", "examples", "accuracy", "f1"])
    if not causal_lm and not regression and (callable(eval_batches) or getattr(eval_batches, "text_ids", False)):
        known += ["texts", "text_accuracy", "text_f1"]
    known += ["runtime", "samples_per_second", "steps_per_second"]  # (every evaluation's, as transformers')
    bare = name[len("eval_"):] if name.startswith("eval_") else name
    if bare not in known:
        task = "a causal LM" if causal_lm else "a regression" if regression else "a classifier"
        raise ValueError(f"metric_for_best_model={name!r}: the evaluation of {task} reports "
                         f"{', '.join(known)} (eval_ prefix optional); pass compute_metrics for others")


def _one_shot(batches) -> bool:
    """True for an iterator (a generator, ``iter(list)``, a ``map``): it is its own iterator, so a second pass
    finds it spent."""
    try:
        return iter(batches) is batches
    except TypeError:
        return False


class Trainer:
    """A lean fine-tuning loop over in-memory batches.

    ``train_batches(epoch)`` returns an iterable of dicts that ``model(**batch)`` accepts, plus
    ``labels`` (n,): padded ``input_ids`` (B, L) with ``attention_mask``, or packed ``input_ids`` (T,)
    with int32 ``cu_seqlens`` (n+1,). A causal LM (``is_causal_lm``: llmcore's DecoderForCausalLM,
    transformers' *ForCausalLM) takes labels shaped as ``input_ids`` instead (-100: not predicted),
    and computes its loss itself (``accumulate_gradients``). Shuffling is the caller's and must depend only on
    (seed, epoch) -- not on the global RNG -- so a resumed run can skip the consumed batches and see
    the same ones as an uninterrupted run. A non-callable iterable is reused for every epoch; a one-shot iterator
    (a generator: ``max_steps`` then sets the run's length) is read once, and the run stops when it is spent.
    ``eval_batches`` is an iterable or a zero-argument callable returning one.
    ``compute_metrics`` is a zero-argument factory of objects with ``update(logits, labels)`` and
    ``compute() -> dict`` (streaming; values are reported as ``eval_<name>``, tensors and NumPy values as
    Python numbers); they see the rows the loss sees (labels other than ``-100``:
    filler sequences and ignored examples are left out; a causal LM's whole (B, L, vocab) logits and
    unshifted labels), under torch.distributed this rank's only.

    Under torch.distributed the model is wrapped in DDP when training starts, or, with ``config.fsdp``,
    sharded by its layers when the Trainer is made (``llmcore.train.fsdp``; ``self.model`` is then the sharded
    module). Checkpoints and ``save_model`` write whole tensors either way. Every rank must see the same number
    of training batches per epoch; under FSDP every forward is a collective, so ``evaluate`` runs every rank's
    evaluation batches in lockstep (a rank with fewer repeats one, uncounted).

    >>> trainer = Trainer(model, TrainConfig("out"), lambda epoch: batches)  # doctest: +SKIP
    >>> trainer.train()["global_step"]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_batches: Union[BatchFactory, Iterable[Batch]],
                 eval_batches=None, compute_metrics: Optional[Callable[[], object]] = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config.eval_strategy != "no" and eval_batches is None:
            raise ValueError(f"eval_strategy={config.eval_strategy!r} needs eval_batches")
        if eval_batches is not None and not callable(eval_batches) and _one_shot(eval_batches):
            raise TypeError(f"eval_batches is a one-shot iterator ({type(eval_batches).__name__}): every evaluation "
                            "after the first would see no batches (a NaN loss); pass a list or another re-iterable, "
                            "or a zero-argument callable that returns the batches")
        if (eval_batches is not None and not callable(eval_batches) and _len_or_none(eval_batches) == 0
                and _dist()[1] == 1):  # (under torch.distributed a rank may get none of a small split's rows)
            raise ValueError("eval_batches is empty: give evaluation batches, or none (eval_strategy 'no')")
        if eval_batches is not None and compute_metrics is None:
            _check_watched_metric(config.metric_for_best_model, is_causal_lm(model), eval_batches, _num_labels(model))
        wrapped = model
        if isinstance(model, nn.parallel.DistributedDataParallel):  # (steps go through it; saves and calls of the
            model = model.module                                     # model's own methods to the module)
        self.rank, self.world_size = _dist()
        inner = getattr(model, "module", model)
        if config.save_strategy != "no" and hasattr(model, "_orig_mod"):  # (torch.compile's wrapper)
            raise TypeError(f"save_strategy={config.save_strategy!r}: a torch.compile(model) wrapper saves under "
                            "'_orig_mod.' names; compile the model in place (model.compile()), or save_strategy='no'")
        if config.save_strategy != "no" and not (is_transformers_model(inner) or isinstance(
                getattr(inner, "config", None), (EncoderConfig, DecoderConfig))):
            # (checked before training: the first checkpoint failed mid-run, reading the model's config)
            raise TypeError(f"save_strategy={config.save_strategy!r} writes checkpoints of llmcore's or transformers' "
                            f"models (config.json + safetensors), not of a {type(inner).__name__}: pass "
                            "save_strategy='no', and save its state_dict yourself")
        to_shard = config.fsdp and not is_sharded(model)
        if to_shard:
            check_process_group(config.fsdp)
        if config.activation_checkpointing:  # (after the refusals: a refused Trainer leaves the model as it was)
            _enable_activation_checkpointing(model, config.activation_checkpointing_kwargs)
        if to_shard:
            shard(model, config.fsdp, bf16=config.bf16)
        self.model = model
        self.config = config
        self.train_batches = train_batches if callable(train_batches) else (lambda epoch: train_batches)
        # (a generator's type name, else None: it is spent after one pass)
        self._train_one_shot = type(train_batches).__name__ if not callable(train_batches) and _one_shot(
            train_batches) else None
        self.eval_batches = eval_batches
        self.compute_metrics = compute_metrics
        self.device = next(model.parameters()).device
        self.log_history: list[dict] = []
        self.global_step = 0
        self.optimizer = None
        self.scheduler = None
        # metric_for_best_model's best value at a checkpoint, and that checkpoint's folder
        self.best_metric: Optional[float] = None
        self.best_model_checkpoint: Optional[str] = None
        self._last_eval: Optional[tuple] = None  # (global_step, metrics) of the latest evaluate()
        # early_stopping_patience: the best watched metric of the evaluations so far, and how many evaluations in
        # a row did not improve on it (transformers' EarlyStoppingCallback state)
        self._eval_best: Optional[float] = None
        self._patience_counter = 0
        self.reporter: Optional[Reporter] = None
        self._logged = False  # whether this Trainer has made a Reporter (logged into its logging folder) yet
        self._trained = False  # whether train() ran (a second one is a new run)
        self._resumed_step: Optional[int] = None  # the next Reporter drops the log records after it (then None)
        self._wrapped = wrapped
        # while training: parameters stepped outside torch's AdamW (row-sparse embedding tables,
        # linear weights with bf16 copies), same update
        self._steppers: list = []
        # torch.optim.Optimizer's first construction imports torch._dynamo (1.2 s of a 13 s MiniLM
        # epoch here, measured with cProfile): importing it while the Trainer is built, as
        # transformers' Trainer does, keeps that one-time cost out of train().
        import torch._dynamo  # noqa: F401

    # -- logging ---------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append to the history; rank 0 prints it and writes it to ``<logging_dir>/train_log.jsonl``
        (and TensorBoard, per ``report_to``)."""
        self.log_history.append(record)
        self._reporter().log(record)

    def _reporter(self) -> Reporter:
        """The Reporter, made at the first record. The first one of a Trainer that does not continue its
        output_dir's run (``_continues_own_run``) sets an earlier run's log in its own logging folder aside first
        (``set_aside_earlier_logs``): each Trainer's run logs apart, as transformers' per-run folders."""
        if self.reporter is None:
            cfg = self.config
            # a resumed run drops the interrupted run's later records only from a logging folder of its own (inside
            # output_dir): one shared by several runs holds other runs' records of those steps
            own = inside_folder(cfg.logging_dir, cfg.output_dir)
            if own and not self._logged and self.rank == 0 and not self._continues_own_run():
                set_aside_earlier_logs(cfg.logging_dir)
            self._logged = True
            self.reporter = Reporter(cfg.logging_dir, cfg.report_to, cfg.disable_tqdm, active=self.rank == 0,
                                     resumed_step=self._resumed_step if own else None)
            self._resumed_step = None
        return self.reporter

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss, accuracy and macro-F1 over ``eval_batches`` (+ ``compute_metrics``), reduced
        over ranks. Streaming: only per-class counts are kept, never the logits (transformers #12878).
        Macro-F1 averages the classes that occur among the labels or the predictions, as
        scikit-learn's ``f1_score(average="macro")`` does. A causal LM (``is_causal_lm``) reports
        eval_loss (the mean over predicted tokens), eval_tokens and eval_perplexity (exp of the loss). Both also give
        transformers' eval_runtime (seconds, this rank's), eval_samples_per_second (``sample_count``'s rows of all
        ranks) and eval_steps_per_second (batches per rank). Evaluation
        batches whose rows are windows of longer texts (a ``SplitBatches`` with ``text_ids``: ``--overflow split``)
        also give eval_texts, eval_text_accuracy and eval_text_f1, by text (``TextVotes``)."""
        if self.eval_batches is None:
            raise ValueError("evaluate() needs eval_batches")
        self._flush_steppers()
        model = self.model
        causal_lm = is_causal_lm(model)
        was_training = model.training
        model.eval()
        t_start = time.perf_counter()
        try:
            batches = self.eval_batches() if callable(self.eval_batches) else self.eval_batches
            # loss, examples (tokens of a causal LM), samples (rows; sample_count's sequences), batches
            sums = torch.zeros(4, dtype=torch.float64, device=self.device)
            counts = None  # (3, C): true positives, predicted, actual per class
            custom = self.compute_metrics() if self.compute_metrics is not None else None
            # windows of longer texts: every rank must know (a collective at the end), so it is the batches' flag
            votes = TextVotes() if getattr(batches, "text_ids", False) and not causal_lm else None
            stream = ((b, True) for b in batches)
            if self.world_size > 1 and is_sharded(model):
                stream = _in_lockstep(batches, self.device)
            # One autocast region for the whole pass: autocast then casts each weight once, not once per
            # batch (a 28-batch bf16 MiniLM evaluation measured 1.52 -> 1.16 s); metrics run outside it.
            with _autocast(self.device, self.config.bf16):
                for batch, counted in stream:
                    batch = _to(batch, self.device)
                    text_ids = batch.pop("text_ids", None)
                    _check_task(model, batch, causal_lm, "an evaluation batch")
                    if counted:
                        sums[2] += sample_count(batch, causal_lm)
                        sums[3] += 1
                    if causal_lm:
                        self._count_lm(model, batch, sums, custom, counted, self.config.label_smoothing_factor)
                        continue
                    labels = batch.pop("labels")
                    logits = model(**batch).logits
                    if counted:
                        with _autocast(self.device, False):
                            counts = self._count(logits, labels, sums, counts, custom)
                            if votes is not None and text_ids is not None:
                                votes.update(text_ids, logits.float(), labels)
            if self.world_size > 1:
                all_reduce(sums)
                if not causal_lm:  # every rank, also one without evaluation rows (it has no counts of its own)
                    counts = _reduce_counts(counts, self.device)
        finally:  # an error leaves the mode as it was
            model.train(was_training)
            if is_sharded(model):
                reshard(model)  # forwards without a backward leave parameters gathered (shard_grad_op)
        runtime = max(time.perf_counter() - t_start, 1e-9)
        n = float(sums[1])  # none (every label ignored): NaN metrics, as transformers' loss, not a perfect 0
        out = {"eval_loss": float(sums[0]) / n if n else math.nan,
               ("eval_tokens" if causal_lm else "eval_examples"): int(sums[1]),
               # transformers' speed metrics: this rank's wall time; all ranks' samples, batches per rank
               "eval_runtime": runtime, "eval_samples_per_second": float(sums[2]) / runtime,
               "eval_steps_per_second": float(sums[3]) / self.world_size / runtime}
        if causal_lm:
            loss = out["eval_loss"]
            out["eval_perplexity"] = math.exp(loss) if loss < 709.0 else math.inf if loss > 0 else math.nan
        if counts is not None:
            out["eval_accuracy"] = float(counts[0].sum()) / n if n else math.nan
            out["eval_f1"] = macro_f1(counts[0], counts[1], counts[2]) if n else math.nan
        if votes is not None:
            out.update(votes.compute(self.device, self.world_size))
        if custom is not None:
            out.update({k if k.startswith("eval_") else f"eval_{k}": _plain(v) for k, v in custom.compute().items()})
        self._last_eval = (self.global_step, out)
        return out

    def _count_lm(self, model: nn.Module, batch: Batch, sums: Tensor, custom, counted: bool,
                  label_smoothing: float) -> None:
        """One causal LM batch: its summed next-token loss (``causal_lm_loss`` with ``num_items=1``: smoothed as
        in training, as transformers' evaluation loss is) and predicted-token count into the running sums;
        ``compute_metrics``' object gets the logits (B, L, vocab) and the labels as given (unshifted), as
        transformers' ``compute_metrics`` does."""
        predicted = example_count(batch, causal_lm=True)
        labels = batch.pop("labels")
        loss, out = causal_lm_loss(model, batch, labels, 1, label_smoothing)
        if not counted:
            return
        sums[0] += loss.double()
        sums[1] += predicted
        if custom is not None:
            with _autocast(self.device, False):
                custom.update(out.logits.float(), labels)

    def _count(self, logits: Tensor, labels: Tensor, sums: Tensor, counts: Optional[Tensor],
               custom) -> Optional[Tensor]:
        """Add one batch to the running loss/example sums and per-class counts (returned: created
        on the first batch of a classification task), and to ``compute_metrics``' object."""
        keep = labels != IGNORE_INDEX
        sums[0] += loss_sum(logits, labels, self.config.label_smoothing_factor).double()
        sums[1] += keep.sum()
        num_classes = logits.shape[-1]
        if num_classes > 1:
            pred, gold = logits.argmax(-1)[keep], labels[keep].long()
            if counts is None:
                counts = torch.zeros(3, num_classes, dtype=torch.float64, device=self.device)
            counts[0] += torch.bincount(gold[pred == gold], minlength=num_classes).double()
            counts[1] += torch.bincount(pred, minlength=num_classes).double()
            counts[2] += torch.bincount(gold, minlength=num_classes).double()
        if custom is not None:
            if logits.shape[0] == labels.shape[0]:  # one label per row: only the labelled rows
                logits, labels = logits[keep], labels[keep]
            custom.update(logits.float(), labels)
        return counts

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, epoch: int, batches_in_epoch: int) -> str:
        """Write ``checkpoint-<global_step>`` atomically; resume restarts at (epoch, batches_in_epoch).

        Every file goes into a hidden ``.checkpoint-<step>.partial`` folder first (rank 0 the model,
        optimizer, scheduler and state; each rank its RNG) and rank 0 renames it into place once all
        ranks are done, so a run killed at any moment leaves either a complete checkpoint or none."""
        self._flush_steppers()
        path = os.path.join(self.config.output_dir, f"{PREFIX}{self.global_step}")
        self._track_best(path)
        partial = partial_path(path)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        self._barrier()
        state = {"global_step": self.global_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                 "world_size": self.world_size, "config": self.config.to_dict(), **self._progress()}
        try:
            save_checkpoint(partial, self.model, self.optimizer, self.scheduler, state, rank=self.rank,
                            write_shared=self.rank == 0, sharded=self.config.sharded_checkpoints)
        except BaseException as e:
            # a write that failed (a full disk): OSError, torch.save's writer (a RuntimeError naming no file), DCP's
            # CheckpointException (a BaseException); anything else (a peer gone, a bug) as it is
            written = isinstance(e, OSError) or type(e).__name__ == "CheckpointException" or (
                type(e) is RuntimeError and ("PytorchStreamWriter" in str(e) or "inline_container" in str(e)))
            if not written:
                raise
            if self.world_size == 1:
                shutil.rmtree(partial, ignore_errors=True)
            free = shutil.disk_usage(self.config.output_dir).free / 2**20
            raise OSError(f"writing checkpoint {path!r} failed with {free:.0f} MiB free on its disk "
                          f"(a full disk?): {e}") from e
        self._barrier()
        if self.rank == 0:
            publish_checkpoint(partial, path)
            rotate_checkpoints(self.config.output_dir, self.config.save_total_limit, keep=self.best_model_checkpoint)
        self._barrier()  # (the other ranks may read it next: load_best_model_at_end of this, the last, checkpoint)
        return path

    def _progress(self) -> dict:
        """What a checkpoint's state holds of the run so far beyond its position: the log, the best model, early
        stopping's count."""
        return {"log_history": self.log_history, "best_metric": self.best_metric,
                "best_model_checkpoint": self.best_model_checkpoint,
                "early_stopping": {"best": self._eval_best, "patience_counter": self._patience_counter}}

    def _track_best(self, path: str) -> None:
        """With ``metric_for_best_model``: when this step was evaluated, compare its metric with the best so far
        and make ``path`` (the checkpoint being written) the best one if it is better (strictly)."""
        evaluated_now = self._last_eval is not None and self._last_eval[0] == self.global_step
        if self.config.metric_for_best_model is None or not evaluated_now:
            return
        value = self._watched(self._last_eval[1])
        if self._improves(value, self.best_metric):
            self.best_metric, self.best_model_checkpoint = value, path

    def _watched(self, metrics: dict) -> float:
        """metric_for_best_model's value in an evaluation's metrics (``eval_`` prefix optional). Under
        torch.distributed rank 0's value, so that every rank makes the same best-checkpoint and early-stopping
        choices (``compute_metrics`` sees only its own rank's rows); a collective then."""
        name = self.config.metric_for_best_model
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise ValueError(f"metric_for_best_model={name!r}: the evaluation has no {key!r}; it has "
                             f"{sorted(metrics)}")
        value = float(metrics[key])
        if self.world_size > 1:
            shared = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, 0)
            value = float(shared.item())
        return value

    def _improves(self, value: float, best: Optional[float], by: float = 0.0) -> bool:
        """Whether ``value`` beats ``best`` (None: nothing yet) strictly, per greater_is_better, by more than ``by``."""
        if best is None:
            return True
        better = value > best if self.config.greater_is_better else value < best
        return better and abs(value - best) > by

    def _evaluate_in_training(self, just_saved: bool = False, **record) -> bool:
        """An evaluation the loop makes: ``evaluate()``, logged after ``record``; True when early stopping ends the
        run there. ``just_saved``: this step's checkpoint was written before this evaluation (steps saving, epoch
        evaluation, at an epoch's last step): it is compared for the best model now (transformers names the
        checkpoint of the step it evaluates), its trainer_state.json told, and the rotation done again."""
        metrics = self.evaluate()
        self.log({"step": self.global_step, **record, **metrics})
        stop = self._early_stop(metrics)
        if just_saved:  # (the state as a checkpoint written after this evaluation would hold it: a resume continues)
            path = os.path.join(self.config.output_dir, f"{PREFIX}{self.global_step}")
            before = self.best_model_checkpoint
            if self.config.metric_for_best_model is not None:
                self._track_best(path)
            if self.rank == 0:
                update_state(path, **self._progress())
                if self.best_model_checkpoint != before:
                    rotate_checkpoints(self.config.output_dir, self.config.save_total_limit,
                                       keep=self.best_model_checkpoint)
            self._barrier()
        return stop

    def _early_stop(self, metrics: dict) -> bool:
        """transformers' EarlyStoppingCallback.on_evaluate: True once ``early_stopping_patience`` evaluations in a
        row did not beat the best of the evaluations before them by more than ``early_stopping_threshold`` (that
        best is transformers 5's TrainerState.best_metric, updated at every evaluation); the ranks agree, as they
        watch rank 0's value (``_watched``)."""
        cfg = self.config
        if cfg.early_stopping_patience is None:
            return False
        value = self._watched(metrics)
        if self._improves(value, self._eval_best, cfg.early_stopping_threshold):
            self._patience_counter = 0
        else:
            self._patience_counter += 1
        if self._improves(value, self._eval_best):
            self._eval_best = value
        stop = self._patience_counter >= cfg.early_stopping_patience
        if stop:
            n = self._patience_counter
            self.log({"step": self.global_step, "early_stopping": f"{cfg.metric_for_best_model} did not improve on "
                      f"{self._eval_best} by more than {cfg.early_stopping_threshold} for {n} evaluation"
                      f"{'s' if n > 1 else ''} in a row"})
        return stop

    def save_model(self, path: str) -> None:
        """Write the model (``config.json`` + ``model.safetensors``, transformers' names) to ``path`` from rank 0.
        Under FSDP every rank must call it: the whole tensors are gathered from the shards."""
        self._flush_steppers()
        state = full_model_state(self.model) if is_sharded(self.model) else None
        if self.rank == 0:
            save_pretrained(self.model, path, state)

    def _flush_steppers(self) -> None:
        for t in self._steppers:
            t.flush()

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _continues_own_run(self) -> bool:
        """Whether resume_from_checkpoint continues the run in this output_dir (``resumes_here``)."""
        return resumes_here(self.config.resume_from_checkpoint, self.config.output_dir)

    def _resume_path(self) -> Optional[str]:
        r = self.config.resume_from_checkpoint
        if isinstance(r, (str, os.PathLike)):  # (a checkpoint an interrupted save moved aside is put back)
            restore_interrupted_swaps(os.path.dirname(os.path.normpath(os.fspath(r))) or ".")
        if r is True:
            return require_latest_checkpoint(self.config.output_dir)
        return r

    def _resumed_best(self, recorded: Optional[str]) -> Optional[str]:
        """The best checkpoint a resumed state names, as a folder of this run's output_dir: the state spells
        it as the first run's output_dir was spelled, which a moved folder or another working directory
        no longer finds (rotation then removed the real one). Gone altogether: said, and forgotten (as
        transformers)."""
        if recorded is None:
            return None
        here = os.path.join(self.config.output_dir, os.path.basename(os.path.normpath(recorded)))
        if os.path.isdir(here):
            return here
        if os.path.isdir(recorded):
            return recorded
        if self.rank == 0:
            print(f"llmcore: the best checkpoint the resumed state names, {recorded!r}, no longer exists; "
                  "this run forgets it", file=sys.stderr)
        return None

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the configured epochs/steps. Returns global_step, epoch, train_loss (mean over this
        run's steps), train_runtime, train_samples_per_second, train_steps_per_second, train_tokens_per_second
        (``sample_count``'s examples, and real tokens, of all ranks) and peak_memory_mb (this rank's; see
        ``peak_memory_mb``). All but peak_memory_mb (and best_metric, best_model_checkpoint) are also the run's
        last log record, as transformers' Trainer logs them at the end of its train()."""
        cfg = self.config
        resume = self._resume_path()
        if not resume:
            seed_everything(cfg.seed)
            # a new run (a second train() too, as transformers' starts over): its own step count, log and best model
            self.global_step, self.log_history = 0, []
            self.best_metric = self.best_model_checkpoint = self._eval_best = self._last_eval = None
            self._patience_counter = 0
            if self._trained:  # (an earlier train() of this Trainer: its log is set aside as another run's)
                self._logged = False
        self._trained = True
        n_batches = _len_or_none(self.train_batches(0))
        if self.world_size > 1 and n_batches is not None:
            _check_same_batch_counts(n_batches, self.device)
        accum = cfg.gradient_accumulation_steps
        steps_per_epoch = math.ceil(n_batches / accum) if n_batches is not None else None
        total = cfg.total_steps(steps_per_epoch)
        log_every, eval_every, save_every = (cfg.every(n, total) for n in ("logging_steps", "eval_steps",
                                                                          "save_steps"))
        if (cfg.load_best_model_at_end and cfg.save_strategy == "steps" and isinstance(cfg.save_steps, float)
                and save_every % eval_every):
            raise ValueError(f"load_best_model_at_end: save_steps={cfg.save_steps} and eval_steps={cfg.eval_steps} "
                             f"of this run's {total} steps are every {save_every} and {eval_every} steps, so a "
                             "checkpoint would have no evaluation: make save_steps a multiple of eval_steps")
        self.optimizer = make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay,
                                        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        warmup = cfg.num_warmup_steps(total)
        self.scheduler = make_schedule(self.optimizer, cfg.lr_scheduler_type, warmup, total)
        if self.rank == 0 and cfg.lr_scheduler_type != "constant" and warmup >= total > 0:
            print(f"llmcore: the warmup ({warmup} steps) is not shorter than the run ({total} steps): the learning "
                  f"rate peaks at {100 * (total - 1) / warmup:.3g}% of learning_rate={cfg.learning_rate:g}, at the "
                  f"last step", file=sys.stderr)
        epoch, skip = 0, 0
        if resume:
            state = load_checkpoint(resume, self.model, self.optimizer, self.scheduler, rank=self.rank)
            self.global_step, epoch, skip = state["global_step"], state["epoch"], state["batches_in_epoch"]
            self.log_history = list(state.get("log_history", []))
            self.best_metric = state.get("best_metric")
            self.best_model_checkpoint = self._resumed_best(state.get("best_model_checkpoint"))
            stopping = state.get("early_stopping") or {}
            self._eval_best, self._patience_counter = stopping.get("best"), stopping.get("patience_counter", 0)
            # (the log's later records are dropped only when this continues the run whose log it is)
            self._resumed_step = self.global_step if self._continues_own_run() else None
            # (only a run that writes checkpoints mixes trajectories: one that saves none leaves the folder the run
            # it resumed)
            if self._resumed_step is not None and cfg.save_strategy != "no":
                if self.rank == 0:
                    moved = set_aside_later_checkpoints(cfg.output_dir, self.global_step)
                    if moved:
                        print(f"llmcore: resuming at step {self.global_step}: the checkpoints past it, of the run "
                              f"this one restarts (and its final model), are moved to {moved!r}", file=sys.stderr)
                self._barrier()
            if self.rank == 0:
                _note_changed_batching(state.get("config"), state.get("world_size"), cfg, self.world_size, resume)
            if self.reporter is not None:  # (made by an evaluate() before train: again, at the resumed step)
                self.reporter.close()
                self.reporter = None
        sharded = is_sharded(self.model)
        if (self.world_size > 1 and not sharded
                and not isinstance(self._wrapped, nn.parallel.DistributedDataParallel)):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._steppers = [] if sharded else (LazyRowAdamW.attach(self.model, self.optimizer, self.world_size)
                                             + Bf16Weights.attach(self.model, self.optimizer, self.world_size,
                                                                  bf16=cfg.bf16 and self.device.type == "cpu"))
        self.model.train()
        reporter = self._reporter()
        reporter.start(total, self.global_step)

        start_step, t_start = self.global_step, time.perf_counter()
        run_loss = torch.zeros((), device=self.device)
        win_loss, win_steps, win_examples, t_win = torch.zeros((), device=self.device), 0, 0, t_start
        run_examples = run_tokens = 0
        consumed = skip  # (a resumed run that is already done still ends where its checkpoint stood)
        saved_step, stopped = None, False

        def log_window() -> None:  # the loss window's record (its mean loss over the ranks), and a new window
            nonlocal win_steps, win_examples, t_win
            if self.world_size > 1:
                all_reduce(win_loss)  # each rank holds its share of the mean
                counted = torch.tensor([win_examples], device=self.device)
                all_reduce(counted)
                win_examples = int(counted.item())
            now = time.perf_counter()
            # transformers' names (its TensorBoard tags train/learning_rate, train/grad_norm)
            self.log({"step": self.global_step, "epoch": round(_epoch_float(epoch, consumed, n_batches), 4),
                      "loss": float(win_loss) / win_steps, "learning_rate": lr, "grad_norm": float(grad_norm),
                      "samples_per_second": win_examples / max(now - t_win, 1e-9)})
            win_loss.zero_()
            win_steps, win_examples, t_win = 0, 0, now

        try:
            while self.global_step < total and not stopped:
                it = iter(self.train_batches(epoch))
                consumed = sum(1 for _ in islice(it, skip))
                skip, exhausted = 0, False
                while self.global_step < total:
                    window = list(islice(it, accum))
                    if not window:
                        exhausted = True
                        break
                    consumed += len(window)
                    lr = self.scheduler.get_last_lr()[0]
                    run_tokens += sum(token_count(b) for b in window)
                    loss, examples = accumulate_gradients(self._wrapped, window, cfg.bf16, cfg.label_smoothing_factor)
                    grad_norm = clip_and_step(self.optimizer, self._params, cfg.max_grad_norm, self._steppers)
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.global_step += 1
                    win_loss += loss
                    run_loss += loss
                    win_steps += 1
                    win_examples += examples
                    run_examples += examples
                    reporter.step(run_examples * self.world_size / max(time.perf_counter() - t_start, 1e-9))
                    at_epoch_end = n_batches is not None and consumed >= n_batches
                    if self.global_step % log_every == 0 or self.global_step == total:
                        log_window()
                    # (the last step too when off the grid, as transformers' DefaultFlowCallback: its checkpoint
                    # is then compared for the best model like the others)
                    if cfg.eval_strategy == "steps" and (self.global_step % eval_every == 0
                                                         or self.global_step == total):
                        stopped = self._evaluate_in_training(epoch=round(_epoch_float(epoch, consumed, n_batches),
                                                                         4))
                        if stopped and win_steps:  # (an early stop off the logging grid: its last steps' loss)
                            log_window()
                    if cfg.save_strategy == "steps" and self.global_step % save_every == 0:
                        # A checkpoint taken at the very end of an epoch resumes at the start of the next.
                        self.save(epoch + 1, 0) if at_epoch_end else self.save(epoch, consumed)
                        saved_step = self.global_step
                    if stopped:
                        break
                if consumed == 0 and self._train_one_shot and self.global_step > start_step:
                    # A generator is spent after one pass: the run stops here, as transformers' Trainer stops when
                    # an epoch of its data yields nothing (it trained a whole pass, then failed: a probe).
                    if self.rank == 0:
                        print(f"llmcore: train_batches is a one-shot iterator ({self._train_one_shot}), spent "
                              f"after its first pass: training stops at step {self.global_step} of {total}; pass "
                              "a list, or a callable epoch -> batches, to train further")
                    stopped = True
                    break
                if consumed == 0:
                    spent = f": a one-shot iterator ({self._train_one_shot}) is spent after one pass; pass a list, " \
                        "or a callable epoch -> batches" if self._train_one_shot else ""
                    raise ValueError(f"train_batches({epoch}) yielded no batches{spent}")
                if stopped:
                    break
                if exhausted or (n_batches is not None and consumed >= n_batches):
                    if cfg.eval_strategy == "epoch":
                        stopped = self._evaluate_in_training(saved_step == self.global_step, epoch=epoch + 1)
                        if stopped and win_steps:  # (as the steps strategy's early stop)
                            log_window()
                    if cfg.save_strategy == "epoch":
                        self.save(epoch + 1, 0)
                        saved_step = self.global_step
                    epoch, consumed = epoch + 1, 0
                elif cfg.eval_strategy == "epoch" and self.global_step >= total:
                    # max_steps ended the run inside an epoch: transformers ends that epoch with its evaluation
                    self._evaluate_in_training(saved_step == self.global_step,
                                               epoch=round(_epoch_float(epoch, consumed, n_batches), 4))
            if (cfg.save_strategy != "no" and self.global_step > start_step and saved_step != self.global_step
                    and not (stopped and self.global_step < total)):
                # Training stopped between save points (max_steps mid-epoch, or off the save_steps grid):
                # a last checkpoint, as transformers' Trainer writes, so the run can be resumed or extended (not
                # after an early stop before the last step, where transformers writes none).
                self.save(epoch, consumed)
        except BaseException:
            reporter.close()  # (else closed after the run's summary record)
            self.reporter = None
            raise
        finally:
            for t in self._steppers:
                t.detach()
            self._steppers = []
        try:
            if cfg.load_best_model_at_end and self.best_model_checkpoint is not None:
                load_model_weights(self.best_model_checkpoint, self.model)
            if cfg.save_total_limit == 1 and self.best_model_checkpoint is not None:
                self._barrier()  # (every rank has loaded the best one)
                if self.rank == 0:
                    keep_only_best(cfg.output_dir, self.best_model_checkpoint)
            runtime = max(time.perf_counter() - t_start, 1e-9)
            steps = self.global_step - start_step
            counted = torch.tensor([float(run_loss), run_examples, run_tokens], dtype=torch.float64)
            if self.world_size > 1:
                counted = counted.to(self.device)
                all_reduce(counted)
            loss_total, examples_total, tokens_total = counted.tolist()
            summary = {"train_runtime": runtime, "train_samples_per_second": examples_total / runtime,
                       "train_steps_per_second": steps / runtime, "train_tokens_per_second": tokens_total / runtime,
                       "train_loss": loss_total / max(steps, 1)}
            epoch_now = round(_epoch_float(epoch, consumed, n_batches), 4)
            # the run's last record, as transformers' Trainer logs its speed metrics and train_loss
            self.log({"step": self.global_step, "epoch": epoch_now, **summary})
        finally:
            reporter.close()
            self.reporter = None
        best = {"best_metric": self.best_metric, "best_model_checkpoint": self.best_model_checkpoint} \
            if cfg.metric_for_best_model is not None else {}
        return {"global_step": self.global_step, "epoch": epoch_now, **best, **summary,
                "peak_memory_mb": peak_memory_mb(self.device)}


def _in_lockstep(batches, device: torch.device):
    """(batch, counted) pairs: this rank's evaluation batches, then repeats of its first one (not counted) until
    it has run as many forwards as the rank with the most. Under FSDP every forward gathers parameters from all
    ranks, so a rank that stopped early would leave the others waiting. A rank without batches (an evaluation set
    of fewer rows than ranks) repeats the first batch of the lowest rank that has one, sent to it (on the CPU)."""
    if not hasattr(batches, "__len__"):
        batches = list(batches)
    n = len(batches)
    most_fewest = torch.tensor([n, -n], dtype=torch.int64, device=device)
    all_reduce(most_fewest, op=dist.ReduceOp.MAX)
    most, fewest = int(most_fewest[0]), -int(most_fewest[1])
    filler = next(iter(batches)) if n else None
    if fewest == 0 and most > 0:  # (every rank takes part: each knows fewest)
        rank = dist.get_rank()
        src = torch.tensor([rank if n else dist.get_world_size()], dtype=torch.int64, device=device)
        all_reduce(src, op=dist.ReduceOp.MIN)
        box = [_to(filler, torch.device("cpu")) if rank == int(src) else None]
        dist.broadcast_object_list(box, src=int(src))
        filler = filler if n else box[0]
    for batch in batches:
        yield batch, True
    for _ in range(most - n):
        yield filler, False


def _check_same_batch_counts(n_batches: int, device: torch.device) -> None:
    """Every rank must take as many training batches per epoch (DDP's collectives pair them up): a clear error on
    every rank, where unequal counts aborted inside gloo or hung (a collective; every rank calls it)."""
    extremes = torch.tensor([n_batches, -n_batches], dtype=torch.int64, device=device)
    all_reduce(extremes, dist.ReduceOp.MAX)
    most, fewest = int(extremes[0]), -int(extremes[1])
    if most != fewest:
        raise ValueError(f"the ranks have {fewest} to {most} training batches per epoch (this one {n_batches}): "
                         "every rank must have the same number")


def _reduce_counts(counts: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """The (3, C) per-class counts summed over the ranks; a rank that saw no evaluation rows has none, and takes
    C from the others (one collective for C, one for the counts: every rank calls both)."""
    classes = torch.tensor([0 if counts is None else counts.shape[1]], dtype=torch.int64, device=device)
    all_reduce(classes, dist.ReduceOp.MAX)
    if int(classes) == 0:
        return None
    if counts is None:
        counts = torch.zeros(3, int(classes), dtype=torch.float64, device=device)
    all_reduce(counts)
    return counts


def _note_changed_batching(saved: Optional[dict], saved_world: Optional[int], cfg: TrainConfig, world_size: int,
                           path: str) -> None:
    """Says on stderr (as transformers warns) where a resumed run batches differently from the run that wrote
    the checkpoint: its data position counts the old batches, so the run is no longer that run continued. The
    batch compared is the global one, per-device batch x ranks (llmcore finetune's ranks cut global batches, so 2
    ranks of 8 continue as 1 process of 16, exactly), and the accumulation; a checkpoint written before the world
    size was saved is compared per device."""
    if not isinstance(saved, dict):
        return
    changed = []
    name = "per_device_train_batch_size"
    if name in saved:
        if isinstance(saved_world, int):
            if saved[name] * saved_world != getattr(cfg, name) * world_size:
                changed.append(f"a global batch of {getattr(cfg, name)} x {world_size} rank(s) (the checkpoint's "
                               f"run: {saved[name]} x {saved_world})")
        elif saved[name] != getattr(cfg, name):
            changed.append(f"{name}={getattr(cfg, name)} (the checkpoint's run: {saved[name]})")
    name = "gradient_accumulation_steps"
    if name in saved and saved[name] != getattr(cfg, name):
        changed.append(f"{name}={getattr(cfg, name)} (the checkpoint's run: {saved[name]})")
    if changed:
        print(f"llmcore: resuming {path} with {', '.join(changed)}: its data position counts the earlier run's "
              "batches, so this run does not continue that one exactly", file=sys.stderr)


def _plain(value):
    """A metric value as JSON and the logs take it: tensors and NumPy values become Python numbers or lists
    (transformers' ``denumpify_detensorize``)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _len_or_none(batches) -> Optional[int]:
    try:
        return len(batches)
    except TypeError:
        return None


def _epoch_float(epoch: int, consumed: int, n_batches: Optional[int]) -> float:
    return epoch + consumed / n_batches if n_batches else float(epoch)
