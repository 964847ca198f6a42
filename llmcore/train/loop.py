"""The fine-tuning loop: accumulation normalized by real examples, streaming evaluation, exact resume."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from itertools import islice
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llmcore.train.checkpoint import (
    PREFIX,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    seed_everything,
)
from llmcore.train.config import TrainConfig
from llmcore.train.optim import linear_schedule, make_optimizer

IGNORE_INDEX = -100
Batch = dict
BatchFactory = Callable[[int], Iterable[Batch]]


def example_count(batch: Batch) -> int:
    """Labelled examples in a batch: labels that are not ``-100``."""
    if "labels" not in batch:
        raise KeyError(f"a training batch needs 'labels'; it has keys {sorted(batch)}")
    return int((batch["labels"] != IGNORE_INDEX).sum())


def loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed (not mean) loss of one batch, in fp32. logits (n, C), labels (n,).

    C == 1 is regression (squared error), else cross-entropy skipping ``-100`` labels."""
    if logits.shape[-1] == 1:
        keep = labels != IGNORE_INDEX
        return F.mse_loss(logits.squeeze(-1).float()[keep], labels.float()[keep], reduction="sum")
    return F.cross_entropy(logits.float(), labels.long(), reduction="sum", ignore_index=IGNORE_INDEX)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch], bf16: bool = False) -> tuple[Tensor, int]:
    """Forward + backward over the micro-batches of one optimizer step; return (loss, examples).

    Each micro-batch adds ``sum of its per-example losses / examples in the whole window`` to the
    gradient (summed over all ranks under torch.distributed), so accumulating uneven micro-batches
    gives the gradient of one big batch. A mean of per-micro-batch means would over-weight the small
    ones (transformers #34242). The returned loss is this rank's share of the window's mean loss."""
    _, world = _dist()
    device = next(model.parameters()).device
    examples = sum(example_count(b) for b in micro_batches)
    total = examples
    if world > 1:
        t = torch.tensor([examples], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        total = int(t.item())
    denom = max(total, 1)
    loss_acc = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = _to(batch, device)
        labels = batch.pop("labels")
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with _autocast(device, bf16):
                logits = model(**batch).logits
            loss = loss_sum(logits, labels) / denom
            # DDP averages gradients over ranks; undo that so the result is the global-example mean.
            (loss * world).backward()
        loss_acc += loss.detach()
    return loss_acc, examples


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


class Trainer:
    """A lean fine-tuning loop over in-memory batches.

    ``train_batches(epoch)`` returns an iterable of dicts that ``model(**batch)`` accepts, plus
    ``labels`` (n,): padded ``input_ids`` (B, L) with ``attention_mask``, or packed ``input_ids`` (T,)
    with int32 ``cu_seqlens`` (n+1,). Shuffling is the caller's and must depend only on
    (seed, epoch) -- not on the global RNG -- so a resumed run can skip the consumed batches and see
    the same ones as an uninterrupted run. A non-callable iterable is reused for every epoch.
    ``eval_batches`` is an iterable or a zero-argument callable returning one.
    ``compute_metrics`` is a zero-argument factory of objects with ``update(logits, labels)`` and
    ``compute() -> dict`` (streaming); under torch.distributed they see this rank's batches only.

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
        self.model = model
        self.config = config
        self.train_batches = train_batches if callable(train_batches) else (lambda epoch: train_batches)
        self.eval_batches = eval_batches
        self.compute_metrics = compute_metrics
        self.rank, self.world_size = _dist()
        self.device = next(model.parameters()).device
        self.log_history: list[dict] = []
        self.global_step = 0
        self.optimizer = None
        self.scheduler = None
        self._wrapped = model

    # -- logging ---------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append to the history; rank 0 prints it and writes it to ``<logging_dir>/train_log.jsonl``."""
        self.log_history.append(record)
        if self.rank != 0:
            return
        line = json.dumps(record)
        print(line, file=sys.stdout, flush=True)
        os.makedirs(self.config.logging_dir, exist_ok=True)
        with open(os.path.join(self.config.logging_dir, "train_log.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss and accuracy over ``eval_batches`` (+ ``compute_metrics``), reduced over ranks."""
        if self.eval_batches is None:
            raise ValueError("evaluate() needs eval_batches")
        model = self.model
        was_training = model.training
        model.eval()
        batches = self.eval_batches() if callable(self.eval_batches) else self.eval_batches
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, examples
        custom = self.compute_metrics() if self.compute_metrics is not None else None
        classification = False
        for batch in batches:
            batch = _to(batch, self.device)
            labels = batch.pop("labels")
            with _autocast(self.device, self.config.bf16):
                logits = model(**batch).logits
            keep = labels != IGNORE_INDEX
            sums[0] += loss_sum(logits, labels).double()
            classification = logits.shape[-1] > 1
            if classification:
                sums[1] += (logits.argmax(-1)[keep] == labels[keep]).sum()
            sums[2] += keep.sum()
            if custom is not None:
                custom.update(logits.float(), labels)
        if self.world_size > 1:
            dist.all_reduce(sums)
        model.train(was_training)
        n = max(float(sums[2]), 1.0)
        out = {"eval_loss": float(sums[0]) / n, "eval_examples": int(sums[2])}
        if classification:
            out["eval_accuracy"] = float(sums[1]) / n
        if custom is not None:
            out.update({f"eval_{k}": v for k, v in custom.compute().items()})
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, epoch: int, batches_in_epoch: int) -> str:
        """Write ``checkpoint-<global_step>``; resume restarts at (epoch, batches_in_epoch)."""
        path = os.path.join(self.config.output_dir, f"{PREFIX}{self.global_step}")
        state = {"global_step": self.global_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                 "log_history": self.log_history, "config": self.config.to_dict()}
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, state, rank=self.rank,
                        write_shared=self.rank == 0)
        if self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            rotate_checkpoints(self.config.output_dir, self.config.save_total_limit)
        return path

    def _resume_path(self) -> Optional[str]:
        r = self.config.resume_from_checkpoint
        if r is True:
            path = latest_checkpoint(self.config.output_dir)
            if path is None:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {self.config.output_dir!r} has no "
                                        f"{PREFIX}* folder")
            return path
        return r

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the configured epochs/steps; return global_step, train_loss (mean over this run's
        steps), epoch, runtime and samples/s."""
        cfg = self.config
        resume = self._resume_path()
        if not resume:
            seed_everything(cfg.seed)
        n_batches = _len_or_none(self.train_batches(0))
        accum = cfg.gradient_accumulation_steps
        steps_per_epoch = math.ceil(n_batches / accum) if n_batches is not None else None
        total = cfg.total_steps(steps_per_epoch)
        self.optimizer = make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, cfg.num_warmup_steps(total), total)
        epoch, skip = 0, 0
        if resume:
            state = load_checkpoint(resume, self.model, self.optimizer, self.scheduler, rank=self.rank)
            self.global_step, epoch, skip = state["global_step"], state["epoch"], state["batches_in_epoch"]
            self.log_history = list(state.get("log_history", []))
        if self.world_size > 1 and not isinstance(self._wrapped, nn.parallel.DistributedDataParallel):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.model.train()

        start_step, t_start = self.global_step, time.perf_counter()
        run_loss = torch.zeros((), device=self.device)
        win_loss, win_steps, win_examples, t_win = torch.zeros((), device=self.device), 0, 0, t_start
        run_examples = 0
        while self.global_step < total:
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
                loss, examples = accumulate_gradients(self._wrapped, window, cfg.bf16)
                grad_norm = None
                if cfg.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                win_loss += loss
                run_loss += loss
                win_steps += 1
                win_examples += examples
                run_examples += examples
                at_epoch_end = n_batches is not None and consumed >= n_batches
                if self.global_step % cfg.logging_steps == 0 or self.global_step == total:
                    if self.world_size > 1:
                        dist.all_reduce(win_loss)  # each rank holds its share of the mean
                        counted = torch.tensor([win_examples], device=self.device)
                        dist.all_reduce(counted)
                        win_examples = int(counted.item())
                    now = time.perf_counter()
                    self.log({"step": self.global_step, "epoch": round(_epoch_float(epoch, consumed, n_batches), 4),
                              "loss": float(win_loss) / win_steps, "lr": lr,
                              "grad_norm": None if grad_norm is None else float(grad_norm),
                              "samples_per_second": win_examples / max(now - t_win, 1e-9)})
                    win_loss.zero_()
                    win_steps, win_examples, t_win = 0, 0, now
                if cfg.eval_strategy == "steps" and self.global_step % cfg.eval_steps == 0:
                    self.log({"step": self.global_step, **self.evaluate()})
                if cfg.save_strategy == "steps" and self.global_step % cfg.save_steps == 0:
                    # A checkpoint taken at the very end of an epoch resumes at the start of the next.
                    self.save(epoch + 1, 0) if at_epoch_end else self.save(epoch, consumed)
            if consumed == 0:
                raise ValueError(f"train_batches({epoch}) yielded no batches")
            if exhausted or (n_batches is not None and consumed >= n_batches):
                if cfg.eval_strategy == "epoch":
                    self.log({"step": self.global_step, "epoch": epoch + 1, **self.evaluate()})
                if cfg.save_strategy == "epoch":
                    self.save(epoch + 1, 0)
                epoch += 1
        runtime = time.perf_counter() - t_start
        steps = self.global_step - start_step
        if self.world_size > 1:
            dist.all_reduce(run_loss)
        return {"global_step": self.global_step, "epoch": epoch,
                "train_loss": float(run_loss) / max(steps, 1), "train_runtime": runtime,
                "train_samples_per_second": run_examples * self.world_size / max(runtime, 1e-9)}


def _len_or_none(batches) -> Optional[int]:
    try:
        return len(batches)
    except TypeError:
        return None


def _epoch_float(epoch: int, consumed: int, n_batches: Optional[int]) -> float:
    return epoch + consumed / n_batches if n_batches else float(epoch)
