"""Shape broadcasting in plain Python, for the ops' argument checks: ``torch.broadcast_shapes`` raises a
RuntimeError that the checks caught to raise their own ValueError, but under torch.compile the failure happens
inside a fake-tensor call dynamo cannot catch, and came out as torch's TorchRuntimeError instead (a probe)."""
from __future__ import annotations

from typing import Optional, Sequence


def broadcast_shape(*shapes: Sequence[int]) -> Optional[tuple]:
    """The shape ``shapes`` broadcast to (NumPy's rules, as torch.broadcast_shapes), or None where they do not."""
    out = []
    for i in range(1, max((len(s) for s in shapes), default=0) + 1):
        dim = 1
        for s in shapes:
            d = s[-i] if i <= len(s) else 1
            if d != 1:
                if dim != 1 and d != dim:
                    return None
                dim = d
        out.append(dim)
    return tuple(reversed(out))


def broadcasts_to(shape: Sequence[int], to: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``to`` itself (``to`` unchanged)."""
    return len(shape) <= len(to) and all(d in (1, t) for d, t in zip(reversed(shape), reversed(to)))
