"""bias_gelu and swiglu (llmcore.ops.activation): forward and gradients against float64,
with torch's composite in the same dtype as the yardstick (error at most twice torch's plus
a small floor), custom-op checks, torch.compile, fallbacks and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_close_to_truth, f64, outputs_and_grads

from llmcore.ops import bias_gelu, swiglu
from llmcore.ops.activation import bias_gelu_reference, swiglu_reference

SHAPES = [(1, 1), (3, 33), (2, 5, 384), (4, 768), (2, 3, 97)]
DTYPES = [torch.float32, torch.bfloat16]


def _run(fn, inputs, grad_out):
    outs, grads = outputs_and_grads(fn, inputs, [grad_out])
    return [*outs, *grads]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_matches_float64(kernels, shape, dtype, approximate):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)  # reaches both tails
    b = torch.randn(shape[-1], generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)  # the same upstream gradients for the truth
    ours = _run(lambda x, b: bias_gelu(x, b, approximate), [x, b], gy)
    theirs = _run(lambda x, b: bias_gelu_reference(x, b, approximate), [x, b], gy)
    truth = _run(lambda x, b: bias_gelu_reference(x, b, approximate), f64([x, b]), gy)
    assert_close_to_truth(ours, theirs, truth, dtype, f"bias_gelu {approximate}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_float64(kernels, shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(shape, generator=g) * 4).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)  # the same upstream gradients for the truth
    ours = _run(swiglu, [gate, up], gy)
    theirs = _run(swiglu_reference, [gate, up], gy)
    truth = _run(swiglu_reference, f64([gate, up]), gy)
    assert_close_to_truth(ours, theirs, truth, dtype, "swiglu")


def _gelu_f64(x, approximate):
    """GELU in float64 without the cancellation of 1 + erf(x / sqrt(2)) for negative x
    (torch's own float64 gelu returns 0 from x = -9 on)."""
    x = x.double()
    if approximate == "tanh":
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    return x * 0.5 * torch.special.erfc(-x / math.sqrt(2))


def test_gelu_tails_and_special_values(kernels):
    """Relative accuracy far into the negative tail (where torch's 1 + erf cancels), inf and NaN."""
    x = torch.tensor([-30.0, -12.0, -9.0, -6.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 6.0, 30.0, float("inf"), float("nan")])
    for approximate in ("none", "tanh"):
        y = bias_gelu(x, None, approximate)
        torch.testing.assert_close(y[:-2].double(), _gelu_f64(x[:-2], approximate), rtol=1e-5, atol=1e-37)
        assert y[-2] == float("inf") and y[-1].isnan()


def test_float16(kernels):
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(5, 70, generator=g).half(), torch.randn(5, 70, generator=g).half()
    b = torch.randn(70, generator=g).half()
    for approximate in ("none", "tanh"):
        ours = _run(lambda x, b: bias_gelu(x, b, approximate), [x, b], gy)
        theirs = _run(lambda x, b: bias_gelu_reference(x, b, approximate), [x, b], gy)
        truth = _run(lambda x, b: bias_gelu_reference(x, b, approximate), f64([x, b]), gy)
        assert_close_to_truth(ours, theirs, truth, torch.float16, f"bias_gelu {approximate}")
    ours = _run(swiglu, [x, x.flip(0)], gy)
    theirs = _run(swiglu_reference, [x, x.flip(0)], gy)
    truth = _run(swiglu_reference, f64([x, x.flip(0)]), gy)
    assert_close_to_truth(ours, theirs, truth, torch.float16, "swiglu")


def test_fused_gate_up_halves_are_read_in_place():
    gu = torch.randn(2, 7, 2 * 45, requires_grad=True)
    y = swiglu(gu[..., :45], gu[..., 45:])
    gy = torch.randn(2, 7, 45)
    (gg,) = torch.autograd.grad(y, gu, gy)
    gu2 = gu.detach().clone().requires_grad_()
    y2 = swiglu_reference(gu2[..., :45], gu2[..., 45:])
    (gg2,) = torch.autograd.grad(y2, gu2, gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gg, gg2)


def test_mixed_bias_dtype_and_fallbacks():
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    b32 = torch.randn(10)
    y = bias_gelu(x, b32)  # promotes to float32, as x + b32 does: the reference path
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.gelu(x + b32))
    x64 = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(swiglu(x64, x64), swiglu_reference(x64, x64))
    xm = torch.empty(3, 10, device="meta")
    assert bias_gelu(xm, torch.empty(10, device="meta")).shape == (3, 10)
    assert swiglu(xm, xm).device.type == "meta"


def test_frozen_bias_and_empty():
    x = torch.randn(6, 20, requires_grad=True)
    b = torch.randn(20)
    bias_gelu(x, b).sum().backward()
    assert b.grad is None and x.grad.shape == (6, 20)
    e = torch.randn(0, 20, requires_grad=True)
    be = torch.randn(20, requires_grad=True)
    bias_gelu(e, be).sum().backward()
    assert (be.grad == 0).all()
    assert swiglu(e, e).shape == (0, 20)


def test_bad_input_names_the_argument():
    x = torch.randn(3, 20)
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_gelu(x, torch.zeros(21))
    with pytest.raises(ValueError, match="approximate must be"):
        bias_gelu(x, None, approximate="erf")
    with pytest.raises(TypeError, match="gate must be floating point"):
        swiglu(torch.ones(3, dtype=torch.int32), x)


def test_opcheck():
    x = torch.randn(3, 5, 37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.llmcore.bias_gelu_fwd.default, (x, b, approximate))
    torch.library.opcheck(torch.ops.llmcore.bias_gelu_fwd.default, (x, None, "none"))
    torch.library.opcheck(torch.ops.llmcore.swiglu_fwd.default, (x, torch.randn(3, 5, 37, requires_grad=True)))
    gy = torch.randn(3, 5, 37)
    torch.library.opcheck(torch.ops.llmcore.bias_gelu_bwd.default, (gy, x.detach(), b.detach(), "tanh", True))
    torch.library.opcheck(torch.ops.llmcore.swiglu_bwd.default, (gy, x.detach(), gy))


def test_custom_ops_and_eager_functions_agree():
    g = torch.Generator().manual_seed(2)
    x, b, gy = torch.randn(4, 50, generator=g), torch.randn(50, generator=g), torch.randn(4, 50, generator=g)
    ops = torch.ops.llmcore
    for public, op, inputs in [
        (lambda x, b: bias_gelu(x, b), lambda x, b: ops.bias_gelu_fwd(x, b, "none"), [x, b]),
        (lambda x, b: bias_gelu(x, b, "tanh"), lambda x, b: ops.bias_gelu_fwd(x, b, "tanh"), [x, b]),
        (swiglu, ops.swiglu_fwd, [x, x.flip(0)]),
    ]:
        for a, c in zip(_run(public, inputs, gy), _run(op, inputs, gy)):
            torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """All four fused ops in one compiled graph (inductor: the custom ops stay opaque)."""
    from llmcore.ops import layer_norm, rms_norm

    x, r = torch.randn(2, 9, 96, requires_grad=True), torch.randn(2, 9, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)

    def f(x, r, w, b):
        h, s = layer_norm(x, w, b, residual=r)
        y, s2 = rms_norm(h, w, residual=s)
        z = bias_gelu(y, b, "tanh")
        return (swiglu(z[..., :48], z[..., 48:]) * s2[..., :48]).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager = torch.autograd.grad(f(x, r, w, b), (x, r, w, b))
    got = torch.autograd.grad(compiled(x, r, w, b), (x, r, w, b))
    for a, c in zip(eager, got):
        torch.testing.assert_close(a, c)
