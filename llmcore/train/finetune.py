"""``llmcore finetune``: prepared (or raw) data + a checkpoint folder -> a fine-tuned
sequence classifier (or, ``task="causal-lm"``, a causal LM trained on the texts), with the knobs of
transformers' TrainingArguments."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Optional

import numpy as np
import torch

from llmcore.ops.dispatch import BackendUnavailableError
from llmcore.train.checkpoint import (
    FINAL,
    inside_folder,
    partial_path,
    publish_checkpoint,
    require_latest_checkpoint,
    restore_interrupted_swaps,
    resumes_here,
)
from llmcore.train.config import TrainConfig
from llmcore.train.fsdp import check_process_group
from llmcore.train.loop import IGNORE_INDEX, Trainer
from llmcore.train.reporting import peak_memory_mb
from llmcore.train.runtime import retain_freed_memory


class SplitBatches:
    """One epoch of model inputs from a prepared split, built lazily as it is iterated (sized, and
    re-iterable: each pass rebuilds the same batches). Packed: ``input_ids`` (T,) + int32
    ``cu_seqlens``; padded: (B, L) + ``attention_mask``; both with ``labels``.

    ``pad_to_multiple_of`` > 1 keeps the batches' shapes on a few sizes: packed, the token count is
    rounded up by filler sequences of token id 0 (label -100, so no loss, metric or gradient sees them:
    attention keeps them to themselves and the heads read only the real sequences' rows), never past the most
    tokens a batch can hold (its rows times the split's longest row); padded, the length (never past the split's
    longest row). Under bf16 autocast on the CPU, every new GEMM
    shape makes oneDNN generate kernels (measured ~30 ms per step on MiniLM, a quarter of the step).

    ``causal_lm``: the labels are the tokens themselves (shaped as input_ids; -100 at padding and
    filler tokens), for next-token training; the split needs no label column. ``pad_id``: the token id of padded
    batches' padding (transformers' decoder classifiers find each row's last token by it). ``text_ids``: for a
    classification split whose rows are windows of longer texts (``overflow="split"``), each batch also carries
    each row's text (``text_ids``, -1 for filler), which ``Trainer.evaluate`` scores by text; the attribute says
    whether the batches carry them."""

    def __init__(self, split, rows: list, pack: bool, pad_to_multiple_of: int = 1, causal_lm: bool = False,
                 pad_id: int = 0, text_ids: bool = False):
        self.split, self.rows, self.pack, self.causal_lm, self.pad_id = split, rows, pack, causal_lm, pad_id
        self.text_ids = bool(text_ids) and not causal_lm and getattr(split, "text_index", None) is not None
        self.labels = None if causal_lm else np.asarray(split.labels)
        self.multiple = int(pad_to_multiple_of)
        if self.multiple < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        # Filler sequences and padded rows stay within the split's longest row, which the model takes.
        self.longest = max(1, int(np.max(split.lengths))) if len(split.lengths) else 1
        # (a multiple past it made every packed batch that long: 1e6 allocated a million filler tokens a step)
        self.capacity = max((len(r) for r in rows), default=1) * self.longest

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        for rows in self.rows:
            yield self.batch(rows)

    def batch(self, rows: np.ndarray) -> dict:
        out = self._inputs(rows)
        if self.text_ids:
            ids = torch.full((len(out["labels"]),), -1, dtype=torch.long)  # filler sequences: no text
            ids[:len(rows)] = torch.as_tensor(np.asarray(self.split.text_index)[rows], dtype=torch.long)
            out["text_ids"] = ids
        return out

    def _inputs(self, rows: np.ndarray) -> dict:
        seqs = [self.split[int(i)] for i in rows]
        labels = None if self.causal_lm else torch.as_tensor(self.labels[rows], dtype=torch.long)
        if self.pack:
            lengths = [len(s) for s in seqs]
            total = sum(lengths)
            filler = max(0, min(-(-total // self.multiple) * self.multiple, self.capacity) - total)
            if filler:
                whole, rest = divmod(filler, self.longest)
                lengths += [self.longest] * whole + [rest] * bool(rest)
                seqs.append(np.zeros(filler, dtype=np.int64))
                if labels is not None:
                    labels = torch.cat([labels, labels.new_full((len(lengths) - len(rows),), IGNORE_INDEX)])
            cu = np.zeros(len(lengths) + 1, dtype=np.int32)
            np.cumsum(lengths, out=cu[1:])
            ids = torch.from_numpy(np.concatenate(seqs).astype(np.int64))
            if labels is None:  # the tokens themselves, the filler's ignored
                labels = ids.clone()
                labels[total:] = IGNORE_INDEX
            return {"input_ids": ids, "cu_seqlens": torch.from_numpy(cu), "labels": labels}
        width = max(len(s) for s in seqs)
        width = max(width, min(-(-width // self.multiple) * self.multiple, self.longest))
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        if labels is None:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_batches(split, batch_size: int, pack: bool, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                  pad_to_multiple_of: int = 1, causal_lm: bool = False, pad_id: int = 0, text_ids: bool = False,
                  accumulation: int = 1):
    """A factory epoch -> ``SplitBatches``: length-bucketed batches shuffled by (seed, epoch).

    ``batch_size`` is per rank: the rows are cut into global batches of ``batch_size * world_size``
    and rank r takes every ``world_size``-th row of each from row r, so one process and N ranks see
    the same global batches. With ``accumulation`` (gradient_accumulation_steps), the rows of an optimizer
    step, ``batch_size * world_size * accumulation``, are drawn as one batch and cut into that many
    global batches, so accumulating trains on the rows one batch that large would (as transformers'
    Trainer); the one short step's rows come last in the epoch (where transformers' last batch is short),
    so every other step is ``accumulation`` global batches, as the loop counts them, and batch 16 and
    batch 4 x accumulation 4 step on the same rows in the same order. A last global batch with fewer
    rows than ranks is dropped (training: every rank must step). ``pad_to_multiple_of``, ``causal_lm``,
    ``pad_id`` and ``text_ids``: see ``SplitBatches``."""
    width = batch_size * world_size

    def batches(epoch: int) -> SplitBatches:
        rows = []
        # (seed, epoch) as one SeedSequence: seed + epoch made epoch 1 of seed 42 epoch 0 of seed 43
        steps = split.batches(width * accumulation, seed=[seed, epoch], shuffle=shuffle)
        steps = sorted(steps, key=lambda step_rows: len(step_rows) < width * accumulation)  # (stable)
        for step_rows in steps:
            for start in range(0, len(step_rows), width):
                global_rows = step_rows[start:start + width]
                if shuffle and len(global_rows) < world_size:
                    continue
                mine = global_rows[rank::world_size]
                if len(mine):
                    rows.append(mine)
        return SplitBatches(split, rows, pack, pad_to_multiple_of, causal_lm, pad_id, text_ids)
    return batches


def transformers_pad_id(net: torch.nn.Module, causal_lm: bool) -> int:
    """The token id to pad a transformers model's batches with: its config's ``pad_token_id``. Without one (or with
    one outside the vocabulary), its ``eos_token_id`` (the first of a list; transformers' recipe for decoders, pad =
    eos), else 0; a classifier's config then gets that id as its ``pad_token_id``, said on stderr. transformers'
    decoder classifiers read each row at its last token that is not the pad id (and refuse batches of several rows
    when there is none): a text ending in the pad id is read one token early, and id 0 is a common last token
    ("!" in GPT-2's, Llama 3's and Qwen2's vocabularies) where eos is not one a text has."""
    cfg = net.config.get_text_config() if hasattr(net.config, "get_text_config") else net.config
    vocab = getattr(cfg, "vocab_size", None)

    def usable(token) -> bool:
        return (isinstance(token, int) and not isinstance(token, bool) and token >= 0
                and (vocab is None or token < vocab))

    pad, eos = getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None)
    if usable(pad):
        return pad
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    fill = eos if usable(eos) else 0
    if not causal_lm:
        cfg.pad_token_id = fill
        print(f"llmcore: {type(net).__name__}'s config names {'no pad token' if pad is None else f'pad {pad!r}'}; "
              f"its batches are padded with {f'its eos id {fill}' if fill == eos else 'id 0'}, now its pad_token_id "
              f"(a text whose last token is id {fill} is then read one token early)", file=sys.stderr)
    return fill


