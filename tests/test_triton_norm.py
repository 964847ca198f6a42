"""The Triton LayerNorm / RMSNorm (backend="triton") against float64, forward and every gradient.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set
by the autouse fixture for each test only; test_triton_attention.py explains why that is
enough); with a GPU, on CUDA tensors at full shapes. Accuracy rule as tests/test_norm.py:
the error against float64 is at most twice torch's own composite's in the same dtype, plus
a floor of one rounding of the dtype.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from accuracy import (assert_close_to_truth, check_norm_overflow_like_torch, f64, layer_norm_with_grads, norm_inputs,
                      outputs_and_grads, overflowing_norm_rows)
from aten_trace import zero_fills

from llmcore.ops import layer_norm, rms_norm
from llmcore.ops import triton as triton_ops
from llmcore.ops.norm import layer_norm_reference, rms_norm_reference

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

pytestmark = pytest.mark.skipif(not triton_ops.installed(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


_run = functools.partial(outputs_and_grads, device=DEVICE)


def _torch_layer_norm(x, w, b, r=None, eps=1e-5):
    s = x + r if r is not None else x
    y = F.layer_norm(s, (s.size(-1),), w, b, eps)
    return (y, s) if r is not None else y


SHAPES = [(5, 1), (3, 33), (2, 5, 97), (4, 768)] if not GPU else [(3, 33), (2, 5, 97), (8, 1000, 4096), (4096, 768)]
CASES = [(shape, dtype, residual) for shape in SHAPES for dtype, residual in
         [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]]
# The backward's two forms (norm_kernels): fused; split with whole rows; split sweeping rows in 16-column chunks
# (1024 on a GPU, where the shapes are wider)
BACKWARDS = {"fused": dict(split=False), "split": dict(split=True),
             "split-chunked": dict(split=True, chunk=1024 if GPU else 16)}


@pytest.fixture(params=list(BACKWARDS))
def backward(request):
    from llmcore.ops.triton import norm as triton_norm

    with triton_norm.backward_launch(**BACKWARDS[request.param]):
        yield request.param


@pytest.mark.parametrize("shape, dtype, residual", CASES)
def test_layer_norm_matches_float64(shape, dtype, residual, backward):
    x, r, w, b, gy, gs = norm_inputs(shape, dtype, residual)
    grad_outs = [gy, gs] if residual else [gy]
    ours = _run(lambda x, w, b, r=None: layer_norm(x, w, b, 1e-5, r, backend="triton"), [x, w, b, r], grad_outs)
    theirs = _run(lambda x, w, b, r=None: _torch_layer_norm(x, w, b, r), [x, w, b, r], grad_outs)
    truth = _run(lambda x, w, b, r=None: layer_norm_reference(x, w, b, 1e-5, r), f64([x, w, b, r]), grad_outs)
    assert all(o.dtype == dtype for o in ours[0])
    for k, what in enumerate(["outputs", "grads"]):
        assert_close_to_truth(ours[k], theirs[k], truth[k], dtype, what)


@pytest.mark.parametrize("shape, dtype, residual", CASES)
def test_rms_norm_matches_float64(shape, dtype, residual, backward):
    x, r, w, _, gy, gs = norm_inputs(shape, dtype, residual)
    grad_outs = [gy, gs] if residual else [gy]
    ours = _run(lambda x, w, r=None: rms_norm(x, w, 1e-6, r, backend="triton"), [x, w, r], grad_outs)
    theirs = _run(lambda x, w, r=None: rms_norm_reference(x, w, 1e-6, r), [x, w, r], grad_outs)
    truth = _run(lambda x, w, r=None: rms_norm_reference(x, w, 1e-6, r), f64([x, w, r]), grad_outs)
    assert all(o.dtype == dtype for o in ours[0])
    for k, what in enumerate(["outputs", "grads"]):
        assert_close_to_truth(ours[k], theirs[k], truth[k], dtype, what)


def test_rms_norm_bf16_is_hf_bit_for_bit_forward():
    # HF rounds the normalized value to bf16 before the weight: the same roundings give the same bits
    x, r, w, _, _, _ = norm_inputs((7, 300), torch.bfloat16, True, seed=3)
    x, r, w = x.to(DEVICE), r.to(DEVICE), w.to(DEVICE)
    ours = rms_norm(x, w, 1e-6, r, backend="triton")
    hf = rms_norm_reference(x, w, 1e-6, r)
    assert torch.equal(ours[1], hf[1])
    assert (ours[0].float() - hf[0].float()).abs().max() <= 2**-7 * hf[0].float().abs().max()


@pytest.mark.parametrize("rms", [False, True])
def test_without_weight_or_bias_and_mixed_dtypes(rms, backward):
    # float32 parameters on a bf16 input (autocast's layout): RMSNorm's y is then float32, as in HF
    x, r, w, b, gy, gs = norm_inputs((3, 65), torch.bfloat16, True, seed=1)
    w32, b32 = w.float(), b.float()
    for params in ([None, None], [w32, None], [w32, b32]):
        if rms:
            ours = _run(lambda x, r, *p: rms_norm(x, *p[:1], 1e-6, r, backend="triton"), [x, r, *params[:1]], [gy, gs])
            truth = _run(lambda x, r, *p: rms_norm_reference(x, *p[:1], 1e-6, r), [x, r, *params[:1]], [gy, gs])
        else:
            ours = _run(lambda x, r, *p: layer_norm(x, *p, 1e-5, r, backend="triton"), [x, r, *params], [gy, gs])
            truth = _run(lambda x, r, *p: layer_norm_reference(x, *p, 1e-5, r), [x, r, *params], [gy, gs])
        for a, t in zip(ours[0] + ours[1], truth[0] + truth[1]):
            assert a.dtype == t.dtype and a.shape == t.shape
            torch.testing.assert_close(a.float(), t.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("used", ["y", "s"])
@pytest.mark.parametrize("rms", [False, True])
def test_one_output_unused_with_a_residual(rms, used, backward):
    """With a residual the caller may use y alone (a model's last norm) or the sum s alone. Gradients as float64's;
    with y alone, no zero gradient is materialized for s (it was: an x-sized fill, then read by the kernel)."""
    x, r, w, b, gy, gs = norm_inputs((3, 65), torch.float32, True, seed=2)

    inputs = (x, w, r) if rms else (x, w, b, r)

    def grads(op, dtype):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
        out, g = dict(zip("ys", zip(op(*leaves), (gy, gs))))[used]
        result = []

        def backward():  # with s alone, the float64 composite has no path to w (or b): zeros, as ours gives
            result.extend(torch.autograd.grad(out, leaves, g.to(DEVICE, dtype), allow_unused=True,
                                              materialize_grads=True))

        fills = zero_fills(backward)
        return [t.double().cpu() for t in result], fills

    if rms:
        ours, fills = grads(lambda x, w, r: rms_norm(x, w, 1e-6, r, backend="triton"), torch.float32)
        truth, _ = grads(lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), torch.float64)
    else:
        ours, fills = grads(lambda x, w, b, r: layer_norm(x, w, b, 1e-5, r, backend="triton"), torch.float32)
        truth, _ = grads(lambda x, w, b, r: layer_norm_reference(x, w, b, 1e-5, r), torch.float64)
    for a, t in zip(ours, truth):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-5)
    if used == "y":
        assert fills == {}


def test_empty_rows(backward):
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and (w.grad == 0).all()


@pytest.mark.parametrize("layout", ["transposed", "permuted"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_inputs_of_any_layout(layout, rms, residual, backward):
    """x as a transposed view (its columns strided) or with permuted leading dims: the sum s and the input
    gradients come back right (s was left unwritten and the gradients wrong or a view error: their buffers were
    made like x's layout, the kernels write rows)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 5, generator=g) if layout == "transposed" else torch.randn(5, 2, 8, generator=g)
    x = (base.t() if layout == "transposed" else base.transpose(0, 1)).to(DEVICE).requires_grad_()
    r = torch.randn(x.shape, generator=g).to(DEVICE).requires_grad_() if residual else None
    w = torch.randn(8, generator=g).to(DEVICE).requires_grad_()
    b = None if rms else torch.randn(8, generator=g).to(DEVICE).requires_grad_()
    inputs = [t for t in (x, r, w, b) if t is not None]

    def run(fn, ts):
        xs, rs, ws, bs = (ts.pop(0) if t is not None else None for t in (x, r, w, b))
        kw = {"residual": rs} if residual else {}
        out = fn(xs, ws, 1e-5, **kw) if rms else fn(xs, ws, bs, 1e-5, **kw)
        outs = out if residual else (out,)
        grads = torch.autograd.grad(outs, [xs, ws] + [t for t in (rs, bs) if t is not None],
                                    [torch.ones_like(o) for o in outs])
        return [o.detach() for o in outs] + list(grads)

    op = rms_norm if rms else layer_norm
    ours = run(functools.partial(op, backend="triton"), list(inputs))
    truth = run(rms_norm_reference if rms else layer_norm_reference, [t.detach().double().requires_grad_()
                                                                    for t in inputs])
    for a, t in zip(ours, truth):
        torch.testing.assert_close(a.double(), t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rms, residual, params", [(False, True, "wb"), (False, False, ""), (True, True, "w"),
                                                   (True, False, "w32")])
def test_opcheck(rms, residual, params, backward):
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom op torch.compile sees."""
    from llmcore.ops.triton import norm as triton_norm  # registers the op (the Triton modules load on first use)

    x, r, w, b, _, _ = norm_inputs((3, 5, 40), torch.bfloat16, residual, seed=4)
    w = w.float() if params == "w32" else w
    leaves = [None if t is None else t.to(DEVICE).requires_grad_() for t in (x, w if params else None,
                                                                              b if "b" in params else None, r)]
    out_dtype = torch.float32 if params == "w32" else torch.bfloat16
    torch.library.opcheck(triton_norm._norm_fwd, (*leaves, 1e-5, rms, out_dtype))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """torch.compile traces the Triton norms in one graph (it could not trace the launchers); as eager."""
    x, r, w, b, _, _ = norm_inputs((4, 7, 48), torch.float32, True, seed=5)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, r, w, b)]

    def f(x, r, w, b):
        y, s = layer_norm(x, w, b, 1e-5, r, backend="triton")
        return (y * y).sum() + rms_norm(s, w, 1e-6, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    result = compiled(*leaves)
    torch.testing.assert_close(result, eager)
    for a, c in zip(eager_grads, torch.autograd.grad(result, leaves)):
        torch.testing.assert_close(a, c)


def test_double_backward_is_refused():
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(rms_norm(x, None, backend="triton").pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative of its own"):
        g.sum().backward()


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype, residual", [(torch.bfloat16, True), (torch.float32, False)])
def test_forward_sweeps_wide_rows_in_chunks(monkeypatch, rms, dtype, residual, backward):
    """Rows wider than norm._FWD_WHOLE columns are swept in _FWD_CHUNK-column chunks (forced here: 37 columns in
    chunks of 16, the last one ragged), as float64's, forward and every gradient."""
    from llmcore.ops.triton import norm as triton_norm

    monkeypatch.setattr(triton_norm, "_FWD_WHOLE", 32)
    monkeypatch.setattr(triton_norm, "_FWD_CHUNK", 16)
    _check_against_float64(rms, (3, 5, 37), dtype, residual)


def test_rows_wider_than_65536_columns():
    """The chunked forward takes rows of any width (the whole-row one refused more than 65536 columns)."""
    _check_against_float64(True, (2, 65536 + 100), torch.bfloat16, True)
    _check_against_float64(False, (2, 65536 + 100), torch.float16, False)


def _check_against_float64(rms, shape, dtype, residual):
    x, r, w, b, gy, gs = norm_inputs(shape, dtype, residual)
    grad_outs = [gy, gs] if residual else [gy]
    if rms:
        inputs, ours_fn = [x, w, r], lambda x, w, r=None: rms_norm(x, w, 1e-6, r, backend="triton")
        ref_fn = lambda x, w, r=None: rms_norm_reference(x, w, 1e-6, r)  # noqa: E731
    else:
        inputs, ours_fn = [x, w, b, r], lambda x, w, b, r=None: layer_norm(x, w, b, 1e-5, r, backend="triton")
        ref_fn = lambda x, w, b, r=None: _torch_layer_norm(x, w, b, r) if x.dtype != torch.float64 else \
            layer_norm_reference(x, w, b, 1e-5, r)  # noqa: E731
    ours, theirs, truth = _run(ours_fn, inputs, grad_outs), _run(ref_fn, inputs, grad_outs), \
        _run(ref_fn, f64(inputs), grad_outs)
    for k, what in enumerate(["outputs", "grads"]):
        assert_close_to_truth(ours[k], theirs[k], truth[k], dtype, what)


def test_backend_choice_and_refusals(monkeypatch):
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        layer_norm(x, None, None, backend="nope")
    with pytest.raises(RuntimeError, match="x dtype torch.float64 not supported"):
        rms_norm(x.double(), None, backend="triton")
    if not GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="CPU tensors need Triton's interpreter"):
            layer_norm(x, None, None, backend="triton")


