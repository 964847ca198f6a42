"""bf16 copies of the linear weights kept by the optimizer step (llmcore/train/bf16_weights.py):
the kernel's bf16 gradient and shadow against torch's fused AdamW and torch's bf16 rounding on
every ISA, and a model trained with them against the same model under plain bf16 autocast,
bit for bit: the gradients (so the forward read exactly autocast's bf16 weights), the weights,
the moments and the shadows, through accumulation, a weight written behind the tracker's
back and a weight also used outside llmcore's layers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcore import _C
from llmcore.models import EncoderConfig, EncoderForSequenceClassification
from llmcore.nn.layers import MLP
from llmcore.train import bf16_weights
from llmcore.train.bf16_weights import Bf16Weights
from llmcore.train.optim import clip_and_step

torch_vector_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                         reason="torch runs its scalar AdamW kernel on this CPU")


def _isas():
    out = []
    for isa in _C.compiled_isas():
        try:
            _C.set_cpu_isa(isa)
        except ValueError:
            continue
        twins = [True, False] if isa == "avx512" and _C.norm_bf16_instructions_available() else [False]
        out += [(isa, t) for t in twins]
    return out


@torch_vector_kernel
def test_kernel_bf16_gradient_and_shadow():
    """adamw_rows with a bf16 gradient equals torch's fused AdamW on the widened gradient, and
    the shadow equals torch's fp32 -> bf16 rounding, denormals and infinities included (on the
    AVX512-BF16 twin too, whose own conversion would flush denormals)."""
    before, before_twin = _C.cpu_isa(), _C.norm_bf16_instructions()
    try:
        for isa, twin in _isas():
            _C.set_cpu_isa(isa)
            if _C.norm_bf16_instructions_available():
                _C.set_norm_bf16_instructions(twin)
            gen = torch.Generator().manual_seed(2)
            p = torch.randn(64, 40, generator=gen)
            p[0, :6] = torch.tensor([1e-39, -3e-40, 1e-45, float("inf"), -0.0, 1.0000001])
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            p2, m2, v2 = p.clone(), m.clone(), v.clone()
            shadow = torch.empty(64, 40, dtype=torch.bfloat16)
            rows = torch.arange(64)
            for step in (1, 2):
                g = (torch.randn(64, 40, generator=gen) * 1e-2).bfloat16()
                g[0, :6] = 0
                torch._fused_adamw_([p], [g.float()], [m], [v], [], [torch.tensor(float(step))], lr=1e-3, beta1=0.9,
                                    beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
                                    grad_scale=torch.tensor(1.5))
                _C.adamw_rows(p2.data_ptr(), g.data_ptr(), m2.data_ptr(), v2.data_ptr(), rows.data_ptr(), 64, 40,
                              decay=1 - 1e-3 * 0.01, lerp=1 - 0.9, beta2=0.999, one_minus_beta2=1 - 0.999,
                              neg_step_size=-(1e-3 / (1 - 0.9 ** step)), bc2_sqrt=math.sqrt(1 - 0.999 ** step),
                              eps=1e-8, grad_scale=1.5, num_threads=2, grad_dtype=1, shadow=shadow.data_ptr())
            what = f"{isa} bf16-instructions={twin}"
            # the last row's tail (40 * 64 % 16 == 0: none here) would be torch's scalar path
            assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(v, v2), what
            assert torch.equal(shadow.view(torch.int16), p.to(torch.bfloat16).view(torch.int16)), what
    finally:
        _C.set_cpu_isa(before)
        if _C.norm_bf16_instructions_available():
            _C.set_norm_bf16_instructions(before_twin)


@torch_vector_kernel
def test_adamw_tensors_matches_torch_per_tensor():
    """One adamw_tensors call over tensors of mixed sizes (chunks spanning tensors, one small
    tensor, one whose numel is not a multiple of 16), each with its own lr, weight decay, step and
    gradient dtype, against torch's fused AdamW on each. torch computes a tensor's last numel % 16
    elements in its scalar loop; those are left out."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(1536, 384), (7, 16), (37, 5), (300, 64)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    vs = [torch.rand(s, generator=gen) * 1e-6 for s in shapes]
    gs = [(torch.randn(s, generator=gen) * 1e-2).bfloat16() if i % 2 else torch.randn(s, generator=gen) * 1e-2
          for i, s in enumerate(shapes)]
    lrs, wds, steps = [1e-3, 2e-4, 5e-5, 1e-2], [0.01, 0.0, 0.1, 0.01], [1, 4, 2, 9]
    mine = [(p.clone(), m.clone(), v.clone(), torch.empty(p.shape, dtype=torch.bfloat16))
            for p, m, v in zip(ps, ms, vs)]
    for p, g, m, v, lr, wd, step in zip(ps, gs, ms, vs, lrs, wds, steps):
        g = g.float().clone()  # torch writes the scaled gradient back
        torch._fused_adamw_([p], [g], [m], [v], [], [torch.tensor(float(step))], lr=lr, beta1=0.9, beta2=0.99,
                            weight_decay=wd, eps=1e-7, amsgrad=False, maximize=False, grad_scale=torch.tensor(2.0))
    _C.adamw_tensors([t[0].data_ptr() for t in mine], [g.data_ptr() for g in gs],
                     [1 if g.dtype == torch.bfloat16 else 0 for g in gs], [t[1].data_ptr() for t in mine],
                     [t[2].data_ptr() for t in mine], [t[3].data_ptr() for t in mine], [p.numel() for p in ps],
                     [1 - lr * wd if wd else 1.0 for lr, wd in zip(lrs, wds)],
                     [-(lr / (1 - 0.9 ** st)) for lr, st in zip(lrs, steps)],
                     [math.sqrt(1 - 0.99 ** st) for st in steps], lerp=1 - 0.9, beta2=0.99, one_minus_beta2=1 - 0.99,
                     eps=1e-7, grad_scale=2.0, num_threads=2)
    for i, (p, m, v) in enumerate(zip(ps, ms, vs)):
        keep = p.numel() - p.numel() % 16
        for name, a, b in (("param", p, mine[i][0]), ("exp_avg", m, mine[i][1]), ("exp_avg_sq", v, mine[i][2])):
            assert torch.equal(a.view(-1)[:keep], b.view(-1)[:keep]), f"tensor {i} {name}"
        assert torch.equal(mine[i][3].view(-1)[:keep], p.to(torch.bfloat16).view(-1)[:keep]), f"tensor {i} shadow"


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    return EncoderForSequenceClassification(cfg)