def _copy_tokenizer(source: str, final: str, model: Optional[str] = None) -> None:
    """The files of the tokenizer the data was tokenized with (``--tokenizer``, else the model's) into ``final``:
    a folder's tokenizer files, or a tokenizer.json file. With a file alone, the model folder's
    ``model_max_length`` goes into a tokenizer_config.json beside it (without one, transformers' tokenizer
    loaded from ``final`` has no length limit, and truncation=True left texts longer than the model reads)."""
    from llmcore.hub import checkpoint_folder

    source = checkpoint_folder(os.fspath(source), "tokenizer")
    if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(final, "tokenizer.json"))
        from llmcore.tokenizer._loaders import model_max_length, read_tokenizer_config

        # (a damaged or absent config reads as {}: no limit written, and nothing fails after training)
        limit = model_max_length(read_tokenizer_config(model)) if model is not None and os.path.isdir(model) else None
        if limit is not None:
            with open(os.path.join(final, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"model_max_length": limit}, f, indent=2)
        return
    copied = 0
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(final, name))
            copied += 1
    if not copied:  # (said, not raised: the model is written, and the run's results with it)
        print(f"llmcore finetune: no tokenizer files in {source!r} to copy: {final!r} holds the model only",
              file=sys.stderr)


def _checkpoint_classes(net: torch.nn.Module) -> Optional[list]:
    """The class names of the checkpoint's head by id (its config.json id2label), None where it names none of
    its own (transformers' LABEL_<i> defaults) or not one per output."""
    from llmcore.models.loading import is_transformers_model

    source = net.config.id2label if is_transformers_model(net) else net.config.hf.get("id2label")
    try:
        by_id = {int(i): str(name) for i, name in (source or {}).items()}
    except (TypeError, ValueError, AttributeError):
        return None
    if sorted(by_id) != list(range(net.config.num_labels)) or all(by_id[i] == f"LABEL_{i}" for i in by_id):
        return None
    return [by_id[i] for i in range(len(by_id))]