def test_backward_launch_overrides_and_restores():
    from llmcore.ops.triton import norm as triton_norm

    defaults = dict(triton_norm._BWD)
    with pytest.raises(ValueError, match=r"unknown backward launch settings \['stage'\]"):
        with triton_norm.backward_launch(stage=2):
            pass
    with pytest.raises(ValueError, match="chunk must be a power of 2 >= 16, got 100"):
        with triton_norm.backward_launch(chunk=100):
            pass
    with pytest.raises(ValueError, match="split must be None, True or False, got 'yes'"):
        with triton_norm.backward_launch(split="yes"):
            pass
    with pytest.raises(KeyError):  # an error inside still restores the defaults
        with triton_norm.backward_launch(stages=2, warps=16):
            assert triton_norm._BWD == dict(defaults, stages=2, warps=16)
            raise KeyError("inside")
    assert triton_norm._BWD == defaults
    x = torch.randn(40, 96, device=DEVICE, requires_grad=True)
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    gy = torch.randn(40, 96, device=DEVICE)
    want = torch.autograd.grad(layer_norm(x, w, None, backend="triton"), (x, w), gy)
    with triton_norm.backward_launch(stages=2, programs_per_sm=2, warps=4):
        got = torch.autograd.grad(layer_norm(x, w, None, backend="triton"), (x, w), gy)
    for a, b in zip(got, want):  # on a GPU another partition of the rows only reorders dw's float32 sum
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True])
def test_backward_forms_agree(rms):
    # The forms differ only in the order of float32 sums; a different product (RMSNorm's dw multiplies by the
    # normalized value rounded to x's dtype, as HF does) would show here, far beyond the float64 test's tolerance
    from llmcore.ops.triton import norm as triton_norm

    x, r, w, b, gy, gs = norm_inputs((6, 4096) if GPU else (6, 200), torch.bfloat16, True, seed=2)
    params = [w.float()] if rms else [w.float(), b.float()]

    def fn(x, r, *p):
        return rms_norm(x, *p, 1e-6, r, backend="triton") if rms else layer_norm(x, *p, 1e-5, r, backend="triton")

    got = {}
    for name, settings in BACKWARDS.items():
        with triton_norm.backward_launch(**settings):
            got[name] = _run(fn, [x, r, *params], [gy, gs])[1]
    for name in ("split", "split-chunked"):
        dx, *dparams = got[name][0], *got[name][2:]
        want_dx, *want_dparams = got["fused"][0], *got["fused"][2:]
        torch.testing.assert_close(dx.float(), want_dx.float(), rtol=2**-7, atol=1e-6, msg=f"{name} dx")
        for a, e in zip(dparams, want_dparams):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=f"{name} parameter grads")


