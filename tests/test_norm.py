"""LayerNorm and RMSNorm (llmcore.ops.norm): forward and every gradient against float64
references, HF LlamaRMSNorm parity in bfloat16, custom-op checks, torch.compile, fallbacks
and bad input.

Accuracy rule (as FlashAttention's tests): the kernel's error against the float64 truth is
at most twice torch's own error in the same dtype, plus a small floor.
"""
import pytest
import torch
import torch.nn.functional as F
from accuracy import (assert_close_to_truth, check_norm_overflow_like_torch, f64, layer_norm_with_grads, norm_inputs,
                      outputs_and_grads, overflowing_norm_rows)

from llmcore.ops import layer_norm, rms_norm
from llmcore.ops.norm import layer_norm_reference, rms_norm_reference

SHAPES = [(1, 1), (5, 1), (3, 33), (2, 5, 384), (4, 768), (2, 3, 97)]
DTYPES = [torch.float32, torch.bfloat16]
_run = outputs_and_grads


def _torch_layer_norm(x, w, b, r=None, eps=1e-5):
    """The unfused composite in x's dtype: what llmcore replaces."""
    s = x + r if r is not None else x
    y = F.layer_norm(s, (s.size(-1),), w, b, eps)
    return (y, s) if r is not None else y


def _hf_rms_norm(x, w, r=None, eps=1e-6):
    return rms_norm_reference(x, w, eps, r)


# --- accuracy against float64 ------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_float64(kernels, shape, dtype, residual):
    x, r, w, b, gy, gs = norm_inputs(shape, dtype, residual)
    grad_outs = [gy, gs] if residual else [gy]
    ours = _run(lambda x, w, b, r=None: layer_norm(x, w, b, 1e-5, r), [x, w, b, r], grad_outs)
    theirs = _run(lambda x, w, b, r=None: _torch_layer_norm(x, w, b, r), [x, w, b, r], grad_outs)
    truth = _run(lambda x, w, b, r=None: layer_norm_reference(x, w, b, 1e-5, r), f64([x, w, b, r]), grad_outs)
    assert all(o.dtype == dtype for o in ours[0])
    for k, what in enumerate(["outputs", "grads"]):
        assert_close_to_truth(ours[k], theirs[k], truth[k], dtype, what)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_float64(kernels, shape, dtype, residual):
    x, r, w, _, gy, gs = norm_inputs(shape, dtype, residual)
    grad_outs = [gy, gs] if residual else [gy]
    ours = _run(lambda x, w, r=None: rms_norm(x, w, 1e-6, r), [x, w, r], grad_outs)
    theirs = _run(lambda x, w, r=None: _hf_rms_norm(x, w, r), [x, w, r], grad_outs)
    truth = _run(lambda x, w, r=None: rms_norm_reference(x, w, 1e-6, r), f64([x, w, r]), grad_outs)
    assert all(o.dtype == dtype for o in ours[0])
    for k, what in enumerate(["outputs", "grads"]):
        assert_close_to_truth(ours[k], theirs[k], truth[k], dtype, what)


@pytest.mark.parametrize("fn", ["layer", "rms"])
def test_float16_and_mixed_weight(fn):
    """float16 inputs, and 16-bit inputs with float32 parameters (mixed precision)."""
    pairs = [(torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    for dtype, pdtype in pairs:
        x, r, w, b, gy, gs = norm_inputs((6, 130), dtype, True, seed=1)
        w, b = w.to(pdtype), b.to(pdtype)
        if fn == "layer":
            ours = _run(lambda x, w, b, r: layer_norm(x, w, b, 1e-5, r), [x, w, b, r], [gy, gs])
            ref = _run(lambda x, w, b, r: layer_norm_reference(x, w, b, 1e-5, r), [x, w, b, r], [gy, gs])
            truth = _run(lambda x, w, b, r: layer_norm_reference(x, w, b, 1e-5, r), f64([x, w, b, r]), [gy, gs])
        else:
            ours = _run(lambda x, w, r: rms_norm(x, w, 1e-6, r), [x, w, r], [gy, gs])
            ref = _run(lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), [x, w, r], [gy, gs])
            truth = _run(lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), f64([x, w, r]), [gy, gs])
        assert [o.dtype for o in ours[0]] == [o.dtype for o in ref[0]]  # rms: promote(x, weight), as HF
        assert [g.dtype for g in ours[1]] == [g.dtype for g in ref[1]]
        for k, what in enumerate(["outputs", "grads"]):
            assert_close_to_truth(ours[k], ref[k], truth[k], dtype, f"{fn} {dtype} {pdtype} {what}")


