import os

import pytest
import torch

# Without a GPU the Triton kernels can only run in Triton's interpreter, and Triton fixes the
# mode of its own language functions when it is first imported -- which torch.compile's tests
# may do long before the Triton tests run. So such a session starts in interpreter mode.
# (Automatic backend selection still picks the native CPU kernels: see llmcore/ops/dispatch.py.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmcore

# Tests compare llmcore against torch in the same run: give both the same threads.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def supported_isas() -> list[str]:
    """The CPU kernels this build and this CPU can run (the selected one first)."""
    out = []
    best = llmcore._C.best_cpu_isa()
    for isa in llmcore._C.compiled_isas():
        try:
            llmcore._C.set_cpu_isa(isa)
        except ValueError:
            continue
        out.append(isa)
    llmcore._C.set_cpu_isa(best)
    return out


@pytest.fixture(params=supported_isas())
def cpu_isa(request):
    """Runs a test once per CPU kernel ISA, restoring the default afterwards."""
    best = llmcore._C.best_cpu_isa()
    llmcore._C.set_cpu_isa(request.param)
    yield request.param
    llmcore._C.set_cpu_isa(best)


def _kernel_variants() -> list[str]:
    """The CPU ISAs, and the AVX512-BF16 twin of the AVX-512 kernels where the CPU has it."""
    out = []
    for isa in supported_isas():
        out.append(isa)
        if isa == "avx512" and llmcore._C.norm_bf16_instructions_available():
            out.append("avx512+bf16")
    return out


@pytest.fixture(params=_kernel_variants())
def kernels(request):
    """Runs a test once per kernel variant, restoring the defaults afterwards."""
    isa, _, bf16 = request.param.partition("+")
    bf16_default = llmcore._C.norm_bf16_instructions()
    llmcore._C.set_cpu_isa(isa)
    if llmcore._C.norm_bf16_instructions_available():
        llmcore._C.set_norm_bf16_instructions(bool(bf16))
    yield request.param
    llmcore._C.set_cpu_isa(llmcore._C.best_cpu_isa())
    if llmcore._C.norm_bf16_instructions_available():
        llmcore._C.set_norm_bf16_instructions(bf16_default)