def test_split_backward_is_automatic_for_wide_rows(monkeypatch):
    # The fused backward spills beyond 8192 columns (aot, sm_90): wider rows take the split form
    from llmcore.ops.triton import norm as triton_norm

    calls = []
    for form in ("_backward_fused", "_backward_dx"):
        real = getattr(triton_norm, form)
        monkeypatch.setattr(triton_norm, form, lambda *a, _real=real, _form=form: calls.append(_form) or _real(*a))
    for cols in (8192, 8193):
        x = torch.randn(2, cols, device=DEVICE, requires_grad=True)
        w = torch.ones(cols, device=DEVICE, requires_grad=True)
        gx, gw = torch.autograd.grad(rms_norm(x, w, backend="triton"), (x, w), torch.ones(2, cols, device=DEVICE))
        want = torch.autograd.grad(rms_norm_reference(x, w), (x, w), torch.ones(2, cols, device=DEVICE))
        torch.testing.assert_close(gx, want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gw, want[1], rtol=1e-4, atol=1e-5)
    assert calls == ["_backward_fused", "_backward_dx"]


def test_rms_norm_weight_grad_rounds_like_hf(backward):
    # HF's LlamaRMSNorm multiplies the weight by the normalized value rounded to x's dtype, so its weight gradient
    # sums dy times that rounded value. With float32 weights (autocast's layout) both sums run in float32: they
    # agree to the summation order (~1e-6 here), while unrounded products would differ by ~1e-3.
    x, r, w, _, gy, gs = norm_inputs((64, 200), torch.bfloat16, True, seed=4)
    w = w.float()
    ours = _run(lambda x, w, r: rms_norm(x, w, 1e-6, r, backend="triton"), [x, w, r], [gy, gs])[1][1]
    hf = _run(lambda x, w, r: rms_norm_reference(x, w, 1e-6, r), [x, w, r], [gy, gs])[1][1]
    assert ours.dtype == hf.dtype == torch.float32
    err = (ours - hf).abs().max().item() / hf.abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("params", ["strided", "expanded"])
