"""FSDP for the fine-tuning loop (``TrainConfig.fsdp``): a model sharded with torch's ``fully_shard`` (FSDP2)
by its Transformer layers, and whole state dicts gathered from the shards, so that a sharded run writes the
checkpoints and final model an unsharded one writes (an FSDP checkpoint resumes in one process); or, for
checkpoints too big to gather (``TrainConfig.fsdp_config``'s ``SHARDED_STATE_DICT``), each rank's shards written
and read with torch.distributed.checkpoint (``save_sharded``, ``load_sharded``, ``read_sharded``).

Every function that gathers or scatters is a collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import warnings
from typing import Optional

import torch
from torch import nn

from llmcore.train.config import FSDP_MODES


def units(model: nn.Module) -> list[nn.Module]:
    """What is sharded as a unit of its own, before the root: the elements of the model's outermost
    ``nn.ModuleList`` s (a Transformer's layers). The root's unit holds the rest (embeddings, final norm, head)."""
    found = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def shard(model: nn.Module, mode: str, bf16: bool = False) -> nn.Module:
    """Shards ``model`` in place across the default process group's ranks: each of ``units(model)``, then the
    root. ``"full_shard"`` (ZeRO-3) frees a unit's gathered parameters after its forward and gathers them again
    for its backward; ``"shard_grad_op"`` (ZeRO-2) keeps them from the forward to the backward (more memory, one
    all-gather fewer per unit). Gradients are reduce-scattered (averaged over ranks) after each unit's backward;
    parameters, gradients and optimizer state are ``DTensor`` shards of dim 0.

    ``"hybrid_shard"`` / ``"hybrid_shard_zero2"`` (HSDP, as ZeRO-3 / ZeRO-2): the same within groups of
    ``LOCAL_WORLD_SIZE`` ranks (torchrun's ranks per node), each group holding a whole replica, so all-gathers
    stay inside a node; gradients are reduce-scattered in the group, then all-reduced across the groups (the
    same average over all ranks). On one node it shards as the plain strategies do.

    ``bf16`` (the loop's ``TrainConfig.bf16``): FSDP's mixed precision, the fp32 shards cast to bf16 before they
    are gathered (half the bytes), so the gathered parameters and their gradients are bf16; the gradients are
    reduce-scattered in fp32 into fp32 shards, which the optimizer steps. Autocast stays on around it (fp32
    where autocast keeps fp32). MiniLM on 2 gloo ranks of one thread, 100 steps of batch 16 a rank, against
    gathering fp32 shards under autocast: ``full_shard`` 50 -> 67-71 samples/s, ``shard_grad_op`` 67 -> 86, the
    train loss 0.53284 -> 0.53292, the same test accuracy (see README)."""
    if mode not in FSDP_MODES:
        raise ValueError(f"fsdp mode must be one of {FSDP_MODES}, got {mode!r}")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh on the parameters' device type (fully_shard's default takes CUDA whenever there is a GPU)
    device_type, world = next(model.parameters()).device.type, dist.get_world_size()
    if mode.startswith("hybrid"):
        group = _shard_group_size(world)
        mesh = init_device_mesh(device_type, (world // group, group), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world,))
    reshard = mode in ("full_shard", "hybrid_shard")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for unit in units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    _settle_gloo_at_exit()
    return model


def _shard_group_size(world: int) -> int:
    """Ranks per HSDP shard group: ``LOCAL_WORLD_SIZE`` (torchrun sets it: the ranks of a node), else all."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    try:
        group = int(raw)
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE={raw!r} is not a number of ranks") from None
    if group < 1 or world % group:
        raise ValueError(f"hybrid sharding groups LOCAL_WORLD_SIZE={group} ranks (a node's) into a replica; the "
                         f"{world} ranks do not split into such groups")
    return group


_SETTLE_S = 0.05
_settling = False


def _settle_gloo_at_exit() -> None:
    """Under gloo, have the process give up the GIL for a moment when it exits. A gloo worker thread lets go of a
    finished collective's tensors after ``wait()`` has returned, and letting go of a tensor that Python saw takes
    the GIL: if the interpreter is already finalizing, the thread dies inside a destructor and the process aborts
    ("terminate called without an active exception") after the work is done: in 4 of 50 two-rank runs of
    tests/test_train_fsdp.py's worker without this sleep, none of 80 with it (torch 2.13). loop.all_reduce waits
    on its own tensor's refcount instead, but FSDP's collectives are its own. NCCL has no such threads."""
    global _settling
    import torch.distributed as dist

    if _settling or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    _settling = True
    atexit.register(time.sleep, _SETTLE_S)


def check_process_group(mode: str) -> None:
    """Raises ValueError when ``mode`` (``TrainConfig.fsdp``) asks for sharding and no process group is there."""
    import torch.distributed as dist

    if mode and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"fsdp={mode!r} shards the model across torch.distributed's ranks, but no process group is "
                         "initialized: run under torchrun (or call torch.distributed.init_process_group first)")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (by ``shard`` or by the caller)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return False
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Frees the whole parameters that forwards without a backward (evaluation) leave gathered on a sharded
    ``model``: ``shard_grad_op`` keeps every unit's after its forward, until its backward. Its parameters are the
    shards again, the ones the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """``model.state_dict()`` with whole tensors (on the CPU) on rank 0, ``{}`` on the others."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as one process would write it (parameters numbered across the param groups
    in order, whole tensors on the CPU) on rank 0, ``{}`` on the others."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options())
    if not full:
        return {}
    number: dict = {}
    groups = [{**g, "params": [number.setdefault(name, len(number)) for name in g["params"]]}
              for g in full["param_groups"]]
    return {"state": {number[name]: s for name, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads ``state`` (``optimizer.state_dict()`` of one process, or ``full_optimizer_state``'s) into the
    optimizer of the sharded ``model``, each rank its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    reshard(model)  # the module's parameters are then the optimizer's
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(state["param_groups"]) != len(optimizer.param_groups) or sorted(saved) != list(range(len(order))):
        raise ValueError(f"the optimizer state has {len(saved)} parameters in {len(state['param_groups'])} groups; "
                         f"the optimizer has {len(order)} in {len(optimizer.param_groups)}")
    full = {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Writes the model's and the optimizer's state into the folder ``path`` with torch.distributed.checkpoint
    (DCP): every rank its own shards (``__<rank>_0.distcp``), rank 0 the index (``.metadata``); nothing is
    gathered. Keys: ``model.<parameter>`` and ``optimizer.state.<parameter>.<exp_avg|...>``, ``optimizer.
    param_groups...``, parameters by their names in ``model``. A collective under a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if is_sharded(model):
        reshard(model)  # the module's parameters are then the optimizer's
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_is_meant():
        dcp.save(state, checkpoint_id=path, no_dist=not _distributed())


def load_sharded(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], path: str) -> None:
    """Loads ``save_sharded``'s folder into ``model`` and ``optimizer`` (None: the model alone) in place, each
    rank reading the parts of its shards: sharded or not, on any number of ranks (DCP reshards). A collective
    under a process group. Raises ``CheckpointError`` when the folder does not hold this model's or this
    optimizer's tensors."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if is_sharded(model):
        reshard(model)
    # The state dicts of this model and optimizer are the templates DCP reads into: their keys, shapes and
    # shards (a fresh optimizer's state is created, zero, to be overwritten).
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    read_sharded(state, path, "this model's weights" if optimizer is None else "this model's and optimizer's state")
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def read_sharded(state: dict, path: str, what: str) -> None:
    """``torch.distributed.checkpoint.load(state)`` from the folder ``path``: the tensors of ``state`` (a template
    of the keys to read) filled in place. ``CheckpointError`` ("``path`` does not hold ``what``: ...") when the
    folder lacks them or they do not fit, or when it holds model tensors ``state["model"]`` has no place for (a
    checkpoint of a larger model: DCP reads a subset silently). The optimizer's keys may be left unread. A
    collective under a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from llmcore.models import CheckpointError

    try:
        with _one_process_is_meant(), _metadata_fallbacks_unlogged():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except CheckpointException as e:  # every rank's error (a BaseException), keyed by rank
        raise CheckpointError(f"{path!r} does not hold {what}: {_cause(e)}") from None
    except (OSError, ValueError, RuntimeError) as e:  # e.g. no .metadata, when every rank fails alike
        raise CheckpointError(f"{path!r} does not hold {what}: {e}") from e
    extra = sorted(k for k in sharded_keys(path) or ()
                   if k.startswith("model.") and k[len("model."):] not in state.get("model", {}))
    if extra:  # (every rank reads the same .metadata: all raise alike)
        shown = ", ".join(k[len("model."):] for k in extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise CheckpointError(f"{path!r} does not hold {what}: it holds {len(extra)} model tensor(s) the model has "
                              f"no place for ({shown}): a checkpoint of a larger model?")


def sharded_keys(path: str) -> Optional[set]:
    """The tensor keys of the DCP checkpoint folder ``path`` (its .metadata), or None if it cannot be read."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        return set(FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception:  # noqa: BLE001 - any failure: read_sharded reports it
        return None


def _cause(e) -> str:
    """What a CheckpointException's failures say is wrong: the lowest rank's error that has a message (a rank whose
    own read went well fails in DCP's gather with an empty EOFError while another rank's file is damaged), with
    its type and rank when ranks differ."""
    failures = sorted((rank, f[0] if isinstance(f, tuple) else f) for rank, f in (e.failures or {}).items())
    if not failures:
        return str(e)
    told = [(rank, err) for rank, err in failures if str(err)] or failures
    rank, err = told[0]
    where = f" (rank {rank})" if len({type(x) for _, x in failures}) > 1 or len(told) < len(failures) else ""
    return f"{type(err).__name__}{where}: {err}"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_meant():
    """Silences DCP's warning that, without a process group, it assumes one process: that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        yield


def _not_a_metadata_fallback(record: logging.LogRecord) -> bool:
    return not (record.module == "state_dict_loader" and "metadata is not found" in str(record.msg))


@contextlib.contextmanager
def _metadata_fallbacks_unlogged():
    """Keeps off stderr the tracebacks DCP's loader logs (on the root logger, as warnings) when a folder's
    ``.metadata`` is missing or damaged: ``read_sharded``'s error names both reasons."""
    root = logging.getLogger()
    root.addFilter(_not_a_metadata_fallback)
    try:
        yield
    finally:
        root.removeFilter(_not_a_metadata_fallback)


def as_local(value: torch.Tensor) -> torch.Tensor:
    """A whole (replicated) ``DTensor``'s value as a plain tensor; other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