def _align_head(net: torch.nn.Module, names: list, data: str, quiet: bool) -> None:
    """A trained head whose checkpoint names its classes in another order than the data's (``names``, by id):
    its output rows are put in the data's order, so that class i is still the class its row was trained for (as
    transformers' run_glue maps the data's labels to the checkpoint's label2id, case aside); kept as it was they
    would start training swapped (a probe: accuracy 1.0 -> 0.0 with no training). Other names than the data's
    are said on stderr, and the rows taken as the data's ids in order (run_glue ignores them too)."""
    theirs = _checkpoint_classes(net)
    if theirs is None or len(theirs) != len(names) or "head.out.weight" in getattr(net, "newly_initialized", ()):
        return
    at = {name.lower(): i for i, name in enumerate(theirs)}
    wanted = [str(n).lower() for n in names]
    if len(at) != len(theirs) or sorted(at) != sorted(wanted):
        if not quiet:
            print(f"llmcore: the checkpoint's head names its classes {theirs}, the data's are {list(names)}: its "
                  "outputs are trained as the data's classes by id", file=sys.stderr)
        return
    order = [at[n] for n in wanted]
    if order == list(range(len(order))):
        return
    out = _head_output(net)
    with torch.no_grad():
        index = torch.tensor(order, device=out.weight.device)
        out.weight.copy_(out.weight[index])
        if out.bias is not None:
            out.bias.copy_(out.bias[index])
    if not quiet:
        print(f"llmcore: {data!r}: the checkpoint's head has its classes in the order {theirs}; its rows are put in "
              f"the data's, {list(names)}", file=sys.stderr)


def _head_output(net: torch.nn.Module) -> torch.nn.Linear:
    """The classification head's output projection: llmcore's ``head.out``, else (transformers' classifier,
    classifier.out_proj, score) the last linear layer of one output per class."""
    out = getattr(getattr(net, "head", None), "out", None)
    if isinstance(out, torch.nn.Linear):
        return out
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1:]
    if not last or last[0].out_features != net.config.num_labels:
        raise ValueError(f"{type(net).__name__}: no output layer of {net.config.num_labels} classes found to put "
                         "the checkpoint's classes in the data's order")
    return last[0]


def _name_classes(net: torch.nn.Module, names: list) -> None:
    """The data's class names into the model's config (config.json's id2label / label2id, which transformers'
    pipelines report), llmcore's model or transformers'; the id of a name is its position."""
    from llmcore.models.loading import is_transformers_model

    id2label = dict(enumerate(names))
    if is_transformers_model(net):
        net.config.id2label, net.config.label2id = id2label, {name: i for i, name in id2label.items()}
    else:
        net.config.id2label = id2label


# what a run's logging folder holds besides its train_log.jsonl: TensorBoard files, and logs set aside (by a Trainer
# that does not continue the run, by recover_held_run)
_SET_ASIDE_LOGS = ("events.out.tfevents.", "earlier-run-", "interrupted-run-")


def earlier_run(output_dir: str, logging_dir: str) -> list[str]:
    """What an earlier run left in ``output_dir`` (paths relative to it): its checkpoint folders (and the hidden
    ``.checkpoint-*.partial`` ones of an interrupted save, and ``.superseded-after-step-*`` ones a resume from an
    earlier checkpoint moved aside), ``final/``, ``results.json``, the training log and
    its TensorBoard event files (which TensorBoard would draw as one run with the new ones) when ``logging_dir`` is
    inside ``output_dir`` (a logging folder elsewhere, shared by several runs as TensorBoard folders are, is not
    this run's to refuse or remove)."""
    from llmcore.train.checkpoint import PREFIX, SUPERSEDED, list_checkpoints

    found = [os.path.basename(p) for p in list_checkpoints(output_dir)]
    if os.path.isdir(output_dir):
        found += sorted(n for n in os.listdir(output_dir)
                        if (n.startswith((f".{PREFIX}", f".{FINAL}.")) and ".partial" in n) or n.startswith(SUPERSEDED))
        if os.path.isdir(os.path.join(output_dir, HELD)):  # (a run killed while it replaced an earlier one)
            found.append(HELD)
    own_logs = inside_folder(logging_dir, output_dir)
    for path in (os.path.join(output_dir, FINAL), os.path.join(output_dir, "results.json"),
                 *([os.path.join(logging_dir, "train_log.jsonl")] if own_logs else [])):
        if os.path.exists(path):
            found.append(os.path.relpath(path, output_dir))
    if own_logs and os.path.isdir(logging_dir):  # (and the logs Trainer runs set aside: earlier-run-<n>/)
        found += sorted(os.path.relpath(os.path.join(logging_dir, n), output_dir) for n in os.listdir(logging_dir)
                        if n.startswith(_SET_ASIDE_LOGS))
    return found


# where --overwrite-output-dir keeps the earlier run until the new one has trained (inside output_dir)
HELD = ".overwritten-run"


def hold_run(output_dir: str, names: list[str], logging_dir: Optional[str] = None) -> str:
    """Moves an earlier run's ``names`` (``earlier_run``'s) into ``output_dir/.overwritten-run``, the same relative
    paths there, and returns that folder: ``--overwrite-output-dir`` removes them only once the new run has trained,
    and a run that fails before a checkpoint of its own puts them back (``recover_held_run``). They were
    removed up front, and a setting that failed only when training started (a mistyped resume checkpoint, a
    logging folder that is a file) cost the earlier run (a probe). A holder a killed run left is put back first
    where that run wrote no checkpoint (``recover_held_run``: the earlier run is then held again), else removed."""
    held = os.path.join(output_dir, HELD)
    if HELD in names and logging_dir is not None and recover_held_run(output_dir, logging_dir):
        names = earlier_run(output_dir, logging_dir)  # (under torchrun the start of the run recovers nothing)
    if HELD in names:
        shutil.rmtree(held)
    for name in names:
        if name != HELD:
            target = os.path.join(held, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(output_dir, name), target)
    return held