def _batch(gen, n=5):
    lengths = torch.randint(2, 9, (n,), generator=gen)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return (torch.randint(1, 100, (int(cu[-1]),), generator=gen), cu, torch.randint(0, 2, (n,), generator=gen))


def _loss(model, batch):
    ids, cu, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, cu_seqlens=cu).logits
    return F.cross_entropy(logits.float(), labels)


def _optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=3e-3, fused=True)


@torch_vector_kernel
def test_training_with_shadows_is_bitwise_plain_autocast():
    plain, shadowed = tiny(), tiny()
    opt_p, opt_s = _optimizer(plain), _optimizer(shadowed)
    (tracker,) = Bf16Weights.attach(shadowed, opt_s)
    assert len(tracker.entries) == 2 * 6  # q, k, v, o, fc1, fc2 a layer; the head calls its Linears itself
    gen = torch.Generator().manual_seed(1)
    warm = _batch(gen)  # every GEMM shape once before comparing (a first call may round differently)
    for model in (plain, shadowed):
        _loss(model, warm).backward()
        model.zero_grad(set_to_none=True)
    for e in tracker.entries:
        e.grad = None
    for step in range(6):
        micro = 2 if step == 3 else 1
        for _ in range(micro):
            batch = _batch(gen)
            for model in (plain, shadowed):
                _loss(model, batch).backward()
        if step == 4:  # a tracked weight written by something else: its shadow must follow
            with torch.no_grad():
                for model in (plain, shadowed):
                    model.layers[0].mlp.fc1.weight.mul_(0.5)
        grads_s = {id(e.weight): e.grad for e in tracker.entries if e.grad is not None}
        for (name, pp), ps in zip(plain.named_parameters(), shadowed.parameters()):
            if id(ps) in grads_s:
                assert ps.grad is None, name
                got = grads_s[id(ps)]
                assert got.dtype == (torch.float32 if micro > 1 else torch.bfloat16), name
                assert torch.equal(got.float(), pp.grad), f"step {step}: {name} gradient"
            elif pp.grad is not None:
                assert torch.equal(ps.grad, pp.grad), f"step {step}: {name} gradient"
        scale = torch.tensor(1.25)
        opt_p.grad_scale = scale
        opt_p.step()
        del opt_p.grad_scale
        opt_s.grad_scale = scale
        tracker.step(scale)
        opt_s.step()
        del opt_s.grad_scale
        for opt in (opt_p, opt_s):
            opt.zero_grad(set_to_none=True)
        for (name, pp), ps in zip(plain.named_parameters(), shadowed.parameters()):
            assert torch.equal(pp, ps), f"step {step}: {name}"
            for key, value in opt_p.state[pp].items():
                assert torch.equal(value, opt_s.state[ps][key]), f"step {step}: {name} {key}"
        for e in tracker.entries:
            rounded = e.weight.detach().to(torch.bfloat16)
            if id(e.weight) in grads_s:  # stepped by the kernel: the shadow is current as written
                assert e.version == e.weight._version and torch.equal(e.shadow, rounded), f"step {step} shadow"
            # stepped by torch (the head calls its Linears directly): recast on the next read
            assert torch.equal(e.current_shadow(), rounded), f"step {step} shadow"
    tracker.detach()
    assert not any(hasattr(p, "_llmcore_bf16") for p in shadowed.parameters())


