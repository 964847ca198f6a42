"""llmcore.ops.dropout: F.dropout's semantics with a Philox mask regenerated in the backward:
statistics, exact scaling, reproducibility, the mask against a Philox reference on every
ISA, thread-count independence, custom-op checks, torch.compile and fallbacks."""
import math

import pytest
import torch

from llmcore import _C
from llmcore.ops import dropout

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _scaled(x: torch.Tensor, p: float) -> torch.Tensor:
    """x * 1 / (1 - p), taken in float32 and rounded once."""
    return (x.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)).to(x.dtype)


def _reference_keep(n: int, seed: int, offset: int, p: float) -> torch.Tensor:
    """The kernel's mask from the scalar Philox: element i uses word (i % 64) // 16 of the call
    with counter 16 (i // 64) + i % 16 and (offset low, offset high), key (seed low, high)."""
    threshold = min(int(p * 2**32), 2**32 - 1)
    keep = []
    words = {}
    for i in range(n):
        c = 16 * (i // 64) + i % 16
        if c not in words:
            words[c] = _C.philox4x32_10([c & 0xFFFFFFFF, c >> 32, offset & 0xFFFFFFFF, offset >> 32],
                                        [seed & 0xFFFFFFFF, seed >> 32])
        keep.append(words[c][(i % 64) // 16] >= threshold)
    return torch.tensor(keep)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction(p):
    torch.manual_seed(0)
    n = 1_000_000
    y = dropout(torch.ones(n), p)
    kept = (y != 0).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 4 * sigma


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_scaling_exact(dtype, p):
    torch.manual_seed(1)
    x = torch.randn(37, 129).to(dtype)
    x[x == 0] = 1
    y = dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    keep = y != 0
    assert 0 < keep.sum() < x.numel()
    torch.testing.assert_close(y, torch.where(keep, _scaled(x, p), torch.zeros((), dtype=dtype)), rtol=0, atol=0)


def test_mask_matches_philox_reference(cpu_isa):
    """Every ISA's vector Philox gives the scalar reference's mask, tails included."""
    x = torch.ones(3 * 64 + 37)
    rng = torch.tensor([0x123456789ABCDEF, (7 << 32) + 5], dtype=torch.int64)
    for p in (0.2, 0.5, 0.75):
        y = torch.ops.llmcore.dropout_apply(x, rng, p)
        keep = _reference_keep(x.numel(), int(rng[0]), int(rng[1]), p)
        assert torch.equal(y != 0, keep), cpu_isa


def test_isas_agree():
    best = _C.best_cpu_isa()
    x = torch.randn(1000, 77)
    rng = torch.tensor([42, 43], dtype=torch.int64)
    outs = []
    try:
        for isa in _C.compiled_isas():
            try:
                _C.set_cpu_isa(isa)
            except ValueError:
                continue
            outs.append(torch.ops.llmcore.dropout_apply(x, rng, 0.3))
    finally:
        _C.set_cpu_isa(best)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_reproducible_and_fresh():
    x = torch.randn(64, 300)
    torch.manual_seed(5)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(5)
    a2, b2 = dropout(x, 0.5), dropout(x, 0.5)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a != 0, b != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_mask_is_forward_mask(dtype):
    torch.manual_seed(2)
    p = 0.3
    x = torch.ones(50, 257, dtype=dtype, requires_grad=True)
    y = dropout(x, p)
    y.backward(torch.ones_like(y))
    scale = _scaled(torch.ones((), dtype=dtype), p)
    assert torch.equal(x.grad, (y != 0).to(dtype) * scale)
    assert torch.equal(y.detach(), x.grad)  # ones in: out and grad are the same mask * scale
    # a non-contiguous gradient follows the same element order
    x.grad = None
    y = dropout(x, p)
    g = torch.randn(257, 50).to(dtype).t()
    y.backward(g)
    assert torch.equal(x.grad, torch.where(y != 0, _scaled(g, p), torch.zeros((), dtype=dtype)))


def test_p_zero_eval_and_p_one():
    x = torch.randn(10, 20, requires_grad=True)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    y = dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # the kernel itself with p = 1 keeps nothing
    assert torch.equal(torch.ops.llmcore.dropout_apply(torch.ones(100), torch.tensor([1, 2]), 1.0), torch.zeros(100))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, -0.1)
    for p in ("0.5", True):  # (float("0.5") took the string: a probe)
        with pytest.raises(TypeError, match="dropout probability must be a number"):
            dropout(x, p)


@pytest.mark.parametrize("n", [1, 33, 1_000_003])
def test_odd_sizes(n):
    torch.manual_seed(3)
    x = torch.randn(n) + 5  # never 0
    y = dropout(x, 0.4)
    keep = y != 0
    torch.testing.assert_close(y[keep], _scaled(x[keep], 0.4), rtol=0, atol=0)
    if n > 1000:
        sigma = math.sqrt(n * 0.4 * 0.6)
        assert abs(keep.sum().item() - 0.6 * n) < 4 * sigma
    # the tail of a long run is the tail of the same index stream
    rng = torch.tensor([9, 10], dtype=torch.int64)
    full = torch.ops.llmcore.dropout_apply(torch.ones(n + 100), rng, 0.4)
    part = torch.ops.llmcore.dropout_apply(torch.ones(n), rng, 0.4)
    assert torch.equal(full[:n], part)


def test_thread_count_independent():
    x = torch.randn(300, 1000)
    rng = torch.tensor([123, 456], dtype=torch.int64)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(torch.ops.llmcore.dropout_apply(x, rng, 0.5))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_fallbacks():
    torch.manual_seed(4)
    x = torch.randn(40, 30).t()  # not contiguous: F.dropout
    y = dropout(x, 0.5)
    keep = y != 0
    torch.testing.assert_close(y[keep], x[keep] * 2)
    xd = torch.randn(100, dtype=torch.float64)
    y = dropout(xd, 0.5)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y[y != 0], xd[y != 0] * 2)
    with pytest.raises(TypeError):
        torch.ops.llmcore.dropout_apply(torch.ones(3, dtype=torch.float64), torch.tensor([1, 2]), 0.5)


def test_opcheck():
    x = torch.randn(3, 5, 37, requires_grad=True)
    rng = torch.tensor([11, 12], dtype=torch.int64)
    torch.library.opcheck(torch.ops.llmcore.dropout_apply.default, (x, rng, 0.3))
    torch.library.opcheck(torch.ops.llmcore.dropout_apply.default, (x.detach().bfloat16(), rng, 0.5))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    torch._dynamo.reset()
    x = torch.ones(8, 96, requires_grad=True)

    def f(x):
        return dropout(x * 2, 0.25).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    loss = compiled(x)
    (g,) = torch.autograd.grad(loss, x)
    kept = (g != 0).sum()
    assert 0 < kept < x.numel()
    # every kept element contributes 2 / 0.75 to the loss and gets gradient 2 / 0.75
    torch.testing.assert_close(loss, kept * 2 / 0.75)
    torch.testing.assert_close(g[g != 0], torch.full((int(kept),), 2 / 0.75))


def test_module_checks_p_when_made():
    """llmcore.nn.Dropout refuses a p outside [0, 1] when made, as torch.nn.Dropout (it did at the first forward),
    and shows p."""
    from llmcore.nn import Dropout

    for p in (-0.1, 1.1):
        with pytest.raises(ValueError, match="between 0 and 1"):
            Dropout(p)
    assert repr(Dropout(0.25)) == repr(torch.nn.Dropout(0.25)).replace(", inplace=False", "") == "Dropout(p=0.25)"


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_models_dropout_is_torch_dropout(family):
    """Code that turns dropout off by type (``isinstance(m, torch.nn.Dropout)``: set p = 0) turns off all of an
    llmcore model's: its dropout modules were not torch.nn.Dropout, and the attention's probability a bare float
    (a probe), so a train-mode forward still dropped. Then it equals the eval-mode forward; and p still reaches the
    attention kernels (a train-mode forward differs before)."""
    from llmcore.models import DecoderConfig, DecoderForCausalLM, EncoderConfig, EncoderForSequenceClassification

    torch.manual_seed(0)
    if family == "bert":
        model = EncoderForSequenceClassification(EncoderConfig(
            vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
            max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.5))
    else:
        model = DecoderForCausalLM(DecoderConfig(
            family=family, vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, head_dim=8,
            num_kv_heads=4 if family == "gpt2" else 2, intermediate_size=48, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.5))
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = model.eval()(**batch).logits
    model.train()
    assert not torch.equal(model(**batch).logits, expected)  # only the attention's dropout is on
    found = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert sum(m.p == 0.5 for m in found) == 2  # one a layer
    for m in found:
        m.p = 0.0
    assert torch.equal(model(**batch).logits, expected)