def recover_held_run(output_dir: str, logging_dir: str) -> bool:
    """Puts back the earlier run that a killed ``--overwrite-output-dir`` run held (``.overwritten-run``) where the
    killed run left no checkpoint, ``final/`` or results of its own (a probe: killed by SIGTERM, it left the earlier
    run hidden, and ``--resume-from-checkpoint true`` found no checkpoint). The killed run's log, if any, is moved
    into ``<logging_dir>/interrupted-run-<n>/`` first. Whether it put one back. Rank 0's, or one process's (no other
    rank may read the folder meanwhile)."""
    held = os.path.join(output_dir, HELD)
    if not os.path.isdir(held):
        return False
    logs = ("train_log.jsonl",) + _SET_ASIDE_LOGS
    if any(n != HELD and not os.path.basename(n).startswith(logs) for n in earlier_run(output_dir, logging_dir)):
        return False  # (the run wrote a checkpoint: the earlier run stays held, said by the refusal or removed)
    if inside_folder(logging_dir, output_dir):
        from llmcore.train.reporting import set_aside_earlier_logs

        # (a name free in the held run's logs too: an earlier interrupted run's log there comes back beside it)
        set_aside_earlier_logs(logging_dir, "interrupted-run",
                               also_free_in=os.path.join(held, os.path.relpath(logging_dir, output_dir)))
    restore_run(output_dir, held)
    print(f"llmcore: put back the earlier run in {output_dir!r} that an --overwrite-output-dir run held in {HELD} "
          "(that run stopped before a checkpoint of its own)", file=sys.stderr)
    return True


def restore_run(output_dir: str, held: str) -> None:
    """Moves what ``hold_run`` held back into ``output_dir`` and removes ``held``; a file whose name the new run took
    meanwhile is not overwritten: it stays in ``held`` (said), as does ``held`` then."""
    left = []
    for root, dirs, files in os.walk(held, topdown=True):
        for name in list(dirs) + files:
            source = os.path.join(root, name)
            target = os.path.join(output_dir, os.path.relpath(source, held))
            if os.path.exists(target):
                if name not in dirs:
                    left.append(os.path.relpath(source, held))
                continue  # (a folder both have, logs/: walked into)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
            if name in dirs:
                dirs.remove(name)
    if left:
        print(f"llmcore: {', '.join(left)} of the earlier run stay in {held!r}: the new run wrote files of those names",
              file=sys.stderr)
    else:
        shutil.rmtree(held)


def check_model_reads(net: torch.nn.Module, prepared, model: str) -> None:
    """Runs ``net`` once without gradients on each split's longest row and on the row that holds its largest token
    id: a row longer than the model's learned positions, or an id past its vocabulary (data prepared with another
    tokenizer), is an error naming them before training, not an IndexError at some step. (Eval mode: no random
    draws.)"""
    cfg = getattr(net, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limits = [f"{k} {getattr(cfg, k)}" for k in ("max_position_embeddings", "n_positions", "vocab_size")
              if isinstance(getattr(cfg, k, None), int)]
    device = next(net.parameters()).device
    training = net.training
    net.eval()
    try:
        for name, split in prepared.splits.items():
            if not len(split):
                continue
            top = int(np.argmax(np.asarray(split.ids).reshape(-1)))
            holder = (int(np.searchsorted(split.cu_seqlens, top, side="right")) - 1 if split.cu_seqlens is not None
                      else top // split.ids.shape[1])
            for row in sorted({int(np.argmax(split.lengths)), holder}):
                ids = torch.tensor(np.asarray(split[row]), dtype=torch.long, device=device)[None]
                try:
                    with torch.no_grad():
                        net(input_ids=ids)
                except BackendUnavailableError:  # (not the data's: a backend named that cannot run here)
                    raise
                except (IndexError, RuntimeError, ValueError) as e:  # (llmcore's models name the positions)
                    raise ValueError(
                        f"{model!r} cannot read the {name} split's row {row} ({ids.shape[1]} tokens, ids up to "
                        f"{int(ids.max())}): {e}. Its config: {', '.join(limits) or 'no limits named'}; prepare the "
                        f"data with its tokenizer and a --max-length it takes") from e
    finally:
        net.train(training)


def _check_labels(data: str, split: str, labels, unlabeled_ok: bool, texts) -> bool:
    """Whether a classification split is labeled: every row has a label (prepare's -1 marks none). A split without
    any (a test split without labels) is not, where ``unlabeled_ok``; some rows without is an error that quotes the
    first (``texts``: the split's ``PreparedSplit.texts``)."""
    if labels is None:
        if unlabeled_ok:
            return False
        raise ValueError(f"{data!r}: the {split} split has no label column")
    unlabeled = np.flatnonzero(np.asarray(labels) < 0)
    if not len(unlabeled) or (unlabeled_ok and len(unlabeled) == len(labels)):
        return not len(unlabeled)
    raise ValueError(f"{data!r}: {len(unlabeled)} of the {split} split's {len(labels)} rows have no label (an empty "
                     f"value or -1{_first_text(texts, unlabeled[0])}): label them or drop them")


def _note_unused_classes(data: str, present: np.ndarray, num_labels: int, names: Optional[list]) -> None:
    """Say on stderr when class ids below ``num_labels`` have no train row (``present``: the train labels, sorted
    and unique; {0, 7} makes an 8-way head, six of whose outputs only learn never to be predicted), naming the
    first few (by ``names``, the label names, where there are)."""
    unused = num_labels - len(present)
    if unused <= 0:
        return
    first, previous = [], -1
    for v in present.tolist() + [num_labels]:
        first.extend(range(previous + 1, min(v, previous + 1 + 5 - len(first))))
        previous = v
        if len(first) == 5:
            break
    named = ", ".join(repr(names[i]) if names else str(i) for i in first) + (", ..." if unused > len(first) else "")
    classes = "classes" if names else "class ids up to the largest label"
    advice = "" if names else f"; renumber the labels 0..{len(present) - 1} for a {len(present)}-way head"
    print(f"llmcore: {data!r}: {unused} of the {num_labels} {classes} have no train row ({named}): the head has "
          f"{num_labels} outputs, those only learn not to be predicted{advice}", file=sys.stderr)


def _first_text(texts, row: int) -> str:
    """``, e.g. '<the text of row>'`` when the split's texts were saved."""
    try:
        text = texts()[row]
    except (OSError, IndexError):
        return ""
    return f", e.g. {text[:60] + '...' if len(text) > 60 else text!r}"


def _setup_distributed(device: Optional[str], group: bool = False) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, whether we initialized the process group). Under ``torchrun``
    (WORLD_SIZE > 1, or any with ``group``: FSDP needs one) the group is initialized here: nccl on GPUs,
    gloo on the CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # by torchrun (or another launcher)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: finetune runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if (world > 1 or (group and launched)) and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        started = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev, started
    return 0, 1, dev, started


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "merges.txt", "vocab.json")