class _Both(nn.Module):
    """An llmcore MLP whose fc2 is also called directly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = MLP(16, 32)

    def forward(self, x):
        return self.mlp(x) + self.mlp.fc2(x.repeat(1, 2))


def test_weight_used_both_ways_is_stepped_once():
    a, b = _Both(), _Both()
    opt_a, opt_b = _optimizer(a), _optimizer(b)
    (tracker,) = Bf16Weights.attach(b, opt_b)
    gen = torch.Generator().manual_seed(0)
    for it in range(3):  # the second step reads the shadow of a weight torch's AdamW stepped
        x = torch.randn(4, 16, generator=gen)
        outs = []
        for model in (a, b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
            outs.append(out)
        if it == 0:  # the same weights: the same forward
            assert torch.equal(outs[0], outs[1])
        else:  # a stale shadow of fc2 would be off by a step, ~3e-3 on each weight
            torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=0, atol=2e-3)
        fc2 = next(e for e in tracker.entries if e.weight is b.mlp.fc2.weight)
        assert b.mlp.fc2.weight.grad is not None and fc2.grad is not None
        norm_a = clip_and_step(opt_a, list(a.parameters()), 1.0)
        norm_b = clip_and_step(opt_b, list(b.parameters()), 1.0, [tracker])
        # Plain autocast casts fc2's weight once for both uses and adds their two gradients in
        # bf16; here they meet in float32. So: close, not equal. Stepped twice, fc2 would be off
        # by about the learning rate (3e-3).
        torch.testing.assert_close(norm_b, norm_a, rtol=1e-3, atol=0)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=0, atol=2e-5, msg=name)
        for opt in (opt_a, opt_b):
            opt.zero_grad(set_to_none=True)
    tracker.detach()


def test_attach_only_where_it_applies(monkeypatch):
    model = tiny()
    assert Bf16Weights.attach(model, _optimizer(model), bf16=False) == []
    assert Bf16Weights.attach(model, _optimizer(model), world_size=2) == []
    assert Bf16Weights.attach(model, torch.optim.AdamW(model.parameters(), fused=False)) == []
    monkeypatch.setenv(bf16_weights.ENV_SWITCH, "0")
    assert Bf16Weights.attach(model, _optimizer(model)) == []
    monkeypatch.delenv(bf16_weights.ENV_SWITCH)
    (tracker,) = Bf16Weights.attach(model, _optimizer(model))
    assert len(tracker.entries) == 12 and tracker.params() == []  # no gradient yet
    assert Bf16Weights.attach(model, _optimizer(model)) == []  # already tracked
    # outside bf16 autocast the layers read the fp32 weight
    ids, cu, labels = _batch(torch.Generator().manual_seed(0))
    out = model(ids, cu_seqlens=cu).logits
    assert out.dtype == torch.float32
    tracker.detach()
