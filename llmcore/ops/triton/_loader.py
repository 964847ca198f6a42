"""Loads a kernel module once per mode: compiled for CUDA tensors, interpreted for CPU tensors.

``@triton.jit`` decides at decoration time, from ``TRITON_INTERPRET``, whether a function
is compiled or run by Triton's interpreter. Importing the kernel modules normally would
freeze that choice at whatever the environment said on first import (a test collected
earlier, a conftest, a notebook cell). Instead each mode gets its own instance of the
module, executed with ``TRITON_INTERPRET`` set for the duration: CPU tensors always meet
interpreted kernels and CUDA tensors compiled ones, whatever the import order. Whether a
CPU tensor may use them at all is the caller's decision (TRITON_INTERPRET=1 at call time).

One exception: while :func:`llmcore.ops.triton.aot.compiling_for` is active, every device
gets the compiled modules (their launches are compiled for the chosen GPU, never run), and
:func:`multiprocessors` answers for that GPU.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from types import ModuleType

import torch

_LOCK = threading.RLock()  # a kernel module loads its helpers while the lock is held
_MODULES: dict[tuple[str, bool], ModuleType] = {}
_OFFLINE: list = []  # the architecture aot.compiling_for compiles for, while it does (it does not nest)


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (TRITON_INTERPRET=1) right now."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def offline():
    """The architecture ``aot.compiling_for`` compiles for right now, or None."""
    return _OFFLINE[-1] if _OFFLINE else None


def kernels(name: str, device: torch.device) -> ModuleType:
    """The kernel module ``llmcore.ops.triton.<name>`` in the mode ``device`` needs."""
    return load(name, device.type != "cuda" and offline() is None)


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU that the kernels for ``device`` are launched (or compiled) for."""
    arch = offline()
    if arch is not None:
        return arch.multiprocessors
    return torch.cuda.get_device_properties(device).multi_processor_count


def load(name: str, interpret: bool) -> ModuleType:
    """The kernel module ``llmcore.ops.triton.<name>``, compiled or interpreted."""
    key = (name, interpret)
    mod = _MODULES.get(key)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                mod = _MODULES[key] = _load(name, interpret)
    return mod


def _load(name: str, interpret: bool) -> ModuleType:
    import triton

    spec = importlib.util.find_spec(f"{__package__}.{name}")
    mod = importlib.util.module_from_spec(spec)
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    pinned = None if knobs is None else knobs.__dict__.pop("interpret", None)  # a value set in code beats the env
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        if pinned is not None:
            knobs.__dict__["interpret"] = pinned
    kinds = {type(v).__name__ for v in vars(mod).values()} & {"JITFunction", "InterpretedFunction"}
    if kinds != {"InterpretedFunction" if interpret else "JITFunction"}:  # pragma: no cover - another Triton
        raise RuntimeError(f"could not load {name} {'with' if interpret else 'without'} Triton's interpreter")
    mod.INTERPRET = interpret
    return mod