def _check_sources_unchanged(data: str, prepared) -> None:
    """A prepared folder's source files that still exist must be as they were prepared (size and modification
    time, as the cache key has them): an edited file would be trained on as it was. (Sources gone are fine: a
    prepared folder may travel without its raw data.)"""
    from llmcore.data import sources

    made_from = prepared.meta.get("sources") or []
    entries = [e for part in made_from for e in (part if part and isinstance(part[0], list) else [part])]
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4):
            continue
        split, path = entry[:2]
        try:
            now = sources.fingerprint_files({split: path})[0]
        except OSError:
            continue
        if now != entry:
            made = "whose data set card is" if split == "card" else f"whose {split} split was made from"
            raise ValueError(f"{data!r} is a prepared folder {made} {path!r}, which has changed since: prepare it "
                             "again (`llmcore prepare --force`), or pass the raw data")


def _check_prepared_options(data: str, prepared, eval_data: Optional[str], given: dict) -> None:
    """A prepared folder was cleaned, split and tokenized by ``prepare``: the options that make raw data into it,
    where given (``given``: max_length, overflow, tokenizer, text_column, label_column), must be what it was made
    with, and ``eval_data`` what its validation split was made from; else an error (they were ignored)."""
    from llmcore.data import sources
    from llmcore.data.prepare import eval_data_record

    meta = prepared.meta
    if eval_data is not None:
        made_from = meta.get("eval_data")
        if made_from is None or eval_data_record(sources.eval_files(eval_data)) != made_from:
            raise ValueError(f"eval data {eval_data!r}: {data!r} is a prepared folder, whose validation split is "
                             f"fixed (made from {made_from or 'the data itself'}); pass the eval data to `llmcore "
                             "prepare --eval-data`, or raw data to finetune")
    made = {"max_length": meta["options"]["max_length"], "overflow": meta["options"].get("overflow", "truncate"),
            "text_column": meta.get("text_column"), "label_column": meta.get("label_column"),
            "data_config": meta["options"].get("hub_config")}
    for name, value in given.items():
        if value is None:
            continue
        if name == "tokenizer":
            if prepared.made_with(value):
                continue
            made_with = "another tokenizer"
        elif value == made[name]:
            continue
        else:
            made_with = f"{name} {made[name]!r}"
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} {value!r}: {data!r} is a prepared folder, made with {made_with}; prepare it again "
                         f"with {flag} {value}, or pass raw data")


TASKS = ("sequence-classification", "causal-lm")


