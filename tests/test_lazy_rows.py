"""Row-sparse AdamW for embedding tables (llmcore/train/lazy_rows.py): the row kernel against
torch's fused AdamW kernel bit for bit on every compiled ISA, and LazyRowAdamW's tables and
moments against torch.optim.AdamW(fused=True) on the dense gradient, bit for bit, through
skipped rows, late reads, flushes, accumulation, a step without a gradient and a resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmcore import _C
from llmcore.nn import Embedding
from llmcore.train import lazy_rows
from llmcore.train.lazy_rows import LazyRowAdamW
from llmcore.train.optim import clip_and_step

# The row kernel makes the float32 operations of torch's AVX2/AVX-512 fused AdamW kernel.
torch_vector_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                         reason="torch runs its scalar AdamW kernel on this CPU")


@pytest.fixture
def each_isa():
    before = _C.cpu_isa()
    yield [isa for isa in _C.compiled_isas() if isa in ("avx512", "avx2", "portable")
           and _isa_runs(isa)]
    _C.set_cpu_isa(before)


def _isa_runs(isa: str) -> bool:
    try:
        _C.set_cpu_isa(isa)
        return True
    except ValueError:
        return False


def _fused_dense(p, g, m, v, step, lr, wd, betas, eps, scale):
    torch._fused_adamw_([p], [g], [m], [v], [], [torch.tensor(float(step))], lr=lr, beta1=betas[0], beta2=betas[1],
                        weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                        grad_scale=None if scale is None else torch.tensor(scale))


@pytest.mark.parametrize("cols", [384, 48, 37])
@pytest.mark.parametrize("betas,wd,scale", [((0.9, 0.999), 0.01, 1.7), ((0.3, 0.99), 0.0, None),
                                             ((0.9, 0.999), 0.1, None)])
@torch_vector_kernel
def test_adamw_rows_matches_torch_fused_kernel(each_isa, cols, betas, wd, scale):
    """Every row updated by _C.adamw_rows equals torch's fused update of the whole table. betas[0]
    = 0.3 takes torch's other lerp branch (weight >= 0.5). With cols = 37 the table's last
    numel % 16 elements are torch's scalar tail, computed differently: the last row is left out."""
    rows_total = 301
    for isa in each_isa:
        _C.set_cpu_isa(isa)
        gen = torch.Generator().manual_seed(cols)
        p = torch.randn(rows_total, cols, generator=gen)
        m = torch.randn(rows_total, cols, generator=gen) * 1e-3
        v = torch.rand(rows_total, cols, generator=gen) * 1e-5
        p2, m2, v2 = p.clone(), m.clone(), v.clone()
        for step in (1, 2, 7):
            g = torch.randn(rows_total, cols, generator=gen) * 1e-2
            g[::5] = 0  # rows without a gradient
            lr = 3e-4 * step
            _fused_dense(p, g.clone(), m, v, step, lr, wd, betas, 1e-8, scale)
            rows = torch.arange(rows_total)
            bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
            _C.adamw_rows(p2.data_ptr(), g.data_ptr(), m2.data_ptr(), v2.data_ptr(), rows.data_ptr(), rows_total,
                          cols, decay=1 - lr * wd if wd else 1.0, lerp=1 - betas[0], beta2=betas[1],
                          one_minus_beta2=1 - betas[1], neg_step_size=-(lr / bc1), bc2_sqrt=math.sqrt(bc2),
                          eps=1e-8, grad_scale=scale or 0.0, num_threads=2)
        keep = slice(None) if cols % 16 == 0 else slice(0, rows_total - 1)
        for name, a, b in (("param", p, p2), ("exp_avg", m, m2), ("exp_avg_sq", v, v2)):
            assert torch.equal(a[keep], b[keep]), f"{isa} {name}: {int((a[keep] != b[keep]).sum())} elements differ"


def test_decay_rows_replays_each_step_in_order(each_isa):
    """Row r multiplied by factors[first[r]], ..., factors[end - 1], each product rounded: the
    same as the loop of float32 multiplies (not the product of the factors)."""
    for isa in each_isa:
        _C.set_cpu_isa(isa)
        gen = torch.Generator().manual_seed(1)
        table = torch.randn(50, 70, generator=gen)
        factors = (1 - torch.rand(40, generator=gen) * 1e-3).float()
        rows = torch.tensor([3, 0, 49, 17])
        first = torch.tensor([0, 39, 12, 40])  # 40: nothing pending
        expected = table.clone()
        for r, f0 in zip(rows.tolist(), first.tolist()):
            for s in range(f0, 40):
                expected[r] = expected[r] * factors[s]
        _C.decay_rows(table.data_ptr(), rows.data_ptr(), first.data_ptr(), 4, 70, factors.data_ptr(), 40, 2)
        assert torch.equal(table, expected), isa


