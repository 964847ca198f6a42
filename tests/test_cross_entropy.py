"""linear_cross_entropy against float64 ``F.cross_entropy(hidden @ weight.T + bias)``, loss and gradients.

Accuracy rule (after the attention tests): in dtype ``dt`` our relative error (Frobenius norm,
against the float64 reference) is at most twice that of torch's own composite
``F.cross_entropy(F.linear(h, W, b), y)`` run in ``dt``, plus the error of merely rounding the
reference to ``dt`` (for the scalar loss, at least the unit roundoff). Both sides round the logits
and the logits' gradient to ``dt`` once, so a correct chunked version lands near torch; bf16 weight
gradients are accumulated chunk by chunk in bf16 (one extra rounding per chunk), which the factor 2
leaves room for.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmcore.ops import cross_entropy as ce
from llmcore.ops.cross_entropy import default_chunk_size, linear_cross_entropy

NAMES = ("loss", "grad_hidden", "grad_weight", "grad_bias")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The relative error of merely rounding ref to dtype. A scalar (the loss) can lie arbitrarily close
    to a number dtype holds, so its floor is the unit roundoff, what one rounding may cost: else a torch
    that happens to round to the nearest float32 would demand the same luck of us (it did on an AMD
    EPYC, where torch's fp32 loss came out correctly rounded and ours 1 unit roundoff off)."""
    floor = rel_err(ref.to(dtype), ref)
    return max(floor, torch.finfo(dtype).eps / 2) if ref.dim() == 0 else floor