def load_model(path: str, causal_lm: bool, num_labels: Optional[int] = None,
               longest: Optional[int] = None) -> torch.nn.Module:
    """llmcore's model of the checkpoint folder ``path``, or, for a checkpoint llmcore does not implement (another
    architecture, RoPE scaling, an activation; a sliding window shorter than ``longest``, the data's longest row),
    transformers' own model of it (``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``, sdpa) with
    llmcore's kernels swapped in by ``llmcore.hf.patch``, saying so on stderr; so is a decoder asked for
    classification (llmcore's decoders are causal LMs only). An encoder asked for a causal LM stays an error."""
    from llmcore.models import UnsupportedModelError, from_pretrained
    from llmcore.models.loading import transformers_auto_class

    task = "causal-lm" if causal_lm else "sequence-classification"
    try:
        net = from_pretrained(path, task=task, num_labels=None if causal_lm else num_labels)
        window = getattr(net.config, "sliding_window", None)
        if window is not None and longest is not None and longest > window:
            raise UnsupportedModelError(f"rows of up to {longest} tokens are longer than the model's sliding window "
                                        f"({window}), which llmcore's attention does not slide")
        return net
    except UnsupportedModelError as e:
        auto = transformers_auto_class(causal_lm, e)
        if auto is None:
            raise
        import llmcore.hf

        try:
            net = auto.from_pretrained(path, attn_implementation="sdpa",
                                       **({} if causal_lm else {"num_labels": num_labels}))
        except (ValueError, KeyError, OSError) as e2:
            raise UnsupportedModelError(f"{e}; transformers cannot load it as {auto.__name__} either: {e2}") from e2
        print(f"llmcore: {e}; fine-tuning transformers' {type(net).__name__} with llmcore.hf.patch instead "
              f"(padded batches)", file=sys.stderr)
        return llmcore.hf.patch(net)


def _check_output_dir(output_dir: str, config: TrainConfig, overwrite_output_dir: bool, model: str,
                      tokenizer: Optional[str], data: str, eval_data: Optional[str], rank: int,
                      world: int) -> tuple[bool, list[str], str]:
    """(whether the run resumes the one in ``output_dir``, the earlier run's files ``overwrite_output_dir`` is to
    replace, ``model`` as a local folder). An earlier run is refused unless the run resumes it or replaces it, and
    replacing it must not remove an input. First rank 0 puts back an earlier run that a killed
    ``--overwrite-output-dir`` run held (``recover_held_run``) while the other ranks wait: the refusal's advice
    (``--resume-from-checkpoint true``) then finds its checkpoints under torchrun too (a probe: it found none)."""
    import torch.distributed as dist

    from llmcore.models.loading import checkpoint_dir

    if rank == 0:
        restore_interrupted_swaps(output_dir)  # (a final/ or checkpoint a kill left moved aside)
        recover_held_run(output_dir, config.logging_dir)
    if world > 1:
        dist.barrier()  # (no rank reads the folder while rank 0 moves its files)
    if config.resume_from_checkpoint is True:
        require_latest_checkpoint(output_dir)  # (said before the data is prepared, not after)
    resuming = resumes_here(config.resume_from_checkpoint, output_dir)
    earlier = [] if resuming else earlier_run(output_dir, config.logging_dir)
    if earlier and not overwrite_output_dir:
        from llmcore.train.checkpoint import list_checkpoints

        # (resuming is advised only where it finds a checkpoint: a probe followed it into "no checkpoint-* folder")
        resume = "--resume-from-checkpoint true continues it, " if list_checkpoints(output_dir) else ""
        raise ValueError(f"{output_dir!r} holds an earlier run ({', '.join(earlier)}): {resume}--overwrite-output-dir "
                         f"replaces it, or choose another --output-dir")
    model = checkpoint_dir(model)  # a Hub id is fetched once, before the data (its tokenizer) needs it
    if earlier:  # (overwrite_output_dir: the inputs must not lie in what it removes)
        resume = config.resume_from_checkpoint if isinstance(config.resume_from_checkpoint, str) else None
        for flag, path in (("--model", model), ("--tokenizer", tokenizer), ("--data", data),
                           ("--eval-data", eval_data), ("--resume-from-checkpoint", resume)):
            hit = next((name for name in earlier if path is not None and os.path.exists(path)
                        and inside_folder(path, os.path.join(output_dir, name))), None)
            if hit is not None:
                raise ValueError(f"--overwrite-output-dir would remove {os.path.join(output_dir, hit)!r}, which "
                                 f"holds {flag} {path!r}: copy it out of {output_dir!r} first, or choose another "
                                 "--output-dir")
    return resuming, earlier, model


