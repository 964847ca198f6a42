"""The accuracy rule of the elementwise and row kernels' tests (norms, activations; CPU and Triton), as
FlashAttention's tests judge theirs: against a float64 truth, an output's largest error is at most twice
the error of torch's own composite in the same dtype, plus a floor of about one rounding of the dtype
(times the largest |truth|)."""
from __future__ import annotations

import torch

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # x the largest |truth|


def f64(ts):
    return [None if t is None else t.detach().double() for t in ts]


def assert_close_to_truth(ours, theirs, truth, dtype, what):
    for i, (a, b, t) in enumerate(zip(ours, theirs, truth)):
        assert a.shape == t.shape and a.dtype == b.dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {t.shape} {b.dtype}"
        err = (a.double() - t).abs().max().item()
        ref_err = (b.double() - t).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, t.abs().max().item())
        assert err <= 2 * ref_err + floor, f"{what}[{i}]: error {err:.3g} vs torch's {ref_err:.3g} (floor {floor:.3g})"


def outputs_and_grads(fn, inputs, grad_outs, device=None):
    """fn's outputs and the gradients of sum(out * grad_out) for every input that is not None, computed on
    ``device`` (default: where the inputs are) and returned on the CPU."""
    leaves = [None if t is None else t.detach().to(device or t.device, copy=True).requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, used, [g.to(o.device, o.dtype) for o, g in zip(outs, grad_outs)])
    return [o.detach().cpu() for o in outs], [g.cpu() for g in grads]


def norm_inputs(shape, dtype, residual, seed=0):
    """(x, residual or None, weight, bias, grad of y, grad of s) for a LayerNorm / RMSNorm test."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)  # an offset mean tests the variance
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    w = (torch.randn(n, generator=g) * 0.5 + 1).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)  # the same upstream gradients for the truth
    gs = torch.randn(shape, generator=g).to(dtype)
    return x, r, w, b, gy, gs


def overflowing_norm_rows(dtype, width, device="cpu"):
    """Rows 1 and 3 of 4 whose sums fit float32 but whose squared deviations (~1e40) overflow it (rows 0 and 2
    are ordinary), with a weight, a bias and an output gradient."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, width, generator=g)
    x[1] *= 1e20
    x[3, ::3] = 5e19
    w, b, gy = torch.randn(width, generator=g), torch.randn(width, generator=g), torch.randn(4, width, generator=g)
    return [t.to(device, dtype) for t in (x, w, b, gy)]


def layer_norm_with_grads(fn, x, w, b, gy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(gy)
    return [y.detach().float().cpu(), x.grad.float().cpu(), w.grad.float().cpu(), b.grad.float().cpu()]


def check_norm_overflow_like_torch(ours, theirs, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for name, a, t in zip(("y", "dx", "dw", "db"), ours, theirs):
        assert torch.equal(a.isnan(), t.isnan()), name
        torch.testing.assert_close(a, t, equal_nan=True, **tol, msg=name)
    assert ours[0][[1, 3]].isnan().all() and not ours[0][[0, 2]].isnan().any()