class TinyLM(nn.Module):
    """An embedding table big enough to be lazy, a position table that is not, and a head."""

    def __init__(self, vocab=5000, dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.word = Embedding(vocab, dim, padding_idx=0)
        self.pos = Embedding(16, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        x = self.word(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(x).mean(1))


def _batch(gen, vocab=5000):
    # a Zipf-ish draw: a few frequent rows, a long tail touched once in a while
    ids = (torch.rand(6, 12, generator=gen) ** 3 * vocab).long()
    return ids, torch.randint(0, 3, (6,), generator=gen)


def _optimizer(model, lr=1e-2, wd=0.01):
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, fused=True)


def _assert_same(model_a, opt_a, model_b, opt_b, what):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{what}: {name} differs in {int((a != b).sum())} elements"
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), f"{what}: {name} state keys"
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{what}: {name} {key}"


@torch_vector_kernel
@pytest.mark.parametrize("clip", [True, False])
def test_lazy_adamw_is_bitwise_dense_fused_adamw(clip):
    """Two identical models: one trained by torch's fused AdamW on the dense embedding gradient,
    one with LazyRowAdamW. Same grad_scale on both (the norm of the touched rows is the dense
    norm, summed in another order, so the test hands the dense one to both)."""
    dense, lazy = TinyLM(), TinyLM()
    opt_d, opt_l = _optimizer(dense), _optimizer(lazy)
    trackers = LazyRowAdamW.attach(lazy, opt_l)
    assert [t.module for t in trackers] == [lazy.word]  # the 16-row table stays dense
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        for group_d, group_l in zip(opt_d.param_groups, opt_l.param_groups):
            group_d["lr"] = group_l["lr"] = 1e-2 * (1 - step / 12)  # a decaying schedule
        micro = 2 if step % 4 == 3 else 1  # accumulation now and then
        for _ in range(micro):
            ids, labels = _batch(gen)
            if step % 3 == 1:
                ids = ids.int()  # int32 ids index the table too
            for model in (dense, lazy):
                F.cross_entropy(model(ids), labels).backward()
        # The same gradients on both sides: the process's first small MKL matmul can round
        # differently from later ones. In place, so the embedding keeps its own buffer.
        for pd, pl in zip(dense.parameters(), lazy.parameters()):
            pl.grad.copy_(pd.grad)
        if step == 5:  # a step without an embedding gradient: torch skips the table, so must we
            dense.word.weight.grad = None
            lazy.word.weight.grad = None
        scale = None
        if clip:
            norm = torch.nn.utils.get_total_norm([p.grad for p in dense.parameters() if p.grad is not None])
            scale = (1.0 / torch.clamp(0.05 / (norm + 1e-6), max=1.0)).float()
            opt_d.grad_scale = opt_l.grad_scale = scale
        for t in trackers:
            t.grad_rows()
            t.step(scale)
        opt_d.step()
        opt_l.step()
        for opt in (opt_d, opt_l):
            opt.__dict__.pop("grad_scale", None)
            opt.zero_grad(set_to_none=True)
        if step in (4, 9):
            for t in trackers:
                t.flush()
            _assert_same(dense, opt_d, lazy, opt_l, f"after step {step}")
    for t in trackers:
        t.detach()
    assert lazy.word.row_tracker is None
    _assert_same(dense, opt_d, lazy, opt_l, "at the end")
    assert 0 < int(trackers[0].active.sum()) < 5000  # the tail stayed lazy


