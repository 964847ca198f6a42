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
