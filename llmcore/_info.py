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


_ISAS = ("avx512", "avx2", "portable")
# switches read as "any value but '' or '0'" (the native module's), or "anything but '0'" (the row-sparse AdamW of
# embeddings, the bf16 weight copies: on unless "0"), with what a "false" / "off" / "no" there does
_SWITCHES = {"LLMCORE_DISABLE_AMX": "disables it: any value but '' or '0' does",
             "LLMCORE_DISABLE_AVX512_BF16": "disables it: any value but '' or '0' does",
             "LLMCORE_LAZY_EMBEDDING": "leaves it on: only '0' turns it off",
             "LLMCORE_BF16_WEIGHTS": "leaves it on: only '0' turns it off"}


def check_environment() -> None:
    """Warns (at import) about llmcore's environment variables the native module reads silently: an unknown
    LLMCORE_CPU_ISA is ignored (the CPU's best ISA runs), a LLMCORE_DISABLE_* switch disables for any value
    but "" and "0", "false" and "off" included, and LLMCORE_LAZY_EMBEDDING / LLMCORE_BF16_WEIGHTS turn off for "0"
    only ("false" and "off" leave them on)."""
    import os
    import warnings

    isa = os.environ.get("LLMCORE_CPU_ISA")
    if isa is not None and isa not in _ISAS:
        warnings.warn(f"LLMCORE_CPU_ISA={isa!r} is not one of {', '.join(_ISAS)} (lower case, as written): it is "
                      f"ignored, and the CPU's best ISA runs ({_C.cpu_isa()})", stacklevel=3)
    for name, effect in _SWITCHES.items():
        value = os.environ.get(name)
        if value and value != "0" and value.strip().lower() in ("false", "off", "no", "0"):
            warnings.warn(f"{name}={value!r} {effect}", stacklevel=3)


def info() -> dict[str, Any]:
    """Version, CPU ISA, threads, CUDA/Triton availability and the attention backends.

    ``backends`` maps each attention backend to ``{"available": bool, "reason": str | None}``,
    the reason saying why it cannot run here.
    """
    import torch

    from llmcore.ops import dispatch
    from llmcore.ops import triton as triton_ops

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
        "backends": {name: {"available": reason is None, "reason": reason}
                     for name, reason in dispatch.availability().items()},
        # LLMCORE_ATTENTION_BACKEND's backend, which every attention call takes unless it names another (or None)
        "attention_backend_forced": dispatch._DEFAULT_BACKEND,
    }
