"""linear_cross_entropy(backend="triton") against float64 ``F.cross_entropy(hidden @ weight.T + bias)``.

Without a GPU the chunk kernel runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1
set by the autouse fixture for each test only; test_triton_attention.py explains why that is
enough), with 64-class blocks so small vocabularies still cross several; with a GPU, on CUDA
tensors at full shapes. Accuracy rule as tests/test_cross_entropy.py: relative error at most
twice torch's own composite's in the same dtype, plus one rounding of the reference.
"""
import pytest
import torch
import torch.nn.functional as F

from llmcore.ops import linear_cross_entropy
from llmcore.ops import triton as triton_ops

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NAMES = ("loss", "grad_hidden", "grad_weight", "grad_bias")

pytestmark = pytest.mark.skipif(not triton_ops.installed(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(lead, H, V, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, dtype=torch.float64, generator=g)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g) * H**-0.5 * 2  # logits of O(2)
    b = torch.randn(V, dtype=torch.float64, generator=g) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels.view(-1)[3::5] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, dtype, grad_out, autocast=False, **kw):
    leaves = [None if t is None else t.detach().to(DEVICE, dtype).requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(leaves[0], leaves[1], labels.to(DEVICE), leaves[2], **kw)
    g = grad_out.to(DEVICE, loss.dtype) if isinstance(grad_out, torch.Tensor) else torch.full_like(loss, grad_out)
    loss.backward(g)
    return [loss.detach().double().cpu()] + [None if t is None else t.grad.double().cpu() for t in leaves], loss.dtype


def composite(h, w, y, b, reduction="mean", label_smoothing=0.0, **_):
    out = F.cross_entropy(F.linear(h, w, b).flatten(0, -2), y.flatten(), reduction=reduction,
                          label_smoothing=label_smoothing)
    return out.view(y.shape) if reduction == "none" else out


def triton_ce(h, w, y, b, **kw):
    return linear_cross_entropy(h, w, y, b, backend="triton", **kw)


CASES = [
    # (lead, H, V, chunk, dtype, reduction, smoothing, bias, autocast)
    ((37,), 24, 300, 8, torch.float32, "mean", 0.0, True, False),
    ((2, 19), 32, 130, 16, torch.bfloat16, "sum", 0.1, True, False),
    ((21,), 16, 257, 64, torch.float16, "none", 0.0, False, False),
    ((13,), 24, 100, 5, torch.float32, "mean", 0.2, True, True),  # autocast: bf16 matmuls, float32 loss
]
GPU_CASES = [((4, 1024), 1024, 32000, None, torch.bfloat16, "mean", 0.0, False, False),
             ((2048,), 512, 50257, 512, torch.float32, "none", 0.1, True, False)]


@pytest.mark.parametrize("lead, H, V, chunk, dtype, reduction, eps, bias, autocast", CASES + (GPU_CASES if GPU else []))
def test_matches_float64(lead, H, V, chunk, dtype, reduction, eps, bias, autocast):
    hidden, weight, b, labels = make_inputs(lead, H, V, bias)
    grad_out = torch.randn(lead, dtype=torch.float64) if reduction == "none" else 3.7
    kw = dict(reduction=reduction, label_smoothing=eps)
    ref, _ = run(composite, hidden, weight, b, labels, torch.float64, grad_out, **kw)
    theirs, _ = run(composite, hidden, weight, b, labels, dtype, grad_out, autocast=autocast, **kw)
    ours, out_dtype = run(triton_ce, hidden, weight, b, labels, dtype, grad_out, autocast=autocast,
                          chunk_size=chunk, **kw)
    assert out_dtype == (torch.float32 if autocast else dtype)
    low = torch.bfloat16 if autocast else dtype
    for name, a, t, r in zip(NAMES, ours, theirs, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        err, torch_err = rel_err(a, r), rel_err(t, r)
        bound = 2 * torch_err + rel_err(r.to(low), r)
        assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} (torch's {torch_err:.3e})"


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_logits_with_a_large_common_offset(eps):
    """Logits near 1000 (through the bias: an offset the softmax cancels), float32: the kernel took exp(z - lse)
    with lse rounded at the logits' magnitude, which went into every probability (gradients 5x torch's error at
    logits ~70, 400x at ~1000: a probe); it now keeps the row max apart from log(sum)."""
    hidden, weight, b, labels = make_inputs((23,), 16, 130, True, seed=5)
    kw = dict(reduction="sum", label_smoothing=eps)
    args = (hidden, weight, b + 1000.0, labels)
    ref, _ = run(composite, *args, torch.float64, 1.0, **kw)
    theirs, _ = run(composite, *args, torch.float32, 1.0, **kw)
    ours, _ = run(triton_ce, *args, torch.float32, 1.0, chunk_size=8, **kw)
    for name, a, t, r in zip(NAMES, ours, theirs, ref):
        err, torch_err = rel_err(a, r), rel_err(t, r)
        bound = 2 * torch_err + rel_err(r.float(), r)
        assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} (torch's {torch_err:.3e})"


def test_equals_the_torch_backend_in_float32():
    hidden, weight, b, labels = make_inputs((29,), 16, 200, True, seed=4)
    for reduction in ("mean", "none"):
        a, _ = run(triton_ce, hidden, weight, b, labels, torch.float32, 1.0, reduction=reduction, chunk_size=7)
        c, _ = run(lambda *x, **k: linear_cross_entropy(*x, backend="torch", **k), hidden, weight, b, labels,
                   torch.float32, 1.0, reduction=reduction, chunk_size=7)
        for x, y in zip(a, c):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_every_label_ignored_gives_nan_mean_and_zero_grads():
    hidden = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(50, 8, device=DEVICE, requires_grad=True)
    labels = torch.full((6,), -100, device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, labels, backend="triton")
    loss.backward()
    assert torch.isnan(loss) and (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored_keeps_zero_grads_under_an_infinite_grad_out(reduction):
    """(loss / 0).backward(), as transformers' Trainer does with num_items_in_batch 0: torch's gradients stay 0; the
    saved gradients times inf were nan (a probe)."""
    hidden = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(50, 8, device=DEVICE, requires_grad=True)
    labels = torch.full((6,), -100, device=DEVICE)
    (linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="triton").sum() / 0).backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignored_row_with_overflowing_logits_gives_finite_gradients(backend):
    """An ignored row (a padded token) whose fp16 logits overflow: its dlogits were 0 * NaN = NaN, which spread
    through grad_weight (found by a probe); it now contributes exact zeros, as the native kernel's does."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 16, generator=g), torch.randn(70, 16, generator=g)
    y = torch.randint(0, 70, (6,), generator=g)
    h[2], y[2] = 1e4, -100
    grads = {}
    for name, rows in (("with", slice(None)), ("without", [0, 1, 3, 4, 5])):
        hh = h[rows].half().to(DEVICE).requires_grad_()
        ww = w.half().to(DEVICE).requires_grad_()
        linear_cross_entropy(hh, ww, y[rows].to(DEVICE), reduction="sum", backend=backend).backward()
        grads[name] = hh.grad, ww.grad
    assert torch.isfinite(grads["with"][0]).all() and torch.equal(grads["with"][0][2], torch.zeros_like(h[2]).half()
                                                                   .to(DEVICE))
    torch.testing.assert_close(grads["with"][1], grads["without"][1], rtol=1e-3, atol=1e-3)


def test_backend_refusals(monkeypatch):
    h, w, y = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        linear_cross_entropy(h, w, y.to(DEVICE), backend="nope")
    with pytest.raises(RuntimeError, match="dtype torch.float64 not supported"):
        linear_cross_entropy(h.double(), w.double(), y.to(DEVICE), backend="triton")
    if not GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="CPU tensors need Triton's interpreter"):
            linear_cross_entropy(h, w, y, backend="triton")


def test_torch_compile_runs_it_eagerly():
    """Under torch.compile the Triton loss runs eagerly behind a graph break (torch.compiler.disable: dynamo
    cannot trace the launchers; it failed before): loss and gradients as without compile."""
    hidden, weight, b, labels = make_inputs((3, 7), 24, 150, bias=True, seed=3)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (hidden, weight, b)]
    y = labels.to(DEVICE)

    def f(h, w, b):
        return linear_cross_entropy(torch.tanh(h), w, y, bias=b, chunk_size=8, backend="triton") * 2

    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, c in zip(eager_grads, torch.autograd.grad(compiled, leaves)):
        torch.testing.assert_close(a, c)
