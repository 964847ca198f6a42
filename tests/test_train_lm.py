"""Causal LM fine-tuning through the Trainer: the loss accounting against transformers' own models and
loss (one big batch = uneven micro-batches, padded = packed, two DDP ranks = one process), and a short run on
real text whose evaluation is recomputed with transformers."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore.models.config import DecoderConfig
from llmcore.models.decoder import DecoderForCausalLM
from llmcore.train import TrainConfig, Trainer, accumulate_gradients, example_count, is_causal_lm, sample_count
from model_pairs import causal_lm_pair
from tokenizer_refs import corpus, minilm_dir

transformers = pytest.importorskip("transformers")

VOCAB = 101
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64),
}


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def pair(request, tmp_path_factory):
    """(llmcore model, transformers model) with the same random weights."""
    return causal_lm_pair(HF_CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))[:2]


def ragged(gen, lengths, width=12):
    """A right-padded LM batch: real tokens per row from ``lengths``, pads labelled -100, and in every other row
    the first two tokens labelled -100 too (a prompt that is not trained on; the other rows' first label is
    real, and never a target)."""
    n = len(lengths)
    ids = torch.randint(0, VOCAB, (n, width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1::2, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _zero(*models):
    for m in models:
        m.zero_grad(set_to_none=True)


def test_causal_lm_is_recognized(pair):
    ours, ref = pair
    assert is_causal_lm(ours) and is_causal_lm(ref)
    classifier = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    assert not is_causal_lm(classifier)


def test_uneven_micro_batches_equal_transformers_one_batch(pair):
    """transformers' model and loss on the whole batch at once vs the loop's uneven micro-batches, on llmcore's
    model and on transformers' own (which checks that the loop counts the targets as transformers shifts them)."""
    ours, ref = pair
    ours.train(), ref.train()  # the configs have no dropout
    gen = torch.Generator().manual_seed(3)
    big = ragged(gen, [12, 3, 7, 12, 1, 9, 5, 12])
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]
    micro = [{k: v[s] for k, v in big.items()} for s in parts]
    _zero(ours, ref)
    want = ref(**big)  # transformers' ForCausalLMLoss: the mean over labels[..., 1:] != -100
    want.loss.backward()
    want_grads = _grads(ref)
    n_targets = int((big["labels"][:, 1:] != -100).sum())
    assert sum(example_count(b, causal_lm=True) for b in micro) == n_targets == 49  # 11 + 1 + 6 + 10 + 0 + 7 + 4 + 10

    _zero(ref)
    loss, samples = accumulate_gradients(ref, micro)
    assert samples == 7  # the row of one token has nothing to predict
    torch.testing.assert_close(loss, want.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(ref), want_grads, rtol=1e-4, atol=1e-7)

    loss, _ = accumulate_gradients(ours, micro)
    torch.testing.assert_close(loss, want.loss.detach(), rtol=0, atol=1e-4)
    emb = "transformer.wte.weight" if "transformer.wte.weight" in dict(ref.named_parameters()) \
        else "model.embed_tokens.weight"
    torch.testing.assert_close(ours.embed.word.weight.grad, dict(ref.named_parameters())[emb].grad, atol=1e-4,
                               rtol=1e-3)
    # The bug avoided: a mean of the micro-batches' own means weights their tokens unevenly.
    _zero(ref)
    for mb in micro:
        (ref(**mb).loss / len(micro)).backward()
    assert not torch.allclose(_grads(ref), want_grads, rtol=1e-3, atol=1e-6)


def test_packed_equals_padded():
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                             num_kv_heads=2, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=64))
    gen = torch.Generator().manual_seed(4)
    lengths = [5, 1, 12, 0, 8]
    dense = ragged(gen, lengths)
    real = dense["attention_mask"].bool()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    packed = {"input_ids": dense["input_ids"][real], "cu_seqlens": cu, "labels": dense["labels"][real]}
    assert example_count(packed, causal_lm=True) == example_count(dense, causal_lm=True) == 22  # 4 + 0 + 11 + 0 + 7
    assert sample_count(packed, causal_lm=True) == sample_count(dense, causal_lm=True) == 3
    dense_loss, _ = accumulate_gradients(model, [dense])
    g_dense = _grads(model)
    _zero(model)
    packed_loss, _ = accumulate_gradients(model, [packed])
    torch.testing.assert_close(packed_loss, dense_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(model), g_dense, rtol=1e-4, atol=1e-7)
    # mixed in one window: the same as the dense batch twice
    _zero(model)
    both, _ = accumulate_gradients(model, [packed, dense])
    torch.testing.assert_close(both, dense_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(model), g_dense, rtol=1e-4, atol=1e-7)