def make_inputs(lead, H, V, *, bias=True, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, dtype=torch.float64, generator=g)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g) * H**-0.5 * 2  # logits of O(2)
    b = torch.randn(V, dtype=torch.float64, generator=g) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    if ignore_every:
        labels.view(-1)[3::ignore_every] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, dtype, grad_out, *, autocast=False, **kw):
    """fn(h, W, y, b, **kw) on leaf copies in dtype; backward with grad_out; [loss, grads...] in float64."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    loss.backward(grad_out.to(loss.dtype) if isinstance(grad_out, torch.Tensor) else torch.full_like(loss, grad_out))
    return [loss.detach().double()] + [None if t is None else t.grad.double() for t in leaves], loss.dtype


def composite(h, w, y, b, reduction="mean", ignore_index=-100, label_smoothing=0.0, **_):
    logits = F.linear(h, w, b)
    out = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction, ignore_index=ignore_index,
                          label_smoothing=label_smoothing)
    return out.view(y.shape) if reduction == "none" else out


def check(lead, H, V, dtype, *, reduction="mean", chunk_size=None, bias=True, label_smoothing=0.0, scale=3.7,
          autocast=False, ignore_every=5, seed=0, backend=None, logit_scale=1.0):
    hidden, weight, b, labels = make_inputs(lead, H, V, bias=bias, ignore_every=ignore_every, seed=seed)
    weight = weight * logit_scale
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(lead, dtype=torch.float64, generator=g) if reduction == "none" else scale
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref, _ = run(composite, hidden, weight, b, labels, torch.float64, grad_out, **kw)
    theirs, _ = run(composite, hidden, weight, b, labels, dtype, grad_out, autocast=autocast, **kw)
    ours, out_dtype = run(linear_cross_entropy, hidden, weight, b, labels, dtype, grad_out, autocast=autocast,
                          chunk_size=chunk_size, backend=backend, **kw)
    assert out_dtype == (torch.float32 if autocast else dtype)
    for name, a, t, r in zip(NAMES, ours, theirs, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err, torch_err = rel_err(a, r), rel_err(t, r)
        bound = 2 * torch_err + rounding_floor(r, t.dtype if autocast else dtype)
        assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} (torch's {torch_err:.3e})"
    return ours


# N=1, odd N with chunks that do not divide it, chunk > N, chunk 1, V not a power of two
SHAPES = [((1,), 16, 1003, None), ((37,), 24, 1003, 8), ((37,), 24, 1003, 64), ((130,), 64, 517, 48), ((9,), 8, 61, 1)]


@pytest.mark.parametrize("lead,H,V,chunk", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", [None, "torch"])  # the CPU's native softmax kernel, and PyTorch ops
def test_matches_reference(lead, H, V, chunk, reduction, dtype, bias, backend):
    check(lead, H, V, dtype, reduction=reduction, chunk_size=chunk, bias=bias, backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_float16(reduction, backend):
    check((45,), 32, 1003, torch.float16, reduction=reduction, chunk_size=16, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale", [60.0, 1e-3])
def test_extreme_logits(dtype, logit_scale):
    """Logits of O(100) (exp would overflow without the row max taken out) and nearly uniform ones; vocabularies
    of odd widths, so that every row ends in a partial vector."""
    for V in (1003, 17):
        check((23,), 16, V, dtype, chunk_size=8, label_smoothing=0.1, logit_scale=logit_scale)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_logits_with_a_large_common_offset(eps, backend):
    """Logits near 1000 (each row's moved alike, which the softmax cancels), given exactly: the hidden states are
    the logits, the weight the identity. The native kernel's smoothing term summed the logits themselves,
    rounding at their magnitude: a float32 loss 60x torch's error (a probe); it now sums z - max."""
    g = torch.Generator().manual_seed(0)
    for V in (70, 1003):
        logits = (torch.randn(8, V, dtype=torch.float64, generator=g) * 3 + 1000).float().double()
        labels = torch.randint(0, V, (8,), generator=g)
        eye = torch.eye(V, dtype=torch.float64)
        kw = dict(reduction="sum", label_smoothing=eps)
        ref, _ = run(composite, logits, eye, None, labels, torch.float64, 1.0, **kw)
        theirs, _ = run(composite, logits, eye, None, labels, torch.float32, 1.0, **kw)
        ours, _ = run(linear_cross_entropy, logits, eye, None, labels, torch.float32, 1.0, backend=backend, **kw)
        for name, a, t, r in list(zip(NAMES, ours, theirs, ref))[:2]:  # (the loss and the logits' gradient)
            err, torch_err = rel_err(a, r), rel_err(t, r)
            bound = 2 * torch_err + rounding_floor(r, torch.float32)
            assert err <= bound, f"V {V} {name}: relative error {err:.3e} > {bound:.3e} (torch's {torch_err:.3e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_native_kernel_every_isa(kernels, dtype, reduction):
    """_C.cross_entropy_rows as each CPU kernel variant builds it (AVX-512, its AVX512-BF16 twin, AVX2, portable).
    Without a bias: its gradient, a column sum of rows with random-sign coefficients (reduction "none"), cancels,
    and torch's own error there can come out far below a unit roundoff (forced AVX2, float32: ours 1.26e-7
    against a bound of 9.2e-8 from torch's 3.6e-8), while in one direct check (64 rows, 1003 classes, float32,
    smoothing 0.1) every variant's dlogits measured ~3e-8 relative to float64, torch's 1.6e-7. The default
    variant's bias gradients are checked above."""
    check((37,), 24, 1003, dtype, reduction=reduction, chunk_size=8, label_smoothing=0.1, bias=False)
    check((9,), 8, 61, dtype, reduction=reduction, chunk_size=4, bias=False)


def test_native_kernel_is_what_runs(monkeypatch):
    """backend None on CPU tensors reaches _C.cross_entropy_rows (float32, bf16, fp16), backend='torch' and
    float64 do not."""
    calls = []
    real = ce._C.cross_entropy_rows
    monkeypatch.setattr(ce._C, "cross_entropy_rows", lambda *a: calls.append(a[0]) or real(*a), raising=True)
    h, w, y = torch.randn(10, 8), torch.randn(33, 8), torch.randint(0, 33, (10,))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        linear_cross_entropy(h.to(dt), w.to(dt), y, chunk_size=4)
    assert calls == [0] * 3 + [1] * 3 + [2] * 3
    linear_cross_entropy(h, w, y, backend="torch")
    linear_cross_entropy(h.double(), w.double(), y)
    assert len(calls) == 9


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_3d_hidden(reduction):
    ours = check((2, 19), 32, 1003, torch.float32, reduction=reduction, chunk_size=7)
    assert ours[1].shape == (2, 19, 32)
    if reduction == "none":
        assert ours[0].shape == (2, 19)


@pytest.mark.parametrize("eps", [0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothing(eps, reduction, dtype):
    check((37,), 24, 1003, dtype, reduction=reduction, chunk_size=10, label_smoothing=eps)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_bfloat16(reduction):
    """float32 parameters under autocast: float32 loss and float32 gradients, bf16 matmuls, as torch."""
    check((96,), 64, 1003, torch.float32, reduction=reduction, chunk_size=20, autocast=True)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_weight_gradient_over_many_chunks(autocast):
    """512 chunks: a bf16 running sum rounded once per chunk measures ~5x torch's error here."""
    dtype = torch.float32 if autocast else torch.bfloat16
    check((512,), 32, 257, dtype, chunk_size=1, autocast=autocast, bias=False)


@pytest.mark.parametrize("upstream", [1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_all_tokens_ignored(backend, reduction, upstream):
    """torch: mean over no tokens is nan, sum is 0, 'none' is 0 per token; every gradient is 0, whatever grad_out
    is. A loss over no tokens divided by 0 (transformers' Trainer: num_items_in_batch 0 in a window whose labels are
    all -100) sends an infinite one: the gradients finished in the forward times it were 0 * inf = nan in every
    parameter (a probe: one SGD step made the whole model nan)."""
    hidden, weight, b, labels = make_inputs((11,), 16, 101, ignore_every=1)
    labels[:] = -100
    fn = functools.partial(linear_cross_entropy, backend=backend, chunk_size=4)
    ours, _ = run(fn, hidden, weight, b, labels, torch.float32, upstream, reduction=reduction)
    theirs, _ = run(composite, hidden, weight, b, labels, torch.float32, upstream, reduction=reduction)
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True)
    assert ours[0].isnan().all() if reduction == "mean" else (ours[0] == 0).all()
    for name, a, t in zip(NAMES[1:], ours[1:], theirs[1:]):
        assert (t == 0).all() and (a == 0).all(), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    hidden, weight, b, labels = make_inputs((0,), 16, 101)
    ours, _ = run(linear_cross_entropy, hidden, weight, b, labels, torch.float32, 1.0, reduction=reduction)
    theirs, _ = run(composite, hidden, weight, b, labels, torch.float32, 1.0, reduction=reduction)
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True)
    assert ours[1].shape == (0, 16) and (ours[2] == 0).all() and (ours[3] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_gradcheck(reduction, eps):
    hidden, weight, b, labels = make_inputs((5,), 3, 7, ignore_every=4)
    args = [t.clone().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bb):
        return linear_cross_entropy(h, w, labels, bb, reduction=reduction, chunk_size=2, label_smoothing=eps)

    assert torch.autograd.gradcheck(fn, args)


def test_only_hidden_requires_grad():
    hidden, weight, b, labels = make_inputs((37,), 24, 1003)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, b, chunk_size=8).mul(2.0).backward()
    h_ref = hidden.clone().requires_grad_()
    composite(h_ref, weight, labels, b).mul(2.0).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_gradient_work_without_grad(monkeypatch, reduction):
    """No input needing a gradient, or grad mode off: no dlogits are formed at all."""

    class Boom:
        def __init__(self, *a, **k):
            raise AssertionError("gradient work done although no gradient is needed")

    monkeypatch.setattr(ce, "_GradSink", Boom)
    hidden, weight, b, labels = make_inputs((37,), 24, 1003)
    out = linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, chunk_size=8)
    assert out.grad_fn is None
    with torch.no_grad():
        out = linear_cross_entropy(hidden.requires_grad_(), weight, labels, b, reduction=reduction, chunk_size=8)
    assert out.grad_fn is None
    ref = composite(hidden, weight, labels, b, reduction=reduction)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)


def test_retained_graph_backward_twice():
    """backward scales the saved gradients out of place, so a second pass adds the same again."""
    hidden, weight, b, labels = make_inputs((37,), 24, 1003)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, b, chunk_size=8) * 0.5
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(w.grad, 2 * first[1], rtol=1e-12, atol=0)