def finetune(data: str, model: str, output_dir: str, max_length: Optional[int] = None,
             tokenizer: Optional[str] = None, text_column: Optional[str] = None, label_column: Optional[str] = None,
             device: Optional[str] = None, eval_data: Optional[str] = None, task: str = "sequence-classification",
             overflow: Optional[str] = None, overwrite_output_dir: bool = False, data_config: Optional[str] = None,
             **train_args) -> dict:
    """Prepare ``data`` (cached under ``output_dir/data``; a prepared folder is used as is), fine-tune
    the checkpoint in ``model`` (a folder, or a Hub model id: :mod:`llmcore.hub`) for sequence
    classification, evaluate on the validation and test splits, save the final model (+ the
    tokenizer files) to ``output_dir/final`` and the results to ``output_dir/results.json``. Returns
    the results: ``train_*`` and ``peak_memory_mb`` from ``Trainer.train``, ``eval_*`` on the
    validation split, ``test_*`` on the test split. ``eval_data``: a file whose rows are the
    validation split (transformers' ``eval_dataset``; see ``llmcore.data.prepare``). ``max_length``, ``tokenizer``,
    ``text_column``, ``label_column``, ``overflow`` and ``eval_data`` make raw data (``max_length`` 128 by default);
    given with a prepared folder they must be what it was made with. ``data_config``: the configuration of a
    Hugging Face data set ``data`` (``datasets.load_dataset``'s ``name``, e.g. ``"sst2"`` of ``"nyu-mll/glue"``), or
    of a local folder whose README.md declares configs.

    ``task="causal-lm"``: a decoder checkpoint (GPT-2, Llama, Mistral, Qwen2, Qwen3) trained on next-token loss
    over each text (labels are not needed and not used); the evaluations report ``*_loss`` (per
    predicted token), ``*_tokens`` and ``*_perplexity``.

    A checkpoint llmcore's models do not implement is trained as transformers' model patched by
    ``llmcore.hf.patch``, on padded batches (``load_model``); its tokenizer must still be one llmcore reads.

    ``overflow`` (raw data): what ``prepare`` does with the tokens past ``max_length``: ``"split"``
    (the default for causal-lm) makes a long text several rows of at most ``max_length`` tokens, so
    every token is in some row (the first of each later window predicted without its context);
    ``"truncate"`` (the default for classification) drops them.

    Under ``torchrun`` every rank trains on its share of each global batch (see ``split_batches``)
    and rank 0 writes the files; ``fsdp="full_shard"`` (or ``"shard_grad_op"``) shards the model instead of
    replicating it (``llmcore.train.fsdp``). ``device``: default ``cuda:<LOCAL_RANK>`` when CUDA is there, else CPU.

    An ``output_dir`` that holds an earlier run (checkpoints, ``final/``, ``results.json``) is refused unless the run
    resumes (``resume_from_checkpoint``) or ``overwrite_output_dir`` (transformers 4's flag; its example scripts
    refuse the same way) removes that run first; the prepared-data cache ``output_dir/data`` is kept either way."""
    import torch.distributed as dist

    from llmcore.data import PreparedDataset, prepare
    from llmcore.data.prepare import holds_prepared
    from llmcore.models.loading import is_transformers_model
    from llmcore.train.checkpoint import seed_everything

    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown: expected one of {', '.join(TASKS)}")
    causal_lm = task == "causal-lm"
    asked_overflow = overflow
    if overflow is None:
        overflow = "split" if causal_lm else "truncate"
    config = TrainConfig(output_dir=output_dir, **train_args)
    for flag, path in (("--output-dir", output_dir), ("--logging-dir", config.logging_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a file, not a folder: choose another {flag}")
    rank, world, dev, started = _setup_distributed(device, group=bool(config.fsdp))
    try:
        resuming, earlier, model = _check_output_dir(output_dir, config, overwrite_output_dir, model, tokenizer, data,
                                                     eval_data, rank, world)
        check_process_group(config.fsdp)  # before the data and the model are loaded
    except BaseException:
        if started:
            dist.destroy_process_group()
        raise
    if dev.type == "cpu":
        retain_freed_memory()  # per-step buffers reuse warm pages (see its docstring)
    try:
        if max_length is not None:  # (checked here too: a prepared folder's "prepare it again with --max-length 0")
            from llmcore.tokenizer.core import _count

            max_length = _count("max_length", max_length, 1)
        if holds_prepared(data):  # (a raw folder's own meta.json is data's metadata: read as raw)
            prepared = PreparedDataset.load(data)
            _check_sources_unchanged(data, prepared)
            _check_prepared_options(data, prepared, eval_data,
                                    {"max_length": max_length, "overflow": asked_overflow, "tokenizer": tokenizer,
                                     "text_column": text_column, "label_column": label_column,
                                     "data_config": data_config})
            if (tokenizer is None and os.path.isdir(model)
                    and any(os.path.isfile(os.path.join(model, n)) for n in ("tokenizer.json", "vocab.txt"))
                    and not prepared.made_with(model)):  # (final/ gets the model's tokenizer: it must be the data's)
                raise ValueError(f"--model {model!r}: its tokenizer is not the one {data!r} was prepared with (a "
                                 "prepared folder holds that tokenizer's ids, and final/ would get the model's): pass "
                                 "the data's as --tokenizer, or prepare the data with the model's")
        else:
            if inside_folder(data, os.path.join(output_dir, "data")):  # (the folder, or a raw file in it)
                raise ValueError(f"--data {data!r} is the folder finetune caches the prepared data in "
                                 f"(--output-dir's data/): its arrays would be written among the raw files; choose "
                                 "another --output-dir, or move the raw files")

            def run_prepare():
                return prepare(data, model if tokenizer is None else tokenizer,
                               128 if max_length is None else max_length, os.path.join(output_dir, "data"),
                               eval_data=eval_data, text_column=text_column, label_column=label_column, pack=True,
                               overflow=overflow, eval_labels=not causal_lm, hub_config=data_config)
                # (the split's own seed, as `llmcore prepare`: not --seed's; a causal LM's eval data needs no labels)
            if rank == 0:
                prepared = run_prepare()
            if world > 1:
                dist.barrier()  # rank 0 prepared; the others find it in the cache
            if rank != 0:
                prepared = run_prepare()
        if "train" not in prepared.splits:
            raise ValueError(f"{data!r} has no train split (splits: {sorted(prepared.splits)})")
        if not causal_lm:
            _check_labels(data, "train", prepared["train"].labels, False, prepared["train"].texts)
            present = np.unique(prepared["train"].labels)
            if len(present) == 1:  # (transformers would train a regression on a 1-way head)
                only = prepared.label_names[present[0]] if prepared.label_names else int(present[0])
                raise ValueError(f"{data!r} has one class only ({only!r}): sequence classification needs two or "
                                 f"more")
            if rank == 0:
                _note_unused_classes(data, present, prepared.num_labels, prepared.label_names)
        if rank == 0:  # the rows each split trains or is scored on, and what cleaning dropped from train
            from llmcore.data.summary import split_line

            for name in prepared.splits:
                print(f"llmcore: data {split_line(prepared.meta, name)}", file=sys.stderr)
        seed_everything(config.seed)  # the new head's initialization, as transformers' Trainer does
        if causal_lm and not (np.asarray(prepared["train"].lengths) > 1).any():  # (it trained on weight decay)
            raise ValueError(f"{data!r}: no train row has two tokens, so no token has a next one to predict "
                             "(a --max-length of 1?)")
        longest = max((int(np.max(prepared[name].lengths)) for name in prepared.splits if len(prepared[name])),
                      default=None)
        net = load_model(model, causal_lm, prepared.num_labels, longest).to(dev)
        if not causal_lm and prepared.label_names:
            _align_head(net, prepared.label_names, data, quiet=rank != 0)
            _name_classes(net, prepared.label_names)
        check_model_reads(net, prepared, model)
        theirs = is_transformers_model(net)
        pack = config.pack and not theirs  # transformers' models take no cu_seqlens
        pad_id = transformers_pad_id(net, causal_lm) if theirs else 0
        batch, multiple = config.per_device_train_batch_size, config.batch_multiple(dev)
        train = split_batches(prepared["train"], batch, pack, config.seed, True, rank, world, multiple, causal_lm,
                              pad_id, accumulation=config.gradient_accumulation_steps)
        evals = {name: split_batches(prepared[name], config.per_device_eval_batch_size, pack, 0, False,
                                     rank, world, multiple, causal_lm, pad_id, text_ids=True)(0)
                 for name in ("validation", "test") if name in prepared.splits and len(prepared[name])
                 and (causal_lm or _check_labels(data, name, prepared[name].labels, True, prepared[name].texts))}
        if config.eval_strategy != "no" and "validation" not in evals:
            raise ValueError(f"{data!r} has no validation split {'' if causal_lm else 'with labels '}to evaluate on "
                             f"(eval_strategy {config.eval_strategy!r}): give one (a validation file, --eval-data, "
                             f"or enough train rows to split one off), or pass --eval-strategy no")
        trainer = Trainer(net, config, train, eval_batches=evals.get("validation"))
        # overwrite_output_dir, once data, model and settings are known to be usable: the earlier run is held aside
        # until this one has trained, and put back if this one fails before it writes anything
        held = hold_run(output_dir, earlier, config.logging_dir) if earlier and rank == 0 else None
        try:
            results = trainer.train()
        except BaseException:
            # (never removed here: the earlier run is kept, put back where this run wrote no checkpoint)
            if held is not None and not recover_held_run(output_dir, config.logging_dir):
                print(f"llmcore: the run failed; the earlier run it replaced is kept in {held!r} (a later "
                      "--overwrite-output-dir removes it)", file=sys.stderr)
            raise
        if held is not None:
            shutil.rmtree(held)
        elif resuming and rank == 0 and os.path.isdir(os.path.join(output_dir, HELD)):
            # (a resumed run that was replacing an earlier one, killed after its first checkpoint: now it has trained)
            shutil.rmtree(os.path.join(output_dir, HELD))
            print(f"llmcore: removed the earlier run this resumed run replaces ({HELD} in {output_dir!r})",
                  file=sys.stderr)
        for name, batches in evals.items():
            trainer.eval_batches = batches
            prefix = "eval" if name == "validation" else name
            results.update({f"{prefix}{k[4:]}": v for k, v in trainer.evaluate().items()})
        results["peak_memory_mb"] = max(results["peak_memory_mb"], peak_memory_mb(dev))  # evaluation included
        results["world_size"] = world
        results["model_class"], results["packed"] = type(net).__name__, pack
        # final/ is written whole into .final.partial and renamed into place as a checkpoint is, just before
        # results.json: a run killed meanwhile leaves the earlier final/ (a resumed run's) as it was, never one
        # half new
        final = os.path.join(output_dir, FINAL)
        staged = partial_path(final)
        if rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # (what a killed run left)
        trainer.save_model(staged)  # every rank: under FSDP the shards are gathered
        if rank == 0:
            _copy_tokenizer(tokenizer if tokenizer is not None else model, staged, model)
            given, kept = (os.path.join(folder, "generation_config.json") for folder in (model, staged))
            if causal_lm and os.path.isfile(given) and not os.path.exists(kept):  # (a decoder's generate() settings)
                shutil.copyfile(given, kept)
            tmp = os.path.join(output_dir, "results.json.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**results, "config": dataclasses.asdict(config), "model": model, "data": data, "task": task,
                           "label_names": None if causal_lm else prepared.label_names}, f, indent=2, default=str)
            publish_checkpoint(staged, final)
            os.replace(tmp, os.path.join(output_dir, "results.json"))
        if world > 1:
            dist.barrier()
        return results
    finally:
        if started:
            dist.destroy_process_group()

