"""Where the loop's numbers go: JSONL, TensorBoard, a progress bar, and the peak memory figure."""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Optional

import torch

from llmcore._proc import status_kb


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: torch's peak allocation on a CUDA device, else the
    process's peak resident set size: VmHWM on Linux (not ``ru_maxrss``, which a process started by
    vfork + exec, as subprocess starts it, inherits from its parent where the parent's is higher), else
    ``ru_maxrss``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes


def _tag(key: str) -> str:
    """A record key's TensorBoard tag, as transformers' TensorBoardCallback writes it: ``eval_loss`` is
    ``eval/loss``, ``test_accuracy`` ``test/accuracy``, anything else ``train/<key>`` (an evaluation's epoch too)."""
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


def set_aside_earlier_logs(logging_dir: str, prefix: str = "earlier-run", also_free_in: Optional[str] = None
                           ) -> Optional[str]:
    """A new run's own logging folder that holds an earlier run's records (``train_log.jsonl``, TensorBoard event
    files: the Trainer run again into its output_dir) gets them moved into ``earlier-run-<n>/`` there, kept and
    apart, as transformers' runs/<date>_<host> folders keep each run's; the new run's log then holds its records
    only. Returns that folder, or None when there was nothing to move. ``prefix``: the folder's name before
    ``-<n>``; ``also_free_in``: another folder where that name must be free too (files to be moved in later)."""
    if not os.path.isdir(logging_dir):
        return None
    names = [n for n in os.listdir(logging_dir) if n == "train_log.jsonl" or n.startswith("events.out.tfevents.")]
    if "train_log.jsonl" not in names:  # (event files alone may be a user's own writer's, open beside the run)
        return None
    n = 1
    while any(os.path.exists(os.path.join(d, f"{prefix}-{n}")) for d in (logging_dir, also_free_in) if d):
        n += 1
    folder = os.path.join(logging_dir, f"{prefix}-{n}")
    os.makedirs(folder)
    for name in names:
        os.replace(os.path.join(logging_dir, name), os.path.join(folder, name))
    print(f"llmcore: {logging_dir!r} held an earlier run's log, moved into {folder!r} (a new run, not resumed)",
          file=sys.stderr)
    return folder


class Reporter:
    """Rank 0's log sinks: every record goes to stdout and ``<logging_dir>/train_log.jsonl``, its
    numeric fields to TensorBoard (each under ``_tag``'s name, at ``step``) when
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
        """Rewrites train_log.jsonl without the records of steps after ``step``, the summary record a finished run
        logged at ``step`` (``train_runtime``: logged after that step's checkpoint, which a resume continues), and a
        line cut short by a kill."""
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
                at = record.get("step") if isinstance(record, dict) else None
                if not (isinstance(at, int) and (at > step or (at == step and "train_runtime" in record))):
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
            for key, value in record.items():  # (each key's tag as transformers' rewrite_logs names it)
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(_tag(key), value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