def test_gradient_accumulation_with_sum():
    """Micro-batches with reduction='sum' divided by the step's token count equal one big 'mean' batch."""
    hidden, weight, b, labels = make_inputs((3, 20), 16, 301, ignore_every=3)
    labels[0, :15] = -100  # uneven token counts across micro-batches, where per-batch means would be wrong
    w = weight.clone().requires_grad_()
    n = int((labels != -100).sum())
    total = 0.0
    for i in range(3):
        loss = linear_cross_entropy(hidden[i], w, labels[i], b, reduction="sum", chunk_size=6) / n
        loss.backward()
        total += loss.item()
    w_ref = weight.clone().requires_grad_()
    ref = composite(hidden, w_ref, labels, b)
    ref.backward()
    assert abs(total - ref.item()) < 1e-12
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), func)
        return out


def largest_tensor(fn, N, H, V):
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    with _LargestTensor() as mode:
        fn(hidden, weight, labels).backward()
    return mode.largest


def test_full_logits_never_materialized():
    """N=4096, V=32000 in float32: no op, forward or backward, makes a tensor bigger than one chunk's logits.

    The full logits would be N * V = 131M elements (524 MB); one default chunk is 512 rows (62.5 MiB in float32).
    The same detector flags torch's composite, so the check can fail.
    """
    N, H, V = 4096, 64, 32000
    chunk = default_chunk_size(N, V)
    assert chunk * V * 4 <= 64 << 20 and chunk < N
    numel, func = largest_tensor(lambda h, w, y: linear_cross_entropy(h, w, y), N, H, V)
    assert numel <= max(chunk * V, V * H, N * H), f"{func} made a tensor of {numel} elements"
    n_small = 1024  # the detector itself, on the composite (kept small: it does build the full logits)
    numel, _ = largest_tensor(lambda h, w, y: F.cross_entropy(F.linear(h, w), y), n_small, H, V)
    assert numel >= n_small * V