@pytest.mark.parametrize("rms", [False, True])
def test_weight_and_bias_of_any_layout(params, rms, backward):
    """weight and bias as views with a column stride (two columns of one (N, 2) parameter) or expanded from one
    value (stride 0): the kernels read them at W + cols, so they came out wrong (a max error of 4.6 against
    float64) or read past the storage (NaN); the gradients reach the viewed parameters."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, generator=g).to(DEVICE).requires_grad_()
    base = (torch.randn(8, 2, generator=g) if params == "strided" else torch.randn(1, 2, generator=g) + 1.0)
    base = base.to(DEVICE).requires_grad_()

    def run(fn, x, base):
        cols = (base[:, 0], base[:, 1]) if params == "strided" else (base[:, 0].expand(8), base[:, 1].expand(8))
        y = fn(x, cols[0], 1e-5) if rms else fn(x, cols[0], cols[1], 1e-5)
        return [y.detach()] + list(torch.autograd.grad(y, [x, base], torch.ones_like(y)))

    op = rms_norm if rms else layer_norm
    ours = run(functools.partial(op, backend="triton"), x, base)
    truth = run(rms_norm_reference if rms else layer_norm_reference, x.detach().double().requires_grad_(),
                base.detach().double().requires_grad_())
    for a, t in zip(ours, truth):
        torch.testing.assert_close(a.double(), t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunked", [False, True])
def test_layer_norm_variance_overflow_is_nan_like_torch(chunked, backward, monkeypatch):
    """A row whose variance overflows float32 gave rstd 0 and y the bias, silently, with finite gradients (a
    probe), in both forward forms (whole rows; rows swept in chunks); torch's float32 row and its gradients are
    NaN, and now llmcore's too; the other rows are untouched."""
    from llmcore.ops.triton import norm as triton_norm

    if chunked:
        monkeypatch.setattr(triton_norm, "_FWD_WHOLE", 16)
        monkeypatch.setattr(triton_norm, "_FWD_CHUNK", 16)
    x, w, b, gy = overflowing_norm_rows(torch.float32, 40, DEVICE)
    ours = layer_norm_with_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"), x, w, b, gy)
    theirs = layer_norm_with_grads(lambda x, w, b: F.layer_norm(x, (40,), w, b, 1e-5), x, w, b, gy)
    check_norm_overflow_like_torch(ours, theirs, torch.float32)
