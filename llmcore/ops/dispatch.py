"""Choosing an attention backend.

Each backend declares what it supports; ``select`` returns the first that fits, or raises
an error that lists every backend with the reason it was passed over.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

__all__ = ["AttentionCall", "Backend", "BACKENDS", "BackendUnavailableError", "select", "availability"]


class BackendUnavailableError(RuntimeError):
    """A backend named for a call (``backend=...``, or ``LLMCORE_ATTENTION_BACKEND``) cannot run it: the message
    says why. Its own class, so that callers tell it from an error of the call's inputs."""


class AttentionCall(NamedTuple):
    """What a backend needs to know to decide whether it can run a call (a tuple: built on
    every attention call, and a frozen dataclass's __init__ costs a setattr per field)."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    mask: str  # "none", "bool", "additive"
    mask_requires_grad: bool
    varlen: bool
    dropout: bool
    sequences: int = 1  # the batch (dense: the product of the batch dims) or varlen's number of sequences
    heads: int = 1  # query heads


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    masks: tuple[str, ...]
    varlen: bool
    mask_grad: bool
    # Returns why the backend cannot run on this machine at all, or None.
    unavailable: Callable[[], Optional[str]]

    def why_not(self, call: AttentionCall) -> Optional[str]:
        """The reason this backend cannot run ``call``, or None if it can."""
        if call.device.type not in self.devices:
            return f"device {call.device.type} not supported (supports {', '.join(self.devices)})"
        reason = self.unavailable()
        if reason:
            return reason
        if call.dtype not in self.dtypes:
            return f"dtype {call.dtype} not supported (supports {', '.join(str(d) for d in self.dtypes)})"
        if max(call.head_dim, call.head_dim_v) > self.max_head_dim:
            return f"head dim {max(call.head_dim, call.head_dim_v)} > {self.max_head_dim}"
        if call.mask not in self.masks:
            return f"{call.mask} masks not supported"
        if call.mask_requires_grad and not self.mask_grad:
            return "attn_mask requires grad, and this backend does not differentiate the mask"
        if call.varlen and not self.varlen:
            return "varlen not supported"
        return None


def _probe_cpu() -> Optional[str]:
    try:
        from llmcore import _C  # noqa: F401
    except ImportError as e:  # pragma: no cover - the package imports _C itself
        return f"native module failed to import: {e}"
    return None


_CPU_REASON = _probe_cpu()  # once, at import: backend checks run inside torch.compile traces


def _cpu_unavailable() -> Optional[str]:
    return _CPU_REASON


def _cuda_unavailable() -> Optional[str]:
    from llmcore.ops import cuda_attention  # imports only torch and _C; the answer is cached per device

    return cuda_attention.unavailable()


_CUDA_GRID = 65535  # a CUDA grid's y and z: the CUDA kernels put the heads and sequences there, in one launch


class _CudaBackend(Backend):
    """The CUDA C++ kernels have no dropout, and launch every sequence and head at once: such calls go to the
    next backend (the Triton kernels split them), with these reasons."""

    def why_not(self, call: AttentionCall) -> Optional[str]:
        reason = super().why_not(call)
        if reason:
            return reason
        if call.dropout:
            return "dropout not supported"
        if call.sequences > _CUDA_GRID or call.heads > _CUDA_GRID:
            return (f"{call.sequences} sequences x {call.heads} heads: more than {_CUDA_GRID} of either in one "
                    "call not supported (one kernel launch)")
        return None


def _triton_unavailable() -> Optional[str]:
    from llmcore.ops import triton as triton_ops  # light: finds Triton without importing it

    reason = triton_ops.missing()
    if reason:
        return reason
    if torch.cuda.is_available() or triton_ops.interpreting():  # the first on a GPU: no environment read a call
        return None
    return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, in Triton's interpreter)"


class _TritonBackend(Backend):
    """CPU tensors only under TRITON_INTERPRET=1 (how CI tests the kernels). The entry sits after "cpu", so
    automatic selection keeps the native CPU kernels and only ``backend="triton"`` reaches the interpreter."""

    def why_not(self, call: AttentionCall) -> Optional[str]:
        if call.device.type == "cpu":
            from llmcore.ops import triton as triton_ops

            reason = triton_ops.unavailable(call.device)  # the interpreter off, or one that cannot run here
            if reason:
                return reason
        return super().why_not(call)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# In order of preference. CUDA tensors: "triton", then "cuda": on the H200 (benchmarks/results/gpu-nvidia-h200.md,
# one run, bf16 (4, 32, 4096, 128)) Triton ran 1.3-1.8x the CUDA C++ kernels in each of forward / forward+backward,
# causal or not (e.g. causal fwd+bwd 377 vs 221 TFLOP/s); "cuda" serves where Triton is missing. CPU tensors: "cpu"
# (before "triton", which reaches them only under the interpreter and only when asked for).
BACKENDS: tuple[Backend, ...] = (
    Backend("cpu", ("cpu",), _FLOATS, 256, ("none", "bool", "additive"), True, False, _cpu_unavailable),
    _TritonBackend("triton", ("cuda", "cpu"), _FLOATS, 256, ("none", "bool", "additive"), True, False,
                   _triton_unavailable),
    _CudaBackend("cuda", ("cuda",), (torch.bfloat16, torch.float16), 256, ("none",), True, False,
                 _cuda_unavailable),
    Backend("reference", ("cpu", "cuda", "mps", "xpu", "meta"), _FLOATS + (torch.float64,), 1 << 30,
            ("none", "bool", "additive"), True, True, lambda: None),
)
_BY_NAME = {b.name: b for b in BACKENDS}


# Read once, when llmcore.ops is imported (an os.environ lookup on every attention call cost
# more than the rest of the selection).
_DEFAULT_BACKEND = os.environ.get("LLMCORE_ATTENTION_BACKEND") or None
if _DEFAULT_BACKEND is not None and _DEFAULT_BACKEND not in _BY_NAME:
    raise ValueError(f"LLMCORE_ATTENTION_BACKEND={_DEFAULT_BACKEND!r} is unknown; choose one of {', '.join(_BY_NAME)} "
                     "(or unset it)")


def select(call: AttentionCall, backend: Optional[str] = None) -> Backend:
    """The backend to run ``call`` on: ``backend`` if given (and able), else the first that fits.

    ``LLMCORE_ATTENTION_BACKEND``, set in the environment before llmcore.ops is imported, acts
    as a default for ``backend``.
    """
    backend = backend or _DEFAULT_BACKEND
    if backend is not None:
        if backend not in _BY_NAME:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {', '.join(_BY_NAME)}")
        chosen = _BY_NAME[backend]
        reason = chosen.why_not(call)
        if reason:
            raise BackendUnavailableError(f"backend={backend!r} cannot run this call: {reason}")
        return chosen
    for b in BACKENDS:
        # The device test first: no reason string is built for the backends a call passes over.
        if call.device.type in b.devices and b.why_not(call) is None:
            return b
    reasons = "\n".join(f"  {b.name}: {b.why_not(call)}" for b in BACKENDS)
    raise RuntimeError("no attention backend fits this call:\n" + reasons)


def availability() -> dict[str, Optional[str]]:
    """Each backend's name -> None if it can run on this machine, else the reason it cannot."""
    return {b.name: b.unavailable() for b in BACKENDS}
