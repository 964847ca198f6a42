"""What a checkpoint of a sharded model costs, whole (FULL_STATE_DICT) or sharded (SHARDED_STATE_DICT): a BERT-large
sized encoder (335M parameters, random weights) under FSDP ``full_shard``, one optimizer step, then the time of
``Trainer.save`` (written and fsynced) and of resuming from it, each with the most resident memory this rank held
meanwhile above what it held before (sampled every 5 ms from /proc/self/statm).

    torchrun --nproc-per-node 2 benchmarks/fsdp_checkpoint.py FULL_STATE_DICT /tmp/ckpt-full
    torchrun --nproc-per-node 2 benchmarks/fsdp_checkpoint.py SHARDED_STATE_DICT /tmp/ckpt-sharded

Writes ~4 GB into the folder given (deleted after). One line per rank.
"""
import json
import os
import shutil
import sys
import threading
import time

import torch
import torch.distributed as dist

from llmcore.models import EncoderConfig, EncoderForSequenceClassification
from llmcore.train import TrainConfig, Trainer

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _Peak:
    """Most resident bytes over a ``with`` block, above those at its start."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.grew_mib = (self.peak - self.start) / 2**20


def _trainer(kind: str, out: str, seed: int, batches, resume=None) -> Trainer:
    torch.manual_seed(seed)
    model = EncoderForSequenceClassification(EncoderConfig(
        vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
        max_position_embeddings=512))
    cfg = TrainConfig(out, max_steps=1, warmup_steps=0, save_strategy="no", report_to="none", disable_tqdm=True,
                      fsdp="full_shard", fsdp_config={"state_dict_type": kind}, resume_from_checkpoint=resume)
    return Trainer(model, cfg, batches)


def main(kind: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    batches = [{"input_ids": torch.randint(1000, 30000, (2, 16), generator=gen),
                "attention_mask": torch.ones(2, 16, dtype=torch.long),
                "labels": torch.randint(0, 2, (2,), generator=gen)}]
    trainer = _trainer(kind, out, 0, batches)
    trainer.train()
    dist.barrier()
    with _Peak() as saving:
        start = time.perf_counter()
        path = trainer.save(epoch=1, batches_in_epoch=0)
        dist.barrier()
        save_s = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    del trainer
    again = _trainer(kind, out + "-resumed", 1, batches, resume=path)
    dist.barrier()
    with _Peak() as resuming:
        start = time.perf_counter()
        again.train()  # loads the checkpoint, then has no step left to take
        dist.barrier()
        resume_s = time.perf_counter() - start
    print(json.dumps({"state_dict_type": kind, "rank": rank, "save_s": round(save_s, 2),
                      "save_rss_growth_mib": round(saving.grew_mib), "resume_s": round(resume_s, 2),
                      "resume_rss_growth_mib": round(resuming.grew_mib), "checkpoint_bytes": size}), flush=True)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + "-resumed", ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
