"""Checkpoint folders ``<output_dir>/checkpoint-<step>``: model, optimizer, scheduler, loop position, RNG.

Layout::

    checkpoint-<step>/
      config.json, model.safetensors   llmcore.models.save_pretrained (loads in transformers too; a
                                       transformers model: its own save_pretrained, its names)
      optimizer.pt, scheduler.pt       state dicts
      trainer_state.json               global_step, epoch, batches consumed in that epoch, log history
      rng_state_<rank>.pt              python, numpy, torch CPU (+ CUDA) generator states of each rank

A checkpoint is written into ``.checkpoint-<step>.partial`` and renamed into place when complete
(``publish_checkpoint``), so a killed run never leaves a half-written ``checkpoint-<step>``. A model sharded
by FSDP writes and reads the same files (whole tensors, gathered on rank 0; ``llmcore.train.fsdp``), unless its
checkpoints are sharded (``TrainConfig.fsdp_config``'s ``SHARDED_STATE_DICT``): then ``config.json`` and a
``sharded/`` folder replace ``model.safetensors`` and ``optimizer.pt``::

      sharded/.metadata                 torch.distributed.checkpoint's index of the model's and optimizer's state
      sharded/__<rank>_0.distcp         each rank's shards, written by that rank (nothing gathered)

Such a checkpoint resumes on any number of ranks, sharded or not (``load_checkpoint`` reads whichever form the
folder holds); ``consolidate_checkpoint`` (``llmcore consolidate``) writes its model as the ``config.json`` +
``model.safetensors`` that transformers and ``llmcore.models.from_pretrained`` load.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from typing import Optional

import numpy as np
import torch
from torch import nn

from llmcore.models import CheckpointError, UnsupportedModelError, save_pretrained
from llmcore.models.loading import (
    build_model,
    is_transformers_model,
    load_safetensors_file,
    load_state,
    load_transformers_state,
    read_config,
    read_json_object,
    read_safetensors,
    save_config,
    transformers_auto_class,
)
from llmcore.train.fsdp import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_optimizer_state,
    load_sharded,
    read_sharded,
    save_sharded,
    sharded_keys,
)

PREFIX = "checkpoint-"
FINAL = "final"  # a fine-tuning run's final model (llmcore.train.finetune), published as a checkpoint is
SHARDED = "sharded"  # the folder of a sharded checkpoint's model and optimizer state
_STEP = re.compile(rf"^{PREFIX}(\d+)$")
SUPERSEDED = ".superseded-after-step-"  # (set_aside_later_checkpoints)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders in ``output_dir``, oldest (lowest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _STEP.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def set_aside_later_checkpoints(output_dir: str, step: int) -> Optional[str]:
    """For a run resumed from ``checkpoint-<step>`` of its own ``output_dir`` that writes checkpoints: the ones past
    that step are another trajectory's (the run it restarts from an earlier point), and stay so until this run
    overwrites them one by one. Rotation, ranking by step, deleted this run's newer checkpoints (the one it had
    just written, the one it resumed from) before those, and resume_from_checkpoint=True took their highest for
    this run's (a probe). They are moved, with that run's ``final/``, into
    ``output_dir/.superseded-after-step-<step>`` (``-2``, ... when there is one); returns that folder, None when
    there was nothing past ``step``."""
    later = [p for p in list_checkpoints(output_dir) if int(_STEP.match(os.path.basename(p)).group(1)) > step]
    if not later:
        return None
    dest, n = os.path.join(output_dir, f"{SUPERSEDED}{step}"), 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(output_dir, f"{SUPERSEDED}{step}-{n}")
    os.makedirs(dest)
    final = os.path.join(output_dir, FINAL)
    for path in later + ([final] if os.path.isdir(final) else []):
        os.rename(path, os.path.join(dest, os.path.basename(path)))
    _fsync_dir(output_dir)
    return dest


def restore_interrupted_swaps(output_dir: str) -> None:
    """Put back a checkpoint (or ``final/``) that ``publish_checkpoint`` had moved aside (``.checkpoint-N.partial.old``)
    when the process died between its two renames (the new ``.checkpoint-N.partial`` still there): without it,
    checkpoint-N was gone. A moved-aside one without that is the rest of a removal a kill cut short: removed. (Every
    rank may try; one rename wins.)"""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"\.({PREFIX}\d+|{FINAL})\.partial\.old", name)
        if not m or os.path.exists(os.path.join(output_dir, m.group(1))):
            continue
        old = os.path.join(output_dir, name)
        if not os.path.isdir(os.path.join(output_dir, f".{m.group(1)}.partial")):
            # (not between the two renames: a removal of the old one that a kill cut short; nothing whole to restore)
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            os.rename(old, os.path.join(output_dir, m.group(1)))
        except OSError:
            pass  # (another rank's rename won)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The highest-step checkpoint of ``output_dir`` (one an interrupted save had moved aside put back first)."""
    restore_interrupted_swaps(output_dir)
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def require_latest_checkpoint(output_dir: str) -> str:
    """``latest_checkpoint``, which must exist (resume_from_checkpoint=True)."""
    path = latest_checkpoint(output_dir)
    if path is None:
        raise FileNotFoundError(f"resume_from_checkpoint=True but {output_dir!r} has no {PREFIX}* folder")
    return path


