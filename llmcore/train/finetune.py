"""``llmcore finetune``: prepared (or raw) data + a checkpoint folder -> a fine-tuned
sequence classifier, with the knobs of transformers' TrainingArguments."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import torch

from llmcore.train.config import TrainConfig
from llmcore.train.loop import Trainer


def split_batches(split, batch_size: int, pack: bool, seed: int, shuffle: bool):
    """A factory epoch -> list of model inputs (packed with cu_seqlens, or padded with a mask),
    length-bucketed and shuffled by (seed, epoch)."""
    def batches(epoch: int) -> list:
        out = []
        for rows in split.batches(batch_size, seed=seed + epoch, shuffle=shuffle):
            seqs = [split[int(i)] for i in rows]
            labels = torch.as_tensor(np.asarray(split.labels)[rows], dtype=torch.long)
            if pack:
                lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
                cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
                cu[1:] = torch.cumsum(lengths, 0)
                out.append({"input_ids": torch.from_numpy(np.concatenate(seqs)).long(), "cu_seqlens": cu,
                            "labels": labels})
            else:
                width = max(len(s) for s in seqs)
                ids = torch.zeros(len(seqs), width, dtype=torch.long)
                mask = torch.zeros(len(seqs), width, dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, :len(s)] = torch.tensor(s)  # memmap rows are read-only
                    mask[r, :len(s)] = 1
                out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return out
    return batches


def finetune(data: str, model: str, output_dir: str, max_length: int = 128, tokenizer: Optional[str] = None,
             text_column: Optional[str] = None, label_column: Optional[str] = None, **train_args) -> dict:
    """Prepare ``data`` (cached under ``output_dir/data``; a prepared folder is used as is), fine-tune
    the checkpoint in ``model`` for sequence classification, evaluate on the validation and test
    splits, save the final model to ``output_dir/final``. Returns the metrics."""
    from llmcore.data import PreparedDataset, prepare
    from llmcore.models import from_pretrained

    config = TrainConfig(output_dir=output_dir, **train_args)
    if os.path.isfile(os.path.join(data, "meta.json")):
        prepared = PreparedDataset.load(data)
    else:
        prepared = prepare(data, tokenizer or model, max_length, os.path.join(output_dir, "data"),
                           text_column=text_column, label_column=label_column, pack=True, seed=config.seed)
    if "train" not in prepared.splits:
        raise ValueError(f"{data!r} has no train split (splits: {sorted(prepared.splits)})")
    net = from_pretrained(model, task="sequence-classification", num_labels=prepared.num_labels)
    train = split_batches(prepared["train"], config.per_device_train_batch_size, config.pack, config.seed, True)
    evals = {name: split_batches(prepared[name], config.per_device_eval_batch_size, config.pack, 0, False)(0)
             for name in ("validation", "test") if name in prepared.splits
             and prepared[name].labels is not None and int(np.min(prepared[name].labels)) >= 0}
    trainer = Trainer(net, config, train, eval_batches=evals.get("validation"))
    result = trainer.train()
    metrics = {"train": result}
    for name, batches in evals.items():
        trainer.eval_batches = batches
        metrics[name] = trainer.evaluate()
    net.save_pretrained(os.path.join(output_dir, "final"))
    with open(os.path.join(output_dir, "final", "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"metrics": metrics, "config": dataclasses.asdict(config)}, f, indent=2, default=str)
    return metrics
