"""Which aten ops a piece of Python runs, for tests that pin down the work around a kernel."""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that write zeros over a whole tensor: on a GPU, a memset kernel and its bandwidth (slice_backward: a zero
# tensor of the sliced input's size with the gradient copied in).
ZERO_FILLS = ("aten.zeros", "aten.new_zeros", "aten.zeros_like", "aten.zero_", "aten.fill_", "aten.slice_backward")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn) -> Counter:
    """aten op name (e.g. "aten.zeros") -> calls while ``fn()`` runs (autograd's backward included)."""
    with _Ops() as mode:
        fn()
    return mode.ops


def zero_fills(fn) -> dict:
    """The ZERO_FILLS ops ``fn()`` runs, with their counts."""
    return {k: n for k, n in aten_ops(fn).items() if k in ZERO_FILLS}