def test_label_smoothing_matches_transformers_label_smoother(pair, tmp_path):
    """label_smoothing_factor on a causal LM: transformers' LabelSmoother (shift_labels, as its Trainer uses it for
    causal LMs) on the whole batch vs the loop's uneven micro-batches, for transformers' model (smoothed over its
    logits) and for llmcore's (smoothed inside the fused LM-head loss), in training and in evaluation."""
    from transformers.trainer_pt_utils import LabelSmoother

    from llmcore.train.loop import _forward_takes_label_smoothing

    ours, ref = pair
    ours.train(), ref.train()
    gen = torch.Generator().manual_seed(6)
    big = ragged(gen, [12, 3, 7, 12, 1, 9])
    micro = [{k: v[s] for k, v in big.items()} for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    inputs = {k: v for k, v in big.items() if k != "labels"}
    _zero(ours, ref)
    want = LabelSmoother(epsilon=0.1)(ref(**inputs), big["labels"], shift_labels=True)
    want.backward()
    want_grads = _grads(ref)
    _zero(ref)
    ref(**big).loss.backward()  # unsmoothed: near-uniform predictions hide smoothing in the loss, not the gradient
    assert float((_grads(ref) - want_grads).norm()) > 0.05 * float(want_grads.norm())

    _zero(ref)
    loss, _ = accumulate_gradients(ref, micro, label_smoothing=0.1)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(ref), want_grads, rtol=1e-4, atol=1e-7)

    assert _forward_takes_label_smoothing(type(ours)) and not _forward_takes_label_smoothing(type(ref))
    loss, _ = accumulate_gradients(ours, micro, label_smoothing=0.1)
    torch.testing.assert_close(loss, want.detach(), rtol=0, atol=1e-4)
    emb = "transformer.wte.weight" if "transformer.wte.weight" in dict(ref.named_parameters()) \
        else "model.embed_tokens.weight"
    torch.testing.assert_close(ours.embed.word.weight.grad, dict(ref.named_parameters())[emb].grad, atol=1e-4,
                               rtol=1e-3)
    _zero(ours, ref)

    ref.eval()
    with torch.no_grad():
        want_eval = float(LabelSmoother(epsilon=0.1)(ref(**inputs), big["labels"], shift_labels=True))
    for model in (ours, ref):
        cfg = TrainConfig(str(tmp_path / type(model).__name__), max_steps=1, save_strategy="no",
                          label_smoothing_factor=0.1, report_to="none", disable_tqdm=True)
        got = Trainer(model, cfg, [big], eval_batches=micro).evaluate()
        assert got["eval_tokens"] == int((big["labels"][:, 1:] != -100).sum())
        assert got["eval_loss"] == pytest.approx(want_eval, abs=1e-4), type(model).__name__


def test_task_errors(pair, tmp_path):
    ours, _ = pair
    gen = torch.Generator().manual_seed(5)
    b = ragged(gen, [4, 6])
    with pytest.raises(ValueError, match=r"causal LM: its labels must have input_ids' shape \(2, 12\)"):
        accumulate_gradients(ours, [dict(b, labels=torch.tensor([0, 1]))])
    unlabelled = {k: v for k, v in b.items() if k != "labels"}
    with pytest.raises(KeyError, match=r"a training batch needs 'labels'; it has keys \['attention_mask', 'input_"):
        accumulate_gradients(ours, [unlabelled])
    trainer = Trainer(ours, TrainConfig(str(tmp_path / "e"), max_steps=1, save_strategy="no"), [b],
                      eval_batches=[unlabelled])
    with pytest.raises(KeyError, match="an evaluation batch needs 'labels'"):
        trainer.evaluate()
    from llmcore.models import EncoderConfig, EncoderForSequenceClassification
    clf = EncoderForSequenceClassification(EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1,
                                                         num_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match=r"trained only as a causal LM.*EncoderForSequenceClassification is not"):
        Trainer(clf, TrainConfig(str(tmp_path / "o"), max_steps=1, save_strategy="no"), [b]).train()
    # a causal LM's evaluation has no accuracy: refused when the Trainer is made, not at its first evaluation
    watching = TrainConfig(str(tmp_path / "m"), max_steps=1, save_strategy="no", eval_strategy="steps",
                           eval_steps=1, metric_for_best_model="accuracy")
    with pytest.raises(ValueError, match=r"'accuracy': the evaluation of a causal LM reports loss, tokens, perplexity"):
        Trainer(ours, watching, [b], eval_batches=[b])
    watching.metric_for_best_model = "eval_perplexity"
    Trainer(ours, watching, [b], eval_batches=[b])