def test_lazy_adamw_resumes_from_a_state_dict():
    """A tracker rebuilt from a saved optimizer (its active rows are those with a moment)
    continues exactly as the uninterrupted one."""
    a = TinyLM()
    opt_a = _optimizer(a)
    track_a = LazyRowAdamW.attach(a, opt_a)
    gen = torch.Generator().manual_seed(5)
    batches = [_batch(gen) for _ in range(8)]

    def run(model, opt, trackers, todo):
        for ids, labels in todo:
            F.cross_entropy(model(ids), labels).backward()
            clip_and_step(opt, list(model.parameters()), 1.0, trackers)
            opt.zero_grad(set_to_none=True)

    run(a, opt_a, track_a, batches[:4])
    for t in track_a:
        t.flush()
    active_at_save = track_a[0].active.clone()
    saved_model = {k: v.clone() for k, v in a.state_dict().items()}
    saved_opt = opt_a.state_dict()
    saved_opt = {"state": {k: {n: x.clone() for n, x in s.items()} for k, s in saved_opt["state"].items()},
                 "param_groups": saved_opt["param_groups"]}
    run(a, opt_a, track_a, batches[4:])
    for t in track_a:
        t.detach()

    b = TinyLM(seed=9)
    b.load_state_dict(saved_model)
    opt_b = _optimizer(b)
    opt_b.load_state_dict(saved_opt)
    track_b = LazyRowAdamW.attach(b, opt_b)
    # rows with a moment; the padding row was touched with a zero gradient and has none
    rebuilt = track_b[0].active
    assert 0 < int(rebuilt.sum()) < int(active_at_save.sum()) and not bool((rebuilt & ~active_at_save).any())
    run(b, opt_b, track_b, batches[4:])
    for t in track_b:
        t.detach()
    _assert_same(a, opt_a, b, opt_b, "resumed")


def test_attach_only_where_exact(monkeypatch):
    model = TinyLM()
    assert LazyRowAdamW.attach(model, torch.optim.AdamW(model.parameters(), fused=False)) == []  # foreach math
    assert LazyRowAdamW.attach(model, torch.optim.AdamW(model.parameters(), fused=True, amsgrad=True)) == []
    assert LazyRowAdamW.attach(model, torch.optim.Adam(model.parameters(), fused=True)) == []
    assert LazyRowAdamW.attach(model, _optimizer(model), world_size=2) == []  # DDP reduces every row
    monkeypatch.setenv(lazy_rows.ENV_SWITCH, "0")
    assert LazyRowAdamW.attach(model, _optimizer(model)) == []
    monkeypatch.delenv(lazy_rows.ENV_SWITCH)
    handle = model.word.weight.register_hook(lambda g: g * 2)  # a hook may touch any row
    assert LazyRowAdamW.attach(model, _optimizer(model)) == []
    handle.remove()
    tied = TinyLM()
    tied.head2 = nn.Linear(32, 5000)
    tied.head2.weight = tied.word.weight
    assert LazyRowAdamW.attach(tied, _optimizer(tied)) == []
    trackers = LazyRowAdamW.attach(model, _optimizer(model))
    assert len(trackers) == 1 and model.word.row_tracker is trackers[0]
    assert LazyRowAdamW.attach(model, _optimizer(model)) == []  # already tracked
    trackers[0].detach()


def test_out_of_range_ids_still_raise_the_lookup_error():
    model = TinyLM()
    opt = _optimizer(model)
    (tracker,) = LazyRowAdamW.attach(model, opt)
    ids, labels = _batch(torch.Generator().manual_seed(0))
    F.cross_entropy(model(ids), labels).backward()
    clip_and_step(opt, list(model.parameters()), 1.0, [tracker])
    with pytest.raises(IndexError):
        model(torch.tensor([[1, 5000]]))
    tracker.detach()


class TinyLMWithPenalty(TinyLM):
    """The table also reaches the loss whole (an L2 penalty on every row) once ``dense`` is set."""

    dense = False

    def forward(self, ids):
        out = super().forward(ids)
        return out + 1e-3 * self.word.weight.square().sum() if self.dense else out


@torch_vector_kernel
def test_a_gradient_outside_the_lookups_hands_the_table_to_torch():
    """A weight that also reaches the loss whole gets a dense gradient: the tracker sees that
    ``weight.grad`` is no longer its lookups' buffer, flushes and leaves the table to torch's AdamW,
    and the run stays bitwise the dense one."""
    dense, lazy = TinyLMWithPenalty(), TinyLMWithPenalty()
    opt_d, opt_l = _optimizer(dense), _optimizer(lazy)
    (tracker,) = LazyRowAdamW.attach(lazy, opt_l)
    gen = torch.Generator().manual_seed(7)
    for step in range(6):
        dense.dense = lazy.dense = step >= 3
        ids, labels = _batch(gen)
        for model in (dense, lazy):
            F.cross_entropy(model(ids), labels).backward()
        for pd, pl in zip(dense.parameters(), lazy.parameters()):
            pl.grad.copy_(pd.grad)
        norm = torch.nn.utils.get_total_norm([p.grad for p in dense.parameters()])
        scale = (1.0 / torch.clamp(1.0 / (norm + 1e-6), max=1.0)).float()
        opt_d.grad_scale = opt_l.grad_scale = scale
        assert (tracker.grads() == []) == (step >= 3)
        tracker.step(scale)
        opt_d.step()
        opt_l.step()
        for opt in (opt_d, opt_l):
            del opt.grad_scale
            opt.zero_grad(set_to_none=True)
        assert tracker.dense == (step >= 3) and (lazy.word.row_tracker is None) == (step >= 3)
    _assert_same(dense, opt_d, lazy, opt_l, "after the hand-over")


