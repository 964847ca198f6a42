"""The batches `llmcore finetune` feeds: shape rounding by filler sequences (packed) or length
(padded) must leave every loss, metric, token count and gradient of the real rows unchanged."""
import os

import numpy as np
import pytest
import torch
from tokenizer_refs import minilm_dir

from llmcore.bench.data import data_dir
from llmcore.train.config import TrainConfig
from llmcore.train.finetune import SplitBatches, split_batches
from llmcore.train.loop import IGNORE_INDEX, loss_sum, token_count


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """200 SST-2 training rows (+ 64 validation), prepared with MiniLM's tokenizer, packed and padded."""
    from llmcore.data import prepare

    try:
        root = data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    src = tmp_path_factory.mktemp("sst2_slice")
    for split, rows in (("train", 200), ("validation", 64)):
        with open(os.path.join(root, "sst2", f"{split}.tsv"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        (src / f"{split}.tsv").write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared")
    return {pack: prepare(str(src), minilm_dir(), 64, str(out / str(pack)), pack=pack) for pack in (True, False)}


def _epoch(split, pack, multiple, batch_size=16):
    return list(split_batches(split, batch_size, pack, seed=3, shuffle=True, pad_to_multiple_of=multiple)(0))


@pytest.mark.parametrize("multiple", [2, 64, 100, 10**6])
def test_packed_filler_rounds_tokens_and_keeps_the_real_rows(prepared, multiple):
    """Rounded up to the multiple, never past what a batch can hold (16 rows of the longest): a multiple of 1e6
    made every batch a million tokens (MemoryError or the OOM killer, a probe); as the padded path keeps its
    length within the longest row."""
    split = prepared[True]["train"]
    plain, rounded = _epoch(split, True, 1), _epoch(split, True, multiple)
    assert len(plain) == len(rounded)
    longest = int(np.max(split.lengths))
    saw_filler = False
    for a, b in zip(plain, rounded):
        n, t = a["labels"].numel(), a["input_ids"].numel()
        assert b["input_ids"].numel() == min(-(-t // multiple) * multiple, 16 * longest)
        assert torch.equal(b["input_ids"][:t], a["input_ids"]) and bool((b["input_ids"][t:] == 0).all())
        assert torch.equal(b["cu_seqlens"][: n + 1], a["cu_seqlens"])
        assert int(b["cu_seqlens"][-1]) == b["input_ids"].numel()
        assert torch.equal(b["labels"][:n], a["labels"]) and bool((b["labels"][n:] == IGNORE_INDEX).all())
        filler = (b["cu_seqlens"][n + 1:] - b["cu_seqlens"][n:-1]).tolist()
        assert all(0 < x <= longest for x in filler)  # positions the model knows
        assert b["labels"].numel() == n + len(filler) and b["cu_seqlens"].dtype == torch.int32
        assert token_count(b) == token_count(a) == t  # throughput counts real tokens only
        saw_filler |= bool(filler)
    assert saw_filler


def test_padded_length_rounds_up_within_the_longest_row(prepared):
    split = prepared[False]["train"]
    longest = int(np.max(split.lengths))
    for a, b in zip(_epoch(split, False, 1), _epoch(split, False, 8)):
        w, wb = a["input_ids"].shape[1], b["input_ids"].shape[1]
        assert wb == min(-(-w // 8) * 8, longest) and wb >= w
        assert torch.equal(b["input_ids"][:, :w], a["input_ids"]) and not b["attention_mask"][:, w:].any()
        assert token_count(b) == token_count(a)


def test_filler_changes_no_logit_loss_or_gradient(prepared):
    """The real MiniLM in fp32: the real rows' logits, the summed loss and every parameter gradient
    are the same with and without filler sequences (filler attends only to itself; its rows carry
    label -100)."""
    from llmcore.models import from_pretrained

    torch.manual_seed(0)
    model = from_pretrained(minilm_dir(), num_labels=2).eval()  # dropout off: the two passes compare
    split = prepared[True]["train"]
    a, b = _epoch(split, True, 1)[0], _epoch(split, True, 64)[0]
    assert b["labels"].numel() > a["labels"].numel()  # this batch has filler
    grads, outs = [], []
    for batch in (a, b):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits
        loss = loss_sum(logits, batch["labels"])
        loss.backward()
        outs.append((logits[: a["labels"].numel()].detach(), loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_batch_multiple_defaults_and_errors(prepared):
    assert TrainConfig("o", bf16=True).batch_multiple("cpu") == 64
    assert TrainConfig("o", bf16=True, pack=False).batch_multiple(torch.device("cpu")) == 8
    assert TrainConfig("o", bf16=False).batch_multiple("cpu") == 1
    assert TrainConfig("o", bf16=True).batch_multiple("cuda:0") == 1
    assert TrainConfig("o", pad_to_multiple_of=32).batch_multiple("cpu") == 32
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        TrainConfig("o", pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        SplitBatches(prepared[True]["train"], [], True, 0)


def test_epoch_orders_differ_across_seeds(prepared):
    """Shuffled by (seed, epoch) as one seed sequence: with seed + epoch, epoch 1 of seed 42 was epoch 0 of seed 43
    (a probe), so a seed sweep trained on shifted copies of one order. Each epoch still holds every row once, and
    one (seed, epoch) gives one order."""
    split = prepared[True]["train"]

    def order(seed, epoch):
        return [tuple(rows) for rows in split_batches(split, 16, True, seed=seed, shuffle=True)(epoch).rows]

    assert order(42, 1) != order(43, 0) and order(42, 0) != order(42, 1)
    assert order(42, 1) == order(42, 1)
    assert sorted(i for rows in order(42, 1) for i in rows) == list(range(len(split)))


@pytest.mark.parametrize("world", [1, 2])
def test_accumulation_trains_on_the_rows_of_one_larger_batch(prepared, world):
    """With gradient_accumulation_steps, an optimizer step's micro-batches (on every rank) hold the rows one batch
    that many times larger holds, as in transformers' Trainer: batch 4 x accumulation 4 drew other rows per step
    than batch 16 (a probe: the losses and weights of the two runs parted from the first step)."""
    split = prepared[True]["train"]

    def steps(batch, accumulation):
        ranks = [split_batches(split, batch, True, seed=5, shuffle=True, rank=r, world_size=world,
                               accumulation=accumulation)(1).rows for r in range(world)]
        assert len({len(rows) for rows in ranks}) == 1  # (every rank steps as often)
        micro = [np.concatenate([rows[i] for rows in ranks]) for i in range(len(ranks[0]))]
        return [sorted(np.concatenate(micro[i:i + accumulation]).tolist())
                for i in range(0, len(micro), accumulation)]

    big = steps(16, 1)
    assert steps(4, 4) == big and steps(8, 2) == big
    assert sorted(i for rows in big for i in rows) == list(range(len(split)))
    width = 16 * world
    assert [len(rows) for rows in big] == [width] * (len(split) // width) + [len(split) % width]  # (short: last)
    assert steps(4, 1) != big[: len(steps(4, 1))]