def test_packed_batch_of_one_token_sequences_and_transformers_packed(pair, tmp_path):
    """A packed batch with as many tokens as sequences (one-token texts; batch size 1 and a one-token row) read as one
    label per sequence, and the causal LM refused it: finetune stopped mid-run ("labels must have input_ids' shape
    (4,), got (4,)"). Such a batch trains, its sequences without a target, as padded they do. transformers' own
    model given a packed batch failed deep inside it: said (found by a probe)."""
    ours, ref = pair
    ids = torch.tensor([5, 9, 17, 3])
    packed = {"input_ids": ids, "cu_seqlens": torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32), "labels": ids.clone()}
    trainer = Trainer(ours, TrainConfig(str(tmp_path / "one"), max_steps=1, save_strategy="no"), [packed],
                      eval_batches=[packed])
    assert trainer.evaluate()["eval_tokens"] == 0  # (no token has a next one within its sequence)
    two = {"input_ids": torch.tensor([5, 9, 17]), "cu_seqlens": torch.tensor([0, 1, 3], dtype=torch.int32),
           "labels": torch.tensor([5, 9, 17])}
    assert Trainer(ours, TrainConfig(str(tmp_path / "two"), max_steps=1, save_strategy="no"), [two],
                   eval_batches=[two]).evaluate()["eval_tokens"] == 1
    with pytest.raises(ValueError, match=r"a training batch is packed \(cu_seqlens\), which transformers' .* cannot"):
        Trainer(ref, TrainConfig(str(tmp_path / "hf"), max_steps=1, save_strategy="no"), [two]).train()


def test_trainer_on_real_text_matches_transformers_evaluation(tmp_path):
    """A few steps of next-token training on SST-2 sentences (MiniLM's WordPiece ids): the training loss falls,
    and the Trainer's evaluation equals transformers' loss on the saved model, token-weighted over the batches."""
    tok = llmcore.Tokenizer.from_pretrained(minilm_dir())
    texts = corpus("sst2-train")

    def batches(lo, hi, size):
        out = []
        for i in range(lo, hi, size):
            enc = tok.encode_batch(list(texts[i:i + size]), padding=True)
            ids = torch.from_numpy(enc.input_ids).long()
            mask = torch.from_numpy(enc.attention_mask).long()
            out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        return out

    train, evaluation = batches(0, 256, 16), batches(256, 352, 24)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=64, max_position_embeddings=128)
    trainer = Trainer(DecoderForCausalLM(cfg),
                      TrainConfig(str(tmp_path / "out"), num_train_epochs=2, learning_rate=1e-2, warmup_steps=2,
                                  logging_steps=8, save_strategy="no", eval_strategy="no",
                                  gradient_accumulation_steps=2),
                      train, eval_batches=evaluation)
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    assert result["global_step"] == 16
    assert after["eval_loss"] < before["eval_loss"] - 2.0, (before, after)
    assert math.log(tok.vocab_size) - 0.5 < before["eval_loss"] < math.log(tok.vocab_size) + 0.5
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in evaluation)
    assert after["eval_tokens"] == n_targets
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss"]), rel=1e-12)
    assert result["train_samples_per_second"] > 0

    trainer.save_model(str(tmp_path / "model"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), attn_implementation="sdpa")
    ref.eval()
    total = 0.0
    with torch.no_grad():
        for b in evaluation:
            total += float(ref(**b).loss) * int((b["labels"][:, 1:] != -100).sum())
    assert after["eval_loss"] == pytest.approx(total / n_targets, abs=2e-4)