def test_tied_lm_head_tables_stay_dense():
    from llmcore.models import DecoderConfig, DecoderForCausalLM

    def decoder(tied):
        cfg = DecoderConfig(family="gpt2", vocab_size=5000, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                            head_dim=8, intermediate_size=48, max_position_embeddings=32, attention_bias=True,
                            hidden_act="gelu_new", tie_word_embeddings=tied)
        return DecoderForCausalLM(cfg)

    tied, untied = decoder(True), decoder(False)
    assert tied.embed.word.dense_reads and LazyRowAdamW.attach(tied, _optimizer(tied)) == []
    trackers = LazyRowAdamW.attach(untied, _optimizer(untied))
    assert [t.module for t in trackers] == [untied.embed.word]
    trackers[0].detach()


class TinyLMWithGlobalRow(TinyLM):
    """The table also reaches the loss through row 4999, which no batch looks up (a learned global
    vector), once ``stray`` is set; ``lookups`` > 1 looks the batch up again (shifted ids), as a
    pair of sentences encoded apart in one backward."""

    stray = False

    def __init__(self, lookups):
        super().__init__()
        self.lookups = lookups

    def forward(self, ids):
        out = super().forward(ids)
        for k in range(1, self.lookups):
            out = out + super().forward((ids + k) % 4999)
        return out + self.word.weight[4999, :3] if self.stray else out


@torch_vector_kernel
@pytest.mark.parametrize("lookups, stray, first", [(1, 2, 2), (2, 2, 2), (2, None, None), (1, None, None),
                                                   (1, 3.5, 3), (2, 3.5, 3)])
def test_a_stray_row_outside_the_lookups_hands_the_table_over_at_once(lookups, stray, first):
    """One row's gradient from outside the lookups (autograd sums it with the lookups' buffer into a new
    tensor) must reach the update and the norm in the step it appears: a random check of 32 of 5000
    rows found it only at step 86, the row never updated and the logged norm short until then. Several
    lookups in one backward (also summed into a new tensor) stay lazy when nothing else reaches the table.
    ``stray`` (a step, 3.5: the second micro-batch of step 3) is when it first appears, and ``first`` the step
    whose update must have it: a probe found one appearing only in a later micro-batch, which autograd adds in
    place to the earlier one's buffer, missed by the count of nonzeros (the random check again, alone).
    Weights, moments and the clip_and_step norms bitwise those of torch's fused AdamW."""
    dense, lazy = TinyLMWithGlobalRow(lookups), TinyLMWithGlobalRow(lookups)
    opt_d, opt_l = _optimizer(dense), _optimizer(lazy)
    (tracker,) = LazyRowAdamW.attach(lazy, opt_l)
    gen = torch.Generator().manual_seed(11)
    for step in range(6):
        for micro in range(2 if step == 3 else 1):  # accumulation once
            # (from step 2 on: after lazy steps, row 4999 has decay to flush)
            dense.stray = lazy.stray = stray is not None and step + micro / 2 >= stray
            ids, labels = _batch(gen, vocab=4999)
            for model in (dense, lazy):
                F.cross_entropy(model(ids), labels).backward()
        for pd, pl in zip(dense.parameters(), lazy.parameters()):  # (see the first lazy test) in place
            pl.grad.copy_(pd.grad)
        norm_d = clip_and_step(opt_d, list(dense.parameters()), 0.5, [])
        norm_l = clip_and_step(opt_l, list(lazy.parameters()), 0.5, [tracker])
        for opt in (opt_d, opt_l):
            opt.zero_grad(set_to_none=True)
        assert torch.equal(norm_d, norm_l), f"step {step}: grad_norm {float(norm_d)} vs {float(norm_l)}"
        assert tracker.dense == (first is not None and step >= first), f"step {step}"
    tracker.detach()
    _assert_same(dense, opt_d, lazy, opt_l, "at the end")