def inside_folder(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def resumes_here(resume, output_dir: str) -> bool:
    """Whether ``resume`` (resume_from_checkpoint) continues the run in ``output_dir`` (True, or a checkpoint inside
    it, links resolved): only then may it write over that run's files and log; a checkpoint of another folder (one
    below output_dir too) starts a new run there."""
    if resume is None or resume is False:
        return False
    if resume is True:
        return True
    return os.path.dirname(os.path.realpath(os.fspath(resume))) == os.path.realpath(output_dir)


def partial_path(path: str) -> str:
    """The hidden folder a checkpoint is written into before ``publish_checkpoint``."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.partial")


def publish_checkpoint(partial: str, path: str) -> None:
    """Flush the files of ``partial`` (and of its folders) to disk and rename it to ``path`` (replacing an older
    one)."""
    _fsync_tree(partial)
    stale = None
    if os.path.exists(path):  # the same step saved again (a resumed run): swap, then delete the old one
        stale = f"{partial}.old"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(path, stale)
    os.rename(partial, path)
    _fsync_dir(os.path.dirname(path) or ".")
    if stale:
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(top: str) -> None:
    """Flush the files under ``top``, and its folders below it, to disk."""
    for folder, _, files in os.walk(top):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if folder != top:
            _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def save_checkpoint(path: str, model: nn.Module, optimizer, scheduler, state: dict, rank: int = 0,
                    write_shared: bool = True, sharded: bool = False) -> None:
    """Write one checkpoint folder. Every rank writes its RNG file; ``write_shared`` (rank 0) the rest. A model
    sharded by FSDP has its whole tensors gathered first (a collective: every rank calls this), or, ``sharded``,
    every rank writes its shards into ``path/sharded`` (also a collective)."""
    os.makedirs(path, exist_ok=True)
    model_state = optimizer_state = None
    if sharded:
        save_sharded(model, optimizer, os.path.join(path, SHARDED))
    elif is_sharded(model):  # whole tensors on rank 0: the files an unsharded run writes
        model_state, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)
    if write_shared:
        if sharded:
            save_config(model, path)
        else:
            save_pretrained(model, path, model_state)
            torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                       os.path.join(path, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
        with open(os.path.join(path, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
    torch.save(rng_state(), os.path.join(path, f"rng_state_{rank}.pt"))


def load_checkpoint(path: str, model: nn.Module, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG in place; return the trainer state. Reads a
    sharded checkpoint's ``sharded/`` folder when there is one (a collective under a process group: every rank
    calls this), else ``model.safetensors`` and ``optimizer.pt``."""
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume_from_checkpoint={path!r} does not exist")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"resume_from_checkpoint={path!r} is not a checkpoint folder "
                                "(no trainer_state.json)")
    state = _read_state(state_file)
    if os.path.isdir(os.path.join(path, SHARDED)):
        load_sharded(model, optimizer, os.path.join(path, SHARDED))
    else:
        load_model_weights(path, model)
        device = next(model.parameters()).device
        optimizer_state = _load_pt(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True)
        if is_sharded(model):
            load_optimizer_state(model, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(_load_pt(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng_file = os.path.join(path, f"rng_state_{rank}.pt")
    writers = state.get("world_size")  # (a rank that wrote the checkpoint and whose file is gone: incomplete)
    if (not os.path.isfile(rng_file) and rank > 0 and os.path.isfile(os.path.join(path, "rng_state_0.pt"))
            and not (isinstance(writers, int) and rank < writers)):
        # Written by fewer ranks (resumed on more): this rank takes rank 0's random state, as transformers goes
        # on with a warning; the run then is not the one a same-size resume would give.
        print(f"llmcore: {rng_file!r} is missing (the checkpoint was written by fewer ranks): rank {rank} resumes "
              "with rank 0's random state", file=sys.stderr)
        rng_file = os.path.join(path, "rng_state_0.pt")
    if os.path.isfile(rng_file):
        # Our own file: it holds numpy's and python's state tuples, which weights_only cannot read.
        set_rng_state(_load_pt(rng_file, weights_only=False))
    else:
        raise FileNotFoundError(f"{rng_file!r} is missing: the checkpoint is incomplete")
    return state


def _read_state(file: str) -> dict:
    """A checkpoint's trainer_state.json, checked for the position resume needs; damaged: a CheckpointError
    naming the file."""
    state = read_json_object(file, "a trainer state")
    for key in ("global_step", "epoch", "batches_in_epoch"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{file!r}: {key!r} is {'missing' if key not in state else repr(value)}, "
                                  "not a count (a damaged checkpoint file?)")
    return state


def _load_pt(file: str, **kwargs):
    """``torch.load``; a damaged file (truncated: "PytorchStreamReader failed reading zip archive"; not torch's
    at all) is a CheckpointError naming it."""
    try:
        return torch.load(file, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:  # (torch.load's errors on foreign bytes vary: KeyError, ValueError, RuntimeError...)
        raise CheckpointError(f"{file!r} is unreadable (a damaged checkpoint file?): {e!r}") from e


def update_state(path: str, **fields) -> None:
    """Rewrites ``fields`` of the checkpoint ``path``'s trainer_state.json (an evaluation made after the checkpoint
    was written: its record, the best model, early stopping's count), atomically."""
    file = os.path.join(path, "trainer_state.json")
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    state.update(fields)
    with open(file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.replace(file + ".tmp", file)


def load_model_weights(path: str, model: nn.Module) -> None:
    """The weights of the checkpoint folder ``path``, whole (model.safetensors) or sharded (``sharded/``), into
    ``model`` in place, sharded by FSDP or not; nothing else of the checkpoint. A collective when the model is
    sharded or the checkpoint is (every rank calls it)."""
    if os.path.isdir(os.path.join(path, SHARDED)):
        load_sharded(model, None, os.path.join(path, SHARDED))
        return
    # Into the existing model, by HF names: the architecture is the caller's, only the weights come back.
    if is_transformers_model(model):  # its own names, in one file or shards, as its save_pretrained wrote them
        load_transformers_state(model, read_safetensors(path))
        return
    weights = os.path.join(path, "model.safetensors")
    tensors = load_safetensors_file(weights)  # (its own errors name the file)
    try:
        fresh = load_state(model, model.config.family, tensors, strict_head=True)
    except CheckpointError as e:
        raise CheckpointError(f"{weights!r} does not fit the model (a checkpoint of another --model?): {e}") from e
    if fresh:
        raise CheckpointError(f"{weights!r} lacks {fresh}")


# the files of a model transformers' save_pretrained writes (and loads): what consolidate will not silently replace
_MODEL_FILE = re.compile(r"(generation_)?config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
                         r"(\.index\.json)?")
_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def consolidate_checkpoint(path: str, output_dir: str, overwrite_output_dir: bool = False) -> str:
    """Writes the model of the sharded checkpoint ``path`` (``checkpoint-<step>`` with a ``sharded/`` folder) into
    ``output_dir`` as config.json + model.safetensors in transformers' names (what ``Trainer.save_model`` writes),
    in one process, reading only the model's part of the shards (not the optimizer's). Returns ``output_dir``. The
    checkpoint of a transformers model (``llmcore finetune``'s fallback) is read into transformers' model of its
    config.json and written by its ``save_pretrained``.

    A folder that already holds a model (its config.json or weights) is refused unless ``overwrite_output_dir``:
    then its files are replaced, each whole (written beside them first: a run that fails midway leaves the earlier
    model), and weight files of the earlier model the new one does not have (other shards, a pytorch_model.bin) are
    removed, as transformers' save_pretrained does, so that the folder loads as the new model only."""
    sharded = os.path.join(path, SHARDED)
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(sharded) or not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} is not a sharded checkpoint (a folder with config.json and {SHARDED}/)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):  # (before the shards are read)
        raise ValueError(f"output folder {output_dir!r} is a file: choose another")
    if inside_folder(output_dir, path):
        raise ValueError(f"output folder {output_dir!r} is inside the checkpoint {path!r}: its model files would "
                         "be taken for the checkpoint's; choose another")
    held = sorted(f for f in os.listdir(output_dir) if _MODEL_FILE.fullmatch(f)) if os.path.isdir(output_dir) else []
    if held and not overwrite_output_dir:
        raise ValueError(f"output folder {output_dir!r} already holds a model ({', '.join(held)}): choose another, "
                         "or replace it with overwrite_output_dir=True (llmcore consolidate --overwrite-output-dir)")
    hf = read_config(path)
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in hf.get("architectures") or [])
    keys = sharded_keys(sharded)  # None if unreadable: read_sharded says why below

    def holds(m: nn.Module) -> bool:  # (exactly: not a model with fewer layers, which read_sharded refuses)
        return keys is None or {f"model.{k}" for k in m.state_dict()} == {k for k in keys if k.startswith("model.")}

    model = refused = None
    try:
        model = build_model(hf, "causal-lm" if causal else "sequence-classification")
    except UnsupportedModelError as e:
        refused = e
    if model is None or not holds(model):  # a transformers model's shards (what finetune's fallback trains)
        auto = transformers_auto_class(causal, refused)
        if auto is not None:
            from transformers import AutoConfig

            theirs = auto.from_config(AutoConfig.from_pretrained(path))
            if model is None or holds(theirs):
                model = theirs
        if model is None:
            raise refused
    # the model's own tensors, which DCP reads into in place; the optimizer's keys are left unread
    read_sharded({"model": model.state_dict()}, sharded, "the model its config.json describes")
    made = not os.path.exists(output_dir)
    stage = os.path.join(output_dir, ".consolidate.partial")
    shutil.rmtree(stage, ignore_errors=True)  # (a killed run's)
    try:
        save_pretrained(model, stage)
        _fsync_tree(stage)
        written = os.listdir(stage)
        for name in written:
            os.replace(os.path.join(stage, name), os.path.join(output_dir, name))
        os.rmdir(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    for name in held:  # (after the new files are in: a kill before this leaves extra weights, not too few)
        if _WEIGHTS_FILE.fullmatch(name) and name not in written:
            os.remove(os.path.join(output_dir, name))
    _fsync_dir(output_dir)
    return output_dir


def keep_only_best(output_dir: str, best: str) -> list[str]:
    """At the end of a run with ``save_total_limit=1``: delete every checkpoint but the best, which rotation kept
    beside the newest during training (transformers' Trainer does the same when it ends). Nothing is deleted
    unless ``best`` is one of ``output_dir``'s checkpoints. Returns the deleted folders."""
    found = list_checkpoints(output_dir)
    if not any(os.path.abspath(f) == os.path.abspath(best) for f in found):
        return []
    doomed = [f for f in found if os.path.abspath(f) != os.path.abspath(best)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int], keep: Optional[str] = None) -> list[str]:
    """Delete the oldest checkpoints beyond ``save_total_limit``; return the deleted folders. ``keep`` (the best
    checkpoint so far) is never deleted and counts toward the limit, except that with a limit of 1 both it and
    the newest stay (transformers' rule) until the run ends (``keep_only_best``)."""
    if save_total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    kept = [f for f in found if keep is not None and os.path.abspath(f) == os.path.abspath(keep)]
    if kept and kept[0] != found[-1]:
        found.remove(kept[0])
        save_total_limit = max(1, save_total_limit - 1)
    doomed = found[:max(0, len(found) - save_total_limit)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