def test_default_chunk_size():
    assert (64 << 20) // (4 * 32000) == 524 and default_chunk_size(4096, 32000) == 512  # whole 128-row tiles
    assert default_chunk_size(8192, 128256) == 128  # 130 rows fit: a second row of matmul tiles for 2 rows
    assert default_chunk_size(8192, 256000) == 65  # under 128 rows: as many as fit
    assert default_chunk_size(10, 32000) == 10
    assert default_chunk_size(5, 10**9) == 1
    assert default_chunk_size(0, 50257) == 1
    assert default_chunk_size(8192, 128256, cuda=True) == 1024  # 512 MiB on CUDA (measured there: benchmarks/gpu)
    assert default_chunk_size(8192, 32000, cuda=True) == 4096 and default_chunk_size(100, 32000, cuda=True) == 100


def test_int32_labels():
    hidden, weight, b, labels = make_inputs((37,), 24, 1003)
    a = linear_cross_entropy(hidden, weight, labels.int(), b, chunk_size=8)
    torch.testing.assert_close(a, composite(hidden, weight, labels, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change,error,match", [
    (dict(weight=torch.randn(11, 7)), ValueError, "weight must be"),
    (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(bias=torch.randn(12)), ValueError, "bias must be"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels must have"),
    (dict(labels=torch.zeros(5)), TypeError, "labels must be an integer"),
    (dict(labels=torch.tensor([0, 1, 11, 2, 3])), ValueError, r"labels must be in \[0, 11\)"),
    (dict(labels=torch.tensor([0, 1, -1, 2, 3])), ValueError, "got -1"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(hidden=torch.randn(5, 8).long()), TypeError, "hidden must be"),
    (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),  # (was OverflowError: a probe)
])
def test_bad_input_is_named(change, error, match):
    kw = dict(hidden=torch.randn(5, 8), weight=torch.randn(11, 8), labels=torch.tensor([0, 1, -100, 2, 3]),
              bias=torch.randn(11))
    kw.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(**kw)


def test_meta_tensors_give_shapes():
    """On the meta device linear_cross_entropy asked autocast about "meta" and failed with "unknown device type for
    autocast" (a probe); it gives the loss's shape and dtype, as torch's ops do."""
    h, w = torch.empty(2, 3, 8, device="meta"), torch.empty(11, 8, device="meta")
    y = torch.empty(2, 3, dtype=torch.long, device="meta")
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (2, 3))):
        out = linear_cross_entropy(h, w, y, reduction=reduction)
        assert out.device.type == "meta" and out.shape == shape and out.dtype == torch.float32
    assert linear_cross_entropy(h.bfloat16(), w.bfloat16(), y, loss_dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hidden_size_zero_as_torch(reduction):
    """A hidden size of 0 (every logit 0): torch's composite gives log(V) per row; the fused loss failed reshaping
    (-1, 0), which is ambiguous."""
    h, w = torch.randn(3, 0, requires_grad=True), torch.randn(5, 0, requires_grad=True)
    y = torch.tensor([0, 1, 4])
    for backend in (None, "torch"):
        got = linear_cross_entropy(h, w, y, reduction=reduction, backend=backend)
        torch.testing.assert_close(got, torch.nn.functional.cross_entropy(h @ w.t(), y, reduction=reduction))
        got.sum().backward()