def test_compute_metrics_sees_logits_and_labels(tmp_path):
    """compute_metrics gets each batch's (B, L, vocab) logits and unshifted labels, as transformers passes them;
    a next-token accuracy written against them agrees with one computed here."""
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                             num_kv_heads=4, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=64))
    gen = torch.Generator().manual_seed(6)
    evaluation = [ragged(gen, [12, 7, 3]), ragged(gen, [9, 12])]

    class NextTokenAccuracy:
        def __init__(self):
            self.hit = self.n = 0

        def update(self, logits, labels):
            pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
            keep = gold != -100
            self.hit += int((pred[keep] == gold[keep]).sum())
            self.n += int(keep.sum())

        def compute(self):
            return {"next_token_accuracy": self.hit / self.n}

    out = Trainer(model, TrainConfig(str(tmp_path / "o"), max_steps=1, save_strategy="no"), evaluation,
                  eval_batches=evaluation, compute_metrics=NextTokenAccuracy).evaluate()
    hit = n = 0
    loss_sum = 0.0
    model.eval()
    with torch.no_grad():
        for b in evaluation:
            logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
            gold = b["labels"][:, 1:]
            keep = gold != -100
            hit += int((logits[:, :-1].argmax(-1)[keep] == gold[keep]).sum())
            n += int(keep.sum())
            loss_sum += float(F.cross_entropy(logits[:, :-1][keep].double(), gold[keep], reduction="sum"))
    assert out["eval_next_token_accuracy"] == hit / n
    assert out["eval_tokens"] == n
    assert out["eval_loss"] == pytest.approx(loss_sum / n, rel=1e-5)


def _dist_worker(rank, world, init_file, out_dir, fsdp):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(str(out_dir), max_steps=2, warmup_steps=1, learning_rate=3e-3, logging_steps=1,
                          save_strategy="no", gradient_accumulation_steps=2, fsdp=fsdp)
        trainer = Trainer(_tiny_lm(), cfg, [b[rank] for b in _shards()])
        trainer.train()
        # rank 0 evaluates three batches, rank 1 one (under FSDP it repeats it, uncounted, in lockstep)
        evals = _eval_batches()
        trainer.eval_batches = evals[:3] if rank == 0 else evals[3:]
        metrics = trainer.evaluate()
        state = trainer.model.state_dict() if not fsdp else None
        if fsdp:
            from llmcore.train.fsdp import full_model_state
            state = full_model_state(trainer.model)
        if rank == 0:
            torch.save({"state": state, "eval": metrics}, os.path.join(str(out_dir), "final.pt"))
    finally:
        dist.destroy_process_group()


def _tiny_lm():
    torch.manual_seed(0)
    return DecoderForCausalLM(DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                            num_kv_heads=2, head_dim=8, intermediate_size=64,
                                            max_position_embeddings=64))


def _shards():
    """Per micro-batch, one shard per rank with very different numbers of targets."""
    gen = torch.Generator().manual_seed(12)
    return [(ragged(gen, a), ragged(gen, b)) for a, b in
            [([12, 12, 12], [3]), ([2], [12, 11, 9, 12]), ([7, 4], [5, 12]), ([12], [1, 3, 2])]]


def _eval_batches():
    gen = torch.Generator().manual_seed(13)
    return [ragged(gen, n) for n in ([12, 5], [3], [9, 12, 12], [7, 2])]


@pytest.mark.parametrize("fsdp", ["", "full_shard"])
def test_two_ranks_match_one_process(tmp_path, fsdp):
    """The step's token count is summed over ranks: two ranks (DDP, or FSDP) with uneven shards take the steps
    one process takes on both shards at once, and their evaluation is the one process's over all batches."""
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), tmp_path / "dist", fsdp), nprocs=2, join=True)
    got = torch.load(tmp_path / "dist" / "final.pt")
    merged = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in _shards()]
    single = Trainer(_tiny_lm(), TrainConfig(str(tmp_path / "one"), max_steps=2, warmup_steps=1, learning_rate=3e-3,
                                             logging_steps=1, save_strategy="no", gradient_accumulation_steps=2),
                     merged, eval_batches=_eval_batches())
    single.train()
    for name, t in single.model.state_dict().items():
        torch.testing.assert_close(got["state"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    want = single.evaluate()
    assert got["eval"]["eval_tokens"] == want["eval_tokens"]
    assert got["eval"]["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
