"""Triton kernels: fused attention (forward and backward), LayerNorm / RMSNorm, and the
chunked LM-head cross-entropy. They are the ``triton`` backend of :mod:`llmcore.ops`.

They run on CUDA tensors, and on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` (that is how CI tests them). Nothing here imports Triton until a
kernel is first launched: ``import llmcore`` stays cheap, and the mode each kernel module
is compiled in is chosen per call (see ``_loader``).

- ``attention``: ``sdpa`` and ``varlen`` (FlashAttention-2: causal, masks, GQA, dropout)
- ``norm``: ``layer_norm`` and ``rms_norm`` with the residual add fused
- ``cross_entropy``: ``linear_cross_entropy``
- ``rotary``: the rotation of :func:`llmcore.ops.rotary_embedding` (whose custom ops call it)
- ``aot``: compiles all of them for a GPU architecture without a GPU, and reports registers,
  spills, shared memory and tensor-core use per kernel (``python -m llmcore.ops.triton.aot``)
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Optional

import torch

from llmcore.ops.triton._loader import interpreting, offline

__all__ = ["installed", "version", "usable", "missing", "unavailable", "interpreting", "MIN_VERSION"]

# The oldest Triton the kernels are checked with: the interpreter tests (CPU) and the aot compile for sm_90 pass
# with 3.4.0, 3.5.1, 3.6.0 (the GPU check's) and 3.9.0. 3.2 and 3.3 lack triton.tools.tensor_descriptor (the
# TMA dQ mode) and are not compile-checked; 3.1's interpreter leaves the kernels' outputs unwritten.
MIN_VERSION = (3, 4)
# Triton 3.4-3.6's interpreter converts 1-element arrays to ints, which numpy 2.4 refuses ("only 0-dimensional
# arrays can be converted to Python scalars", raised from inside a kernel); fixed in Triton 3.7.
_INTERPRETER_NUMPY = ((3, 7), (2, 4))  # Triton older than the first needs numpy older than the second
_MIN = ".".join(map(str, MIN_VERSION))
_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")  # all install `triton`


def _release(text: Optional[str]) -> Optional[tuple[int, int]]:
    """(major, minor) of a version string such as "3.4.0" or "3.5.0+git1a2b3c", or None."""
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _distribution_version(names) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _missing(found: bool, version: Optional[str]) -> Optional[str]:
    """Why the Triton found (``version``, None when no distribution names it) cannot be used, or None."""
    if not found:
        return f"triton is not installed (pip install 'triton>={_MIN}')"
    release = _release(version)
    if release is not None and release < MIN_VERSION:
        return (f"triton {version} is older than {_MIN}, the oldest release llmcore's kernels are checked with "
                f"(pip install -U 'triton>={_MIN}')")
    return None


def _interpreter_problem(triton_version: Optional[str], numpy_version: Optional[str]) -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels with these versions installed, or None."""
    triton_release, numpy_release = _release(triton_version), _release(numpy_version)
    first_fixed, numpy_breaks = _INTERPRETER_NUMPY
    if triton_release is None or numpy_release is None:
        return None
    if triton_release < first_fixed and numpy_release >= numpy_breaks:
        return (f"Triton {triton_version}'s interpreter fails with numpy {numpy_version} (it needs numpy < 2.4; "
                "Triton 3.7 and newer work with it): pip install 'numpy<2.4' or -U triton")
    return None


# Once, at import (path and metadata lookups, not an import of Triton): backend checks run inside torch.compile traces.
_INSTALLED = importlib.util.find_spec("triton") is not None
_VERSION = _distribution_version(_DISTRIBUTIONS) if _INSTALLED else None
_MISSING = _missing(_INSTALLED, _VERSION)
_INTERPRETER = None if _MISSING else _interpreter_problem(_VERSION, _distribution_version(("numpy",)))


def installed() -> bool:
    """Whether a Triton package can be found (without importing it), whatever its version."""
    return _INSTALLED


def version() -> Optional[str]:
    """The installed Triton's version, read from its distribution's metadata without importing it, or None."""
    return _VERSION


def usable() -> bool:
    """Whether a Triton the kernels support (``MIN_VERSION`` or newer) is installed; the automatic choice
    of the ``triton`` backend for CUDA tensors asks this."""
    return _MISSING is None


def missing() -> Optional[str]:
    """Why no usable Triton is installed (none, or one older than ``MIN_VERSION``), or None."""
    return _MISSING


def unavailable(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on tensors of ``device``, or None if they can."""
    if _MISSING:
        return _MISSING
    if device.type == "cuda" or offline():  # offline: compiled for a GPU by aot.compiling_for, never run
        return None
    if device.type == "cpu":
        if interpreting():
            return _INTERPRETER
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1"
    return f"device {device.type} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
