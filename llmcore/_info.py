"""What this build of llmcore can do on this machine."""
from __future__ import annotations

from typing import Any

from llmcore import _C
from llmcore._version import __version__


def _triton_available() -> bool:
    from llmcore.ops import triton as triton_ops

    if not triton_ops.usable():  # none, or older than triton_ops.MIN_VERSION: the backend's reason says which
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is "not available", not a crash
        return False
    return True


def info() -> dict[str, Any]:
    """Version, CPU ISA, threads, CUDA/Triton availability and the attention backends.

    ``backends`` maps each attention backend to ``{"available": bool, "reason": str | None}``,
    the reason saying why it cannot run here.
    """
    import torch

    from llmcore.ops import triton as triton_ops
    from llmcore.ops.dispatch import availability

    return {
        "version": __version__,
        "cpu_isa": _C.cpu_isa(),
        "cpu_isas_compiled": list(_C.compiled_isas()),
        "cpu_features": dict(_C.cpu_features()),
        "amx_bf16_kernels": bool(_C.amx_enabled()),
        "avx512_bf16_attention_kernels": bool(_C.bf16_dot_enabled()),
        "omp_threads": _C.num_threads(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_built": bool(_C.cuda_built),
        "cuda_available": bool(torch.cuda.is_available()),
        "cuda_devices_seen_by_llmcore": _C.cuda_device_count(),
        "triton_available": _triton_available(),
        "triton_version": triton_ops.version(),
        "backends": {name: {"available": reason is None, "reason": reason} for name, reason in availability().items()},
    }