def test_rms_norm_is_hf_llama_rms_norm_in_bfloat16():
    """Bit-for-bit HF LlamaRMSNorm, but where float32 sums in another order round a value
    to the other side of a bfloat16 tie (rare, and then one ulp)."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    n = 768
    hf = modeling.LlamaRMSNorm(n, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(n) * 0.3 + 1)
    x = torch.randn(64, n).to(torch.bfloat16) * 4
    want, got = hf(x), rms_norm(x, hf.weight, 1e-6)
    assert got.dtype == want.dtype == torch.bfloat16
    diff = (got.float() - want.float()).abs()
    assert (diff > 0).float().mean().item() < 1e-3
    ulp = want.float().abs().clamp_min(1e-30) * 2.0**-7
    assert (diff <= ulp).all()


def test_layer_norm_matches_torch_exactly_enough_in_float32():
    x = torch.randn(16, 384) * 3 + 1
    w, b = torch.randn(384), torch.randn(384)
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (384,), w, b), rtol=1e-5, atol=2e-6)


# --- layouts, optional parameters, gradients ----------------------------------------------


def test_strided_and_broadcast_inputs():
    """Rows with a stride (a slice), a transposed view (copied) and a broadcast residual."""
    base = torch.randn(6, 2 * 40)
    x = base[:, :40]  # row stride 80
    r = torch.randn(40).expand(6, 40)  # row stride 0
    w, b = torch.randn(40), torch.randn(40)
    y, s = layer_norm(x, w, b, residual=r)
    y_ref, s_ref = layer_norm_reference(x, w, b, residual=r)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)
    xt = torch.randn(40, 6).t()
    torch.testing.assert_close(rms_norm(xt, w), rms_norm_reference(xt, w))


def test_optional_weight_and_bias():
    x = torch.randn(3, 4, 50, requires_grad=True)
    torch.testing.assert_close(layer_norm(x, None, None), F.layer_norm(x, (50,)))
    torch.testing.assert_close(rms_norm(x, None), rms_norm_reference(x, None))
    gx, = torch.autograd.grad(layer_norm(x, None, None).pow(2).sum(), x)
    gx_ref, = torch.autograd.grad(F.layer_norm(x, (50,)).pow(2).sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_residual_gradients_are_separate_tensors():
    x = torch.randn(4, 33, requires_grad=True)
    r = torch.randn(4, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    y, s = rms_norm(x, w, residual=r)
    (y.sum() + s.pow(2).sum()).backward()
    assert x.grad is not None and r.grad is not None
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, r.grad)


@pytest.mark.parametrize("used", ["y", "s"])
@pytest.mark.parametrize("rms", [False, True])
def test_only_y_or_only_s_receives_a_gradient(rms, used):
    # grads are not materialized: the unused output's gradient reaches the backward as None, not zeros
    x, r, w, b, gy, gs = norm_inputs((37, 96), torch.float32, True)
    if rms:
        ours_fn, ref_fn, leaves = (lambda x, r, w: rms_norm(x, w, 1e-6, r)), (
            lambda x, r, w: rms_norm_reference(x, w, 1e-6, r)), [x, r, w]
    else:
        ours_fn, ref_fn, leaves = (lambda x, r, w, b: layer_norm(x, w, b, 1e-5, r)), (
            lambda x, r, w, b: layer_norm_reference(x, w, b, 1e-5, r)), [x, r, w, b]

    def grads(fn, tensors, dtype):
        ts = [t.detach().to(dtype).requires_grad_() for t in tensors]
        y, s = fn(*ts)
        (y if used == "y" else s).backward((gy if used == "y" else gs).to(dtype))
        return [torch.zeros_like(t) if t.grad is None else t.grad for t in ts]

    for a, t in zip(grads(ours_fn, leaves, torch.float32), grads(ref_fn, leaves, torch.float64)):
        torch.testing.assert_close(a.double(), t, atol=1e-5, rtol=1e-5)


def test_frozen_parameters_skip_their_gradients():
    x = torch.randn(8, 64, requires_grad=True)
    w, b = torch.randn(64), torch.randn(64, requires_grad=True)
    layer_norm(x, w, b).sum().backward()
    assert w.grad is None and b.grad is not None
    torch.testing.assert_close(b.grad, torch.full((64,), 8.0))


def test_large_rows_sum_weight_gradient_accurately():
    """A weight gradient summed over many rows (thread partials, blocked sums)."""
    x = torch.randn(3000, 48, dtype=torch.float64)
    w = torch.randn(48, dtype=torch.float64)
    gy = torch.randn(3000, 48, dtype=torch.float64)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    torch.autograd.grad(layer_norm(x32, w32, None), (x32, w32), gy.float())
    gw = torch.autograd.grad(layer_norm(x32, w32, None), w32, gy.float())[0]
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    gw_ref = torch.autograd.grad(F.layer_norm(x64, (48,), w64), w64, gy)[0]
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-4)


def test_thread_counts_agree():
    """Rows split between threads (uneven with 3) give the same rows, and the same column sums
    up to their summation order."""
    from llmcore.ops import bias_gelu, swiglu

    x, r, w, b, gy, gs = norm_inputs((2, 259, 97), torch.bfloat16, True, seed=3)
    fns = [(lambda x, w, b, r: layer_norm(x, w, b, 1e-5, r), [x, w, b, r], [gy, gs]),
           (lambda x, w, r: rms_norm(x, w, 1e-6, r), [x, w, r], [gy, gs]),
           (lambda x, b: bias_gelu(x, b), [x, b], [gy]),
           (lambda x, r: swiglu(x, r), [x, r], [gy])]
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append([_run(f, inputs, grads) for f, inputs, grads in fns])
    finally:
        torch.set_num_threads(before)
    for one, three in zip(*results):
        for a, c in zip(one[0] + one[1], three[0] + three[1]):
            if a.dim() == 1:  # a weight or bias gradient: a column sum
                torch.testing.assert_close(a.float(), c.float(), rtol=1e-2, atol=1e-2)
            else:
                torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_empty_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = layer_norm(x, w, None)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and (w.grad == 0).all()


# --- fallbacks and bad input --------------------------------------------------------------


def test_float64_and_meta_fall_back_to_the_reference():
    x = torch.randn(3, 20, dtype=torch.float64)
    w = torch.randn(20, dtype=torch.float64)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w))
    xm = torch.empty(2, 7, 20, device="meta")
    wm = torch.empty(20, device="meta")
    y, s = layer_norm(xm, wm, wm, residual=xm)
    assert y.device.type == "meta" and y.shape == (2, 7, 20) and s.shape == (2, 7, 20)


def test_bad_input_names_the_argument():
    x = torch.randn(3, 20)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(x, torch.ones(19), None)
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm(x, None, residual=torch.randn(3, 21))
    with pytest.raises(TypeError, match="x must be floating point"):
        rms_norm(torch.ones(3, 4, dtype=torch.int64), None)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        layer_norm(x, None, 1.0)


def test_direct_custom_op_calls_check_shapes():
    """The custom ops are reachable as torch.ops.llmcore.*: bad shapes raise, never read out of bounds."""
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="residual must have shape"):
        torch.ops.llmcore.layer_norm_fwd(x, None, None, torch.randn(3, 16), 1e-5)
    with pytest.raises(ValueError, match="weight must have 16 elements"):
        torch.ops.llmcore.rms_norm_fwd(x, torch.ones(15), None, 1e-6)
    with pytest.raises(ValueError, match="rstd must have 4 elements"):
        torch.ops.llmcore.rms_norm_bwd(x, x, torch.ones(3), None, None, False)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):  # (ran the erf form: a probe)
        torch.ops.llmcore.bias_gelu_fwd(x, None, "tanh_typo")
    with pytest.raises(TypeError, match="rstd must be float32, got torch.bfloat16"):  # (read as float32: a probe)
        torch.ops.llmcore.rms_norm_bwd(x, x, torch.ones(x.shape[:-1], dtype=torch.bfloat16), None, None, False)
    with pytest.raises(ValueError, match="up must have shape"):
        torch.ops.llmcore.swiglu_fwd(x, torch.randn(4, 15))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.llmcore.bias_gelu_fwd(x.double(), None, "none")
    with pytest.raises(TypeError, match="float16 weight, got torch.float64"):  # (a KeyError: a probe)
        torch.ops.llmcore.rms_norm_bwd(x.double(), x, torch.ones(4), torch.ones(16, dtype=torch.float64), None, True)


# --- custom ops: opcheck and torch.compile ------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    x = torch.randn(3, 5, 37, requires_grad=True)
    r = torch.randn(3, 5, 37, requires_grad=True) if residual else None
    w, b = torch.randn(37, requires_grad=True), torch.randn(37, requires_grad=True)
    torch.library.opcheck(torch.ops.llmcore.layer_norm_fwd.default, (x, w, b, r, 1e-5))
    torch.library.opcheck(torch.ops.llmcore.rms_norm_fwd.default, (x, w, r, 1e-6))
    gy = torch.randn(3, 5, 37)
    stats = torch.rand(3, 5) + 0.5
    torch.library.opcheck(torch.ops.llmcore.layer_norm_bwd.default, (gy, x.detach(), stats, stats, w.detach(),
                                                                      gy if residual else None, True, True))
    torch.library.opcheck(torch.ops.llmcore.rms_norm_bwd.default, (gy, x.detach(), stats, w.detach(), None, True))


@pytest.mark.parametrize("residual", [False, True])
def test_custom_ops_and_eager_functions_agree(residual):
    """Eager mode runs the kernels through an autograd.Function, torch.compile through the
    custom ops' autograd registrations: the same numbers either way."""
    x, r, w, b, gy, gs = norm_inputs((3, 40), torch.bfloat16, residual)
    grad_outs = [gy, gs] if residual else [gy]
    ops = torch.ops.llmcore
    for public, op, inputs in [
        (lambda x, w, b, r=None: layer_norm(x, w, b, 1e-5, r),
         lambda x, w, b, r=None: ops.layer_norm_fwd(x, w, b, r, 1e-5)[:2 if residual else 1], [x, w, b, r]),
        (lambda x, w, r=None: rms_norm(x, w, 1e-6, r),
         lambda x, w, r=None: ops.rms_norm_fwd(x, w, r, 1e-6)[:2 if residual else 1], [x, w, r]),
    ]:
        eager = _run(public, inputs, grad_outs)
        via_op = _run(lambda *a: tuple(op(*a)) if residual else op(*a)[0], inputs, grad_outs)
        for a, c in zip(eager[0] + eager[1], via_op[0] + via_op[1]):
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    x, r = torch.randn(2, 9, 96, requires_grad=True), torch.randn(2, 9, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)

    def f(x, r, w, b):
        h, s = layer_norm(x, w, b, residual=r)
        y, s2 = rms_norm(h, w, residual=s)
        return (y * s2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(f(x, r, w, b), (x, r, w, b))
    got = torch.autograd.grad(compiled(x, r, w, b), (x, r, w, b))
    for a, c in zip(eager, got):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_low_precision_sublayer_output_meets_fp32_residual(fn):
    """Under bf16 autocast a bf16 sublayer output meets the fp32 residual stream: the fused kernel
    runs on the promoted (fp32) inputs, like the unfused ``norm(x + residual)``, gradients included."""
    torch.manual_seed(0)
    x = torch.randn(37, 96).bfloat16().requires_grad_()
    res = torch.randn(37, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    if fn == "layer_norm":
        y, s = layer_norm(x, w, b, residual=res)
        ry, rs = layer_norm_reference(x.double(), w.double(), b.double(), residual=res.double())
    else:
        y, s = rms_norm(x, w, residual=res)
        ry, rs = rms_norm_reference(x.double(), w.double(), residual=res.double())
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), rs, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and res.grad.dtype == torch.float32
    xd, resd, wd = (t.detach().double().requires_grad_() for t in (x, res, w))
    ref = (layer_norm_reference(xd, wd, b.detach().double(), residual=resd) if fn == "layer_norm"
           else rms_norm_reference(xd, wd, residual=resd))[0]
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(res.grad.double(), resd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-2, atol=1e-2)  # rounded to bf16


def test_double_backward_through_the_cpu_kernels_is_refused():
    """The kernels' gradients carry no graph: a second derivative raises instead of coming out as if they were
    constants. With torch's once_differentiable it raised only where the incoming gradient required grad
    (``out.pow(2).sum()``); from ``out.sum()`` (a gradient penalty's usual start) the gradient came back a
    constant, and the penalty's backward silently dropped its second-order terms (a probe). Differentiated with
    respect to the input alone (``autograd.grad(..., x)``, ``autograd.functional.hvp``), the error node sat behind
    detached copies, off every path to the input, and the second derivative came back 0 (another probe)."""
    from llmcore import ops
    from llmcore.nn import Embedding

    x = torch.randn(3, 16, requires_grad=True)
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    packed = torch.randn(10, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cos, sin = torch.randn(3, 16), torch.randn(3, 16)
    w = torch.randn(7, 16)
    labels = torch.tensor([1, 2, 3])
    embedding = Embedding(7, 16)
    cases = {"layer_norm": (lambda t: layer_norm(t, None, None, backend="cpu"), x),
             "rms_norm": (lambda t: rms_norm(t, torch.ones(16), backend="cpu"), x),
             "sdpa": (lambda t: ops.scaled_dot_product_attention(t, t, t, backend="cpu"), q),
             "varlen": (lambda t: ops.varlen_attention(t, t, t, cu, cu, 6, 6, backend="cpu"), packed),
             "bias_gelu": (lambda t: ops.bias_gelu(t, None), x), "swiglu": (lambda t: ops.swiglu(t, t), x),
             "rotary": (lambda t: ops.rotary_embedding(t[:, None], cos, sin), x),
             "dropout": (lambda t: ops.dropout(t, 0.3), x),
             "linear_cross_entropy": (lambda t: ops.linear_cross_entropy(t, w, labels), x),
             "linear_cross_entropy's weight": (lambda t: ops.linear_cross_entropy(x.detach(), t, labels),
                                               w.clone().requires_grad_()),
             "Embedding": (lambda t: torch.func.functional_call(embedding, {"weight": t}, (labels,)),
                           embedding.weight.detach().clone().requires_grad_())}
    for name, (op, leaf) in cases.items():
        for square in (False, True):
            torch.manual_seed(0)  # (dropout's mask)
            (first,) = torch.autograd.grad(op(leaf).sum(), leaf)
            torch.manual_seed(0)
            out = op(leaf)
            (g,) = torch.autograd.grad((out.pow(2) if square else out).sum(), leaf, create_graph=True)
            if not square:
                torch.testing.assert_close(g, first)  # (the first derivative itself is the plain backward's)
            with pytest.raises(RuntimeError, match="no derivative of its own"):
                g.pow(2).sum().backward()
            # (the ops linear in the leaf have a constant gradient of out.sum(): its derivative is 0, rightly)
            if square or name not in ("rotary", "dropout", "linear_cross_entropy's weight", "Embedding"):
                with pytest.raises(RuntimeError, match="no derivative of its own"):
                    torch.autograd.grad(g.pow(2).sum(), leaf, allow_unused=True, materialize_grads=True)
        with pytest.raises(RuntimeError, match="no derivative of its own"):
            torch.autograd.functional.hvp(lambda t: op(t).pow(2).sum(), leaf.detach(), torch.randn_like(leaf))


def test_torch_func_transforms_are_refused_clearly():
    """vmap over a kernel op failed in the native call with torch's "Cannot access data pointer of Tensor that
    doesn't have storage"; an error naming the transform and the plain-PyTorch way now, which does run under it."""
    from llmcore.ops import scaled_dot_product_attention, swiglu

    x, w, b = torch.randn(2, 3, 4, 10), torch.randn(10), torch.randn(10)
    for f in (lambda a: layer_norm(a, w, b), lambda a: scaled_dot_product_attention(a, a, a), lambda a: swiglu(a, a)):
        with pytest.raises(RuntimeError, match="torch.func transforms .* are not supported"):
            torch.func.vmap(f)(x)
    got = torch.func.vmap(lambda a: layer_norm(a, w, b, backend="reference"))(x)
    torch.testing.assert_close(got, F.layer_norm(x, (10,), w, b))
    # torch.func.grad over a layer said "must override the setup_context staticmethod" (torch's, about our autograd
    # Function); llmcore.nn.Embedding, a drop-in nn.Embedding, failed where nn.Embedding runs (a probe)
    from llmcore import nn as lnn

    norm, emb = lnn.LayerNorm(10), lnn.Embedding(7, 10)
    params = {k: v.detach() for k, v in norm.named_parameters()}
    with pytest.raises(RuntimeError, match="torch.func transforms .* are not supported"):
        torch.func.grad(lambda p: torch.func.functional_call(norm, p, (x,))[0].sum())(params)
    ids = torch.tensor([1, 2, 2])
    weight = emb.weight.detach()
    got = torch.func.grad(lambda p: torch.func.functional_call(emb, p, (ids,)).pow(2).sum())({"weight": weight})
    want = torch.func.grad(lambda w: F.embedding(ids, w).pow(2).sum())(weight)
    torch.testing.assert_close(got["weight"], want)
    # (a probe) linear_cross_entropy failed with torch's setup_context message, its backend='torch' too, which the
    # refusal names as the way: that backend now runs the plain composite under the transforms
    from llmcore.ops import linear_cross_entropy

    h, lm, bias = torch.randn(6, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64), torch.randn(11,
                                                                                                     dtype=torch.float64)
    y = torch.tensor([1, 2, -100, 4, 5, 10])
    for reduction in ("mean", "sum", "none"):
        got = torch.func.grad(lambda m: linear_cross_entropy(h, m, y, bias, reduction=reduction, label_smoothing=0.1,
                                                             backend="torch").sum())(lm)
        want = torch.func.grad(lambda m: F.cross_entropy(F.linear(h, m, bias), y, reduction=reduction,
                                                         label_smoothing=0.1).sum())(lm)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="torch.func transforms .* are not supported.*backend='torch'"):
        torch.func.grad(lambda m: linear_cross_entropy(h, m, y))(lm)
    # vmap over the labels (a probe: the label range check branched on batched values, torch's data-dependent
    # control flow error), the default backend refused as over hidden
    ys = torch.stack([y, y.flip(0)])
    got = torch.func.vmap(lambda t: linear_cross_entropy(h, lm, t, bias, backend="torch"))(ys)
    torch.testing.assert_close(got, torch.stack([F.cross_entropy(F.linear(h, lm, bias), t) for t in ys]))
    with pytest.raises(RuntimeError, match="torch.func transforms .* are not supported.*backend='torch'"):
        torch.func.vmap(lambda t: linear_cross_entropy(h, lm, t))(ys)
    # NumPy scalars as torch's cross_entropy takes them (refused: a probe)
    import numpy as np

    got = linear_cross_entropy(h, lm, y, bias, ignore_index=np.int64(-100), label_smoothing=np.float32(0.1),
                               chunk_size=np.int64(4))
    torch.testing.assert_close(got, F.cross_entropy(F.linear(h, lm, bias), y, ignore_index=np.int64(-100),
                                                    label_smoothing=np.float32(0.1)))


def test_first_derivatives_under_create_graph_and_checkpointing_and_no_kept_hidden():
    """An attack on no_double_backward's links (a probe): it read the saved tensors a second time, which
    non-reentrant checkpointing refuses (a first derivative with create_graph=True inside torch.utils.checkpoint
    raised CheckpointError); and the fused loss kept its N x H hidden input alive from forward to backward for the
    links alone (a 128 MiB hidden: peak RSS +128 MiB). Now one unpack, and a one-element copy links hidden."""
    import gc
    import weakref

    from llmcore import ops

    x = torch.randn(4, 16, requires_grad=True)
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    for f, leaf in ((lambda t: layer_norm(t, torch.ones(16), None, backend="cpu"), x),
                    (lambda t: rms_norm(t, torch.ones(16), backend="cpu"), x),
                    (lambda t: ops.scaled_dot_product_attention(t, t, t, backend="cpu"), q),
                    (lambda t: ops.swiglu(t, t), x)):
        (want,) = torch.autograd.grad(f(leaf).pow(2).sum(), leaf)
        out = torch.utils.checkpoint.checkpoint(f, leaf, use_reentrant=False)
        (got,) = torch.autograd.grad(out.pow(2).sum(), leaf, create_graph=True)
        torch.testing.assert_close(got, want)
    w = torch.randn(7, 16, requires_grad=True)
    hidden = x * 2
    alive = weakref.ref(hidden)
    loss = ops.linear_cross_entropy(hidden, w, torch.tensor([1, 2, 3, 4]))
    del hidden
    gc.collect()
    assert alive() is None  # (nothing of the graph holds it: the fused loss saved its gradients)
    loss.backward()
    assert x.grad is not None and w.grad is not None


def test_layer_norm_variance_overflow_is_nan_like_torch(kernels):
    """A row whose variance overflows float32 gave rstd 0 and y the bias, silently, with finite gradients (a
    probe); torch's float32 row and its gradients are NaN, and now llmcore's too; the other rows are untouched.
    (In bfloat16 torch's CPU kernel returns float64's finite row; llmcore's is NaN there too, not the bias.)"""
    dtype = torch.float32
    x, w, b, gy = overflowing_norm_rows(dtype, 40)
    ours = layer_norm_with_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, gy)
    theirs = layer_norm_with_grads(lambda x, w, b: F.layer_norm(x, (40,), w, b, 1e-5), x, w, b, gy)
    check_norm_overflow_like_torch(ours, theirs, dtype)
