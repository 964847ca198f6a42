"""Where the loop's numbers go: JSONL, TensorBoard, a progress bar, and the peak memory figure."""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Optional

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: torch's peak allocation on a CUDA device, else the
    process's peak resident set size (``ru_maxrss``, which on Linux is in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes


class Reporter:
    """Rank 0's log sinks: every record goes to stdout and ``<logging_dir>/train_log.jsonl``, its
    numeric fields to TensorBoard (``train/<name>`` or ``eval/<name>`` at ``step``) when
    ``"tensorboard"`` is in ``report_to``; plus a tqdm progress bar with samples/s and the ETA
    unless ``disable_tqdm``. Other ranks get a silent Reporter (``active=False``). A run resumed at
    ``resumed_step`` drops the records of later steps (the interrupted run's, which the resumed one
    logs again) from the JSONL and, by TensorBoard's ``purge_step``, from TensorBoard."""

    def __init__(self, logging_dir: str, report_to: tuple, disable_tqdm: bool, active: bool = True,
                 resumed_step: Optional[int] = None):
        self.logging_dir = logging_dir
        self.active = active
        self._tb = None
        self._bar = None
        self._disable_tqdm = disable_tqdm
        if not active:
            return
        os.makedirs(logging_dir, exist_ok=True)
        if resumed_step is not None:
            self._drop_records_after(resumed_step)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                raise ImportError("report_to=['tensorboard'] needs the tensorboard package: pip install tensorboard "
                                  "(or pass report_to='none')") from e
            self._tb = SummaryWriter(log_dir=logging_dir,
                                     purge_step=None if resumed_step is None else resumed_step + 1)

    def _drop_records_after(self, step: int) -> None:
        """Rewrites train_log.jsonl without the records of steps after ``step`` (and a line cut short by a kill)."""
        path = os.path.join(self.logging_dir, "train_log.jsonl")
        if not os.path.isfile(path):
            return
        kept = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step):
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def start(self, total_steps: int, done_steps: int) -> None:
        if not self.active or self._disable_tqdm:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True, file=sys.stderr,
                         desc="train")

    def step(self, samples_per_second: float, loss: Optional[float] = None) -> None:
        if self._bar is None:
            return
        post = {"samples/s": f"{samples_per_second:.1f}"}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        line = json.dumps(record)
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)
        with open(os.path.join(self.logging_dir, "train_log.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self._tb is not None and "step" in record:
            prefix = "eval" if any(k.startswith("eval_") for k in record) else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = key.removeprefix("eval_")
                    self._tb.add_scalar(f"{prefix}/{name}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
